"""blockcore: QEMU's block layer as a Python library, with disk formats as driver plugins.

General layout:

- :mod:`blockcore.hookspecs` is the driver contract; :mod:`blockcore.drivers` finds drivers
  (stevedore, group ``blockcore.drivers``) and validates them (pluggy).
- :mod:`blockcore.tiers` declares and checks the API tiers (GS, "I/O or GS", I/O, common);
  :mod:`blockcore.aio` holds AioContexts, IOThreads, the sync-wrapper generator and the graph
  lock.
- :mod:`blockcore.graph` is the node graph (nodes, edges, permissions, open/close);
  :mod:`blockcore.backend` the user's handle (BlockBackend).
- :mod:`blockcore.io` is the request path; :mod:`blockcore.status` block status;
  :mod:`blockcore.drain` drained sections; :mod:`blockcore.cor` copy-on-read;
  :mod:`blockcore.info` and :mod:`blockcore.special` the rest of QEMU's block-io.h;
  :mod:`blockcore.create` what protocol drivers share to create images (QEMU's generic
  create fallback for storage that already exists, such as host devices).
- :mod:`blockcore.posix` is the POSIX I/O engine shared by file-like drivers, on
  :mod:`blockcore.threadpool` (blocking calls) and :mod:`blockcore.imagelock` (QEMU's image
  locking); :mod:`blockcore.testing` is the conformance kit for driver authors.

The formats themselves live in separate distributions (blockcore-raw, blockcore-qcow2, ...).
"""

from __future__ import annotations

from . import aio, drain, drivers, graph, info, io, manage, special, status, tiers, types  # noqa: F401
from .aio import AioContext, IOThread, main_context, run
from .backend import BlockBackend
from .drivers import hookimpl, register_driver, unregister_driver
from .errors import (
    BlockError,
    DeadlockError,
    DriverContractError,
    DriverNotFoundError,
    ImageCorruptError,
    NoMediumError,
    NoSpaceError,
    NotSupportedError,
    PermissionConflictError,
    TierViolation,
)
from .graph import BdrvChild, BlockDriverState, bdrv_open, bdrv_unref
from .special import bdrv_create
from .types import (
    BdrvRequestFlags,
    BlockDriverInfo,
    BlockLimits,
    BlockStatus,
    BlockStatusFlags,
    ChildRole,
    Concurrency,
    DriverDescriptor,
    OpenFlags,
    OptionSpec,
    Perm,
    PreallocMode,
)

__all__ = [
    "AioContext",
    "BdrvChild",
    "BdrvRequestFlags",
    "BlockBackend",
    "BlockDriverInfo",
    "BlockDriverState",
    "BlockError",
    "BlockLimits",
    "BlockStatus",
    "BlockStatusFlags",
    "ChildRole",
    "Concurrency",
    "DeadlockError",
    "DriverContractError",
    "DriverDescriptor",
    "DriverNotFoundError",
    "IOThread",
    "ImageCorruptError",
    "NoMediumError",
    "NoSpaceError",
    "NotSupportedError",
    "OpenFlags",
    "OptionSpec",
    "Perm",
    "PermissionConflictError",
    "PreallocMode",
    "TierViolation",
    "bdrv_create",
    "bdrv_open",
    "bdrv_unref",
    "hookimpl",
    "main_context",
    "register_driver",
    "run",
    "unregister_driver",
]

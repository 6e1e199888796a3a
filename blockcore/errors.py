"""Exceptions: every I/O or configuration problem is an :class:`OSError` carrying an errno.

QEMU's ``Error **errp`` plus negative errno becomes one exception here: the errno says what
kind of failure it is, the message says what happened, and the ``filename`` slot names the
node or file concerned, so ``str(err)`` reads ``[Errno 22] offset 4097 not aligned: 'disk0'``.

:class:`NotSupportedError` (``ENOTSUP``) is the *only* signal that makes the core fall back
to a generic implementation, as ``-ENOTSUP`` is in QEMU's ``block/io.c``.
"""

from __future__ import annotations

import errno as _errno
import os as _os

import pluggy

__all__ = [
    "BlockError",
    "DeadlockError",
    "DriverContractError",
    "DriverNotFoundError",
    "ImageCorruptError",
    "NoMediumError",
    "NoSpaceError",
    "NotSupportedError",
    "PermissionConflictError",
    "TierViolation",
    "error_prepend",
]


class BlockError(OSError):
    """Root of blockcore's errors: ``BlockError(errno, message, name_of_node_or_file)``."""

    def __init__(self, err: int, message: str, filename: str | None = None) -> None:
        if filename is None:
            super().__init__(err, message)
        else:
            super().__init__(err, message, filename)


def error_prepend(exc: OSError, prefix: str) -> BlockError:
    """``exc`` told as part of a larger failure: ``prefix`` then its message, as QEMU's
    error_prepend (``"Could not resize image: " + ...``). The errno, the class for preset-errno
    errors, the file name and any ``hint`` are kept; the result prints as it is (``verbatim``),
    so a lowercase message gets QEMU's capital after the prefix. Tier: any."""
    text = exc.strerror or _os.strerror(exc.errno or _errno.EIO)
    if not getattr(exc, "verbatim", False):
        text = text[:1].upper() + text[1:]
    filename = exc.filename if isinstance(exc.filename, str) else None
    if isinstance(exc, _PresetErrno):
        err: BlockError = type(exc)(prefix + text, filename)
    else:
        err = BlockError(exc.errno or _errno.EIO, prefix + text, filename)
    err.verbatim = True  # type: ignore[attr-defined]
    if getattr(exc, "hint", None):
        err.hint = exc.hint  # type: ignore[attr-defined]
    return err


class _PresetErrno(BlockError):
    errno_value: int = _errno.EIO

    def __init__(self, message: str, filename: str | None = None) -> None:
        super().__init__(self.errno_value, message, filename)


class NotSupportedError(_PresetErrno):
    """``ENOTSUP``: the driver or the storage cannot do this; the core may fall back."""

    errno_value = _errno.ENOTSUP


class ImageCorruptError(_PresetErrno):
    """``EIO``: metadata of an image is inconsistent (the image may be marked corrupt)."""

    errno_value = _errno.EIO


class PermissionConflictError(_PresetErrno):
    """``EPERM``: a permission on a node conflicts with what another user holds or shares."""

    errno_value = _errno.EPERM


class NoSpaceError(_PresetErrno):
    """``ENOSPC``: the storage is full."""

    errno_value = _errno.ENOSPC


class NoMediumError(_PresetErrno):
    """``ENOMEDIUM``: the node has no driver or the drive has no medium."""

    errno_value = _errno.ENOMEDIUM


class DriverNotFoundError(_PresetErrno):
    """``ENOENT``-family error: no installed driver has that name (the message lists them)."""

    errno_value = _errno.ENOENT


class DeadlockError(_PresetErrno):
    """``EDEADLK``: a call would wait on an event loop that cannot make progress."""

    errno_value = _errno.EDEADLK


class TierViolation(AssertionError):
    """An API function was called from a place its tier forbids.

    Raised with an explicit ``if`` (not ``assert``), so it survives ``python -O``.
    """


class DriverContractError(pluggy.PluginValidationError):
    """A driver's hook implementations do not match the contract in :mod:`blockcore.hookspecs`."""

    def __init__(self, plugin: object, message: str) -> None:
        super().__init__(plugin, message)

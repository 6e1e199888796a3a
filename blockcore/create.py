"""Creation helpers shared by protocol drivers: the ``size``/``preallocation`` pair every
protocol takes, and QEMU's generic fallback for protocols that cannot make new storage but
can format an existing one (block.c's ``bdrv_co_create_opts_simple``).

General layout: :func:`create_size_and_prealloc` reads the two common options (the ``file``
protocol and the fallback both use it); :data:`CREATE_OPTS_SIMPLE` is the option list of a
driver that uses the fallback (QEMU's ``bdrv_create_opts_simple``), and
:func:`bdrv_co_create_opts_simple` is the fallback itself, which such a driver's
``bdrv_co_create_opts`` hook calls with its own name.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .errors import BlockError, NotSupportedError
from .tiers import Tier, api
from .types import BDRV_SECTOR_SIZE, BdrvRequestFlags, OpenFlags, OptionSpec, PreallocMode
from .util import parse_size

__all__ = ["CREATE_OPTS_SIMPLE", "bdrv_co_create_opts_simple", "create_size_and_prealloc"]

#: The create options of a driver that formats existing storage: a size, and preallocation
#: that can only be ``off`` (nothing is allocated, the storage is already there).
CREATE_OPTS_SIMPLE = (
    OptionSpec("size", "size", "virtual disk size"),
    OptionSpec("preallocation", "string", "preallocation mode (allowed values: off)", "off"),
)


def create_size_and_prealloc(options: dict[str, Any]) -> tuple[int, PreallocMode]:
    """``size`` in bytes (0 when absent) and the ``preallocation`` mode (``off`` when absent)
    of a protocol's create ``options``; a mode QEMU does not know is ``EINVAL``. Tier: any."""
    size = parse_size(options.get("size") or 0)
    prealloc = PreallocMode.from_name(str(options.get("preallocation") or "off"))
    return size, prealloc


def _open_failure(driver: str, filename: str, exc: OSError) -> BlockError:
    """QEMU's message when the fallback cannot open the target: the driver cannot make new
    storage, so the open error is all there is to say."""
    if isinstance(exc, BlockError):
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    else:  # from the OS: QEMU's open names the path it tried
        reason = f"Could not open '{exc.filename or filename}': {os.strerror(exc.errno or 0)}"
    err = BlockError(errno.EINVAL, f"Protocol driver '{driver}' does not support image "
                     f"creation, and opening the image failed: {reason}", filename)  # fmt: skip
    err.verbatim = True  # type: ignore[attr-defined]  # QEMU's text, the reason's case kept
    return err


@api(Tier.IO)
async def bdrv_co_create_opts_simple(driver: str, filename: str, options: dict[str, Any]) -> None:
    """Format existing storage for ``driver`` (QEMU's bdrv_co_create_opts_simple). Tier: I/O.

    Opens ``filename`` with ``driver``, lets it resize to ``size`` where it can (a device keeps
    its size, a larger one is fine), refuses storage smaller than ``size``, and zeroes the
    first sector so that no old format header is probed later. Only ``preallocation=off``
    is accepted.

    :raises NotSupportedError: another preallocation mode, or the storage is too small and
        the driver cannot grow it.
    :raises BlockError: ``EINVAL`` when the target cannot be opened (QEMU's message, the open
        error appended); the driver's truncate error when it refuses the size.
    """
    from .backend import blk_co_new_open, blk_co_unref
    from .resize import bdrv_co_getlength

    size, prealloc = create_size_and_prealloc(options)
    if prealloc is not PreallocMode.OFF:
        raise NotSupportedError(f"Unsupported preallocation mode '{prealloc.value}'", filename)
    try:
        blk = await blk_co_new_open(filename, {"driver": driver},
                                    OpenFlags.RDWR | OpenFlags.RESIZE)  # fmt: skip
    except OSError as exc:
        raise _open_failure(driver, filename, exc) from exc
    try:
        refused: NotSupportedError | None = None
        try:
            await blk.co_truncate(size, exact=False)  # a no-op on storage already big enough
        except NotSupportedError as exc:
            refused = exc  # fine as long as the storage is already big enough
        length = await bdrv_co_getlength(blk.bs)
        if length < size:
            raise refused or NotSupportedError(
                f"the image is {length} bytes, {size} were asked for", filename)
        clear = min(length, BDRV_SECTOR_SIZE)
        if clear:
            try:
                await blk.co_pwrite_zeroes(0, clear, BdrvRequestFlags.MAY_UNMAP)
            except OSError as exc:
                raise BlockError(exc.errno or errno.EIO, "Failed to clear the new image's "
                                 f"first sector: {os.strerror(exc.errno or errno.EIO)}",
                                 filename) from exc  # fmt: skip
    finally:
        await blk_co_unref(blk)

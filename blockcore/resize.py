"""Truncate and length: resizing a node (zeroing the new tail over a longer backing file)
and asking its length."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .aio import _waiters, aio_wait_kick, assert_bdrv_graph_readable, co_wrapper
from .errors import BlockError, NoMediumError, NotSupportedError
from .io import (
    _NONE,
    _O_RDWR,
    _P_RESIZE,
    _TRUNCATE,
    _ZERO,
    F,
    TrackedRequest,
    _call_driver,
    _check_request,
    _enter,
    _wait_serialising,
)
from .tiers import Tier, api
from .types import PreallocMode
from .util import round_up

if TYPE_CHECKING:
    from .graph import BdrvChild, BlockDriverState

@api(Tier.IO)
async def bdrv_co_truncate(child: BdrvChild, offset: int, exact: bool = True,
                           prealloc: PreallocMode = PreallocMode.OFF, flags: F = _NONE
                           ) -> None:  # fmt: skip
    """Resize ``child``'s node to ``offset`` bytes. Tier: I/O.

    Growing a node whose backing file is longer than its old size zeroes the new tail, so
    stale backing data does not show through. Drivers refuse preallocation when shrinking
    (each with its own message, as in QEMU, where block/io.c does not check it).
    """
    from .graph import bdrv_cow_bs, bdrv_filter_child

    bs = child.bs
    drv = _enter("bdrv_co_truncate", bs)
    assert_bdrv_graph_readable("bdrv_co_truncate")
    if offset < 0:
        raise BlockError(errno.EINVAL, "image size cannot be negative", bs.filename)
    _check_request(bs, offset, 0, False)
    old = await bdrv_co_getlength(bs)
    if not bs.open_flags & _O_RDWR:
        raise BlockError(errno.EACCES, "image is read-only", bs.filename or bs.node_name)
    if not child.perm & _P_RESIZE:
        raise BlockError(errno.EPERM, f"edge {child.name!r} lacks the resize permission",
                         bs.node_name)  # fmt: skip
    bs.in_flight += 1
    req = TrackedRequest(bs, min(old, offset), abs(offset - old), _TRUNCATE)
    try:
        if offset > old:
            req.make_serialising(1)
        if bs.serialising_in_flight:
            await _wait_serialising(req)
        backing = bdrv_cow_bs(bs)
        if offset > old and backing is not None and backing.total_bytes > old:
            flags |= _ZERO
        if drv.bdrv_co_truncate is not None:
            if flags & ~bs.supported_truncate_flags:
                raise NotSupportedError("block driver does not support requested flags",
                                        bs.filename or bs.node_name)  # fmt: skip
            await _call_driver(bs, drv.bdrv_co_truncate, offset, exact, prealloc, flags)
        elif (filtered := bdrv_filter_child(bs)) is not None:
            await bdrv_co_truncate(filtered, offset, exact, prealloc, flags)
        else:
            raise NotSupportedError("image format driver does not support resize",
                                    bs.filename or bs.node_name)  # fmt: skip
        bs.total_bytes = round_up(await bdrv_getlength_from_driver(bs), 512)
        for bitmap in bs.dirty_bitmaps:
            bitmap.resize(bs.total_bytes)
    finally:
        bs.write_gen += 1
        req.end()
        bs.in_flight -= 1
        for c in bs.parents:
            c.parent.parent_resize()
        if _waiters:
            aio_wait_kick()


async def bdrv_getlength_from_driver(bs: BlockDriverState) -> int:
    """The length the driver reports now (filters: their child's), not the cached one."""
    from .graph import bdrv_filter_bs

    drv = bs.drv
    if drv is None:
        raise NoMediumError("no medium", bs.node_name)
    if drv.bdrv_co_getlength is not None:
        return int(await drv.bdrv_co_getlength(bs))
    filtered = bdrv_filter_bs(bs)
    if filtered is not None:
        return await bdrv_getlength_from_driver(filtered)
    return bs.total_bytes


def bdrv_getlength_uncached(bs: BlockDriverState) -> int:
    """Sync: ask the driver for the node's length (used once at open)."""
    from .aio import _run_in_context

    return _run_in_context(bs.aio_context, bdrv_getlength_from_driver(bs), "bdrv_getlength")


@api(Tier.IO)
async def bdrv_co_getlength(bs: BlockDriverState) -> int:
    """Length of the node in bytes (a multiple of 512). Tier: I/O.

    Devices with variable length (CD-ROMs) are asked again each time.
    """
    _enter("bdrv_co_getlength", bs)
    if bs.bl.has_variable_length:
        bs.total_bytes = round_up(await bdrv_getlength_from_driver(bs), 512)
    return bs.total_bytes


@api(Tier.IO)
async def bdrv_co_nb_sectors(bs: BlockDriverState) -> int:
    """Length of the node in 512-byte sectors. Tier: I/O."""
    return await bdrv_co_getlength(bs) // 512


@api(Tier.IO)
def bdrv_nb_sectors(bs: BlockDriverState) -> int:
    """Length in sectors, without polling when the length is fixed (QEMU's hand-written
    mixed function). Tier: I/O."""
    if bs.drv is None:
        raise NoMediumError("no medium", bs.node_name)
    if bs.bl.has_variable_length:
        return bdrv_getlength(bs) // 512
    return bs.total_bytes // 512


bdrv_getlength = co_wrapper(bdrv_co_getlength, "bdrv_getlength", mixed=True, rdlock=True)
bdrv_truncate = co_wrapper(bdrv_co_truncate, "bdrv_truncate", mixed=True, rdlock=True,
                           tier=Tier.IO_OR_GS)  # fmt: skip

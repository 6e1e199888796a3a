"""Copy-on-read: data a read fetches from a backing file is written into the top node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .io import (
    F,
    TrackedRequest,
    _cluster_size,
    _driver_preadv,
    _driver_pwritev,
    _wait_serialising,
    bdrv_co_debug_event,
)
from .status import bdrv_co_is_allocated
from .types import MAX_BOUNCE_BUFFER, OpenFlags
from .util import aligned_buffer, is_zero, round_down, round_up
from .zero import _do_pwrite_zeroes

if TYPE_CHECKING:
    from .graph import BdrvChild


async def copy_on_read(child: BdrvChild, req: TrackedRequest, offset: int, length: int,
                       view: memoryview, flags: F) -> None:  # fmt: skip
    """bdrv_co_do_copy_on_readv: serialise at cluster size, then copy unallocated pieces."""
    bs = child.bs
    cluster = await _cluster_size(bs)
    req.make_serialising(cluster)
    await _wait_serialising(req)
    align = bs.bl.request_alignment
    start = round_down(offset, cluster)
    end = min(round_up(offset + length, cluster), round_up(bs.total_bytes, align))
    max_piece = min(bs.bl.max_transfer or MAX_BOUNCE_BUFFER, MAX_BOUNCE_BUFFER)
    max_piece = max(round_down(max_piece, align), align)
    prefetch = bool(flags & F.PREFETCH)
    pos = start
    while pos < end:
        allocated, pnum = await bdrv_co_is_allocated(bs, pos, min(end - pos, max_piece))
        if pnum == 0:  # the image ends inside the last cluster
            break
        pnum = min(pnum, end - pos, max_piece)
        lo, hi = max(pos, offset), min(pos + pnum, offset + length)
        if allocated or bs.open_flags & OpenFlags.INACTIVE:
            if not prefetch and hi > lo:
                await _driver_preadv(bs, lo, hi - lo, view[lo - offset : hi - offset], F.NONE)
        else:
            bounce = aligned_buffer(pnum, bs.bl.opt_mem_alignment)
            await _driver_preadv(bs, pos, pnum, bounce, F.NONE)
            await bdrv_co_debug_event(bs, "cor_write")
            if bs.drv.bdrv_co_pwrite_zeroes is not None and is_zero(bounce):
                await _do_pwrite_zeroes(bs, pos, pnum, F.WRITE_UNCHANGED)
            else:
                await _driver_pwritev(bs, pos, pnum, bounce, F.WRITE_UNCHANGED)
            bs.write_gen += 1
            if not prefetch and hi > lo:
                view[lo - offset : hi - offset] = bounce[lo - pos : hi - pos]
        pos += pnum
    if not prefetch and pos < offset + length:  # beyond the end of the node: zeros
        tail = max(pos, offset)
        view[tail - offset :] = bytes(offset + length - tail)

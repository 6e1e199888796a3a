"""The request path (QEMU's block/io.c): reads, writes, zero writes, discard, flush, truncate.

Every public ``bdrv_co_*`` here takes an edge (:class:`~blockcore.graph.BdrvChild`) or a node,
checks the request, counts it in flight, pads it to the node's ``request_alignment`` with
read-modify-write, splits it at ``max_transfer``, serialises overlapping requests that must
not interleave, emulates flags the driver lacks, and calls the driver. Drivers reach their
own children through these same functions, so every layer gets the same guarantees.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

from ..aio import _rdlock_depth, _waiters, aio_wait_kick, assert_bdrv_graph_readable, co_wrapper
from ..errors import BlockError, NoMediumError, NotSupportedError
from ..tiers import Tier, api, checks_enabled, io_code, running
from ..types import (
    BDRV_MAX_LENGTH,
    BDRV_REQUEST_MAX_BYTES,
    BdrvRequestFlags,
    Concurrency,
    OpenFlags,
    Perm,
)
from ..util import aligned_buffer, is_zero, round_down, round_up

if TYPE_CHECKING:
    from ..graph import BdrvChild, BlockDriverState

F = BdrvRequestFlags
_NONE = 0
_READ, _WRITE, _DISCARD, _TRUNCATE = "read", "write", "discard", "truncate"

# Flags as plain ints on the request path: IntFlag operations cost ~0.7 us each, int ones
# ~25 ns, and a write does a dozen of them.
_COR, _ZERO, _MAY_UNMAP = int(F.COPY_ON_READ), int(F.ZERO_WRITE), int(F.MAY_UNMAP)
_FUA, _COMPRESSED, _UNCHANGED = int(F.FUA), int(F.WRITE_COMPRESSED), int(F.WRITE_UNCHANGED)
_SERIALISING, _NO_FALLBACK, _PREFETCH = int(F.SERIALISING), int(F.NO_FALLBACK), int(F.PREFETCH)
_O_RDWR, _O_INACTIVE = int(OpenFlags.RDWR), int(OpenFlags.INACTIVE)
_O_NO_FLUSH, _O_UNMAP = int(OpenFlags.NO_FLUSH), int(OpenFlags.UNMAP)
_P_WRITE, _P_WRITE_UNCHANGED = int(Perm.WRITE), int(Perm.WRITE_UNCHANGED)
_P_RESIZE = int(Perm.RESIZE)
_PARALLEL = Concurrency.PARALLEL

__all__ = [
    "bdrv_co_flush",
    "bdrv_co_getlength",
    "bdrv_co_nb_sectors",
    "bdrv_co_pdiscard",
    "bdrv_co_pread",
    "bdrv_co_preadv",
    "bdrv_co_pwrite",
    "bdrv_co_pwrite_sync",
    "bdrv_co_pwrite_zeroes",
    "bdrv_co_pwritev",
    "bdrv_co_truncate",
    "bdrv_flush",
    "bdrv_getlength",
    "bdrv_make_zero",
    "bdrv_nb_sectors",
    "bdrv_pdiscard",
    "bdrv_pread",
    "bdrv_pwrite",
    "bdrv_pwrite_sync",
    "bdrv_pwrite_zeroes",
    "bdrv_truncate",
]


# -------------------------------------------------------------------------------------------
# Tracked requests and serialisation
# -------------------------------------------------------------------------------------------


class TrackedRequest:
    """A request in flight on a node, for overlap checks (QEMU's BdrvTrackedRequest)."""

    __slots__ = ("bs", "offset", "length", "type", "serialising", "overlap_offset",
                 "overlap_end", "waiters", "waiting_for")  # fmt: skip

    def __init__(self, bs: BlockDriverState, offset: int, length: int, type_: str) -> None:
        self.bs = bs
        self.offset = offset
        self.length = length
        self.type = type_
        self.serialising = False
        self.overlap_offset = offset
        self.overlap_end = offset + length
        self.waiters: list[asyncio.Future[None]] | None = None
        self.waiting_for: TrackedRequest | None = None
        bs.tracked_requests.add(self)

    def make_serialising(self, align: int) -> None:
        """Widen the overlap range to ``align`` and make others wait for us (and us for them)."""
        if not self.serialising:
            self.serialising = True
            self.bs.serialising_in_flight += 1
        self.overlap_offset = min(self.overlap_offset, round_down(self.offset, align))
        self.overlap_end = max(self.overlap_end, round_up(self.offset + self.length, align))

    def end(self) -> None:
        bs = self.bs
        bs.tracked_requests.discard(self)
        if self.serialising:
            bs.serialising_in_flight -= 1
        if self.waiters:
            for fut in self.waiters:
                if not fut.done():
                    fut.set_result(None)


# Untracked requests: while no serialising request is in flight, plain requests skip the
# TrackedRequest (an object and two set operations, a third of the core's cost per 4 KiB
# request) and are only counted. A request that becomes serialising first waits until the
# untracked ones have finished, a barrier; from then on every new request is tracked until no
# serialising request is left, so QEMU's overlap rules hold.


def _untracked_done(bs: BlockDriverState) -> None:
    """The end of an untracked request: off both counts, barrier and drain waiters woken."""
    bs.untracked_in_flight -= 1
    if not bs.untracked_in_flight and bs.untracked_waiters:
        waiters, bs.untracked_waiters = bs.untracked_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
    bs.in_flight -= 1
    if _waiters:
        aio_wait_kick()


async def _wait_serialising(req: TrackedRequest) -> None:
    """Wait until no overlapping request conflicts with ``req`` (one of the two serialising)."""
    bs = req.bs
    while req.serialising and bs.untracked_in_flight:
        fut = asyncio.get_running_loop().create_future()
        bs.untracked_waiters.append(fut)
        await fut
    while bs.serialising_in_flight:
        for other in bs.tracked_requests:
            if other is req or not (req.serialising or other.serialising):
                continue
            if other.overlap_offset < req.overlap_end and req.overlap_offset < other.overlap_end:
                if other.waiting_for is not None:
                    continue  # it waits (indirectly) for us: going on avoids a deadlock
                fut = asyncio.get_running_loop().create_future()
                if other.waiters is None:
                    other.waiters = []
                other.waiters.append(fut)
                req.waiting_for = other
                try:
                    await fut
                finally:
                    req.waiting_for = None
                break
        else:
            return


# -------------------------------------------------------------------------------------------
# Checks and driver calls
# -------------------------------------------------------------------------------------------


def _check_request(bs: BlockDriverState, offset: int, length: int, limit32: bool) -> None:
    if offset < 0 or length < 0 or offset > BDRV_MAX_LENGTH or length > BDRV_MAX_LENGTH - offset:
        raise BlockError(errno.EIO, f"request offset {offset} length {length} out of range",
                         bs.node_name)  # fmt: skip
    if limit32 and length > BDRV_REQUEST_MAX_BYTES:
        raise BlockError(errno.EIO, f"request length {length} exceeds {BDRV_REQUEST_MAX_BYTES}",
                         bs.node_name)  # fmt: skip


def _enter(fn_name: str, bs: BlockDriverState) -> Any:
    """Common entry checks of an I/O coroutine; returns the driver."""
    if checks_enabled and running.loop is not bs.aio_context.loop:
        io_code(fn_name, bs)
    drv = bs.drv
    if drv is None:
        raise NoMediumError("no medium", bs.node_name)
    return drv


async def _is_inserted(bs: BlockDriverState) -> bool:
    """Whether the node and every child have their medium (bdrv_co_is_inserted)."""
    drv = bs.drv
    if drv is None:
        return False
    if drv.bdrv_co_is_inserted is not None:
        return bool(await drv.bdrv_co_is_inserted(bs))
    for c in bs.children:
        if not await _is_inserted(c.bs):
            return False
    return True


async def _check_medium(bs: BlockDriverState) -> None:
    if not await _is_inserted(bs):
        raise NoMediumError("no medium found", bs.filename or bs.node_name)


def _view(buf: Any, length: int) -> memoryview:
    view = buf if type(buf) is memoryview else memoryview(buf)
    if view.nbytes != length:
        if view.nbytes < length:
            raise BlockError(errno.EINVAL, f"buffer of {view.nbytes} bytes for {length}")
        view = view.cast("B")[:length]
    return view


def _driver_lock(bs: BlockDriverState, drv: Any) -> asyncio.Lock | None:
    mode = drv.descriptor.concurrency
    if mode is Concurrency.PARALLEL:
        return None
    if mode is Concurrency.SERIALIZE_ALL:
        locks = _driver_locks.setdefault(drv.name, {})
        loop = asyncio.get_running_loop()
        if loop not in locks:
            locks[loop] = asyncio.Lock()
        return locks[loop]
    if bs.driver_lock is None:
        bs.driver_lock = asyncio.Lock()
    return bs.driver_lock


_driver_locks: dict[str, dict[asyncio.AbstractEventLoop, asyncio.Lock]] = {}


async def _call_driver(bs: BlockDriverState, fn: Any, *args: Any) -> Any:
    """Call a driver hook under the concurrency rule its descriptor declares."""
    lock = _driver_lock(bs, bs.drv)
    if lock is None:
        return await fn(bs, *args)
    async with lock:
        return await fn(bs, *args)


async def bdrv_co_debug_event(bs: BlockDriverState | None, event: str) -> None:
    """Send debug ``event`` to ``bs``'s driver (blkdebug acts on it). Tier: I/O.

    NULL-safe like QEMU's BLKDBG_EVENT: ``bs`` may be None.
    """
    if bs is not None and bs.drv is not None and bs.drv.bdrv_co_debug_event is not None:
        await bs.drv.bdrv_co_debug_event(bs, event)


api(Tier.IO)(bdrv_co_debug_event)
bdrv_debug_event = co_wrapper(bdrv_co_debug_event, "bdrv_debug_event", mixed=True)


@api(Tier.IO)
async def BLKDBG_EVENT(child: BdrvChild | None, event: str) -> None:  # noqa: N802
    """Send debug ``event`` to the node of ``child`` (None-safe), as QEMU's macro. Tier: I/O."""
    if child is not None:
        await bdrv_co_debug_event(child.bs, event)


async def _driver_preadv(bs: BlockDriverState, offset: int, length: int, buf: memoryview,
                         flags: F) -> None:  # fmt: skip
    drv = bs.drv
    if drv.bdrv_co_preadv is None:
        raise NotSupportedError("driver cannot read", bs.node_name)
    if drv.descriptor.concurrency is Concurrency.PARALLEL:
        await drv.bdrv_co_preadv(bs, offset, length, buf, flags)
    else:
        await _call_driver(bs, drv.bdrv_co_preadv, offset, length, buf, flags)


async def _driver_pwritev(bs: BlockDriverState, offset: int, length: int, buf: memoryview,
                          flags: F) -> None:  # fmt: skip
    drv = bs.drv
    if flags & _COMPRESSED:
        if drv.bdrv_co_pwritev_compressed is None:
            raise NotSupportedError("compressed writes not supported", bs.node_name)
        await _call_driver(bs, drv.bdrv_co_pwritev_compressed, offset, length, buf)
        return
    if drv.bdrv_co_pwritev is None:
        raise NotSupportedError("driver cannot write", bs.node_name)
    emulate_fua = flags & _FUA and not bs.supported_write_flags & _FUA
    flags &= bs.supported_write_flags
    if drv.descriptor.concurrency is Concurrency.PARALLEL:
        await drv.bdrv_co_pwritev(bs, offset, length, buf, flags)
    else:
        await _call_driver(bs, drv.bdrv_co_pwritev, offset, length, buf, flags)
    if emulate_fua:
        bs.write_gen += 1  # the flush must see this write (QEMU's bdrv_advance_flush_gen)
        await bdrv_co_flush(bs)


# -------------------------------------------------------------------------------------------
# Read
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_preadv(
    child: BdrvChild, offset: int, length: int, buf: Any, flags: F = _NONE
) -> None:
    """Read ``length`` bytes at ``offset`` of ``child``'s node into ``buf``. Tier: I/O.

    Needs the graph read lock. Reads past the end of the node return zeros. The request is
    padded to the node's alignment (through a bounce buffer) and split at ``max_transfer``.
    """
    bs = child.bs
    drv = bs.drv
    if drv is None or checks_enabled and running.loop is not bs.aio_context.loop:
        drv = _enter("bdrv_co_preadv", bs)  # (the checks of _enter, inlined when they pass)
    if not _rdlock_depth.get():
        assert_bdrv_graph_readable("bdrv_co_preadv")
    if offset < 0 or length < 0 or length > BDRV_REQUEST_MAX_BYTES or \
            offset > BDRV_MAX_LENGTH - length:  # fmt: skip
        _check_request(bs, offset, length, True)
    if bs.removable_below:
        await _check_medium(bs)
    view = buf if type(buf) is memoryview and buf.nbytes == length else _view(buf, length)
    if length == 0:
        return
    bl = bs.bl
    align = bl.request_alignment
    bs.in_flight += 1
    if (
        not bs.serialising_in_flight
        and not flags
        and not bs.copy_on_read
        and not (offset | length) & (align - 1)
        and offset + length <= bs.total_bytes
        and (not bl.max_transfer or length <= bl.max_transfer)
        and drv.descriptor.concurrency is _PARALLEL
    ):
        # the fast path: an aligned read of a parallel driver, nothing serialising around
        bs.untracked_in_flight += 1
        try:
            await drv.bdrv_co_preadv(bs, offset, length, view, _NONE)
        finally:
            _untracked_done(bs)
        return
    req = TrackedRequest(bs, offset, length, _READ)
    try:
        if bs.copy_on_read:
            flags |= _COR
        if (offset | length) & (align - 1):
            await _padded_preadv(child, req, offset, length, view, flags, align)
            return
        if bs.serialising_in_flight:
            await _wait_serialising(req)
        await _aligned_preadv(child, req, offset, length, view, flags, align)
    finally:
        req.end()
        bs.in_flight -= 1
        if _waiters:
            aio_wait_kick()


async def _padded_preadv(child: BdrvChild, req: TrackedRequest, offset: int, length: int,
                         view: memoryview, flags: F, align: int) -> None:  # fmt: skip
    bs = child.bs
    start = round_down(offset, align)
    end = round_up(offset + length, align)
    if bs.serialising_in_flight:
        await _wait_serialising(req)
    bounce = aligned_buffer(end - start, bs.bl.opt_mem_alignment)
    await _aligned_preadv(child, req, start, end - start, bounce, flags, align)
    view[:] = bounce[offset - start : offset - start + length]


async def _aligned_preadv(child: BdrvChild, req: TrackedRequest, offset: int, length: int,
                          view: memoryview, flags: F, align: int) -> None:  # fmt: skip
    """bdrv_aligned_preadv: copy-on-read, EOF zero-fill and max_transfer splitting."""
    bs = child.bs
    if flags & _COR:
        from ..cor import copy_on_read

        await copy_on_read(child, req, offset, length, view, flags)
        return
    flags &= _PREFETCH
    total = bs.total_bytes
    max_bytes = round_up(max(0, total - offset), align)
    max_transfer = bs.bl.max_transfer or BDRV_REQUEST_MAX_BYTES
    max_transfer = round_down(min(max_transfer, BDRV_REQUEST_MAX_BYTES), align)
    pos = 0
    while pos < length:
        num = length - pos
        if pos >= max_bytes:
            view[pos:] = bytes(num)  # beyond the end of the node: zeros
            return
        num = min(num, max_bytes - pos, max_transfer)
        await _driver_preadv(bs, offset + pos, num, view[pos : pos + num], flags)
        pos += num


# -------------------------------------------------------------------------------------------
# Write
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_pwritev(
    child: BdrvChild, offset: int, length: int, buf: Any, flags: F = _NONE
) -> None:
    """Write ``length`` bytes of ``buf`` at ``offset`` (``ZERO_WRITE``: zeros, ``buf`` None).

    Tier: I/O. Needs the graph read lock. Unaligned edges are read, patched and written
    back while overlapping requests wait. Writing past the end grows the node (the edge
    must hold the resize permission).
    """
    bs = child.bs
    flags = int(flags)
    _enter("bdrv_co_pwritev", bs)
    assert_bdrv_graph_readable("bdrv_co_pwritev")
    if bs.removable_below:
        await _check_medium(bs)
    _check_request(bs, offset, length, not flags & _ZERO)
    _write_allowed(child, offset + length, flags)
    align = bs.bl.request_alignment
    unaligned = (offset | length) & (align - 1)
    if flags & _NO_FALLBACK and unaligned:
        raise NotSupportedError("unaligned request with no fallback", bs.node_name)
    if length == 0:
        return
    view = None if flags & _ZERO else _view(buf, length)
    bs.in_flight += 1
    if not unaligned and not flags & _SERIALISING and not bs.serialising_in_flight:
        bs.untracked_in_flight += 1
        try:
            await _aligned_pwritev(child, None, offset, length, view, flags)
        finally:
            _write_finish(bs, offset, length, _WRITE)
            _untracked_done(bs)
        return
    req = TrackedRequest(bs, offset, length, _WRITE)
    try:
        if unaligned:
            req.make_serialising(align)
        if flags & _SERIALISING:
            req.make_serialising(await _cluster_size(bs))
        if bs.serialising_in_flight:
            await _wait_serialising(req)
        if unaligned:
            await _padded_pwritev(child, req, offset, length, view, flags, align)
        else:
            await _aligned_pwritev(child, req, offset, length, view, flags)
    finally:
        _write_finish(bs, offset, length, _WRITE)
        req.end()
        bs.in_flight -= 1
        if _waiters:
            aio_wait_kick()


def _write_allowed(child: BdrvChild, end: int, flags: F) -> None:
    bs = child.bs
    if not bs.open_flags & _O_RDWR:
        raise BlockError(errno.EPERM, "node is read-only", bs.filename or bs.node_name)
    if bs.open_flags & _O_INACTIVE:
        raise BlockError(errno.EPERM, "node is inactive", bs.node_name)
    need = _P_WRITE_UNCHANGED if flags & _UNCHANGED else _P_WRITE
    if not child.perm & (need | _P_WRITE):
        raise BlockError(errno.EPERM, f"edge {child.name!r} lacks the write permission",
                         bs.node_name)  # fmt: skip
    if end > bs.total_bytes and not child.perm & _P_RESIZE:
        raise BlockError(errno.EPERM, f"write past the end of {bs.node_name!r} needs the "
                         "resize permission", bs.node_name)  # fmt: skip


def _write_finish(bs: BlockDriverState, offset: int, length: int, type_: str) -> None:
    """write_req_finish: generation counter, growth past the end, dirty bitmaps."""
    bs.write_gen += 1
    end = offset + length
    if type_ == _WRITE and end > bs.total_bytes:
        bs.total_bytes = round_up(end, 512)
        for c in bs.parents:
            c.parent.parent_resize()
    for bitmap in bs.dirty_bitmaps:
        bitmap.mark(offset, length)


async def _cluster_size(bs: BlockDriverState) -> int:
    from ..info import bdrv_co_get_info

    try:
        return max((await bdrv_co_get_info(bs)).cluster_size, bs.bl.request_alignment)
    except NotSupportedError:
        return bs.bl.request_alignment


async def _aligned_pwritev(child: BdrvChild, req: TrackedRequest | None, offset: int, length: int,
                           view: memoryview | None, flags: F) -> None:  # fmt: skip
    """bdrv_aligned_pwritev: detect-zeroes, zero writes, max_transfer splitting."""
    bs = child.bs
    drv = bs.drv
    if (
        view is not None
        and bs.detect_zeroes != "off"
        and drv.bdrv_co_pwrite_zeroes is not None
        and not flags & _COMPRESSED
        and is_zero(view)
    ):
        flags |= _ZERO
        if bs.detect_zeroes == "unmap" and bs.open_flags & _O_UNMAP:
            flags |= _MAY_UNMAP
    events = drv.bdrv_co_debug_event is not None
    if flags & _ZERO:
        if events:
            await bdrv_co_debug_event(bs, "pwritev_zero")
        await _do_pwrite_zeroes(bs, offset, length, flags)
    else:
        assert view is not None
        if events:
            await bdrv_co_debug_event(bs, "pwritev")
        max_transfer = bs.bl.max_transfer or BDRV_REQUEST_MAX_BYTES
        max_transfer = round_down(min(max_transfer, BDRV_REQUEST_MAX_BYTES),
                                  bs.bl.request_alignment)  # fmt: skip
        if length <= max_transfer:
            await _driver_pwritev(bs, offset, length, view, flags)
        else:
            pos = 0
            while pos < length:
                num = min(length - pos, max_transfer)
                # emulated FUA needs one flush, after the last chunk
                chunk_flags = flags
                if pos + num < length and not bs.supported_write_flags & _FUA:
                    chunk_flags &= ~_FUA
                await _driver_pwritev(bs, offset + pos, num, view[pos : pos + num], chunk_flags)
                pos += num
    if events:
        await bdrv_co_debug_event(bs, "pwritev_done")


async def _padded_pwritev(child: BdrvChild, req: TrackedRequest, offset: int, length: int,
                          view: memoryview | None, flags: F, align: int) -> None:  # fmt: skip
    """Read-modify-write of the unaligned head and tail blocks (and QEMU's
    bdrv_co_do_zero_pwritev: edges as data writes, the aligned middle as a zero write)."""
    bs = child.bs
    end = offset + length
    head_start = round_down(offset, align)
    tail_end = round_up(end, align)
    if view is not None and tail_end - head_start <= max(2 * align, 65536):
        # a small data write: one bounce buffer for the whole padded range
        bounce = aligned_buffer(tail_end - head_start, bs.bl.opt_mem_alignment)
        await bdrv_co_debug_event(bs, "pwritev_rmw_head")
        await _aligned_preadv(child, req, head_start, align, bounce[:align], _NONE, align)
        await bdrv_co_debug_event(bs, "pwritev_rmw_after_head")
        if tail_end - align > head_start:
            await bdrv_co_debug_event(bs, "pwritev_rmw_tail")
            await _aligned_preadv(child, req, tail_end - align, align, bounce[-align:], _NONE,
                                  align)  # fmt: skip
            await bdrv_co_debug_event(bs, "pwritev_rmw_after_tail")
        bounce[offset - head_start : end - head_start] = view
        await _aligned_pwritev(child, req, head_start, tail_end - head_start, bounce, flags)
        return
    if tail_end - head_start == align:  # inside one block
        await _rmw_block(child, req, head_start, offset, view, 0, flags, align, "head", length)
        return
    head_end = head_start + align if offset != head_start else offset
    tail_start = tail_end - align if end != tail_end else end
    if head_end != offset:
        await _rmw_block(child, req, head_start, offset, view, 0, flags, align, "head")
    if tail_start > head_end:
        mid = None if view is None else view[head_end - offset : tail_start - offset]
        await _aligned_pwritev(child, req, head_end, tail_start - head_end, mid, flags)
    if tail_start != end:
        await _rmw_block(child, req, tail_start, tail_start, view, tail_start - offset, flags,
                         align, "tail", end - tail_start)  # fmt: skip


async def _rmw_block(child: BdrvChild, req: TrackedRequest, block: int, data_start: int,
                     view: memoryview | None, view_pos: int, flags: F, align: int, which: str,
                     data_len: int | None = None) -> None:  # fmt: skip
    bs = child.bs
    bounce = aligned_buffer(align, bs.bl.opt_mem_alignment)
    await bdrv_co_debug_event(bs, f"pwritev_rmw_{which}")
    await _aligned_preadv(child, req, block, align, bounce, _NONE, align)
    await bdrv_co_debug_event(bs, f"pwritev_rmw_after_{which}")
    start = data_start - block
    n = data_len if data_len is not None else align - start
    if view is None:
        bounce[start : start + n] = bytes(n)
    else:
        bounce[start : start + n] = view[view_pos : view_pos + n]
    wflags = flags & ~(_ZERO | _MAY_UNMAP | _NO_FALLBACK)
    await _aligned_pwritev(child, req, block, align, bounce, wflags)


# -------------------------------------------------------------------------------------------
# Flush
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_flush(bs: BlockDriverState) -> None:
    """Flush ``bs`` and the children it writes to. Tier: I/O.

    ``flush_to_os`` always runs; ``flush_to_disk`` only when something was written since
    the last flush and the node is not opened with cache.no-flush. A no-op on read-only
    nodes. Flushes of one node run one at a time.
    """
    drv = _enter("bdrv_co_flush", bs)
    if not bs.open_flags & _O_RDWR or bs.sg:
        return
    bs.in_flight += 1
    try:
        current_gen = bs.write_gen
        if bs.flush_lock is None:
            bs.flush_lock = asyncio.Lock()
        async with bs.flush_lock:
            if drv.bdrv_co_flush is not None:
                await _call_driver(bs, drv.bdrv_co_flush)
            else:
                from ..graph import bdrv_primary_child

                primary = bdrv_primary_child(bs)
                await bdrv_co_debug_event(primary.bs if primary else None, "flush_to_os")
                if drv.bdrv_co_flush_to_os is not None:
                    await _call_driver(bs, drv.bdrv_co_flush_to_os)
                if not bs.open_flags & _O_NO_FLUSH and bs.flushed_gen != current_gen:
                    await bdrv_co_debug_event(primary.bs if primary else None, "flush_to_disk")
                    if drv.bdrv_co_flush_to_disk is not None:
                        await _call_driver(bs, drv.bdrv_co_flush_to_disk)
                for c in list(bs.children):
                    if c.perm & (_P_WRITE | _P_WRITE_UNCHANGED):
                        await bdrv_co_flush(c.bs)
            bs.flushed_gen = current_gen
    finally:
        bs.in_flight -= 1
        if _waiters:
            aio_wait_kick()


# -------------------------------------------------------------------------------------------
# Convenience names and sync wrappers (generated, QEMU's co_wrapper_* declarations)
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_pread(child: BdrvChild, offset: int, length: int, buf: Any,
                        flags: F = _NONE) -> None:  # fmt: skip
    """Read into a flat buffer (``bdrv_co_preadv`` without an I/O vector). Tier: I/O."""
    await bdrv_co_preadv(child, offset, length, buf, flags)


@api(Tier.IO)
async def bdrv_co_pwrite(child: BdrvChild, offset: int, length: int, buf: Any,
                         flags: F = _NONE) -> None:  # fmt: skip
    """Write from a flat buffer. Tier: I/O."""
    await bdrv_co_pwritev(child, offset, length, buf, flags)


@api(Tier.IO)
async def bdrv_co_pwrite_sync(child: BdrvChild, offset: int, length: int, buf: Any,
                              flags: F = _NONE) -> None:  # fmt: skip
    """Write, then flush the node: a write barrier. Tier: I/O."""
    await bdrv_co_pwritev(child, offset, length, buf, flags)
    await bdrv_co_flush(child.bs)


bdrv_pread = co_wrapper(bdrv_co_pread, "bdrv_pread", mixed=True, rdlock=True)
bdrv_pwrite = co_wrapper(bdrv_co_pwrite, "bdrv_pwrite", mixed=True, rdlock=True)
bdrv_pwrite_sync = co_wrapper(bdrv_co_pwrite_sync, "bdrv_pwrite_sync", mixed=True, rdlock=True)
bdrv_flush = co_wrapper(bdrv_co_flush, "bdrv_flush", mixed=True, rdlock=True,
                        tier=Tier.IO_OR_GS)  # fmt: skip


# Zero writes, discard, truncate and length live in their own modules; their names stay
# reachable from here, where callers look for the request path.
from ..resize import (  # noqa: E402, F401
    bdrv_co_getlength,
    bdrv_co_nb_sectors,
    bdrv_co_truncate,
    bdrv_getlength,
    bdrv_getlength_from_driver,
    bdrv_getlength_uncached,
    bdrv_nb_sectors,
    bdrv_truncate,
)
from ..zero import (  # noqa: E402, F401
    _do_pwrite_zeroes,
    bdrv_co_pdiscard,
    bdrv_co_pwrite_zeroes,
    bdrv_make_zero,
    bdrv_pdiscard,
    bdrv_pwrite_zeroes,
)

"""The copy engine of ``blockcore-img convert`` (qemu-img's ``convert_do_copy``).

Block status decides, per run, whether the source holds data, zeros or nothing (then the
target's backing file shows through, ``-B``); data runs are scanned for zero sectors (``-S``,
default 4 KiB) so the target stays sparse; ``-c`` writes whole compressed clusters; ``-C``
asks for copy offloading first; ``-r`` throttles. ``-m`` (default 8) coroutines copy at
once, each with its own reused page-aligned buffer (zero detection searches it in place),
writing in order unless ``-W``. ``-c`` hands the driver up to 16 clusters per request
(qemu-img: one), so the qcow2 driver compresses them in parallel.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..cliutil import CliError, Progress, check_interrupted, error_report, strerror, warn_report
from ..types import BdrvRequestFlags as F
from ..types import BlockStatusFlags as S

__all__ = ["MAX_BUF_SECTORS", "MAX_COROUTINES", "SECTOR", "ConvertState", "CopyFailed",
           "RateLimit", "convert_do_copy", "is_allocated_sectors", "is_allocated_sectors_min"]

SECTOR = 512
IO_BUF_SIZE = 2 << 20
MAX_BUF_SECTORS = 32768
MAX_COROUTINES = 16
COMPRESSED_CLUSTERS = 16  # clusters per compressed write request
BDRV_REQUEST_MAX_SECTORS = ((1 << 31) - 1) >> 9 << 9 >> 9
_ZERO = bytes(SECTOR)

BLK_DATA, BLK_ZERO, BLK_BACKING_FILE = range(3)


def _zero_run(data: Any, start: int, n: int) -> int:
    """Leading zero sectors of the ``n`` sectors at byte ``start`` of ``data`` (bytes,
    bytearray or mmap): windows of growing size are stripped at C speed, so a long zero run
    costs a few copies of itself and a short one stays cheap."""
    done, w = 0, 8
    while done < n:
        cnt = min(w, n - done)
        a = start + done * SECTOR
        rest = len(data[a:a + cnt * SECTOR].lstrip(b"\0"))
        if rest:
            return done + (cnt * SECTOR - rest) // SECTOR
        done += cnt
        w *= 2
    return n


def _data_run(data: Any, start: int, n: int) -> int:
    """Sectors before the first all-zero sector of the ``n`` at byte ``start`` (``find``
    searches ``data`` in place: no copy of the chunk)."""
    end = start + n * SECTOR
    pos = start
    while True:
        p = data.find(_ZERO, pos, end)
        if p < 0:
            return n
        aligned = start + -(-(p - start) // SECTOR) * SECTOR
        if aligned + SECTOR > end:
            return n
        if data[aligned:aligned + SECTOR] == _ZERO:
            return (aligned - start) // SECTOR
        pos = aligned + SECTOR  # that sector holds data: no zero sector starts before its end


def _searchable(buf: Any) -> tuple[Any, int]:
    """(object with ``find`` and slicing, byte offset) for a buffer given without ``start``
    (the copy loop passes the mmap under its buffer, searched in place)."""
    if isinstance(buf, (bytes, bytearray)):
        return buf, 0
    return bytes(buf), 0


def is_allocated_sectors(buf: Any, n: int, sector_num: int, alignment: int, start: int = -1
                         ) -> tuple[bool, int]:
    """(allocated, pnum): the run of sectors sharing the first one's zero/non-zero state,
    aligned to ``alignment`` sectors as qemu-img does. ``start`` >= 0: ``buf`` is searchable
    in place (bytes, bytearray, mmap) and the sectors begin at that byte offset."""
    if n <= 0:
        return False, 0
    if start < 0:
        buf, start = _searchable(buf)
    is_zero = buf[start:start + SECTOR] == _ZERO
    i = max(1, _zero_run(buf, start, n) if is_zero else _data_run(buf, start, n))
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False  # a small zero tail counts as allocated
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not is_zero, i


def is_allocated_sectors_min(buf: Any, n: int, min_sparse: int, sector_num: int,
                             alignment: int, start: int = -1) -> tuple[bool, int]:
    """Like :func:`is_allocated_sectors`, ignoring zero runs shorter than ``min_sparse`` after
    data (no tiny holes in write requests)."""
    if start < 0:
        buf, start = _searchable(buf)
    min_sparse = min(min_sparse, n)
    ret, pnum = is_allocated_sectors(buf, n, sector_num, alignment, start)
    if not ret:
        return ret, pnum
    num_used = pnum
    pos = pnum
    n -= pnum
    sector_num += pnum
    num_checked = num_used
    while n > 0:
        ret, pnum = is_allocated_sectors(buf, n, sector_num, alignment, start + pos * SECTOR)
        pos += pnum
        n -= pnum
        sector_num += pnum
        num_checked += pnum
        if ret:
            num_used = num_checked
        elif pnum >= min_sparse:
            break
    return True, num_used


@dataclass
class ConvertState:
    src: list[Any] = field(default_factory=list)
    src_names: list[str] = field(default_factory=list)
    src_sectors: list[int] = field(default_factory=list)
    total_sectors: int = 0
    allocated_sectors: int = 0
    allocated_done: int = 0
    status: int = BLK_DATA
    sector_next_status: int = 0
    target: Any = None
    has_zero_init: bool = False
    compressed: bool = False
    target_is_new: bool = False
    target_has_backing: bool = False
    target_backing_sectors: int = -1
    copy_range: bool = False
    salvage: bool = False
    quiet: bool = False
    min_sparse: int = 8
    alignment: int = 1
    cluster_sectors: int = 0
    buf_sectors: int = IO_BUF_SIZE // SECTOR
    progress: Progress | None = None
    num_coroutines: int = 8
    wr_in_order: bool = True
    sector_num: int = 0
    error: BaseException | None = None
    limit: RateLimit | None = None


class RateLimit:
    """``-r``: at most ``rate`` bytes per second, granted per 100 ms slice (QEMU's ratelimit:
    a request that overdraws a slice waits for the slice it would end in)."""

    SLICE = 0.1

    def __init__(self, rate: int) -> None:
        self.quota = max(1, int(rate * self.SLICE))
        self.slice_end = 0.0
        self.dispatched = 0

    def delay(self, nbytes: int) -> float:
        """Account ``nbytes`` and return how long to wait before sending them, in seconds."""
        now = time.monotonic()
        if now >= self.slice_end:
            self.slice_end, self.dispatched = now + self.SLICE, 0
        self.dispatched += nbytes
        if self.dispatched <= self.quota:
            return 0.0
        slices = (self.dispatched - 1) // self.quota  # whole slices overdrawn
        return self.slice_end + (slices - 1) * self.SLICE - now


async def _throttle(limit: RateLimit, nbytes: int) -> None:
    """Wait out ``limit`` for ``nbytes``, in steps of at most a slice so Ctrl-C stops it."""
    wait = limit.delay(nbytes)
    while wait > 0:
        await asyncio.sleep(min(wait, RateLimit.SLICE))
        check_interrupted()
        wait -= RateLimit.SLICE


def _select_part(s: ConvertState, sector_num: int) -> tuple[int, int]:
    cur, base = 0, 0
    while sector_num - base >= s.src_sectors[cur]:
        base += s.src_sectors[cur]
        cur += 1
    return cur, base


async def _iteration_sectors(s: ConvertState, sector_num: int) -> int:
    """``convert_iteration_sectors``: sectors from ``sector_num`` sharing one status (callers
    hold ``s.lock``: block status may yield)."""
    from ..aio import bdrv_graph_co_rdlock
    from ..graph import bdrv_filter_or_cow_bs
    from ..status import bdrv_co_block_status_above

    cur, base = _select_part(s, sector_num)
    n = min(s.total_sectors - sector_num, BDRV_REQUEST_MAX_SECTORS)
    post_backing_zero = False
    if s.target_backing_sectors >= 0:
        if sector_num >= s.target_backing_sectors:
            post_backing_zero = True
        elif sector_num + n > s.target_backing_sectors:
            n = s.target_backing_sectors - sector_num
    if s.sector_next_status <= sector_num:
        offset = (sector_num - base) * SECTOR
        while True:
            count = n * SECTOR
            try:
                bs = s.src[cur].bs
                async with bdrv_graph_co_rdlock():
                    below = bdrv_filter_or_cow_bs(bs) if s.target_has_backing else None
                    st = await bdrv_co_block_status_above(bs, below, offset, count)
                ret, count = st.ret, st.pnum
                break
            except OSError as exc:
                if not s.salvage:
                    error_report(f"error while reading block status at offset {offset}: "
                                 f"{strerror(exc.errno or 5)}")
                    raise CopyFailed(exc.errno or 5) from None
                if n == 1:
                    if not s.quiet:
                        warn_report(f"error while reading block status at offset {offset}: "
                                    f"{strerror(exc.errno or 5)}")
                    ret, count = S.DATA, SECTOR
                    break
                n = -(-n // 4)
        n = -(-count // SECTOR)
        if ret & S.ZERO:
            s.status = BLK_BACKING_FILE if post_backing_zero else BLK_ZERO
        elif ret & S.DATA:
            s.status = BLK_DATA
        else:
            s.status = BLK_BACKING_FILE if s.target_has_backing else BLK_DATA
        s.sector_next_status = sector_num + n
    n = min(n, s.sector_next_status - sector_num)
    if s.status == BLK_DATA:
        n = min(n, s.buf_sectors)
    if s.compressed:
        if n < s.cluster_sectors:
            n = min(s.cluster_sectors, s.total_sectors - sector_num)
            s.status = BLK_DATA
        else:
            n -= n % s.cluster_sectors
    return n


class CopyFailed(Exception):
    """A read or write of the copy failed and was reported already: convert exits with 1."""

    def __init__(self, err: int) -> None:
        self.err = err


async def _read(s: ConvertState, sector_num: int, nb_sectors: int, view: memoryview) -> None:
    """``convert_co_read`` into ``view`` (a reused page-aligned buffer)."""
    pos = 0
    single_until = 0
    while nb_sectors > 0:
        cur, base = _select_part(s, sector_num)
        blk = s.src[cur]
        offset = (sector_num - base) * SECTOR
        n = min(nb_sectors, s.src_sectors[cur] - (sector_num - base))
        if single_until > offset:
            n = 1
        try:
            await blk.co_preadv(offset, n * SECTOR, view[pos:pos + n * SECTOR])
        except OSError as exc:
            if not s.salvage:
                raise
            if n > 1:
                single_until = offset + n * SECTOR
                continue
            if not s.quiet:
                warn_report(f"error while reading offset {offset}: {strerror(exc.errno or 5)}")
            view[pos:pos + SECTOR] = _ZERO
        sector_num += n
        nb_sectors -= n
        pos += n * SECTOR


def _cluster_is_zero(data: Any, a: int, b: int) -> bool:
    return data[a:a + SECTOR] == _ZERO and not data[a:b].lstrip(b"\0")


async def _write_compressed(s: ConvertState, sector_num: int, nb_sectors: int, data: Any,
                            view: memoryview) -> None:
    """Whole clusters, many per request (the driver compresses a request's clusters in
    parallel); each all-zero cluster is zeroed instead, as qemu-img does per cluster."""
    cs = s.cluster_sectors
    zero = [bool(s.min_sparse) and _cluster_is_zero(data, k * SECTOR,
                                                    min(k + cs, nb_sectors) * SECTOR)
            for k in range(0, nb_sectors, cs)]  # fmt: skip
    i = 0
    while i < nb_sectors:
        j = min(i + cs, nb_sectors)
        while j < nb_sectors and zero[j // cs] == zero[i // cs]:
            j = min(j + cs, nb_sectors)
        off, ln = (sector_num + i) * SECTOR, (j - i) * SECTOR
        if not zero[i // cs]:
            await s.target.co_pwritev(off, ln, view[i * SECTOR:j * SECTOR],
                                      F.WRITE_COMPRESSED)
        elif not s.has_zero_init:
            await s.target.co_pwrite_zeroes(off, ln, F.MAY_UNMAP)
        i = j


async def _write(s: ConvertState, sector_num: int, nb_sectors: int, data: Any,
                 view: memoryview | None, status: int) -> None:
    """``convert_co_write``; ``data`` is ``view``'s searchable object (mmap) for zero
    detection in place."""
    if status == BLK_DATA and s.compressed:
        assert view is not None
        await _write_compressed(s, sector_num, nb_sectors, data, view)
        return
    pos = 0
    while nb_sectors > 0:
        n = nb_sectors
        if status == BLK_BACKING_FILE:
            pass
        else:
            write_data = False
            if status == BLK_DATA:
                if not s.min_sparse:
                    write_data = True
                else:
                    write_data, n = is_allocated_sectors_min(data, n, s.min_sparse, sector_num,
                                                            s.alignment, pos * SECTOR)
            if write_data:
                assert view is not None
                await s.target.co_pwritev(sector_num * SECTOR, n * SECTOR,
                                          view[pos * SECTOR:(pos + n) * SECTOR])
            elif not s.has_zero_init:
                await s.target.co_pwrite_zeroes(sector_num * SECTOR, n * SECTOR, F.MAY_UNMAP)
        sector_num += n
        nb_sectors -= n
        pos += n


async def _copy_range(s: ConvertState, sector_num: int, nb_sectors: int) -> None:
    from ..aio import bdrv_graph_co_rdlock
    from ..special import bdrv_co_copy_range

    while nb_sectors > 0:
        cur, base = _select_part(s, sector_num)
        offset = (sector_num - base) * SECTOR
        n = min(nb_sectors, s.src_sectors[cur] - (sector_num - base))
        async with bdrv_graph_co_rdlock():
            await bdrv_co_copy_range(s.src[cur].root, offset, s.target.root,
                                     sector_num * SECTOR, n * SECTOR, F.NONE, F.NONE)
        sector_num += n
        nb_sectors -= n


async def _co_do_copy(s: ConvertState) -> None:
    """``convert_co_do_copy``, ``s.num_coroutines`` of them: each takes the next run under
    ``s.lock``, reads it into its own buffer, then writes it; unless ``-W``, a run is written
    only once every run before it was (``s.wr_offs``). The first error (or Ctrl-C) stops
    every worker at its next run; requests in flight complete."""
    from ..util import aligned_buffer

    lock = asyncio.Lock()
    loop = asyncio.get_running_loop()
    waiters: dict[int, asyncio.Future[None]] = {}
    zeros: list[memoryview] = []
    wr_offs = 0

    def wake(key: int) -> None:
        fut = waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def fail(exc: BaseException) -> None:
        if s.error is None:
            s.error = exc
        for key in list(waiters):
            wake(key)

    async def worker() -> None:
        nonlocal wr_offs
        view = aligned_buffer(s.buf_sectors * SECTOR)
        data = view.obj  # the mmap: find/slice in place
        while True:
            try:
                async with lock:
                    if s.error is not None or s.sector_num >= s.total_sectors:
                        return
                    check_interrupted()
                    sector_num = s.sector_num
                    n = await _iteration_sectors(s, sector_num)
                    status = s.status
                    if not s.min_sparse and status == BLK_ZERO:
                        n = min(n, s.buf_sectors)
                    s.sector_num = sector_num + n
            except Exception as exc:  # noqa: BLE001 (re-raised after the workers stop)
                fail(exc)
                return
            try:
                if status == BLK_DATA or (not s.min_sparse and status == BLK_ZERO):
                    s.allocated_done += n
                    if s.progress is not None:
                        s.progress.print(100.0 * s.allocated_done / s.allocated_sectors, 0)
                    if s.limit is not None:
                        await _throttle(s.limit, n * SECTOR)
                wdata, wview = data, view
                copy_range = s.copy_range and status == BLK_DATA
                if copy_range:
                    try:
                        await _copy_range(s, sector_num, n)
                    except OSError:
                        s.copy_range = copy_range = False
                if status == BLK_DATA and not copy_range:
                    try:
                        await _read(s, sector_num, n, view)
                    except OSError as exc:
                        error_report(f"error while reading at byte {sector_num * SECTOR}: "
                                     f"{strerror(exc.errno or 5)}")
                        raise CopyFailed(exc.errno or 5) from None
                elif not s.min_sparse and status == BLK_ZERO:
                    status = BLK_DATA
                    if not zeros:
                        zeros.append(aligned_buffer(s.buf_sectors * SECTOR))
                    wview = zeros[0]
                    wdata = wview.obj
                if s.wr_in_order:
                    while wr_offs != sector_num and s.error is None:
                        fut = loop.create_future()
                        waiters[sector_num] = fut
                        await fut
                if not copy_range and s.error is None:
                    try:
                        await _write(s, sector_num, n, wdata, wview, status)
                    except OSError as exc:
                        error_report(f"error while writing at byte {sector_num * SECTOR}: "
                                     f"{strerror(exc.errno or 5)}")
                        raise CopyFailed(exc.errno or 5) from None
            except Exception as exc:  # noqa: BLE001 (re-raised after the workers stop)
                fail(exc)
            if s.wr_in_order:
                wr_offs = min(sector_num + n, s.total_sectors)
                wake(wr_offs)
            if s.error is not None:
                return

    await asyncio.gather(*(worker() for _ in range(s.num_coroutines)))


async def _co_convert(s: ConvertState) -> None:
    sector_num = 0
    while sector_num < s.total_sectors:
        n = await _iteration_sectors(s, sector_num)
        if s.status == BLK_DATA or (not s.min_sparse and s.status == BLK_ZERO):
            s.allocated_sectors += n
        sector_num += n
    s.sector_next_status = 0
    s.sector_num = 0
    await _co_do_copy(s)
    if s.error is not None:
        raise s.error


def convert_do_copy(s: ConvertState) -> None:
    from ..aio import run
    from ..info import bdrv_has_zero_init

    if not s.has_zero_init and s.target_is_new and s.min_sparse and not s.target_has_backing:
        s.has_zero_init = bdrv_has_zero_init(s.target.bs)
    if s.compressed:
        if s.cluster_sectors <= 0 or s.cluster_sectors > s.buf_sectors:
            raise CliError("invalid cluster size")
        # whole clusters, up to COMPRESSED_CLUSTERS per request (qemu-img sends one: the
        # driver then has a single cluster to compress at a time)
        s.buf_sectors = s.cluster_sectors * max(1, min(
            COMPRESSED_CLUSTERS, IO_BUF_SIZE // (s.cluster_sectors * SECTOR)))  # fmt: skip
    s.error = None
    try:
        run(_co_convert(s))
    finally:
        s.error = None

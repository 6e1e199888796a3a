"""Concurrent requests with a delaying driver: read-modify-write never loses or tears data,
serialising requests wait for overlapping ones, others run in parallel; driver concurrency
modes are enforced."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest
from iotest_drivers import Env, run, unique

from blockcore import BdrvRequestFlags as F
from blockcore import Concurrency, hookimpl
from blockcore.testing import MemoryDriver

KiB = 1024


class TracingMemoryDriver(MemoryDriver):
    """Records when each driver request starts and ends, and the peak concurrency."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.trace: list[tuple[str, str, int, int]] = []
        self.active = 0
        self.peak = 0

    async def _traced(self, kind: str, coro: Any, offset: int, length: int) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.trace.append(("start", kind, offset, length))
        try:
            await coro
        finally:
            self.trace.append(("end", kind, offset, length))
            self.active -= 1

    @hookimpl
    async def bdrv_co_preadv(self, bs: Any, offset: int, length: int, buf: memoryview,
                             flags: F) -> None:  # fmt: skip
        await self._traced("read", super().bdrv_co_preadv(bs, offset, length, buf, flags),
                           offset, length)  # fmt: skip

    @hookimpl
    async def bdrv_co_pwritev(self, bs: Any, offset: int, length: int, buf: memoryview,
                              flags: F) -> None:  # fmt: skip
        await self._traced("write", super().bdrv_co_pwritev(bs, offset, length, buf, flags),
                           offset, length)  # fmt: skip


def gather(*coros: Any) -> Any:
    async def main() -> Any:
        return await asyncio.gather(*coros)

    return run(main())


# -------------------------------------------------------------------------------------------
# Read-modify-write
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", [512, 4096])
def test_concurrent_rmw_in_one_block_loses_nothing(env: Env, align: int) -> None:
    drv = env.mem(request_alignment=align, delay=0.005)
    blk = env.open(drv, 16 * align)
    # disjoint byte ranges sharing blocks: each write must read-modify-write the same block
    writes = [(o, bytes([i + 1]) * 7) for i, o in enumerate(range(3, align * 3, align // 4))]
    gather(*(blk.co_pwritev(o, len(d), d) for o, d in writes))
    model = bytearray(16 * align)
    for o, d in writes:
        model[o : o + len(d)] = d
    assert blk.pread(0, 16 * align) == bytes(model)


def test_aligned_write_racing_unaligned_write_is_not_torn(env: Env) -> None:
    drv = env.mem(request_alignment=512, delay=0.005)
    blk = env.open(drv, 4096)
    for _ in range(10):
        blk.pwrite(0, bytes(4096))
        whole = b"W" * 512
        gather(blk.co_pwritev(100, 10, b"u" * 10), blk.co_pwritev(0, 512, whole))
        got = blk.pread(0, 512)
        # either order is fine, but the RMW must not write back a stale copy over W
        assert got[:100] == b"W" * 100 and got[110:] == b"W" * 402
        assert got[100:110] in (b"u" * 10, b"W" * 10)


@pytest.mark.parametrize("seed", range(4))
def test_overlapping_unaligned_writes_match_a_serial_order(env: Env, seed: int) -> None:
    rng = random.Random(seed)
    size = 8 * KiB
    drv = env.mem(request_alignment=512, delay=0.002, max_transfer=1024)
    blk = env.open(drv, size)
    blk.pwrite(0, bytes(size))
    writes = []
    for i in range(5):
        off = rng.randrange(0, size - 2000)
        n = rng.randrange(1, 2000)
        if off % 512 == 0 and n % 512 == 0:
            n += 1  # unaligned, so every overlapping pair is serialised
        writes.append((off, bytes([i + 1]) * n))
    gather(*(blk.co_pwritev(o, len(d), d) for o, d in writes))
    got = blk.pread(0, size)
    orders = []
    for perm in itertools.permutations(writes):
        model = bytearray(size)
        for o, d in perm:
            model[o : o + len(d)] = d
        orders.append(bytes(model))
    assert got in orders, "result is not any serial order of the writes (torn or lost data)"


def test_many_concurrent_random_requests_against_model(env: Env) -> None:
    rng = random.Random(42)
    size = 64 * KiB
    drv = env.mem(request_alignment=512, max_transfer=4096, delay=0.001)
    blk = env.open(drv, size)
    model = bytearray(size)
    # batches of non-overlapping requests run concurrently; batches run one after another
    for _batch in range(20):
        used: list[tuple[int, int]] = []
        coros = []
        for _ in range(8):
            off = rng.randrange(0, size - 3000)
            n = rng.randrange(1, 3000)
            if any(off < e + 512 and s - 512 < off + n for s, e in used):
                continue
            used.append((off, off + n))
            d = rng.randbytes(n)
            model[off : off + n] = d
            coros.append(blk.co_pwritev(off, n, d))
        gather(*coros)
    assert blk.pread(0, size) == bytes(model)


# -------------------------------------------------------------------------------------------
# Serialising and parallel requests
# -------------------------------------------------------------------------------------------


def overlapped(trace: list[tuple[str, str, int, int]], a: int, b: int) -> bool:
    """Whether the driver requests at offsets ``a`` and ``b`` were in the driver together."""
    active: set[int] = set()
    for what, _kind, off, _n in trace:
        if what == "start":
            if (off == a and b in active) or (off == b and a in active):
                return True
            active.add(off)
        else:
            active.discard(off)
    return False


def test_aligned_non_overlapping_writes_run_in_parallel(env: Env) -> None:
    drv = env.add(TracingMemoryDriver(unique("iotr"), request_alignment=512, delay=0.02))
    blk = env.open(drv, 64 * KiB)
    gather(*(blk.co_pwritev(i * 4096, 4096, b"p" * 4096) for i in range(4)))
    assert drv.peak == 4


def test_serialising_write_waits_for_overlapping_cluster(env: Env) -> None:
    drv = env.add(TracingMemoryDriver(unique("iotr"), request_alignment=512, delay=0.02,
                                      cluster_size=64 * KiB))  # fmt: skip
    blk = env.open(drv, 256 * KiB)

    async def main(flags: F) -> None:
        first = asyncio.ensure_future(blk.co_pwritev(0, 4096, b"a" * 4096))
        await asyncio.sleep(0.005)  # the first write is inside the driver now
        await blk.co_pwritev(8192, 4096, b"b" * 4096, flags)
        await first

    run(main(F.NONE))
    assert overlapped(drv.trace, 0, 8192)  # different ranges: no waiting
    drv.trace.clear()
    run(main(F.SERIALISING))
    assert not overlapped(drv.trace, 0, 8192)  # same 64 KiB cluster: waits


def test_unaligned_write_waits_for_overlapping_read(env: Env) -> None:
    drv = env.add(TracingMemoryDriver(unique("iotr"), request_alignment=4096, delay=0.02))
    blk = env.open(drv, 64 * KiB)

    async def main() -> None:
        buf = bytearray(4096)
        first = asyncio.ensure_future(blk.co_preadv(4096, 4096, buf))
        await asyncio.sleep(0.005)
        await blk.co_pwritev(4096 + 100, 10, b"x" * 10)  # RMW of the block being read
        await first

    run(main())
    writes = [i for i, t in enumerate(drv.trace) if t[:2] == ("start", "write")]
    first_read_end = drv.trace.index(("end", "read", 4096, 4096))
    assert writes and writes[0] > first_read_end


@pytest.mark.parametrize(("mode", "peak"), [(Concurrency.SERIALIZE_REQUESTS, 1),
                                            (Concurrency.SERIALIZE_ALL, 1),
                                            (Concurrency.PARALLEL, 6)])
def test_driver_concurrency_mode_enforced(env: Env, mode: Concurrency, peak: int) -> None:
    drv = env.add(TracingMemoryDriver(unique("iotr"), delay=0.01, concurrency=mode))
    a = env.open(drv, 64 * KiB)
    b = env.open(drv, 64 * KiB)
    gather(*(blk.co_pwritev(i * 4096, 4096, b"c" * 4096) for i in range(3) for blk in (a, b)))
    if mode is Concurrency.SERIALIZE_REQUESTS:
        assert drv.peak == 2  # one per node, two nodes
    else:
        assert drv.peak == peak
    bufs = [bytearray(4096) for _ in range(4)]
    drv.peak = 0
    gather(*(a.co_preadv(i * 4096, 4096, buf) for i, buf in enumerate(bufs)))
    assert drv.peak == (4 if mode is Concurrency.PARALLEL else 1)
    assert all(buf == b"c" * 4096 for buf in bufs[:3])


class GateMemoryDriver(MemoryDriver):
    """Counts how many of its hooks run at once on one node (writes, flushes, status)."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.active = 0
        self.overlaps: list[str] = []

    async def _enter(self, what: str) -> None:
        self.active += 1
        if self.active > 1:
            self.overlaps.append(what)
        await asyncio.sleep(0.02)
        self.active -= 1

    @hookimpl
    async def bdrv_co_pwritev(self, bs: Any, offset: int, length: int, buf: memoryview,
                              flags: F) -> None:  # fmt: skip
        await self._enter("write")
        await super().bdrv_co_pwritev(bs, offset, length, buf, flags)

    @hookimpl
    async def bdrv_co_flush_to_disk(self, bs: Any) -> None:
        await self._enter("flush_to_disk")

    @hookimpl
    async def bdrv_co_block_status(self, bs: Any, want_zero: bool, offset: int,
                                   length: int) -> Any:  # fmt: skip
        await self._enter("block_status")
        return await super().bdrv_co_block_status(bs, want_zero, offset, length)


@pytest.mark.parametrize("mode", [Concurrency.SERIALIZE_REQUESTS, Concurrency.SERIALIZE_ALL])
def test_serialized_driver_gets_one_request_at_a_time(env: Env, mode: Concurrency) -> None:
    from blockcore import status
    from blockcore.aio import bdrv_graph_co_rdlock

    drv = env.add(GateMemoryDriver(unique("iogate"), concurrency=mode))
    blk = env.open(drv, 64 * KiB)

    async def block_status() -> Any:
        async with bdrv_graph_co_rdlock():
            return await status.bdrv_co_block_status(blk.bs, True, 0, 4096)

    async def main() -> None:
        await blk.co_pwritev(0, 512, b"a" * 512)
        await asyncio.gather(blk.co_pwritev(4096, 512, b"b" * 512), blk.co_flush(),
                             block_status(), blk.co_pwritev(8192, 512, b"c" * 512))

    run(main())
    assert drv.overlaps == []

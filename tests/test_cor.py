"""Copy-on-read: data a read fetches from the backing chain is written into the top node."""

from __future__ import annotations

import asyncio
import random

import pytest
from iotest_drivers import DATA, UNALLOC, ZERO, CowDriver, Env, build_chain, run

from blockcore import BdrvRequestFlags as F
from blockcore import OpenFlags, info
from blockcore.backend import BlockBackend

KiB = 1024
BASE = random.Random(5).randbytes(1 << 20)


def base_backend(env: Env, size: int = 1 << 20) -> BlockBackend:
    blk = env.open(env.mem(), size)
    blk.pwrite(0, BASE[:size])
    return blk


def top_over(env: Env, base: BlockBackend, cow: CowDriver, size: int = 1 << 20) -> BlockBackend:
    return env.attach(env.node(cow, size, backing=base.bs))


def allocated_grains(blk: BlockBackend) -> list[int]:
    return [g for g, s in enumerate(CowDriver.allocation(blk.bs)) if s != UNALLOC]


def test_cor_copies_whole_cluster_into_top(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(request_alignment=512, cluster_size=64 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    assert top.pread(100 * KiB, 4 * KiB) == BASE[100 * KiB : 104 * KiB]
    # like QEMU: a 4 KiB read at 100 KiB allocates the whole 64 KiB cluster
    assert allocated_grains(top) == list(range(128, 256))
    base.pwrite(64 * KiB, b"\xee" * 64 * KiB)  # the copy no longer depends on the backing
    assert top.pread(64 * KiB, 64 * KiB) == BASE[64 * KiB : 128 * KiB]
    assert all(f & F.WRITE_UNCHANGED == 0 for h, _o, _n, f in cow.calls if h == "pwritev")


def test_cor_disabled_does_not_allocate(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(cluster_size=64 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    info.bdrv_disable_copy_on_read(top.bs)
    assert top.pread(0, 8 * KiB) == BASE[: 8 * KiB]
    assert allocated_grains(top) == []
    with pytest.raises(AssertionError):
        info.bdrv_disable_copy_on_read(top.bs)


def test_cor_flag_on_one_request(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(cluster_size=4 * KiB)
    top = top_over(env, base, cow)
    assert top.pread(8 * KiB, 100, F.COPY_ON_READ) == BASE[8 * KiB : 8 * KiB + 100]
    assert allocated_grains(top) == list(range(16, 24))
    assert top.pread(16 * KiB, 100) == BASE[16 * KiB : 16 * KiB + 100]
    assert allocated_grains(top) == list(range(16, 24))  # a plain read copies nothing


def test_cor_keeps_data_already_in_top(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(cluster_size=16 * KiB)
    top = top_over(env, base, cow)
    top.pwrite(4 * KiB, b"\x77" * 4 * KiB)
    cow.calls.clear()
    info.bdrv_enable_copy_on_read(top.bs)
    got = top.pread(0, 16 * KiB)
    assert got == BASE[: 4 * KiB] + b"\x77" * 4 * KiB + BASE[8 * KiB : 16 * KiB]
    writes = sorted((o, n) for h, o, n, _f in cow.calls if h in ("pwritev", "pwrite_zeroes"))
    assert writes == [(0, 4 * KiB), (8 * KiB, 8 * KiB)]  # only the unallocated pieces
    info.bdrv_disable_copy_on_read(top.bs)
    base.pwrite(0, b"\xee" * 16 * KiB)
    assert top.pread(0, 16 * KiB) == got


def test_cor_of_zero_backing_data_uses_zero_write(env: Env) -> None:
    base = env.open(env.mem(), 1 << 20)
    cow = env.cow(cluster_size=8 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    assert top.pread(0, 8 * KiB) == bytes(8 * KiB)
    assert [c[:3] for c in cow.calls if c[0] != "preadv"] == [("pwrite_zeroes", 0, 8 * KiB)]
    assert set(CowDriver.allocation(top.bs)[:16]) == {ZERO}


def test_cor_prefetch_fills_top_not_buffer(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(cluster_size=8 * KiB)
    top = top_over(env, base, cow)
    buf = bytearray(b"\x99" * 8 * KiB)
    top.pread_into(8 * KiB, buf, F.COPY_ON_READ | F.PREFETCH)
    assert buf == b"\x99" * 8 * KiB
    assert allocated_grains(top) == list(range(16, 32))
    assert top.pread(8 * KiB, 8 * KiB) == BASE[8 * KiB : 16 * KiB]


def test_cor_unaligned_read(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(request_alignment=4096, cluster_size=8 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    assert top.pread(5000, 3000) == BASE[5000:8000]
    assert allocated_grains(top) == [0, 1]


def test_cor_from_three_deep_chain(env: Env) -> None:
    cow = env.cow(request_alignment=512, cluster_size=1024)
    base, mid, top = build_chain(env, cow, 8192, [[("data", 0, 4096)],
                                                  [("data", 2048, 2048)], []])  # fmt: skip
    blk = env.attach(top)
    info.bdrv_enable_copy_on_read(top)
    want = b"\x01" * 2048 + b"\x02" * 2048 + bytes(4096)
    assert blk.pread(0, 8192) == want
    assert set(CowDriver.allocation(top)) <= {DATA, ZERO}
    assert set(CowDriver.allocation(top)) != {UNALLOC}
    info.bdrv_disable_copy_on_read(top)
    # the top alone now holds everything
    from blockcore import status

    assert status.bdrv_is_allocated(top, 0, 8192) == (True, 8192)
    del base, mid


def test_cor_debug_event_goes_to_cor_node(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(cluster_size=4 * KiB, events=True)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    top.pread(0, 512)
    assert (top.bs.node_name, "cor_write") in cow.events


def test_cor_on_inactive_node_writes_nothing(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(cluster_size=4 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    top.bs.open_flags |= OpenFlags.INACTIVE
    try:
        assert top.pread(0, 8 * KiB) == BASE[: 8 * KiB]
    finally:
        top.bs.open_flags &= ~OpenFlags.INACTIVE
    assert allocated_grains(top) == []


def test_concurrent_cor_reads_copy_a_cluster_once(env: Env) -> None:
    base = env.open(env.mem(delay=0.01), 1 << 20)
    base.pwrite(0, BASE)
    cow = env.cow(cluster_size=64 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    bufs = [bytearray(4 * KiB) for _ in range(6)]

    async def main() -> None:
        await asyncio.gather(*(top.co_preadv(i * 8 * KiB, 4 * KiB, b) for i, b in enumerate(bufs)))

    run(main())
    for i, b in enumerate(bufs):
        assert b == BASE[i * 8 * KiB : i * 8 * KiB + 4 * KiB]
    writes = [(o, n) for h, o, n, _f in cow.calls if h in ("pwritev", "pwrite_zeroes")]
    assert writes == [(0, 64 * KiB)]  # serialised at cluster size: one copy


# Regression test (core bug found by this suite, fixed in aeb6657): copy-on-read pieces are at
# least one cluster (cor.copy_on_read: max(round_down(max_transfer, cluster), cluster)), so a
# driver with max_transfer < cluster size gets oversized reads and writes
def test_cor_respects_max_transfer_smaller_than_cluster(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(request_alignment=512, max_transfer=4 * KiB, cluster_size=64 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    assert top.pread(100 * KiB, 4 * KiB) == BASE[100 * KiB : 104 * KiB]  # CowDriver checks
    assert allocated_grains(top) == list(range(128, 256))


# Regression test (core bug found by this suite, fixed in aeb6657): copy-on-read of the last,
# partial cluster asks bdrv_co_is_allocated past the end (pnum 0), turns it into a 1-byte piece
# and sends the driver an unaligned 1-byte read (cor.copy_on_read)
def test_cor_last_partial_cluster(env: Env) -> None:
    base = base_backend(env)
    cow = env.cow(request_alignment=512, cluster_size=1024)
    top = top_over(env, base, cow, size=1536)
    info.bdrv_enable_copy_on_read(top.bs)
    assert top.pread(1024, 512) == BASE[1024:1536]
    assert allocated_grains(top) == [2]


@pytest.mark.parametrize("write_first", [False, True])
def test_cor_racing_a_write_in_the_same_cluster_keeps_the_write(env: Env,
                                                                write_first: bool) -> None:  # fmt: skip
    base = env.open(env.mem(delay=0.02), 1 << 20)
    base.pwrite(0, BASE)
    cow = env.cow(cluster_size=64 * KiB)
    top = top_over(env, base, cow)
    info.bdrv_enable_copy_on_read(top.bs)
    buf = bytearray(4 * KiB)
    new = b"\x42" * 4 * KiB

    async def main() -> None:
        read = top.co_preadv(0, 4 * KiB, buf)
        write = top.co_pwritev(8 * KiB, 4 * KiB, new)
        first, second = (write, read) if write_first else (read, write)
        task = asyncio.ensure_future(first)
        await asyncio.sleep(0.005)
        await second
        await task

    run(main())
    assert buf == BASE[: 4 * KiB]
    info.bdrv_disable_copy_on_read(top.bs)
    # the copy of the backing cluster must not overwrite the newer write
    assert top.pread(8 * KiB, 4 * KiB) == new
    assert top.pread(0, 8 * KiB) == BASE[: 8 * KiB]
    assert top.pread(12 * KiB, 52 * KiB) == BASE[12 * KiB : 64 * KiB]

"""Reads and writes through the request path: request checks, alignment padding with
read-modify-write, max_transfer splitting, end-of-node behaviour, FUA, sync wrappers."""

from __future__ import annotations

import errno
import random
from typing import Any

import pytest
from iotest_drivers import Env, run_locked, unique

from blockcore import BdrvRequestFlags as F
from blockcore import OpenFlags, hookimpl, io
from blockcore.errors import BlockError
from blockcore.testing import MemoryDriver
from blockcore.types import BDRV_MAX_LENGTH, BDRV_REQUEST_MAX_BYTES
from blockcore.util import round_down, round_up


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def driver_io(calls: list[tuple[str, int, int, int]], hook: str) -> list[tuple[int, int]]:
    return [(off, n) for h, off, n, _f in calls if h == hook]


def covered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge (offset, length) ranges into sorted (start, end) intervals."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], off + n))
        else:
            out.append((off, off + n))
    return out


# -------------------------------------------------------------------------------------------
# Alignment and read-modify-write
# -------------------------------------------------------------------------------------------

RMW_CASES = [
    # (offset, length) relative to the alignment unit A, as (blocks, extra bytes)
    pytest.param((1, 10), (0, 100), id="inside-one-block"),
    pytest.param((1, 0), (0, 100), id="tail-only"),
    pytest.param((1, 100), (2, -100), id="head-only"),
    pytest.param((1, 1), (3, 0), id="head-and-tail"),
    pytest.param((0, 511), (0, 2), id="crosses-one-boundary"),
    pytest.param((2, 7), (40, 9), id="large-head-and-tail"),
]


@pytest.mark.parametrize("align", [512, 4096])
@pytest.mark.parametrize(("start", "size"), RMW_CASES)
def test_unaligned_write_rmw(env: Env, align: int, start: tuple[int, int],
                             size: tuple[int, int]) -> None:  # fmt: skip
    drv = env.mem(request_alignment=align)
    total = 64 * align
    blk = env.open(drv, total)
    old = pattern(total, 7)
    blk.pwrite(0, old)
    offset = start[0] * align + start[1]
    length = size[0] * align + size[1] if size[0] else size[1]
    data = pattern(length, 8)
    drv.calls.clear()
    blk.pwrite(offset, data)
    calls = list(drv.calls)

    model = bytearray(old)
    model[offset : offset + length] = data
    assert blk.pread(0, total) == bytes(model)
    # the driver saw only aligned requests (MemoryDriver checks) covering the padded range
    head, end = round_down(offset, align), round_up(offset + length, align)
    writes = driver_io(calls, "pwritev")
    assert covered(writes) == [(head, end)]
    assert sum(n for _o, n in writes) == end - head
    # only the edge blocks were read back for the read-modify-write
    reads = driver_io(calls, "preadv")
    edge = {head, end - align}
    assert reads, "an unaligned write must read its edge blocks"
    assert all(n == align and off in edge for off, n in reads)


@pytest.mark.parametrize("align", [512, 4096])
@pytest.mark.parametrize(("start", "size"), RMW_CASES)
def test_unaligned_read_padding(env: Env, align: int, start: tuple[int, int],
                                size: tuple[int, int]) -> None:  # fmt: skip
    drv = env.mem(request_alignment=align)
    total = 64 * align
    blk = env.open(drv, total)
    data = pattern(total, 3)
    blk.pwrite(0, data)
    offset = start[0] * align + start[1]
    length = size[0] * align + size[1] if size[0] else size[1]
    drv.calls.clear()
    assert blk.pread(offset, length) == data[offset : offset + length]
    reads = driver_io(drv.calls, "preadv")
    assert covered(reads) == [(round_down(offset, align), round_up(offset + length, align))]
    assert not driver_io(drv.calls, "pwritev")


def test_read_into_caller_buffer_only_touches_request(env: Env) -> None:
    drv = env.mem(request_alignment=4096)
    blk = env.open(drv, 65536)
    blk.pwrite(0, b"\xaa" * 65536)
    buf = bytearray(b"\x55" * 200)
    blk.pread_into(5000, memoryview(buf)[50:150])
    assert buf[:50] == b"\x55" * 50
    assert buf[50:150] == b"\xaa" * 100
    assert buf[150:] == b"\x55" * 50


def test_zero_length_unaligned_request_is_a_no_op(env: Env) -> None:
    drv = env.mem(request_alignment=4096)
    blk = env.open(drv, 65536)
    drv.calls.clear()
    blk.pwrite(4097, b"")
    assert blk.pread(4097, 0) == b""
    assert drv.calls == []


# -------------------------------------------------------------------------------------------
# max_transfer
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("align", "max_transfer"), [(1, 1000), (512, 1536), (512, 65536),
                                                     (4096, 12288), (4096, 4096)])
@pytest.mark.parametrize(("offset", "length"), [(0, 1 << 20), (4096, 300_000), (77, 250_001)])
def test_requests_split_at_max_transfer(env: Env, align: int, max_transfer: int, offset: int,
                                        length: int) -> None:  # fmt: skip
    drv = env.mem(request_alignment=align, max_transfer=max_transfer)
    total = 2 << 20
    blk = env.open(drv, total)
    data = pattern(length, 11)
    drv.calls.clear()
    blk.pwrite(offset, data)  # MemoryDriver raises if it sees more than max_transfer
    writes = driver_io(drv.calls, "pwritev")
    assert blk.pread(offset, length) == data
    for hook in ("preadv", "pwritev"):
        calls = driver_io(drv.calls, hook)
        assert calls
        assert max(n for _o, n in calls) <= max_transfer
    assert covered(writes) == [(round_down(offset, align), round_up(offset + length, align))]
    # splitting is not finer than needed (the two read-modify-write edges may add a piece each)
    padded = round_up(offset + length, align) - round_down(offset, align)
    assert len(writes) <= -(-padded // max_transfer) + 2


def test_max_transfer_unaligned_to_alignment_is_refused() -> None:
    from blockcore.types import BlockLimits

    with pytest.raises(ValueError, match="max_transfer"):
        BlockLimits(request_alignment=4096, max_transfer=6000)


# -------------------------------------------------------------------------------------------
# End of node, request checks
# -------------------------------------------------------------------------------------------


def test_node_length_is_512_granular_and_tail_reads_zero(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 1000)
    assert blk.getlength() == 1024
    blk.pwrite(0, b"\x11" * 1000)
    assert blk.pread(1000, 24) == bytes(24)


def test_node_level_read_past_end_is_zero_filled_without_driver_io(env: Env) -> None:
    drv = env.mem(request_alignment=4096)
    blk = env.open(drv, 6144)
    blk.pwrite(0, b"\x22" * 6144)
    drv.calls.clear()
    buf = bytearray(b"\xff" * 16384)
    run_locked(io.bdrv_co_preadv, blk.root, 0, 16384, buf)
    assert bytes(buf[:6144]) == b"\x22" * 6144
    assert bytes(buf[6144:]) == bytes(16384 - 6144)
    # the driver is asked at most up to the end of the last alignment unit of the node
    assert max(off + n for off, n in driver_io(drv.calls, "preadv")) <= 8192
    drv.calls.clear()
    buf = bytearray(b"\xff" * 4096)
    run_locked(io.bdrv_co_preadv, blk.root, 65536, 4096, buf)
    assert bytes(buf) == bytes(4096)
    assert drv.calls == []


def test_backend_refuses_requests_past_the_end(env: Env) -> None:
    blk = env.open(env.mem(), 4096)
    with pytest.raises(BlockError) as exc:
        blk.pread(4000, 200)
    assert exc.value.errno == errno.EIO
    with pytest.raises(BlockError) as exc:
        blk.pwrite(4096, b"x")
    assert exc.value.errno == errno.EIO


def test_node_level_write_past_end_needs_resize_then_grows(env: Env) -> None:
    drv = env.mem(request_alignment=512)
    blk = env.open(drv, 4096)
    with pytest.raises(BlockError) as exc:
        run_locked(io.bdrv_co_pwritev, blk.root, 4096, 512, b"y" * 512)
    assert exc.value.errno == errno.EPERM
    grow = env.open(drv, 4096, OpenFlags.RDWR | OpenFlags.RESIZE)
    run_locked(io.bdrv_co_pwritev, grow.root, 4000, 1000, b"z" * 1000)
    assert grow.getlength() == 5120  # 5000 rounded up to 512
    assert grow.pread(4000, 1000) == b"z" * 1000


@pytest.mark.parametrize(("offset", "length"), [
    (-1, 512), (0, -1), (BDRV_MAX_LENGTH + 512, 512), (0, BDRV_REQUEST_MAX_BYTES + 512),
    pytest.param(BDRV_MAX_LENGTH - 256, 512,
        id="crosses-max-length"),
])  # fmt: skip
def test_invalid_read_requests_are_eio(env: Env, offset: int, length: int) -> None:
    drv = env.mem()
    blk = env.open(drv, 4096)
    drv.calls.clear()
    with pytest.raises(BlockError) as exc:
        run_locked(io.bdrv_co_preadv, blk.root, offset, length, bytearray(512))
    assert exc.value.errno == errno.EIO
    assert drv.calls == []


def test_write_longer_than_32bit_limit_is_eio(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 4096)
    with pytest.raises(BlockError) as exc:
        run_locked(io.bdrv_co_pwritev, blk.root, 0, BDRV_REQUEST_MAX_BYTES + 512, b"")
    assert exc.value.errno == errno.EIO


def test_short_buffer_is_einval(env: Env) -> None:
    blk = env.open(env.mem(), 4096)
    with pytest.raises(BlockError) as exc:
        run_locked(io.bdrv_co_preadv, blk.root, 0, 1024, bytearray(512))
    assert exc.value.errno == errno.EINVAL


def test_write_to_read_only_node_is_eperm(env: Env) -> None:
    drv = env.mem()
    rw = env.open(drv, 4096)
    ro = env.open(drv, 4096, OpenFlags.NONE)
    drv.calls.clear()
    with pytest.raises(BlockError) as exc:
        run_locked(io.bdrv_co_pwritev, ro.root, 0, 512, b"a" * 512)
    assert exc.value.errno == errno.EPERM
    assert drv.calls == []
    del rw


# -------------------------------------------------------------------------------------------
# FUA
# -------------------------------------------------------------------------------------------


def test_fua_passed_to_driver_that_supports_it(env: Env) -> None:
    drv = env.mem(fua=True)
    blk = env.open(drv, 65536)
    drv.calls.clear()
    blk.pwrite(0, b"f" * 4096, F.FUA)
    assert [c for c in drv.calls if c[0] == "pwritev"] == [("pwritev", 0, 4096, int(F.FUA))]
    assert drv.flushes == 0


# Regression test (core bug found by this suite, fixed in aeb6657): FUA is stripped from every
# chunk but the last even when the driver honours FUA natively (io._aligned_pwritev)
def test_native_fua_kept_on_every_chunk(env: Env) -> None:
    drv = env.mem(fua=True, max_transfer=4096)
    blk = env.open(drv, 65536)
    drv.calls.clear()
    blk.pwrite(0, b"f" * 16384, F.FUA)
    writes = [c for c in drv.calls if c[0] == "pwritev"]
    assert len(writes) == 4
    assert all(flags & F.FUA for *_x, flags in writes)


def test_fua_not_passed_to_driver_without_it(env: Env) -> None:
    drv = env.mem(fua=False)
    blk = env.open(drv, 65536)
    drv.calls.clear()
    blk.pwrite(0, b"f" * 4096, F.FUA)
    assert all(not flags & F.FUA for h, _o, _n, flags in drv.calls if h == "pwritev")


# Regression test (core bug found by this suite, fixed in aeb6657): emulated FUA flushes before
# write_gen moves, so bdrv_co_flush skips flush_to_disk (same as QEMU bug fixed by 'block: create
# bdrv_advance_flush_gen() helper')
@pytest.mark.parametrize("flushed_before", [False, True])
def test_fua_emulated_by_flush_to_disk(env: Env, flushed_before: bool) -> None:
    drv = env.mem(fua=False, max_transfer=4096)
    blk = env.open(drv, 65536)
    if flushed_before:
        blk.pwrite(0, b"x" * 512)
        blk.flush()
    before = drv.flushes
    drv.calls.clear()
    blk.pwrite(0, b"f" * 16384, F.FUA)
    writes = [i for i, c in enumerate(drv.calls) if c[0] == "pwritev"]
    flushes = [i for i, c in enumerate(drv.calls) if c[0] == "flush_to_disk"]
    assert drv.flushes - before == 1  # one flush for the whole request
    assert flushes and flushes[0] > writes[-1]  # after the data


# -------------------------------------------------------------------------------------------
# Sync wrappers
# -------------------------------------------------------------------------------------------


def test_sync_wrappers_on_an_edge(env: Env) -> None:
    drv = env.mem(request_alignment=512)
    blk = env.open(drv, 65536)
    child = blk.root
    io.bdrv_pwrite(child, 100, 5, b"hello")
    buf = bytearray(5)
    io.bdrv_pread(child, 100, 5, buf)
    assert bytes(buf) == b"hello"
    before = drv.flushes
    io.bdrv_pwrite_sync(child, 1000, 3, b"abc")
    assert drv.flushes == before + 1
    assert blk.pread(1000, 3) == b"abc"
    assert io.bdrv_getlength(blk.bs) == 65536
    assert io.bdrv_nb_sectors(blk.bs) == 128
    assert run_locked(io.bdrv_co_nb_sectors, blk.bs) == 128


def test_pwrite_sync_is_a_write_barrier(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 65536)
    drv.calls.clear()
    run_locked(io.bdrv_co_pwrite_sync, blk.root, 0, 512, b"s" * 512)
    hooks = [c[0] for c in drv.calls]
    assert hooks == ["pwritev", "flush_to_disk"]


# -------------------------------------------------------------------------------------------
# Lengths beyond 32 bits and variable-length nodes
# -------------------------------------------------------------------------------------------


class NullDriver(MemoryDriver):
    """Reads zeros, records zero writes and discards; any size without memory."""

    def __init__(self, name: str, size: int, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.size = size

    @hookimpl
    def bdrv_open(self, bs: Any, options: dict[str, Any], flags: Any) -> None:
        bs.opaque = None

    @hookimpl
    async def bdrv_co_getlength(self, bs: Any) -> int:
        return self.size

    @hookimpl
    async def bdrv_co_preadv(self, bs: Any, offset: int, length: int, buf: memoryview,
                             flags: F) -> None:  # fmt: skip
        self.calls.append(("preadv", offset, length, int(flags)))
        buf[:] = bytes(length)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs: Any, offset: int, length: int,
                                    flags: F) -> None:  # fmt: skip
        self.calls.append(("pwrite_zeroes", offset, length, int(flags)))

    @hookimpl
    async def bdrv_co_pdiscard(self, bs: Any, offset: int, length: int) -> None:
        self.calls.append(("pdiscard", offset, length, 0))


def test_zero_write_and_discard_beyond_32_bits(env: Env) -> None:
    GiB = 1 << 30
    drv = env.add(NullDriver(unique("ionull"), 8 * GiB))
    blk = env.open(drv, None, discard=True)
    assert blk.getlength() == 8 * GiB
    blk.pwrite_zeroes(0, 3 * GiB)  # zero writes are exempt from the 32-bit request limit
    blk.pdiscard(0, 3 * GiB)
    assert drv.calls == [("pwrite_zeroes", 0, 3 * GiB, 0), ("pdiscard", 0, 3 * GiB, 0)]
    with pytest.raises(BlockError) as exc:
        run_locked(io.bdrv_co_preadv, blk.root, 0, 3 * GiB, bytearray(1))
    assert exc.value.errno == errno.EIO
    assert blk.pread(5 * GiB, 4096) == bytes(4096)


def test_variable_length_node_is_asked_again(env: Env) -> None:
    import attrs

    class Cdrom(MemoryDriver):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.limits = attrs.evolve(self.limits, has_variable_length=True)

    drv = env.add(Cdrom(unique("iocd")))
    blk = env.open(drv, 4096)
    assert io.bdrv_getlength(blk.bs) == 4096
    blk.bs.opaque.extend(bytes(4096))  # the medium changed behind our back
    assert io.bdrv_getlength(blk.bs) == 8192
    assert io.bdrv_nb_sectors(blk.bs) == 16
    fixed = env.open(env.mem(), 4096)
    fixed.bs.opaque.extend(bytes(4096))
    assert io.bdrv_getlength(fixed.bs) == 4096  # fixed length: the cached value

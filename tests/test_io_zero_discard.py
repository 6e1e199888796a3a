"""Zero writes (driver zero-write, bounded fallback, NO_FALLBACK, MAY_UNMAP, alignment
pieces, detect-zeroes, bdrv_make_zero) and discard (unmap policy, read-only, splitting)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iotest_drivers import (
    UNALLOC,
    ZERO,
    CowDriver,
    Env,
    ZeroUnsupportedMemoryDriver,
    run_locked,
    unique,
)

import blockcore.io as bio
from blockcore import BdrvRequestFlags as F
from blockcore import OpenFlags, hookimpl, info, io
from blockcore.errors import BlockError, NotSupportedError
from blockcore.testing import MemoryDriver
from blockcore.types import MAX_BOUNCE_BUFFER, DriverDescriptor
from blockcore.util import round_down

MiB = 1 << 20


def hooks(drv: Any) -> list[str]:
    return [c[0] for c in drv.calls]


# -------------------------------------------------------------------------------------------
# Driver zero write and fallback
# -------------------------------------------------------------------------------------------


def test_zero_write_uses_driver_hook(env: Env) -> None:
    drv = env.mem(request_alignment=512)
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x77" * MiB)
    drv.calls.clear()
    blk.pwrite_zeroes(4096, 65536)
    assert drv.calls == [("pwrite_zeroes", 4096, 65536, 0)]
    assert blk.pread(4096, 65536) == bytes(65536)
    assert blk.pread(0, 4096) == b"\x77" * 4096
    assert blk.pread(69632, 4096) == b"\x77" * 4096


@pytest.mark.parametrize("max_transfer", [0, 65536])
def test_zero_write_fallback_without_driver_hook_is_bounded(
    env: Env, monkeypatch: pytest.MonkeyPatch, max_transfer: int
) -> None:
    allocations: list[int] = []
    real = bio.aligned_buffer

    def recording(size: int, align: int = 4096) -> memoryview:
        allocations.append(size)
        return real(size, align)

    monkeypatch.setattr(bio, "aligned_buffer", recording)
    drv = env.mem(request_alignment=512, zero_write=False, max_transfer=max_transfer)
    size = 40 * MiB
    blk = env.open(drv, size)
    blk.pwrite(size - 4096, b"\x01" * 4096)
    drv.calls.clear()
    allocations.clear()
    blk.pwrite_zeroes(100, size - 200)
    writes = [(off, n) for h, off, n, _f in drv.calls if h == "pwritev"]
    limit = min(max_transfer or MAX_BOUNCE_BUFFER, MAX_BOUNCE_BUFFER)
    assert len(writes) >= (size - 200) // limit  # never one request for the whole range
    assert max(n for _o, n in writes) <= limit
    assert max(allocations) <= limit  # never one buffer for the whole range
    assert "pwrite_zeroes" not in hooks(drv)
    assert blk.pread(size - 4096, 4096) == bytes(3996) + b"\x01" * 100
    assert blk.pread(0, 100) == bytes(100)


def test_zero_write_fallback_when_driver_says_not_supported(env: Env) -> None:
    drv = env.add(ZeroUnsupportedMemoryDriver(unique("iozu"), max_transfer=65536))
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x33" * MiB)
    drv.calls.clear()
    blk.pwrite_zeroes(0, 300_000)
    assert hooks(drv)[0] == "pwrite_zeroes_refused"
    writes = [n for h, _o, n, _f in drv.calls if h == "pwritev"]
    assert sum(writes) == 300_000 and max(writes) <= 65536
    assert blk.pread(0, 300_000) == bytes(300_000)
    assert blk.pread(300_000, 1000) == b"\x33" * 1000


@pytest.mark.parametrize("align", [512, 4096])
@pytest.mark.parametrize("blocks", [4, 40])
def test_unaligned_zero_write_pads_edges(env: Env, align: int, blocks: int) -> None:
    drv = env.mem(request_alignment=align)
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x44" * MiB)
    drv.calls.clear()
    offset, length = 3 * align + 17, blocks * align + 5
    blk.pwrite_zeroes(offset, length)
    calls = list(drv.calls)
    assert blk.pread(offset - 17, 17) == b"\x44" * 17
    assert blk.pread(offset, length) == bytes(length)
    assert blk.pread(offset + length, 100) == b"\x44" * 100
    # only the two edge blocks are read back
    reads = [(o, n) for h, o, n, _f in calls if h == "preadv"]
    assert {o for o, _n in reads} <= {3 * align, round_down(offset + length, align)}


@pytest.mark.parametrize("align", [512, 4096])
# Regression test (core bug found by this suite, fixed in aeb6657): an unaligned zero write whose
# padded range was <= 64 KiB was written as one data buffer; its aligned middle never reached the
# driver's zero write (io._padded_pwritev small path)
@pytest.mark.parametrize("size", ["small", "large"])
def test_unaligned_zero_write_middle_uses_driver_zero_write(env: Env, align: int,
                                                            size: str) -> None:  # fmt: skip
    blocks = 4 if size == "small" else 65536 // align + 8
    drv = env.mem(request_alignment=align)
    blk = env.open(drv, MiB)
    drv.calls.clear()
    offset, length = 3 * align + 17, blocks * align + 5
    blk.pwrite_zeroes(offset, length)
    # QEMU: edges are read-modify-written as data, the aligned middle is a zero write
    zeroed = [(o, n) for h, o, n, _f in drv.calls if h == "pwrite_zeroes"]
    assert zeroed == [(4 * align, (blocks - 1) * align)]
    written = [(o, n) for h, o, n, _f in drv.calls if h == "pwritev"]
    assert sorted(written) == [(3 * align, align), (round_down(offset + length, align), align)]


def qemu_zero_pieces(offset: int, length: int, req_align: int, pwz_align: int,
                     max_pwz: int) -> list[tuple[int, int]]:  # fmt: skip
    """QEMU's bdrv_co_do_pwrite_zeroes fragmentation for an aligned request."""
    align = max(pwz_align, req_align)
    max_zero = round_down(max_pwz or 2**62, align)
    head, tail = offset % align, (offset + length) % align
    out = []
    while length > 0:
        num = length
        if head:
            num = min(length, align - head)
            head = (head + num) % align
        elif tail and num > align:
            num -= tail
        num = min(num, max_zero)
        out.append((offset, num))
        offset += num
        length -= num
    return out


@pytest.mark.parametrize(("offset", "length"), [(512, 399_872), (65536, 262144),
                                                (0, 1000 * 512), (130560, 1024)])
def test_zero_write_pieces_follow_pwrite_zeroes_alignment(env: Env, offset: int,
                                                          length: int) -> None:  # fmt: skip
    drv = env.mem(request_alignment=512, pwrite_zeroes_alignment=65536,
                  max_pwrite_zeroes=131072)  # fmt: skip
    blk = env.open(drv, MiB)
    drv.calls.clear()
    blk.pwrite_zeroes(offset, length)
    got = [(o, n) for h, o, n, _f in drv.calls if h == "pwrite_zeroes"]
    assert got == qemu_zero_pieces(offset, length, 512, 65536, 131072)
    for o, n in got:  # bulk aligned, small pieces never cross a 64 KiB boundary
        assert n <= 131072
        assert (o % 65536 == 0 and n % 65536 == 0) or o // 65536 == (o + n - 1) // 65536


# -------------------------------------------------------------------------------------------
# NO_FALLBACK and MAY_UNMAP
# -------------------------------------------------------------------------------------------


def test_no_fallback_without_driver_zero_write_is_not_supported(env: Env) -> None:
    drv = env.mem(zero_write=False)
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x55" * 4096)
    drv.calls.clear()
    with pytest.raises(NotSupportedError) as exc:
        blk.pwrite_zeroes(0, 4096, F.NO_FALLBACK)
    assert exc.value.errno == errno.ENOTSUP
    assert "pwritev" not in hooks(drv)
    assert blk.pread(0, 4096) == b"\x55" * 4096


def test_no_fallback_when_driver_refuses_does_not_write_buffers(env: Env) -> None:
    drv = env.add(ZeroUnsupportedMemoryDriver(unique("iozu")))
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x55" * 4096)
    drv.calls.clear()
    with pytest.raises(NotSupportedError):
        blk.pwrite_zeroes(0, 4096, F.NO_FALLBACK)
    assert "pwritev" not in hooks(drv)
    assert blk.pread(0, 4096) == b"\x55" * 4096


def test_no_fallback_unaligned_is_not_supported(env: Env) -> None:
    drv = env.mem(request_alignment=4096)
    blk = env.open(drv, MiB)
    drv.calls.clear()
    with pytest.raises(NotSupportedError):
        blk.pwrite_zeroes(100, 8192, F.NO_FALLBACK)
    assert drv.calls == []


class NoFallbackMemoryDriver(MemoryDriver):
    """Declares that its zero write is always efficient (NO_FALLBACK in its zero flags)."""

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        import attrs

        desc = super().bdrv_describe()
        return attrs.evolve(desc, supported_zero_flags=F.MAY_UNMAP | F.NO_FALLBACK)


def test_no_fallback_reaches_driver_that_declares_it(env: Env) -> None:
    drv = env.add(NoFallbackMemoryDriver(unique("ionf")))
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x66" * 8192)
    drv.calls.clear()
    blk.pwrite_zeroes(0, 8192, F.NO_FALLBACK)
    assert drv.calls == [("pwrite_zeroes", 0, 8192, int(F.NO_FALLBACK))]
    assert blk.pread(0, 8192) == bytes(8192)


# Regression test (core bug found by this suite, fixed in aeb6657): NO_FALLBACK is refused with
# ENOTSUP only when the driver lacks a zero-write hook; QEMU refuses it whenever NO_FALLBACK is
# not in supported_zero_flags (io._do_pwrite_zeroes)
def test_no_fallback_refused_when_driver_does_not_declare_it(env: Env) -> None:
    drv = env.mem()  # has a zero write, supported_zero_flags = MAY_UNMAP only
    blk = env.open(drv, MiB)
    drv.calls.clear()
    with pytest.raises(NotSupportedError):
        blk.pwrite_zeroes(0, 8192, F.NO_FALLBACK)
    assert drv.calls == []


@pytest.mark.parametrize("unmap", [False, True])
def test_may_unmap_stripped_without_discard_unmap(env: Env, unmap: bool) -> None:
    """bdrv_co_pwrite_zeroes drops MAY_UNMAP on a node without discard=unmap; the
    BlockBackend's zero write does not go through it and keeps the flag, as QEMU 7.2's
    blk_co_pwrite_zeroes (qemu-io's ``write -z -u`` frees qcow2 clusters with discard=ignore)."""
    drv = env.mem()
    blk = env.open(drv, MiB, discard=unmap)
    drv.calls.clear()
    io.bdrv_pwrite_zeroes(blk.root, 0, 65536, F.MAY_UNMAP)
    blk.pwrite_zeroes(65536, 65536, F.MAY_UNMAP)
    (node_call, blk_call) = drv.calls
    assert node_call[0] == blk_call[0] == "pwrite_zeroes"
    assert bool(node_call[3] & F.MAY_UNMAP) is unmap
    assert blk_call[3] & F.MAY_UNMAP
    assert info.bdrv_can_write_zeroes_with_unmap(blk.bs) is unmap


def test_can_write_zeroes_with_unmap_needs_driver_flag(env: Env) -> None:
    drv = env.add(ZeroUnsupportedMemoryDriver(unique("iozu")))
    blk = env.open(drv, MiB, discard=True)
    assert info.bdrv_can_write_zeroes_with_unmap(blk.bs)  # MemoryDriver declares MAY_UNMAP
    cow = env.cow()
    cblk = env.open(cow, MiB, discard=True)
    cblk.bs.supported_zero_flags = F.NONE
    assert not info.bdrv_can_write_zeroes_with_unmap(cblk.bs)


# Regression test (core bug found by this suite, fixed in aeb6657): emulated FUA on a zero write
# flushes before write_gen moves, so flush_to_disk is skipped (io._do_pwrite_zeroes)
def test_zero_write_fua_emulated_by_flush(env: Env) -> None:
    drv = env.mem(fua=False)
    blk = env.open(drv, MiB)
    before = drv.flushes
    blk.pwrite_zeroes(0, 65536, F.FUA)
    assert drv.flushes == before + 1


@pytest.mark.parametrize(("mode", "unmap", "want"), [("on", False, F.NONE),
                                                     ("unmap", True, F.MAY_UNMAP),
                                                     ("unmap", False, F.NONE)])
def test_detect_zeroes_turns_zero_buffers_into_zero_writes(env: Env, mode: str, unmap: bool,
                                                           want: F) -> None:  # fmt: skip
    drv = env.mem()
    blk = env.open(drv, MiB, discard=unmap, **{"detect-zeroes": mode})
    drv.calls.clear()
    blk.pwrite(0, bytes(8192))
    assert drv.calls == [("pwrite_zeroes", 0, 8192, int(want))]
    drv.calls.clear()
    blk.pwrite(0, b"\x01" + bytes(8191))
    assert hooks(drv) == ["pwritev"]


# -------------------------------------------------------------------------------------------
# bdrv_make_zero
# -------------------------------------------------------------------------------------------


def test_make_zero_skips_ranges_already_zero(env: Env) -> None:
    cow = env.cow(request_alignment=512)
    blk = env.open(cow, 64 * 512)
    blk.pwrite(0, b"\x01" * 1024)  # data
    blk.pwrite_zeroes(4096, 1024)  # allocated zeros
    blk.pwrite(8192, b"\x02" * 2048)  # data
    blk.pwrite(16384, bytes(512))  # data that happens to be zero
    cow.calls.clear()
    io.bdrv_make_zero(blk.root)
    zeroed = [(o, n) for h, o, n, _f in cow.calls if h == "pwrite_zeroes"]
    assert zeroed == [(0, 1024), (8192, 2048), (16384, 512)]
    assert "pwritev" not in hooks(cow)
    assert blk.pread(0, 64 * 512) == bytes(64 * 512)
    assert set(CowDriver.allocation(blk.bs)) <= {UNALLOC, ZERO}


def test_make_zero_on_zero_node_writes_nothing(env: Env) -> None:
    drv = env.mem(request_alignment=512)
    blk = env.open(drv, MiB)
    drv.calls.clear()
    io.bdrv_make_zero(blk.root)
    assert [h for h in hooks(drv) if h != "preadv"] == []


def test_make_zero_passes_flags(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 65536, discard=True)
    blk.pwrite(0, b"\x09" * 65536)
    drv.calls.clear()
    io.bdrv_make_zero(blk.root, F.MAY_UNMAP)
    assert [c for c in drv.calls if c[0] == "pwrite_zeroes"] == [
        ("pwrite_zeroes", 0, 65536, int(F.MAY_UNMAP))
    ]
    assert blk.pread(0, 65536) == bytes(65536)


# -------------------------------------------------------------------------------------------
# Discard
# -------------------------------------------------------------------------------------------


def test_discard_without_unmap_is_a_no_op(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, MiB)
    blk.pwrite(0, b"\x12" * 65536)
    drv.calls.clear()
    gen = blk.bs.write_gen
    blk.pdiscard(0, 65536)
    assert drv.calls == []
    assert blk.pread(0, 65536) == b"\x12" * 65536
    assert blk.bs.write_gen == gen


def test_discard_without_driver_hook_is_a_no_op(env: Env) -> None:
    drv = env.mem(discard=False)
    blk = env.open(drv, MiB, discard=True)
    blk.pwrite(0, b"\x12" * 65536)
    drv.calls.clear()
    blk.pdiscard(0, 65536)
    assert drv.calls == []
    assert blk.pread(0, 65536) == b"\x12" * 65536


def test_discard_with_unmap_reaches_driver(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, MiB, discard=True)
    blk.pwrite(0, b"\x12" * 65536)
    drv.calls.clear()
    gen = blk.bs.write_gen
    blk.pdiscard(4096, 8192)
    assert drv.calls == [("pdiscard", 4096, 8192, 0)]
    assert blk.pread(4096, 8192) == bytes(8192)  # MemoryDriver discards to zeros
    assert blk.pread(0, 4096) == b"\x12" * 4096
    assert blk.bs.write_gen == gen + 1
    assert blk.getlength() == MiB  # never extends


def test_discard_on_read_only_node_with_unmap_is_eperm(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, MiB, OpenFlags.NONE, discard=True)
    drv.calls.clear()
    with pytest.raises(BlockError) as exc:
        blk.pdiscard(0, 4096)
    assert exc.value.errno == errno.EPERM
    assert drv.calls == []


# Regression test (core bug found by this suite, fixed in aeb6657): bdrv_co_pdiscard checks read-
# only before the discard=unmap policy; QEMU returns 0 for a node opened without unmap, read-only
# or not
def test_discard_on_read_only_node_without_unmap_is_a_no_op(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, MiB, OpenFlags.NONE)
    blk.pdiscard(0, 4096)
    assert drv.calls == []


def test_discard_not_supported_by_driver_is_ignored(env: Env) -> None:
    class Refusing(MemoryDriver):
        @hookimpl
        async def bdrv_co_pdiscard(self, bs: Any, offset: int, length: int) -> None:
            self.calls.append(("pdiscard_refused", offset, length, 0))
            raise NotSupportedError("cannot discard here")

    drv = env.add(Refusing(unique("iodr"), max_pdiscard=4096))
    blk = env.open(drv, MiB, discard=True)
    blk.pwrite(0, b"\x21" * 16384)
    drv.calls.clear()
    blk.pdiscard(0, 16384)  # no error, every piece still tried
    assert [c[1:3] for c in drv.calls] == [(0, 4096), (4096, 4096), (8192, 4096), (12288, 4096)]
    assert blk.pread(0, 16384) == b"\x21" * 16384


def qemu_discard_pieces(offset: int, length: int, req_align: int, pd_align: int,
                        max_pd: int) -> list[tuple[int, int]]:  # fmt: skip
    """QEMU's bdrv_co_pdiscard fragmentation."""
    align = max(pd_align, req_align)
    max_pd = round_down(max_pd or 2**62, align)
    head, tail = offset % align, (offset + length) % align
    out = []
    while length > 0:
        num = length
        if head:
            num = min(length, align - head)
            if num % req_align:
                num %= req_align
            head = (head + num) % align
        elif tail:
            if num > align:
                num -= tail
            elif tail % req_align and tail > req_align:
                tail %= req_align
                num -= tail
        num = min(num, max_pd)
        out.append((offset, num))
        offset += num
        length -= num
    return out


@pytest.mark.parametrize(("req_align", "pd_align", "max_pd"), [(512, 65536, 131072),
                                                               (1, 4096, 0), (4096, 0, 8192),
                                                               (512, 0, 0)])
@pytest.mark.parametrize(("offset", "length"), [(1000, 300_000), (0, 524288), (65536, 100),
                                                (70000, 70000), (131072 - 512, 1024)])
def test_discard_split_like_qemu(env: Env, req_align: int, pd_align: int, max_pd: int,
                                 offset: int, length: int) -> None:  # fmt: skip
    drv = env.mem(request_alignment=req_align, pdiscard_alignment=pd_align, max_pdiscard=max_pd)
    blk = env.open(drv, MiB, discard=True)
    blk.pwrite(0, b"\x5a" * MiB)
    drv.calls.clear()
    blk.pdiscard(offset, length)
    got = [(o, n) for h, o, n, _f in drv.calls if h == "pdiscard"]
    assert got == qemu_discard_pieces(offset, length, req_align, pd_align, max_pd)
    assert sum(n for _o, n in got) == length
    if max_pd:
        assert max(n for _o, n in got) <= max_pd
    # pieces of the aligned bulk start and end on the discard alignment
    align = max(pd_align, req_align)
    bulk = [(o, n) for o, n in got if n >= align]
    assert all(o % align == 0 and n % align == 0 for o, n in bulk)


def test_discard_past_end_is_refused_by_backend(env: Env) -> None:
    blk = env.open(env.mem(), 65536, discard=True)
    with pytest.raises(BlockError) as exc:
        blk.pdiscard(65536 - 512, 1024)
    assert exc.value.errno == errno.EIO


def test_sync_pdiscard_wrapper(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 65536, discard=True)
    blk.pwrite(0, b"\x01" * 65536)
    io.bdrv_pdiscard(blk.root, 0, 4096)
    assert blk.pread(0, 4096) == bytes(4096)
    assert run_locked(io.bdrv_co_pdiscard, blk.root, 4096, 4096) is None
    assert blk.pread(4096, 4096) == bytes(4096)

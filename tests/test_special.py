"""The less common requests: copy_range, VM state, ioctl and removable media, request
cancellation, aligned buffers, debug events, plug/unplug, and the node queries."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import time
from typing import Any

import pytest
from iotest_drivers import (
    BufferRecordingMemoryDriver,
    Env,
    FilterDriver,
    OffloadMemoryDriver,
    address_of,
    run_locked,
    unique,
)

from blockcore import BdrvRequestFlags as F
from blockcore import IOThread, OpenFlags, hookimpl, info, io, main_context, special
from blockcore.errors import BlockError, NoMediumError, NotSupportedError
from blockcore.graph import bdrv_try_change_aio_context
from blockcore.testing import MemoryDriver
from blockcore.types import BLKDEBUG_EVENTS, BdrvCheckMode
from blockcore.util import PAGE_SIZE

KiB = 1024

# -------------------------------------------------------------------------------------------
# copy_range
# -------------------------------------------------------------------------------------------


def copy_range(src: Any, so: int, dst: Any, do: int, n: int, rf: F = F.NONE,
               wf: F = F.NONE) -> None:  # fmt: skip
    run_locked(special.bdrv_co_copy_range, src.root, so, dst.root, do, n, rf, wf)


def test_copy_range_refused_without_offload(env: Env) -> None:
    drv = env.mem()
    src = env.open(drv, 64 * KiB)
    dst = env.open(drv, 64 * KiB)
    src.pwrite(0, b"s" * 4096)
    drv.calls.clear()
    with pytest.raises(NotSupportedError) as exc:
        copy_range(src, 0, dst, 0, 4096)
    assert exc.value.errno == errno.ENOTSUP
    assert drv.calls == []  # never emulated with reads and writes
    assert dst.pread(0, 4096) == bytes(4096)


def test_copy_range_refused_when_only_one_side_offloads(env: Env) -> None:
    off = env.add(OffloadMemoryDriver(unique("iooff")))
    plain = env.mem()
    a = env.open(off, 64 * KiB)
    b = env.open(plain, 64 * KiB)
    for src, dst in ((a, b), (b, a)):
        with pytest.raises(NotSupportedError):
            copy_range(src, 0, dst, 0, 4096)


def test_copy_range_offloaded(env: Env) -> None:
    off = env.add(OffloadMemoryDriver(unique("iooff")))
    src = env.open(off, 64 * KiB)
    dst = env.open(off, 64 * KiB)
    src.pwrite(4096, b"c" * 8192)
    gen = dst.bs.write_gen
    off.calls.clear()
    copy_range(src, 4096, dst, 16384, 8192, F.NO_SERIALISING)
    assert [c[0] for c in off.calls] == ["copy_range_from", "copy_range_to"]
    assert dst.pread(16384, 8192) == b"c" * 8192
    assert dst.bs.write_gen == gen + 1


def test_copy_range_zero_write_flag_zeroes_destination(env: Env) -> None:
    drv = env.mem()
    src = env.open(drv, 64 * KiB)
    dst = env.open(drv, 64 * KiB)
    dst.pwrite(0, b"d" * 8192)
    copy_range(src, 0, dst, 0, 8192, F.NONE, F.ZERO_WRITE)
    assert dst.pread(0, 8192) == bytes(8192)


def test_copy_range_refuses_no_fallback(env: Env) -> None:
    off = env.add(OffloadMemoryDriver(unique("iooff")))
    src = env.open(off, 64 * KiB)
    dst = env.open(off, 64 * KiB)
    with pytest.raises(BlockError) as exc:
        copy_range(src, 0, dst, 0, 4096, F.NO_FALLBACK)
    assert exc.value.errno == errno.EINVAL


def test_copy_range_to_read_only_destination_is_eperm(env: Env) -> None:
    off = env.add(OffloadMemoryDriver(unique("iooff")))
    src = env.open(off, 64 * KiB)
    dst = env.open(off, 64 * KiB, OpenFlags.NONE)
    with pytest.raises(BlockError) as exc:
        copy_range(src, 0, dst, 0, 4096)
    assert exc.value.errno == errno.EPERM


# -------------------------------------------------------------------------------------------
# VM state
# -------------------------------------------------------------------------------------------


def test_vmstate_saved_and_loaded_by_format(env: Env) -> None:
    cow = env.cow(vmstate=True)
    blk = env.open(cow, 64 * KiB)
    assert special.bdrv_save_vmstate(blk.bs, b"hello vm", 100, 8) == 8
    buf = bytearray(8)
    assert special.bdrv_load_vmstate(blk.bs, buf, 100, 8) == 8
    assert buf == b"hello vm"
    assert blk.pread(0, 64 * KiB) == bytes(64 * KiB)  # guest data untouched


def test_vmstate_forwarded_through_filter(env: Env) -> None:
    cow = env.cow(vmstate=True)
    filt = env.add(FilterDriver())
    blk = env.open(filt, None, file={"driver": cow.name, "size": 64 * KiB})
    run_locked(special.bdrv_co_writev_vmstate, blk.bs, bytearray(b"through"), 7)
    assert bytes(blk.bs.file.bs.opaque.vmstate[7:14]) == b"through"
    buf = bytearray(7)
    special.bdrv_readv_vmstate(blk.bs, buf, 7)
    assert buf == b"through"


def test_vmstate_not_supported(env: Env) -> None:
    blk = env.open(env.mem(), 64 * KiB)
    with pytest.raises(NotSupportedError):
        special.bdrv_save_vmstate(blk.bs, b"x", 0, 1)
    with pytest.raises(NotSupportedError):
        special.bdrv_load_vmstate(blk.bs, bytearray(1), 0, 1)


def test_vmstate_negative_position_is_einval(env: Env) -> None:
    blk = env.open(env.cow(vmstate=True), 64 * KiB)
    with pytest.raises(BlockError) as exc:
        special.bdrv_save_vmstate(blk.bs, b"x", -1, 1)
    assert exc.value.errno == errno.EINVAL


# -------------------------------------------------------------------------------------------
# ioctl and removable media
# -------------------------------------------------------------------------------------------


def test_ioctl_not_supported_without_driver(env: Env) -> None:
    blk = env.open(env.mem(), 64 * KiB)
    with pytest.raises(NotSupportedError):
        run_locked(special.bdrv_co_ioctl, blk.bs, 0x2285, bytearray(16))
    filt = env.add(FilterDriver())
    fblk = env.open(filt, None, file={"driver": env.mem().name, "size": 4096})
    with pytest.raises(NotSupportedError):
        run_locked(special.bdrv_co_ioctl, fblk.bs, 0x2285, bytearray(16))


def test_ioctl_forwarded_through_filter(env: Env) -> None:
    inner = env.add(FilterDriver(ioctl=True))
    outer = env.add(FilterDriver())
    mem = env.mem()
    blk = env.open(outer, None, file={"driver": inner.name,
                                      "file": {"driver": mem.name, "size": 4096}})  # fmt: skip
    assert run_locked(special.bdrv_co_ioctl, blk.bs, 0x2285, bytearray(16)) == 42
    assert inner.calls == [("ioctl", 0x2285)]
    assert blk.bs.in_flight == 0


def test_eject_and_lock_medium_are_no_ops_without_driver(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 64 * KiB)
    drv.calls.clear()
    assert run_locked(special.bdrv_co_eject, blk.bs, True) is None
    assert run_locked(special.bdrv_co_lock_medium, blk.bs, True) is None
    assert run_locked(special.bdrv_co_is_inserted, blk.bs) is True
    assert special.bdrv_is_inserted(blk.bs) is True
    assert drv.calls == []
    assert blk.pread(0, 4) == bytes(4)


def test_removable_medium_driver(env: Env) -> None:
    media = env.add(FilterDriver(medium=True))
    outer = env.add(FilterDriver())
    mem = env.mem()
    blk = env.open(outer, None, file={"driver": media.name,
                                      "file": {"driver": mem.name, "size": 4096}})  # fmt: skip
    inner_bs = blk.bs.file.bs
    run_locked(special.bdrv_co_lock_medium, inner_bs, True)
    run_locked(special.bdrv_co_eject, inner_bs, True)
    assert media.calls == [("lock_medium", True), ("eject", True)]
    assert run_locked(special.bdrv_co_is_inserted, inner_bs) is False
    assert run_locked(special.bdrv_co_is_inserted, blk.bs) is False  # children's answer
    run_locked(special.bdrv_co_eject, inner_bs, False)
    assert run_locked(special.bdrv_co_is_inserted, blk.bs) is True


# Regression test (core bug found by this suite, fixed in 45bdce2): requests on a node whose
# driver reports no medium (bdrv_co_is_inserted False) reached the driver; QEMU's
# bdrv_co_preadv_part/pwritev_part/pdiscard return -ENOMEDIUM
@pytest.mark.parametrize("op", ["read", "write", "zero", "discard"])
def test_requests_on_ejected_medium_are_enomedium(env: Env, op: str) -> None:
    media = env.add(FilterDriver(medium=True))
    mem = env.mem()
    blk = env.open(media, None, discard=True, file={"driver": mem.name, "size": 4096})
    run_locked(special.bdrv_co_eject, blk.bs, True)
    assert run_locked(special.bdrv_co_is_inserted, blk.bs) is False
    mem.calls.clear()
    with pytest.raises(NoMediumError):
        if op == "read":
            blk.pread(0, 512)
        elif op == "write":
            blk.pwrite(0, b"x" * 512)
        elif op == "zero":
            blk.pwrite_zeroes(0, 512)
        else:
            blk.pdiscard(0, 512)
    assert mem.calls == []


# -------------------------------------------------------------------------------------------
# Cancellation
# -------------------------------------------------------------------------------------------


def test_cancel_before_start_completes_with_ecanceled(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 64 * KiB)
    drv.calls.clear()
    results: list[Any] = []
    acb = blk.aio_pwritev(0, b"c" * 512, results.append)
    special.bdrv_aio_cancel(acb)
    assert acb.done
    assert len(results) == 1  # the callback ran exactly once
    assert isinstance(results[0], BlockError) and results[0].errno == errno.ECANCELED
    assert drv.calls == []
    assert blk.pread(0, 512) == bytes(512)


def test_cancel_async_returns_at_once_and_callback_runs_once(env: Env) -> None:
    blk = env.open(env.mem(), 64 * KiB)
    results: list[Any] = []
    acb = blk.aio_pwritev(0, b"c" * 512, results.append)
    special.bdrv_aio_cancel_async(acb)
    assert results == []  # nothing ran yet
    main_context().loop.run_until_complete(acb._task)
    assert len(results) == 1 and results[0].errno == errno.ECANCELED


def test_cancel_of_request_in_driver_lets_it_finish(env: Env) -> None:
    drv = env.mem(delay=0.05)
    blk = env.open(drv, 64 * KiB)
    results: list[Any] = []
    acb = blk.aio_pwritev(0, b"r" * 512, results.append)
    loop = main_context().loop
    loop.run_until_complete(asyncio.sleep(0.01))  # now inside the driver
    assert acb.started and not acb.done
    special.bdrv_aio_cancel(acb)
    assert results == [0]  # ran to completion, as QEMU's default cancel
    assert blk.pread(0, 512) == b"r" * 512


def test_aio_read_delivers_data(env: Env) -> None:
    blk = env.open(env.mem(), 64 * KiB)
    blk.pwrite(0, b"a" * 512)
    buf = bytearray(512)
    results: list[Any] = []
    acb = blk.aio_preadv(0, buf, results.append)
    main_context().loop.run_until_complete(acb._task)
    assert results == [0] and buf == b"a" * 512


# Regression test (core bug found by this suite, fixed in aeb6657): bdrv_aio_cancel refuses with
# EDEADLK whenever the node's loop is running, which an IOThread's loop always is, so it can
# never cancel a request of a node in an IOThread (special.bdrv_aio_cancel)
def test_cancel_request_of_iothread_node_from_main_thread(env: Env) -> None:
    drv = env.mem(delay=0.05)
    blk = env.open(drv, 64 * KiB)
    thread = IOThread(unique("iocancel"))
    ctx = thread.start()
    try:
        bdrv_try_change_aio_context(blk.bs, ctx)
        results: list[Any] = []
        made: concurrent.futures.Future[Any] = concurrent.futures.Future()
        ctx.loop.call_soon_threadsafe(
            lambda: made.set_result(blk.aio_pwritev(0, b"i" * 512, results.append))
        )
        acb = made.result(timeout=5)
        time.sleep(0.01)
        special.bdrv_aio_cancel(acb)
        assert acb.done and len(results) == 1
    finally:
        time.sleep(0.1)
        bdrv_try_change_aio_context(blk.bs, main_context())
        thread.stop()


# -------------------------------------------------------------------------------------------
# Aligned buffers
# -------------------------------------------------------------------------------------------


def test_qemu_blockalign_is_aligned(env: Env) -> None:
    blk = env.open(env.mem(), 64 * KiB)
    align = info.bdrv_opt_mem_align(blk.bs)
    assert align == 4096 and info.bdrv_min_mem_align(blk.bs) == blk.bs.bl.min_mem_alignment
    for size in (1, 512, 4096, 5000, 65536):
        buf = info.qemu_blockalign(blk.bs, size)
        assert len(buf) == size
        assert address_of(buf) % align == 0
        assert bytes(buf) == bytes(size)
    zero = info.qemu_blockalign(blk.bs, 0)
    assert len(zero) == align and address_of(zero) % align == 0  # one alignment unit
    assert len(info.qemu_blockalign0(blk.bs, 100)) == 100
    tried = info.qemu_try_blockalign(blk.bs, 8192)
    assert tried is not None and address_of(tried) % align == 0
    assert info.qemu_try_blockalign0(None, 0) is not None
    assert address_of(info.qemu_blockalign(None, 100)) % max(4096, PAGE_SIZE) == 0


def test_bounce_buffers_are_aligned(env: Env) -> None:
    drv = env.add(BufferRecordingMemoryDriver(unique("iobuf"), request_alignment=512))
    blk = env.open(drv, 64 * KiB)
    drv.addresses.clear()
    blk.pwrite(100, b"u" * 1000)  # read-modify-write through a bounce buffer
    blk.pread(3, 5)  # padded read through a bounce buffer
    assert drv.addresses
    # every piece of a bounce buffer is aligned to the request alignment (O_DIRECT needs the
    # logical block size), and each bounce buffer itself to opt_mem_alignment
    assert all(addr is not None and addr % 512 == 0 for _h, addr in drv.addresses)
    writes = [addr for h, addr in drv.addresses if h == "pwritev"]
    assert writes and all(addr is not None and addr % 4096 == 0 for addr in writes)


# Regression test (core bug found by this suite, fixed in aeb6657): util.aligned_buffer only
# page-aligns (mmap), so qemu_blockalign and bounce buffers ignore an opt_mem_alignment larger
# than the page size
def test_qemu_blockalign_honours_alignment_above_page_size(env: Env) -> None:
    align = 4 * PAGE_SIZE
    drv = env.add(BufferRecordingMemoryDriver(unique("iobuf"), opt_mem_alignment=align))
    blk = env.open(drv, 64 * KiB)
    assert info.bdrv_opt_mem_align(blk.bs) == align
    bufs = [info.qemu_blockalign(blk.bs, PAGE_SIZE * k) for k in range(1, 20)]
    assert [address_of(b) % align for b in bufs] == [0] * len(bufs)


# -------------------------------------------------------------------------------------------
# Debug events
# -------------------------------------------------------------------------------------------


def test_debug_event_names_are_qemus() -> None:
    assert len(BLKDEBUG_EVENTS) == 48 and len(set(BLKDEBUG_EVENTS)) == 48
    assert BLKDEBUG_EVENTS[0] == "l1_update" and BLKDEBUG_EVENTS[-1] == "none"
    for name in ("pwritev_rmw_head", "pwritev_rmw_after_tail", "pwritev_zero", "cor_write",
                 "flush_to_os", "flush_to_disk", "read_backing_aio", "cluster_alloc_space"):
        assert name in BLKDEBUG_EVENTS


def test_write_path_events_reach_the_node(env: Env) -> None:
    cow = env.cow(request_alignment=512, events=True)
    blk = env.open(cow, 64 * KiB)
    name = blk.bs.node_name
    cow.events.clear()
    blk.pwrite(100, b"e" * 1000)
    events = [e for n, e in cow.events if n == name]
    for want in ("pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail",
                 "pwritev_rmw_after_tail", "pwritev", "pwritev_done"):
        assert want in events
    assert events.index("pwritev_rmw_head") < events.index("pwritev") < events.index(
        "pwritev_done")
    cow.events.clear()
    blk.pwrite_zeroes(0, 4096)
    assert [e for _n, e in cow.events] == ["pwritev_zero", "pwritev_done"]


def test_flush_events_go_to_primary_child(env: Env) -> None:
    cow = env.cow(events=True)
    filt = env.add(FilterDriver())
    blk = env.open(filt, None, file={"driver": cow.name, "size": 64 * KiB})
    blk.pwrite(0, b"f" * 512)
    cow.events.clear()
    blk.flush()
    assert (blk.bs.file.bs.node_name, "flush_to_os") in cow.events
    assert (blk.bs.file.bs.node_name, "flush_to_disk") in cow.events


def test_debug_event_sync_and_null_safe(env: Env) -> None:
    cow = env.cow(events=True)
    blk = env.open(cow, 4096)
    io.bdrv_debug_event(blk.bs, "l2_update")
    assert cow.events == [(blk.bs.node_name, "l2_update")]
    run_locked(io.bdrv_co_debug_event, None, "l2_update")  # NULL-safe like BLKDBG_EVENT
    assert len(cow.events) == 1


# -------------------------------------------------------------------------------------------
# Plug / unplug
# -------------------------------------------------------------------------------------------


class BatchingMemoryDriver(MemoryDriver):
    @hookimpl
    async def bdrv_co_io_plug(self, bs: Any) -> None:
        self.calls.append(("plug", 0, 0, 0))

    @hookimpl
    async def bdrv_co_io_unplug(self, bs: Any) -> None:
        self.calls.append(("unplug", 0, 0, 0))


def test_plug_unplug_outermost_only_and_children_first(env: Env) -> None:
    drv = env.add(BatchingMemoryDriver(unique("iobatch")))
    filt = env.add(FilterDriver())
    blk = env.open(filt, None, file={"driver": drv.name, "size": 4096})
    child = blk.bs.file.bs

    async def main() -> None:
        await special.bdrv_co_io_plug(blk.bs)
        await special.bdrv_co_io_plug(blk.bs)
        assert child.io_plugged == 2 and blk.bs.io_plugged == 2
        await special.bdrv_co_io_unplug(blk.bs)
        assert [c[0] for c in drv.calls] == ["plug"]
        await special.bdrv_co_io_unplug(blk.bs)

    run_locked(main)
    assert [c[0] for c in drv.calls] == ["plug", "unplug"]
    with pytest.raises(AssertionError):
        run_locked(special.bdrv_co_io_unplug, blk.bs)


# -------------------------------------------------------------------------------------------
# Node queries
# -------------------------------------------------------------------------------------------


def test_get_info_and_round_to_clusters(env: Env) -> None:
    cow = env.cow(cluster_size=64 * KiB)
    blk = env.open(cow, 1 << 20)
    bdi = info.bdrv_get_info(blk.bs)
    assert bdi.cluster_size == 64 * KiB and bdi.subcluster_size == 64 * KiB
    assert info.bdrv_round_to_clusters(blk.bs, 100 * KiB, 4 * KiB) == (64 * KiB, 64 * KiB)
    assert info.bdrv_round_to_clusters(blk.bs, 60 * KiB, 8 * KiB) == (0, 128 * KiB)
    mem = env.open(env.mem(), 4096)
    with pytest.raises(NotSupportedError):
        info.bdrv_get_info(mem.bs)
    assert info.bdrv_round_to_clusters(mem.bs, 100, 50) == (100, 50)
    filt = env.add(FilterDriver())
    fblk = env.open(filt, None, file={"driver": cow.name, "size": 4096})
    assert info.bdrv_get_info(fblk.bs).cluster_size == 64 * KiB


def test_read_only_and_writable_flags(env: Env) -> None:
    drv = env.mem()
    rw = env.open(drv, 4096)
    ro = env.open(drv, 4096, OpenFlags.NONE)
    assert not info.bdrv_is_read_only(rw.bs) and info.bdrv_is_writable(rw.bs)
    assert info.bdrv_is_read_only(ro.bs) and not info.bdrv_is_writable(ro.bs)
    rw.bs.open_flags |= OpenFlags.INACTIVE
    try:
        assert not info.bdrv_is_read_only(rw.bs) and not info.bdrv_is_writable(rw.bs)
        with pytest.raises(BlockError) as exc:
            rw.pwrite(0, b"x")
        assert exc.value.errno == errno.EPERM
    finally:
        rw.bs.open_flags &= ~OpenFlags.INACTIVE
    assert not info.bdrv_is_sg(rw.bs)
    assert info.bdrv_get_flags(rw.bs) & OpenFlags.RDWR
    assert info.bdrv_get_format_name(rw.bs) == drv.name


def test_apply_auto_read_only(env: Env) -> None:
    drv = env.mem()
    plain = env.open(drv, 4096)
    with pytest.raises(BlockError) as exc:
        info.bdrv_apply_auto_read_only(plain.bs, "cannot write here")
    assert exc.value.errno == errno.EACCES and "cannot write here" in str(exc.value)
    auto = env.open(drv, 4096, OpenFlags.RDWR | OpenFlags.AUTO_RDONLY)
    info.bdrv_enable_copy_on_read(auto.bs)
    with pytest.raises(BlockError) as exc:
        info.bdrv_apply_auto_read_only(auto.bs)
    assert exc.value.errno == errno.EINVAL
    info.bdrv_disable_copy_on_read(auto.bs)
    info.bdrv_apply_auto_read_only(auto.bs)
    assert info.bdrv_is_read_only(auto.bs)


def test_compressed_writes(env: Env) -> None:
    class Compressing(MemoryDriver):
        @hookimpl
        async def bdrv_co_pwritev_compressed(self, bs: Any, offset: int, length: int,
                                             buf: memoryview) -> None:  # fmt: skip
            self.calls.append(("compressed", offset, length, 0))
            bs.opaque[offset : offset + length] = buf

    comp = env.add(Compressing(unique("iocomp")))
    filt = env.add(FilterDriver())
    fblk = env.open(filt, None, file={"driver": comp.name, "size": 65536})
    assert info.bdrv_supports_compressed_writes(fblk.bs)
    cblk = env.open(comp, 65536)
    cblk.pwrite(0, b"z" * 4096, F.WRITE_COMPRESSED)
    assert ("compressed", 0, 4096, 0) in comp.calls
    assert cblk.pread(0, 4096) == b"z" * 4096
    plain = env.open(env.mem(), 65536)
    assert not info.bdrv_supports_compressed_writes(plain.bs)
    with pytest.raises(NotSupportedError):
        plain.pwrite(0, b"z" * 4096, F.WRITE_COMPRESSED)


def test_not_supported_queries(env: Env) -> None:
    blk = env.open(env.mem(), 4096)
    bs = blk.bs
    with pytest.raises(NotSupportedError):
        info.bdrv_get_allocated_file_size(bs)
    with pytest.raises(NotSupportedError, match="persistent bitmaps"):
        special.bdrv_can_store_new_dirty_bitmap(bs, "b0", 65536)
    with pytest.raises(NotSupportedError):
        run_locked(special.bdrv_co_delete_file, bs)
    run_locked(special.bdrv_co_delete_file_noerr, bs)  # swallows "not supported"
    run_locked(special.bdrv_co_delete_file_noerr, None)
    with pytest.raises(NotSupportedError):
        special.bdrv_check(bs, BdrvCheckMode.NONE)
    with pytest.raises(NotSupportedError):
        info.bdrv_measure(bs.drv, {}, None)
    special.bdrv_invalidate_cache(bs)  # nothing to drop: no error
    assert info.bdrv_get_specific_info(bs) is None
    assert info.bdrv_get_specific_stats(bs) is None
    assert info.bdrv_get_backing_filename(bs) == ""


def test_allocated_file_size_of_filter_asks_child(env: Env) -> None:
    class Sized(MemoryDriver):
        @hookimpl
        async def bdrv_co_get_allocated_file_size(self, bs: Any) -> int:
            return 12345

    sized = env.add(Sized(unique("iosz")))
    filt = env.add(FilterDriver())
    blk = env.open(filt, None, file={"driver": sized.name, "size": 4096})
    assert info.bdrv_get_allocated_file_size(blk.bs) == 12345

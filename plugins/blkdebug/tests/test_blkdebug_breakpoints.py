"""Breakpoints (QEMU's break / wait_break / resume / remove_break) and races built with them."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from blkdebug_helpers import Env, settle, wait_done
from blockcore_blkdebug import driver as bd

import blockcore
from blockcore import BlockBackend, DriverDescriptor, IOThread, OpenFlags, hookimpl, io
from blockcore.errors import BlockError, NotSupportedError
from blockcore.graph import bdrv_open_child, bdrv_try_change_aio_context
from blockcore.special import BlockAIOCB
from blockcore.types import ChildRole

SIZE = 1 << 20


def driver_writes(mem: Any) -> list[tuple[int, int]]:
    return [(o, n) for h, o, n, _f in mem.calls if h == "pwritev"]


# -------------------------------------------------------------------------------------------
# The commands
# -------------------------------------------------------------------------------------------


def test_break_wait_resume(env: Env, messages: list[str]) -> None:
    mem = env.mem()
    blk = env.open(mem)
    bd.debug_breakpoint(blk.bs, "pwritev", "A")
    acb = blk.aio_pwritev(0, b"x" * 4096)
    bd.wait_break(blk.bs, "A", timeout=5)
    assert bd.debug_is_suspended(blk.bs, "A") and not bd.debug_is_suspended(blk.bs, "B")
    assert messages == ["blkdebug: Suspended request 'A'"]
    settle()
    assert not acb.done and driver_writes(mem) == []
    bd.debug_resume(blk.bs, "A")
    assert not bd.debug_is_suspended(blk.bs, "A")
    wait_done(acb)
    assert messages == ["blkdebug: Suspended request 'A'", "blkdebug: Resuming request 'A'"]
    assert driver_writes(mem) == [(0, 4096)]
    # breakpoints are one-shot
    blk.pwrite(0, b"y" * 4096)
    assert blk.pread(0, 4096) == b"y" * 4096


def test_breakpoint_on_an_event_raised_by_a_node_above(env: Env) -> None:
    """The GS helpers search down primary children, as QEMU's bdrv_debug_breakpoint."""
    filt = PassFilter().register()
    try:
        mem = env.mem()
        blk = env.track(BlockBackend.open(None, {"driver": "bd-pass", "file": {
            "driver": "blkdebug", "image": {"driver": mem.name, "size": SIZE}}},
            OpenFlags.RDWR))  # fmt: skip
        node = bd.find_debug_node(blk.bs)
        assert node is not None and node is blk.bs.file.bs  # type: ignore[union-attr]
        bd.debug_breakpoint(blk.bs, "l2_load", "L")
        acb = blk.aio_pwritev(0, b"z" * 512)  # the filter raises l2_load on its file child
        bd.wait_break(blk.bs, "L", timeout=5)
        assert not acb.done
        bd.debug_resume(blk.bs, "L")
        wait_done(acb)
        assert blk.pread(0, 512) == b"z" * 512
    finally:
        filt.unregister()


def test_command_errors(env: Env) -> None:
    blk = env.open()
    with pytest.raises(BlockError, match="unknown debug event 'nope'") as info:
        bd.debug_breakpoint(blk.bs, "nope", "A")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BlockError, match="no request suspended under tag 'A'") as info:
        bd.debug_resume(blk.bs, "A")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BlockError, match="no breakpoint with tag 'A' left to remove") as info:
        bd.debug_remove_breakpoint(blk.bs, "A")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BlockError, match="no request suspended under tag 'A' within") as info:
        bd.wait_break(blk.bs, "A", timeout=0.05)
    assert info.value.errno == errno.ETIMEDOUT
    plain = env.track(BlockBackend.open(None, {"driver": env.mem().name, "size": SIZE}))
    with pytest.raises(NotSupportedError, match="no node below handles breakpoints"):
        bd.debug_breakpoint(plain.bs, "pwritev", "A")
    assert bd.find_debug_node(plain.bs) is None
    assert not bd.debug_is_suspended(plain.bs, "A")


def test_remove_break_drops_breakpoints_and_resumes(env: Env) -> None:
    blk = env.open()
    bd.debug_breakpoint(blk.bs, "pwritev", "A")
    bd.debug_breakpoint(blk.bs, "pwritev_done", "A")
    acb = blk.aio_pwritev(0, b"q" * 512)
    bd.wait_break(blk.bs, "A", timeout=5)
    bd.debug_remove_breakpoint(blk.bs, "A")  # resumes it; pwritev_done no longer stops it
    wait_done(acb)
    assert blk.bs.opaque.engine.breakpoints("A") == []
    bd.debug_breakpoint(blk.bs, "pwritev", "B")
    bd.debug_remove_breakpoint(blk.bs, "B")  # a pending breakpoint alone is enough
    blk.pwrite(0, b"r" * 512)


def test_remove_break_after_the_breakpoint_fired(env: Env, messages: list[str]) -> None:
    """QEMU 7.2 resumes the parked request and still reports ENOENT (io-blkdebug golden)."""
    mem = env.mem()
    blk = env.open(mem)
    bd.debug_breakpoint(blk.bs, "pwritev", "A")
    acb = blk.aio_pwritev(0, b"f" * 512)
    bd.wait_break(blk.bs, "A", timeout=5)
    with pytest.raises(BlockError, match="no breakpoint with tag 'A' left to remove") as info:
        bd.debug_remove_breakpoint(blk.bs, "A")
    assert info.value.errno == errno.ENOENT
    assert not bd.debug_is_suspended(blk.bs, "A")
    wait_done(acb)
    assert messages[-1] == "blkdebug: Resuming request 'A'"
    assert driver_writes(mem) == [(0, 512)]


@pytest.mark.parametrize("first", ["A", "B"])
def test_two_tags_on_one_event(env: Env, first: str) -> None:
    blk = env.open()
    bd.debug_breakpoint(blk.bs, "pwritev", "A")
    bd.debug_breakpoint(blk.bs, "pwritev", "B")
    acb = blk.aio_pwritev(0, b"t" * 512)
    bd.wait_break(blk.bs, "A", timeout=5)
    assert bd.debug_is_suspended(blk.bs, "B")
    second = "B" if first == "A" else "A"
    bd.debug_resume(blk.bs, first)
    settle()
    assert not acb.done and bd.debug_is_suspended(blk.bs, second)
    bd.debug_resume(blk.bs, second)
    wait_done(acb)


def test_close_resumes_parked_requests(env: Env) -> None:
    blk = env.open()
    state = blk.bs.opaque
    bd.debug_breakpoint(blk.bs, "pwritev", "A")
    acb = blk.aio_pwritev(0, b"c" * 512)
    bd.wait_break(blk.bs, "A", timeout=5)
    bd.bdrv_close(blk.bs)  # what close does for a request still parked
    assert state.suspended == []
    wait_done(acb)


def test_breakpoint_in_an_iothread(env: Env) -> None:
    """Resume from the main thread wakes a request parked in another thread's loop."""
    mem = env.mem()
    blk = env.open(mem)
    thread = IOThread("bd-iothread")
    ctx = thread.start()
    try:
        bdrv_try_change_aio_context(blk.bs, ctx)
        bd.debug_breakpoint(blk.bs, "pwritev", "T")
        fut = asyncio.run_coroutine_threadsafe(blk.co_pwritev(0, 512, b"i" * 512), ctx.loop)
        bd.wait_break(blk.bs, "T", timeout=5)
        assert not fut.done()
        bd.debug_resume(blk.bs, "T")
        fut.result(timeout=5)
        assert blk.pread(0, 512) == b"i" * 512
    finally:
        bdrv_try_change_aio_context(blk.bs, blockcore.main_context())
        thread.stop()


# -------------------------------------------------------------------------------------------
# Races
# -------------------------------------------------------------------------------------------


def test_overlapping_unaligned_writes_serialise(env: Env) -> None:
    """As iotest 077: two sub-block writes into one 4 KiB block. The second must wait for
    the first's read-modify-write, else it would write back stale data over it."""
    mem = env.mem()
    blk = env.open(mem, align=4096)
    bs = blk.bs
    bd.debug_breakpoint(bs, "pwritev_rmw_after_head", "A")
    a = blk.aio_pwritev(0x1200, b"\x11" * 0x200)
    bd.wait_break(bs, "A", timeout=5)
    bd.debug_breakpoint(bs, "pwritev_rmw_after_head", "B")
    b = blk.aio_pwritev(0x1400, b"\x22" * 0x200)
    settle()
    # B waits for A (both serialising over the same block) before reaching its own RMW
    assert not bd.debug_is_suspended(bs, "B") and not b.done
    assert driver_writes(mem) == []
    bd.debug_resume(bs, "A")
    bd.wait_break(bs, "B", timeout=5)  # B reads its block only after A wrote it
    assert a.done and a.result == 0
    assert driver_writes(mem) == [(0x1000, 0x1000)]
    bd.debug_resume(bs, "B")
    wait_done(a, b)
    expect = bytes(0x200) + b"\x11" * 0x200 + b"\x22" * 0x200 + bytes(0x1000 - 0x600)
    assert blk.pread(0x1000, 0x1000) == expect


def test_unaligned_write_and_zero_write_serialise(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, align=4096)
    bs = blk.bs
    blk.pwrite(0, b"\xee" * 8192)
    bd.debug_breakpoint(bs, "pwritev_rmw_after_tail", "A")
    a = blk.aio_pwritev(0x100, b"\x11" * 0x1000)  # [0x100, 0x1100): head and tail blocks
    bd.wait_break(bs, "A", timeout=5)

    async def zero() -> None:
        await blk.co_pwrite_zeroes(0x1080, 0x100)

    z = BlockAIOCB(bs, zero())
    settle()
    assert not z.done
    bd.debug_resume(bs, "A")
    wait_done(a, z)
    got = blk.pread(0, 8192)
    assert got[:0x100] == b"\xee" * 0x100 and got[0x100:0x1080] == b"\x11" * 0xF80
    assert got[0x1080:0x1180] == bytes(0x100) and got[0x1180:] == b"\xee" * (8192 - 0x1180)


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_overlapping_writes_resumed_in_chosen_order(env: Env, order: str) -> None:
    """Two aligned, overlapping writes parked at ``pwritev``; the one resumed last wins the
    overlap, whole (no mix of the two)."""
    mem = env.mem()
    blk = env.open(mem, align=4096)
    bs = blk.bs
    data = {"A": b"\x11" * 8192, "B": b"\x22" * 8192}
    offsets = {"A": 0, "B": 4096}
    acbs: dict[str, BlockAIOCB] = {}
    for tag in "AB":
        bd.debug_breakpoint(bs, "pwritev", tag)
        acbs[tag] = blk.aio_pwritev(offsets[tag], data[tag])
        bd.wait_break(bs, tag, timeout=5)
    assert bd.debug_is_suspended(bs, "A") and bd.debug_is_suspended(bs, "B")
    assert driver_writes(mem) == []
    for tag in order:
        bd.debug_resume(bs, tag)
        wait_done(acbs[tag])
    assert driver_writes(mem) == [(offsets[t], 8192) for t in order]
    got = blk.pread(0, 12288)
    assert got[:4096] == data["A"][:4096] and got[8192:] == data["B"][:4096]
    assert got[4096:8192] == data[order[-1]][:4096]


# -------------------------------------------------------------------------------------------
# A minimal filter above blkdebug, raising an event on its child like a format would
# -------------------------------------------------------------------------------------------


class PassFilter:
    name = "bd-pass"

    def register(self) -> PassFilter:
        blockcore.register_driver(self, self.name)
        return self

    def unregister(self) -> None:
        blockcore.unregister_driver(self.name)

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        return DriverDescriptor(format_name=self.name, is_filter=True, child_names=("file",))

    @hookimpl
    def bdrv_open(self, bs: Any, options: dict[str, Any], flags: Any) -> None:
        bdrv_open_child(bs, options, "file", ChildRole.FILTERED | ChildRole.PRIMARY)

    @hookimpl
    async def bdrv_co_preadv(self, bs: Any, offset: int, length: int, buf: memoryview,
                             flags: Any) -> None:  # fmt: skip
        await io.bdrv_co_preadv(bs.file, offset, length, buf, flags)

    @hookimpl
    async def bdrv_co_pwritev(self, bs: Any, offset: int, length: int, buf: memoryview,
                              flags: Any) -> None:  # fmt: skip
        await io.BLKDBG_EVENT(bs.file, "l2_load")
        await io.bdrv_co_pwritev(bs.file, offset, length, buf, flags)

"""Drained sections: requests in flight from an IOThread finish before bdrv_drained_begin
returns; requests submitted inside the section wait and then run (none lost, none failed);
nesting, propagation to parents, driver drain hooks, in-flight counting."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from iotest_drivers import Env, unique

from blockcore import IOThread, hookimpl, main_context
from blockcore.aio import AioContext
from blockcore.drain import (
    bdrv_dec_in_flight,
    bdrv_do_drained_begin_quiesce,
    bdrv_drain,
    bdrv_drain_poll,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_inc_in_flight,
    bdrv_parent_drained_begin_single,
    bdrv_parent_drained_end_single,
    bdrv_parent_drained_poll_single,
)
from blockcore.graph import BlockDriverState, bdrv_try_change_aio_context
from blockcore.testing import MemoryDriver

TESTS = Path(__file__).parent


@contextmanager
def in_iothread(bs: BlockDriverState) -> Iterator[AioContext]:
    """Move ``bs`` (and everything connected to it) into a fresh IOThread, and back after."""
    thread = IOThread(unique("iothread"))
    ctx = thread.start()
    try:
        bdrv_try_change_aio_context(bs, ctx)
        try:
            yield ctx
        finally:
            bdrv_try_change_aio_context(bs, main_context())
    finally:
        thread.stop()


def wait_until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def submit_write(blk: Any, ctx: AioContext, offset: int, data: bytes) -> Any:
    return asyncio.run_coroutine_threadsafe(blk.co_pwritev(offset, len(data), data), ctx.loop)


def test_drain_waits_for_requests_in_flight_in_iothread(env: Env) -> None:
    drv = env.mem(delay=0.15)
    blk = env.open(drv, 1 << 20)
    bs = blk.bs
    with in_iothread(bs) as ctx:
        assert bs.aio_context is ctx and blk.bs.aio_context is ctx
        first = [submit_write(blk, ctx, i * 4096, bytes([i + 1]) * 4096) for i in range(8)]
        wait_until(lambda: len(drv.calls) == 8)  # all eight are inside the driver now
        assert bs.in_flight > 0
        t0 = time.monotonic()
        bdrv_drained_begin(bs)
        try:
            assert time.monotonic() - t0 > 0.05  # it really waited for the driver
            assert bs.in_flight == 0
            assert blk.in_flight == 0
            # the coroutines have returned; run_coroutine_threadsafe's futures learn it from a
            # callback the iothread's loop runs just after, so they may lag a moment
            assert [f.result(timeout=5) for f in first] == [None] * 8
            # new requests inside the section wait: none reaches the driver
            calls = len(drv.calls)
            second = [submit_write(blk, ctx, (16 + i) * 4096, bytes([0x40 + i]) * 4096)
                      for i in range(8)]  # fmt: skip
            time.sleep(0.2)
            assert not any(f.done() for f in second)
            assert len(drv.calls) == calls
            assert bs.in_flight == 0
        finally:
            bdrv_drained_end(bs)
        assert [f.result(timeout=10) for f in second] == [None] * 8  # none lost, none failed
        assert bs.quiesce_counter == 0
    for i in range(8):
        assert blk.pread(i * 4096, 4096) == bytes([i + 1]) * 4096
        assert blk.pread((16 + i) * 4096, 4096) == bytes([0x40 + i]) * 4096


def test_nested_drained_sections(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 1 << 20)
    bs = blk.bs
    with in_iothread(bs) as ctx:
        bdrv_drained_begin(bs)
        bdrv_drained_begin(bs)
        assert bs.quiesce_counter == 2
        bdrv_drained_end(bs)
        fut = submit_write(blk, ctx, 0, b"n" * 512)
        time.sleep(0.1)
        assert not fut.done()  # still inside the outer section
        bdrv_drained_end(bs)
        assert fut.result(timeout=10) is None
    assert blk.pread(0, 512) == b"n" * 512


def test_drained_end_without_begin_is_refused(env: Env) -> None:
    blk = env.open(env.mem(), 65536)
    with pytest.raises(AssertionError):
        bdrv_drained_end(blk.bs)


def test_drain_propagates_to_parents(env: Env) -> None:
    base = env.open(env.mem(), 65536)
    base.pwrite(0, b"b" * 65536)
    cow = env.cow()
    top_bs = env.node(cow, 65536, backing=base.bs)
    top = env.attach(top_bs)
    with in_iothread(top_bs) as ctx:
        bdrv_drained_begin(base.bs)  # draining the backing node quiesces the top's users
        try:
            assert top_bs.quiesce_counter == 1
            fut = asyncio.run_coroutine_threadsafe(top.co_pwritev(0, 512, b"t" * 512), ctx.loop)
            time.sleep(0.1)
            assert not fut.done()
        finally:
            bdrv_drained_end(base.bs)
        assert fut.result(timeout=10) is None
        assert top_bs.quiesce_counter == 0
    assert top.pread(0, 1024) == b"t" * 512 + b"b" * 512


def test_driver_drain_hooks_called_once_per_outermost_section(env: Env) -> None:
    class Hooked(MemoryDriver):
        begins = ends = 0

        @hookimpl
        def bdrv_drain_begin(self, bs: Any) -> None:
            self.begins += 1

        @hookimpl
        def bdrv_drain_end(self, bs: Any) -> None:
            self.ends += 1

    drv = env.add(Hooked(unique("iodh")))
    blk = env.open(drv, 65536)
    bdrv_drained_begin(blk.bs)
    bdrv_drained_begin(blk.bs)
    bdrv_drained_end(blk.bs)
    assert (drv.begins, drv.ends) == (1, 0)
    bdrv_drained_end(blk.bs)
    assert (drv.begins, drv.ends) == (1, 1)
    bdrv_drain(blk.bs)
    assert (drv.begins, drv.ends) == (2, 2)
    assert blk.bs.quiesce_counter == 0


def test_drain_waits_for_manual_in_flight_count(env: Env) -> None:
    blk = env.open(env.mem(), 65536)
    bs = blk.bs
    bdrv_inc_in_flight(bs)
    timer = threading.Timer(0.2, bdrv_dec_in_flight, args=(bs,))
    t0 = time.monotonic()
    timer.start()
    bdrv_drained_begin(bs)
    elapsed = time.monotonic() - t0
    bdrv_drained_end(bs)
    timer.join()
    assert elapsed >= 0.15
    assert bs.in_flight == 0


def test_quiesce_without_polling_and_single_parent(env: Env) -> None:
    blk = env.open(env.mem(), 65536)
    bs = blk.bs
    bdrv_do_drained_begin_quiesce(bs, None)
    assert bs.quiesce_counter == 1 and blk.quiesce_counter == 1
    bdrv_drained_end(bs)
    assert blk.quiesce_counter == 0
    (edge,) = bs.parents
    bdrv_parent_drained_begin_single(edge)
    assert blk.quiesce_counter == 1 and edge.quiesced
    assert not bdrv_parent_drained_poll_single(edge)
    bdrv_parent_drained_end_single(edge)
    bdrv_parent_drained_end_single(edge)  # a second end on an unquiesced edge does nothing
    assert blk.quiesce_counter == 0


def test_drain_in_main_context_runs_nothing_new(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 65536)
    bdrv_drain(blk.bs)
    assert not bdrv_drain_poll(blk.bs, None, False)
    blk.pwrite(0, b"x")
    assert blk.pread(0, 1) == b"x"


# Regression test (core bug found by this suite, fixed in aeb6657): a request queued by
# BlockBackend._start while the root is drained keeps blk.in_flight raised, so bdrv_drain_poll
# reports the drained node busy (QEMU's blk_wait_while_drained drops in_flight while queued)
def test_queued_request_does_not_make_drained_node_busy(env: Env) -> None:
    blk = env.open(env.mem(), 65536)
    bs = blk.bs
    with in_iothread(bs) as ctx:
        bdrv_drained_begin(bs)
        try:
            fut = submit_write(blk, ctx, 0, b"q" * 512)
            time.sleep(0.1)
            busy = bdrv_drain_poll(bs, None, False)
        finally:
            bdrv_drained_end(bs)
        fut.result(timeout=10)
    assert not busy


PROLOGUE = """
import asyncio, sys, threading, time
sys.path.insert(0, {tests!r})
from iotest_drivers import Env
from blockcore import IOThread, main_context
from blockcore.graph import bdrv_try_change_aio_context
from blockcore.drain import bdrv_drained_begin, bdrv_drained_end
env = Env()
"""


def run_script(body: str, timeout: float = 8) -> tuple[bool, str]:
    """Run a drain scenario in a child interpreter; (finished in time, output)."""
    script = PROLOGUE.format(tests=str(TESTS)) + textwrap.dedent(body)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, "timed out"
    return proc.returncode == 0, proc.stdout + proc.stderr


# Regression test (core bug found by this suite, fixed in aeb6657): a request submitted while
# bdrv_drained_begin polls is queued by BlockBackend._start but still counts in blk.in_flight, so
# the drain never completes (QEMU's blk_wait_while_drained drops in_flight while queued)
def test_request_submitted_while_draining_waits_for_drained_end() -> None:
    ok, out = run_script("""
        blk = env.open(env.mem(delay=0.3), 65536)
        bs = blk.bs
        thread = IOThread("late")
        ctx = thread.start()
        bdrv_try_change_aio_context(bs, ctx)
        first = asyncio.run_coroutine_threadsafe(blk.co_pwritev(0, 512, b"a" * 512), ctx.loop)
        while not env.drivers[0].calls:
            time.sleep(0.001)
        late = []
        def submit_later():
            time.sleep(0.1)  # while the main thread polls in bdrv_drained_begin
            late.append(asyncio.run_coroutine_threadsafe(
                blk.co_pwritev(512, 512, b"b" * 512), ctx.loop))
        helper = threading.Thread(target=submit_later)
        helper.start()
        bdrv_drained_begin(bs)  # returns once the first write is done
        assert first.done() and bs.in_flight == 0
        helper.join()
        time.sleep(0.05)
        assert not late[0].done()
        bdrv_drained_end(bs)
        late[0].result(timeout=10)
        bdrv_try_change_aio_context(bs, main_context())
        thread.stop()
        assert blk.pread(0, 1024) == b"a" * 512 + b"b" * 512
        env.close()
        print("done")
    """)
    assert ok, out
    assert out.strip() == "done"


# Regression test (core bug found by this suite, fixed in aeb6657): nested bdrv_drained_begin (or
# any drain) while a request is queued behind the drained section polls forever, because the
# queued request still counts in blk.in_flight (backend.BlockBackend._start)
def test_nested_drain_with_queued_request_does_not_hang() -> None:
    ok, out = run_script("""
        blk = env.open(env.mem(), 65536)
        bs = blk.bs
        thread = IOThread("nested")
        ctx = thread.start()
        bdrv_try_change_aio_context(bs, ctx)
        bdrv_drained_begin(bs)
        fut = asyncio.run_coroutine_threadsafe(blk.co_pwritev(0, 512, b"q" * 512), ctx.loop)
        time.sleep(0.1)
        bdrv_drained_begin(bs)  # nested: must not wait for the queued request
        bdrv_drained_end(bs)
        bdrv_drained_end(bs)
        fut.result(timeout=10)
        bdrv_try_change_aio_context(bs, main_context())
        thread.stop()
        env.close()
        print("done")
    """)
    assert ok, out
    assert out.strip() == "done"


def test_script_harness_runs_a_passing_drain_scenario() -> None:
    ok, out = run_script("""
        blk = env.open(env.mem(delay=0.1), 65536)
        bs = blk.bs
        thread = IOThread("plain")
        ctx = thread.start()
        bdrv_try_change_aio_context(bs, ctx)
        fut = asyncio.run_coroutine_threadsafe(blk.co_pwritev(0, 512, b"p" * 512), ctx.loop)
        while not env.drivers[0].calls:
            time.sleep(0.001)
        bdrv_drained_begin(bs)
        assert fut.done()
        bdrv_drained_end(bs)
        bdrv_try_change_aio_context(bs, main_context())
        thread.stop()
        env.close()
        print("done")
    """)
    assert ok, out
    assert out.strip() == "done"

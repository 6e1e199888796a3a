"""API tiers: every seed function exists with its tier, and calls from the wrong place raise."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import blockcore
from blockcore import BlockBackend, OpenFlags, TierViolation, tiers
from blockcore.drain import bdrv_drained_begin
from blockcore.io import bdrv_co_preadv, bdrv_pread

# the seed as laid beside the project (../shared), else the copy kept with the tests
_SHARED_SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "block-io.h.txt"
SEED = _SHARED_SEED if _SHARED_SEED.exists() else Path(__file__).parent / "data" / "block-io.h.txt"


def _seed_functions() -> dict[str, str]:
    lines = SEED.read_text().splitlines()
    split = next(i for i, line in enumerate(lines) if '"I/O or GS" API functions' in line)

    def names(chunk: list[str]) -> set[str]:
        text = " ".join(re.sub(r"^\d+ ", "", line) for line in chunk)
        return set(re.findall(r"\b((?:bdrv|qemu|child_of_bds|BDRV|BLKDBG|AIO)_\w+)\s*\(", text))

    io_names, io_or_gs = names(lines[:split]), names(lines[split:])
    expected = {name: "I/O or GS" for name in io_or_gs}
    expected.update({name: "I/O" for name in io_names})  # macros reuse I/O names below
    return expected


def test_every_seed_function_exists_with_its_tier() -> None:
    expected = _seed_functions()
    assert len(expected) > 90
    missing = sorted(n for n in expected if n not in tiers.API)
    assert missing == []
    wrong = {n: (tiers.API[n].value, t) for n, t in expected.items() if tiers.API[n].value != t}
    assert wrong == {}
    for name in expected:
        found = [m for m in vars(blockcore).values() if hasattr(m, name)]
        assert found, f"{name} is not reachable from a blockcore module"


def test_python_m_blockcore_tiers_lists_every_function() -> None:
    out = subprocess.run([sys.executable, "-m", "blockcore.tiers"], capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    listed = dict(line.rsplit(" ", 1) if not line.endswith("or GS") else
                  (line[: -len(" I/O or GS")], "I/O or GS") for line in out)  # fmt: skip
    assert listed["bdrv_pread"] == "I/O"
    assert listed["bdrv_drained_begin"] == "I/O or GS"
    assert listed["bdrv_open"] == "GS"
    assert listed["round_up"] == "common"
    assert len(listed) > 150
    assert all(tiers.API[name].value == tier for name, tier in listed.items())


def test_gs_function_from_coroutine_raises() -> None:
    async def inside() -> None:
        blockcore.bdrv_open(None, {"driver": "nope"})

    with pytest.raises(TierViolation, match=r"bdrv_open is a 'GS' function .* coroutine"):
        blockcore.run(inside())


def test_gs_function_from_other_thread_raises() -> None:
    caught: list[BaseException] = []

    def worker() -> None:
        try:
            blockcore.bdrv_open(None, {"driver": "nope"})
        except BaseException as exc:  # noqa: BLE001
            caught.append(exc)

    t = threading.Thread(target=worker, name="worker-7")
    t.start()
    t.join()
    assert isinstance(caught[0], TierViolation)
    assert "worker-7" in str(caught[0])


def test_io_or_gs_from_coroutine_raises(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        async def inside() -> None:
            bdrv_drained_begin(blk.bs)

        with pytest.raises(TierViolation, match="bdrv_drained_begin is a 'I/O or GS'"):
            blockcore.run(inside())


def test_io_or_gs_from_foreign_thread_raises(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        caught: list[BaseException] = []

        def worker() -> None:
            try:
                bdrv_drained_begin(blk.bs)
            except BaseException as exc:  # noqa: BLE001
                caught.append(exc)

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert isinstance(caught[0], TierViolation)
        assert "home thread" in str(caught[0])


def test_io_coroutine_on_wrong_loop_raises(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        buf = bytearray(512)

        async def elsewhere() -> None:
            await bdrv_co_preadv(blk.root, 0, 512, buf)

        with pytest.raises(TierViolation, match="bdrv_co_preadv is a 'I/O' function.*bdrv_co_enter"):
            asyncio.run(elsewhere())  # a loop that is not the node's AioContext


def test_sync_wrapper_inside_coroutine_returns_awaitable_or_refuses(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"x" * 512)
        buf = bytearray(512)

        async def mixed() -> None:
            from blockcore.aio import bdrv_graph_co_rdlock

            async with bdrv_graph_co_rdlock():
                await bdrv_pread(blk.root, 0, 512, buf)  # mixed wrapper: awaitable here

        blockcore.run(mixed())
        assert bytes(buf) == b"x" * 512

        from blockcore.info import bdrv_get_allocated_file_size

        async def plain() -> None:
            bdrv_get_allocated_file_size(blk.bs)  # co_wrapper: would poll inside the loop

        with pytest.raises(TierViolation, match="cannot run inside"):
            blockcore.run(plain())


def test_graph_rdlock_required_inside_coroutines(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        buf = bytearray(512)

        async def unlocked() -> None:
            await bdrv_co_preadv(blk.root, 0, 512, buf)

        with pytest.raises(TierViolation, match="GRAPH_RDLOCK"):
            blockcore.run(unlocked())


def test_checks_survive_python_O() -> None:
    code = ("import blockcore, asyncio\n"
            "async def f():\n    blockcore.bdrv_open(None, {'driver': 'x'})\n"
            "try:\n    blockcore.run(f())\nexcept blockcore.TierViolation:\n    print('raised')\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "raised", out.stderr


def test_running_loop_marker_follows_the_context_loops() -> None:
    """tiers.running.loop (the cheap context check of the request path) is the AioContext
    loop running in this thread, and None outside it, also after a loop stops."""
    from blockcore.aio import IOThread, main_context
    from blockcore.tiers import running

    async def here() -> object:
        return running.loop

    assert running.loop is None
    assert blockcore.run(here()) is main_context().loop
    assert running.loop is None
    with IOThread("marker") as ctx:
        seen = asyncio.run_coroutine_threadsafe(here(), ctx.loop).result(timeout=10)
    assert seen is ctx.loop
    assert asyncio.run(here()) is None  # a foreign loop is not an AioContext


def test_backend_request_on_a_foreign_loop_raises(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:

        async def elsewhere() -> None:
            await blk.co_preadv(0, 512, bytearray(512))

        with pytest.raises(TierViolation, match="bdrv_co_preadv is a 'I/O' function"):
            asyncio.run(elsewhere())

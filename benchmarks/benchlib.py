"""What the benchmark scripts share: one ``qemu-img bench`` run, the same workload through
a BlockBackend, and alternating rounds of the two (the scripts import this from their
directory, which Python puts first on ``sys.path``)."""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import time
from collections.abc import Callable

import blockcore
from blockcore import BlockBackend, OpenFlags
from blockcore.util import aligned_buffer


def qemu_bench(fmt: str, path: str, bs: int, depth: int, count: int, write: bool,
               aio: str) -> float:  # fmt: skip
    """Seconds ``qemu-img bench`` reports for ``count`` requests of ``bs`` bytes at
    ``depth`` (sequential offsets, page cache on; ``aio`` threads, native or io_uring)."""
    argv = ["qemu-img", "bench", "-f", fmt, "-t", "writeback", "-c", str(count), "-d",
            str(depth), "-s", str(bs)]  # fmt: skip
    if write:
        argv.append("-w")
    if aio != "threads":
        argv += ["-i", aio]
    res = subprocess.run([*argv, path], capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img output: {res.stdout!r} {res.stderr!r}")
    return float(m.group(1))


async def _requests(blk: BlockBackend, size: int, bs: int, depth: int, count: int,
                    write: bool) -> float:  # fmt: skip
    op = blk.co_pwritev if write else blk.co_preadv
    nxt = 0

    async def worker(buf: memoryview) -> None:
        nonlocal nxt
        while nxt < count:
            offset = nxt * bs % size
            nxt += 1
            await op(offset, bs, buf)

    bufs = [aligned_buffer(bs) for _ in range(depth)]
    for b in bufs:
        b[:] = b"\x5a" * bs  # what qemu-img bench -w writes
    start = time.perf_counter()
    await asyncio.gather(*(worker(b) for b in bufs))
    return time.perf_counter() - start


def ours_bench(driver: str, path: str, bs: int, depth: int, count: int, write: bool) -> float:
    """The same workload as :func:`qemu_bench` through a BlockBackend: ``depth`` coroutines
    take the next offset in turn."""
    with BlockBackend.open(path, {"driver": driver}, OpenFlags.RDWR) as blk:
        size = blk.getlength() // bs * bs
        return blockcore.run(_requests(blk, size, bs, depth, count, write))


def alternate(rounds: int, qemu: Callable[[], float], ours: Callable[[], float]
              ) -> tuple[float, float]:  # fmt: skip
    """Median seconds of each side over ``rounds``, taking turns at going first."""
    qt: list[float] = []
    ot: list[float] = []
    for r in range(rounds):
        for side in ("qemu", "ours") if r % 2 == 0 else ("ours", "qemu"):
            (qt if side == "qemu" else ot).append(qemu() if side == "qemu" else ours())
    return statistics.median(qt), statistics.median(ot)

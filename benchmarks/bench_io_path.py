"""What the request path costs: aligned 4 KiB and 1 MiB reads and writes through blockcore
vs awaiting the driver's coroutine directly.

An in-memory driver (blockcore.testing.MemoryDriver, request_alignment 512, no max_transfer,
PARALLEL) serves every request; its call log is disabled so it costs the same in all modes.
Three ways of issuing the same request, on the main context, one at a time (queue depth 1):

- ``driver``: ``await drv.bdrv_co_preadv(bs, off, len, buf, 0)`` (the baseline);
- ``node``:   ``await io.bdrv_co_preadv(child, off, len, buf)`` under the graph read lock
  (checks, in-flight counting, tracked request, alignment, max_transfer, write finish);
- ``backend``: ``await blk.co_preadv(off, len, buf)`` (adds the drain gate, the backend's
  EOF check and taking the graph read lock per request).

Rounds of the three modes alternate and the median per-request time is reported, with the
time the path adds and the ratio to the driver call.

Usage: python benchmarks/bench_io_path.py [--rounds N] [--scale F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import blockcore
from blockcore import BlockBackend, OpenFlags, io
from blockcore.aio import bdrv_graph_co_rdlock
from blockcore.testing import MemoryDriver
from blockcore.util import aligned_buffer

KiB, MiB = 1024, 1 << 20


class _NoLog(list):  # type: ignore[type-arg]
    def append(self, _item: object) -> None:
        pass


async def _time(fn: Callable[[int], Awaitable[None]], count: int) -> float:
    """Seconds per call of ``fn(i)`` over ``count`` calls."""
    start = time.perf_counter()
    for i in range(count):
        await fn(i)
    return (time.perf_counter() - start) / count


def bench(size: int, op: str, count: int, rounds: int) -> dict[str, float]:
    name = f"benchio{size}{op}"
    drv = MemoryDriver(name, request_alignment=512).register()
    slots = 64
    blk = BlockBackend.open(None, {"driver": name, "size": slots * size}, OpenFlags.RDWR)
    try:
        drv.calls = _NoLog()
        bs, child = blk.bs, blk.root
        buf = aligned_buffer(size)
        buf[:] = b"\x5a" * size  # non-zero data
        hook = drv.bdrv_co_preadv if op == "read" else drv.bdrv_co_pwritev
        node_fn = io.bdrv_co_preadv if op == "read" else io.bdrv_co_pwritev
        blk_fn = blk.co_preadv if op == "read" else blk.co_pwritev

        async def driver(i: int) -> None:
            await hook(bs, (i % slots) * size, size, buf, 0)

        async def node(i: int) -> None:
            await node_fn(child, (i % slots) * size, size, buf)

        async def backend(i: int) -> None:
            await blk_fn((i % slots) * size, size, buf)

        async def main() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {"driver": [], "node": [], "backend": []}
            for i in range(slots):  # allocate/touch the image first
                await blk.co_pwritev(i * size, size, buf)
            await _time(driver, max(count // 10, 10))  # warm-up
            for _ in range(rounds):
                out["driver"].append(await _time(driver, count))
                async with bdrv_graph_co_rdlock():
                    out["node"].append(await _time(node, count))
                out["backend"].append(await _time(backend, count))
            return out

        samples = blockcore.run(main())
    finally:
        blk.close()
        drv.unregister()
    return {mode: statistics.median(values) * 1e6 for mode, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (median)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    args = parser.parse_args()
    cases = [(4 * KiB, 20_000), (MiB, 400)]
    print(f"python {sys.version.split()[0]}, tier checks "
          f"{'on' if blockcore.tiers.checks_enabled else 'off'}, {args.rounds} rounds, median")
    header = (f"{'request':<12}{'driver us':>10}{'node us':>10}{'+us':>8}{'ratio':>7}"
              f"{'backend us':>12}{'+us':>8}{'ratio':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for size, count in cases:
        for op in ("read", "write"):
            r = bench(size, op, max(int(count * args.scale), 10), args.rounds)
            d, n, b = r["driver"], r["node"], r["backend"]
            label = f"{size // KiB} KiB {op}" if size < MiB else f"{size // MiB} MiB {op}"
            print(f"{label:<12}{d:>10.2f}{n:>10.2f}{n - d:>8.2f}{n / d:>7.2f}"
                  f"{b:>12.2f}{b - d:>8.2f}{b / d:>7.2f}")


if __name__ == "__main__":
    main()

"""Per-request cost of the core: 4 KiB reads through the whole public path vs the driver.

Runs an in-memory driver (blockcore.testing.MemoryDriver) and measures, on one core:
- direct: awaiting the driver's bdrv_co_preadv coroutine directly;
- node path: ``await io.bdrv_co_preadv(child, ...)`` under the graph read lock;
- public path: ``await blk.co_preadv(...)`` (BlockBackend: drain gate, graph lock, checks);
- the same public path with tier checks off (BLOCKCORE_TIER_CHECKS=0 in a subprocess).

Usage: python benchmarks/bench_core.py [--seconds S]. Target: >= 150,000 reads/s public path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import blockcore
from blockcore import BlockBackend, OpenFlags
from blockcore.aio import bdrv_graph_co_rdlock
from blockcore.io import bdrv_co_preadv
from blockcore.testing import MemoryDriver

N_BLOCKS = 256
BS = 4096


async def _rate(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for i in range(1000):
            await fn(i)
        n += 1000
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def measure(seconds: float) -> dict[str, float]:
    drv = MemoryDriver("benchmem").register()
    blk = BlockBackend.open(None, {"driver": "benchmem", "size": N_BLOCKS * BS}, OpenFlags.RDWR)
    buf = memoryview(bytearray(BS))
    bs, root = blk.bs, blk.root
    impl = drv.bdrv_co_preadv
    drv.calls = _Discard()

    async def direct(i: int) -> None:
        await impl(bs, (i % N_BLOCKS) * BS, BS, buf, 0)

    async def node(i: int) -> None:
        await bdrv_co_preadv(root, (i % N_BLOCKS) * BS, BS, buf)

    async def public(i: int) -> None:
        await blk.co_preadv((i % N_BLOCKS) * BS, BS, buf)

    async def run_all() -> dict[str, float]:
        out = {"direct": await _rate(direct, seconds)}
        async with bdrv_graph_co_rdlock():
            out["node"] = await _rate(node, seconds)
        out["public"] = await _rate(public, seconds)
        return out

    result = blockcore.run(run_all())
    blk.close()
    return result


class _Discard(list):
    def append(self, _item: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--raw", action="store_true", help="print one line of numbers")
    args = parser.parse_args()
    r = measure(args.seconds)
    if args.raw:
        print(r["public"])
        return
    env = dict(os.environ, BLOCKCORE_TIER_CHECKS="0")
    off = float(subprocess.run([sys.executable, __file__, "--raw", "--seconds", str(args.seconds)],
                               env=env, capture_output=True, text=True, check=True).stdout)
    print(f"direct driver coroutine : {r['direct']:>10,.0f} reads/s")
    print(f"node path (io.bdrv_co_preadv): {r['node']:>10,.0f} reads/s")
    print(f"public path (BlockBackend)   : {r['public']:>10,.0f} reads/s  (target >= 150,000)")
    print(f"public path, tier checks off : {off:>10,.0f} reads/s")
    print(f"ratio public/direct          : {r['public'] / r['direct']:.2f}")
    per_call_on = 1e6 / r["public"]
    per_call_off = 1e6 / off
    print(f"per request: {per_call_on:.2f} us with checks, {per_call_off:.2f} us without "
          f"(checks cost {per_call_on - per_call_off:+.2f} us)")


if __name__ == "__main__":
    main()

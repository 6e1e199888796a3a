"""blockcore's raw-over-file stack against ``qemu-img bench`` on the same page-cached raw file.

Both run in one invocation, alternating (the order flips every round), and the script prints
the median run times and their ratio, qemu-img's time / ours (above 1: we are faster):

- sequential 1 MiB reads and writes at depth 16 (target >= 0.8);
- 4 KiB reads at depth 1 and 32, sequential like qemu-img bench's default step (target >= 1.0);
- each against qemu-img's default thread pool and against ``-i io_uring``.

Ours: ``BlockBackend.open(img, {"driver": "raw"}, RDWR)`` (raw over file, as qemu-img's
``-f raw``), ``depth`` coroutines each issuing the next request, page-aligned buffers;
qemu-img: ``qemu-img bench -f raw -t writeback -c N -d D -s S [-w] [-i io_uring]``, timed by
its own "Run completed in" line. Neither time includes opening the image. Not a test: the
numbers swing with the machine's load, so read the ratios of one run.

Usage: python benchmarks/bench_raw.py [--dir /tmp] [--size 256M] [--rounds 5] [--quick]
       python benchmarks/bench_raw.py --profile read4k-d1   # where our time goes
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
from functools import partial

import benchlib

from blockcore.util import parse_size

# name, block size, depth, requests, write
WORKLOADS = [
    ("read1M-d16", 1 << 20, 16, 2048, False),
    ("write1M-d16", 1 << 20, 16, 2048, True),
    ("read4k-d1", 4096, 1, 50_000, False),
    ("read4k-d32", 4096, 32, 100_000, False),
]


def make_image(directory: str, size: int) -> str:
    """A raw file of ``size`` bytes of non-zero data, read once so it sits in the page cache."""
    fd, path = tempfile.mkstemp(prefix="bench_raw-", suffix=".img", dir=directory)
    chunk = os.urandom(1 << 20)
    with os.fdopen(fd, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return path


def run_qemu(path: str, bs: int, depth: int, count: int, write: bool, aio: str) -> float:
    return benchlib.qemu_bench("raw", path, bs, depth, count, write, aio)


def run_ours(path: str, bs: int, depth: int, count: int, write: bool) -> float:
    return benchlib.ours_bench("raw", path, bs, depth, count, write)


def compare(path: str, rounds: int, aios: list[str], scale: float) -> None:
    print(f"{'workload':<14} {'qemu aio':<9} {'qemu s':>8} {'ours s':>8} {'qemu/s':>9} "
          f"{'ours/s':>9} {'ratio':>6}")  # fmt: skip
    print(f"(median of {rounds} alternating runs; ratio = qemu-img's time / ours)")
    for name, bs, depth, count, write in WORKLOADS:
        count = max(depth, int(count * scale))
        run_ours(path, bs, depth, max(depth, count // 10), write)  # warm-up
        for aio in aios:
            q, o = benchlib.alternate(rounds, partial(run_qemu, path, bs, depth, count, write, aio),
                                      partial(run_ours, path, bs, depth, count, write))
            print(f"{name:<14} {aio:<9} {q:8.3f} {o:8.3f} {count / q:9.0f} {count / o:9.0f} "
                  f"{q / o:6.2f}", flush=True)  # fmt: skip


def profile(path: str, workload: str) -> None:
    for name, bs, depth, count, write in WORKLOADS:
        if name == workload:
            cProfile.runctx("run_ours(path, bs, depth, count, write)", globals(),
                            {"path": path, "bs": bs, "depth": depth, "count": count,
                             "write": write}, "/tmp/bench_raw.prof")  # fmt: skip
            pstats.Stats("/tmp/bench_raw.prof").sort_stats("tottime").print_stats(20)
            return
    sys.exit(f"unknown workload {workload!r}; one of {[w[0] for w in WORKLOADS]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the image goes")
    parser.add_argument("--size", default="256M", help="image size (default 256M)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer requests, 3 rounds")
    parser.add_argument("--no-io-uring", action="store_true")
    parser.add_argument("--profile", metavar="WORKLOAD", help="profile our side of one workload")
    args = parser.parse_args()
    path = make_image(args.dir, parse_size(args.size))
    try:
        if args.profile:
            profile(path, args.profile)
            return
        aios = ["threads"] + ([] if args.no_io_uring else ["io_uring"])
        rounds = 3 if args.quick else args.rounds
        print(f"image {path} ({args.size}), Python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        compare(path, rounds, aios, 0.25 if args.quick else 1.0)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()

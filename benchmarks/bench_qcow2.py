"""blockcore's qcow2 driver against ``qemu-img bench`` and ``qemu-img convert`` on the same
page-cached images.

Both sides run in one invocation, alternating (the order flips every round); the script
prints median times and the ratio qemu-img's time / ours (above 1: we are faster):

- sequential 1 MiB reads and writes (overwrites) of a fully allocated qcow2 image with
  64 KiB clusters, depth 16; 4 KiB reads at depth 1 and 32 (sequential, qemu-img bench's
  default step); each against qemu-img's thread pool and ``-i io_uring`` (target >= 0.7);
- ``convert`` raw -> qcow2 and qcow2 -> raw (target >= 0.7);
- compressed ``convert -c`` to qcow2 with zlib and with zstd (target >= 1.5), of data that
  compresses to about half.

Ours: the bench workloads through ``BlockBackend`` (``depth`` coroutines, page-aligned
buffers), converts through ``blockcore.img.main(["convert", ...])`` in this process (the
``blockcore-img`` CLI without interpreter start-up). ``convert -c`` is also run as
``api-convert-c``: the same copy through the public API with 8 requests in flight (what
qemu-img's ``-m 8`` coroutines do), since blockcore-img convert issues one request at a
time. qemu-img: ``qemu-img bench -f qcow2 -t writeback ...`` timed by its "Run completed in"
line, ``qemu-img convert`` by wall clock. Not a test: read the ratios of one run.

Usage: python benchmarks/bench_qcow2.py [--dir /tmp] [--size 256M] [--rounds 5] [--quick]
       python benchmarks/bench_qcow2.py --only read4k-d1,convert-c-zstd
       python benchmarks/bench_qcow2.py --profile read4k-d1   # cProfile of our side
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import benchlib

import blockcore
from blockcore import BdrvRequestFlags, BlockBackend, OpenFlags
from blockcore.img import main as img_main
from blockcore.util import aligned_buffer, parse_size

MiB = 1 << 20
# name, block size, depth, requests, write
BENCH = [
    ("read1M-d16", MiB, 16, 2048, False),
    ("write1M-d16", MiB, 16, 2048, True),
    ("read4k-d1", 4096, 1, 50_000, False),
    ("read4k-d32", 4096, 32, 100_000, False),
]
CONVERTS = ["convert-raw-qcow2", "convert-qcow2-raw", "convert-c-zlib", "convert-c-zstd",
            "api-convert-c-zlib", "api-convert-c-zstd"]  # fmt: skip


class Images:
    """The page-cached inputs: a raw source, the same data as qcow2 (64 KiB clusters), and a
    smaller half-compressible raw source for compressed converts."""

    def __init__(self, directory: str, size: int, csize: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench_qcow2-", dir=directory)
        self.raw = os.path.join(self.dir, "src.raw")
        self.qcow2 = os.path.join(self.dir, "img.qcow2")
        self.craw = os.path.join(self.dir, "csrc.raw")
        self.out = os.path.join(self.dir, "out")
        _write(self.raw, size, lambda: os.urandom(MiB))
        table = bytes.maketrans(bytes(range(256)), b"abcdefghijklmnop" * 16)
        _write(self.craw, csize, lambda: os.urandom(MiB).translate(table))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                        "cluster_size=64k", self.raw, self.qcow2], check=True)  # fmt: skip
        for path in (self.raw, self.qcow2, self.craw):
            _warm(path)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write(path: str, size: int, chunk: Callable[[], bytes]) -> None:
    with open(path, "wb") as f:
        f.writelines(chunk() for _ in range(size // MiB))


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(MiB):
            pass


# -------------------------------------------------------------------------------------------
# bench workloads
# -------------------------------------------------------------------------------------------


def qemu_bench(path: str, bs: int, depth: int, count: int, write: bool, aio: str) -> float:
    return benchlib.qemu_bench("qcow2", path, bs, depth, count, write, aio)


def ours_bench(path: str, bs: int, depth: int, count: int, write: bool) -> float:
    return benchlib.ours_bench("qcow2", path, bs, depth, count, write)


# -------------------------------------------------------------------------------------------
# converts
# -------------------------------------------------------------------------------------------


def _convert_args(img: Images, name: str) -> list[str]:
    if name == "convert-raw-qcow2":
        return ["-f", "raw", "-O", "qcow2", img.raw, img.out]
    if name == "convert-qcow2-raw":
        return ["-f", "qcow2", "-O", "raw", img.qcow2, img.out]
    ctype = name.rsplit("-", 1)[1]
    return ["-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", img.craw,
            img.out]  # fmt: skip


def qemu_convert(img: Images, name: str) -> float:
    _unlink(img.out)
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", *_convert_args(img, name)], check=True)
    return time.perf_counter() - start


def ours_convert(img: Images, name: str) -> float:
    _unlink(img.out)
    if name.startswith("api-"):
        return _api_convert_c(img, name.rsplit("-", 1)[1])
    start = time.perf_counter()
    rc = img_main(["blockcore-img", "convert", *_convert_args(img, name)])
    elapsed = time.perf_counter() - start
    if rc:
        raise RuntimeError(f"blockcore-img convert {name} exited {rc}")
    return elapsed


def _api_convert_c(img: Images, ctype: str) -> float:
    """Compressed copy through the public API: read 8 clusters, write them compressed, with
    8 requests in flight (qemu-img convert's default coroutine count), then flush."""
    start = time.perf_counter()
    size = os.path.getsize(img.craw)
    blockcore.bdrv_create("qcow2", img.out, {"size": size, "compression_type": ctype})
    chunk = 8 * 65536
    with BlockBackend.open(img.craw, {"driver": "raw"}) as src, \
            BlockBackend.open(img.out, {"driver": "qcow2"}, OpenFlags.RDWR) as dst:  # fmt: skip

        async def copy() -> None:
            nxt = 0

            async def worker() -> None:
                nonlocal nxt
                buf = aligned_buffer(chunk)
                while nxt < size:
                    off = nxt
                    nxt += chunk
                    n = min(chunk, size - off)
                    await src.co_preadv(off, n, buf[:n])
                    await dst.co_pwritev(off, n, buf[:n], BdrvRequestFlags.WRITE_COMPRESSED)

            await asyncio.gather(*(worker() for _ in range(8)))
            await dst.co_flush()

        blockcore.run(copy())
    return time.perf_counter() - start


def _unlink(path: str) -> None:
    """Remove an old output, then sync: a new file written right after a large one is
    deleted sometimes crawls while ext4 frees the old blocks (for every program)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    os.sync()


# -------------------------------------------------------------------------------------------
# driver
# -------------------------------------------------------------------------------------------


def compare(img: Images, rounds: int, aios: list[str], scale: float, only: set[str]) -> None:
    print(f"{'workload':<20} {'qemu aio':<9} {'qemu s':>8} {'ours s':>8} {'qemu MB/s':>10} "
          f"{'ours MB/s':>10} {'ratio':>6}")  # fmt: skip
    print(f"(median of {rounds} alternating runs; ratio = qemu-img's time / ours)")
    for name, bs, depth, count, write in BENCH:
        if only and name not in only:
            continue
        count = max(depth, int(count * scale))
        mb = count * bs / 1e6
        ours_bench(img.qcow2, bs, depth, max(depth, count // 10), write)  # warm-up
        for aio in aios:
            q, o = benchlib.alternate(rounds,
                              partial(qemu_bench, img.qcow2, bs, depth, count, write, aio),
                              partial(ours_bench, img.qcow2, bs, depth, count, write))
            print(f"{name:<20} {aio:<9} {q:8.3f} {o:8.3f} {mb / q:10.0f} {mb / o:10.0f} "
                  f"{q / o:6.2f}", flush=True)  # fmt: skip
    for name in CONVERTS:
        if only and name not in only:
            continue
        qname = name.removeprefix("api-")
        src = img.qcow2 if name == "convert-qcow2-raw" else img.craw if "-c-" in name \
            else img.raw  # fmt: skip
        mb = os.path.getsize(img.raw if src == img.qcow2 else src) / 1e6
        q, o = benchlib.alternate(rounds, partial(qemu_convert, img, qname),
                          partial(ours_convert, img, name))  # fmt: skip
        print(f"{name:<20} {'-m 8':<9} {q:8.3f} {o:8.3f} {mb / q:10.0f} {mb / o:10.0f} "
              f"{q / o:6.2f}", flush=True)  # fmt: skip
    _unlink(img.out)


def profile(img: Images, workload: str, scale: float) -> None:
    for name, bs, depth, count, write in BENCH:
        if name == workload:
            stmt = "ours_bench(path, bs, depth, count, write)"
            env = {"ours_bench": ours_bench, "path": img.qcow2, "bs": bs, "depth": depth,
                   "count": max(depth, int(count * scale)), "write": write}  # fmt: skip
            break
    else:
        if workload not in CONVERTS:
            sys.exit(f"unknown workload {workload!r}")
        stmt, env = "ours_convert(img, name)", {"ours_convert": ours_convert, "img": img,
                                                 "name": workload}  # fmt: skip
    cProfile.runctx(stmt, env, env, "/tmp/bench_qcow2.prof")
    pstats.Stats("/tmp/bench_qcow2.prof").sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the images go")
    parser.add_argument("--size", default="256M", help="bench/convert image size (256M)")
    parser.add_argument("--csize", default="64M", help="compressed convert source (64M)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer requests, 3 rounds")
    parser.add_argument("--no-io-uring", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated workload names")
    parser.add_argument("--profile", metavar="WORKLOAD", help="profile our side of one")
    args = parser.parse_args()
    img = Images(args.dir, parse_size(args.size), parse_size(args.csize))
    scale = 0.25 if args.quick else 1.0
    try:
        if args.profile:
            profile(img, args.profile, scale)
            return
        print(f"images in {img.dir} ({args.size}, compressed source {args.csize}), Python "
              f"{sys.version.split()[0]}, {os.cpu_count()} CPUs")  # fmt: skip
        aios = ["threads"] + ([] if args.no_io_uring else ["io_uring"])
        only = {w for w in args.only.split(",") if w}
        compare(img, 3 if args.quick else args.rounds, aios, scale, only)
    finally:
        img.cleanup()


if __name__ == "__main__":
    main()

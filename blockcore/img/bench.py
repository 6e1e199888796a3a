"""``blockcore-img bench``: a simple read/write benchmark with a queue depth."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..cliutil import CliError, qemu_strtol
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    LongOpt,
    cvtnum,
    cvtnum_full,
    error_exit,
    getopts,
    img_open,
    out,
    parse_aio,
    parse_cache_mode,
)

__all__ = ["img_bench"]

INT_MAX = (1 << 31) - 1


def _ulong(arg: str | None, message: str, limit: int = INT_MAX) -> int:
    try:
        value = qemu_strtol(arg or "", unsigned=True)
    except (ValueError, OverflowError):
        raise CliError(message) from None
    if value > limit:
        raise CliError(message)
    return value


def img_bench(argv: list[str]) -> int:
    fmt: str | None = None
    image_opts = is_write = force_share = False
    count, depth, offset, bufsize, pattern, step = 75000, 64, 0, 4096, 0, 0
    flush_interval = 0
    drain_on_flush = True
    flags = OpenFlags.NONE
    longopts = [HELP, LongOpt("flush-interval", 1, "\x02flush-interval"), IMAGE_OPTS,
                LongOpt("pattern", 1, "\x02pattern"), LongOpt("no-drain", 0, "\x02no-drain"),
                FORCE_SHARE]  # fmt: skip
    opts, g = getopts(argv, ":hc:d:f:ni:o:qs:S:t:wU", longopts)
    for c, arg in opts:
        if c == "c":
            count = _ulong(arg, "Invalid request count specified")
        elif c == "d":
            depth = _ulong(arg, "Invalid queue depth specified")
        elif c == "f":
            fmt = arg
        elif c == "n":
            flags |= OpenFlags.NATIVE_AIO
        elif c == "i":
            try:
                flags |= parse_aio(arg or "")
            except ValueError:
                raise CliError(f"Invalid aio option: {arg}") from None
        elif c == "o":
            offset = cvtnum("offset", arg or "")
        elif c == "q":
            pass
        elif c == "s":
            bufsize = cvtnum_full("buffer size", arg or "", 0, INT_MAX)
        elif c == "S":
            step = cvtnum_full("step_size", arg or "", 0, INT_MAX)
        elif c == "t":
            try:
                cache_flags, _wt = parse_cache_mode(arg or "")
            except ValueError:
                raise CliError("Invalid cache mode") from None
            flags |= cache_flags
        elif c == "w":
            flags |= OpenFlags.RDWR
            is_write = True
        elif c == "U":
            force_share = True
        elif c == "\x02pattern":
            pattern = _ulong(arg, "Invalid pattern byte specified", 0xFF)
        elif c == "\x02flush-interval":
            flush_interval = _ulong(arg, "Invalid flush interval specified")
        elif c == "\x02no-drain":
            drain_on_flush = False
        elif c == "\x02image-opts":
            image_opts = True
    rest = g.argv[g.optind:]
    if len(rest) != 1:
        raise error_exit("Expecting one image file name")
    filename = argv[-1] if argv[-1] == rest[0] else rest[0]
    if not is_write and flush_interval:
        raise CliError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise CliError("Flush interval can't be smaller than depth")
    blk = img_open(filename, fmt, flags, image_opts=image_opts, force_share=force_share)
    try:
        from ..io import bdrv_getlength

        image_size = bdrv_getlength(blk.bs)
        step = step or bufsize
        out(f"Sending {count} {'write' if is_write else 'read'} requests, {bufsize} bytes each, "
            f"{depth} in parallel (starting at offset {offset}, step size {step})\n")
        if flush_interval:
            out(f"Sending flush every {flush_interval} requests\n")
        import sys

        sys.stdout.flush()
        from ..aio import run

        t1 = time.monotonic()
        run(_bench(blk, image_size, is_write, bufsize, step, depth, count, offset,
                   flush_interval, drain_on_flush, pattern))
        t2 = time.monotonic()
        out("Run completed in %3.3f seconds.\n" % (t2 - t1))
        return 0
    finally:
        blk.close()


async def _bench(blk: Any, image_size: int, is_write: bool, bufsize: int, step: int,
                 depth: int, count: int, offset: int, flush_interval: int,
                 drain_on_flush: bool, pattern: int) -> None:
    bufs = [bytearray([pattern]) * bufsize for _ in range(max(depth, 1))]
    free = list(range(len(bufs)))
    in_flight: set[asyncio.Task[None]] = set()
    wake = asyncio.Event()
    failure: list[BaseException] = []

    async def one(idx: int, off: int) -> None:
        try:
            if is_write:
                await blk.co_pwritev(off, bufsize, bufs[idx])
            else:
                await blk.co_preadv(off, bufsize, bufs[idx])
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)
        finally:
            free.append(idx)
            wake.set()

    submitted = 0
    while submitted < count and not failure:
        if flush_interval and submitted and submitted % flush_interval == 0:
            if drain_on_flush:
                if in_flight:
                    await asyncio.gather(*in_flight)
                await blk.co_flush()
            else:
                in_flight.add(asyncio.ensure_future(blk.co_flush()))
        while not free:
            wake.clear()
            await wake.wait()
        idx = free.pop()
        task = asyncio.ensure_future(one(idx, offset))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        submitted += 1
        offset = (offset + step) % image_size if image_size else 0
    if in_flight:
        await asyncio.gather(*in_flight, return_exceptions=True)
    if failure:
        from ..cliutil import strerror

        exc = failure[0]
        raise CliError(f"Failed request: {strerror(getattr(exc, 'errno', 5) or 5)}")

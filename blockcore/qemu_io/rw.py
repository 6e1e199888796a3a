"""qemu-io's I/O commands: read, write, readv, writev, aio_read, aio_write, aio_flush, discard.

Their options share one table (:data:`_OPTIONS`): each command passes its getopt string, as
qemu-io-cmds.c does, and gets back an :class:`IoOptions`. A parse or check that fails prints
qemu-io's line and raises :class:`_Stop`, which :func:`_command` turns into the return value.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cliutil import cvtnum, dump_buffer, io_report, strerror
from ..types import BDRV_REQUEST_MAX_BYTES, Perm
from ..types import BdrvRequestFlags as F
from .state import Command, Session, register, usage

SECTOR = 512


def out(text: str) -> None:
    sys.stdout.write(text)


def print_cvtnum_err(exc: Exception, arg: str) -> int:
    if isinstance(exc, OverflowError):
        out(f"Parsing error: argument too large -- {arg}\n")
        return -errno.ERANGE
    out(f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n")
    return -errno.EINVAL


def num(arg: str) -> int:
    """cvtnum; raises ValueError/OverflowError for print_cvtnum_err."""
    return cvtnum(arg)


def parse_pattern(arg: str) -> int:
    from ..cliutil import c_strtol_prefix

    value, rest = c_strtol_prefix(arg)
    if value < 0 or value > 255 or rest:
        out(f"{arg} is not a valid pattern byte\n")
        return -1
    return value


def _errno(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO


def _buf(length: int, pattern: int) -> bytearray:
    return bytearray([pattern]) * length


# ---------------------------------------------------------------------------- options
class _Stop(Exception):
    """End the command with ``ret``; its line is already printed."""

    def __init__(self, ret: int) -> None:
        super().__init__(ret)
        self.ret = ret


@dataclass
class IoOptions:
    """What the option letters of an I/O command set (None: not given)."""

    csv: bool = False  # -C
    quiet: bool = False  # -q
    verbose: bool = False  # -v
    vmstate: bool = False  # -b
    compress: bool = False  # -c
    zero: bool = False  # -z
    inject: bool = False  # -i (aio: print a line and do nothing)
    flags: F = F.NONE  # -f FUA, -n NO_FALLBACK, -u MAY_UNMAP
    pattern: int | None = None  # -P
    pattern_offset: int | None = None  # read -s
    pattern_count: int | None = None  # read -l
    source: str | None = None  # write -s
    args: list[str] = field(default_factory=list)
    """The operands after the options."""


def _number(arg: str) -> int:
    try:
        return num(arg)
    except (ValueError, OverflowError) as exc:
        raise _Stop(print_cvtnum_err(exc, arg)) from None


def _pattern(arg: str) -> int:
    value = parse_pattern(arg)
    if value < 0:
        raise _Stop(-errno.EINVAL)
    return value


#: letter -> (IoOptions field, value to store or parser of the option's argument). Flags
#: ``F.*`` are or-ed into ``flags``; ``-p`` (the old pread/pwrite switch) is accepted and does
#: nothing. ``-s`` means a pattern offset for read and a source file for write.
_OPTIONS: dict[str, tuple[str, Any]] = {
    "C": ("csv", True),
    "q": ("quiet", True),
    "v": ("verbose", True),
    "b": ("vmstate", True),
    "c": ("compress", True),
    "z": ("zero", True),
    "i": ("inject", True),
    "f": ("flags", F.FUA),
    "n": ("flags", F.NO_FALLBACK),
    "u": ("flags", F.MAY_UNMAP),
    "p": ("", None),
    "P": ("pattern", _pattern),
    "l": ("pattern_count", _number),
    "s": ("pattern_offset", _number),
}
_WRITE_S = {"s": ("source", str)}


def _options(s: Session, argv: list[str], cmd: Command, optstring: str, nargs: int,
             exact: bool = False, table: dict[str, tuple[str, Any]] | None = None
             ) -> IoOptions:
    """Parse ``argv`` with ``optstring`` in order, stopping at the first error as qemu-io
    does (and at ``-i``, which ends the command); at least ``nargs`` operands, exactly that
    many when ``exact``."""
    opts = IoOptions()
    letters = {**_OPTIONS, **(table or {})}
    g = s.getopt(argv, optstring)
    for c, arg in g:
        if c not in letters or c not in optstring:
            raise _Stop(usage(cmd))
        name, value = letters[c]
        if callable(value):
            setattr(opts, name, value(arg or ""))
        elif isinstance(value, F):
            opts.flags |= value
        elif name:
            setattr(opts, name, value)
        if opts.inject:
            return opts
    opts.args = g.argv[g.optind:]
    if len(opts.args) < nargs or (exact and len(opts.args) != nargs):
        raise _Stop(usage(cmd))
    return opts


def _command(fn: Callable[[Session, list[str]], int]) -> Callable[[Session, list[str]], int]:
    def run(s: Session, argv: list[str]) -> int:
        try:
            return fn(s, argv)
        except _Stop as stop:
            return stop.ret

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _fail(text: str) -> _Stop:
    out(text + "\n")
    return _Stop(-errno.EINVAL)


def _check_length(count: int, arg: str, suffix: str = "") -> None:
    if count > BDRV_REQUEST_MAX_BYTES:
        raise _fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}{suffix}, given {arg}")


def _check_sector_aligned(offset: int, count: int) -> None:
    if offset % SECTOR:
        raise _fail(f"{offset} is not a sector-aligned value for 'offset'")
    if count % SECTOR:
        raise _fail(f"{count} is not a sector-aligned value for 'count'")


def _failed(what: str, exc: BaseException) -> int:
    out(f"{what} failed: {strerror(_errno(exc))}\n")
    return -_errno(exc)


def _verify(buf: bytearray, start: int, count: int, pattern: int, offset: int) -> int:
    if buf[start:start + count] != _buf(count, pattern):
        out(f"Pattern verification failed at offset {offset + start}, {count} bytes\n")
        return -errno.EINVAL
    return 0


def _report_read(o: IoOptions, buf: bytearray, seconds: float, offset: int, count: int) -> None:
    if o.verbose:
        out(dump_buffer(buf, offset))
    out(io_report("read", seconds, offset, count, count, 1, o.csv))


# ---------------------------------------------------------------------------- read
@_command
def read_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, READ, "bCl:pP:qs:v", 2, exact=True)
    offset, count = _number(o.args[0]), _number(o.args[1])
    _check_length(count, o.args[1])
    if o.pattern is None and (o.pattern_count is not None or o.pattern_offset is not None):
        return usage(READ)
    start = o.pattern_offset or 0
    span = count - start if o.pattern_count is None else o.pattern_count
    if span < 0 or span + start > count:
        raise _fail("pattern verification range exceeds end of read data")
    if o.vmstate:
        _check_sector_aligned(offset, count)
    buf = _buf(count, 0xAB)
    t1 = time.monotonic()
    try:
        if o.vmstate:
            from ..special import bdrv_load_vmstate

            bdrv_load_vmstate(s.blk.bs, buf, offset, count)
        else:
            s.blk.pread_into(offset, memoryview(buf))
    except (OSError, ValueError) as exc:
        return _failed("read", exc)
    t2 = time.monotonic()
    ret = 0 if o.pattern is None else _verify(buf, start, span, o.pattern, offset)
    if not o.quiet:
        _report_read(o, buf, t2 - t1, offset, count)
    return ret


# ---------------------------------------------------------------------------- write
def _alloc_from_file(name: str, length: int) -> bytearray | None:
    try:
        with open(name, "rb") as f:
            data = f.read(length)
    except OSError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"{name}: {strerror(exc.errno)}\n")
        return None
    if not data:
        sys.stdout.flush()
        sys.stderr.write(f"{name}: file is empty\n")
        return None
    reps = -(-length // len(data))
    return bytearray((data * reps)[:length])


@_command
def write_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, WRITE, "bcCfnpP:quzs:", 2, exact=True, table=_WRITE_S)
    if o.vmstate and o.zero:
        raise _fail("-b and -z cannot be specified at the same time")
    if o.flags & F.FUA and (o.vmstate or o.compress):
        raise _fail("-f and -b or -c cannot be specified at the same time")
    if o.flags & F.NO_FALLBACK and not o.zero:
        raise _fail("-n requires -z to be specified")
    if o.flags & F.MAY_UNMAP and not o.zero:
        raise _fail("-u requires -z to be specified")
    if o.zero + (o.pattern is not None) + (o.source is not None) > 1:
        raise _fail("Only one of -z, -P, and -s can be specified at the same time")
    offset, count = _number(o.args[0]), _number(o.args[1])
    if not o.flags & F.NO_FALLBACK:
        _check_length(count, o.args[1], " without -n")
    if o.vmstate or o.compress:
        _check_sector_aligned(offset, count)
    buf: bytearray | None = None
    if o.source is not None and not o.zero:
        buf = _alloc_from_file(o.source, count)
        if buf is None:
            return -errno.EINVAL
    elif not o.zero:
        buf = _buf(count, 0xCD if o.pattern is None else o.pattern)
    t1 = time.monotonic()
    try:
        if o.vmstate:
            from ..special import bdrv_save_vmstate

            bdrv_save_vmstate(s.blk.bs, buf, offset, count)
        elif o.zero:
            s.blk.pwrite_zeroes(offset, count, o.flags)
        elif o.compress:
            s.blk.pwrite(offset, buf, F.WRITE_COMPRESSED)
        else:
            s.blk.pwrite(offset, buf, o.flags)
    except (OSError, ValueError) as exc:
        return _failed("write", exc)
    t2 = time.monotonic()
    if not o.quiet:
        out(io_report("wrote", t2 - t1, offset, count, count, 1, o.csv))
    return 0


# ---------------------------------------------------------------------------- vectors
def create_iovec(args: list[str]) -> list[int] | None:
    sizes = []
    total = 0
    for arg in args:
        try:
            length = num(arg)
        except (ValueError, OverflowError) as exc:
            print_cvtnum_err(exc, arg)
            return None
        if length > BDRV_REQUEST_MAX_BYTES:
            out(f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}\n")
            return None
        if total > BDRV_REQUEST_MAX_BYTES - length:
            out(f"The total number of bytes exceed the maximum size {BDRV_REQUEST_MAX_BYTES}\n")
            return None
        sizes.append(length)
        total += length
    return sizes


def _vector(o: IoOptions) -> tuple[int, int]:
    """``off len [len..]``: the offset and the total length of the vector."""
    offset = _number(o.args[0])
    sizes = create_iovec(o.args[1:])
    if sizes is None:
        raise _Stop(-errno.EINVAL)
    return offset, sum(sizes)


@_command
def readv_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, READV, "CP:qv", 2)
    offset, size = _vector(o)
    buf = _buf(size, 0xAB)
    t1 = time.monotonic()
    try:
        s.blk.pread_into(offset, memoryview(buf))
    except (OSError, ValueError) as exc:
        return _failed("readv", exc)
    t2 = time.monotonic()
    ret = 0 if o.pattern is None else _verify(buf, 0, size, o.pattern, offset)
    if not o.quiet:
        _report_read(o, buf, t2 - t1, offset, size)
    return ret


@_command
def writev_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, WRITEV, "CfqP:", 2)
    offset, size = _vector(o)
    t1 = time.monotonic()
    try:
        s.blk.pwrite(offset, _buf(size, 0xCD if o.pattern is None else o.pattern), o.flags)
    except (OSError, ValueError) as exc:
        return _failed("writev", exc)
    t2 = time.monotonic()
    if not o.quiet:
        out(io_report("wrote", t2 - t1, offset, size, size, 1, o.csv))
    return 0


# ---------------------------------------------------------------------------- aio
@_command
def aio_read_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, AIO_READ, "CP:iqv", 2)
    if o.inject:
        out("injecting invalid read request\n")
        return 0
    offset, size = _vector(o)
    buf = _buf(size, 0xAB)
    t1 = time.monotonic()

    async def run() -> None:
        try:
            await s.blk.co_preadv(offset, size, memoryview(buf))
        except (OSError, ValueError) as exc:
            _failed("readv", exc)
            return
        t2 = time.monotonic()
        if o.pattern is not None:
            _verify(buf, 0, size, o.pattern, offset)
        if not o.quiet:
            _report_read(o, buf, t2 - t1, offset, size)

    s.start(run())
    return 0


@_command
def aio_write_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, AIO_WRITE, "CfiqP:uz", 2)
    if o.inject:
        out("injecting invalid write request\n")
        return 0
    if o.zero and len(o.args) > 2:
        raise _fail("-z supports only a single length parameter")
    if o.flags & F.MAY_UNMAP and not o.zero:
        raise _fail("-u requires -z to be specified")
    if o.zero:
        offset, size = _number(o.args[0]), _number(o.args[1])
        t1 = 0.0  # qemu-io 7.2 never sets t1 for -z: the report times since boot
        buf = None
    else:
        offset, size = _vector(o)
        buf = _buf(size, 0xCD if o.pattern is None else o.pattern)
        t1 = time.monotonic()

    async def run() -> None:
        try:
            if buf is None:
                await s.blk.co_pwrite_zeroes(offset, size, o.flags)
            else:
                await s.blk.co_pwritev(offset, size, buf, o.flags)
        except (OSError, ValueError) as exc:
            _failed("aio_write", exc)
            return
        t2 = time.monotonic()
        if not o.quiet:
            out(io_report("wrote", t2 - t1, offset, size, size, 1, o.csv))

    s.start(run())
    return 0


def aio_flush_f(s: Session, argv: list[str]) -> int:
    s.drain()
    return 0


def flush_f(s: Session, argv: list[str]) -> int:
    try:
        s.blk.flush()
    except OSError as exc:
        return -_errno(exc)
    return 0


@_command
def discard_f(s: Session, argv: list[str]) -> int:
    o = _options(s, argv, DISCARD, "Cq", 2, exact=True)
    offset, count = _number(o.args[0]), _number(o.args[1])
    _check_length(count, o.args[1])
    t1 = time.monotonic()
    try:
        s.blk.pdiscard(offset, count)
    except (OSError, ValueError) as exc:
        return _failed("discard", exc)
    t2 = time.monotonic()
    if not o.quiet:
        out(io_report("discard", t2 - t1, offset, count, count, 1, o.csv))
    return 0


READ = register(Command("read", read_f, 2, -1,
                        "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                        "reads a number of bytes at a specified offset", altname="r"))
READV = register(Command("readv", readv_f, 2, -1, "[-Cqv] [-P pattern] off len [len..]",
                         "reads a number of bytes at a specified offset"))
WRITE = register(Command("write", write_f, 2, -1,
                         "[-bcCfnquz] [-P pattern | -s source_file] off len",
                         "writes a number of bytes at a specified offset", altname="w",
                         perm=Perm.WRITE))
WRITEV = register(Command("writev", writev_f, 2, -1, "[-Cfq] [-P pattern] off len [len..]",
                          "writes a number of bytes at a specified offset", perm=Perm.WRITE))
AIO_READ = register(Command("aio_read", aio_read_f, 2, -1,
                            "[-Ciqv] [-P pattern] off len [len..]",
                            "asynchronously reads a number of bytes"))
AIO_WRITE = register(Command("aio_write", aio_write_f, 2, -1,
                             "[-Cfiquz] [-P pattern] off len [len..]",
                             "asynchronously writes a number of bytes", perm=Perm.WRITE))
register(Command("aio_flush", aio_flush_f, 0, 0, None, "completes all outstanding aio requests"))
register(Command("flush", flush_f, 0, 0, None, "flush all in-core file state to disk",
                 altname="f"))
DISCARD = register(Command("discard", discard_f, 2, -1, "[-Cq] off len",
                           "discards a number of bytes at a specified offset", altname="d",
                           perm=Perm.WRITE))

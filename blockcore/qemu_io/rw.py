"""qemu-io's I/O commands: read, write, readv, writev, aio_read, aio_write, aio_flush, discard."""

from __future__ import annotations

import errno
import sys
import time

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


# ---------------------------------------------------------------------------- read
def read_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = vflag = pflag = sflag = lflag = bflag = False
    pattern = 0
    pattern_offset = pattern_count = 0
    g = s.getopt(argv, "bCl:pP:qs:v")
    for c, arg in g:
        assert arg is not None or c not in "lPs"
        if c == "b":
            bflag = True
        elif c == "C":
            cflag = True
        elif c == "l":
            lflag = True
            try:
                pattern_count = num(arg or "")
            except (ValueError, OverflowError) as exc:
                return print_cvtnum_err(exc, arg or "")
        elif c == "p":
            pass
        elif c == "P":
            pflag = True
            pattern = parse_pattern(arg or "")
            if pattern < 0:
                return -errno.EINVAL
        elif c == "q":
            qflag = True
        elif c == "s":
            sflag = True
            try:
                pattern_offset = num(arg or "")
            except (ValueError, OverflowError) as exc:
                return print_cvtnum_err(exc, arg or "")
        elif c == "v":
            vflag = True
        else:
            return usage(READ)
    rest = g.argv[g.optind:]
    if len(rest) != 2:
        return usage(READ)
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    try:
        count = num(rest[1])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {rest[1]}\n")
        return -errno.EINVAL
    if not pflag and (lflag or sflag):
        return usage(READ)
    if not lflag:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        out("pattern verification range exceeds end of read data\n")
        return -errno.EINVAL
    if bflag:
        if offset % SECTOR:
            out(f"{offset} is not a sector-aligned value for 'offset'\n")
            return -errno.EINVAL
        if count % SECTOR:
            out(f"{count} is not a sector-aligned value for 'count'\n")
            return -errno.EINVAL
    buf = _buf(count, 0xAB)
    t1 = time.monotonic()
    try:
        if bflag:
            from ..special import bdrv_load_vmstate

            bdrv_load_vmstate(s.blk.bs, buf, offset, count)
        else:
            s.blk.pread_into(offset, memoryview(buf))
    except (OSError, ValueError) as exc:
        out(f"read failed: {strerror(_errno(exc))}\n")
        return -_errno(exc)
    t2 = time.monotonic()
    ret = 0
    if pflag and buf[pattern_offset:pattern_offset + pattern_count] != _buf(pattern_count,
                                                                             pattern):
        out(f"Pattern verification failed at offset {offset + pattern_offset}, "
            f"{pattern_count} bytes\n")
        ret = -errno.EINVAL
    if qflag:
        return ret
    if vflag:
        out(dump_buffer(buf, offset))
    out(io_report("read", t2 - t1, offset, count, count, 1, cflag))
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


def write_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = bflag = pflag = zflag = compress = sflag = False
    flags = F.NONE
    pattern = 0xCD
    file_name: str | None = None
    g = s.getopt(argv, "bcCfnpP:quzs:")
    for c, arg in g:
        if c == "b":
            bflag = True
        elif c == "c":
            compress = True
        elif c == "C":
            cflag = True
        elif c == "f":
            flags |= F.FUA
        elif c == "n":
            flags |= F.NO_FALLBACK
        elif c == "p":
            pass
        elif c == "P":
            pflag = True
            pattern = parse_pattern(arg or "")
            if pattern < 0:
                return -errno.EINVAL
        elif c == "q":
            qflag = True
        elif c == "s":
            sflag = True
            file_name = arg
        elif c == "u":
            flags |= F.MAY_UNMAP
        elif c == "z":
            zflag = True
        else:
            return usage(WRITE)
    rest = g.argv[g.optind:]
    if len(rest) != 2:
        return usage(WRITE)
    if bflag and zflag:
        out("-b and -z cannot be specified at the same time\n")
        return -errno.EINVAL
    if flags & F.FUA and (bflag or compress):
        out("-f and -b or -c cannot be specified at the same time\n")
        return -errno.EINVAL
    if flags & F.NO_FALLBACK and not zflag:
        out("-n requires -z to be specified\n")
        return -errno.EINVAL
    if flags & F.MAY_UNMAP and not zflag:
        out("-u requires -z to be specified\n")
        return -errno.EINVAL
    if zflag + pflag + sflag > 1:
        out("Only one of -z, -P, and -s can be specified at the same time\n")
        return -errno.EINVAL
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    try:
        count = num(rest[1])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[1])
    if count > BDRV_REQUEST_MAX_BYTES and not flags & F.NO_FALLBACK:
        out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {rest[1]}\n")
        return -errno.EINVAL
    if bflag or compress:
        if offset % SECTOR:
            out(f"{offset} is not a sector-aligned value for 'offset'\n")
            return -errno.EINVAL
        if count % SECTOR:
            out(f"{count} is not a sector-aligned value for 'count'\n")
            return -errno.EINVAL
    buf: bytearray | None = None
    if not zflag:
        if sflag:
            buf = _alloc_from_file(file_name or "", count)
            if buf is None:
                return -errno.EINVAL
        else:
            buf = _buf(count, pattern)
    t1 = time.monotonic()
    try:
        if bflag:
            from ..special import bdrv_save_vmstate

            bdrv_save_vmstate(s.blk.bs, buf, offset, count)
        elif zflag:
            s.blk.pwrite_zeroes(offset, count, flags)
        elif compress:
            s.blk.pwrite(offset, buf, F.WRITE_COMPRESSED)
        else:
            s.blk.pwrite(offset, buf, flags)
    except (OSError, ValueError) as exc:
        out(f"write failed: {strerror(_errno(exc))}\n")
        return -_errno(exc)
    t2 = time.monotonic()
    if not qflag:
        out(io_report("wrote", t2 - t1, offset, count, count, 1, cflag))
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


def readv_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = vflag = pflag = False
    pattern = 0
    g = s.getopt(argv, "CP:qv")
    for c, arg in g:
        if c == "C":
            cflag = True
        elif c == "P":
            pflag = True
            pattern = parse_pattern(arg or "")
            if pattern < 0:
                return -errno.EINVAL
        elif c == "q":
            qflag = True
        elif c == "v":
            vflag = True
        else:
            return usage(READV)
    rest = g.argv[g.optind:]
    if len(rest) < 2:
        return usage(READV)
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    sizes = create_iovec(rest[1:])
    if sizes is None:
        return -errno.EINVAL
    size = sum(sizes)
    buf = _buf(size, 0xAB)
    t1 = time.monotonic()
    try:
        s.blk.pread_into(offset, memoryview(buf))
    except (OSError, ValueError) as exc:
        out(f"readv failed: {strerror(_errno(exc))}\n")
        return -_errno(exc)
    t2 = time.monotonic()
    ret = 0
    if pflag and buf != _buf(size, pattern):
        out(f"Pattern verification failed at offset {offset}, {size} bytes\n")
        ret = -errno.EINVAL
    if qflag:
        return ret
    if vflag:
        out(dump_buffer(buf, offset))
    out(io_report("read", t2 - t1, offset, size, size, 1, cflag))
    return ret


def writev_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = False
    flags = F.NONE
    pattern = 0xCD
    g = s.getopt(argv, "CfqP:")
    for c, arg in g:
        if c == "C":
            cflag = True
        elif c == "f":
            flags |= F.FUA
        elif c == "q":
            qflag = True
        elif c == "P":
            pattern = parse_pattern(arg or "")
            if pattern < 0:
                return -errno.EINVAL
        else:
            return usage(WRITEV)
    rest = g.argv[g.optind:]
    if len(rest) < 2:
        return usage(WRITEV)
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    sizes = create_iovec(rest[1:])
    if sizes is None:
        return -errno.EINVAL
    size = sum(sizes)
    t1 = time.monotonic()
    try:
        s.blk.pwrite(offset, _buf(size, pattern), flags)
    except (OSError, ValueError) as exc:
        out(f"writev failed: {strerror(_errno(exc))}\n")
        return -_errno(exc)
    t2 = time.monotonic()
    if not qflag:
        out(io_report("wrote", t2 - t1, offset, size, size, 1, cflag))
    return 0


# ---------------------------------------------------------------------------- aio
def aio_read_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = vflag = pflag = False
    pattern = 0
    g = s.getopt(argv, "CP:iqv")
    for c, arg in g:
        if c == "C":
            cflag = True
        elif c == "P":
            pflag = True
            pattern = parse_pattern(arg or "")
            if pattern < 0:
                return -errno.EINVAL
        elif c == "i":
            out("injecting invalid read request\n")
            return 0
        elif c == "q":
            qflag = True
        elif c == "v":
            vflag = True
        else:
            return usage(AIO_READ)
    rest = g.argv[g.optind:]
    if len(rest) < 2:
        return usage(AIO_READ)
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    sizes = create_iovec(rest[1:])
    if sizes is None:
        return -errno.EINVAL
    size = sum(sizes)
    buf = _buf(size, 0xAB)
    t1 = time.monotonic()

    async def run() -> None:
        try:
            await s.blk.co_preadv(offset, size, memoryview(buf))
        except (OSError, ValueError) as exc:
            out(f"readv failed: {strerror(_errno(exc))}\n")
            return
        t2 = time.monotonic()
        if pflag and buf != _buf(size, pattern):
            out(f"Pattern verification failed at offset {offset}, {size} bytes\n")
        if qflag:
            return
        if vflag:
            out(dump_buffer(buf, offset))
        out(io_report("read", t2 - t1, offset, size, size, 1, cflag))

    s.start(run())
    return 0


def aio_write_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = zflag = False
    flags = F.NONE
    pattern = 0xCD
    g = s.getopt(argv, "CfiqP:uz")
    for c, arg in g:
        if c == "C":
            cflag = True
        elif c == "f":
            flags |= F.FUA
        elif c == "q":
            qflag = True
        elif c == "u":
            flags |= F.MAY_UNMAP
        elif c == "P":
            pattern = parse_pattern(arg or "")
            if pattern < 0:
                return -errno.EINVAL
        elif c == "i":
            out("injecting invalid write request\n")
            return 0
        elif c == "z":
            zflag = True
        else:
            return usage(AIO_WRITE)
    rest = g.argv[g.optind:]
    if len(rest) < 2:
        return usage(AIO_WRITE)
    if zflag and len(rest) > 2:
        out("-z supports only a single length parameter\n")
        return -errno.EINVAL
    if flags & F.MAY_UNMAP and not zflag:
        out("-u requires -z to be specified\n")
        return -errno.EINVAL
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    if zflag:
        try:
            size = num(rest[1])
        except (ValueError, OverflowError) as exc:
            return print_cvtnum_err(exc, rest[1])
        t1 = 0.0  # qemu-io 7.2 never sets t1 for -z: the report times since boot
        buf = None
    else:
        sizes = create_iovec(rest[1:])
        if sizes is None:
            return -errno.EINVAL
        size = sum(sizes)
        buf = _buf(size, pattern)
        t1 = time.monotonic()

    async def run() -> None:
        try:
            if buf is None:
                await s.blk.co_pwrite_zeroes(offset, size, flags)
            else:
                await s.blk.co_pwritev(offset, size, buf, flags)
        except (OSError, ValueError) as exc:
            out(f"aio_write failed: {strerror(_errno(exc))}\n")
            return
        t2 = time.monotonic()
        if not qflag:
            out(io_report("wrote", t2 - t1, offset, size, size, 1, cflag))

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


def discard_f(s: Session, argv: list[str]) -> int:
    cflag = qflag = False
    g = s.getopt(argv, "Cq")
    for c, _arg in g:
        if c == "C":
            cflag = True
        elif c == "q":
            qflag = True
        else:
            return usage(DISCARD)
    rest = g.argv[g.optind:]
    if len(rest) != 2:
        return usage(DISCARD)
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[0])
    try:
        count = num(rest[1])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, rest[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {rest[1]}\n")
        return -errno.EINVAL
    t1 = time.monotonic()
    try:
        s.blk.pdiscard(offset, count)
    except (OSError, ValueError) as exc:
        out(f"discard failed: {strerror(_errno(exc))}\n")
        return -_errno(exc)
    t2 = time.monotonic()
    if not qflag:
        out(io_report("discard", t2 - t1, offset, count, count, 1, cflag))
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

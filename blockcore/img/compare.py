"""``blockcore-img compare``: exit 0 identical, 1 different, 2 open error, 3 allocation query
error, 4 read error."""

from __future__ import annotations

import sys
from typing import Any

from ..cliutil import CliError, Progress, check_interrupted, error_report, strerror
from ..types import BlockStatusFlags as S
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    error_exit,
    img_open,
    out,
    parse_args,
    parse_cache_mode,
)

__all__ = ["compare_buffers", "find_nonzero", "img_compare"]

IO_BUF_SIZE = 2 << 20
SECTOR = 512
_ZERO_SECTOR = bytes(SECTOR)


def find_nonzero(buf: bytes | memoryview, n: int) -> int:
    """Offset of the first sector holding a non-zero byte, or -1 (qemu-img's find_nonzero)."""
    view = memoryview(buf)[:n]
    if view == bytes(n):
        return -1
    end = n - n % SECTOR
    for i in range(0, end, SECTOR):
        if view[i:i + SECTOR] != _ZERO_SECTOR:
            return i
    return end


def compare_buffers(buf1: bytes | memoryview, buf2: bytes | memoryview, length: int
                    ) -> tuple[bool, int]:
    """(first sector differs, sector-granular length sharing that state)."""
    a, b = memoryview(buf1), memoryview(buf2)
    i = min(length, SECTOR)
    res = a[:i] != b[:i]
    while i < length:
        n = min(length - i, SECTOR)
        if (a[i:i + n] != b[i:i + n]) != res:
            break
        i += n
    return res, i


class _Stop(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def img_compare(argv: list[str]) -> int:
    a = parse_args(argv, ":hf:F:T:pqsU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE],
                   {"F": "fmt2", "T": "cache", "s": "strict"}, cache="writeback")
    if len(a.operands) != 2:
        raise error_exit("Expecting two image file names")
    filename1, filename2 = a.operands
    fmt1, fmt2, cache, image_opts, force_share = (a.fmt, a.fmt2, a.cache, a.image_opts,
                                                   a.force_share)
    quiet, strict = a.quiet, bool(a.strict)
    prog = Progress(a.progress, 2.0)
    try:
        try:
            flags, _wt = parse_cache_mode(cache)
        except ValueError:
            raise CliError(f"Invalid source cache option: {cache}", 2) from None
        try:
            blk1 = img_open(filename1, fmt1, flags, image_opts=image_opts,
                            force_share=force_share)
        except CliError as exc:
            raise CliError(exc.message, 2, exc.hint) from None
        try:
            try:
                blk2 = img_open(filename2, fmt2, flags, image_opts=image_opts,
                                force_share=force_share)
            except CliError as exc:
                raise CliError(exc.message, 2, exc.hint) from None
            try:
                return _compare(blk1, blk2, filename1, filename2, quiet, strict, prog)
            except _Stop as stop:
                return stop.status
            finally:
                blk2.close()
        finally:
            blk1.close()
    finally:
        prog.end()


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        out(text)


def _read(blk: Any, offset: int, length: int, filename: str) -> bytes:
    try:
        return blk.pread(offset, length)
    except OSError as exc:
        sys.stdout.flush()
        error_report(f"Error while reading offset {offset} of {filename}: "
                     f"{strerror(exc.errno or 5)}")
        raise _Stop(4) from None


def _status(bs: Any, offset: int, length: int, filename: str) -> tuple[S, int]:
    from ..status import bdrv_block_status_above

    try:
        st = bdrv_block_status_above(bs, None, offset, length)
    except OSError:
        sys.stdout.flush()
        error_report(f"Sector allocation test failed for {filename}")
        raise _Stop(3) from None
    return st.ret, st.pnum


def _check_empty(blk: Any, offset: int, length: int, filename: str, quiet: bool) -> int:
    buf = _read(blk, offset, length, filename)
    idx = find_nonzero(buf, length)
    if idx >= 0:
        _say(quiet, f"Content mismatch at offset {offset + idx}!\n")
        return 1
    return 0


def _compare(blk1: Any, blk2: Any, filename1: str, filename2: str, quiet: bool, strict: bool,
             prog: Progress) -> int:
    from ..io import bdrv_getlength

    bs1, bs2 = blk1.bs, blk2.bs
    try:
        total1 = bdrv_getlength(bs1)
    except OSError as exc:
        error_report(f"Can't get size of {filename1}: {strerror(exc.errno or 5)}")
        return 4
    try:
        total2 = bdrv_getlength(bs2)
    except OSError as exc:
        error_report(f"Can't get size of {filename2}: {strerror(exc.errno or 5)}")
        return 4
    total = min(total1, total2)
    progress_base = max(total1, total2)
    prog.print(0, 100)
    if strict and total1 != total2:
        _say(quiet, "Strict mode: Image size mismatch!\n")
        return 1
    offset = 0
    # the status flags that QEMU compares in strict mode (no EOF/offset details of its own)
    while offset < total:
        check_interrupted()
        status1, pnum1 = _status(bs1, offset, total1 - offset, filename1)
        status2, pnum2 = _status(bs2, offset, total2 - offset, filename2)
        allocated1 = bool(status1 & S.ALLOCATED)
        allocated2 = bool(status2 & S.ALLOCATED)
        chunk = min(pnum1, pnum2)
        if strict and _strict_status(status1) != _strict_status(status2):
            _say(quiet, f"Strict mode: Offset {offset} block status mismatch!\n")
            return 1
        if status1 & S.ZERO and status2 & S.ZERO:
            pass
        elif allocated1 == allocated2:
            if allocated1:
                chunk = min(chunk, IO_BUF_SIZE)
                buf1 = _read(blk1, offset, chunk, filename1)
                buf2 = _read(blk2, offset, chunk, filename2)
                differ, pnum = compare_buffers(buf1, buf2, chunk)
                if differ or pnum != chunk:
                    _say(quiet, f"Content mismatch at offset {offset + (0 if differ else pnum)}!\n")
                    return 1
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            if allocated1:
                ret = _check_empty(blk1, offset, chunk, filename1, quiet)
            else:
                ret = _check_empty(blk2, offset, chunk, filename2, quiet)
            if ret:
                return ret
        offset += chunk
        prog.print(chunk / progress_base * 100, 100)
    if total1 != total2:
        _say(quiet, "Warning: Image size mismatch!\n")
        if total1 > total2:
            blk_over, name_over = blk1, filename1
        else:
            blk_over, name_over = blk2, filename2
        while offset < progress_base:
            ret_flags, chunk = _status(blk_over.bs, offset, progress_base - offset, name_over)
            if ret_flags & S.ALLOCATED and not ret_flags & S.ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                if _check_empty(blk_over, offset, chunk, name_over, quiet):
                    return 1
            offset += chunk
            prog.print(chunk / progress_base * 100, 100)
    _say(quiet, "Images are identical.\n")
    return 0


def _strict_status(ret: S) -> int:
    # QEMU compares the whole return value of bdrv_block_status_above (data, zero,
    # allocated, offset-valid, eof...); the EOF bit differs legitimately between chunk
    # boundaries of the two images only when they end at the same offset, as QEMU's do.
    return int(ret)


"""``blockcore-img check``: consistency check and repair, qemu-img's exit codes 0/1/2/3/63."""

from __future__ import annotations

import errno
import sys
from typing import Any

from ..aio import co_wrapper
from ..cliutil import CliError, error_report, print_check_messages, strerror
from ..types import BdrvCheckMode, BdrvCheckResult, OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    ImgArgs,
    LongOpt,
    error_exit,
    img_open,
    out,
    parse_args,
    parse_cache_mode,
    parse_output,
)
from .output import check_human, check_json, check_repaired_human, image_check

__all__ = ["img_check", "run_check"]


async def _co_check(bs: Any, result: BdrvCheckResult, fix: BdrvCheckMode) -> None:
    # the core fills ``result`` in place, so the lines gathered before a failure survive
    from ..special import bdrv_co_check

    await bdrv_co_check(bs, fix, result)


_check = co_wrapper(_co_check, "img_check", rdlock=True)


def run_check(bs: Any, fix: BdrvCheckMode) -> tuple[BdrvCheckResult, BaseException | None]:
    """Check ``bs``; print the problem lines to stderr as they would have appeared."""
    result = BdrvCheckResult()
    error: BaseException | None = None
    try:
        _check(bs, result, fix)
    except OSError as exc:
        error = exc
    sys.stdout.flush()
    print_check_messages(result.messages)
    return result, error


def img_check(argv: list[str]) -> int:
    def repair(a: ImgArgs, arg: str | None) -> None:
        modes = {"leaks": BdrvCheckMode.FIX_LEAKS,
                 "all": BdrvCheckMode.FIX_LEAKS | BdrvCheckMode.FIX_ERRORS}
        if arg not in modes:
            raise error_exit(f"Unknown option value for -r (expecting 'leaks' or 'all'): {arg}")
        a.fix, a.flags = modes[arg], a.flags | OpenFlags.RDWR

    longopts = [HELP, LongOpt("format", 1, "f"), LongOpt("repair", 1, "r"), OUTPUT, OBJECT,
                IMAGE_OPTS, FORCE_SHARE]  # fmt: skip
    a = parse_args(argv, ":hf:r:T:qU", longopts, {"r": repair, "T": "cache"},
                   cache="writeback", fix=BdrvCheckMode.NONE, flags=OpenFlags.CHECK)
    if len(a.operands) != 1:
        raise error_exit("Expecting one image file name")
    filename = a.operands[0]
    output_format = parse_output(a.output)
    fmt, cache, fix, flags, quiet = a.fmt, a.cache, a.fix, a.flags, a.quiet
    image_opts, force_share = a.image_opts, a.force_share
    try:
        cache_flags, _wt = parse_cache_mode(cache)
    except ValueError:
        raise CliError(f"Invalid source cache option: {cache}") from None
    blk = img_open(filename, fmt, flags | cache_flags, image_opts=image_opts,
                   force_share=force_share)
    try:
        return _check_and_report(blk.bs, filename, fix, output_format, quiet)
    finally:
        blk.close()


def _check_and_report(bs: Any, filename: str, fix: BdrvCheckMode, output_format: str,
                      quiet: bool) -> int:
    from ..errors import NotSupportedError

    fmt_name = bs.drv.name if bs.drv else ""
    result, error = run_check(bs, fix)
    if isinstance(error, NotSupportedError):
        error_report("This image format does not support checks")
        return 63
    check = image_check(filename, fmt_name, result)
    if error is None and (result.corruptions_fixed or result.leaks_fixed):
        if output_format == "human" and not quiet:
            out(check_repaired_human(result.leaks_fixed, result.corruptions_fixed))
        fixed = {k: check[k] for k in ("leaks-fixed", "corruptions-fixed") if k in check}
        result, error = run_check(bs, BdrvCheckMode.NONE)
        check = image_check(filename, fmt_name, result)
        for key in ("corruptions-fixed", "leaks-fixed"):
            check.pop(key, None)
        check.update(fixed)
        # keep QAPI order for the JSON writer
        from .output import CHECK_KEYS

        check = {k: check[k] for k in CHECK_KEYS if k in check}
    if error is None and not quiet:
        out(check_human(check) if output_format == "human" else check_json(check))
    if error is not None or check.get("check-errors"):
        if error is not None:
            err = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
            raise CliError(f"Check failed: {strerror(err)}")
        raise CliError("Check failed")
    if check.get("corruptions"):
        return 2
    if check.get("leaks"):
        return 3
    return 0

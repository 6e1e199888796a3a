"""``blockcore-img measure``: space a new image needs."""

from __future__ import annotations

import sys
from typing import Any

from ..cliutil import CliError, error_report
from ..types import BlockMeasureInfo, OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    LongOpt,
    cvtnum,
    img_open,
    out,
)
from .create import accumulate_options
from .createopts import CreateOpts
from .output import measure_human, measure_json
from .snapshot import SnapshotRef, load_snapshot_tmp

__all__ = ["img_measure", "measure"]

BDRV_SECTOR_SIZE = 512


def measure(fmt: str, opts: CreateOpts, in_bs: Any | None) -> BlockMeasureInfo:
    """``bdrv_measure`` of the output format's driver."""
    from ..drivers import bdrv_find_format
    from ..info import bdrv_measure

    drv = bdrv_find_format(fmt)
    options = opts.driver_options()
    if opts.get("size") is not None:
        options["size"] = opts.get("size")
    if drv.bdrv_measure is None:  # type: ignore[attr-defined]
        raise CliError(f"Block driver '{fmt}' does not support size measurement")
    try:
        return bdrv_measure(drv, options, in_bs)
    except (OSError, ValueError) as exc:
        from ..cliutil import describe_error

        msg, hint = describe_error(exc)
        raise CliError(msg, hint=hint) from None


def _help_and_exit() -> None:
    from . import print_help

    print_help()
    raise CliError(None, 0)


def img_measure(argv: list[str]) -> int:
    from ..cliutil import GetoptLong

    fmt: str | None = None
    out_fmt = "raw"
    options: str | None = None
    snapshot: SnapshotRef | None = None
    force_share = image_opts = False
    img_size: int | None = None
    output_format = "human"
    longopts = [HELP, IMAGE_OPTS, OBJECT, OUTPUT, LongOpt("size", 1, "\x02size"), FORCE_SHARE]
    # measure's optstring has no leading ':': glibc prints its own message, then the help
    g = GetoptLong(argv, "hf:O:o:l:U", longopts)
    for c, arg in g:
        if c in "?h":
            _help_and_exit()
        elif c == "f":
            fmt = arg
        elif c == "O":
            out_fmt = arg or ""
        elif c == "o":
            options = accumulate_options(options, arg or "")
        elif c == "l":
            snapshot = SnapshotRef.parse(arg or "")
        elif c == "U":
            force_share = True
        elif c == "\x02image-opts":
            image_opts = True
        elif c == "\x02output":
            if arg == "json":
                output_format = "json"
            elif arg == "human":
                output_format = "human"
            else:
                raise CliError("--output must be used with human or json as argument.")
        elif c == "\x02size":
            img_size = cvtnum("image size", arg or "")
    rest = g.argv[g.optind:]
    if len(rest) > 1:
        raise CliError("At most one filename argument is allowed.")
    filename = rest[0] if rest else None
    if filename is None and (image_opts or fmt or snapshot):
        raise CliError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and img_size is not None:
        raise CliError("--size N cannot be used together with a filename.")
    if filename is None and img_size is None:
        raise CliError("Either --size N or one filename must be specified.")
    in_blk = None
    if filename is not None:
        in_blk = img_open(filename, fmt, OpenFlags.NONE, image_opts=image_opts,
                          force_share=force_share)
        if snapshot is not None:
            try:
                load_snapshot_tmp(in_blk.bs, snapshot)
            except BaseException:
                in_blk.close()
                raise
    try:
        return _measure(out_fmt, options, img_size, in_blk, output_format)
    finally:
        if in_blk is not None:
            in_blk.close()


def _measure(out_fmt: str, options: str | None, img_size: int | None, in_blk: Any,
             output_format: str) -> int:
    from ..errors import DriverNotFoundError

    try:
        opts = CreateOpts(out_fmt)
    except DriverNotFoundError:
        raise CliError(f"Unknown file format '{out_fmt}'") from None
    if not opts.can_create:
        raise CliError(f"Format driver '{out_fmt}' does not support image creation")
    if options:
        try:
            opts.parse(options)
        except CliError as exc:
            if exc.message:
                error_report(exc.message, exc.hint)
            raise CliError(f"Invalid options for file format '{out_fmt}'") from None
    if img_size is not None:
        opts.set_number("size", img_size)
    info = measure(out_fmt, opts, in_blk.bs if in_blk is not None else None)
    out(measure_human(info) if output_format == "human" else measure_json(info))
    sys.stdout.flush()
    return 0

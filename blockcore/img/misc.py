"""The smaller ``blockcore-img`` subcommands: amend, dd, bitmap."""

from __future__ import annotations

import errno
from typing import Any

from ..cliutil import CliError, Progress, check_interrupted, error_report, has_help_option, strerror
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    LongOpt,
    cvtnum,
    cvtnum_full,
    describe_error,
    error_exit,
    getopts,
    img_open,
    out,
    parse_args,
    parse_cache_mode,
)
from .create import add_option

__all__ = ["img_amend", "img_bitmap", "img_dd"]

IO_BUF_SIZE = 2 << 20
SECTOR = 512
INT_MAX = (1 << 31) - 1


# ---------------------------------------------------------------------------- amend
#: Options QEMU's drivers can amend (``amend_opts``); other create options are refused.
AMEND_OPTS = {
    "qcow2": {"size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
              "lazy_refcounts", "refcount_bits"},
}

def img_amend(argv: list[str]) -> int:
    a = parse_args(argv, ":ho:f:t:pq", [HELP, OBJECT, IMAGE_OPTS,
                                        LongOpt("force", 0, "\x02force")],
                   {"o": add_option, "\x02force": "force"},
                   cache="writeback", options=None, force=False)
    if a.options is None:
        raise error_exit("Must specify options (-o)")
    rest, fmt, cache, options, force, image_opts = (a.operands, a.fmt, a.cache, a.options,
                                                    a.force, a.image_opts)
    prog = Progress(a.progress, 1.0)
    try:
        if fmt and has_help_option(options):  # -f names the format: no image needed
            return _amend_help(fmt)
        if len(rest) != 1:
            raise CliError("Expecting one image file name")
        try:
            flags, _ = parse_cache_mode(cache)
        except ValueError:
            raise CliError(f"Invalid cache option: {cache}") from None
        blk = img_open(rest[0], fmt, flags | OpenFlags.RDWR, image_opts=image_opts)
        try:
            bs = blk.bs
            fmt_name = bs.drv.name
            if has_help_option(options):
                return _amend_help(fmt_name)
            fn = getattr(bs.drv, "bdrv_amend_options", None)
            if fn is None:
                raise CliError(f"Format driver '{fmt_name}' does not support option amendment")
            from .createopts import CreateOpts

            copts = CreateOpts(fmt_name, with_protocol=False)
            amendable = AMEND_OPTS.get(fmt_name)
            from ..cliutil import parse_opts as _parse

            for key in _parse(options):
                if amendable is not None and key not in amendable and not key.startswith(
                        "encrypt."):
                    hint = ("This option is only supported for image creation\n"
                            if copts.has(key) else None)
                    raise CliError(f"Invalid parameter '{key}'", hint=hint)
            copts.parse(options)
            prog.print(0, 0)
            try:
                fn(bs, copts.driver_options(), force)
            except (OSError, ValueError) as exc:
                msg, hint = describe_error(exc)
                raise CliError(msg, hint=hint) from None
            prog.print(100, 0)
        finally:
            blk.close()
    finally:
        prog.end()
    return 0


def _amend_help(fmt: str) -> int:
    """``print_amend_option_help``: what ``-o`` may change in a ``fmt`` image."""
    from ..drivers import bdrv_find_format
    from ..errors import DriverNotFoundError
    from .createopts import amend_option_help

    try:
        drv = bdrv_find_format(fmt)
    except DriverNotFoundError:
        raise CliError(f"Unknown file format '{fmt}'") from None
    if getattr(drv, "bdrv_amend_options", None) is None:
        raise CliError(f"Format driver '{fmt}' does not support option amendment")
    out(amend_option_help(fmt, AMEND_OPTS.get(fmt, ())))
    return 0


# ---------------------------------------------------------------------------- dd
def img_dd(argv: list[str]) -> int:
    a = parse_args(argv, ":hf:O:U", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE], {"O": "out_fmt"},
                   out_fmt="raw")
    fmt, out_fmt, image_opts, force_share = a.fmt, a.out_fmt, a.image_opts, a.force_share
    bsz = 512
    count: int | None = None
    skip: int | None = None
    in_name = out_name = None
    for arg in a.operands:
        key, eq, value = arg.partition("=")
        if not eq or key not in ("bs", "count", "if", "of", "skip"):
            raise CliError(f"unrecognized operand {key if eq else arg}")
        if key == "bs":
            bsz = cvtnum_full("bs", value, 1, INT_MAX)
        elif key == "count":
            count = cvtnum("count", value)
        elif key == "if":
            in_name = value
        elif key == "of":
            out_name = value
        else:
            skip = cvtnum("skip", value)
    if in_name is None or out_name is None:
        raise CliError("Must specify both input and output files")
    blk1 = img_open(in_name, fmt, OpenFlags.NONE, image_opts=image_opts, force_share=force_share)
    try:
        return _dd(blk1, in_name, out_name, out_fmt, bsz, count, skip)
    finally:
        blk1.close()


def _dd(blk1: Any, in_name: str, out_name: str, out_fmt: str, bsz: int, count: int | None,
        skip: int | None) -> int:
    from ..io import bdrv_getlength
    from .createopts import CreateOpts

    try:
        copts = CreateOpts(out_fmt)
    except OSError:
        raise CliError("Unknown file format") from None
    size = bdrv_getlength(blk1.bs)
    if count is not None and count * bsz < size:
        size = count * bsz
    skip_bytes = (skip or 0) * bsz
    beyond = skip is not None and size < skip_bytes
    copts.set_number("size", 0 if beyond else size - skip_bytes)
    from ..special import bdrv_create

    try:
        bdrv_create(out_fmt, out_name, copts.driver_options())
    except (OSError, ValueError) as exc:
        msg, hint = describe_error(exc)
        raise CliError(f"{out_name}: error while creating output image: {msg}",
                       hint=hint) from None
    blk2 = img_open(out_name, out_fmt, OpenFlags.RDWR)
    try:
        if beyond:
            error_report(f"{in_name}: cannot skip to specified offset")
            in_pos = size
        else:
            in_pos = skip_bytes
        out_pos = 0
        while in_pos < size:
            check_interrupted()
            n = min(bsz, size - in_pos)
            try:
                data = blk1.pread(in_pos, n)
            except OSError as exc:
                raise CliError("error while reading from input image file: "
                               f"{strerror(exc.errno or 5)}") from None
            in_pos += n
            try:
                blk2.pwrite(out_pos, data)
            except OSError as exc:
                raise CliError("error while writing to output image file: "
                               f"{strerror(exc.errno or 5)}") from None
            out_pos += n
    finally:
        blk2.close()
    return 0


# ---------------------------------------------------------------------------- bitmap
def img_bitmap(argv: list[str]) -> int:
    actions: list[tuple[str, str | None]] = []
    fmt = src_fmt = src_filename = None
    granularity = 0
    image_opts = False
    longopts = [HELP, OBJECT, IMAGE_OPTS, LongOpt("add", 0, "\x02add"),
                LongOpt("remove", 0, "\x02remove"), LongOpt("clear", 0, "\x02clear"),
                LongOpt("enable", 0, "\x02enable"), LongOpt("disable", 0, "\x02disable"),
                LongOpt("merge", 1, "\x02merge"), LongOpt("granularity", 1, "g"),
                LongOpt("source-file", 1, "b"), LongOpt("source-format", 1, "F")]  # fmt: skip
    opts, g = getopts(argv, ":b:f:F:g:h", longopts)
    for c, arg in opts:
        if c == "b":
            src_filename = arg
        elif c == "f":
            fmt = arg
        elif c == "F":
            src_fmt = arg
        elif c == "g":
            granularity = cvtnum("granularity", arg or "")
        elif c == "\x02image-opts":
            image_opts = True
        elif c.startswith("\x02"):
            actions.append((c[1:], arg))
    if not actions:
        raise CliError("Need at least one of --add, --remove, --clear, --enable, --disable, "
                       "or --merge")
    if granularity and not any(a == "add" for a, _ in actions):
        raise CliError("granularity only supported with --add")
    if src_fmt and not src_filename:
        raise CliError("-F only supported with -b")
    if src_filename and not any(a == "merge" for a, _ in actions):
        raise CliError("Merge bitmap source file only supported with --merge")
    rest = g.argv[g.optind:]
    if len(rest) != 2:
        raise CliError("Expecting filename and bitmap name")
    filename, bitmap = rest
    blk = img_open(filename, fmt, OpenFlags.RDWR, image_opts=image_opts)
    src_blk = None
    try:
        src_bs = blk.bs
        if src_filename:
            src_blk = img_open(src_filename, src_fmt, OpenFlags.NO_BACKING)  # as qemu-img
            src_bs = src_blk.bs
        for act, arg in actions:
            try:
                _bitmap_action(blk.bs, act, bitmap, arg, granularity, src_bs)
            except (OSError, ValueError) as exc:
                msg, hint = describe_error(exc)
                raise CliError(f"Operation {act} on bitmap {bitmap} failed: {msg}",
                               hint=hint) from None
    finally:
        if src_blk is not None:
            src_blk.close()
        blk.close()
    return 0


def _default_granularity(bs: Any) -> int:
    """``bdrv_get_default_bitmap_granularity``."""
    from ..info import bdrv_get_info

    try:
        cluster = bdrv_get_info(bs).cluster_size
    except OSError:
        cluster = 0
    return min(65536, max(4096, cluster)) if cluster else 65536


def _lookup_bitmap(bs: Any, name: str) -> Any:
    from ..dirty_bitmap import bdrv_find_dirty_bitmap
    from ..errors import BlockError

    bitmap = bdrv_find_dirty_bitmap(bs, name)
    if bitmap is None:
        raise BlockError(errno.ENOENT, f"Dirty bitmap '{name}' not found")
    return bitmap


def _bitmap_action(bs: Any, act: str, name: str, arg: str | None, granularity: int,
                   src_bs: Any) -> None:
    """qemu-img bitmap's actions, as the QMP block-dirty-bitmap-* commands do them."""
    from .. import dirty_bitmap as dbm
    from ..errors import BlockError, NotSupportedError

    if act == "add":
        if not name:
            raise BlockError(errno.EINVAL, "Bitmap name cannot be empty")
        # QMP's granularity is a uint32: -g 4G arrives as 0 and is refused below
        gran = granularity & 0xFFFFFFFF if granularity else _default_granularity(bs)
        if gran < 512 or gran & (gran - 1):
            raise BlockError(errno.EINVAL, "Granularity must be power of 2 and at least 512")
        if dbm.bdrv_find_dirty_bitmap(bs, name) is not None:
            raise BlockError(errno.EEXIST, f"Bitmap already exists: {name}")
        from ..special import bdrv_can_store_new_dirty_bitmap

        try:
            bdrv_can_store_new_dirty_bitmap(bs, name, gran)
        except NotSupportedError:
            raise BlockError(errno.ENOTSUP, f"Can't store persistent bitmaps to {bs.node_name}: "
                                         f"{strerror(errno.ENOTSUP)}") from None
        bitmap = dbm.bdrv_create_dirty_bitmap(bs, gran, name)
        bitmap.persistent = True
    elif act == "remove":
        bitmap = _lookup_bitmap(bs, name)
        if bitmap.persistent:
            dbm.bdrv_remove_persistent_dirty_bitmap(bs, name)
        dbm.bdrv_release_dirty_bitmap(bitmap)
    elif act == "clear":
        dbm.bdrv_clear_dirty_bitmap(_lookup_bitmap(bs, name))
    elif act == "enable":
        dbm.bdrv_enable_dirty_bitmap(_lookup_bitmap(bs, name))
    elif act == "disable":
        dbm.bdrv_disable_dirty_bitmap(_lookup_bitmap(bs, name))
    elif act == "merge":
        dest = _lookup_bitmap(bs, name)
        dbm.bdrv_merge_dirty_bitmap(dest, _lookup_bitmap(src_bs, arg or ""))

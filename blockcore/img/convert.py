"""``blockcore-img convert``: copy images into a new (or existing, ``-n``) image.

This module reads the command line, opens and creates the images and copies bitmaps; the
copy itself is :mod:`.convert_copy`.
"""

from __future__ import annotations

import sys
from typing import Any

from ..cliutil import (
    CliError,
    Progress,
    qemu_strtol,
    strerror,
    warn_report,
)
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    LongOpt,
    cvtnum,
    describe_error,
    getopts,
    img_open,
    parse_cache_mode,
)
from .convert_copy import (
    MAX_BUF_SECTORS,
    MAX_COROUTINES,
    SECTOR,
    ConvertState,
    CopyFailed,
    RateLimit,
    convert_do_copy,
)
from .create import accumulate_options
from .createopts import CreateOpts
from .snapshot import SnapshotRef, load_snapshot_tmp

__all__ = ["img_convert"]

def img_convert(argv: list[str]) -> int:
    fmt = out_fmt = out_baseimg = backing_fmt = snapshot_name = None
    cache, src_cache = "unsafe", "writeback"
    options: str | None = None
    image_opts = skip_create = progress = tgt_image_opts = force_share = False
    explicit_min_sparse = bitmaps = skip_broken = False
    s = ConvertState()
    longopts = [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE,
                LongOpt("target-image-opts", 0, "\x02target-image-opts"),
                LongOpt("salvage", 0, "\x02salvage"),
                LongOpt("target-is-zero", 0, "\x02target-is-zero"),
                LongOpt("bitmaps", 0, "\x02bitmaps"),
                LongOpt("skip-broken-bitmaps", 0, "\x02skip-broken-bitmaps")]  # fmt: skip
    opts, g = getopts(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", longopts)
    for c, arg in opts:
        if c == "f":
            fmt = arg
        elif c == "O":
            out_fmt = arg
        elif c == "B":
            out_baseimg = arg
        elif c == "C":
            s.copy_range = True
        elif c == "c":
            s.compressed = True
        elif c == "F":
            backing_fmt = arg
        elif c == "o":
            options = accumulate_options(options, arg or "")
        elif c == "l":
            snapshot_name = SnapshotRef.parse(arg or "")
        elif c == "S":
            sval = cvtnum("buffer size for sparse output", arg or "")
            if sval % SECTOR or sval // SECTOR > MAX_BUF_SECTORS:
                raise CliError("Invalid buffer size for sparse output specified. Valid sizes "
                               f"are multiples of {SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. "
                               "Select 0 to disable sparse detection (fully allocates output).")
            s.min_sparse = sval // SECTOR
            explicit_min_sparse = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg or ""
        elif c == "T":
            src_cache = arg or ""
        elif c == "q":
            s.quiet = True
        elif c == "n":
            skip_create = True
        elif c == "m":
            try:
                m = qemu_strtol(arg or "")
            except (ValueError, OverflowError):
                m = 0
            if not 1 <= m <= MAX_COROUTINES:
                raise CliError("Invalid number of coroutines. Allowed number of coroutines is "
                               f"between 1 and {MAX_COROUTINES}")
            s.num_coroutines = m
        elif c == "W":
            s.wr_in_order = False
        elif c == "U":
            force_share = True
        elif c == "r":
            rate = cvtnum("rate limit", arg or "")
            if rate:
                s.limit = RateLimit(rate)
        elif c == "\x02image-opts":
            image_opts = True
        elif c == "\x02salvage":
            s.salvage = True
        elif c == "\x02target-image-opts":
            tgt_image_opts = True
        elif c == "\x02target-is-zero":
            s.has_zero_init = True
        elif c == "\x02bitmaps":
            bitmaps = True
        elif c == "\x02skip-broken-bitmaps":
            skip_broken = True
    if not out_fmt and not tgt_image_opts:
        out_fmt = "raw"
    if s.compressed and s.copy_range:
        raise CliError("Cannot enable copy offloading when -c is used")
    if explicit_min_sparse and s.copy_range:
        raise CliError("Cannot enable copy offloading when -S is used")
    if s.copy_range and s.salvage:
        raise CliError("Cannot use copy offloading in salvaging mode")
    if tgt_image_opts and not skip_create:
        raise CliError("--target-image-opts requires use of -n flag")
    if skip_create and options:
        raise CliError("-o has no effect when skipping image creation")
    if s.has_zero_init and not skip_create:
        raise CliError("--target-is-zero requires use of -n flag")
    operands = g.argv[g.optind:]
    src_num = len(operands) - 1
    out_filename = operands[-1] if src_num >= 1 else None
    if options is not None:
        from ..cliutil import has_help_option

        if has_help_option(options):
            if out_fmt:
                from .create import print_option_help

                return print_option_help(out_fmt, out_filename)
            raise CliError("Option help requires a format be specified")
    if src_num < 1:
        raise CliError("Must specify image file name")
    try:
        src_flags, _ = parse_cache_mode(src_cache)
    except ValueError:
        raise CliError(f"Invalid source cache option: {src_cache}") from None
    if s.quiet:
        progress = False
    s.progress = Progress(progress, 1.0)
    s.progress.print(0, 100)
    ok = False
    try:
        _convert(s, operands[:-1], out_filename or "", fmt, out_fmt, out_baseimg, backing_fmt,
                 options, cache, src_flags, image_opts, tgt_image_opts, skip_create,
                 force_share, snapshot_name, bitmaps, skip_broken)
        ok = True
    except CopyFailed:
        return 1
    finally:
        if ok:
            s.progress.print(100, 0)
        s.progress.end()
        if s.target is not None:
            s.target.close()
        for blk in s.src:
            blk.close()
    return 0


def _supports_bitmaps(bs: Any) -> bool:
    """``bdrv_supports_persistent_dirty_bitmap``."""
    drv = getattr(bs, "drv", None)
    return drv is not None and drv.bdrv_co_can_store_new_dirty_bitmap is not None


def _copy_bitmaps(src: Any, dst: Any, skip_broken: bool) -> None:
    """``convert_copy_bitmaps``: every persistent bitmap of ``src``, contents included."""
    from .. import dirty_bitmap as dbm

    for bm in list(src.dirty_bitmaps):
        if not bm.persistent or bm.name is None:
            continue
        if bm.inconsistent:
            if skip_broken:
                warn_report(f"Skipping inconsistent bitmap '{bm.name}'")
                continue
            raise CliError(f"Cannot copy inconsistent bitmap '{bm.name}'",
                           hint="Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' "
                                "to delete it\n")
        try:
            new = dbm.bdrv_create_dirty_bitmap(dst, bm.granularity, bm.name)
            new.persistent = True
            if bm.disabled:
                dbm.bdrv_disable_dirty_bitmap(new)
        except (OSError, ValueError) as exc:
            msg, hint = describe_error(exc)
            raise CliError(f"Failed to create bitmap {bm.name}: {msg}", hint=hint) from None
        try:
            dbm.bdrv_merge_dirty_bitmap(new, bm)
        except (OSError, ValueError) as exc:
            msg, hint = describe_error(exc)
            raise CliError(f"Failed to populate bitmap {bm.name}: {msg}", hint=hint) from None


def _can_compress(fmt: str) -> bool:
    from ..drivers import bdrv_find_format

    try:
        drv = bdrv_find_format(fmt)
    except OSError:
        return False
    return drv.bdrv_co_pwritev_compressed is not None  # type: ignore[attr-defined]


def _convert(s: ConvertState, sources: list[str], out_filename: str, fmt: str | None,
             out_fmt: str | None, out_baseimg: str | None, backing_fmt: str | None,
             options: str | None, cache: str, src_flags: OpenFlags, image_opts: bool,
             tgt_image_opts: bool, skip_create: bool, force_share: bool,
             snapshot_name: SnapshotRef | None, bitmaps: bool, skip_broken: bool = False
             ) -> None:  # fmt: skip
    from ..io import bdrv_nb_sectors

    for name in sources:
        blk = img_open(name, fmt, src_flags, image_opts=image_opts, force_share=force_share)
        s.src.append(blk)
        s.src_names.append(name)
        try:
            sectors = bdrv_nb_sectors(blk.bs)
        except OSError as exc:
            raise CliError(f"Could not get size of {name}: {strerror(exc.errno or 5)}") from None
        s.src_sectors.append(sectors)
        s.total_sectors += sectors
    if snapshot_name is not None:
        if len(s.src) > 1:
            raise CliError("No support for concatenating multiple snapshot")
        load_snapshot_tmp(s.src[0].bs, snapshot_name)
    opts: CreateOpts | None = None
    if not skip_create:
        from ..errors import DriverNotFoundError

        assert out_fmt is not None
        try:
            opts = CreateOpts(out_fmt)
        except DriverNotFoundError:
            raise CliError(f"Unknown file format '{out_fmt}'") from None
        if not opts.can_create:
            raise CliError(f"Format driver '{out_fmt}' does not support image creation")
        if options:
            opts.parse(options)
        opts.set_number("size", s.total_sectors * SECTOR)
        if out_baseimg is not None:
            if not opts.has("backing_file"):
                raise CliError(f"Backing file not supported for file format '{out_fmt}'")
            opts.set("backing_file", out_baseimg)
        if backing_fmt is not None:
            if not opts.has("backing_fmt"):
                raise CliError(f"Backing file format not supported for file format '{out_fmt}'")
            opts.set("backing_fmt", backing_fmt)
    param = opts.get("backing_file") if opts is not None else None
    if param:
        out_baseimg = param
    s.target_has_backing = bool(out_baseimg)
    if s.has_zero_init and s.target_has_backing:
        raise CliError("Cannot use --target-is-zero when the destination image has a backing "
                       "file")
    if len(sources) > 1 and out_baseimg:
        raise CliError("Having a backing file for the target makes no sense when "
                       "concatenating multiple input images")
    if param and opts is not None and not opts.get("backing_fmt"):
        raise CliError("Use of backing file requires explicit backing format")
    if s.compressed:
        if opts is not None:
            if out_fmt and not _can_compress(out_fmt):
                raise CliError("Compression not supported for this file format")
            if opts.get("encryption") or opts.get("encrypt.format"):
                raise CliError("Compression and encryption not supported at the same time")
            prealloc = opts.get("preallocation")
            if prealloc and prealloc != "off":
                raise CliError("Compression and preallocation not supported at the same time")
    if bitmaps:
        if len(sources) > 1:
            raise CliError("Copying bitmaps only possible with single source")
        if not _supports_bitmaps(s.src[0].bs):
            raise CliError("Source lacks bitmap support")
    if not skip_create:
        assert opts is not None and out_fmt is not None
        from ..special import bdrv_create

        try:
            bdrv_create(out_fmt, out_filename, opts.driver_options())
        except (OSError, ValueError) as exc:
            msg, hint = describe_error(exc)
            raise CliError(f"{out_filename}: error while converting {out_fmt}: {msg}",
                           hint=hint) from None
    s.target_is_new = not skip_create
    flags = OpenFlags.RDWR | (OpenFlags.UNMAP if s.min_sparse else OpenFlags.NONE)
    try:
        cache_flags, _ = parse_cache_mode(cache)
    except ValueError:
        raise CliError(f"Invalid cache option: {cache}") from None
    s.target = img_open(out_filename, out_fmt if not tgt_image_opts else None, flags | cache_flags,
                        image_opts=tgt_image_opts)
    out_bs = s.target.bs
    if bitmaps and not _supports_bitmaps(out_bs):
        raise CliError(f"Format driver '{out_bs.drv.name}' does not support bitmaps")
    if s.compressed and not _can_compress(out_bs.drv.name):
        raise CliError("Compression not supported for this file format")
    s.buf_sectors = min(MAX_BUF_SECTORS, max(s.buf_sectors, out_bs.bl.opt_transfer // SECTOR,
                                             out_bs.bl.pdiscard_alignment // SECTOR))
    pow2 = 1
    while pow2 * 2 <= max(s.min_sparse, 1):
        pow2 *= 2
    s.alignment = max(pow2 if s.min_sparse else 1, -(-out_bs.bl.request_alignment // SECTOR))
    if skip_create:
        from ..io import bdrv_nb_sectors as nb

        try:
            out_sectors = nb(out_bs)
        except OSError as exc:
            raise CliError(f"unable to get output image length: {strerror(exc.errno or 5)}"
                           ) from None
        if out_sectors < s.total_sectors:
            raise CliError("output file is smaller than input file")
    if s.target_has_backing and s.target_is_new and out_bs.backing is not None:
        try:
            s.target_backing_sectors = bdrv_nb_sectors(out_bs.backing.bs)
        except OSError:
            s.target_backing_sectors = -1
    else:
        s.target_backing_sectors = -1
    from ..errors import NotSupportedError
    from ..info import bdrv_get_info

    try:
        bdi = bdrv_get_info(out_bs)
        s.compressed = s.compressed or bdi.needs_compressed_writes
        s.cluster_sectors = bdi.cluster_size // SECTOR
    except (NotSupportedError, OSError):
        if s.compressed:
            raise CliError("could not get block driver info") from None
    convert_do_copy(s)
    if bitmaps:
        _copy_bitmaps(s.src[0].bs, out_bs, skip_broken)
    try:
        s.target.flush()
    except OSError as exc:
        raise CliError(f"error while flushing: {strerror(exc.errno or 5)}") from None
    sys.stdout.flush()

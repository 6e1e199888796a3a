"""The smaller ``blockcore-img`` subcommands: rebase, commit, amend, snapshot, dd, bitmap."""

from __future__ import annotations

import errno
from typing import Any

from ..cliutil import CliError, Progress, check_interrupted, error_report, strerror
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
    parse_cache_mode,
)
from .create import accumulate_options
from .info import full_backing_filename

__all__ = ["img_amend", "img_bitmap", "img_commit", "img_dd", "img_rebase", "img_snapshot"]

IO_BUF_SIZE = 2 << 20
SECTOR = 512
INT_MAX = (1 << 31) - 1


def _hook(bs: Any, name: str) -> Any:
    drv = getattr(bs, "drv", None)
    return getattr(drv, name, None) if drv is not None else None


def change_backing_file(bs: Any, backing_file: str, backing_fmt: str) -> None:
    """``bdrv_change_backing_file`` (the core has no wrapper: the driver hook is called)."""
    fn = _hook(bs, "bdrv_change_backing_file")
    if fn is None:
        raise OSError(errno.ENOTSUP, strerror(errno.ENOTSUP))
    fn(bs, backing_file, backing_fmt)
    bs.backing_file = backing_file
    bs.backing_format = backing_fmt


# ---------------------------------------------------------------------------- rebase
def img_rebase(argv: list[str]) -> int:
    fmt = out_basefmt = out_baseimg = None
    cache = src_cache = "writeback"
    unsafe = progress = quiet = image_opts = force_share = False
    opts, g = getopts(argv, ":hf:F:b:upt:T:qU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in opts:
        if c == "f":
            fmt = arg
        elif c == "F":
            out_basefmt = arg
        elif c == "b":
            out_baseimg = arg
        elif c == "u":
            unsafe = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg or ""
        elif c == "T":
            src_cache = arg or ""
        elif c == "q":
            quiet = True
        elif c == "U":
            force_share = True
        elif c == "\x02image-opts":
            image_opts = True
    if quiet:
        progress = False
    rest = g.argv[g.optind:]
    if len(rest) != 1:
        raise error_exit("Expecting one image file name")
    if not unsafe and out_baseimg is None:
        raise error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = rest[0]
    prog = Progress(progress, 2.0)
    prog.print(0, 100)
    try:
        try:
            flags, _ = parse_cache_mode(cache)
        except ValueError:
            raise CliError(f"Invalid cache option: {cache}") from None
        try:
            src_flags, _ = parse_cache_mode(src_cache)
        except ValueError:
            raise CliError(f"Invalid source cache option: {src_cache}") from None
        flags |= OpenFlags.RDWR | (OpenFlags.NO_BACKING if unsafe else OpenFlags.NONE)
        blk = img_open(filename, fmt, flags, image_opts=image_opts)
        try:
            _rebase(blk, filename, out_baseimg, out_basefmt, unsafe, src_flags, force_share,
                    prog)
        finally:
            blk.close()
    finally:
        prog.end()
    return 0


def _rebase(blk: Any, filename: str, out_baseimg: str | None, out_basefmt: str | None,
            unsafe: bool, src_flags: OpenFlags, force_share: bool, prog: Progress) -> None:
    from ..backend import BlockBackend
    from ..io import bdrv_getlength
    from ..status import bdrv_is_allocated
    from .common import check_driver

    bs = blk.bs
    if out_basefmt is not None:
        try:
            check_driver(out_basefmt)
        except CliError:
            raise CliError(f"Invalid format name: '{out_basefmt}'") from None
    old_backing = new_backing = None
    try:
        if not unsafe:
            if bs.backing is not None:
                old_backing = BlockBackend.attach(bs.backing.bs)
            if out_baseimg:
                real = full_backing_filename(bs.filename or filename, out_baseimg)
                if real is None:
                    raise CliError("Could not resolve backing filename: Cannot use relative "
                                   f"backing file names for '{filename}'")
                try:
                    new_backing = img_open(real, out_basefmt, src_flags,
                                           force_share=force_share)
                except CliError as exc:
                    msg = exc.message or ""
                    prefix = f"Could not open '{real}': "
                    msg = msg.removeprefix(prefix)
                    raise CliError(f"Could not open new backing file '{out_baseimg}': {msg}",
                                   hint=exc.hint) from None
            size = bdrv_getlength(bs)
            old_size = bdrv_getlength(old_backing.bs) if old_backing else 0
            new_size = bdrv_getlength(new_backing.bs) if new_backing else 0
            local = 100.0 / (size / min(size, IO_BUF_SIZE)) if size else 0.0
            offset = 0
            while offset < size:
                check_interrupted()
                n = min(IO_BUF_SIZE, size - offset)
                try:
                    allocated, n = bdrv_is_allocated(bs, offset, n)
                except OSError as exc:
                    raise CliError("error while reading image metadata: "
                                   f"{strerror(exc.errno or 5)}") from None
                if allocated:
                    offset += n
                    continue
                old_zero = False
                if offset >= old_size:
                    buf_old = bytes(n)
                    old_zero = True
                else:
                    n = min(n, old_size - offset)
                    try:
                        buf_old = old_backing.pread(offset, n) if old_backing else bytes(n)
                    except OSError:
                        raise CliError("error while reading from old backing file") from None
                if offset >= new_size or new_backing is None:
                    buf_new = bytes(n)
                else:
                    n = min(n, new_size - offset)
                    try:
                        buf_new = new_backing.pread(offset, n)
                    except OSError:
                        raise CliError("error while reading from new backing file") from None
                from .compare import compare_buffers

                written = 0
                while written < n:
                    differ, pnum = compare_buffers(buf_old[written:], buf_new[written:],
                                                   n - written)
                    if differ:
                        try:
                            if old_zero:
                                blk.pwrite_zeroes(offset + written, pnum)
                            else:
                                blk.pwrite(offset + written, buf_old[written:written + pnum])
                        except OSError as exc:
                            raise CliError("Error while writing to COW image: "
                                           f"{strerror(exc.errno or 5)}") from None
                    written += pnum
                offset += n
                prog.print(local, 100)
        try:
            if out_baseimg:
                if not out_basefmt:
                    raise OSError(errno.EINVAL, "backing format must be specified")
                change_backing_file(bs, out_baseimg, out_basefmt)
            else:
                change_backing_file(bs, "", "")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CliError(f"Could not change the backing file to '{out_baseimg}': No "
                               "space left in the file header") from None
            msg = exc.strerror or strerror(exc.errno)
            raise CliError(f"Could not change the backing file to '{out_baseimg}': {msg}"
                           ) from None
        prog.print(100, 0)
    finally:
        for b in (old_backing, new_backing):
            if b is not None:
                b.close()


# ---------------------------------------------------------------------------- commit
def img_commit(argv: list[str]) -> int:
    fmt = base = None
    cache = "writeback"
    progress = quiet = drop = image_opts = False
    opts, g = getopts(argv, ":f:ht:b:dpqr:", [HELP, OBJECT, IMAGE_OPTS])
    for c, arg in opts:
        if c == "f":
            fmt = arg
        elif c == "t":
            cache = arg or ""
        elif c == "b":
            base = arg
            drop = True
        elif c == "d":
            drop = True
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "r":
            cvtnum("rate limit", arg or "")
        elif c == "\x02image-opts":
            image_opts = True
    if quiet:
        progress = False
    rest = g.argv[g.optind:]
    if len(rest) != 1:
        raise error_exit("Expecting one image file name")
    filename = rest[0]
    try:
        flags, _ = parse_cache_mode(cache)
    except ValueError:
        raise CliError(f"Invalid cache option: {cache}") from None
    blk = img_open(filename, fmt, flags | OpenFlags.RDWR | OpenFlags.UNMAP,
                   image_opts=image_opts)
    prog = Progress(progress, 1.0)
    prog.print(0, 100)
    try:
        layers, base_ref = _commit_plan(blk.bs, filename, base)
    finally:
        blk.close()
    try:
        _commit(layers, base_ref, flags, drop, prog)
    finally:
        prog.end()
    if not quiet:
        out("Image committed.\n")
    return 0


def _node_ref(bs: Any) -> tuple[str, str]:
    return bs.filename, bs.drv.name


def _commit_plan(bs: Any, filename: str, base: str | None
                 ) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """The layers to copy (top first) and the base to copy into, as (filename, format)."""
    from ..graph import bdrv_cow_bs

    chain = []
    node = bs
    while node is not None:
        chain.append(node)
        node = bdrv_cow_bs(node)
    if base is not None:
        from .info import full_backing_filename

        idx = next((i for i, n in enumerate(chain[1:], 1)
                    if n.filename in (base, full_backing_filename(bs.filename, base))), None)
        if idx is None:
            raise CliError(f"Did not find '{base}' in the backing chain of '{filename}'")
    else:
        if len(chain) < 2:
            raise CliError("Image does not have a backing file")
        idx = 1
    return [_node_ref(n) for n in chain[:idx]], _node_ref(chain[idx])


def _commit(layers: list[tuple[str, str]], base: tuple[str, str], cache_flags: OpenFlags,
            drop: bool, prog: Progress) -> None:
    """Copy what each layer above ``base`` holds into it, deepest layer first (a commit job
    without a job: blockcore has no reopen, so each image is opened on its own)."""
    from ..io import bdrv_getlength
    from ..status import bdrv_is_allocated

    base_blk = img_open(base[0], base[1], cache_flags | OpenFlags.RDWR | OpenFlags.RESIZE)
    try:
        sizes = []
        tops = []
        for name, fmt in reversed(layers):
            tops.append(img_open(name, fmt, OpenFlags.NO_BACKING, force_share=True))
        try:
            size = bdrv_getlength(tops[-1].bs)
            if bdrv_getlength(base_blk.bs) < size:
                base_blk.truncate(size)
            total = size * len(tops) or 1
            done = 0
            for top in tops:
                offset = 0
                while offset < size:
                    check_interrupted()
                    n = min(IO_BUF_SIZE, size - offset)
                    allocated, n = bdrv_is_allocated(top.bs, offset, n)
                    if not n:
                        break
                    if allocated:
                        base_blk.pwrite(offset, top.pread(offset, n))
                    offset += n
                    done += n
                    prog.print(100.0 * done / total, 0)
                sizes.append(size)
        finally:
            for top in tops:
                top.close()
        base_blk.flush()
    except OSError as exc:
        raise CliError(f"Block job failed: {strerror(exc.errno or 5)}") from None
    finally:
        base_blk.close()
    if not drop:
        name, fmt = layers[0]
        top_blk = img_open(name, fmt, OpenFlags.RDWR | OpenFlags.NO_BACKING)
        try:
            _make_empty(top_blk)
        finally:
            top_blk.close()
    prog.print(100, 0)


def _make_empty(blk: Any) -> None:
    """``bdrv_make_empty`` (the driver hook; without it the top image stays as it is, and
    a discard would not do: qcow2 discards read back as zeros, not as the backing file)."""
    fn = _hook(blk.bs, "bdrv_make_empty")
    if fn is None:
        return
    try:
        fn(blk.bs)
    except OSError as exc:
        if exc.errno != errno.ENOTSUP:
            raise CliError(exc.strerror or strerror(exc.errno)) from None


# ---------------------------------------------------------------------------- amend
#: Options QEMU's drivers can amend (``amend_opts``); other create options are refused.
AMEND_OPTS = {
    "qcow2": {"size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
              "lazy_refcounts", "refcount_bits"},
}

def img_amend(argv: list[str]) -> int:
    fmt = None
    cache = "writeback"
    options: str | None = None
    quiet = progress = image_opts = force = False
    opts, g = getopts(argv, ":ho:f:t:pq", [HELP, OBJECT, IMAGE_OPTS,
                                           LongOpt("force", 0, "\x02force")])
    for c, arg in opts:
        if c == "o":
            options = accumulate_options(options, arg or "")
        elif c == "f":
            fmt = arg
        elif c == "t":
            cache = arg or ""
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "\x02image-opts":
            image_opts = True
        elif c == "\x02force":
            force = True
    if options is None:
        raise error_exit("Must specify options (-o)")
    rest = g.argv[g.optind:]
    if quiet:
        progress = False
    prog = Progress(progress, 1.0)
    try:
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
            fn = _hook(bs, "bdrv_amend_options")
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


# ---------------------------------------------------------------------------- snapshot
def _snapshot_node(bs: Any, hook: str) -> Any:
    """The node that handles snapshots: ``bs``, else its primary child (QEMU's fallback)."""
    from ..graph import bdrv_primary_child

    node = bs
    while node is not None and node.drv is not None:
        if getattr(node.drv, hook, None) is not None:
            return node
        child = bdrv_primary_child(node)
        node = child.bs if child is not None else None
    return None


def snapshot_list(bs: Any) -> list[dict[str, Any]]:
    node = _snapshot_node(bs, "bdrv_snapshot_list")
    if node is None:
        return []
    return list(node.drv.bdrv_snapshot_list(node))


def _drained(bs: Any, fn: Any, *args: Any) -> Any:
    from ..drain import bdrv_drained_begin, bdrv_drained_end

    bdrv_drained_begin(bs)
    try:
        return fn(*args)
    finally:
        bdrv_drained_end(bs)


def img_snapshot(argv: list[str]) -> int:
    action = None
    name: str | None = None
    image_opts = force_share = False
    opts, g = getopts(argv, ":la:c:d:hqU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in opts:
        if c in "lacd":
            if action:
                raise error_exit("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = c, arg
        elif c == "U":
            force_share = True
        elif c == "\x02image-opts":
            image_opts = True
    rest = g.argv[g.optind:]
    if len(rest) != 1:
        raise error_exit("Expecting one image file name")
    flags = OpenFlags.NONE if action == "l" else OpenFlags.RDWR
    blk = img_open(rest[0], None, flags, image_opts=image_opts, force_share=force_share)
    try:
        _snapshot(blk.bs, action, name or "")
    finally:
        blk.close()
    return 0


def _snapshot(bs: Any, action: str | None, name: str) -> None:
    import time

    if action == "l":
        snaps = snapshot_list(bs)
        if snaps:
            from .output import snapshot_header, snapshot_line

            out("Snapshot list:\n" + snapshot_header() + "\n")
            for sn in snaps:
                out(snapshot_line(sn) + "\n")
    elif action == "c":
        now = time.time_ns()
        sn = {"id": "", "name": name, "vm-state-size": 0, "date-sec": now // 1_000_000_000,
              "date-nsec": now // 1000 % 1_000_000 * 1000, "vm-clock-sec": 0,
              "vm-clock-nsec": 0, "icount": 0}
        node = _snapshot_node(bs, "bdrv_snapshot_create")
        err = errno.ENOTSUP
        if node is not None:
            try:
                _drained(node, node.drv.bdrv_snapshot_create, node, sn)
                return
            except OSError as exc:
                err = exc.errno or errno.EIO
        raise CliError(f"Could not create snapshot '{name}': -{err} ({strerror(err)})")
    elif action == "a":
        if bs.dirty_bitmaps:  # bdrv_snapshot_goto refuses before anything else
            raise CliError(f"Could not apply snapshot '{name}': Device has active dirty "
                           "bitmaps")
        node = _snapshot_node(bs, "bdrv_snapshot_goto")
        if node is None:
            from ..graph import bdrv_primary_child
            from .common import warn_probed_raw

            if bdrv_primary_child(bs) is not None:
                # QEMU closes and reopens the format around its fallback: raw warns again
                warn_probed_raw(bs, OpenFlags.RDWR)
            raise CliError(f"Could not apply snapshot '{name}': Block driver does not support "
                           "snapshots")
        try:
            _drained(node, node.drv.bdrv_snapshot_goto, node, name)
        except OSError as exc:
            raise CliError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                           f"{strerror(exc.errno or 5)}") from None
    elif action == "d":
        found = next((sn for sn in snapshot_list(bs) if sn.get("name") == name), None)
        node = _snapshot_node(bs, "bdrv_snapshot_delete")
        if found is None or node is None:
            raise CliError(f"Could not delete snapshot '{name}': snapshot not found")
        try:
            _drained(node, node.drv.bdrv_snapshot_delete, node, found.get("id"), name)
        except OSError as exc:
            msg, hint = describe_error(exc)
            raise CliError(f"Could not delete snapshot '{name}': {msg}", hint=hint) from None


# ---------------------------------------------------------------------------- dd
def img_dd(argv: list[str]) -> int:
    fmt: str | None = None
    out_fmt = "raw"
    image_opts = force_share = False
    opts, g = getopts(argv, ":hf:O:U", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in opts:
        if c == "O":
            out_fmt = arg or ""
        elif c == "f":
            fmt = arg
        elif c == "U":
            force_share = True
        elif c == "\x02image-opts":
            image_opts = True
    bsz = 512
    count: int | None = None
    skip: int | None = None
    in_name = out_name = None
    for arg in g.argv[g.optind:]:
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
            src_blk = img_open(src_filename, src_fmt, OpenFlags.NONE)
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
        gran = granularity or _default_granularity(bs)
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

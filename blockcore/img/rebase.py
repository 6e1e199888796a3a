"""``blockcore-img rebase`` and ``commit``: move data between the layers of a backing chain."""

from __future__ import annotations

import errno
from typing import Any

from ..cliutil import CliError, Progress, check_interrupted, strerror
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    ImgArgs,
    cvtnum,
    error_exit,
    img_open,
    out,
    parse_args,
    parse_cache_mode,
)
from .info import full_backing_filename

__all__ = ["change_backing_file", "img_commit", "img_rebase"]

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
    a = parse_args(argv, ":hf:F:b:upt:T:qU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE],
                   {"F": "backing_fmt", "b": "backing", "u": "unsafe"},
                   cache="writeback", src_cache="writeback", unsafe=False)
    if len(a.operands) != 1:
        raise error_exit("Expecting one image file name")
    if not a.unsafe and a.backing is None:
        raise error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = a.operands[0]
    fmt, out_basefmt, out_baseimg, unsafe = a.fmt, a.backing_fmt, a.backing, a.unsafe
    cache, src_cache, image_opts, force_share = a.cache, a.src_cache, a.image_opts, a.force_share
    prog = Progress(a.progress, 2.0)
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
    def base_image(a: ImgArgs, arg: str | None) -> None:
        a.base, a.drop = arg, True  # -b implies -d

    def rate_limit(_a: ImgArgs, arg: str | None) -> None:
        cvtnum("rate limit", arg or "")  # checked, then unused: commit runs unthrottled

    a = parse_args(argv, ":f:ht:b:dpqr:", [HELP, OBJECT, IMAGE_OPTS],
                   {"b": base_image, "d": "drop", "r": rate_limit},
                   cache="writeback", base=None, drop=False)
    if len(a.operands) != 1:
        raise error_exit("Expecting one image file name")
    filename = a.operands[0]
    fmt, base, cache, drop, quiet, progress = a.fmt, a.base, a.cache, a.drop, a.quiet, a.progress
    image_opts = a.image_opts
    try:
        flags, _ = parse_cache_mode(cache)
    except ValueError:
        raise CliError(f"Invalid cache option: {cache}") from None
    blk = img_open(filename, fmt, flags | OpenFlags.RDWR | OpenFlags.UNMAP,
                   image_opts=image_opts)
    prog = Progress(progress, 1.0)
    prog.print(0, 100)
    try:  # the progress line ends before any error, as qemu-img's 'done:' path
        try:
            layers, base_ref = _commit_plan(blk.bs, filename, base)
        finally:
            blk.close()
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
    without a job: blockcore has no reopen, so each image is opened on its own).

    Like QEMU's commit (a mirror job), a range a layer holds as zeroes is written to the base
    as a zero write that may unmap, not as data, so a raw base gets holes there."""
    from ..io import bdrv_getlength
    from ..status import bdrv_block_status
    from ..types import BdrvRequestFlags, BlockStatusFlags

    base_blk = img_open(base[0], base[1],
                        cache_flags | OpenFlags.RDWR | OpenFlags.RESIZE | OpenFlags.UNMAP)
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
                    status = bdrv_block_status(top.bs, offset, n)
                    n = status.pnum
                    if not n:
                        break
                    if status.ret & BlockStatusFlags.ALLOCATED:
                        if status.ret & (BlockStatusFlags.ZERO | BlockStatusFlags.DATA) == (
                                BlockStatusFlags.ZERO):
                            base_blk.pwrite_zeroes(offset, n, BdrvRequestFlags.MAY_UNMAP)
                        else:
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

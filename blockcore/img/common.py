"""What every ``blockcore-img`` subcommand shares: option loops, opening images, error texts."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from ..cliutil import (
    CliError,
    GetoptLong,
    LongOpt,
    error_report,
    flatten,
    parse_json_filename,
    parse_opts,
    prog_name,
    qemu_strtosz,
)
from ..cliutil.report import _driver_message, describe_error, missing_package_hint
from ..types import OpenFlags

__all__ = [
    "CliError",
    "cvtnum",
    "cvtnum_full",
    "describe_error",
    "error_exit",
    "getopts",
    "img_open",
    "out",
    "parse_cache_mode",
    "parse_output",
]

INT64_MAX = (1 << 63) - 1

OBJECT = LongOpt("object", 1, "\x02object")
IMAGE_OPTS = LongOpt("image-opts", 0, "\x02image-opts")
HELP = LongOpt("help", 0, "h")
FORCE_SHARE = LongOpt("force-share", 0, "U")
OUTPUT = LongOpt("output", 1, "\x02output")


def out(text: str) -> None:
    """Write to stdout (QEMU's printf)."""
    sys.stdout.write(text)


def error_exit(message: str) -> CliError:
    """qemu-img's ``error_exit``: the message, then a pointer to ``--help``; exit status 1."""
    return CliError(message, 1,
                    hint=f"Try '{prog_name('blockcore-img')} --help' for more information\n")


def getopts(argv: Sequence[str], optstring: str, longopts: Sequence[LongOpt] = ()
            ) -> tuple[Iterator[tuple[str, str | None]], GetoptLong]:
    """Iterate ``(option, argument)`` like qemu-img's getopt loops.

    Unknown options, missing arguments and ``-h`` end the command the way qemu-img does.
    After the loop, ``g.argv[g.optind:]`` are the operands.
    """
    g = GetoptLong(argv, optstring, longopts)

    def gen() -> Iterator[tuple[str, str | None]]:
        for c, arg in g:
            if c == ":":
                raise error_exit(f"missing argument for option '{g.last_arg}'")
            if c == "?":
                raise error_exit(f"unrecognized option '{g.last_arg}'")
            if c == "h":
                from . import print_help

                print_help()
                raise CliError(None, 0)
            if c == "\x01":  # only with a leading '-' in optstring
                continue
            yield c, arg

    return gen(), g


class ImgArgs(SimpleNamespace):
    """The options of one qemu-img subcommand, by name, and its ``operands``.

    The usual ones are always there: ``fmt`` (-f), ``quiet`` (-q), ``progress`` (-p; off with
    -q), ``force_share`` (-U), ``image_opts``, ``output``, ``cache`` (-t) and ``src_cache``
    (-T); a subcommand's own letters add theirs (see :func:`parse_args`).
    """

    fmt: str | None
    quiet: bool
    progress: bool
    force_share: bool
    image_opts: bool
    output: str | None
    cache: str | None
    src_cache: str | None
    operands: list[str]


#: option -> ImgArgs attribute, for the letters most subcommands give the same meaning
COMMON_OPTIONS: dict[str, str] = {
    "f": "fmt", "q": "quiet", "p": "progress", "U": "force_share", "t": "cache",
    "T": "src_cache", "\x02image-opts": "image_opts", "\x02output": "output",
}  # fmt: skip


def parse_args(argv: Sequence[str], optstring: str, longopts: Sequence[LongOpt] = (),
               table: dict[str, str | Callable[[ImgArgs, str | None], None]] | None = None,
               **defaults: Any) -> ImgArgs:
    """qemu-img's getopt loop from a table: each option in ``optstring``/``longopts`` that
    ``COMMON_OPTIONS`` or ``table`` names sets that attribute (True for a flag, else its
    argument); a callable in ``table`` is called in the loop instead, so its errors come in
    qemu-img's order. Options named nowhere (``--object``) are accepted and ignored.
    ``defaults`` set attributes before the loop."""
    names = {**COMMON_OPTIONS, **(table or {})}
    args = ImgArgs(fmt=None, quiet=False, progress=False, force_share=False, image_opts=False,
                   output=None, cache=None, src_cache=None, operands=[])
    for name in names.values():
        if isinstance(name, str) and not hasattr(args, name):
            setattr(args, name, None)
    vars(args).update(defaults)
    opts, g = getopts(argv, optstring, longopts)
    for c, arg in opts:
        target = names.get(c)
        if callable(target):
            target(args, arg)
        elif target:
            setattr(args, target, True if arg is None else arg)
    args.operands = g.argv[g.optind:]
    if args.quiet:
        args.progress = False
    return args


def parse_output(value: str | None) -> str:
    """``--output``: human (default) or json."""
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise CliError("--output must be used with human or json as argument.")


def cvtnum_full(name: str, value: str, minimum: int, maximum: int) -> int:
    """qemu-img's ``cvtnum_full`` with its two error messages."""
    try:
        res, _ = qemu_strtosz(value)
    except ValueError:
        error_report(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for")
        raise CliError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
                       ) from None
    except OverflowError:
        res = maximum + 1
    if res > maximum or res < minimum:
        raise CliError(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return res


def cvtnum(name: str, value: str) -> int:
    return cvtnum_full(name, value, 0, INT64_MAX)


def parse_cache_mode(mode: str) -> tuple[OpenFlags, bool]:
    """``bdrv_parse_cache_mode``: the flags a cache mode sets, and whether it is writethrough."""
    if mode in ("off", "none"):
        return OpenFlags.NOCACHE, False
    if mode == "directsync":
        return OpenFlags.NOCACHE, True
    if mode == "writeback":
        return OpenFlags.NONE, False
    if mode == "unsafe":
        return OpenFlags.NO_FLUSH, False
    if mode == "writethrough":
        return OpenFlags.NONE, True
    raise ValueError(mode)


def parse_aio(mode: str) -> OpenFlags:
    """``bdrv_parse_aio``: threads, native or io_uring."""
    if mode == "threads":
        return OpenFlags.NONE
    if mode == "native":
        return OpenFlags.NATIVE_AIO
    if mode == "io_uring":
        return OpenFlags.IO_URING
    raise ValueError(mode)


# --------------------------------------------------------------------------------------------
# Errors from the library, as QEMU words them
# --------------------------------------------------------------------------------------------


def open_options(filename: str, fmt: str | None, image_opts: bool, force_share: bool
                 ) -> tuple[str | None, dict[str, Any]]:
    """Split an image name into (filename, options) as ``img_open`` does."""
    if image_opts:
        if fmt:
            raise CliError("--image-opts and --format are mutually exclusive")
        opts: dict[str, Any] = dict(parse_opts(filename, implied="file", warn=True))
        if force_share:
            if "force-share" in opts and opts["force-share"] != "on":
                raise CliError("--force-share/-U conflicts with image options")
            opts["force-share"] = "on"
        if "driver" not in opts and "file" not in opts:
            raise CliError(f"Could not open '{filename}': Must specify either driver or file")
        if "file" in opts and isinstance(opts["file"], str) and "driver" not in opts:
            return opts.pop("file"), opts
        return None, opts
    opts = {}
    if filename.startswith("json:"):
        try:
            opts = parse_json_filename(filename)
        except ValueError as exc:
            raise CliError(f"Could not open '{filename}': {exc}") from None
        name: str | None = None
    else:
        name = filename
    if fmt:
        opts["driver"] = fmt
    if force_share:
        opts["force-share"] = True
    return name, opts


def check_driver(fmt: str | None) -> None:
    """Fail like QEMU when ``-f`` names no installed driver."""
    if not fmt:
        return
    from ..drivers import bdrv_find_format
    from ..errors import DriverNotFoundError

    try:
        bdrv_find_format(fmt)
    except DriverNotFoundError as exc:
        raise CliError(_driver_message(exc.strerror or f"driver '{fmt}'"),
                       hint=missing_package_hint(fmt)) from None


def img_open(filename: str, fmt: str | None = None, flags: OpenFlags = OpenFlags.NONE,
             *, image_opts: bool = False, force_share: bool = False,
             what: str | None = None) -> Any:
    """Open an image as qemu-img's ``img_open``: a BlockBackend, or ``CliError`` with
    ``Could not open '<name>': <reason>``."""
    from ..backend import BlockBackend

    name, opts = open_options(filename, fmt, image_opts, force_share)
    try:
        check_driver(fmt)
    except CliError as exc:
        raise CliError(f"Could not open '{what or filename}': {exc.message}",
                       hint=exc.hint) from None
    try:
        blk = BlockBackend.open(name, flatten(opts), flags)
    except Exception as exc:  # noqa: BLE001 - reported as QEMU does, never a traceback
        msg, hint = describe_error(exc)
        raise CliError(f"Could not open '{what or filename}': {msg}", hint=hint) from None
    warn_probed_raw(blk.bs, flags)
    return blk


#: Magic numbers of QEMU formats (offset, bytes), to name a driver package that is missing.
_MAGICS = [
    ("vmdk", 0, b"KDMV"), ("vmdk", 0, b"COWD"), ("vdi", 0x40, b"\x7f\x10\xda\xbe"),
    ("vhdx", 0, b"vhdxfile"), ("vpc", 0, b"conectix"), ("qed", 0, b"QED\x00"),
    ("parallels", 0, b"WithoutFreeSpace"), ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"), ("cloop", 0, b"#!/bin/sh\n#V2.0 Format"),
    ("qcow", 0, b"QFI\xfb\x00\x00\x00\x01"), ("qcow2", 0, b"QFI\xfb"),
    ("luks", 0, b"LUKS\xba\xbe"),
]  # fmt: skip


def foreign_format(path: str) -> str | None:
    """The QEMU format whose magic ``path`` starts with, if its driver is not installed."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x48)
    except OSError:
        return None
    from ..drivers import bdrv_find_format

    for name, offset, magic in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            try:
                bdrv_find_format(name)
            except Exception:  # noqa: BLE001 - not installed (or broken): worth saying
                return name
            return None
    return None


def warn_probed_raw(bs: Any, flags: OpenFlags) -> None:
    """raw-format.c's warning when a writable image's format was guessed as raw; and, when
    the bytes look like a format whose driver is not installed, which package would read it."""
    drv = getattr(bs, "drv", None)
    if drv is None or drv.name != "raw" or not getattr(bs, "probed_format", False):
        return
    path = bs.file.bs.filename if bs.file is not None else bs.filename
    other = foreign_format(path) if path else None
    if other is not None:
        sys.stdout.flush()
        sys.stderr.write(f"{prog_name('blockcore-img')}: warning: '{path}' looks like a "
                         f"{other} image, but no installed driver reads {other}: opened as "
                         f"raw\n{missing_package_hint(other) or ''}")
        sys.stderr.flush()
    if not flags & OpenFlags.RDWR:
        return
    name = bs.file.bs.filename if bs.file is not None else bs.filename
    sys.stdout.flush()
    sys.stderr.write(
        f"WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
        "         Automatically detecting the format is dangerous for raw images, write "
        "operations on block 0 will be restricted.\n"
        "         Specify the 'raw' format explicitly to remove the restrictions.\n")
    sys.stderr.flush()


def quiet_library_logs() -> None:
    """Keep the library's log records off stderr (QEMU prints its own lines)."""
    import logging
    import os

    root = logging.getLogger()
    if os.environ.get("BLOCKCORE_DEBUG"):
        if not root.handlers:
            logging.basicConfig(level=logging.DEBUG)
        return
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
    logging.getLogger("blockcore").propagate = True


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO

"""``blockcore-img resize``: grow or (with ``--shrink``) shrink an image."""

from __future__ import annotations

from ..cliutil import CliError, qemu_strtosz, warn_report
from ..types import OpenFlags, PreallocMode
from .common import (
    HELP,
    IMAGE_OPTS,
    OBJECT,
    ImgArgs,
    LongOpt,
    describe_error,
    error_exit,
    img_open,
    out,
    parse_args,
)

__all__ = ["img_resize"]


def img_resize(argv: list[str]) -> int:
    # the size comes off argv first, so that "-1G" is not taken for an option
    if len(argv) < 3:
        raise error_exit("Not enough arguments")
    size = argv[-1]
    argv = argv[:-1]
    def preallocation(a: ImgArgs, arg: str | None) -> None:
        try:
            a.prealloc = PreallocMode(arg)
        except ValueError:
            raise CliError(f"Invalid preallocation mode '{arg}'") from None

    longopts = [HELP, OBJECT, IMAGE_OPTS, LongOpt("preallocation", 1, "\x02preallocation"),
                LongOpt("shrink", 0, "\x02shrink")]  # fmt: skip
    a = parse_args(argv, ":f:hq", longopts,
                   {"\x02preallocation": preallocation, "\x02shrink": "shrink"},
                   prealloc=PreallocMode.OFF, shrink=False)
    if len(a.operands) != 1:
        raise error_exit("Expecting image file name and size")
    filename = a.operands[0]
    fmt, quiet, image_opts, shrink, prealloc = a.fmt, a.quiet, a.image_opts, a.shrink, a.prealloc
    relative = 0
    if size[:1] == "+":
        relative, size = 1, size[1:]
    elif size[:1] == "-":
        relative, size = -1, size[1:]
    try:
        n, _ = qemu_strtosz(size)
    except (ValueError, OverflowError):
        raise CliError("Parameter 'size' expects a non-negative number below 2^64",
                       hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                            "tera-, peta-\nand exabytes, respectively.\n") from None
    blk = img_open(filename, fmt, OpenFlags.RDWR | OpenFlags.RESIZE, image_opts=image_opts)
    try:
        from ..io import bdrv_getlength

        try:
            current = bdrv_getlength(blk.bs)
        except OSError as exc:
            msg, _ = describe_error(exc)
            raise CliError(f"Failed to inquire current image length: {msg}") from None
        total = current + n * relative if relative else n
        if total <= 0:
            raise CliError("New image size must be positive")
        if total <= current and prealloc is not PreallocMode.OFF:
            raise CliError("Preallocation can only be used for growing images")
        if total < current and not shrink:
            from ..cliutil import error_report

            error_report("Use the --shrink option to perform a shrink operation.")
            warn_report("Shrinking an image will delete all data beyond the shrunken image's "
                        "end. Before performing such an operation, make sure there is no "
                        "important data there.")
            raise CliError(None, 1)
        try:
            blk.truncate(total, True, prealloc)
        except (OSError, ValueError) as exc:
            msg, hint = describe_error(exc)
            raise CliError(msg, hint=hint) from None
        if not quiet:
            out("Image resized.\n")
        return 0
    finally:
        blk.close()

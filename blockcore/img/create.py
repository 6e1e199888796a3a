"""``blockcore-img create`` (qemu-img's ``img_create`` + block.c's ``bdrv_img_create``)."""

from __future__ import annotations

from ..cliutil import CliError, is_valid_option_list
from ..types import OpenFlags
from .common import (
    HELP,
    OBJECT,
    ImgArgs,
    cvtnum,
    describe_error,
    error_exit,
    out,
    parse_args,
)
from .createopts import CreateOpts, option_help
from .info import full_backing_filename

__all__ = ["accumulate_options", "add_option", "img_create", "img_create_image"]


def add_option(a: ImgArgs, arg: str | None) -> None:
    """``-o``, as a :func:`parse_args` action: add to ``a.options``."""
    a.options = accumulate_options(a.options, arg or "")


def accumulate_options(options: str | None, arg: str) -> str:
    """Join several ``-o`` lists with ',' (``accumulate_options``)."""
    if not is_valid_option_list(arg):
        raise CliError(f"Invalid option list: {arg}")
    return arg if options is None else f"{options},{arg}"


def img_create(argv: list[str]) -> int:
    a = parse_args(argv, ":F:b:f:ho:qu", [HELP, OBJECT],
                   {"F": "base_fmt", "b": "base_filename", "o": add_option, "u": "no_backing"},
                   fmt="raw", options=None, no_backing=False)
    fmt, base_fmt, base_filename, options, quiet = (a.fmt, a.base_fmt, a.base_filename,
                                                    a.options, a.quiet)
    flags = OpenFlags.NO_BACKING if a.no_backing else OpenFlags.NONE
    rest = a.operands
    filename = rest[0] if rest else None
    if options is not None:
        from ..cliutil import has_help_option

        if has_help_option(options):
            return print_option_help(fmt, filename)
    if not rest:
        raise error_exit("Expecting image file name")
    img_size: int | None = None
    if len(rest) > 1:
        img_size = cvtnum("image size", rest[1])
    if len(rest) > 2:
        raise error_exit(f"Unexpected argument: {rest[2]}")
    assert filename is not None
    try:
        img_create_image(filename, fmt, base_filename, base_fmt, options, img_size, flags, quiet)
    except CliError as exc:
        raise CliError(f"{filename}: {exc.message}", exc.status, exc.hint) from None
    return 0


def print_option_help(fmt: str, filename: str | None) -> int:
    from ..errors import DriverNotFoundError

    try:
        text = option_help(fmt, filename)
    except DriverNotFoundError:
        raise CliError(f"Unknown file format '{fmt}'") from None
    out(text)
    return 0


def _create_opts(fmt: str, filename: str) -> CreateOpts:
    from ..errors import DriverNotFoundError

    try:
        opts = CreateOpts(fmt, filename=filename)
    except DriverNotFoundError as exc:
        text = exc.strerror or ""
        extra = f" ({text})" if "failed to load" in text else ""
        from .common import missing_package_hint

        raise CliError(f"Unknown file format '{fmt}'{extra}",
                       hint=missing_package_hint(fmt)) from None
    if not opts.can_create:
        raise CliError(f"Format driver '{fmt}' does not support image creation")
    return opts


def img_create_image(filename: str, fmt: str, base_filename: str | None, base_fmt: str | None,
                     options: str | None, img_size: int | None, flags: OpenFlags,
                     quiet: bool) -> None:
    """``bdrv_img_create``; errors are ``CliError`` without the filename prefix."""
    opts = _create_opts(fmt, filename)
    if options:
        opts.parse(options)
    if opts.get("size") is None:
        if img_size is not None:
            opts.set_number("size", img_size)
    elif img_size is not None:
        raise CliError("The image size must be specified only once")
    if base_filename is not None:
        if not opts.has("backing_file"):
            raise CliError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", base_filename)
    if base_fmt is not None:
        if not opts.has("backing_fmt"):
            raise CliError(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", base_fmt)
    backing_file = opts.get("backing_file")
    if backing_file is not None:
        if backing_file == filename:
            raise CliError("Error: Trying to create an image with the same filename as the "
                           "backing file")
        if backing_file == "":
            raise CliError("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    size = opts.get("size")
    if backing_file is not None and not flags & OpenFlags.NO_BACKING:
        backing_size = _probe_backing(filename, backing_file, backing_fmt)
        if size is None:
            opts.set_number("size", backing_size)
            size = backing_size
    elif backing_file is not None and not backing_fmt:
        raise CliError("Backing file specified without backing format")
    if size is None:
        raise CliError("Image creation needs a size parameter")
    if not quiet:
        out(opts.formatting_line(filename))
        import sys

        sys.stdout.flush()
    _create(fmt, filename, opts)


def _probe_backing(filename: str, backing_file: str, backing_fmt: str | None) -> int:
    from ..backend import BlockBackend
    from ..cliutil import flatten
    from ..io import bdrv_getlength
    from .common import check_driver, open_options

    full = full_backing_filename(filename, backing_file)
    if full is None:
        raise CliError(f"Cannot use relative backing file names for '{filename}'")
    try:
        check_driver(backing_fmt)
        name, bopts = open_options(full, backing_fmt, False, True)
        blk = BlockBackend.open(name, flatten(bopts), OpenFlags.NO_IO | OpenFlags.NO_BACKING)
    except CliError as exc:
        raise CliError(exc.message, hint="Could not open backing image.\n") from None
    except (OSError, ValueError) as exc:
        msg, hint = describe_error(exc)
        raise CliError(msg, hint=(hint or "") + "Could not open backing image.\n") from None
    try:
        if not backing_fmt:
            detected = blk.bs.drv.name if blk.bs.drv else "?"
            raise CliError("Backing file specified without backing format",
                           hint=f"Detected format of {detected}.")
        return int(bdrv_getlength(blk.bs))
    finally:
        blk.close()


def _create(fmt: str, filename: str, opts: CreateOpts) -> None:
    import errno

    from ..special import bdrv_create

    try:
        bdrv_create(fmt, filename, opts.driver_options())
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            hint = " (try using a larger cluster size)" if opts.get("cluster_size") else ""
            raise CliError(f"The image size is too large for file format '{fmt}'{hint}"
                           ) from None
        msg, hint = describe_error(exc)
        raise CliError(msg, hint=hint) from None


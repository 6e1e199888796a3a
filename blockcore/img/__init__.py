"""``blockcore-img``: qemu-img 7.2's command line over blockcore.

Same subcommands, options, output lines, JSON and exit codes as qemu-img, so scripts that
drive qemu-img work unchanged. Each subcommand lives in its own module (``info``, ``check``,
``map``, ...) and exposes ``run(argv) -> int``; :mod:`.output` holds the pure formatters and
:mod:`.common` the shared option handling and error texts. Error lines are prefixed with the
program's name as invoked, so a ``qemu-img`` link to this program prints what qemu-img prints.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ..cliutil import (
    LongOpt,
    prog_name,
    run_tool,
    set_prog_name,
)

__all__ = ["main", "print_help"]

VERSION = "7.2.0"

#: subcommand -> (module, usage line); the order is qemu-img's help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "amend": ("misc", "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] "
                      "[--force] -o options filename"),
    "bench": ("bench", "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] "
                       "[-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] "
                       "[-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename"),
    "bitmap": ("misc", "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | "
                       "--disable)... [-b source_file [-F source_fmt]] [-g granularity] "
                       "[--object objectdef] [--image-opts | -f fmt] filename bitmap"),
    "check": ("check", "check [--object objectdef] [--image-opts] [-q] [-f fmt] "
                       "[--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename"),
    "commit": ("rebase", "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] "
                       "[-b base] [-r rate_limit] [-d] [-p] filename"),
    "compare": ("compare", "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] "
                           "[-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2"),
    "convert": ("convert", "convert [--object objectdef] [--image-opts] [--target-image-opts] "
                           "[--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] "
                           "[-f fmt] [-t cache] [-T src_cache] [-O output_fmt] "
                           "[-B backing_file [-F backing_fmt]] [-o options] "
                           "[-l snapshot_param] [-S sparse_size] [-r rate_limit] "
                           "[-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] "
                           "output_filename"),
    "create": ("create", "create [--object objectdef] [-q] [-f fmt] [-b backing_file "
                         "[-F backing_fmt]] [-u] [-o options] filename [size]"),
    "dd": ("misc", "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] "
                   "[count=blocks] [skip=blocks] if=input of=output"),
    "info": ("info", "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
                     "[--backing-chain] [-U] filename"),
    "map": ("map", "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] "
                   "[--max-length=len] [--output=ofmt] [-U] filename"),
    "measure": ("measure", "measure [--output=ofmt] [-O output_fmt] [-o options] "
                           "[--size N | [--object objectdef] [--image-opts] [-f fmt] "
                           "[-l snapshot_param] filename]"),
    "snapshot": ("snapshot", "snapshot [--object objectdef] [--image-opts] [-U] [-q] "
                         "[-l | -a snapshot | -c snapshot | -d snapshot] filename"),
    "rebase": ("rebase", "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] "
                       "[-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] "
                       "filename"),
    "resize": ("resize", "resize [--object objectdef] [--image-opts] [-f fmt] "
                         "[--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size"),
}


def print_help() -> None:
    """``qemu-img --help``: usage, command syntax and the installed formats."""
    prog = prog_name("blockcore-img")
    lines = [
        f"{prog} version {VERSION} (blockcore, a Python reimplementation of the QEMU block layer)",
        f"usage: {prog} [standard options] command [command options]",
        "QEMU disk image utility",
        "",
        "    '-h', '--help'       display this help and exit",
        "    '-V', '--version'    output version information and exit",
        "    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]",
        "                         specify tracing options",
        "",
        "Command syntax:",
    ]
    lines += [f"  {usage}" for _, usage in COMMANDS.values()]
    lines += [
        "",
        "Command parameters:",
        "  'filename' is a disk image filename",
        "  'objectdef' is a QEMU user creatable object definition (accepted and ignored)",
        "  'fmt' is the disk image format. It is guessed automatically in most cases",
        "  'cache' is the cache mode used to write the output disk image, the valid",
        "    options are: 'none', 'writeback' (default, except for convert), 'writethrough',",
        "    'directsync' and 'unsafe' (default for convert)",
        "  'src_cache' is the cache mode used to read input disk images, the valid",
        "    options are the same as for the 'cache' option",
        "  'size' is the disk image size in bytes. Optional suffixes",
        "    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),",
        "    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are",
        "    supported. 'b' is ignored.",
        "  'output_filename' is the destination disk image filename",
        "  'output_fmt' is the destination format",
        "  'options' is a comma separated list of format specific options in a",
        "    name=value format. Use -o help for an overview of the options supported by",
        "    the used format",
        "  'snapshot_param' is param used for internal snapshot, format",
        "    is 'snapshot.id=[ID],snapshot.name=[NAME]', or",
        "    '[ID_OR_NAME]'",
        "  '-c' indicates that target image must be compressed (qcow format only)",
        "  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and",
        "       new backing file match exactly. The image doesn't need a working",
        "       backing file before rebasing in this case (useful for renaming the",
        "       backing file). For image creation, allow creating without attempting",
        "       to open the backing file.",
        "  '-h' with or without a command shows this help and lists the supported formats",
        "  '-p' show progress of command (only certain commands)",
        "  '-q' use Quiet mode - do not print any output (except errors)",
        "  '-S' indicates the consecutive number of bytes (defaults to 4k) that must",
        "       contain only zeros for qemu-img to create a sparse image during",
        "       conversion. If the number of bytes is 0, the source will not be scanned for",
        "       unallocated or zero sectors, and the destination image will always be",
        "       fully allocated",
        "  '--output' takes the format in which the output must be done (human or json)",
        "  '-n' skips the target volume creation (useful if the volume is created",
        "       prior to running qemu-img)",
        "",
        "Parameters to check subcommand:",
        "  '-r' tries to repair any inconsistencies that are found during the check.",
        "       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all",
        "       kinds of errors, with a higher risk of choosing the wrong fix or",
        "       hiding corruption that has already occurred.",
        "",
        "Parameters to compare subcommand:",
        "  '-f' first image format",
        "  '-F' second image format",
        "  '-s' run in Strict mode - fail on different image size or sector allocation",
        "",
    ]
    try:
        from ..drivers import bdrv_list_drivers

        formats = sorted(bdrv_list_drivers())
    except Exception:  # noqa: BLE001 - help must not fail
        formats = []
    sys.stdout.write("\n".join(lines) + "\nSupported formats: " + " ".join(formats) + "\n\n"
                     "Each format is a blockcore driver plugin (blockcore-raw, blockcore-qcow2, "
                     "...).\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``blockcore-img`` (and ``python -m blockcore.img``)."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        args = ["blockcore-img"]
    from ..cliutil import install_sigint_handler
    from .common import quiet_library_logs

    quiet_library_logs()
    install_sigint_handler()
    return run_tool(lambda: _main(args), newline_on_interrupt=True)


def _main(argv: list[str]) -> int:
    from .common import error_exit, getopts

    if len(argv) < 2:
        raise error_exit("Not enough arguments")
    opts, g = getopts(argv, "+:hVT:", [LongOpt("help", 0, "h"), LongOpt("version", 0, "V"),
                                        LongOpt("trace", 1, "T")])  # fmt: skip
    for c, _arg in opts:  # getopts answers -h and bad options itself
        if c == "V":
            prog = prog_name("blockcore-img")
            sys.stdout.write(f"{prog} version {VERSION} (blockcore)\n"
                             "Command line compatible with qemu-img 7.2\n")
            return 0
        # -T (tracing) is accepted and ignored
    rest = g.argv[g.optind:]
    if not rest:
        return 0
    cmd = rest[0]
    if cmd not in COMMANDS:
        raise error_exit(f"Command not found: {cmd}")
    module = importlib.import_module(f".{COMMANDS[cmd][0]}", __name__)
    runner = getattr(module, f"img_{cmd}")
    return int(runner(rest))


def _module_main() -> int:
    set_prog_name(prog_name("blockcore-img"))
    return main()

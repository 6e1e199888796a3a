"""``blockcore-io``: qemu-io 7.2's command language over blockcore.

Run commands given with ``-c`` (repeatable), or read them from stdin after a ``qemu-io> ``
prompt. The exit status is 1 when opening failed or any command failed, as qemu-io's. Output
lines (``read N/N bytes at offset X``, timing lines, hex dumps, errors) are qemu-io's, and
errors are prefixed with the program's name as invoked.

Layout: :mod:`.state` holds the session (open image, pending AIO, dispatch), :mod:`.rw` the
I/O commands, :mod:`.commands` the others, :mod:`.helptext` qemu-io's help texts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..cliutil import GetoptLong, LongOpt, error_report, prog_name, run_tool, set_prog_name

__all__ = ["main"]

VERSION = "7.2.0"


def usage(name: str) -> None:
    sys.stdout.write(
        f"Usage: {name} [OPTIONS]... [-c STRING]... [file]\n"
        "QEMU Disk exerciser\n"
        "\n"
        "  --object OBJECTDEF   define an object such as 'secret' for\n"
        "                       passwords and/or encryption keys\n"
        "  --image-opts         treat file as option string\n"
        "  -c, --cmd STRING     execute command with its arguments\n"
        "                       from the given string\n"
        "  -f, --format FMT     specifies the block driver to use\n"
        "  -r, --read-only      export read-only\n"
        "  -s, --snapshot       use snapshot file\n"
        "  -n, --nocache        disable host cache, short for -t none\n"
        "  -C, --copy-on-read   enable copy-on-read\n"
        "  -m, --misalign       misalign allocations for O_DIRECT\n"
        "  -k, --native-aio     use kernel AIO implementation\n"
        "                       (Linux only, prefer use of -i)\n"
        "  -i, --aio=MODE       use AIO mode (threads, native or io_uring)\n"
        "  -t, --cache=MODE     use the given cache mode for the image\n"
        "  -d, --discard=MODE   use the given discard mode for the image\n"
        "  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
        "                       specify tracing options\n"
        "                       see qemu-img(1) man page for full description\n"
        "  -U, --force-share    force shared permissions\n"
        "  -h, --help           display this help and exit\n"
        "  -V, --version        output version information and exit\n"
        "\n"
        f"See '{name} -c help' for information on available commands.\n"
        "\n"
        "blockcore: a Python reimplementation of the QEMU block layer.\n")


LONGOPTS = [
    LongOpt("help", 0, "h"), LongOpt("version", 0, "V"), LongOpt("cmd", 1, "c"),
    LongOpt("format", 1, "f"), LongOpt("read-only", 0, "r"), LongOpt("snapshot", 0, "s"),
    LongOpt("nocache", 0, "n"), LongOpt("copy-on-read", 0, "C"), LongOpt("misalign", 0, "m"),
    LongOpt("native-aio", 0, "k"), LongOpt("aio", 1, "i"), LongOpt("discard", 1, "d"),
    LongOpt("cache", 1, "t"), LongOpt("trace", 1, "T"), LongOpt("object", 1, "\x02object"),
    LongOpt("image-opts", 0, "\x02image-opts"), LongOpt("force-share", 0, "U"),
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``blockcore-io`` (and ``python -m blockcore.qemu_io``)."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        args = ["blockcore-io"]
    from ..img.common import quiet_library_logs

    quiet_library_logs()
    return run_tool(lambda: _main(args))


def _main(argv: list[str]) -> int:
    from . import commands  # noqa: F401 - registers the commands
    from .commands import OpenOptions
    from .state import Session, image_opts_dict

    name = prog_name("blockcore-io")
    argv = [name] + argv[1:]
    how = OpenOptions()
    fmt: str | None = None
    cmdline: list[str] = []
    s = Session()
    g = GetoptLong(argv, "hVc:d:f:rsnCmki:t:T:U", LONGOPTS)
    for c, arg in g:
        taken = how.take(c, arg)
        if taken is False:
            return 1
        if taken:
            continue
        if c == "f":
            fmt = arg
        elif c == "c":
            cmdline.append(arg or "")
        elif c == "m":
            s.misalign = True
        elif c == "T":
            pass
        elif c == "V":
            sys.stdout.write(f"{name} version {VERSION} (blockcore)\n"
                             "Command line compatible with qemu-io 7.2\n")
            return 0
        elif c == "h":
            usage(name)
            return 0
        elif c == "\x02object":
            pass
        elif c == "\x02image-opts":
            s.image_opts = True
        else:
            usage(name)
            return 1
    rest = g.argv[g.optind:]
    if len(rest) > 1:
        usage(name)
        return 1
    if fmt and s.image_opts:
        error_report("--image-opts and -f are mutually exclusive")
        return 1
    flags, writethrough, force_share = how.open_flags, how.writethrough, how.force_share
    if rest:
        if s.image_opts:
            opts = image_opts_dict(rest[0])
            if opts is None:
                return 1
            if s.openfile(None, flags, writethrough, force_share, opts):
                return 1
        else:
            opts = {"driver": fmt} if fmt else None
            if s.openfile(rest[0], flags, writethrough, force_share, opts):
                return 1
    try:
        last_error = command_loop(s, cmdline)
    finally:
        try:
            s.drain()
            s.close()
        except Exception:  # noqa: BLE001
            pass
    return 1 if last_error < 0 else 0


def command_loop(s: object, cmdline: list[str]) -> int:
    from .state import Session

    assert isinstance(s, Session)
    last_error = 0
    if cmdline:
        for line in cmdline:
            if s.quit:
                break
            ret = s.command(line)
            if ret < 0:
                last_error = ret
        return last_error
    stdin = sys.stdin
    while not s.quit:
        sys.stdout.write(f"{prog_name('blockcore-io')}> ")
        sys.stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.removesuffix("\n")
        ret = s.command(line)
        if ret < 0:
            last_error = ret
    return last_error


def _module_main() -> int:
    set_prog_name(prog_name("blockcore-io"))
    return main()

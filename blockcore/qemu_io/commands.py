"""qemu-io's other commands: alloc, map, length, info, truncate, open/close/reopen, help,
sleep, sigraise, abort, quit and the blkdebug breakpoint commands."""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from ..cliutil import cvtstr, dump_qobject_human, error_report, strerror
from ..types import OpenFlags, Perm, PreallocMode
from . import rw  # noqa: F401 - registers the I/O commands
from .helptext import HELP
from .rw import num, out, print_cvtnum_err
from .state import (
    CMD_FLAG_GLOBAL,
    CMD_NOFILE_OK,
    COMMANDS,
    Command,
    Session,
    find_command,
    image_opts_dict,
    register,
    usage,
)

SECTOR = 512


# ---------------------------------------------------------------------------- queries
def _is_allocated(bs: Any, offset: int, length: int) -> tuple[bool, int]:
    from ..status import bdrv_is_allocated

    return bdrv_is_allocated(bs, offset, length)


def alloc_f(s: Session, argv: list[str]) -> int:
    try:
        start = offset = num(argv[1])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, argv[1])
    if len(argv) == 3:
        try:
            count = num(argv[2])
        except (ValueError, OverflowError) as exc:
            return print_cvtnum_err(exc, argv[2])
    else:
        count = SECTOR
    remaining = count
    sum_alloc = 0
    bs = s.blk.bs
    while remaining:
        try:
            allocated, n = _is_allocated(bs, offset, remaining)
        except OSError as exc:
            out(f"is_allocated failed: {strerror(exc.errno or 5)}\n")
            return -(exc.errno or 5)
        offset += n
        remaining -= n
        if allocated:
            sum_alloc += n
        if n == 0:
            count -= remaining
            remaining = 0
    out(f"{sum_alloc}/{count} bytes allocated at offset {cvtstr(start)}\n")
    return 0


def _map_is_allocated(bs: Any, offset: int, length: int) -> tuple[bool, int]:
    first, n = _is_allocated(bs, offset, length)
    pnum = n
    while length > 0:
        offset += n
        length -= n
        if length <= 0:
            break
        ret, n = _is_allocated(bs, offset, length)
        if ret == first and n:
            pnum += n
        else:
            break
    return first, pnum


def map_f(s: Session, argv: list[str]) -> int:
    from ..io import bdrv_getlength

    try:
        length = bdrv_getlength(s.blk.bs)
    except OSError as exc:
        error_report(f"Failed to query image length: {strerror(exc.errno or 5)}")
        return -(exc.errno or 5)
    offset = 0
    while length:
        try:
            ret, n = _map_is_allocated(s.blk.bs, offset, length)
        except OSError as exc:
            error_report(f"Failed to get allocation status: {strerror(exc.errno or 5)}")
            return -(exc.errno or 5)
        if not n:
            error_report("Unexpected end of image")
            return -errno.EIO
        state = "    allocated" if ret else "not allocated"
        out(f"{cvtstr(n)} (0x{n:x}) bytes {state} at offset {cvtstr(offset)} (0x{offset:x})\n")
        offset += n
        length -= n
    return 0


def length_f(s: Session, argv: list[str]) -> int:
    from ..io import bdrv_getlength

    try:
        size = bdrv_getlength(s.blk.bs)
    except OSError as exc:
        out(f"getlength: {strerror(exc.errno or 5)}\n")
        return -(exc.errno or 5)
    out(cvtstr(size) + "\n")
    return 0


def info_f(s: Session, argv: list[str]) -> int:
    from ..errors import NotSupportedError
    from ..info import bdrv_get_info, bdrv_get_specific_info
    from ..types import BlockDriverInfo

    bs = s.blk.bs
    if bs.drv is not None:
        out(f"format name: {bs.drv.name}\n")
        if bs.drv.descriptor.protocol_name:
            out(f"format name: {bs.drv.descriptor.protocol_name}\n")
    try:
        bdi = bdrv_get_info(bs)
    except NotSupportedError as exc:
        if bs.drv is None or bs.drv.name not in ("raw", "file", "host_device", "host_cdrom"):
            return -(exc.errno or errno.ENOTSUP)
        bdi = BlockDriverInfo()
    except OSError as exc:
        return -(exc.errno or 5)
    out(f"cluster size: {cvtstr(bdi.cluster_size)}\n")
    out(f"vm state offset: {cvtstr(bdi.vm_state_offset)}\n")
    spec = bdrv_get_specific_info(bs)
    if spec:
        out("Format specific information:\n")
        out(dump_qobject_human(spec.get("data", {}), 1))
    return 0


def truncate_f(s: Session, argv: list[str]) -> int:
    prealloc = PreallocMode.OFF
    g = s.getopt(argv, "m:")
    for c, arg in g:
        if c == "m":
            try:
                prealloc = PreallocMode(arg)
            except ValueError:
                error_report(f"Invalid preallocation mode '{arg}'")
                return -errno.EINVAL
        else:
            return usage(TRUNCATE)
    rest = g.argv[g.optind:]
    if not rest:
        return usage(TRUNCATE)
    try:
        offset = num(rest[0])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, argv[1])
    try:
        s.blk.truncate(offset, False, prealloc)
    except (OSError, ValueError) as exc:
        from ..cliutil import describe_error

        msg, hint = describe_error(exc)
        error_report(msg, hint)
        return -(exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO)
    return 0


# ---------------------------------------------------------------------------- open/close
def parse_cache(mode: str, flags: OpenFlags) -> tuple[OpenFlags, bool] | None:
    from ..img.common import parse_cache_mode

    try:
        cache_flags, writethrough = parse_cache_mode(mode)
    except ValueError:
        return None
    return (flags & ~OpenFlags.CACHE_MASK) | cache_flags, writethrough


def parse_discard(mode: str, flags: OpenFlags) -> OpenFlags | None:
    if mode in ("off", "ignore"):
        return flags & ~OpenFlags.UNMAP
    if mode in ("on", "unmap"):
        return flags | OpenFlags.UNMAP
    return None


def parse_aio_flag(mode: str, flags: OpenFlags) -> OpenFlags | None:
    from ..img.common import parse_aio

    try:
        return flags | parse_aio(mode)
    except ValueError:
        return None


@dataclass
class OpenOptions:
    """How to open the image: what qemu-io's command line and its ``open`` command share
    (``-s -n -C -r -k -t -d -i -U``)."""

    flags: OpenFlags = OpenFlags.UNMAP
    writethrough: bool = True
    readonly: bool = False
    force_share: bool = False

    def take(self, c: str, arg: str | None) -> bool | None:
        """Apply option ``c``: True if done, False if its value is invalid (the error line
        is printed), None if ``c`` is not one of these options."""
        simple = {"s": OpenFlags.SNAPSHOT, "n": OpenFlags.NOCACHE,
                  "C": OpenFlags.COPY_ON_READ, "k": OpenFlags.NATIVE_AIO}
        if c in simple:
            self.flags |= simple[c]
            self.writethrough = self.writethrough and c != "n"
        elif c == "r":
            self.readonly = True
        elif c == "U":
            self.force_share = True
        elif c == "t":
            parsed = parse_cache(arg or "", self.flags)
            if parsed is None:
                error_report(f"Invalid cache option: {arg}")
                return False
            self.flags, self.writethrough = parsed
        elif c in "di":
            parse, what = (parse_discard, "discard") if c == "d" else (parse_aio_flag, "aio")
            new = parse(arg or "", self.flags)
            if new is None:
                error_report(f"Invalid {what} option: {arg}")
                return False
            self.flags = new
        else:
            return None
        return True

    @property
    def open_flags(self) -> OpenFlags:
        return self.flags if self.readonly else self.flags | OpenFlags.RDWR


def open_f(s: Session, argv: list[str]) -> int:
    how = OpenOptions()
    opts: dict[str, Any] = {}
    g = s.getopt(argv, "snCro:ki:t:d:U")
    for c, arg in g:
        taken = how.take(c, arg)
        if taken is False:
            return -errno.EINVAL
        if taken:
            continue
        if c == "o":
            if s.image_opts:
                out("--image-opts and 'open -o' are mutually exclusive\n")
                return -errno.EINVAL
            parsed_opts = image_opts_dict(arg or "")
            if parsed_opts is None:
                return -errno.EINVAL
            opts.update(parsed_opts)
        else:
            return usage(OPEN)
    flags, writethrough, force_share = how.open_flags, how.writethrough, how.force_share
    rest = g.argv[g.optind:]
    if s.image_opts and len(rest) == 1:
        parsed_opts = image_opts_dict(rest[0])
        if parsed_opts is None:
            return -errno.EINVAL
        opts.update(parsed_opts)
        rest = []
    if len(rest) == 1:
        ret = s.openfile(rest[0], flags, writethrough, force_share, opts)
    elif not rest:
        ret = s.openfile(None, flags, writethrough, force_share, opts)
    else:
        return usage(OPEN)
    return -errno.EINVAL if ret else 0


def close_f(s: Session, argv: list[str]) -> int:
    s.close()
    return 0


#: Generic options that reopen turns into open flags before any driver sees them.
_REOPEN_CACHE_FLAGS = {"cache.direct": OpenFlags.NOCACHE, "cache.no-flush": OpenFlags.NO_FLUSH}


def _qemu_bool(value: str) -> bool | None:
    """QAPI's bool parsing: on/yes/true/y and off/no/false/n; None for anything else."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    return None


def reopen_f(s: Session, argv: list[str]) -> int:
    flags = s.blk.bs.open_flags
    writethrough = s.writethrough
    has_rw = has_cache = False
    new_opts: dict[str, Any] = {}
    g = s.getopt(argv, "c:o:rw")
    for c, arg in g:
        if c == "c":
            parsed = parse_cache(arg or "", flags)
            if parsed is None:
                error_report(f"Invalid cache option: {arg}")
                return -errno.EINVAL
            flags, writethrough = parsed
            has_cache = True
        elif c == "o":
            parsed_opts = image_opts_dict(arg or "")
            if parsed_opts is None:
                return -errno.EINVAL
            new_opts.update(parsed_opts)
        elif c in "rw":
            if has_rw:
                error_report("Only one -r/-w option may be given")
                return -errno.EINVAL
            flags = flags & ~OpenFlags.RDWR if c == "r" else flags | OpenFlags.RDWR
            has_rw = True
        else:
            return usage(REOPEN)
    if g.optind != len(g.argv):
        return usage(REOPEN)
    if "read-only" in new_opts:
        if has_rw:
            error_report("Cannot set both -r/-w and 'read-only'")
            return -errno.EINVAL
        if new_opts["read-only"] in ("on", "true", "yes") and flags & OpenFlags.RDWR:
            error_report(f"Read-only block node '{s.blk.bs.node_name}' cannot support "
                         "read-write users")
            return -errno.EINVAL
    if has_cache and ({"cache.direct", "cache.no-flush"} & set(new_opts)):
        error_report("Cannot set both -c and the cache options")
        return -errno.EINVAL
    for key, flag in _REOPEN_CACHE_FLAGS.items():  # QEMU's update_flags_from_options
        if key in new_opts:
            value = _qemu_bool(new_opts.pop(key))
            if value is None:
                error_report(f"Parameter '{key}' expects 'on' or 'off'")
                return -errno.EINVAL
            flags = flags | flag if value else flags & ~flag
    s.drain()  # options the node cannot change: the core's reopen refuses them
    from ..cliutil import describe_error
    from ..lifecycle import bdrv_reopen

    bs = s.blk.bs
    try:
        read_only = not bs.open_flags & OpenFlags.RDWR
        if has_rw:
            read_only = not flags & OpenFlags.RDWR
        if "read-only" in new_opts:
            read_only = new_opts.pop("read-only") in ("on", "true", "yes")
        rest_flags = (flags & ~OpenFlags.RDWR) | (bs.open_flags & OpenFlags.RDWR)
        if read_only != (not bs.open_flags & OpenFlags.RDWR):
            # one transaction: a bad option leaves the access mode as it was (as QEMU)
            s.blk.reopen(read_only, new_opts, rest_flags)
        elif new_opts or rest_flags != bs.open_flags:
            bdrv_reopen(bs, rest_flags, new_opts)
    except (OSError, ValueError) as exc:
        msg, hint = describe_error(exc)
        error_report(msg, hint)
        return -errno.EINVAL
    if s.open_args is not None:
        name, old_opts, _old_flags = s.open_args
        s.open_args = (name, {**old_opts, **new_opts}, bs.open_flags)
    s.writethrough = writethrough
    return 0


def quit_f(s: Session, argv: list[str]) -> int:
    s.quit = True
    return 0


# ---------------------------------------------------------------------------- help
def help_oneline(name: str | None, cmd: Command) -> None:
    text = f"{name} " if name else f"{cmd.name} "
    if cmd.args is not None:
        text += f"{cmd.args} "
    out(text + f"-- {cmd.oneline}\n")


def help_f(s: Session, argv: list[str]) -> int:
    if len(argv) == 1:
        for cmd in sorted(COMMANDS.values(), key=lambda c: c.name):
            help_oneline(cmd.name, cmd)
        out("\nUse 'help commandname' for extended help.\n")
        return 0
    cmd = find_command(argv[1])
    if cmd is None:
        out(f"command {argv[1]} not found\n")
        return -errno.EINVAL
    help_oneline(argv[1], cmd)
    if cmd.name in HELP:
        out(HELP[cmd.name])
    return 0


# ---------------------------------------------------------------------------- misc
def sleep_f(s: Session, argv: list[str]) -> int:
    from ..cliutil import c_strtol_prefix

    ms, rest = c_strtol_prefix(argv[1])
    if ms < 0 or rest or not argv[1].strip():
        out(f"{argv[1]} is not a valid number\n")
        return -errno.EINVAL
    s.sleep(ms / 1000.0)
    return 0


def sigraise_f(s: Session, argv: list[str]) -> int:
    try:
        sig = num(argv[1])
    except (ValueError, OverflowError) as exc:
        return print_cvtnum_err(exc, argv[1])
    nsig = getattr(signal, "NSIG", 65)
    if sig > nsig:
        out(f"signal argument '{argv[1]}' is too large to be a valid signal\n")
        return -errno.EINVAL
    sys.stdout.flush()
    sys.stderr.flush()
    if 0 < sig < nsig:
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return 0


def abort_f(s: Session, argv: list[str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    os.abort()


# ---------------------------------------------------------------------------- blkdebug
def _debug(s: Session, hook: str, *args: str) -> int:
    from .. import manage

    try:
        getattr(manage, hook)(s.blk.bs, *args)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    return 0


def break_f(s: Session, argv: list[str]) -> int:
    ret = _debug(s, "bdrv_debug_breakpoint", argv[1], argv[2])
    if ret < 0:
        out(f"Could not set breakpoint: {strerror(-ret)}\n")
    return ret


def remove_break_f(s: Session, argv: list[str]) -> int:
    ret = _debug(s, "bdrv_debug_remove_breakpoint", argv[1])  # says "Resuming" at once
    if ret < 0:
        out(f"Could not remove breakpoint {argv[1]}: {strerror(-ret)}\n")
    return ret


def resume_f(s: Session, argv: list[str]) -> int:
    ret = _debug(s, "bdrv_debug_resume", argv[1])  # the request goes on at the next poll
    if ret < 0:
        out(f"Could not resume request: {strerror(-ret)}\n")
    return ret


def wait_break_f(s: Session, argv: list[str]) -> int:
    from ..manage import bdrv_debug_is_suspended

    s.poll_until(lambda: bdrv_debug_is_suspended(s.blk.bs, argv[1]))
    return 0


READ_ONLY_CMDS = [
    Command("alloc", alloc_f, 1, 2, "offset [count]", "checks if offset is allocated in the file",
            altname="a"),
    Command("map", map_f, 0, 0, "", "prints the allocated areas of a file"),
    Command("length", length_f, 0, 0, None, "gets the length of the current file",
            altname="l"),
    Command("info", info_f, 0, 0, None, "prints information about the current file",
            altname="i"),
    Command("close", close_f, 0, 0, None, "close the current open file", altname="c"),
    Command("quit", quit_f, 0, 0, None, "exit the program", altname="q", flags=CMD_FLAG_GLOBAL),
    Command("help", help_f, 0, 1, "[command]", "help for one or all commands", altname="?",
            flags=CMD_FLAG_GLOBAL),
    Command("sleep", sleep_f, 1, 1, None, "waits for the given value in milliseconds",
            flags=CMD_NOFILE_OK),
    Command("sigraise", sigraise_f, 1, 1, "signal", "raises a signal"),
    Command("abort", abort_f, 0, 0, None, "simulate a program crash using abort(3)",
            flags=CMD_FLAG_GLOBAL),
    Command("break", break_f, 2, 2, "event tag",
            "sets a breakpoint on event and tags the stopped request as tag"),
    Command("remove_break", remove_break_f, 1, 1, "tag", "remove a breakpoint by tag"),
    Command("resume", resume_f, 1, 1, "tag", "resumes the request tagged as tag"),
    Command("wait_break", wait_break_f, 1, 1, "tag", "waits for the suspension of a request"),
]
for _cmd in READ_ONLY_CMDS:
    register(_cmd)
TRUNCATE = register(Command("truncate", truncate_f, 1, 3, "[-m prealloc_mode] off",
                            "truncates the current file at the given offset", altname="t",
                            perm=Perm.RESIZE))
OPEN = register(Command("open", open_f, 1, -1,
                        "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
                        "open the file specified by path", altname="o", flags=CMD_NOFILE_OK))
REOPEN = register(Command("reopen", reopen_f, 0, -1, "[(-r|-w)] [-c cache] [-o options]",
                          "reopens an image with new options"))

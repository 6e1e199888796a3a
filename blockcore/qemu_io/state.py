"""The session of ``blockcore-io``: the open image, pending AIO, and command dispatch."""

from __future__ import annotations

import asyncio
import errno
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..cliutil import GetoptLong, error_report, flatten, parse_json_filename, parse_opts
from ..types import OpenFlags, Perm

__all__ = ["Command", "Session", "register"]

CMD_NOFILE_OK = 1
CMD_FLAG_GLOBAL = 2


@dataclass
class Command:
    """One qemu-io command (``cmdinfo_t``)."""

    name: str
    cfunc: Callable[[Session, list[str]], int]
    argmin: int
    argmax: int
    args: str | None
    oneline: str
    altname: str | None = None
    flags: int = 0
    perm: Perm = Perm.NONE


COMMANDS: dict[str, Command] = {}


def register(cmd: Command) -> Command:
    COMMANDS[cmd.name] = cmd
    return cmd


def find_command(name: str) -> Command | None:
    for cmd in sorted(COMMANDS.values(), key=lambda c: c.name):
        if cmd.name == name or cmd.altname == name:
            return cmd
    return None


def usage(cmd: Command) -> int:
    """``qemuio_command_usage``: the one-line usage on stdout."""
    sys.stdout.write(f"{cmd.name} {cmd.args} -- {cmd.oneline}\n")
    return -errno.EINVAL


class Session:
    """What qemu-io keeps between commands: the BlockBackend, flags, pending AIO."""

    def __init__(self) -> None:
        self.blk: Any = None
        self.image_opts = False
        self.misalign = False
        self.quit = False
        self.writethrough = True
        self.open_args: tuple[str | None, dict[str, Any], OpenFlags] | None = None
        self.pending: set[asyncio.Future[Any]] = set()

    # -- event loop ---------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        from ..aio import main_context

        return main_context().loop

    def start(self, coro: Any) -> None:
        """Start an AIO request now; its completion prints when the loop next runs."""
        task = self.loop.create_task(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        self.poll_once()

    def poll_once(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def poll_until(self, cond: Callable[[], bool]) -> None:
        """Run the loop until ``cond()`` holds (``while (!cond) aio_poll(ctx, true)``).
        ``cond`` runs between loop iterations, outside any coroutine, so it may call GS
        functions such as ``bdrv_debug_is_suspended``."""
        while not cond():
            self.loop.run_until_complete(asyncio.sleep(0.001))

    def drain(self) -> None:
        """Wait for every pending AIO request (``blk_drain_all``)."""
        while self.pending:
            self.loop.run_until_complete(asyncio.gather(*list(self.pending),
                                                        return_exceptions=True))

    def sleep(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    # -- opening --------------------------------------------------------------------------
    def openfile(self, name: str | None, flags: OpenFlags, writethrough: bool,
                 force_share: bool, opts: dict[str, Any] | None) -> int:
        from ..cliutil import describe_error
        from ..img.common import warn_probed_raw

        if self.blk is not None:
            error_report("file open already, try 'help close'")
            return 1
        opts = dict(opts or {})
        where = f" device {name}" if name is not None else ""
        if force_share:
            if "force-share" in opts and str(opts["force-share"]) != "on":
                error_report("-U conflicts with image options")
                return 1
            opts["force-share"] = "on"
            if flags & OpenFlags.RDWR:
                error_report(f"can't open{where}: force-share=on can only be used with "
                             "read-only images")
                return 1
        filename = name
        if name is not None and name.startswith("json:"):
            try:
                parsed = parse_json_filename(name)
            except ValueError as exc:
                error_report(f"can't open{where}: {exc}")
                return 1
            parsed.update(opts)
            opts, filename = parsed, None
        if name is None and "driver" not in opts and "file" not in opts and not any(
                k.startswith("file.") for k in opts):
            error_report(f"can't open{where}: Must specify either driver or file")
            return 1
        if "driver" in opts:
            from ..cliutil import CliError
            from ..img.common import check_driver

            try:
                check_driver(str(opts["driver"]))
            except CliError as exc:
                error_report(f"can't open{where}: {exc.message}", exc.hint)
                return 1
        try:
            self.blk = self._open(filename, opts, flags)
        except Exception as exc:  # noqa: BLE001 - reported as qemu-io does
            msg, hint = describe_error(exc)
            error_report(f"can't open{where}: {msg}", hint)
            return 1
        self.writethrough = writethrough
        self.open_args = (filename, opts, flags)
        warn_probed_raw(self.blk.bs, flags)
        return 0

    def _open(self, filename: str | None, opts: dict[str, Any], flags: OpenFlags) -> Any:
        """``blk_new_open``, with ``-s`` done as QEMU does: writes go to a temporary qcow2
        overlay (deleted at once, kept alive by the open file) over the read-only image."""
        from ..backend import BlockBackend

        if not flags & OpenFlags.SNAPSHOT:
            return BlockBackend.open(filename, flatten(opts), flags)
        import os
        import tempfile

        from ..special import bdrv_create

        base = BlockBackend.open(filename, flatten(opts), flags & ~(OpenFlags.RDWR |
                                                                   OpenFlags.SNAPSHOT))
        try:
            from ..io import bdrv_getlength

            size = bdrv_getlength(base.bs)
            fmt = base.bs.drv.name
            base_name = base.bs.filename
        finally:
            base.close()
        fd, tmp = tempfile.mkstemp(prefix="vl.", dir=os.environ.get("TMPDIR", "/var/tmp"))
        os.close(fd)
        try:
            backing_opts = {k: v for k, v in flatten(opts).items()}
            if filename is not None:
                backing_opts.setdefault("file.filename", os.path.abspath(base_name or filename))
            backing_opts["driver"] = fmt
            bdrv_create("qcow2", tmp, {"size": size})
            blk = BlockBackend.open(tmp, {"driver": "qcow2", **{f"backing.{k}": v for k, v in
                                                                 backing_opts.items()}},
                                    flags & ~OpenFlags.SNAPSHOT)
        finally:
            os.unlink(tmp)
        return blk

    def close(self) -> None:
        if self.blk is not None:
            self.drain()
            self.blk.close()
            self.blk = None
            self.open_args = None

    # -- dispatch -------------------------------------------------------------------------
    def command(self, line: str) -> int:
        """``qemuio_command``: split on spaces, find, check, run."""
        argv = [w for w in line.split(" ") if w]
        if not argv:
            return 0
        cmd = find_command(argv[0])
        if cmd is None:
            sys.stdout.flush()
            sys.stderr.write(f'command "{argv[0]}" not found\n')
            sys.stderr.flush()
            return -errno.EINVAL
        if not cmd.flags & CMD_FLAG_GLOBAL and not cmd.flags & CMD_NOFILE_OK and self.blk is None:
            sys.stdout.flush()
            sys.stderr.write("no file open, try 'help open'\n")
            sys.stderr.flush()
            return -errno.EINVAL
        n = len(argv) - 1
        if n < cmd.argmin or (cmd.argmax != -1 and n > cmd.argmax):
            if cmd.argmax == -1:
                text = f"expected at least {cmd.argmin} arguments"
            elif cmd.argmin == cmd.argmax:
                text = f"expected {cmd.argmin} arguments"
            else:
                text = f"expected between {cmd.argmin} and {cmd.argmax} arguments"
            sys.stdout.flush()
            sys.stderr.write(f"bad argument count {n} to {argv[0]}, {text}\n")
            sys.stderr.flush()
            return -errno.EINVAL
        if cmd.perm and self.blk is not None:
            from ..info import bdrv_is_read_only

            if cmd.perm & (Perm.WRITE | Perm.RESIZE) and bdrv_is_read_only(self.blk.bs):
                sys.stdout.flush()
                error_report("Block node is read-only")
                return -errno.EPERM
        try:
            return cmd.cfunc(self, argv)
        finally:
            sys.stdout.flush()

    def getopt(self, argv: list[str], optstring: str) -> GetoptLong:
        """A command's getopt (glibc messages on stderr, prefixed with the command name)."""
        sys.stdout.flush()
        return GetoptLong(argv, optstring)


def image_opts_dict(text: str) -> dict[str, str] | None:
    """``--image-opts``/``open -o`` strings: QemuOpts without an implied name."""
    try:
        return dict(parse_opts(text, implied=None, warn=True))
    except ValueError as exc:
        error_report(str(exc))
        return None

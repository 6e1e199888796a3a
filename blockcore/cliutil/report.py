"""Program name, one-line errors and ``strerror`` texts as QEMU prints them (util/qemu-error.c)."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import TextIO

_PROG: str | None = None


def set_prog_name(name: str | None) -> None:
    """Override the program name (``python -m`` has no useful ``argv[0]``)."""
    global _PROG
    _PROG = name


def prog_name(default: str = "blockcore") -> str:
    """The program's name as invoked: ``basename(sys.argv[0])``."""
    if _PROG:
        return _PROG
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not base or base in ("__main__.py", "-c", "-m") or base.endswith(".py"):
        return default
    return base


class CliError(Exception):
    """A reported failure: ``message`` (already without prefix) and the exit status to use."""

    def __init__(self, message: str | None, status: int = 1, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.hint = hint


def error_report(message: str, hint: str | None = None, file: TextIO | None = None) -> None:
    """``prog: message`` on stderr, then the hint verbatim (QEMU's error_append_hint text,
    which normally ends with a newline)."""
    out = file or sys.stderr
    out.write(f"{prog_name()}: {message}\n")
    if hint:
        out.write(hint)
    out.flush()


def warn_report(message: str, file: TextIO | None = None) -> None:
    out = file or sys.stderr
    out.write(f"{prog_name()}: warning: {message}\n")
    out.flush()


_STRERROR = {
    errno.EPERM: "Operation not permitted",
    errno.ENOENT: "No such file or directory",
    errno.EIO: "Input/output error",
    errno.E2BIG: "Argument list too long",
    errno.EBADF: "Bad file descriptor",
    errno.EAGAIN: "Resource temporarily unavailable",
    errno.ENOMEM: "Cannot allocate memory",
    errno.EACCES: "Permission denied",
    errno.EBUSY: "Device or resource busy",
    errno.EEXIST: "File exists",
    errno.EXDEV: "Invalid cross-device link",
    errno.ENODEV: "No such device",
    errno.ENOTDIR: "Not a directory",
    errno.EISDIR: "Is a directory",
    errno.EINVAL: "Invalid argument",
    errno.EFBIG: "File too large",
    errno.ENOSPC: "No space left on device",
    errno.ESPIPE: "Illegal seek",
    errno.EROFS: "Read-only file system",
    errno.ERANGE: "Numerical result out of range",
    errno.EDEADLK: "Resource deadlock avoided",
    errno.ENOSYS: "Function not implemented",
    errno.ENOTSUP: "Operation not supported",
    errno.ENOMEDIUM: "No medium found",
    errno.EMEDIUMTYPE: "Wrong medium type",
    errno.ETIMEDOUT: "Connection timed out",
    errno.ECANCELED: "Operation canceled",
    errno.EINPROGRESS: "Operation now in progress",
}


def strerror(err: int | None) -> str:
    """glibc's ``strerror`` text in the C locale."""
    if err is None:
        return "Unknown error"
    err = abs(err)
    if err in _STRERROR:
        return _STRERROR[err]
    return os.strerror(err)


def run_tool(body: Callable[[], int], *, newline_on_interrupt: bool = False) -> int:
    """Run a tool's body and end it the way both tools end: a :class:`CliError` is its one
    line and status, Ctrl-C is status 130 (after a newline on stderr with
    ``newline_on_interrupt``), a closed stdout 1, and any other exception one error line and
    status 1 (its traceback only with ``BLOCKCORE_DEBUG`` set). stdout is flushed last."""
    try:
        status = body()
    except CliError as exc:
        if exc.message:
            error_report(exc.message, exc.hint)
        status = exc.status
    except KeyboardInterrupt:
        if newline_on_interrupt:
            sys.stdout.flush()
            sys.stderr.write("\n")
        status = 130
    except BrokenPipeError:
        status = 1
    except SystemExit as exc:
        status = int(exc.code or 0)
    except Exception as exc:
        if os.environ.get("BLOCKCORE_DEBUG"):
            raise
        if isinstance(exc, OSError):  # one no command caught: QEMU's words, no class name
            error_report(*describe_error(exc))
        else:  # a bug: say what it is
            error_report(f"{type(exc).__name__}: {exc}")
        status = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return status


def print_check_messages(messages: list[str]) -> None:
    """Print the lines of a check (``BdrvCheckResult.messages``) to stderr as QEMU does: its
    error_report lines (:class:`~blockcore.types.CheckErrorLine`) after the program's name,
    the others as they are."""
    from ..types import CheckErrorLine

    for line in messages:
        if isinstance(line, CheckErrorLine):
            line = f"{prog_name()}: {line}"
        sys.stderr.write(line if line.endswith("\n") else line + "\n")
    sys.stderr.flush()


def describe_error(exc: BaseException) -> tuple[str, str | None]:
    """The message QEMU would print for ``exc`` (without the "Could not open" prefix) and its
    hint lines."""
    if not isinstance(exc, (OSError, ValueError)):
        # a failure while cleaning up can hide the real error: report the one that started it
        cause: BaseException | None = exc.__context__
        while cause is not None and not isinstance(cause, (OSError, ValueError)):
            cause = cause.__context__
        if cause is not None:
            exc = cause
    hint = getattr(exc, "hint", None)
    if hint and not hint.endswith("\n"):
        hint += "\n"
    if isinstance(exc, OSError):
        from ..errors import BlockError, DriverNotFoundError

        text = exc.strerror or ""
        if isinstance(exc, DriverNotFoundError):
            return _driver_message(text), hint
        if not isinstance(exc, BlockError) and exc.errno is not None:
            # raised by the OS (open, lock): QEMU's file driver says which file
            base = strerror(exc.errno)
            if exc.filename is not None:
                return f"Could not open '{exc.filename}': {base}", hint
            return base, hint
        if not text:
            text = strerror(exc.errno)
        if getattr(exc, "verbatim", False):  # QEMU's own text, lowercase start included
            return text, hint
        return text[:1].upper() + text[1:], hint
    if isinstance(exc, ValueError):
        return str(exc), hint
    return f"{type(exc).__name__}: {exc}", hint


#: QEMU 7.2's formats; the blockcore distribution that provides (or would provide) each.
QEMU_FORMATS = {
    "raw": "blockcore-raw", "file": "blockcore-raw", "qcow2": "blockcore-qcow2",
    "blkdebug": "blockcore-blkdebug", "host_device": "blockcore-host-device",
    "host_cdrom": "blockcore-host-device",
    **{name: f"blockcore-{name}" for name in (
        "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
        "copy-on-read", "dmg", "ftp", "ftps", "gluster", "http", "https", "iscsi", "iser",
        "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow",
        "qed", "quorum", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi",
        "vhdx", "vmdk", "vpc", "vvfat")},
}  # fmt: skip


def missing_package_hint(name: str) -> str | None:
    """A hint naming the distribution to install when ``name`` is a QEMU format that no
    installed blockcore driver provides (None for names QEMU does not know either)."""
    package = QEMU_FORMATS.get(name)
    if package is None:
        return None
    return f"The '{name}' format needs the {package} distribution, which is not installed.\n"


def _driver_message(text: str) -> str:
    import re

    m = re.search(r"driver '([^']*)'", text)
    name = m.group(1) if m else "?"
    if "failed to load" in text:
        return f"Unknown driver '{name}' ({text})"
    return f"Unknown driver '{name}'"

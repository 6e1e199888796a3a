"""Shared pieces of ``blockcore-img`` and ``blockcore-io``: QEMU's command-line conventions.

Everything here is pure (no I/O on images), so it is unit-tested against QEMU 7.2's outputs:

- :class:`GetoptLong` is glibc's ``getopt_long`` (argument permutation, clustered short options,
  abbreviated long options, the exact ``optind`` movements QEMU's messages depend on);
- :func:`qemu_strtosz` / :func:`cvtnum` parse sizes as ``qemu_strtosz`` does (``1.5k``, ``0x10``,
  ``4M``), :func:`size_to_str` prints them as ``size_to_str`` (``196 KiB``) and :func:`cvtstr`
  as qemu-io (``1.996 MiB``, ``512 bytes``); :func:`timestr` and :func:`io_report` are qemu-io's
  timing lines;
- :func:`to_json_pretty` prints a value as QEMU's QObject JSON writer, keys in QDict's hash
  order (:func:`qdict_order`), so ``--output=json`` is byte-identical;
- :func:`parse_json_filename`, :func:`parse_opts` (``key=value,,escaped`` with dotted keys) and
  :func:`flatten`/:func:`crumple` handle QEMU's ways of naming an image;
- :func:`error_report` prefixes messages with the program's name as invoked, and
  :class:`Progress` is qemu-img's ``    (12.34/100%)`` progress bar.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "CliError",
    "GetoptLong",
    "LongOpt",
    "Progress",
    "crumple",
    "cvtnum",
    "cvtstr",
    "dump_buffer",
    "error_report",
    "flatten",
    "io_report",
    "parse_json_filename",
    "parse_opts",
    "prog_name",
    "qdict_order",
    "qemu_strtol",
    "qemu_strtosz",
    "set_prog_name",
    "size_to_str",
    "strerror",
    "timestr",
    "to_json_pretty",
    "warn_report",
]

# --------------------------------------------------------------------------------------------
# Program name and error reporting (util/qemu-error.c)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# glibc getopt_long
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LongOpt:
    """One ``struct option``: ``has_arg`` 0 (none), 1 (required) or 2 (optional)."""

    name: str
    has_arg: int
    val: str


class GetoptLong:
    """glibc's ``getopt_long`` state machine, argv permutation included.

    Iterate to get ``(c, optarg)`` pairs; ``c`` is the option character or long option ``val``,
    ``'?'`` for an unknown option (``optopt`` holds it) and ``':'`` for a missing argument when
    ``optstring`` starts with ``:`` (otherwise ``'?'``). Without a leading ``:`` glibc's messages
    (``read: invalid option -- 'z'``) go to ``err``, prefixed with ``argv[0]``. After the loop,
    ``argv[optind:]`` are the operands. ``argv`` is permuted in place like glibc does, which is
    what QEMU's ``argv[optind - 1]`` in its messages refers to.
    """

    PERMUTE, REQUIRE_ORDER, RETURN_IN_ORDER = range(3)

    def __init__(self, argv: Sequence[str], optstring: str,
                 longopts: Iterable[LongOpt] = (), err: TextIO | None = None) -> None:
        self.argv = list(argv)
        self.longopts = list(longopts)
        self.err = err
        self.optind = 1
        self.optarg: str | None = None
        self.optopt: str | None = None
        self.nextchar: str | None = None
        self.first_nonopt = self.last_nonopt = 1
        if optstring[:1] == "-":
            self.ordering = self.RETURN_IN_ORDER
            optstring = optstring[1:]
        elif optstring[:1] == "+":
            self.ordering = self.REQUIRE_ORDER
            optstring = optstring[1:]
        elif os.environ.get("POSIXLY_CORRECT") is not None:
            self.ordering = self.REQUIRE_ORDER
        else:
            self.ordering = self.PERMUTE
        self.optstring = optstring
        self.print_errors = optstring[:1] != ":"

    # -- helpers --------------------------------------------------------------------------
    def _error(self, text: str) -> None:
        if self.print_errors:
            out = self.err or sys.stderr
            out.write(f"{self.argv[0]}: {text}\n")
            out.flush()

    def _exchange(self) -> None:
        a, b, c = self.first_nonopt, self.last_nonopt, self.optind
        self.argv[a:c] = self.argv[b:c] + self.argv[a:b]
        self.first_nonopt += self.optind - self.last_nonopt
        self.last_nonopt = self.optind

    def _nonoption(self) -> bool:
        arg = self.argv[self.optind]
        return arg[:1] != "-" or arg == "-"

    @property
    def last_arg(self) -> str:
        """``argv[optind - 1]``, the text QEMU names in "unrecognized option '%s'"."""
        return self.argv[self.optind - 1]

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        while True:
            c = self.getopt()
            if c is None:
                return
            yield c, self.optarg

    # -- the state machine ------------------------------------------------------------------
    def getopt(self) -> str | None:
        argc = len(self.argv)
        self.optarg = None
        if not self.nextchar:
            self.last_nonopt = min(self.last_nonopt, self.optind)
            self.first_nonopt = min(self.first_nonopt, self.optind)
            if self.ordering == self.PERMUTE:
                if self.first_nonopt != self.last_nonopt and self.last_nonopt != self.optind:
                    self._exchange()
                elif self.last_nonopt != self.optind:
                    self.first_nonopt = self.optind
                while self.optind < argc and self._nonoption():
                    self.optind += 1
                self.last_nonopt = self.optind
            if self.optind != argc and self.argv[self.optind] == "--":
                self.optind += 1
                if self.first_nonopt != self.last_nonopt and self.last_nonopt != self.optind:
                    self._exchange()
                elif self.first_nonopt == self.last_nonopt:
                    self.first_nonopt = self.optind
                self.last_nonopt = argc
                self.optind = argc
            if self.optind == argc:
                if self.first_nonopt != self.last_nonopt:
                    self.optind = self.first_nonopt
                return None
            if self._nonoption():
                if self.ordering == self.REQUIRE_ORDER:
                    return None
                self.optarg = self.argv[self.optind]
                self.optind += 1
                return "\x01"
            arg = self.argv[self.optind]
            if self.longopts and arg[1] == "-":
                self.nextchar = arg[2:]
                return self._long()
            self.nextchar = arg[1:]
        c, self.nextchar = self.nextchar[0], self.nextchar[1:]
        idx = self.optstring.find(c)
        if not self.nextchar:
            self.optind += 1
        if idx < 0 or c in ":;":
            self._error(f"invalid option -- '{c}'")
            self.optopt = c
            return "?"
        if self.optstring[idx + 1: idx + 2] == ":":
            if self.optstring[idx + 2: idx + 3] == ":":
                if self.nextchar:
                    self.optarg = self.nextchar
                    self.optind += 1
                self.nextchar = None
            else:
                if self.nextchar:
                    self.optarg = self.nextchar
                    self.optind += 1
                elif self.optind == argc:
                    self._error(f"option requires an argument -- '{c}'")
                    self.optopt = c
                    c = ":" if self.optstring[:1] == ":" else "?"
                else:
                    self.optarg = self.argv[self.optind]
                    self.optind += 1
                self.nextchar = None
        return c

    def _long(self) -> str:
        assert self.nextchar is not None
        text = self.nextchar
        name, eq, value = text.partition("=")
        found = next((o for o in self.longopts if o.name == name), None)
        if found is None:
            candidates = [o for o in self.longopts if o.name.startswith(name)]
            if candidates:
                first = candidates[0]
                ambiguous = [o for o in candidates
                             if (o.has_arg, o.val) != (first.has_arg, first.val)]
                if ambiguous:
                    names = " ".join(f"'--{o.name}'" for o in candidates)
                    self._error(f"option '--{text}' is ambiguous; possibilities: {names}")
                    self.nextchar = None
                    self.optind += 1
                    self.optopt = "\0"
                    return "?"
                found = first
        if found is None:
            self._error(f"unrecognized option '--{text}'")
            self.nextchar = None
            self.optind += 1
            self.optopt = "\0"
            return "?"
        self.optind += 1
        self.nextchar = None
        if eq:
            if found.has_arg:
                self.optarg = value
            else:
                self._error(f"option '--{found.name}' doesn't allow an argument")
                self.optopt = found.val
                return "?"
        elif found.has_arg == 1:
            if self.optind < len(self.argv):
                self.optarg = self.argv[self.optind]
                self.optind += 1
            else:
                self._error(f"option '--{found.name}' requires an argument")
                self.optopt = found.val
                return ":" if self.optstring[:1] == ":" else "?"
        return found.val


# --------------------------------------------------------------------------------------------
# Numbers (util/cutils.c)
# --------------------------------------------------------------------------------------------

_SUFFIX_EXP = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_U64 = 1 << 64
_INT64_MAX = (1 << 63) - 1
_LEADING_INT = re.compile(r"\s*([+-]?)(\d+)")
_LEADING_HEX = re.compile(r"\s*([+-]?)0[xX]([0-9a-fA-F]+)")
_FRACTION = re.compile(r"\.(\d*)(?:[eE][+-]?\d+)?")


def _suffix_mul(c: str, unit: int = 1024) -> int:
    exp = _SUFFIX_EXP.get(c.lower()) if c else None
    return -1 if exp is None else unit**exp


def qemu_strtosz(text: str, default_suffix: str = "B", unit: int = 1024,
                 allow_trailing: bool = False) -> tuple[int, int]:
    """QEMU's ``qemu_strtosz``: returns ``(bytes, end_index)``.

    Raises ``ValueError`` (``-EINVAL``: not a size, or trailing characters when
    ``allow_trailing`` is false) and ``OverflowError`` (``-ERANGE``: 2**64 bytes or more).
    """
    m = _LEADING_INT.match(text)
    if not m:
        raise ValueError(text)
    if m.group(1) == "-":
        raise ValueError(text)
    val = int(m.group(2))
    if val >= _U64:
        raise OverflowError(text)
    end = m.end()
    valf = 0
    if val == 0 and text[end:end + 1] in ("x", "X"):
        h = _LEADING_HEX.match(text)
        if not h:
            raise ValueError(text)
        val = int(h.group(2), 16)
        if val >= _U64:
            raise OverflowError(text)
        end = h.end()
        nxt = text[end:end + 1]
        if nxt == "." or _suffix_mul(nxt, unit) > 0:
            raise ValueError(text)
    elif text[end:end + 1] == ".":
        f = _FRACTION.match(text, end)
        assert f is not None
        if not f.group(1) and f.end() == end + 1:
            end += 1  # "1." or "1.k": strtod fails, skip the dot
        elif "e" in f.group(0).lower():
            raise ValueError(text)
        else:
            fraction = float("0" + f.group(0))
            valf = int(fraction * 2.0**64)
            end = f.end()
    mul = _suffix_mul(text[end:end + 1], unit)
    if mul > 0:
        end += 1
    else:
        mul = _suffix_mul(default_suffix, unit)
    if mul == 1:
        if valf:
            raise ValueError(text)
    else:
        # 64.64 fixed point times the unit, then round 0.5 upward (QEMU's mulu64 dance)
        frac = valf * mul
        result = val * mul + (frac >> 64) + ((frac & (_U64 - 1)) >> 63)
        if result >= _U64:
            raise OverflowError(text)
        val = result
    if not allow_trailing and end != len(text):
        raise ValueError(text)
    return val, end


def cvtnum(text: str) -> int:
    """qemu-io's ``cvtnum``: a size up to INT64_MAX (``ValueError``/``OverflowError``)."""
    value, _ = qemu_strtosz(text)
    if value > _INT64_MAX:
        raise OverflowError(text)
    return value


def qemu_strtol(text: str, base: int = 0, *, unsigned: bool = False) -> int:
    """``strtol``/``strtoul`` on the whole string (QEMU's ``qemu_strtol`` with ``end == NULL``)."""
    s = text.lstrip(" \t\n\r\f\v")
    m = re.match(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$" if base == 0 else
                 r"([+-]?)(\d+)$", s)
    if not m or not s:
        raise ValueError(text)
    digits = m.group(2)
    if base == 0:
        if digits[:2].lower() == "0x":
            value = int(digits[2:], 16)
        elif digits.startswith("0") and len(digits) > 1:
            value = int(digits, 8)
        else:
            value = int(digits)
    else:
        value = int(digits, base)
    if m.group(1) == "-":
        value = -value
        if unsigned:
            if value < -(_U64 - 1):
                raise OverflowError(text)
            value &= _U64 - 1
    limit = _U64 - 1 if unsigned else _INT64_MAX
    if value > limit or value < -(_INT64_MAX + 1):
        raise OverflowError(text)
    return value


def c_strtol_prefix(text: str) -> tuple[int, str]:
    """``strtol(text, &end, 0)``: the value and the unparsed rest (no error on garbage)."""
    m = re.match(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)", text)
    if not m:
        return 0, text
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif digits.startswith("0") and len(digits) > 1:
        value = int(digits, 8)
    else:
        value = int(digits)
    if m.group(1) == "-":
        value = -value
    value = max(min(value, _INT64_MAX), -(_INT64_MAX + 1))
    return value, text[m.end():]


# --------------------------------------------------------------------------------------------
# Sizes and times as text
# --------------------------------------------------------------------------------------------

_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(value: int) -> str:
    """QEMU's ``size_to_str``: ``"%0.3g %sB"`` of the best power of 1024 (``196 KiB``)."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)
    return "%0.3g %sB" % (value / (1 << (i * 10)), _SIZE_SUFFIXES[i])


_CVT_UNITS = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB"))


def cvtstr(value: float) -> str:
    """qemu-io's ``cvtstr``: ``64 KiB``, ``1.996 MiB``, ``512 bytes``, ``2.885442 bytes``."""
    for shift, suffix in _CVT_UNITS:
        if value >= (1 << shift):
            text = "%.3f" % (value / (1 << shift))
            break
    else:
        suffix = " bytes"
        text = "%f" % value
    i = text.find(".000")
    return text[:i] + suffix if i >= 0 else text + suffix


def timestr(seconds: float, verbose: bool = False) -> str:
    """qemu-io's ``timestr``: ``00.01 sec``, or ``H:MM:SS.ss`` with ``-C`` or past a second."""
    sec = int(seconds)
    frac = seconds - sec
    if verbose or sec:
        return "%u:%02u:%05.2f" % (sec // 3600, sec % 3600 // 60, sec % 60 + frac)
    return "%05.2f sec" % frac


def _tdiv(value: float, seconds: float) -> float:
    if seconds == 0:
        return math.inf if value > 0 else math.nan if value == 0 else -math.inf
    return value / seconds


def _cfloat(fmt: str, value: float) -> str:
    if math.isnan(value):
        return "-nan" if math.copysign(1, value) < 0 else "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return fmt % value


def io_report(op: str, seconds: float, offset: int, count: int, total: int, cnt: int,
              csv: bool = False) -> str:
    """qemu-io's ``print_report`` lines (with trailing newline)."""
    ts = timestr(seconds, verbose=csv)
    if csv:
        return "%d,%d,%s,%s,%s\n" % (total, cnt, ts, _cfloat("%.3f", _tdiv(total, seconds)),
                                      _cfloat("%.3f", _tdiv(cnt, seconds)))
    rate = _tdiv(total, seconds)
    rate_s = (_cfloat("%f", rate) + " bytes") if not math.isfinite(rate) else cvtstr(rate)
    if math.isinf(rate) and rate > 0:
        rate_s = "inf EiB"
    return (f"{op} {total}/{count} bytes at offset {offset}\n"
            f"{cvtstr(total)}, {cnt} ops; {ts} ({rate_s}/sec and "
            f"{_cfloat('%.4f', _tdiv(cnt, seconds))} ops/sec)\n")


def _isalnum(b: int) -> bool:
    return 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122


def dump_buffer(buf: bytes | memoryview, offset: int) -> str:
    """qemu-io's ``-v`` hex dump."""
    data = bytes(buf)
    out = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        hexpart = "".join("%02x " % b for b in chunk)
        text = "".join(chr(b) if _isalnum(b) else "." for b in chunk)
        out.append("%08x:  %s %s\n" % (offset + i, hexpart, text))
    return "".join(out)


# --------------------------------------------------------------------------------------------
# JSON as QEMU writes it (qobject/qdict.c, qobject/json-writer.c)
# --------------------------------------------------------------------------------------------

QDICT_BUCKET_MAX = 512


def _tdb_hash(name: str) -> int:
    data = name.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Keys in the order a QDict iterates them, given their insertion order.

    Buckets ascend; inside a bucket the most recently inserted key comes first.
    """
    indexed = list(enumerate(keys))
    indexed.sort(key=lambda ik: (_tdb_hash(ik[1]) % QDICT_BUCKET_MAX, -ik[0]))
    return [k for _, k in indexed]


def _quoted(text: str) -> str:
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0xD800 <= cp <= 0xDFFF:  # surrogateescape'd bytes: invalid UTF-8
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.17g" % value
    if isinstance(value, str):
        return _quoted(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def to_json_pretty(value: Any, pretty: bool = True) -> str:
    """``qobject_to_json_pretty``: 4-space indentation, QDict key order, QEMU's escaping.

    Dict keys are taken in insertion order (QAPI field order) and printed in QDict order.
    """
    out: list[str] = []

    def newline(depth: int) -> None:
        if pretty:
            out.append("\n" + " " * (depth * 4))

    def emit(v: Any, depth: int) -> None:
        if isinstance(v, dict):
            out.append("{")
            first = True
            for key in qdict_order(v.keys()):
                if not first:
                    out.append(",")
                    newline(depth + 1) if pretty else out.append(" ")
                else:
                    newline(depth + 1)
                    first = False
                out.append(_quoted(key) + ": ")
                emit(v[key], depth + 1)
            newline(depth)
            out.append("}")
        elif isinstance(v, (list, tuple)):
            out.append("[")
            first = True
            for item in v:
                if not first:
                    out.append(",")
                    newline(depth + 1) if pretty else out.append(" ")
                else:
                    newline(depth + 1)
                    first = False
                emit(item, depth + 1)
            newline(depth)
            out.append("]")
        else:
            out.append(_scalar(v))

    emit(value, 0)
    return "".join(out)


def dump_qobject_human(value: Any, indentation: int = 1) -> str:
    """``dump_qobject`` of block/qapi.c: the "Format specific information" block."""
    out: list[str] = []

    def scalar(v: Any) -> str:
        if v is True:
            return "true"
        if v is False:
            return "false"
        if v is None:
            return "null"
        if isinstance(v, float):
            return "%.17g" % v
        return str(v)

    def dump(v: Any, ind: int) -> None:
        if isinstance(v, dict):
            for key in qdict_order(v.keys()):
                item = v[key]
                composite = isinstance(item, (dict, list, tuple))
                out.append("%s%s:%s" % (" " * (ind * 4), key.replace("-", " "),
                                        "\n" if composite else " "))
                dump(item, ind + 1)
                if not composite:
                    out.append("\n")
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                composite = isinstance(item, (dict, list, tuple))
                out.append("%s[%d]:%s" % (" " * (ind * 4), i, "\n" if composite else " "))
                dump(item, ind + 1)
                if not composite:
                    out.append("\n")
        else:
            out.append(scalar(v))

    dump(value, indentation)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Image names: json:{...}, --image-opts, dotted keys
# --------------------------------------------------------------------------------------------


def flatten(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``qdict_flatten``: nested dicts become dotted keys (lists become ``key.N``)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            if value:
                out.update(flatten(value, full + "."))
            else:
                out[full] = {}
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    out.update(flatten(item, f"{full}.{i}."))
                else:
                    out[f"{full}.{i}"] = item
        else:
            out[full] = value
    return out


def crumple(options: dict[str, Any]) -> dict[str, Any]:
    """``qdict_crumple``-like: dotted keys become nested dicts (values kept as given).

    A key naming both a value and a sub-dict is an error (``ValueError``).
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"Cannot mix scalar and non-scalar keys: '{key}'")
            node = nxt
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ValueError(f"Cannot mix scalar and non-scalar keys: '{key}'")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(crumple(value))
        else:
            node[parts[-1]] = crumple(value) if isinstance(value, dict) else value
    return out


_JSON_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_json_filename(filename: str) -> dict[str, Any]:
    """Options of a ``json:{...}`` filename, flattened to dotted keys (``ValueError`` on errors).

    The messages follow QEMU: ``Could not parse the JSON options: ...``,
    ``Invalid JSON object given``.
    """
    text = filename[len("json:"):]
    try:
        value = json.loads(text)
    except ValueError:
        m = re.search(r"[{,:\[]\s*([A-Za-z_][A-Za-z0-9_]*)", text)
        word = m.group(1) if m and m.group(1) not in ("true", "false", "null") else None
        if word is None:
            w = _JSON_WORD.search(text)
            word = w.group(0) if w and w.group(0) not in ("true", "false", "null") else None
        detail = f"invalid keyword '{word}'" if word else "expecting value"
        raise ValueError(f"Could not parse the JSON options: JSON parse error, {detail}"
                         ) from None
    if not isinstance(value, dict):
        raise ValueError("Invalid JSON object given")
    return flatten(value)


def _get_opt_value(text: str, pos: int) -> tuple[str, int]:
    """Read a value up to a single ',' (',,' is an escaped comma)."""
    out = []
    while pos < len(text):
        ch = text[pos]
        if ch == ",":
            if text[pos + 1: pos + 2] == ",":
                out.append(",")
                pos += 2
                continue
            break
        out.append(ch)
        pos += 1
    return "".join(out), pos


def parse_opts(text: str, implied: str | None = None, warn: bool = False) -> dict[str, str]:
    """QemuOpts ``key=value,key2=value2`` with ``,,`` escaping (``opts_do_parse``).

    ``implied`` names a first parameter given without ``key=`` (``file`` for --image-opts).
    A later bare ``flag`` means ``flag=on`` and ``noflag`` ``flag=off``. Later keys win.
    """
    out: dict[str, str] = {}
    pos = 0
    first = True
    while pos < len(text):
        m = re.compile(r"[^=,]*").match(text, pos)
        assert m is not None
        end = m.end()
        if text[end:end + 1] != "=":
            if first and implied:
                name = implied
                value, pos = _get_opt_value(text, pos)
            else:
                name = text[pos:end]
                pos = end
                if name.startswith("no"):
                    name, value = name[2:], "off"
                else:
                    value = "on"
                if warn and name not in ("help", "?"):
                    prefix = "no" if value == "off" else ""
                    warn_report(f"short-form boolean option '{prefix}{name}' deprecated")
                    sys.stderr.write(f"Please use {name}={value} instead\n")
                    sys.stderr.flush()
        else:
            name = text[pos:end]
            value, pos = _get_opt_value(text, end + 1)
        if text[pos:pos + 1] == ",":
            pos += 1
        out.pop(name, None)
        out[name] = value
        first = False
    return out


def is_valid_option_list(text: str) -> bool:
    """qemu-img's check before joining several ``-o`` arguments with ','."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def has_help_option(text: str) -> bool:
    """Whether an option list asks for help (``help`` or ``?`` as a key)."""
    try:
        opts = parse_opts(text)
    except ValueError:
        return False
    return any(k in ("help", "?") for k in opts)


# --------------------------------------------------------------------------------------------
# Ctrl-C: stop long operations between requests, so images stay consistent
# --------------------------------------------------------------------------------------------

_interrupts = 0


def install_sigint_handler() -> None:
    """First Ctrl-C: remembered, and long loops stop at their next :func:`check_interrupted`
    (the request in flight completes, images are closed cleanly). Second: immediate."""
    import signal

    def handler(signum: int, frame: object) -> None:
        global _interrupts
        _interrupts += 1
        if _interrupts > 1:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (tests)
        pass


def check_interrupted() -> None:
    """Stop here (exit status 130) when Ctrl-C was pressed."""
    if _interrupts:
        raise CliError(None, 130)


# --------------------------------------------------------------------------------------------
# Progress (util/qemu-progress.c)
# --------------------------------------------------------------------------------------------


class Progress:
    """qemu-img's progress bar: ``    (12.34/100%)\\r``, redrawn when it moved ``min_skip``."""

    def __init__(self, enabled: bool, min_skip: float, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last_print = 0.0
        self.out = out

    def print(self, delta: float, maximum: int) -> None:
        current = delta if maximum == 0 else self.current + delta / 100 * maximum
        # QEMU keeps these in a C float
        current = _c_float(min(current, 100.0))
        self.current = current
        if (current > self.last_print + self.min_skip
                or current < self.last_print - self.min_skip
                or current == 0 or current == 100):
            self.last_print = current
            if self.enabled:
                out = self.out or sys.stdout
                out.write("    (%3.2f/100%%)\r" % current)
                out.flush()

    def end(self) -> None:
        if self.enabled:
            out = self.out or sys.stdout
            out.write("\n")
            out.flush()


def _c_float(value: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", value))[0]

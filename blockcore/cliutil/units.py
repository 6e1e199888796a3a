"""Sizes and times as QEMU prints them: ``size_to_str``, qemu-io's ``cvtstr`` and timing lines."""

from __future__ import annotations

import math

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

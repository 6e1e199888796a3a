"""Numbers on the command line, parsed as QEMU's util/cutils.c does (``1.5k``, ``0x10``)."""

from __future__ import annotations

import re

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


#: a sign, then a C integer as base 0 reads it: 0x hex, 0 octal, else decimal
_C_INTEGER = r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)"


def _base0_value(digits: str) -> int:
    if digits[:2].lower() == "0x":
        return int(digits[2:], 16)
    if digits.startswith("0") and len(digits) > 1:
        return int(digits, 8)
    return int(digits)


def qemu_strtol(text: str, base: int = 0, *, unsigned: bool = False) -> int:
    """``strtol``/``strtoul`` on the whole string (QEMU's ``qemu_strtol`` with ``end == NULL``)."""
    s = text.lstrip(" \t\n\r\f\v")
    m = re.match(_C_INTEGER + "$" if base == 0 else r"([+-]?)(\d+)$", s)
    if not m or not s:
        raise ValueError(text)
    digits = m.group(2)
    value = _base0_value(digits) if base == 0 else int(digits, base)
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
    m = re.match(r"\s*" + _C_INTEGER, text)
    if not m:
        return 0, text
    value = _base0_value(m.group(2))
    if m.group(1) == "-":
        value = -value
    value = max(min(value, _INT64_MAX), -(_INT64_MAX + 1))
    return value, text[m.end():]

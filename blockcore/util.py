"""Helpers every driver may use: alignment maths, aligned buffers, sizes, option parsing."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import re
from typing import Any

from .errors import BlockError
from .tiers import Tier, api

__all__ = [
    "aligned_buffer",
    "is_aligned",
    "is_zero",
    "parse_bool",
    "parse_json_filename",
    "parse_size",
    "round_down",
    "round_up",
    "unflatten_options",
]

PAGE_SIZE = mmap.PAGESIZE


@api(Tier.COMMON)
def round_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align``. Tier: common."""
    return -(-value // align) * align


@api(Tier.COMMON)
def round_down(value: int, align: int) -> int:
    """Round ``value`` down to a multiple of ``align``. Tier: common."""
    return value // align * align


@api(Tier.COMMON)
def is_aligned(value: int, align: int) -> bool:
    """Whether ``value`` is a multiple of ``align``. Tier: common."""
    return value % align == 0


@api(Tier.COMMON)
def aligned_buffer(size: int, align: int = PAGE_SIZE) -> memoryview:
    """A zero-filled writable buffer of ``size`` bytes whose address is ``align``-aligned.

    Backed by an anonymous mmap (page-aligned), so O_DIRECT accepts it and large copies run at
    full speed (a plain bytearray starts 16 bytes into a page). Tier: common.
    """
    if align < 1 or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two")
    if size == 0:
        return memoryview(bytearray())
    if align <= PAGE_SIZE:
        return memoryview(mmap.mmap(-1, round_up(size, PAGE_SIZE)))[:size]
    area = mmap.mmap(-1, round_up(size + align, PAGE_SIZE))
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(area)) % align
    return memoryview(area)[skip : skip + size]


_ZERO_PAGE = bytes(1 << 16)


@api(Tier.COMMON)
def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """Whether every byte of ``buf`` is zero (QEMU's ``buffer_is_zero``). Tier: common."""
    view = memoryview(buf).cast("B")
    n = len(view)
    step = len(_ZERO_PAGE)
    for start in range(0, n, step):
        chunk = view[start : start + step]
        if chunk != _ZERO_PAGE[: len(chunk)]:
            return False
    return True


_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$", re.IGNORECASE)


@api(Tier.COMMON)
def parse_size(text: str | int, default_suffix: str = "") -> int:
    """Parse ``64K``, ``1.5G``, ``512`` into bytes as QEMU's ``qemu_strtosz`` does. Tier: common.

    :raises BlockError: ``EINVAL`` for anything else, naming the text.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise BlockError(errno.EINVAL, f"invalid size {text!r}")
    number, suffix = m.group(1), (m.group(2) or default_suffix).lower()
    mult = _SUFFIXES[suffix]
    if "." in number:
        if mult == 1:
            raise BlockError(errno.EINVAL, f"invalid size {text!r}: fractions need a unit suffix")
        value = int(float(number) * mult)
    else:
        value = int(number) * mult
    if value >= 1 << 63:
        raise BlockError(errno.ERANGE, f"size {text!r} is too large")
    return value


@api(Tier.COMMON)
def parse_bool(value: object, key: str) -> bool:
    """QEMU's boolean option values: on/off, true/false, yes/no. Tier: common."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise BlockError(errno.EINVAL, f"parameter {key!r} expects 'on' or 'off', not {value!r}")


@api(Tier.COMMON)
def unflatten_options(options: dict[str, Any]) -> dict[str, Any]:
    """Turn dotted keys (``file.filename``) into nested dicts (QEMU's ``qdict_crumple``).

    Nested dicts given as values are merged. Tier: common.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = unflatten_options(value)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise BlockError(errno.EINVAL, f"option {key!r} conflicts with option {part!r}")
            node = nxt
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    return out


@api(Tier.COMMON)
def parse_json_filename(filename: str) -> dict[str, Any]:
    """Options from a ``json:{...}`` filename, unflattened. Tier: common."""
    try:
        value = json.loads(filename[len("json:") :])
    except ValueError as exc:
        raise BlockError(errno.EINVAL, f"could not parse json filename: {exc}", filename) from None
    if not isinstance(value, dict):
        raise BlockError(errno.EINVAL, "json filename must hold an object", filename)
    return unflatten_options(value)

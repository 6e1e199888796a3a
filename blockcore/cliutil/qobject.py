"""JSON as QEMU writes it: the QObject writer, keys in QDict's hash order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


#: characters QEMU's JSON writer escapes by name
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t"}


def _quoted(text: str) -> str:
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
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

    def scalar(v: Any) -> str:  # as in JSON, but strings (and anything else) unquoted
        if v is None or isinstance(v, (bool, int, float)):
            return _scalar(v)
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

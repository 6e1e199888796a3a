"""Naming an image as QEMU allows: ``json:{...}``, ``key=value,,escaped`` options, dotted keys."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from .report import warn_report


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

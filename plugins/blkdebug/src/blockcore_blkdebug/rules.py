"""blkdebug rules: config parsing (file, flat and nested options) and the event state machine.

Nothing here touches a node: :func:`parse_config_file` and :func:`parse_rule_options` turn
text into :class:`InjectErrorRule` / :class:`SetStateRule` values, :class:`RuleEngine` keeps
them per event and answers "does this request fail?" (QEMU's blkdebug.c rule_check and
blkdebug_debug_event, rewritten from the documented behaviour).
"""

from __future__ import annotations

import enum
import errno as errno_mod
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from blockcore.errors import BlockError
from blockcore.types import BLKDEBUG_EVENTS

__all__ = [
    "DEFAULT_IOTYPES",
    "InjectErrorRule",
    "IoType",
    "RuleEngine",
    "SetStateRule",
    "SuspendRule",
    "parse_config_file",
    "parse_rule_options",
]

_EVENTS = frozenset(BLKDEBUG_EVENTS)


class IoType(enum.IntFlag):
    """Request kinds an inject-error rule applies to (QAPI ``BlkdebugIOType``)."""

    READ = 1
    WRITE = 2
    WRITE_ZEROES = 4
    DISCARD = 8
    FLUSH = 16
    BLOCK_STATUS = 32


IOTYPE_NAMES: dict[str, IoType] = {
    "read": IoType.READ,
    "write": IoType.WRITE,
    "write-zeroes": IoType.WRITE_ZEROES,
    "discard": IoType.DISCARD,
    "flush": IoType.FLUSH,
    "block-status": IoType.BLOCK_STATUS,
}
#: Without ``iotype`` a rule hits every request kind except block status (as QEMU).
DEFAULT_IOTYPES = IoType.READ | IoType.WRITE | IoType.WRITE_ZEROES | IoType.DISCARD | IoType.FLUSH


@attrs.define(eq=False)
class InjectErrorRule:
    """``[inject-error]``: once ``event`` fired in ``state``, fail matching requests."""

    event: str
    number: int
    """Position in definition order (0 = first); printed in injected errors as "rule N"."""
    origin: str
    """Where the rule was written: ``blkdebug.conf:3`` or ``inject-error.0``."""
    state: int = 0
    """Engine state the event must happen in; 0 = any."""
    errno: int = errno_mod.EIO
    """Error to inject; 0 makes a matching rule let the request through."""
    offset: int = -1
    """Byte offset (``sector * 512``) the request must cover; -1 = any request."""
    once: bool = False
    """Delete the rule after it injected once."""
    immediately: bool = False
    """Fail without first yielding to the event loop."""
    iotypes: IoType = DEFAULT_IOTYPES


@attrs.define(eq=False)
class SetStateRule:
    """``[set-state]``: when ``event`` fires in ``state`` (0 = any), move to ``new_state``."""

    event: str
    number: int
    origin: str
    new_state: int
    state: int = 0


@attrs.define(eq=False)
class SuspendRule:
    """A breakpoint: suspend the next request raising ``event`` under ``tag`` (one-shot)."""

    event: str
    tag: str


Rule = InjectErrorRule | SetStateRule | SuspendRule

# -------------------------------------------------------------------------------------------
# Value parsing, shared by the file and option forms
# -------------------------------------------------------------------------------------------

_INJECT_KEYS = ("event", "state", "errno", "sector", "once", "immediately", "iotype")
_SET_STATE_KEYS = ("event", "state", "new_state")
_SECTIONS = {"inject-error": _INJECT_KEYS, "set-state": _SET_STATE_KEYS}


class _Where:
    """Names the place of a value in error messages: a file line or an option key."""

    def __init__(self, filename: str | None, prefix: str, lines: Mapping[str, int] | None,
                 header_line: int = 0) -> None:  # fmt: skip
        self.filename = filename
        self.prefix = prefix
        self.lines = lines
        self.header_line = header_line

    def error(self, key: str | None, problem: str) -> BlockError:
        if self.lines is not None:  # a config file: file:line, key
            line = self.lines.get(key, self.header_line) if key else self.header_line
            where = f"{self.filename}:{line}"
            what = f"key {key!r}: {problem}" if key else problem
            return BlockError(errno_mod.EINVAL, f"{where}: {what}", self.filename)
        name = f"{self.prefix}.{key}" if key else self.prefix
        return BlockError(errno_mod.EINVAL, f"option {name!r}: {problem}", self.filename)


def _number(value: Any, key: str, where: _Where, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise where.error(key, f"expects a number, not {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        try:
            number = int(text, 0)
        except ValueError:
            try:
                number = int(text, 10)  # "010": QEMU's strtoull reads octal; we read decimal
            except ValueError:
                raise where.error(key, f"expects a number, not {value!r}") from None
    if number < minimum:
        raise where.error(key, f"{number} is below {minimum}")
    return number


def _bool(value: Any, key: str, where: _Where) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "yes"):
        return True
    if text in ("off", "false", "no"):
        return False
    raise where.error(key, f"expects 'on' or 'off', not {value!r}")


def _event(value: Any, where: _Where) -> str:
    name = str(value).strip()
    if name not in _EVENTS:
        raise where.error("event", f"unknown event {name!r}")
    return name


def _errno(value: Any, where: _Where) -> int:
    """A number (host errno, 0 = no error) or a name such as ``ENOSPC``."""
    if isinstance(value, str) and value.strip().upper().startswith("E"):
        name = value.strip().upper()
        number = getattr(errno_mod, name, None)
        if not isinstance(number, int):
            raise where.error("errno", f"unknown errno name {value!r}")
        return number
    number = _number(value, "errno", where)
    if number and number not in errno_mod.errorcode:
        raise where.error("errno", f"{number} is not an errno number of this host")
    return number


def _iotype(value: Any, where: _Where) -> IoType:
    names = value if isinstance(value, list | tuple) else [value]
    mask = IoType(0)
    for name in names:
        kind = IOTYPE_NAMES.get(str(name).strip())
        if kind is None:
            raise where.error(
                "iotype", f"unknown I/O type {name!r} (one of {', '.join(IOTYPE_NAMES)})"
            )
        mask |= kind
    return mask


def _make_rule(kind: str, values: Mapping[str, Any], number: int, origin: str,
               where: _Where) -> InjectErrorRule | SetStateRule:  # fmt: skip
    """Build one rule from its raw ``values`` (strings, numbers or booleans)."""
    allowed = _SECTIONS[kind]
    for key in values:
        if key not in allowed:
            raise where.error(key, f"unknown key for [{kind}] (known: {', '.join(allowed)})")
    if "event" not in values:
        raise where.error(None, f"[{kind}] rule lacks the key 'event'")
    event = _event(values["event"], where)
    state = _number(values.get("state", 0), "state", where)
    if kind == "set-state":
        if "new_state" not in values:
            raise where.error(None, "[set-state] rule lacks the key 'new_state'")
        new_state = _number(values["new_state"], "new_state", where)
        return SetStateRule(event, number, origin, new_state, state)
    rule = InjectErrorRule(event, number, origin, state)
    if "errno" in values:
        rule.errno = _errno(values["errno"], where)
    if "sector" in values:
        rule.offset = _number(values["sector"], "sector", where) * 512
    if "once" in values:
        rule.once = _bool(values["once"], "once", where)
    if "immediately" in values:
        rule.immediately = _bool(values["immediately"], "immediately", where)
    if "iotype" in values:
        rule.iotypes = _iotype(values["iotype"], where)
    return rule


# -------------------------------------------------------------------------------------------
# The config file (QEMU's -readconfig syntax)
# -------------------------------------------------------------------------------------------

_SECTION_RE = re.compile(r'^\[\s*([^\]\s"]+)\s*(?:"[^"]*"\s*)?\]\s*(?:#.*)?$')
_ENTRY_RE = re.compile(r'^([A-Za-z0-9_.-]+)\s*=\s*(?:"([^"]*)"|([^"#\s][^#]*?))\s*(?:#.*)?$')


def parse_config_file(path: str, first_number: int = 0) -> list[InjectErrorRule | SetStateRule]:
    """Read a blkdebug config file; rules are numbered from ``first_number`` in file order.

    Syntax (QEMU's ``-readconfig``): ``[inject-error]`` / ``[set-state]`` section headers (an
    ``"id"`` after the name is ignored), ``key = "value"`` lines, ``#`` comments, blank
    lines. Values may also be unquoted (QEMU insists on quotes).

    :raises BlockError: ``ENOENT``/``EACCES``/... when the file cannot be read; ``EINVAL``
        naming ``file:line`` and the key for anything malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BlockError(errno_mod.EINVAL, f"could not read blkdebug config file: {exc}",
                         path) from None  # fmt: skip
    except OSError as exc:
        raise BlockError(exc.errno or errno_mod.EIO,
                         f"could not read blkdebug config file: {exc.strerror}", path) from None
    sections: list[tuple[str, int, dict[str, str], dict[str, int]]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SECTION_RE.match(line)
        if m:
            kind = m.group(1)
            if kind not in _SECTIONS:
                raise BlockError(
                    errno_mod.EINVAL,
                    f"{path}:{lineno}: unknown section [{kind}] "
                    "(known: [inject-error], [set-state])",
                    path,
                )
            sections.append((kind, lineno, {}, {}))
            continue
        m = _ENTRY_RE.match(line)
        if not m:
            raise BlockError(errno_mod.EINVAL,
                             f"{path}:{lineno}: parse error in {raw.strip()!r} "
                             "(expected [section] or key = \"value\")", path)  # fmt: skip
        if not sections:
            raise BlockError(errno_mod.EINVAL,
                             f"{path}:{lineno}: key {m.group(1)!r} outside any section",
                             path)  # fmt: skip
        _kind, _line, values, lines = sections[-1]
        key = m.group(1)
        values[key] = m.group(2) if m.group(2) is not None else m.group(3)
        lines[key] = lineno  # a repeated key: the last one wins, as in QEMU
    rules: list[InjectErrorRule | SetStateRule] = []
    for kind, header, values, lines in sections:
        where = _Where(path, kind, lines, header)
        number = first_number + len(rules)
        rules.append(_make_rule(kind, values, number, f"{path}:{header}", where))
    return rules


# -------------------------------------------------------------------------------------------
# Rules given as options: inject-error.N.KEY (unflattened to dicts) or JSON lists
# -------------------------------------------------------------------------------------------


def _indexed(value: Any, name: str, filename: str | None) -> list[tuple[str, Any]]:
    """The elements of a list option given as a list or as a ``{"0": ..., "1": ...}`` dict."""
    if isinstance(value, list | tuple):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not str(key).isdigit():
                raise BlockError(errno_mod.EINVAL,
                                 f"option '{name}.{key}': expected a list index, as in "
                                 f"'{name}.0.event'", filename)  # fmt: skip
            items.append((str(key), item))
        items.sort(key=lambda kv: int(kv[0]))
        return items
    raise BlockError(errno_mod.EINVAL, f"option {name!r} must be a list of rules, not {value!r}",
                     filename)  # fmt: skip


def parse_rule_options(
    value: Any, kind: str, first_number: int = 0, filename: str | None = None
) -> list[InjectErrorRule | SetStateRule]:
    """Rules of kind ``inject-error`` or ``set-state`` given as an option value.

    ``value`` is a list of dicts (JSON form) or a dict keyed by index (the dotted
    ``inject-error.0.event`` form after unflattening). Errors name the option key.
    """
    rules: list[InjectErrorRule | SetStateRule] = []
    for index, item in _indexed(value, kind, filename):
        prefix = f"{kind}.{index}"
        where = _Where(filename, prefix, None)
        if not isinstance(item, Mapping):
            raise where.error(None, f"expected a rule (a dict of keys), not {item!r}")
        rules.append(_make_rule(kind, item, first_number + len(rules), prefix, where))
    return rules


# -------------------------------------------------------------------------------------------
# The engine
# -------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class RuleEngine:
    """Rules per event, the current state (1 at open) and the armed inject-error rules.

    An event arms the inject-error rules it matches (replacing what was armed before),
    applies the set-state rules it matches (all of them see the old state; the first
    defined wins) and consumes its breakpoints. Requests then fail on the first armed rule,
    in definition order, that covers their kind and offset.
    """

    rules: dict[str, list[Rule]] = attrs.Factory(dict)
    state: int = 1
    active: list[InjectErrorRule] = attrs.Factory(list)

    def add(self, rule: Rule) -> None:
        self.rules.setdefault(rule.event, []).append(rule)

    def add_all(self, rules: Iterable[Rule]) -> None:
        for rule in rules:
            self.add(rule)

    def remove(self, rule: Rule) -> None:
        """Forget ``rule`` (a consumed ``once`` rule or breakpoint)."""
        of_event = self.rules.get(rule.event, [])
        if rule in of_event:
            of_event.remove(rule)
        if rule in self.active:
            self.active.remove(rule)

    def fire(self, event: str) -> list[SuspendRule]:
        """Process ``event``: arm, change state, and return the breakpoints it hit (removed)."""
        armed: list[InjectErrorRule] | None = None
        chosen: SetStateRule | None = None
        hit: list[SuspendRule] = []
        for rule in list(self.rules.get(event, ())):
            if isinstance(rule, SuspendRule):
                self.remove(rule)
                hit.append(rule)
            elif rule.state and rule.state != self.state:
                continue
            elif isinstance(rule, InjectErrorRule):
                if armed is None:
                    armed = []
                armed.append(rule)
            elif chosen is None or rule.number < chosen.number:
                chosen = rule
        if armed is not None:
            self.active = sorted(armed, key=lambda r: r.number)
        if chosen is not None:
            self.state = chosen.new_state
        return hit

    def check(self, offset: int, length: int, iotype: IoType) -> InjectErrorRule | None:
        """The armed rule a request hits, or None; a hit ``once`` rule is removed.

        A rule with an offset covers requests whose range contains it; zero-length requests
        (flush) are hit only by rules without an offset. A hit rule with errno 0 lets the
        request through (and still shields it from rules defined after it).
        """
        for rule in self.active:
            if not rule.iotypes & iotype:
                continue
            if rule.offset < 0 or (length and offset <= rule.offset < offset + length):
                break
        else:
            return None
        if not rule.errno:
            return None
        if rule.once:
            self.remove(rule)
        return rule

    def breakpoints(self, tag: str) -> list[SuspendRule]:
        return [r for rs in self.rules.values() for r in rs
                if isinstance(r, SuspendRule) and r.tag == tag]  # fmt: skip

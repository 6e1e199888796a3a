"""Rule parsing (config file, option forms) and the state machine, without any node."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
from blockcore_blkdebug.rules import (
    DEFAULT_IOTYPES,
    InjectErrorRule,
    IoType,
    RuleEngine,
    SetStateRule,
    SuspendRule,
    parse_config_file,
    parse_rule_options,
)

from blockcore.errors import BlockError
from blockcore.types import BLKDEBUG_EVENTS

# -------------------------------------------------------------------------------------------
# Config file
# -------------------------------------------------------------------------------------------


def test_config_file_all_keys(conf: Callable[[str], str]) -> None:
    path = conf(
        "# a comment\n"
        "\n"
        "[inject-error]\n"
        'event = "l2_update"\n'
        'state = "2"\n'
        'errno = "28"\n'
        'sector = "2048"\n'
        'once = "on"\n'
        'immediately = "off"\n'
        'iotype = "write"\n'
        "\n"
        '[set-state "named"]\n'
        '  event = "write_aio"   # trailing comment\n'
        'state = "1"\n'
        "new_state = 2\n"
    )
    inject, setstate = parse_config_file(path)
    assert isinstance(inject, InjectErrorRule)
    assert (inject.event, inject.state, inject.errno, inject.offset) == ("l2_update", 2, 28,
                                                                        2048 * 512)  # fmt: skip
    assert (inject.once, inject.immediately, inject.iotypes) == (True, False, IoType.WRITE)
    assert inject.number == 0 and inject.origin == f"{path}:3"
    assert isinstance(setstate, SetStateRule)
    assert (setstate.event, setstate.state, setstate.new_state) == ("write_aio", 1, 2)
    assert setstate.number == 1


def test_config_file_defaults(conf: Callable[[str], str]) -> None:
    (rule,) = parse_config_file(conf('[inject-error]\nevent = "read_aio"\n'))
    assert isinstance(rule, InjectErrorRule)
    assert rule.state == 0 and rule.errno == errno.EIO and rule.offset == -1
    assert not rule.once and not rule.immediately and rule.iotypes == DEFAULT_IOTYPES
    assert not rule.iotypes & IoType.BLOCK_STATUS


def test_config_numbering_starts_where_asked(conf: Callable[[str], str]) -> None:
    rules = parse_config_file(conf('[inject-error]\nevent="none"\n[inject-error]\nevent="none"\n'),
                              first_number=5)  # fmt: skip
    assert [r.number for r in rules] == [5, 6]


@pytest.mark.parametrize("name", ["read", "write", "write-zeroes", "discard", "flush",
                                  "block-status"])  # fmt: skip
def test_config_every_iotype(conf: Callable[[str], str], name: str) -> None:
    (rule,) = parse_config_file(conf(f'[inject-error]\nevent = "none"\niotype = "{name}"\n'))
    assert isinstance(rule, InjectErrorRule)
    assert rule.iotypes.name.lower().replace("_", "-") == name  # type: ignore[union-attr]


@pytest.mark.parametrize(("value", "number"), [("5", 5), ("ENOSPC", errno.ENOSPC),
                                               ("enospc", errno.ENOSPC), ("0x1c", 28),
                                               ("0", 0)])  # fmt: skip
def test_config_errno_numbers_and_names(conf: Callable[[str], str], value: str,
                                        number: int) -> None:  # fmt: skip
    (rule,) = parse_config_file(conf(f'[inject-error]\nevent = "none"\nerrno = "{value}"\n'))
    assert rule.errno == number  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["on", "off", "true", "false", "yes", "no"])
def test_config_booleans(conf: Callable[[str], str], value: str) -> None:
    (rule,) = parse_config_file(conf(f'[inject-error]\nevent="none"\nonce="{value}"\n'
                                     f'immediately = "{value}"\n'))  # fmt: skip
    expected = value in ("on", "true", "yes")
    assert rule.once is expected and rule.immediately is expected  # type: ignore[union-attr]


BAD_FILES = [
    # (text, line, what the message must name)
    ('[inject-error]\nevent = "bogus"\n', 2, "key 'event': unknown event 'bogus'"),
    ('[inject-error]\nerrno = "5"\n', 1, "lacks the key 'event'"),
    ('[inject-error]\nevent = "none"\nfoo = "5"\n', 3, "key 'foo': unknown key"),
    ('[foo]\nevent = "none"\n', 1, "unknown section [foo]"),
    ('[inject-error]\nevent = "none"\nerrno = "EBOGUS"\n', 3, "unknown errno name 'EBOGUS'"),
    ('[inject-error]\nevent = "none"\nerrno = "99999"\n', 3, "key 'errno': 99999 is not an errno"),
    ('[inject-error]\nevent = "none"\nerrno = "five"\n', 3, "key 'errno': expects a number"),
    ('[inject-error]\nevent = "none"\nsector = "-1"\n', 3, "key 'sector': -1 is below 0"),
    ('[inject-error]\nevent = "none"\nonce = "maybe"\n', 3, "key 'once': expects 'on' or 'off'"),
    ('[inject-error]\nevent = "none"\niotype = "bogus"\n', 3, "unknown I/O type 'bogus'"),
    ('[inject-error]\nevent = "none"\nstate = "x"\n', 3, "key 'state': expects a number"),
    ('[set-state]\nevent = "none"\n', 1, "lacks the key 'new_state'"),
    ('[set-state]\nevent = "none"\nnew_state = "2"\nerrno = "5"\n', 4, "key 'errno'"),
    ('event = "none"\n', 1, "outside any section"),
    ('[inject-error]\nthis is not a line\n', 2, "parse error"),
]


@pytest.mark.parametrize(("text", "line", "needle"), BAD_FILES)
def test_config_errors_name_file_line_and_key(conf: Callable[[str], str], text: str, line: int,
                                              needle: str) -> None:  # fmt: skip
    path = conf(text)
    with pytest.raises(BlockError) as info:
        parse_config_file(path)
    assert info.value.errno == errno.EINVAL
    assert info.value.filename == path
    assert f"{path}:{line}: " in info.value.strerror
    assert needle in info.value.strerror


def test_config_unreadable_file(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "nope.conf")
    with pytest.raises(BlockError, match="could not read blkdebug config file") as info:
        parse_config_file(missing)
    assert info.value.errno == errno.ENOENT and info.value.filename == missing
    with pytest.raises(BlockError) as info:
        parse_config_file(str(tmp_path))  # a directory
    assert info.value.errno == errno.EISDIR


def test_config_not_utf8(conf: Callable[[str], str], tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bin.conf")
    with open(path, "wb") as f:
        f.write(b"\xff\xfe[inject-error]\n")
    with pytest.raises(BlockError, match="could not read") as info:
        parse_config_file(path)
    assert info.value.errno == errno.EINVAL


def test_config_repeated_key_last_wins(conf: Callable[[str], str]) -> None:
    (rule,) = parse_config_file(conf('[inject-error]\nevent="none"\nerrno="5"\nerrno="28"\n'))
    assert rule.errno == 28  # type: ignore[union-attr]


def test_config_empty_file(conf: Callable[[str], str]) -> None:
    assert parse_config_file(conf("")) == []


# -------------------------------------------------------------------------------------------
# Options (JSON list, dotted dict)
# -------------------------------------------------------------------------------------------


def test_options_list_and_dict_forms_agree() -> None:
    as_list = parse_rule_options([{"event": "l2_load", "errno": 28, "once": True},
                                  {"event": "none", "sector": "8"}], "inject-error")  # fmt: skip
    as_dict = parse_rule_options({"1": {"event": "none", "sector": "8"},
                                  "0": {"event": "l2_load", "errno": "28", "once": "on"}},
                                 "inject-error")  # fmt: skip
    for a, b in zip(as_list, as_dict, strict=True):
        assert (a.event, a.errno, a.offset, a.once, a.number) == (  # type: ignore[union-attr]
            b.event, b.errno, b.offset, b.once, b.number)  # type: ignore[union-attr]
    assert as_list[0].origin == "inject-error.0"


def test_options_dict_sorted_numerically() -> None:
    rules = parse_rule_options({str(i): {"event": "none", "errno": i + 1} for i in (10, 2, 1)},
                               "inject-error")  # fmt: skip
    assert [r.errno for r in rules] == [2, 3, 11]  # type: ignore[union-attr]


def test_options_set_state() -> None:
    (rule,) = parse_rule_options([{"event": "l1_update", "state": 1, "new_state": 3}],
                                 "set-state", first_number=4)  # fmt: skip
    assert isinstance(rule, SetStateRule)
    assert (rule.state, rule.new_state, rule.number) == (1, 3, 4)


@pytest.mark.parametrize(("value", "kind", "needle"), [
    ([{"event": "bogus"}], "inject-error", "option 'inject-error.0.event': unknown event"),
    ([{"errno": 5}], "inject-error", "option 'inject-error.0': [inject-error] rule lacks"),
    ([{"event": "none", "new_state": 2}], "inject-error", "'inject-error.0.new_state'"),
    ({"x": {"event": "none"}}, "inject-error", "option 'inject-error.x': expected a list index"),
    ("l2_load", "inject-error", "must be a list of rules"),
    (["l2_load"], "inject-error", "option 'inject-error.0': expected a rule"),
    ([{"event": "none"}], "set-state", "option 'set-state.0': [set-state] rule lacks the key "
                                       "'new_state'"),
    ([{"event": "none", "new_state": True}], "set-state", "'set-state.0.new_state': expects"),
])  # fmt: skip
def test_options_errors_name_the_key(value: object, kind: str, needle: str) -> None:
    with pytest.raises(BlockError) as info:
        parse_rule_options(value, kind, filename="cfg")
    assert needle in info.value.strerror
    assert info.value.errno == errno.EINVAL


# -------------------------------------------------------------------------------------------
# The engine
# -------------------------------------------------------------------------------------------


def inject(event: str, number: int, **kw: object) -> InjectErrorRule:
    return InjectErrorRule(event, number, f"test{number}", **kw)  # type: ignore[arg-type]


def test_engine_event_arms_rule_for_later_requests() -> None:
    e = RuleEngine()
    e.add(inject("l2_load", 0))
    assert e.check(0, 512, IoType.READ) is None
    assert e.fire("read_aio") == []
    assert e.check(0, 512, IoType.READ) is None  # other events do not arm it
    e.fire("l2_load")
    for _ in range(3):  # stays armed
        assert e.check(0, 512, IoType.READ) is not None


def test_engine_offsets_and_zero_length() -> None:
    e = RuleEngine()
    e.add(inject("none", 0, offset=4096))
    e.fire("none")
    assert e.check(0, 4096, IoType.READ) is None
    assert e.check(4096, 1, IoType.READ) is not None
    assert e.check(0, 4097, IoType.READ) is not None
    assert e.check(4097, 10, IoType.READ) is None
    assert e.check(0, 0, IoType.FLUSH) is None  # a zero-length request never covers an offset
    e2 = RuleEngine()
    e2.add(inject("none", 0))
    e2.fire("none")
    assert e2.check(0, 0, IoType.FLUSH) is not None


def test_engine_iotypes() -> None:
    e = RuleEngine()
    e.add(inject("none", 0, iotypes=IoType.DISCARD | IoType.BLOCK_STATUS))
    e.fire("none")
    for kind in IoType:
        hit = e.check(0, 512, kind) is not None
        assert hit is bool(kind & (IoType.DISCARD | IoType.BLOCK_STATUS))


def test_engine_once_rule_is_removed_everywhere() -> None:
    e = RuleEngine()
    rule = inject("none", 0, once=True)
    e.add(rule)
    e.fire("none")
    assert e.check(0, 512, IoType.WRITE) is rule
    assert e.check(0, 512, IoType.WRITE) is None
    e.fire("none")  # gone from the event's list too
    assert e.check(0, 512, IoType.WRITE) is None


def test_engine_first_defined_rule_wins_and_errno_zero_shields() -> None:
    e = RuleEngine()
    # added in reverse order on purpose: priority follows the definition number
    e.add(inject("none", 1, errno=28))
    e.add(inject("none", 0, errno=5, offset=0))
    e.fire("none")
    assert e.check(0, 512, IoType.READ).errno == 5  # type: ignore[union-attr]
    assert e.check(512, 512, IoType.READ).errno == 28  # type: ignore[union-attr]
    shield = RuleEngine()
    shield.add(inject("none", 0, errno=0, offset=0))
    shield.add(inject("none", 1, errno=5))
    shield.fire("none")
    assert shield.check(0, 512, IoType.READ) is None
    assert shield.check(512, 512, IoType.READ) is not None


def test_engine_new_event_replaces_armed_rules_only_if_it_matches() -> None:
    e = RuleEngine()
    e.add(inject("l2_load", 0, errno=5))
    e.add(inject("l2_update", 1, errno=28))
    e.add(SetStateRule("cow_read", 2, "s", new_state=2))
    e.fire("l2_load")
    e.fire("cow_read")  # no inject rule: the armed list stays
    assert e.check(0, 1, IoType.READ).errno == 5  # type: ignore[union-attr]
    e.fire("l2_update")  # replaces
    assert e.check(0, 1, IoType.READ).errno == 28  # type: ignore[union-attr]


def test_engine_state_machine() -> None:
    e = RuleEngine()
    assert e.state == 1
    e.add(SetStateRule("write_aio", 0, "a", new_state=2, state=1))
    e.add(SetStateRule("write_aio", 1, "b", new_state=3, state=2))
    e.add(inject("write_aio", 2, state=2, errno=28))
    e.fire("write_aio")  # state 1 -> 2; the inject rule saw state 1 and stays unarmed
    assert e.state == 2
    assert e.check(0, 1, IoType.WRITE) is None
    e.fire("write_aio")  # in state 2: arms, and moves to 3
    assert e.state == 3
    assert e.check(0, 1, IoType.WRITE).errno == 28  # type: ignore[union-attr]
    e.fire("write_aio")  # nothing matches state 3
    assert e.state == 3


def test_engine_first_defined_set_state_wins() -> None:
    e = RuleEngine()
    e.add(SetStateRule("none", 1, "b", new_state=7))
    e.add(SetStateRule("none", 0, "a", new_state=5))
    e.fire("none")
    assert e.state == 5


def test_engine_breakpoints_fire_once_in_any_state() -> None:
    e = RuleEngine(state=9)
    bp = SuspendRule("pwritev", "A")
    e.add(bp)
    e.add(SuspendRule("pwritev", "B"))
    assert e.breakpoints("A") == [bp]
    assert [r.tag for r in e.fire("pwritev")] == ["A", "B"]
    assert e.fire("pwritev") == []
    assert e.breakpoints("A") == []


def test_every_qemu_event_is_known(conf: Callable[[str], str]) -> None:
    assert len(BLKDEBUG_EVENTS) == 48
    text = "".join(f'[inject-error]\nevent = "{name}"\n' for name in BLKDEBUG_EVENTS)
    assert [r.event for r in parse_config_file(conf(text))] == list(BLKDEBUG_EVENTS)

"""glibc's ``getopt_long``, with the ``optind`` movements QEMU's messages depend on."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO


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

"""Long operations: qemu-img's progress bar and stopping between requests on Ctrl-C."""

from __future__ import annotations

import sys
from typing import TextIO

from .report import CliError

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

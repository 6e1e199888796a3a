"""The three API tiers of QEMU's block layer, declared on every public function and checked.

- **GS** (global state): only in the main thread (which holds the "big lock"), never from
  inside a coroutine or other I/O code. Graph changes, open, close, create.
- **I/O or GS**: in the main thread or in the home thread of the node's AioContext, never
  from a coroutine, because these functions poll the event loop (``BDRV_POLL_WHILE``).
- **I/O**: any thread. Coroutine I/O functions run on the event loop of the node's
  AioContext (``bdrv_co_enter`` moves a coroutine there). I/O code may call only I/O and
  common functions; the GS and "I/O or GS" checks catch the reverse.
- **common**: pure helpers, callable anywhere.

The checks are plain ``if`` statements (they survive ``python -O``) and raise
:class:`~blockcore.errors.TierViolation` naming the function, its tier and the caller's place.
They are on by default; ``BLOCKCORE_TIER_CHECKS=0`` in the environment turns them off
(for measuring their cost, see ``benchmarks/bench_core.py``).

``python -m blockcore.tiers`` prints every API function and its tier, one per line.
"""

from __future__ import annotations

import enum
import os
import threading
from asyncio import current_task
from asyncio.events import _get_running_loop
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ..errors import TierViolation

if TYPE_CHECKING:
    from ..graph import BlockDriverState

__all__ = [
    "API",
    "Tier",
    "api",
    "checks_enabled",
    "global_state_code",
    "in_coroutine",
    "io_code",
    "io_or_gs_code",
    "qemu_in_main_thread",
]

F = TypeVar("F", bound=Callable[..., object])


class Tier(enum.Enum):
    """API tier of a function; the value is the name ``python -m blockcore.tiers`` prints."""

    GS = "GS"
    IO_OR_GS = "I/O or GS"
    IO = "I/O"
    COMMON = "common"


#: Every public API function, by name, with its tier (filled by :func:`api`).
API: dict[str, Tier] = {}

checks_enabled: bool = os.environ.get("BLOCKCORE_TIER_CHECKS", "1") != "0"

_MAIN_THREAD_IDENT = threading.main_thread().ident


class _RunningLoop(threading.local):
    """The AioContext event loop running in this thread (None outside one), kept up to date
    by that loop itself (:class:`blockcore.aio.ContextLoop`). Per-request checks read it
    instead of asyncio's ``_get_running_loop``, which makes a ``getpid()`` system call on
    every call in CPython 3.11; a miss here only sends the caller to the exact check."""

    loop: object = None


running = _RunningLoop()
# a forked child runs no loop of its parent's (asyncio forgets its running loop there too)
os.register_at_fork(after_in_child=lambda: setattr(running, "loop", None))


def api(tier: Tier) -> Callable[[F], F]:
    """Declare the tier of a public function (registration only; the body does the check)."""

    def register(fn: F) -> F:
        API[fn.__name__] = tier
        fn.__blockcore_tier__ = tier  # type: ignore[attr-defined]
        return fn

    return register


def qemu_in_main_thread() -> bool:
    """True in the main thread, the holder of the big lock. Tier: common."""
    return threading.get_ident() == _MAIN_THREAD_IDENT


def in_coroutine() -> bool:
    """True while a coroutine (asyncio task) runs in this thread. Tier: common."""
    loop = _get_running_loop()
    return loop is not None and current_task(loop) is not None


def _where() -> str:
    thread = threading.current_thread().name
    loop = _get_running_loop()
    if loop is not None and current_task(loop) is not None:
        return f"a coroutine in thread {thread!r}"
    if loop is not None:
        return f"an event-loop callback in thread {thread!r}"
    return f"thread {thread!r}"


def _violation(fn_name: str, tier: Tier, rule: str) -> TierViolation:
    return TierViolation(f"{fn_name} is a {tier.value!r} function ({rule}); called from {_where()}")


def global_state_code(fn_name: str) -> None:
    """GLOBAL_STATE_CODE(): the caller must be the main thread, outside any coroutine."""
    if not checks_enabled:
        return
    if threading.get_ident() != _MAIN_THREAD_IDENT or _get_running_loop() is not None:
        raise _violation(fn_name, Tier.GS, "main thread only, never from I/O code")


def io_or_gs_code(fn_name: str, bs: BlockDriverState | None) -> None:
    """IO_OR_GS_CODE(): main thread or the node's home thread, never from a coroutine."""
    if not checks_enabled:
        return
    ident = threading.get_ident()
    if _get_running_loop() is not None:
        raise _violation(fn_name, Tier.IO_OR_GS, "it polls, so never from a coroutine")
    if ident != _MAIN_THREAD_IDENT and (bs is None or bs.aio_context.thread_ident != ident):
        raise _violation(
            fn_name, Tier.IO_OR_GS, "main thread or the home thread of the node's AioContext only"
        )


def io_code(fn_name: str, bs: BlockDriverState) -> None:
    """IO_CODE() for coroutine functions: run on the event loop of the node's AioContext.

    In QEMU a coroutine enters the node's context first (``bdrv_co_enter``); awaiting a node's
    coroutine from another thread's loop would race with the requests running there.
    """
    loop = bs.aio_context.loop
    if checks_enabled and running.loop is not loop and _get_running_loop() is not loop:
        raise _violation(
            fn_name,
            Tier.IO,
            f"runs in the AioContext of node {bs.node_name!r} ({bs.aio_context.name}); "
            "use bdrv_co_enter(bs) to move there",
        )


def main() -> None:
    """Print every API function and its tier (``python -m blockcore.tiers``)."""
    import blockcore  # noqa: F401  (importing registers every API function)

    for name in sorted(API):
        print(f"{name} {API[name].value}")

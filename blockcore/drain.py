"""In-flight counting and drained sections (QEMU's bdrv_drained_begin/end and friends).

A drained section gives its caller exclusive access to a node: every parent is quiesced (a
BlockBackend queues new requests from its users, a parent node propagates upward), then the
caller polls until the node and its parents have no request in flight. Requests submitted
meanwhile wait and run after :func:`bdrv_drained_end`; none is lost or failed.
"""

from __future__ import annotations

from asyncio.events import _get_running_loop
from collections.abc import Callable
from typing import TYPE_CHECKING

from .aio import AioContext, _waiters, aio_wait_kick, aio_wait_while
from .tiers import Tier, api, io_or_gs_code

if TYPE_CHECKING:
    from .graph import BdrvChild, BlockDriverState

__all__ = [
    "BDRV_POLL_WHILE",
    "bdrv_co_enter",
    "bdrv_co_leave",
    "bdrv_dec_in_flight",
    "bdrv_do_drained_begin_quiesce",
    "bdrv_drain",
    "bdrv_drain_poll",
    "bdrv_drained_begin",
    "bdrv_drained_end",
    "bdrv_inc_in_flight",
    "bdrv_parent_drained_begin_single",
    "bdrv_parent_drained_end_single",
    "bdrv_parent_drained_poll_single",
]

# Counters are changed with ``x += 1`` on plain attributes: in CPython (with the GIL) that
# sequence has no point where another thread can run, so cross-thread updates (bdrv_co_enter
# from another context) do not lose counts.


@api(Tier.IO)
def bdrv_inc_in_flight(bs: BlockDriverState) -> None:
    """Count a request in flight on ``bs`` (drain waits for it). Tier: I/O."""
    bs.in_flight += 1


@api(Tier.IO)
def bdrv_dec_in_flight(bs: BlockDriverState) -> None:
    """End a request counted by :func:`bdrv_inc_in_flight` and wake pollers. Tier: I/O."""
    bs.in_flight -= 1
    if _waiters:
        aio_wait_kick()


@api(Tier.IO)
async def bdrv_co_enter(bs: BlockDriverState) -> AioContext:
    """Enter a section of work on ``bs``: count it in ``bs``'s in-flight requests and return
    the caller's AioContext, to give back to :func:`bdrv_co_leave`. Tier: I/O.

    QEMU also moves the running coroutine into ``bs``'s context. asyncio cannot move a
    running coroutine to another event loop, so here the caller keeps running where it is;
    when ``bs`` lives elsewhere, run the work there with
    :func:`blockcore.aio.run_in_context` (awaited from here). Draining ``bs`` inside the
    section would wait for the section itself: that deadlocks, as in QEMU.
    """
    from .aio import _ctx_by_loop, main_context

    bs.in_flight += 1
    loop = _get_running_loop()
    return _ctx_by_loop.get(loop) or main_context()  # type: ignore[arg-type]


@api(Tier.IO)
async def bdrv_co_leave(bs: BlockDriverState, old_ctx: AioContext) -> None:
    """End a section started by :func:`bdrv_co_enter`. Tier: I/O."""
    bdrv_dec_in_flight(bs)


@api(Tier.IO_OR_GS)
def bdrv_parent_drained_begin_single(c: BdrvChild) -> None:
    """Quiesce the parent of edge ``c``. Tier: I/O or GS."""
    io_or_gs_code("bdrv_parent_drained_begin_single", c.bs)
    c.quiesced = True
    c.parent.parent_drained_begin()


@api(Tier.IO_OR_GS)
def bdrv_parent_drained_end_single(c: BdrvChild) -> None:
    """End the quiesced section of the parent of edge ``c``. Tier: I/O or GS."""
    io_or_gs_code("bdrv_parent_drained_end_single", c.bs)
    if c.quiesced:
        c.quiesced = False
        c.parent.parent_drained_end()


@api(Tier.IO_OR_GS)
def bdrv_parent_drained_poll_single(c: BdrvChild) -> bool:
    """Whether the parent of ``c`` still has activity to finish. Tier: I/O or GS."""
    io_or_gs_code("bdrv_parent_drained_poll_single", c.bs)
    return c.parent.parent_drained_poll()


@api(Tier.IO_OR_GS)
def bdrv_drain_poll(
    bs: BlockDriverState, ignore_parent: BdrvChild | None, ignore_bds_parents: bool
) -> bool:
    """Whether ``bs`` or one of its parents (except ``ignore_parent``) is busy. Tier: I/O or GS."""
    io_or_gs_code("bdrv_drain_poll", bs)
    for c in bs.parents:
        if c is ignore_parent or (ignore_bds_parents and c.parent.parent_is_bds):
            continue
        if c.parent.parent_drained_poll():
            return True
    return bs.in_flight > 0


@api(Tier.IO_OR_GS)
def bdrv_do_drained_begin_quiesce(bs: BlockDriverState, parent: BdrvChild | None) -> None:
    """Quiesce ``bs`` and its parents (except ``parent``) without waiting. Tier: I/O or GS."""
    io_or_gs_code("bdrv_do_drained_begin_quiesce", bs)
    bs.quiesce_counter += 1
    if bs.quiesce_counter == 1:
        for c in list(bs.parents):
            if c is not parent:
                bdrv_parent_drained_begin_single(c)
        if bs.drv is not None and bs.drv.bdrv_drain_begin is not None:  # type: ignore[attr-defined]
            bs.drv.bdrv_drain_begin(bs)  # type: ignore[attr-defined]


@api(Tier.IO_OR_GS)
def bdrv_drained_begin(bs: BlockDriverState) -> None:
    """Begin a drained section on ``bs``: quiesce, then wait until nothing is in flight.

    Nestable. Tier: I/O or GS (polls: main thread or ``bs``'s home thread, not a coroutine).
    """
    io_or_gs_code("bdrv_drained_begin", bs)
    bdrv_do_drained_begin_quiesce(bs, None)
    aio_wait_while(bs.aio_context, lambda: bdrv_drain_poll(bs, None, False))


def bdrv_drained_end_noquiesce(bs: BlockDriverState) -> None:
    """Counterpart of :func:`bdrv_do_drained_begin_quiesce` (no polling)."""
    bs.quiesce_counter -= 1
    if bs.quiesce_counter == 0:
        if bs.drv is not None and bs.drv.bdrv_drain_end is not None:  # type: ignore[attr-defined]
            bs.drv.bdrv_drain_end(bs)  # type: ignore[attr-defined]
        for c in list(bs.parents):
            bdrv_parent_drained_end_single(c)


@api(Tier.IO_OR_GS)
def bdrv_drained_end(bs: BlockDriverState) -> None:
    """End a drained section; queued requests of the parents resume. Tier: I/O or GS."""
    io_or_gs_code("bdrv_drained_end", bs)
    if bs.quiesce_counter <= 0:
        raise AssertionError(f"bdrv_drained_end without drained_begin on {bs.node_name!r}")
    bdrv_drained_end_noquiesce(bs)


@api(Tier.IO_OR_GS)
def bdrv_drain(bs: BlockDriverState) -> None:
    """Wait until ``bs`` has no request in flight (begin and end a drained section).

    Tier: I/O or GS.
    """
    io_or_gs_code("bdrv_drain", bs)
    bdrv_drained_begin(bs)
    bdrv_drained_end(bs)


@api(Tier.IO_OR_GS)
def BDRV_POLL_WHILE(bs: BlockDriverState, cond: Callable[[], bool]) -> None:  # noqa: N802
    """Poll ``bs``'s context until ``cond()`` is false (QEMU's macro). Tier: I/O or GS."""
    io_or_gs_code("BDRV_POLL_WHILE", bs)
    aio_wait_while(bs.aio_context, cond)

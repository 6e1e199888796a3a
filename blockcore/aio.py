"""AioContexts (an event loop owned by one thread), waiting, sync wrappers and the graph lock.

- :class:`AioContext`: an asyncio event loop and the one thread that runs it. The main context
  belongs to the main thread and runs only while someone waits on it (as in qemu-img); an
  :class:`IOThread` runs its context's loop forever in its own thread.
- :func:`aio_wait_while`: QEMU's ``AIO_WAIT_WHILE`` — poll until a condition turns false;
  :func:`aio_wait_kick` wakes pollers (``bdrv_dec_in_flight`` calls it).
- :func:`co_wrapper`: the one mechanism that makes sync functions out of coroutines (QEMU's
  generated ``co_wrapper``, ``co_wrapper_mixed`` and ``*_bdrv_rdlock`` wrappers).
- The graph lock: coroutines read the graph under :func:`bdrv_graph_co_rdlock`; the main
  thread changes it under :func:`bdrv_graph_wrlock` after quiescing every node.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from asyncio import current_task
from asyncio.events import _get_running_loop
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .errors import DeadlockError, TierViolation
from .tiers import API, Tier, api, global_state_code, io_or_gs_code, qemu_in_main_thread, running

__all__ = [
    "AioContext",
    "IOThread",
    "aio_wait_kick",
    "aio_wait_while",
    "assert_bdrv_graph_readable",
    "bdrv_graph_co_rdlock",
    "bdrv_graph_wrlock",
    "bdrv_graph_wrunlock",
    "co_wrapper",
    "main_context",
    "run",
]

T = TypeVar("T")


class ContextLoop(asyncio.SelectorEventLoop):
    """The event loop of every AioContext: while it runs it is ``tiers.running.loop`` of
    its thread, the cheap answer to "which context am I in" on the request path."""

    def run_forever(self) -> None:
        outer, running.loop = running.loop, self
        try:
            super().run_forever()
        finally:
            running.loop = outer


class AioContext:
    """An event loop owned by exactly one thread. Tier: common (the object itself)."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, thread_ident: int | None):
        self.name = name
        self.loop = loop
        self.thread_ident = thread_ident
        #: Graph readers currently inside this context (only its own thread changes it).
        self.graph_readers = 0

    def in_home_thread(self) -> bool:
        """True when called by the thread that owns this context."""
        return threading.get_ident() == self.thread_ident

    def __repr__(self) -> str:
        return f"<AioContext {self.name}>"


_main_ctx: AioContext | None = None


@api(Tier.COMMON)
def main_context() -> AioContext:
    """The main thread's AioContext (``qemu_get_aio_context``). Tier: common."""
    global _main_ctx
    if _main_ctx is None:
        _main_ctx = AioContext("main", ContextLoop(), threading.main_thread().ident)
        register_context(_main_ctx)
    return _main_ctx


class IOThread:
    """A thread running an AioContext's loop until :meth:`stop` (QEMU's ``-object iothread``).

    Start it, move nodes into it with :func:`blockcore.graph.bdrv_try_change_aio_context`,
    move them back before stopping it.
    """

    def __init__(self, name: str = "iothread0") -> None:
        self.name = name
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.ctx: AioContext | None = None

    def _run(self) -> None:
        loop = ContextLoop()
        asyncio.set_event_loop(loop)
        self.ctx = AioContext(self.name, loop, threading.get_ident())
        register_context(self.ctx)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def start(self) -> AioContext:
        """Start the thread and return its context. Tier: GS."""
        global_state_code("IOThread.start")
        self._thread.start()
        self._ready.wait()
        assert self.ctx is not None
        return self.ctx

    def stop(self) -> None:
        """Stop the loop and join the thread. Tier: GS. Nodes must have left the context."""
        global_state_code("IOThread.stop")
        if self.ctx is not None and self._thread.is_alive():
            self.ctx.loop.call_soon_threadsafe(self.ctx.loop.stop)
            self._thread.join()

    def __enter__(self) -> AioContext:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------
# AIO_WAIT_WHILE / aio_wait_kick
# -------------------------------------------------------------------------------------------

_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
_waiters_lock = threading.Lock()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@api(Tier.IO)
def aio_wait_kick() -> None:
    """Wake every poller of :func:`aio_wait_while` so it re-checks its condition. Tier: I/O."""
    if _waiters:
        with _waiters_lock:
            waiters = list(_waiters)
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)


def _poll_loop() -> AioContext:
    """The context the current thread may poll: its own, or the main one."""
    if qemu_in_main_thread():
        return main_context()
    raise DeadlockError(
        f"thread {threading.current_thread().name!r} owns no AioContext that it could poll"
    )


@api(Tier.IO_OR_GS)
def aio_wait_while(ctx: AioContext, cond: Callable[[], bool]) -> None:
    """Poll the caller's own loop until ``cond()`` is false (``AIO_WAIT_WHILE``).

    Tier: I/O or GS. From the main thread (any ``ctx``) or ``ctx``'s home thread, never from
    a running loop: that would deadlock, so it raises :class:`DeadlockError` instead.
    """
    if not cond():
        return
    if _get_running_loop() is not None:
        raise DeadlockError("aio_wait_while called from a running event loop (would deadlock)")
    own = ctx if ctx.in_home_thread() else _poll_loop()
    loop = own.loop
    while cond():
        fut = loop.create_future()
        entry = (loop, fut)
        with _waiters_lock:
            _waiters.append(entry)
        try:
            if cond():  # re-check after registering, so a kick in between is not lost
                loop.run_until_complete(asyncio.wait_for(fut, 1.0) if ctx is not own else fut)
        except TimeoutError:
            pass
        finally:
            with _waiters_lock:
                _waiters.remove(entry)


AIO_WAIT_WHILE = aio_wait_while  # QEMU's macro name; same function
API["AIO_WAIT_WHILE"] = Tier.IO_OR_GS


def _run_in_context(ctx: AioContext, coro: Coroutine[Any, Any, T], name: str) -> T:
    """BDRV_POLL_WHILE for one coroutine: run it in ``ctx`` and wait for its result.

    While it waits, the main thread runs the global-state calls that coroutines hand it with
    :func:`run_in_main_loop` (QEMU's ``no_co_wrapper``), outside the event loop.
    """
    if ctx.in_home_thread() and not qemu_in_main_thread():
        return ctx.loop.run_until_complete(coro)
    if not qemu_in_main_thread():
        coro.close()
        raise DeadlockError(
            f"{name}: node lives in {ctx.name}; only the main thread or that context's own "
            f"thread may wait for it, not {threading.current_thread().name!r}"
        )
    main_loop = main_context().loop
    if ctx.loop is main_loop:
        fut: asyncio.Future[T] = main_loop.create_task(coro)
    else:
        if not ctx.loop.is_running():
            coro.close()
            raise DeadlockError(f"{name}: {ctx.name} is not running (stopped IOThread)")
        fut = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, ctx.loop), loop=main_loop)
    while True:
        main_loop.run_until_complete(_first_of(fut, _gs_wakeup(main_loop)))
        if fut.done():
            return fut.result()
        _run_gs_requests()


# -------------------------------------------------------------------------------------------
# Global-state calls from coroutines (QEMU's no_co_wrapper)
# -------------------------------------------------------------------------------------------

_gs_requests: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
_gs_event: asyncio.Future[None] | None = None
_gs_lock = threading.Lock()


def _gs_wakeup(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    global _gs_event
    with _gs_lock:
        if _gs_event is None or _gs_event.done():
            _gs_event = loop.create_future()
            if _gs_requests:
                _gs_event.set_result(None)
        return _gs_event


async def _first_of(a: asyncio.Future[Any], b: asyncio.Future[None]) -> None:
    await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)


def _run_gs_requests() -> None:
    while True:
        with _gs_lock:
            if not _gs_requests:
                return
            fn, args, fut = _gs_requests.pop(0)
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting coroutine)
            fut.get_loop().call_soon_threadsafe(_settle, fut, None, exc)
        else:
            fut.get_loop().call_soon_threadsafe(_settle, fut, result, None)


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


@api(Tier.IO)
async def run_in_main_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run the global-state function ``fn(*args)`` in the main thread, outside any event
    loop, and return its result to this coroutine (QEMU's ``no_co_wrapper``). Tier: I/O.

    The main thread must be waiting for this coroutine (it is, for coroutines started by the
    sync wrappers and :func:`run`); otherwise :class:`DeadlockError`.
    """
    main_loop = main_context().loop
    if _gs_event is None and not main_loop.is_running():
        raise DeadlockError(f"run_in_main_loop({fn.__name__}): the main thread is not waiting")
    fut = asyncio.get_running_loop().create_future()
    with _gs_lock:
        _gs_requests.append((fn, args, fut))
        event = _gs_event
    if event is not None:
        event.get_loop().call_soon_threadsafe(_settle, event, None, None)
    return await fut


async def run_in_context(ctx: AioContext, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in ``ctx`` and await its result from the caller's loop. Tier: I/O.

    The asyncio form of entering another context (see :func:`blockcore.drain.bdrv_co_enter`).
    """
    if asyncio.get_running_loop() is ctx.loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, ctx.loop))


api(Tier.IO)(run_in_context)


@api(Tier.GS)
def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the main context and return its result (the entry point for async code
    using the main context). Tier: GS."""
    global_state_code("run")
    return _run_in_context(main_context(), coro, "run")


@api(Tier.IO_OR_GS)
def run_co(bs: Any, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in the AioContext of node ``bs`` with the graph read lock and wait for it
    (how a GS hook such as ``bdrv_open`` runs a driver's own coroutines). Tier: I/O or GS."""
    io_or_gs_code("run_co", bs)

    async def locked() -> T:
        async with bdrv_graph_co_rdlock():
            return await coro

    return _run_in_context(bs.aio_context, locked(), "run_co")


def _context_of(first: Any) -> AioContext:
    """AioContext chosen from a wrapper's first argument, as QEMU's wrapper generator does."""
    bs = getattr(first, "bs", None)  # BdrvChild or BlockBackend root
    if bs is None and hasattr(first, "aio_context"):
        bs = first
    return bs.aio_context if bs is not None else main_context()


def co_wrapper(
    co_fn: Callable[..., Awaitable[T]],
    name: str,
    *,
    mixed: bool = False,
    rdlock: bool = False,
    tier: Tier = Tier.IO,
) -> Callable[..., Any]:
    """Make the sync function ``name`` from the coroutine function ``co_fn``.

    Outside any event loop the wrapper runs ``co_fn`` in the AioContext of its first argument
    (a node, a child edge or a backend) and waits for it, from the main thread or that
    context's own thread. ``rdlock`` variants take the graph read lock around the call.
    ``mixed`` wrappers called inside a coroutine on the node's loop return the coroutine for
    the caller to ``await`` (Python cannot run it synchronously there); plain wrappers refuse
    that call, since polling the loop from inside it would deadlock.
    """

    async def entry(*args: Any, **kwargs: Any) -> T:
        if rdlock:
            async with bdrv_graph_co_rdlock():
                return await co_fn(*args, **kwargs)
        return await co_fn(*args, **kwargs)

    @functools.wraps(co_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = _context_of(args[0]) if args else main_context()
        loop = _get_running_loop()
        if loop is not None:
            if mixed and loop is ctx.loop and current_task(loop) is not None:
                return co_fn(*args, **kwargs)
            raise TierViolation(
                f"{name} polls its event loop and cannot run inside one "
                f"(called from thread {threading.current_thread().name!r}); "
                f"await {co_fn.__name__} instead"
            )
        if tier is Tier.IO_OR_GS:
            io_or_gs_code(name, getattr(args[0], "bs", args[0]) if args else None)
        return _run_in_context(ctx, entry(*args, **kwargs), name)

    wrapper.__name__ = name
    wrapper.__qualname__ = name
    wrapper.__doc__ = (
        f"Sync wrapper of :func:`{co_fn.__name__}` ({'mixed' if mixed else 'co_wrapper'}"
        f"{', graph read lock' if rdlock else ''}). Tier: {tier.value}.\n\n"
        + (co_fn.__doc__ or "")
    )
    api(tier)(wrapper)
    return wrapper


# -------------------------------------------------------------------------------------------
# Graph lock
# -------------------------------------------------------------------------------------------

_rdlock_depth: contextvars.ContextVar[int] = contextvars.ContextVar("graph_rdlock", default=0)
_has_writer = False
_writer_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
_contexts_with_readers: set[AioContext] = set()


class bdrv_graph_co_rdlock:  # noqa: N801 (QEMU's name)
    """``async with bdrv_graph_co_rdlock():`` — hold the graph read lock. Tier: I/O.

    Many readers in any context; they wait while the main thread holds the write lock.
    """

    __slots__ = ("_ctx", "_token")

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = _ctx_by_loop.get(loop) or main_context()
        while True:
            ctx.graph_readers += 1
            if not _has_writer:
                break
            ctx.graph_readers -= 1
            aio_wait_kick()
            fut = loop.create_future()
            _writer_waiters.append((loop, fut))
            if _has_writer:
                await fut
        _contexts_with_readers.add(ctx)
        self._ctx = ctx
        self._token = _rdlock_depth.set(_rdlock_depth.get() + 1)

    async def __aexit__(self, *exc: object) -> None:
        _rdlock_depth.reset(self._token)
        self._ctx.graph_readers -= 1
        if _has_writer:
            aio_wait_kick()


_ctx_by_loop: dict[asyncio.AbstractEventLoop, AioContext] = {}


def register_context(ctx: AioContext) -> None:
    """Make ``ctx`` known to the graph lock (done for every context that gets nodes)."""
    _ctx_by_loop[ctx.loop] = ctx
    _contexts_with_readers.add(ctx)


@api(Tier.COMMON)
def assert_bdrv_graph_readable(fn_name: str) -> None:
    """Raise TierViolation unless the caller holds the graph read lock (or is GS code)."""
    if not _rdlock_depth.get() and _get_running_loop() is not None:
        raise TierViolation(
            f"{fn_name} needs the graph read lock (GRAPH_RDLOCK): take it with "
            "'async with bdrv_graph_co_rdlock()' or call through a BlockBackend"
        )


@api(Tier.GS)
def bdrv_graph_wrlock() -> None:
    """Take the graph write lock: wait until no coroutine reads the graph. Tier: GS."""
    global _has_writer
    global_state_code("bdrv_graph_wrlock")
    _has_writer = True
    aio_wait_while(
        main_context(), lambda: any(c.graph_readers > 0 for c in _contexts_with_readers)
    )


@api(Tier.GS)
def bdrv_graph_wrunlock() -> None:
    """Release the graph write lock and wake waiting readers. Tier: GS."""
    global _has_writer
    global_state_code("bdrv_graph_wrunlock")
    _has_writer = False
    waiters, _writer_waiters[:] = list(_writer_waiters), []
    for loop, fut in waiters:
        loop.call_soon_threadsafe(_wake, fut)

"""blkdebug: a filter that injects errors on debug events and checks the core's guarantees."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any

import attrs

from blockcore import graph, io
from blockcore.aio import aio_wait_kick, aio_wait_while
from blockcore.drivers import bdrv_find_protocol, hookimpl
from blockcore.errors import BlockError, NoSpaceError, NotSupportedError
from blockcore.graph import BdrvChild, BlockDriverState
from blockcore.tiers import global_state_code
from blockcore.types import (
    BLKDEBUG_EVENTS,
    BdrvRequestFlags,
    BlockLimits,
    BlockStatus,
    BlockStatusFlags,
    ChildRole,
    Concurrency,
    DriverDescriptor,
    OpenFlags,
    OptionSpec,
    Perm,
    PreallocMode,
)
from blockcore.util import parse_size, round_down, round_up

from .rules import (
    InjectErrorRule,
    IoType,
    RuleEngine,
    SuspendRule,
    parse_config_file,
    parse_rule_options,
)

__all__ = [
    "BlkdebugState",
    "debug_breakpoint",
    "debug_is_suspended",
    "debug_remove_breakpoint",
    "debug_resume",
    "find_debug_node",
    "set_message_sink",
    "wait_break",
]

F = BdrvRequestFlags
_EVENTS = frozenset(BLKDEBUG_EVENTS)
_LIMIT_KEYS = ("align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
               "max-discard")  # fmt: skip
_PERM_NAMES = {"consistent-read": Perm.CONSISTENT_READ, "write": Perm.WRITE,
               "write-unchanged": Perm.WRITE_UNCHANGED, "resize": Perm.RESIZE}  # fmt: skip
_INT_MAX = 2**31 - 1


@attrs.define(eq=False)
class Suspended:
    """A request parked at a breakpoint until a GS ``resume`` wakes ``future``."""

    tag: str
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


@attrs.define(eq=False)
class BlkdebugState:
    """Per-node state (``bs.opaque``): the rules, the limits to impose, parked requests."""

    engine: RuleEngine = attrs.Factory(RuleEngine)
    config: str | None = None
    limits: dict[str, int] = attrs.Factory(dict)
    """``align``, ``max-transfer``, ... as given (0 or absent = keep the child's)."""
    take_perms: Perm = Perm.NONE
    unshare_perms: Perm = Perm.NONE
    suspended: list[Suspended] = attrs.Factory(list)


# QEMU prints these two lines on stdout (iotests compare them); tests may silence them.
def _print(line: str) -> None:
    print(line, flush=True)


_message_sink: Callable[[str], None] | None = _print


def set_message_sink(sink: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Send "blkdebug: Suspended request 'TAG'" lines to ``sink`` (None: drop); returns the
    previous sink. Tier: common."""
    global _message_sink
    old, _message_sink = _message_sink, sink
    return old


def _say(line: str) -> None:
    if _message_sink is not None:
        _message_sink(line)


# -------------------------------------------------------------------------------------------
# Description, filename, open, close
# -------------------------------------------------------------------------------------------

_RUNTIME_OPTS = (
    OptionSpec("config", "string", "path of a config file with [inject-error]/[set-state] rules"),
    OptionSpec("x-image", "string", "image filename (set by the blkdebug:CONFIG:IMAGE syntax)"),
    OptionSpec("align", "size", "request alignment to impose (power of two)", 0),
    OptionSpec("max-transfer", "size", "largest read/write to impose", 0),
    OptionSpec("opt-write-zero", "size", "zero-write alignment to impose", 0),
    OptionSpec("max-write-zero", "size", "largest zero write to impose", 0),
    OptionSpec("opt-discard", "size", "discard alignment to impose", 0),
    OptionSpec("max-discard", "size", "largest discard to impose", 0),
    OptionSpec("inject-error", "string", "list of inject-error rules (inject-error.N.KEY)"),
    OptionSpec("set-state", "string", "list of set-state rules (set-state.N.KEY)"),
    OptionSpec("take-child-perms", "string", "permissions to take on the image child"),
    OptionSpec("unshare-child-perms", "string", "permissions not to share on the image child"),
)


@hookimpl
def bdrv_describe() -> DriverDescriptor:
    return DriverDescriptor(
        format_name="blkdebug",
        protocol_name="blkdebug",
        is_filter=True,
        # upper bounds; bdrv_open narrows them to what the image child honours
        supported_write_flags=F.FUA | F.WRITE_UNCHANGED,
        supported_zero_flags=F.FUA | F.MAY_UNMAP | F.NO_FALLBACK | F.WRITE_UNCHANGED,
        supported_truncate_flags=F.ZERO_WRITE,
        concurrency=Concurrency.PARALLEL,  # requests must meet at breakpoints
        runtime_opts=_RUNTIME_OPTS,
        child_names=("image",),
    )


@hookimpl
def bdrv_parse_filename(filename: str) -> dict[str, Any]:
    """``blkdebug:CONFIG:IMAGE``: CONFIG up to the second colon (may be empty), IMAGE the rest."""
    if not filename.startswith("blkdebug:"):
        raise BlockError(errno.EINVAL, "invalid filename: it must start with 'blkdebug:'",
                         filename)  # fmt: skip
    config, sep, image = filename[len("blkdebug:") :].partition(":")
    if not sep:
        raise BlockError(errno.EINVAL, "blkdebug requires both config file and image path",
                         filename)  # fmt: skip
    options: dict[str, Any] = {"x-image": image}
    if config:
        options["config"] = config
    return options


def _size(options: dict[str, Any], key: str) -> int:
    value = options.pop(key, 0)
    try:
        size = parse_size(value if value is not None else 0)
    except BlockError:
        raise BlockError(errno.EINVAL, f"option {key!r}: invalid size {value!r}") from None
    if size < 0 or size >= _INT_MAX:
        raise BlockError(errno.EINVAL, f"option {key!r}: {size} out of range 0..{_INT_MAX - 1}")
    return size


def _perms(options: dict[str, Any], key: str) -> Perm:
    value = options.pop(key, None)
    if value is None:
        return Perm.NONE
    if isinstance(value, dict):  # take-child-perms.0=write after unflattening
        value = [value[k] for k in sorted(value, key=lambda k: int(k) if str(k).isdigit() else -1)]
    elif isinstance(value, str):
        value = [value]
    perm = Perm.NONE
    for name in value:
        if name not in _PERM_NAMES:
            raise BlockError(errno.EINVAL, f"option {key!r}: unknown permission {name!r} "
                             f"(one of {', '.join(_PERM_NAMES)})")  # fmt: skip
        perm |= _PERM_NAMES[name]
    return perm


def _image_ref(ref: Any) -> Any:
    """Name a protocol driver for an image given by filename only.

    QEMU opens blkdebug's image without a driver as a protocol node (``blkdebug::t.qcow2``
    is qcow2 over blkdebug over file); the core's bdrv_open_child would probe a format
    there, so pick the protocol here: the ``proto:`` prefix or device probing, else file.
    """
    if isinstance(ref, str):
        ref = {"filename": ref}
    if not isinstance(ref, dict) or "driver" in ref or not isinstance(ref.get("filename"), str):
        return ref
    ref = dict(ref)
    filename = ref.pop("filename")
    drv = bdrv_find_protocol(filename)
    if drv is None:
        ref["driver"] = "file"
        ref["filename"] = filename
        return ref
    ref["driver"] = drv.name
    prefix = f"{drv.descriptor.protocol_name}:"
    if drv.bdrv_parse_filename is not None and filename.startswith(prefix):
        for key, value in drv.bdrv_parse_filename(filename).items():
            ref.setdefault(key, value)
    else:
        ref["filename"] = filename[len(prefix) :] if filename.startswith(prefix) else filename
    return ref


@hookimpl
def bdrv_open(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
    filename = options.pop("filename", None)
    if filename is not None:  # {"driver": "blkdebug", "filename": "blkdebug:CONFIG:IMAGE"}
        for key, value in bdrv_parse_filename(str(filename)).items():
            options.setdefault(key, value)
    st = BlkdebugState()
    st.config = options.pop("config", None) or None
    # Rules are numbered in definition order: config file, inject-error.N, set-state.N.
    rules: list[Any] = []
    if st.config is not None:
        rules += parse_config_file(str(st.config))
    for kind in ("inject-error", "set-state"):
        if options.get(kind) is not None:
            rules += parse_rule_options(options.pop(kind), kind, len(rules), bs.node_name)
        options.pop(kind, None)
    st.engine.add_all(rules)
    st.limits = {key: _size(options, key) for key in _LIMIT_KEYS}
    st.take_perms = _perms(options, "take-child-perms")
    st.unshare_perms = _perms(options, "unshare-child-perms")
    x_image = options.pop("x-image", None)
    if options.get("image") is None and x_image:
        options["image"] = _image_ref(str(x_image))
    elif isinstance(options.get("image"), dict):
        options["image"] = _image_ref(options["image"])
    bs.opaque = st  # bdrv_child_perm needs it while the child attaches
    child = graph.bdrv_open_child(bs, options, "image", ChildRole.FILTERED | ChildRole.PRIMARY)
    assert child is not None
    bs.file = child  # as QEMU's blkdebug: the image child is also bs->file
    _check_limits(st, child.bs)
    cbs = child.bs
    bs.supported_write_flags = F.WRITE_UNCHANGED | (F.FUA & cbs.supported_write_flags)
    bs.supported_zero_flags = F.WRITE_UNCHANGED | (
        (F.FUA | F.MAY_UNMAP | F.NO_FALLBACK) & cbs.supported_zero_flags
    )
    bs.supported_truncate_flags = F.ZERO_WRITE & cbs.supported_truncate_flags
    st.engine.fire("none")  # the event of "at once": arms rules with event = "none"


def _check_limits(st: BlkdebugState, child: BlockDriverState) -> None:
    """Refuse limits the node could not honour (QEMU: "Cannot meet constraints with ...")."""
    lim = st.limits
    align = lim["align"]
    if align and (align & (align - 1) or align > 1 << 30):
        raise BlockError(errno.EINVAL, f"option 'align': {align} is not a power of two up to "
                         "1 GiB")  # fmt: skip
    base = max(align, child.bl.request_alignment)
    for key, unit in (("max-transfer", base), ("opt-write-zero", base), ("opt-discard", base),
                      ("max-write-zero", max(lim["opt-write-zero"], base)),
                      ("max-discard", max(lim["opt-discard"], base))):  # fmt: skip
        if lim[key] % unit:
            raise BlockError(errno.EINVAL, f"option {key!r}: {lim[key]} is not a multiple of "
                             f"{unit}, so the node cannot meet it")  # fmt: skip


@hookimpl
def bdrv_close(bs: BlockDriverState) -> None:
    st: BlkdebugState | None = bs.opaque
    if st is None:  # bdrv_open failed before it set the state
        return
    st.engine.rules.clear()
    st.engine.active.clear()
    for entry in list(st.suspended):  # never leave a request parked behind a closed node
        _wake(st, entry)


@hookimpl
def bdrv_refresh_limits(bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
    lim = bs.opaque.limits
    changes: dict[str, Any] = {}
    align = lim["align"] or limits.request_alignment
    if lim["align"]:
        changes["request_alignment"] = align
    if lim["max-transfer"]:
        changes["max_transfer"] = lim["max-transfer"]
    elif limits.max_transfer % align:
        changes["max_transfer"] = max(round_down(limits.max_transfer, align), align)
    for key, field in (("opt-write-zero", "pwrite_zeroes_alignment"),
                       ("max-write-zero", "max_pwrite_zeroes"),
                       ("opt-discard", "pdiscard_alignment"),
                       ("max-discard", "max_pdiscard")):  # fmt: skip
        if lim[key]:
            changes[field] = lim[key]
    return attrs.evolve(limits, **changes)


@hookimpl
def bdrv_child_perm(bs: BlockDriverState, child: BdrvChild | None, role: ChildRole, perm: Perm,
                    shared: Perm) -> tuple[Perm, Perm]:  # fmt: skip
    perm, shared = graph.bdrv_default_perms(bs, child, role, perm, shared)
    st: BlkdebugState = bs.opaque
    return perm | st.take_perms, shared & ~st.unshare_perms


# -------------------------------------------------------------------------------------------
# I/O: check the core's promises, apply the rules, forward to the image
# -------------------------------------------------------------------------------------------


def _broken(bs: BlockDriverState, hook: str, problem: str) -> AssertionError:
    return AssertionError(f"blkdebug {bs.node_name!r}: {hook}: the core broke its promise: "
                          f"{problem}")  # fmt: skip


def _check_aligned(bs: BlockDriverState, hook: str, offset: int, length: int) -> None:
    align = bs.bl.request_alignment
    if length <= 0 or offset < 0:
        raise _broken(bs, hook, f"request at {offset:#x} of {length} bytes")
    if offset % align or length % align:
        raise _broken(bs, hook, f"offset {offset:#x} length {length:#x} not aligned to "
                      f"request_alignment {align}")  # fmt: skip


def _check_rw(bs: BlockDriverState, hook: str, offset: int, length: int, buf: memoryview,
              flags: F, allowed: F) -> None:  # fmt: skip
    _check_aligned(bs, hook, offset, length)
    if bs.bl.max_transfer and length > bs.bl.max_transfer:
        raise _broken(bs, hook, f"length {length:#x} above max_transfer {bs.bl.max_transfer:#x}")
    if memoryview(buf).nbytes != length:
        raise _broken(bs, hook, f"buffer of {memoryview(buf).nbytes} bytes for {length}")
    if flags & ~allowed:
        raise _broken(bs, hook, f"flags {F(flags & ~allowed)!r} outside {allowed!r}")


def _image(bs: BlockDriverState) -> BdrvChild:
    child = bs.file
    if child is None:
        raise _broken(bs, "request", "a request reached a node whose image is detached")
    return child


_ERRNO_CLASS = {errno.ENOTSUP: NotSupportedError, errno.ENOSPC: NoSpaceError}


async def _rule_check(bs: BlockDriverState, hook: str, iotype: IoType, offset: int,
                      length: int) -> None:  # fmt: skip
    """Fail the request if an armed rule covers it (QEMU's rule_check)."""
    rule: InjectErrorRule | None = bs.opaque.engine.check(offset, length, iotype)
    if rule is None:
        return
    if not rule.immediately:
        await asyncio.sleep(0)  # complete the failure later, as an asynchronous error would
    name = errno.errorcode.get(rule.errno, str(rule.errno))
    message = f"injected {name} into {hook} at {offset:#x} (rule {rule.number})"
    where = bs.filename or bs.node_name
    cls = _ERRNO_CLASS.get(rule.errno)
    # ENOTSUP must stay the core's fallback signal, as -ENOTSUP is in QEMU
    raise cls(message, where) if cls is not None else BlockError(rule.errno, message, where)


@hookimpl
async def bdrv_co_preadv(bs: BlockDriverState, offset: int, length: int, buf: memoryview,
                         flags: BdrvRequestFlags) -> None:  # fmt: skip
    _check_rw(bs, "bdrv_co_preadv", offset, length, buf, flags, F.PREFETCH | F.COPY_ON_READ)
    end = round_up(bs.total_bytes, bs.bl.request_alignment)
    if offset + length > end:
        raise _broken(bs, "bdrv_co_preadv", f"read {offset:#x}+{length:#x} passes the end "
                      f"{bs.total_bytes:#x} by more than one alignment unit")  # fmt: skip
    await _rule_check(bs, "bdrv_co_preadv", IoType.READ, offset, length)
    await io.bdrv_co_preadv(_image(bs), offset, length, buf, flags)


@hookimpl
async def bdrv_co_pwritev(bs: BlockDriverState, offset: int, length: int, buf: memoryview,
                          flags: BdrvRequestFlags) -> None:  # fmt: skip
    _check_rw(bs, "bdrv_co_pwritev", offset, length, buf, flags, bs.supported_write_flags)
    await _rule_check(bs, "bdrv_co_pwritev", IoType.WRITE, offset, length)
    await io.bdrv_co_pwritev(_image(bs), offset, length, buf, flags)


@hookimpl
async def bdrv_co_pwrite_zeroes(bs: BlockDriverState, offset: int, length: int,
                                flags: BdrvRequestFlags) -> None:  # fmt: skip
    hook = "bdrv_co_pwrite_zeroes"
    _check_aligned(bs, hook, offset, length)
    if flags & ~bs.supported_zero_flags:
        raise _broken(bs, hook, f"flags {F(flags & ~bs.supported_zero_flags)!r} not supported")
    align = max(bs.bl.request_alignment, bs.bl.pwrite_zeroes_alignment)
    if length < align:
        # Pieces below the zero alignment come only from the edges of a request and never
        # cross a boundary; refusing them exercises the core's fallback to zero buffers.
        if offset // align != (offset + length - 1) // align:
            raise _broken(bs, hook, f"piece {offset:#x}+{length:#x} crosses a zero-write "
                          f"alignment boundary ({align})")  # fmt: skip
        raise NotSupportedError(f"zero write below the alignment {align}", bs.node_name)
    if offset % align or length % align:
        raise _broken(bs, hook, f"offset {offset:#x} length {length:#x} not aligned to the "
                      f"zero-write alignment {align}")  # fmt: skip
    if bs.bl.max_pwrite_zeroes and length > bs.bl.max_pwrite_zeroes:
        raise _broken(bs, hook, f"length {length:#x} above max_pwrite_zeroes "
                      f"{bs.bl.max_pwrite_zeroes:#x}")  # fmt: skip
    await _rule_check(bs, hook, IoType.WRITE_ZEROES, offset, length)
    await io.bdrv_co_pwrite_zeroes(_image(bs), offset, length, flags)


@hookimpl
async def bdrv_co_pdiscard(bs: BlockDriverState, offset: int, length: int) -> None:
    hook = "bdrv_co_pdiscard"
    ra = bs.bl.request_alignment
    align = max(ra, bs.bl.pdiscard_alignment)
    if length <= 0 or offset < 0:
        raise _broken(bs, hook, f"request at {offset:#x} of {length} bytes")
    if length < ra:
        # sub-alignment pieces (head and tail of an unaligned discard) are ignored, as
        # hardware would ignore them; they must not straddle an alignment boundary
        if offset // ra != (offset + length - 1) // ra:
            raise _broken(bs, hook, f"piece {offset:#x}+{length:#x} crosses a "
                          f"request_alignment boundary ({ra})")  # fmt: skip
        raise NotSupportedError(f"discard below request_alignment {ra}", bs.node_name)
    _check_aligned(bs, hook, offset, length)
    if length >= align and (offset % align or length % align):
        raise _broken(bs, hook, f"offset {offset:#x} length {length:#x} not aligned to the "
                      f"discard alignment {align}")  # fmt: skip
    if length < align and offset // align != (offset + length - 1) // align:
        raise _broken(bs, hook, f"piece {offset:#x}+{length:#x} crosses a discard alignment "
                      f"boundary ({align})")  # fmt: skip
    if bs.bl.max_pdiscard and length > bs.bl.max_pdiscard:
        raise _broken(bs, hook, f"length {length:#x} above max_pdiscard {bs.bl.max_pdiscard:#x}")
    await _rule_check(bs, hook, IoType.DISCARD, offset, length)
    await io.bdrv_co_pdiscard(_image(bs), offset, length)


@hookimpl
async def bdrv_co_flush_to_disk(bs: BlockDriverState) -> None:
    # The core flushes the image child after this (it holds the write permission on it).
    await _rule_check(bs, "bdrv_co_flush", IoType.FLUSH, 0, 0)


@hookimpl
async def bdrv_co_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                               length: int) -> BlockStatus:  # fmt: skip
    _check_aligned(bs, "bdrv_co_block_status", offset, length)
    await _rule_check(bs, "bdrv_co_block_status", IoType.BLOCK_STATUS, offset, length)
    return BlockStatus(BlockStatusFlags.RAW | BlockStatusFlags.OFFSET_VALID, length, offset,
                       _image(bs).bs)  # fmt: skip


@hookimpl
async def bdrv_co_truncate(bs: BlockDriverState, offset: int, exact: bool,
                           prealloc: PreallocMode, flags: BdrvRequestFlags) -> None:  # fmt: skip
    if offset < 0:
        raise _broken(bs, "bdrv_co_truncate", f"negative size {offset}")
    if flags & ~bs.supported_truncate_flags:
        raise _broken(bs, "bdrv_co_truncate", f"flags {flags!r} not supported")
    await io.bdrv_co_truncate(_image(bs), offset, exact, prealloc, flags)


# -------------------------------------------------------------------------------------------
# Events and breakpoints
# -------------------------------------------------------------------------------------------


@hookimpl
async def bdrv_co_debug_event(bs: BlockDriverState, event: str) -> None:
    if event not in _EVENTS:
        raise _broken(bs, "bdrv_co_debug_event", f"unknown debug event {event!r}")
    st: BlkdebugState = bs.opaque
    hit = st.engine.fire(event)
    if not hit:
        return
    loop = asyncio.get_running_loop()
    entries = [Suspended(rule.tag, loop.create_future(), loop) for rule in hit]
    st.suspended.extend(entries)
    for entry in entries:
        _say(f"blkdebug: Suspended request '{entry.tag}'")
    aio_wait_kick()  # wake wait_break pollers
    for entry in entries:
        try:
            await entry.future
        finally:
            if entry in st.suspended:  # cancelled while parked
                st.suspended.remove(entry)


def _wake(st: BlkdebugState, entry: Suspended) -> None:
    """Resume a parked request. QEMU enters the request's coroutine at once, which prints
    its "Resuming" line and runs on to its next I/O; here the line is printed at once and the
    request goes on at the loop's next turn (its I/O may complete without yielding)."""
    st.suspended.remove(entry)
    _say(f"blkdebug: Resuming request '{entry.tag}'")

    def resolve() -> None:
        if not entry.future.done():
            entry.future.set_result(None)

    entry.loop.call_soon_threadsafe(resolve)


@hookimpl
def bdrv_debug_breakpoint(bs: BlockDriverState, event: str, tag: str) -> None:
    if event not in _EVENTS:
        raise BlockError(errno.ENOENT, f"unknown debug event {event!r}", bs.node_name)
    bs.opaque.engine.add(SuspendRule(event, tag))


@hookimpl
def bdrv_debug_remove_breakpoint(bs: BlockDriverState, tag: str) -> None:
    st: BlkdebugState = bs.opaque
    rules = st.engine.breakpoints(tag)
    for rule in rules:
        st.engine.remove(rule)
    for entry in [e for e in st.suspended if e.tag == tag]:
        _wake(st, entry)
    # Only a breakpoint that had not fired yet counts as removed: QEMU 7.2's
    # resume_req_by_tag(all=true) ends with -ENOENT even after resuming requests, so
    # remove_break on a fired (one-shot) breakpoint resumes its request and still fails.
    if not rules:
        raise BlockError(errno.ENOENT, f"no breakpoint with tag {tag!r} left to remove",
                         bs.node_name)  # fmt: skip


@hookimpl
def bdrv_debug_resume(bs: BlockDriverState, tag: str) -> None:
    st: BlkdebugState = bs.opaque
    for entry in st.suspended:
        if entry.tag == tag:
            _wake(st, entry)
            return
    raise BlockError(errno.ENOENT, f"no request suspended under tag {tag!r}", bs.node_name)


@hookimpl
def bdrv_debug_is_suspended(bs: BlockDriverState, tag: str) -> bool:
    return any(entry.tag == tag for entry in bs.opaque.suspended)


# -------------------------------------------------------------------------------------------
# GS helpers for tests and tools (QEMU's bdrv_debug_* and qemu-io's break/resume/wait_break)
# -------------------------------------------------------------------------------------------


def find_debug_node(bs: BlockDriverState) -> BlockDriverState | None:
    """The first node at or below ``bs``, along primary children, whose driver handles
    breakpoints (QEMU's search in bdrv_debug_breakpoint). Tier: GS."""
    node: BlockDriverState | None = bs
    while node is not None and node.drv is not None:
        if node.drv.bdrv_debug_breakpoint is not None:
            return node
        child = graph.bdrv_primary_child(node)
        node = child.bs if child is not None else None
    return None


def _debug_node(bs: BlockDriverState, fn: str, gs: bool = True) -> BlockDriverState:
    if gs:
        global_state_code(fn)
    node = find_debug_node(bs)
    if node is None:
        raise NotSupportedError("no node below handles breakpoints (insert a blkdebug node)",
                                bs.node_name)  # fmt: skip
    return node


def debug_breakpoint(bs: BlockDriverState, event: str, tag: str) -> None:
    """``break EVENT TAG``: suspend the next request raising ``event`` under ``tag``. Tier: GS.

    :raises NotSupportedError: no blkdebug node below ``bs``.
    :raises BlockError: ``ENOENT`` for an unknown event.
    """
    node = _debug_node(bs, "debug_breakpoint")
    node.drv.bdrv_debug_breakpoint(node, event, tag)  # type: ignore[union-attr]


def debug_remove_breakpoint(bs: BlockDriverState, tag: str) -> None:
    """``remove_break TAG``: drop breakpoints with ``tag`` and resume requests parked under
    it. Tier: GS. :raises BlockError: ``ENOENT`` when no breakpoint was left to drop (as in
    QEMU 7.2, also after resuming a request whose one-shot breakpoint fired)."""
    node = _debug_node(bs, "debug_remove_breakpoint")
    node.drv.bdrv_debug_remove_breakpoint(node, tag)  # type: ignore[union-attr]


def debug_resume(bs: BlockDriverState, tag: str) -> None:
    """``resume TAG``: let one request parked under ``tag`` go on. Tier: GS.

    The request runs when its event loop next runs (poll it, e.g. with ``aio_wait_while``).
    :raises BlockError: ``ENOENT`` when nothing is parked under ``tag``.
    """
    node = _debug_node(bs, "debug_resume")
    node.drv.bdrv_debug_resume(node, tag)  # type: ignore[union-attr]


def debug_is_suspended(bs: BlockDriverState, tag: str) -> bool:
    """Whether a request is parked under ``tag``. Tier: GS."""
    node = find_debug_node(bs)
    return bool(node is not None and node.drv.bdrv_debug_is_suspended(node, tag))  # type: ignore[union-attr]


def wait_break(bs: BlockDriverState, tag: str, timeout: float | None = None) -> None:
    """``wait_break TAG``: poll the node's event loop until a request is parked under
    ``tag``. Tier: I/O or GS (polls).

    :raises BlockError: ``ETIMEDOUT`` when ``timeout`` seconds pass first.
    """
    node = _debug_node(bs, "wait_break", gs=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    handle = None
    if deadline is not None and node.aio_context.in_home_thread():
        handle = node.aio_context.loop.call_later(timeout, aio_wait_kick)  # type: ignore[arg-type]
    try:
        aio_wait_while(node.aio_context, lambda: not debug_is_suspended(node, tag) and (
            deadline is None or time.monotonic() < deadline))  # fmt: skip
    finally:
        if handle is not None:
            handle.cancel()
    if not debug_is_suspended(node, tag):
        raise BlockError(errno.ETIMEDOUT, f"no request suspended under tag {tag!r} within "
                         f"{timeout} s", node.node_name)  # fmt: skip

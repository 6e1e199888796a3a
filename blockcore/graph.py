"""The node graph: BlockDriverState (nodes), BdrvChild (edges), permissions, open and close.

Everything here that changes the graph is global state (GS): main thread, outside any
coroutine, with the affected nodes drained. Drivers open their children from their
``bdrv_open`` hook with :func:`bdrv_open_child`; the core opens backing files.
"""

from __future__ import annotations

import errno
import itertools
import os
from typing import TYPE_CHECKING, Any, Protocol, final

from .aio import (
    AioContext,
    bdrv_graph_wrlock,
    bdrv_graph_wrunlock,
    main_context,
    register_context,
)
from .drivers import BlockDriver, bdrv_find_format, bdrv_find_protocol, bdrv_probe_all
from .errors import BlockError, PermissionConflictError
from .tiers import Tier, api, global_state_code
from .types import (
    BLOCK_PROBE_BUF_SIZE,
    DEFAULT_PERM_PASSTHROUGH,
    DEFAULT_PERM_UNCHANGED,
    BlockLimits,
    ChildRole,
    OpenFlags,
    Perm,
)
from .util import parse_bool, parse_json_filename, round_up, unflatten_options

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BdrvChild",
    "BlockDriverState",
    "bdrv_attach_child",
    "bdrv_backing_chain_next",
    "bdrv_child_get_parent_aio_context",
    "bdrv_cow_bs",
    "bdrv_default_perms",
    "bdrv_filter_bs",
    "bdrv_filter_or_cow_bs",
    "bdrv_find_node",
    "bdrv_get_aio_context",
    "bdrv_open",
    "bdrv_open_child",
    "bdrv_primary_child",
    "bdrv_refresh_limits",
    "bdrv_skip_filters",
    "bdrv_unref",
    "bdrv_unref_child",
    "child_of_bds_get_parent_aio_context",
]


class Parent(Protocol):
    """What a parent of an edge offers the core (QEMU's BdrvChildClass): nodes and backends."""

    parent_is_bds: bool

    def parent_desc(self) -> str: ...
    def parent_aio_context(self) -> AioContext: ...
    def parent_drained_begin(self) -> None: ...
    def parent_drained_end(self) -> None: ...
    def parent_drained_poll(self) -> bool: ...
    def parent_resize(self) -> None: ...


@final
class BdrvChild:
    """An edge from a parent (node or BlockBackend) to the node ``bs``. Tier: GS to change."""

    __slots__ = ("name", "bs", "parent", "role", "perm", "shared_perm", "frozen", "quiesced")

    def __init__(self, parent: Parent, bs: BlockDriverState, name: str, role: ChildRole) -> None:
        self.name = name
        self.bs = bs
        self.parent = parent
        self.role = role
        self.perm = Perm.NONE
        self.shared_perm = Perm.ALL
        self.frozen = False
        self.quiesced = False

    def __repr__(self) -> str:
        return f"<BdrvChild {self.name!r} -> {self.bs.node_name!r}>"


_node_counter = itertools.count(1)
_all_nodes: dict[str, BlockDriverState] = {}


@final
class BlockDriverState:
    """A node of the graph: one driver instance with its children, limits and counters."""

    parent_is_bds = True

    def __init__(self, drv: BlockDriver, node_name: str | None, flags: OpenFlags) -> None:
        if node_name is None:
            node_name = f"#block{next(_node_counter):03d}"
        elif node_name in _all_nodes:
            raise BlockError(errno.EINVAL, f"duplicate node name {node_name!r}")
        self.node_name = node_name
        self.drv: BlockDriver | None = drv
        self.opaque: Any = None
        self.options: dict[str, Any] = {}
        self.open_flags = flags
        self.filename = ""
        self.backing_file = ""
        self.backing_format = ""
        self.aio_context: AioContext = main_context()
        self.children: list[BdrvChild] = []
        self.parents: list[BdrvChild] = []
        self.file: BdrvChild | None = None
        self.backing: BdrvChild | None = None
        self.bl = BlockLimits()
        self.total_bytes = 0
        self.refcnt = 1
        self.force_share = False
        self.detect_zeroes = "off"
        self.sg = False
        self.probed_format = False
        #: False when the driver's bdrv_open failed: bdrv_close is then not called
        self.drv_opened = True
        # request-path state (block/io.c)
        self.in_flight = 0
        self.quiesce_counter = 0
        self.copy_on_read = 0
        self.write_gen = 0
        self.flushed_gen = 0
        self.flush_lock: asyncio.Lock | None = None
        self.tracked_requests: set[Any] = set()
        self.serialising_in_flight = 0
        self.io_plugged = 0
        self.driver_lock: asyncio.Lock | None = None
        self.dirty_bitmaps: list[Any] = []
        self.supported_write_flags = drv.descriptor.supported_write_flags
        self.supported_zero_flags = drv.descriptor.supported_zero_flags
        self.supported_truncate_flags = drv.descriptor.supported_truncate_flags
        _all_nodes[node_name] = self

    # -- parent side of edges to our children (child_of_bds) --------------------------------

    def parent_desc(self) -> str:
        return f"node {self.node_name!r}"

    def parent_aio_context(self) -> AioContext:
        return self.aio_context

    def parent_drained_begin(self) -> None:
        from .drain import bdrv_do_drained_begin_quiesce

        bdrv_do_drained_begin_quiesce(self, None)

    def parent_drained_end(self) -> None:
        from .drain import bdrv_drained_end_noquiesce

        bdrv_drained_end_noquiesce(self)

    def parent_drained_poll(self) -> bool:
        from .drain import bdrv_drain_poll

        return bdrv_drain_poll(self, None, False)

    def parent_resize(self) -> None:
        pass  # formats read their file's length when they need it

    def __repr__(self) -> str:
        drv = self.drv.name if self.drv else "closed"
        return f"<BlockDriverState {self.node_name!r} {drv} {self.filename!r}>"


# -------------------------------------------------------------------------------------------
# Graph navigation (common)
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
def bdrv_get_aio_context(bs: BlockDriverState | None) -> AioContext:
    """The AioContext ``bs`` is bound to (the main one for None). Tier: I/O."""
    return bs.aio_context if bs is not None else main_context()


@api(Tier.IO)
def bdrv_child_get_parent_aio_context(c: BdrvChild) -> AioContext:
    """The AioContext of the parent of edge ``c``, as its parent class reports it. Tier: I/O."""
    return c.parent.parent_aio_context()


@api(Tier.IO)
def child_of_bds_get_parent_aio_context(c: BdrvChild) -> AioContext:
    """The parent node's AioContext, for an edge whose parent is a node. Tier: I/O."""
    parent = c.parent
    assert isinstance(parent, BlockDriverState)
    return parent.aio_context


@api(Tier.IO)
def bdrv_filter_child(bs: BlockDriverState) -> BdrvChild | None:
    """The filtered child of a filter node, else None. Tier: I/O."""
    if bs.drv is None or not bs.drv.descriptor.is_filter:
        return None
    for c in bs.children:
        if c.role & ChildRole.FILTERED:
            return c
    return None


@api(Tier.IO)
def bdrv_cow_child(bs: BlockDriverState) -> BdrvChild | None:
    """The backing (COW) child, else None. Tier: I/O."""
    if bs.drv is None or bs.drv.descriptor.is_filter:
        return None
    return bs.backing


@api(Tier.IO)
def bdrv_filter_bs(bs: BlockDriverState) -> BlockDriverState | None:
    """The node a filter presents, else None. Tier: I/O."""
    c = bdrv_filter_child(bs)
    return c.bs if c else None


@api(Tier.IO)
def bdrv_cow_bs(bs: BlockDriverState) -> BlockDriverState | None:
    """The backing node, else None. Tier: I/O."""
    c = bdrv_cow_child(bs)
    return c.bs if c else None


@api(Tier.IO)
def bdrv_filter_or_cow_bs(bs: BlockDriverState) -> BlockDriverState | None:
    """The filtered child of a filter or the backing node of a format. Tier: I/O."""
    return bdrv_filter_bs(bs) or bdrv_cow_bs(bs)


@api(Tier.IO)
def bdrv_primary_child(bs: BlockDriverState) -> BdrvChild | None:
    """The child with the PRIMARY role. Tier: I/O."""
    for c in bs.children:
        if c.role & ChildRole.PRIMARY:
            return c
    return None


@api(Tier.IO)
def bdrv_skip_filters(bs: BlockDriverState | None) -> BlockDriverState | None:
    """Follow filtered children down to the first non-filter node. Tier: I/O."""
    while bs is not None and (nxt := bdrv_filter_bs(bs)) is not None:
        bs = nxt
    return bs


@api(Tier.IO)
def bdrv_backing_chain_next(bs: BlockDriverState) -> BlockDriverState | None:
    """The next node of the backing chain, skipping filters. Tier: I/O."""
    return bdrv_skip_filters(bdrv_cow_bs(bdrv_skip_filters(bs)))  # type: ignore[arg-type]


@api(Tier.GS)
def bdrv_find_node(node_name: str) -> BlockDriverState | None:
    """The open node called ``node_name``. Tier: GS."""
    global_state_code("bdrv_find_node")
    return _all_nodes.get(node_name)


# -------------------------------------------------------------------------------------------
# Permissions
# -------------------------------------------------------------------------------------------


@api(Tier.GS)
def bdrv_default_perms(
    bs: BlockDriverState, child: BdrvChild | None, role: ChildRole, perm: Perm, shared: Perm
) -> tuple[Perm, Perm]:
    """QEMU's default permission policy for a child with ``role``. Tier: GS."""
    if role & ChildRole.FILTERED:
        return perm & DEFAULT_PERM_PASSTHROUGH, (shared & DEFAULT_PERM_PASSTHROUGH) | (
            DEFAULT_PERM_UNCHANGED
        )
    if role & ChildRole.COW:
        new_shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if shared & Perm.WRITE or bs.open_flags & OpenFlags.INACTIVE:
            new_shared |= Perm.WRITE | Perm.RESIZE
        return perm & Perm.CONSISTENT_READ, new_shared
    perm, shared = perm & DEFAULT_PERM_PASSTHROUGH, (shared & DEFAULT_PERM_PASSTHROUGH)
    if role & ChildRole.METADATA:
        if not bs.open_flags & OpenFlags.NO_IO:
            perm |= Perm.CONSISTENT_READ
        if bs.open_flags & OpenFlags.RDWR and not bs.open_flags & OpenFlags.INACTIVE:
            perm |= Perm.WRITE | Perm.RESIZE
        shared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & ChildRole.DATA:
        shared &= ~Perm.RESIZE
        if perm & Perm.WRITE_UNCHANGED:
            perm |= Perm.WRITE
        if perm & Perm.WRITE:
            perm |= Perm.RESIZE
    if bs.force_share:
        shared = Perm.ALL
    return perm, shared


def _cumulative(bs: BlockDriverState, plan: dict[BdrvChild, tuple[Perm, Perm]]) -> tuple[Perm, Perm]:
    perm, shared = Perm.NONE, Perm.ALL
    for c in bs.parents:
        p, s = plan.get(c, (c.perm, c.shared_perm))
        perm |= p
        shared &= s
    return perm, shared


def _child_perm(bs: BlockDriverState, c: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    hook = bs.drv.bdrv_child_perm if bs.drv else None  # type: ignore[attr-defined]
    if hook is not None:
        return hook(bs, c, c.role, perm, shared)  # type: ignore[no-any-return]
    return bdrv_default_perms(bs, c, c.role, perm, shared)


def _refresh_perms(start: BlockDriverState) -> None:
    """Recompute permissions below ``start`` (inclusive) transactionally."""
    plan: dict[BdrvChild, tuple[Perm, Perm]] = {}
    order: list[BlockDriverState] = []

    def visit(bs: BlockDriverState) -> None:
        if bs in order:
            order.remove(bs)
        order.append(bs)
        perm, shared = _cumulative(bs, plan)
        for c in bs.children:
            plan[c] = _child_perm(bs, c, perm, shared)
            visit(c.bs)

    visit(start)
    for bs in order:
        for a in bs.parents:
            pa, _sa = plan.get(a, (a.perm, a.shared_perm))
            for b in bs.parents:
                if a is b:
                    continue
                _pb, sb = plan.get(b, (b.perm, b.shared_perm))
                if pa & ~sb:
                    names = ", ".join(repr(n) for n in Perm(pa & ~sb).qemu_names)
                    raise PermissionConflictError(
                        f"conflicts with use by {b.parent.parent_desc()} as {b.name!r}, "
                        f"which does not allow {names} on {bs.node_name}",
                        bs.filename or bs.node_name,
                    )
    for bs in order:
        perm, _shared = _cumulative(bs, plan)
        if perm & Perm.WRITE and not bs.open_flags & OpenFlags.RDWR and bs.parents:
            raise PermissionConflictError("block node is read-only", bs.filename or bs.node_name)
    checked: list[BlockDriverState] = []
    try:
        for bs in order:
            if bs.drv is not None and bs.drv.bdrv_check_perm is not None:  # type: ignore[attr-defined]
                bs.drv.bdrv_check_perm(bs, *_cumulative(bs, plan))  # type: ignore[attr-defined]
                checked.append(bs)
    except BaseException:
        for bs in checked:
            if bs.drv.bdrv_abort_perm_update is not None:  # type: ignore[union-attr]
                bs.drv.bdrv_abort_perm_update(bs)  # type: ignore[union-attr]
        raise
    for c, (p, s) in plan.items():
        c.perm, c.shared_perm = p, s
    for bs in checked:
        if bs.drv.bdrv_set_perm is not None:  # type: ignore[union-attr]
            bs.drv.bdrv_set_perm(bs, *_cumulative(bs, {}))  # type: ignore[union-attr]


@api(Tier.GS)
def bdrv_refresh_perms(bs: BlockDriverState) -> None:
    """Recompute and apply permissions of ``bs``'s subtree. Tier: GS."""
    global_state_code("bdrv_refresh_perms")
    _refresh_perms(bs)


# -------------------------------------------------------------------------------------------
# Edges
# -------------------------------------------------------------------------------------------


@api(Tier.GS)
def bdrv_root_attach_child(
    child_bs: BlockDriverState, name: str, role: ChildRole, perm: Perm, shared: Perm, parent: Parent
) -> BdrvChild:
    """Attach a non-node parent (BlockBackend) to ``child_bs`` with fixed permissions. Tier: GS.

    :raises PermissionConflictError: the node's other users do not share what is asked;
        nothing is attached then.
    """
    global_state_code("bdrv_root_attach_child")
    c = BdrvChild(parent, child_bs, name, role)
    c.perm, c.shared_perm = perm, shared
    child_bs.parents.append(c)
    try:
        _refresh_perms(child_bs)
    except BaseException:
        child_bs.parents.remove(c)
        raise
    return c


@api(Tier.GS)
def bdrv_attach_child(
    parent_bs: BlockDriverState, child_bs: BlockDriverState, name: str, role: ChildRole
) -> BdrvChild:
    """Make ``child_bs`` the child ``name`` of ``parent_bs`` (``bs.file`` for ``file``,
    ``bs.backing`` for a COW child). The caller's reference to ``child_bs`` moves to the
    edge. Tier: GS."""
    global_state_code("bdrv_attach_child")
    if role & ChildRole.COW and parent_bs.backing is not None:
        raise BlockError(errno.EINVAL, "node already has a backing child", parent_bs.node_name)
    node: BlockDriverState | None = parent_bs
    if _reaches(child_bs, parent_bs):
        raise BlockError(errno.EINVAL, "making this node a child would create a loop", name)
    del node
    if child_bs.aio_context is not parent_bs.aio_context:
        raise BlockError(
            errno.EINVAL,
            f"cannot attach {child_bs.node_name!r} ({child_bs.aio_context.name}) to "
            f"{parent_bs.node_name!r} ({parent_bs.aio_context.name}): contexts differ",
        )
    c = BdrvChild(parent_bs, child_bs, name, role)
    bdrv_graph_wrlock()
    try:
        parent_bs.children.append(c)
        child_bs.parents.append(c)
        try:
            _refresh_perms(parent_bs)
        except BaseException:
            parent_bs.children.remove(c)
            child_bs.parents.remove(c)
            raise
    finally:
        bdrv_graph_wrunlock()
    if name == "file":
        parent_bs.file = c
    if role & ChildRole.COW:
        parent_bs.backing = c
    if parent_bs.quiesce_counter:
        from .drain import bdrv_do_drained_begin_quiesce

        for _ in range(parent_bs.quiesce_counter):
            bdrv_do_drained_begin_quiesce(child_bs, c)
    return c


def _reaches(top: BlockDriverState, target: BlockDriverState) -> bool:
    if top is target:
        return True
    return any(_reaches(c.bs, target) for c in top.children)


@api(Tier.GS)
def bdrv_unref_child(parent_bs: BlockDriverState, child: BdrvChild) -> None:
    """Detach ``child`` from ``parent_bs`` and drop the edge's reference. Tier: GS."""
    global_state_code("bdrv_unref_child")
    if child.frozen:
        raise BlockError(errno.EPERM, f"cannot detach frozen child {child.name!r}")
    bdrv_graph_wrlock()
    try:
        parent_bs.children.remove(child)
        if parent_bs.file is child:
            parent_bs.file = None
        if parent_bs.backing is child:
            parent_bs.backing = None
    finally:
        bdrv_graph_wrunlock()
    bdrv_root_unref_child(child)
    _refresh_perms(parent_bs)


@api(Tier.GS)
def bdrv_root_unref_child(child: BdrvChild) -> None:
    """Remove edge ``child`` from its node and drop its reference. Tier: GS."""
    global_state_code("bdrv_root_unref_child")
    bs = child.bs
    if child.quiesced:
        from .drain import bdrv_parent_drained_end_single

        while child.quiesced:
            bdrv_parent_drained_end_single(child)
    bs.parents.remove(child)
    if bs.drv is not None:
        _refresh_perms(bs)
    bdrv_unref(bs)


@api(Tier.GS)
def bdrv_set_backing_hd(bs: BlockDriverState, backing_hd: BlockDriverState | None) -> None:
    """Replace the backing node of ``bs`` (None removes it). Tier: GS."""
    global_state_code("bdrv_set_backing_hd")
    from .drain import bdrv_drained_begin, bdrv_drained_end

    bdrv_drained_begin(bs)
    try:
        if bs.backing is not None:
            bdrv_unref_child(bs, bs.backing)
        if backing_hd is not None:
            backing_hd.refcnt += 1
            try:
                bdrv_attach_child(bs, backing_hd, "backing", ChildRole.COW)
            except BaseException:
                backing_hd.refcnt -= 1
                raise
    finally:
        bdrv_drained_end(bs)


# -------------------------------------------------------------------------------------------
# Open
# -------------------------------------------------------------------------------------------

_GENERIC_KEYS = ("driver", "node-name", "read-only", "auto-read-only", "cache", "discard",
                 "detect-zeroes", "force-share", "filename")  # fmt: skip


def _apply_generic(options: dict[str, Any], flags: OpenFlags) -> tuple[OpenFlags, dict[str, Any]]:
    """Fold the generic options into ``flags``; return the flags and the generic values."""
    generic: dict[str, Any] = {}
    if "read-only" in options:
        if parse_bool(options.pop("read-only"), "read-only"):
            flags &= ~OpenFlags.RDWR
        else:
            flags |= OpenFlags.RDWR
    if "auto-read-only" in options and parse_bool(options.pop("auto-read-only"), "auto-read-only"):
        flags |= OpenFlags.AUTO_RDONLY
    cache = options.pop("cache", {}) or {}
    if not isinstance(cache, dict):
        raise BlockError(errno.EINVAL, f"invalid cache options {cache!r}")
    for key, bit in (("direct", OpenFlags.NOCACHE), ("no-flush", OpenFlags.NO_FLUSH)):
        if key in cache:
            flags = flags | bit if parse_bool(cache.pop(key), f"cache.{key}") else flags & ~bit
    cache.pop("writeback", None)
    if cache:
        raise BlockError(errno.EINVAL, f"unknown cache option {next(iter(cache))!r}")
    if "discard" in options:
        mode = str(options.pop("discard"))
        if mode in ("unmap", "on"):
            flags |= OpenFlags.UNMAP
        elif mode in ("ignore", "off"):
            flags &= ~OpenFlags.UNMAP
        else:
            raise BlockError(errno.EINVAL, f"invalid discard option {mode!r}")
    for key in ("node-name", "detect-zeroes", "force-share"):
        if key in options:
            generic[key] = options.pop(key)
    return flags, generic


def _child_flags(parent_flags: OpenFlags, role: ChildRole, parent_is_format: bool) -> OpenFlags:
    """Flags a child inherits (QEMU's bdrv_inherited_options)."""
    keep = OpenFlags.CACHE_MASK | OpenFlags.RDWR | OpenFlags.AUTO_RDONLY | OpenFlags.NO_IO
    flags = parent_flags & keep
    if role & ChildRole.COW:
        flags &= ~(OpenFlags.RDWR | OpenFlags.AUTO_RDONLY)
        return flags
    flags |= OpenFlags.UNMAP  # lower layers follow the unmap policy of the node above
    # a format's or a filter's own children are protocol nodes: no probing below them
    flags |= OpenFlags.PROTOCOL
    if parent_flags & OpenFlags.INACTIVE:
        flags |= OpenFlags.INACTIVE
    return flags


@api(Tier.GS)
def bdrv_open(
    filename: str | None = None,
    options: dict[str, Any] | None = None,
    flags: OpenFlags = OpenFlags.NONE,
) -> BlockDriverState:
    """Open a node (and its children) from a filename and/or blockdev options. Tier: GS.

    ``filename`` may be a path, ``proto:...`` or ``json:{...}``. ``options`` use QEMU's
    blockdev keys, flat (``file.filename``) or nested. Without ``driver`` the format is
    probed. Returns a node holding one reference (drop it with :func:`bdrv_unref`).
    """
    global_state_code("bdrv_open")
    opts = unflatten_options(dict(options or {}))
    if filename is not None and filename.startswith("json:"):
        merged = parse_json_filename(filename)
        merged.update(opts)
        opts, filename = merged, None
    return _open_node(filename, opts, flags, parent_is_format=False)


def _open_node(
    filename: str | None, options: dict[str, Any], flags: OpenFlags, *, parent_is_format: bool
) -> BlockDriverState:
    drv_name = options.pop("driver", None)
    if filename is None and isinstance(options.get("filename"), str) and drv_name is None:
        filename = options.pop("filename")
    if drv_name is not None:
        drv = bdrv_find_format(str(drv_name))
        probed = False
    elif flags & OpenFlags.PROTOCOL:
        if filename is None:
            raise BlockError(errno.EINVAL, "a 'driver' or a 'filename' is required")
        drv = bdrv_find_protocol(filename) or bdrv_find_format("file")
        probed = False
    else:
        if filename is None and "file" not in options:
            raise BlockError(errno.EINVAL, "a 'driver' or a 'filename' is required")
        file_ref = options.pop("file", None)
        if isinstance(file_ref, dict):
            proto = _open_node(filename, file_ref, _child_flags(flags, ChildRole.IMAGE, True),
                               parent_is_format=True)  # fmt: skip
        elif isinstance(file_ref, BlockDriverState):
            proto = file_ref
        else:
            proto = _open_node(file_ref or filename, {}, _child_flags(flags, ChildRole.IMAGE, True),
                               parent_is_format=True)  # fmt: skip
        try:
            drv = _probe_format(proto)
        except BaseException:
            bdrv_unref(proto)
            raise
        options["file"] = proto
        filename, probed = None, True
    desc = drv.descriptor
    if filename is not None:
        if desc.protocol_name is not None or desc.needs_filename:
            if drv.bdrv_parse_filename is not None and filename.startswith(  # type: ignore[attr-defined]
                f"{desc.protocol_name}:"
            ):
                for key, value in drv.bdrv_parse_filename(filename).items():  # type: ignore[attr-defined]
                    options.setdefault(key, value)
            else:
                prefix = f"{desc.protocol_name}:"
                plain = filename[len(prefix) :] if filename.startswith(prefix) else filename
                options.setdefault("filename", plain)
        else:
            options.setdefault("file", filename)
    flags, generic = _apply_generic(options, flags)
    allowed = {o.name for o in desc.runtime_opts} | set(desc.child_names)
    if desc.protocol_name is not None or desc.needs_filename:
        allowed.add("filename")
    if desc.supports_backing:
        allowed.add("backing")
    for key in options:
        if key not in allowed:
            raise BlockError(
                errno.EINVAL,
                f"block {'format' if desc.is_format else 'driver'} {drv.name!r} does not "
                f"support the option {key!r}",
                str(options.get("filename") or filename or ""),
            )
    bs = BlockDriverState(drv, generic.get("node-name"), flags)
    bs.probed_format = probed
    bs.force_share = parse_bool(generic.get("force-share", False), "force-share")
    bs.detect_zeroes = str(generic.get("detect-zeroes", "off"))
    bs.options = dict(options)
    if isinstance(options.get("filename"), str):
        bs.filename = options["filename"]
    try:
        backing_ref = options.pop("backing", "") if desc.supports_backing else ""
        if drv.bdrv_open is not None:  # type: ignore[attr-defined]
            try:
                drv.bdrv_open(bs, options, flags)  # type: ignore[attr-defined]
            except BaseException:
                bs.drv_opened = False  # a failed open is not closed by the driver
                raise
        if not bs.filename and bs.file is not None:
            bs.filename = bs.file.bs.filename
        if desc.supports_backing and not flags & OpenFlags.NO_BACKING and bs.backing is None:
            _open_backing(bs, backing_ref)
        bdrv_refresh_limits(bs)
        bdrv_refresh_total_bytes(bs)
    except BaseException:
        _close_node(bs)
        raise
    return bs


def _probe_format(proto: BlockDriverState) -> BlockDriver:
    from .io import bdrv_getlength, bdrv_pread

    length = bdrv_getlength(proto)
    buf = bytearray(min(length, BLOCK_PROBE_BUF_SIZE))
    if buf:
        c = bdrv_root_attach_child(proto, "probe", ChildRole.IMAGE, Perm.CONSISTENT_READ, Perm.ALL,
                                   _ProbeParent(proto))  # fmt: skip
        proto.refcnt += 1
        try:
            bdrv_pread(c, 0, len(buf), buf)
        finally:
            bdrv_root_unref_child(c)
    drv = bdrv_probe_all(bytes(buf), proto.filename or None)
    if drv is None:
        raise BlockError(errno.EINVAL, "could not determine image format", proto.filename)
    return drv


class _ProbeParent:
    """A short-lived parent that reads the first bytes of a node to probe its format."""

    parent_is_bds = False

    def __init__(self, bs: BlockDriverState) -> None:
        self.bs = bs

    def parent_desc(self) -> str:
        return "format probing"

    def parent_aio_context(self) -> AioContext:
        return self.bs.aio_context

    def parent_drained_begin(self) -> None:
        pass

    def parent_drained_end(self) -> None:
        pass

    def parent_drained_poll(self) -> bool:
        return False

    def parent_resize(self) -> None:
        pass


def _open_backing(bs: BlockDriverState, ref: Any) -> None:
    if ref is None:  # "backing": null means no backing file
        return
    if isinstance(ref, str) and ref == "":
        if not bs.backing_file:
            return
        ref = _backing_path(bs)
        opts: dict[str, Any] = {"driver": bs.backing_format} if bs.backing_format else {}
    elif isinstance(ref, dict):
        opts = dict(ref)
        ref = opts.pop("filename", None) if "file" in opts or "driver" in opts else None
    else:
        opts = {}
    child_flags = _child_flags(bs.open_flags, ChildRole.COW, True)
    if isinstance(ref, BlockDriverState):
        backing = ref
        backing.refcnt += 1
    elif isinstance(ref, str) and not opts and ref in _all_nodes:
        backing = _all_nodes[ref]
        backing.refcnt += 1
    else:
        try:
            backing = _open_node(ref, opts, child_flags, parent_is_format=False)
        except OSError as exc:
            raise BlockError(
                exc.errno or errno.EIO,
                f"could not open backing file: {exc.strerror or exc}",
                bs.backing_file or bs.filename,
            ) from exc
    try:
        bdrv_attach_child(bs, backing, "backing", ChildRole.COW)
    except BaseException:
        bdrv_unref(backing)
        raise


def _backing_path(bs: BlockDriverState) -> str:
    """A relative backing file name is relative to the directory of the image naming it."""
    name = bs.backing_file
    if name.startswith(("/", "json:")) or ":" in name.split("/")[0] or not bs.filename:
        return name
    return os.path.join(os.path.dirname(bs.filename), name)


@api(Tier.GS)
def bdrv_open_child(
    bs: BlockDriverState,
    options: dict[str, Any],
    name: str,
    role: ChildRole,
    *,
    allow_none: bool = False,
) -> BdrvChild | None:
    """Open child ``name`` of ``bs`` from ``options[name]`` and attach it. Tier: GS.

    Call it from a driver's ``bdrv_open``. ``options[name]`` may be a filename, a nested
    options dict, a node name or an open node; it is removed from ``options``. The child
    inherits cache and read-only flags from ``bs``; a format's non-backing children are
    opened as protocols (no format probing below a format).
    """
    global_state_code("bdrv_open_child")
    ref = options.pop(name, None)
    if ref is None:
        if allow_none:
            return None
        raise BlockError(errno.EINVAL, f"a {name!r} child is required", bs.node_name)
    is_format = bool(bs.drv and bs.drv.descriptor.is_format)
    flags = _child_flags(bs.open_flags, role, is_format)
    if isinstance(ref, BlockDriverState):
        child_bs = ref
    elif isinstance(ref, str) and ref in _all_nodes:
        child_bs = _all_nodes[ref]
        child_bs.refcnt += 1
    elif isinstance(ref, str):
        child_bs = _open_node(ref, {}, flags, parent_is_format=is_format)
    elif isinstance(ref, dict):
        child_bs = _open_node(None, dict(ref), flags, parent_is_format=is_format)
    else:
        raise BlockError(errno.EINVAL, f"invalid reference for child {name!r}: {ref!r}")
    try:
        return bdrv_attach_child(bs, child_bs, name, role)
    except BaseException:
        bdrv_unref(child_bs)
        raise


@api(Tier.GS)
def bdrv_refresh_limits(bs: BlockDriverState) -> None:
    """Merge the limits of data children, then let the driver adjust them. Tier: GS."""
    global_state_code("bdrv_refresh_limits")
    merged = BlockLimits(min_mem_alignment=512)
    sources = [c.bs.bl for c in bs.children
               if c.role & (ChildRole.DATA | ChildRole.FILTERED | ChildRole.COW)]  # fmt: skip
    if sources:
        def min_nonzero(values: list[int]) -> int:
            nz = [v for v in values if v]
            return min(nz) if nz else 0

        merged = BlockLimits(
            request_alignment=1,
            max_transfer=0,
            opt_transfer=max(s.opt_transfer for s in sources),
            pdiscard_alignment=max(s.pdiscard_alignment for s in sources),
            min_mem_alignment=max(s.min_mem_alignment for s in sources),
            opt_mem_alignment=max(s.opt_mem_alignment for s in sources),
            max_iov=min_nonzero([s.max_iov for s in sources]) or 1024,
        )
        # max_transfer of children constrains us only where it is a multiple of our alignment
        mt = min_nonzero([s.max_transfer for s in sources])
        if mt:
            merged = _evolve(merged, max_transfer=mt)
    if bs.drv is not None and bs.drv.bdrv_refresh_limits is not None:  # type: ignore[attr-defined]
        merged = bs.drv.bdrv_refresh_limits(bs, merged)  # type: ignore[attr-defined]
    bs.bl = merged


def _evolve(limits: BlockLimits, **changes: int) -> BlockLimits:
    import attrs

    return attrs.evolve(limits, **changes)


@api(Tier.GS)
def bdrv_refresh_total_bytes(bs: BlockDriverState) -> None:
    """Read the node's length from its driver (rounded up to 512). Tier: GS."""
    global_state_code("bdrv_refresh_total_bytes")
    from .io import bdrv_getlength_uncached

    bs.total_bytes = round_up(bdrv_getlength_uncached(bs), 512)


# -------------------------------------------------------------------------------------------
# Close
# -------------------------------------------------------------------------------------------


@api(Tier.GS)
def bdrv_ref(bs: BlockDriverState) -> None:
    """Take a reference to ``bs``. Tier: GS."""
    global_state_code("bdrv_ref")
    bs.refcnt += 1


@api(Tier.GS)
def bdrv_unref(bs: BlockDriverState | None) -> None:
    """Drop a reference; the last one flushes and closes the node and its children. Tier: GS."""
    global_state_code("bdrv_unref")
    if bs is None:
        return
    bs.refcnt -= 1
    if bs.refcnt == 0:
        _close_node(bs)


def _close_node(bs: BlockDriverState) -> None:
    from .drain import bdrv_drained_begin, bdrv_drained_end
    from .io import bdrv_flush

    if bs.drv is None:
        return
    bdrv_drained_begin(bs)
    try:
        if bs.open_flags & OpenFlags.RDWR and not bs.open_flags & OpenFlags.INACTIVE:
            try:
                bdrv_flush(bs)
            except OSError:
                pass  # close must go on; the caller flushed explicitly if it cared
        if bs.drv.bdrv_close is not None and bs.drv_opened:  # type: ignore[attr-defined]
            bs.drv.bdrv_close(bs)  # type: ignore[attr-defined]
    finally:
        bdrv_drained_end(bs)
        for c in list(bs.children):
            bs.children.remove(c)
            bdrv_root_unref_child(c)
        bs.file = bs.backing = None
        bs.drv = None
        _all_nodes.pop(bs.node_name, None)


# -------------------------------------------------------------------------------------------
# Reopen
# -------------------------------------------------------------------------------------------


@api(Tier.GS)
def bdrv_reopen(bs: BlockDriverState, flags: OpenFlags, options: dict[str, Any] | None = None
                ) -> None:  # fmt: skip
    """Switch ``bs`` (and the storage children below it) to ``flags``, e.g. read-only <->
    read-write, transactionally: every driver prepares, permissions are checked, then all
    commit; on any failure all abort and nothing changes. Tier: GS.

    Drivers without reopen hooks accept only a change of the read-write flag and no options.
    """
    global_state_code("bdrv_reopen")
    from .drain import bdrv_drained_begin, bdrv_drained_end

    queue: list[tuple[BlockDriverState, OpenFlags, dict[str, Any]]] = []

    def collect(node: BlockDriverState, nflags: OpenFlags, opts: dict[str, Any]) -> None:
        queue.append((node, nflags, opts))
        for c in node.children:
            if not c.role & ChildRole.COW:
                child_rw = (c.bs.open_flags & ~OpenFlags.RDWR) | (nflags & OpenFlags.RDWR)
                collect(c.bs, child_rw, {})

    collect(bs, flags, dict(options or {}))
    bdrv_drained_begin(bs)
    try:
        prepared: list[tuple[BlockDriverState, Any, OpenFlags]] = []
        try:
            for node, nflags, opts in queue:
                drv = node.drv
                if drv is None:
                    raise BlockError(errno.ENOMEDIUM, "no medium", node.node_name)
                if drv.bdrv_reopen_prepare is not None:  # type: ignore[attr-defined]
                    state = drv.bdrv_reopen_prepare(node, opts, nflags)  # type: ignore[attr-defined]
                elif opts:
                    raise BlockError(errno.EINVAL, f"cannot change the option "
                                     f"{next(iter(opts))!r} of driver {drv.name!r}", node.filename)
                else:
                    state = None
                prepared.append((node, state, node.open_flags))
                node.open_flags = nflags
            _refresh_perms(bs)
        except BaseException:
            for node, state, old in reversed(prepared):
                node.open_flags = old
                if node.drv.bdrv_reopen_abort is not None:  # type: ignore[union-attr]
                    node.drv.bdrv_reopen_abort(node, state)  # type: ignore[union-attr]
            raise
        for node, state, _old in prepared:
            if node.drv.bdrv_reopen_commit is not None:  # type: ignore[union-attr]
                node.drv.bdrv_reopen_commit(node, state)  # type: ignore[union-attr]
    finally:
        bdrv_drained_end(bs)


@api(Tier.GS)
def bdrv_reopen_set_read_only(bs: BlockDriverState, read_only: bool) -> None:
    """Reopen ``bs`` read-only or read-write (QEMU's bdrv_reopen_set_read_only). Tier: GS.

    :raises PermissionConflictError: making it read-only while a user holds write access.
    """
    global_state_code("bdrv_reopen_set_read_only")
    flags = bs.open_flags & ~OpenFlags.RDWR if read_only else bs.open_flags | OpenFlags.RDWR
    bdrv_reopen(bs, flags)


@api(Tier.GS)
def bdrv_try_change_aio_context(bs: BlockDriverState, ctx: AioContext) -> None:
    """Move ``bs`` and every node connected to it into ``ctx``, draining each first. Tier: GS."""
    global_state_code("bdrv_try_change_aio_context")
    from .drain import bdrv_drained_begin, bdrv_drained_end

    nodes: list[BlockDriverState] = []
    others: list[Any] = []

    def collect(node: BlockDriverState) -> None:
        if node in nodes:
            return
        nodes.append(node)
        for c in node.children:
            collect(c.bs)
        for c in node.parents:
            if isinstance(c.parent, BlockDriverState):
                collect(c.parent)
            elif c.parent not in others:
                others.append(c.parent)

    collect(bs)
    for node in nodes:
        bdrv_drained_begin(node)
    try:
        register_context(ctx)
        for node in nodes:
            node.aio_context = ctx
            node.flush_lock = node.driver_lock = None  # asyncio locks bind to one loop
        for parent in others:
            if hasattr(parent, "set_aio_context"):
                parent.set_aio_context(ctx)
    finally:
        for node in nodes:
            bdrv_drained_end(node)


register_context(main_context())

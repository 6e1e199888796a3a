"""The node graph: BlockDriverState (nodes), BdrvChild (edges), permissions, open and close.

Everything here that changes the graph is global state (GS): main thread, outside any
coroutine, with the affected nodes drained. Drivers open their children from their
``bdrv_open`` hook with :func:`bdrv_open_child`; the core opens backing files.
"""

from __future__ import annotations

import errno
import itertools
from typing import TYPE_CHECKING, Any, Protocol, final

from .aio import (
    AioContext,
    bdrv_graph_wrlock,
    bdrv_graph_wrunlock,
    main_context,
    register_context,
)
from .drivers import BlockDriver
from .errors import BlockError, PermissionConflictError
from .tiers import Tier, api, global_state_code
from .types import (
    DEFAULT_PERM_PASSTHROUGH,
    DEFAULT_PERM_UNCHANGED,
    BlockLimits,
    ChildRole,
    OpenFlags,
    Perm,
)

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

    __slots__ = ("name", "bs", "parent", "role", "_perm", "_shared", "frozen", "quiesced")

    def __init__(self, parent: Parent, bs: BlockDriverState, name: str, role: ChildRole) -> None:
        self.name = name
        self.bs = bs
        self.parent = parent
        self.role = role
        self._perm = 0
        self._shared = int(Perm.ALL)
        self.frozen = False
        self.quiesced = False

    # Permissions are kept as plain ints (checked on every write; IntFlag maths is slow);
    # compare them with Perm members as usual.
    @property
    def perm(self) -> int:
        """Permissions (:class:`Perm` bits) this edge holds on ``bs``."""
        return self._perm

    @perm.setter
    def perm(self, value: int) -> None:
        self._perm = int(value)

    @property
    def shared_perm(self) -> int:
        """Permissions (:class:`Perm` bits) this edge lets other users of ``bs`` hold."""
        return self._shared

    @shared_perm.setter
    def shared_perm(self, value: int) -> None:
        self._shared = int(value)

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
        self._open_flags = int(flags)
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
        #: A driver at or below this node reports media presence (CD-ROM): requests then
        #: check for a medium first. Kept up to date by graph changes.
        self.removable_below = drv.bdrv_co_is_inserted is not None  # type: ignore[attr-defined]
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
        #: plain requests running without a TrackedRequest (see io._wait_serialising)
        self.untracked_in_flight = 0
        self.untracked_waiters: list[Any] = []
        self.io_plugged = 0
        self.driver_lock: asyncio.Lock | None = None
        self.dirty_bitmaps: list[Any] = []
        self.supported_write_flags = int(drv.descriptor.supported_write_flags)
        self.supported_zero_flags = int(drv.descriptor.supported_zero_flags)
        self.supported_truncate_flags = int(drv.descriptor.supported_truncate_flags)
        _all_nodes[node_name] = self

    @property
    def open_flags(self) -> int:
        """:class:`OpenFlags` bits of the node, kept as a plain int (tested per request)."""
        return self._open_flags

    @open_flags.setter
    def open_flags(self, value: int) -> None:
        self._open_flags = int(value)

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
    _refresh_removable(parent_bs)
    if parent_bs.quiesce_counter:
        from .drain import bdrv_do_drained_begin_quiesce

        for _ in range(parent_bs.quiesce_counter):
            bdrv_do_drained_begin_quiesce(child_bs, c)
    return c


def _refresh_removable(bs: BlockDriverState) -> None:
    """Recompute ``removable_below`` for ``bs`` and, when it changes, for its parents."""
    drv = bs.drv
    new = drv is not None and (
        drv.bdrv_co_is_inserted is not None  # type: ignore[attr-defined]
        or any(c.bs.removable_below for c in bs.children)
    )
    if new != bs.removable_below:
        bs.removable_below = new
        for c in bs.parents:
            if isinstance(c.parent, BlockDriverState):
                _refresh_removable(c.parent)


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
    _refresh_removable(parent_bs)


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

# Opening and reopening live in blockcore.lifecycle; their names stay reachable from here.
from .lifecycle import (  # noqa: E402, F401  (re-exported)
    bdrv_open,
    bdrv_open_child,
    bdrv_refresh_total_bytes,
    bdrv_reopen,
    bdrv_reopen_set_read_only,
)

"""The driver contract: every callback a block driver may implement, as pluggy hookspecs.

A driver is a module (or any object) whose functions carry ``@blockcore.hookimpl`` and are
named exactly like the specs below, with the same parameters in the same order. The names are
QEMU's ``BlockDriver`` fields; ``_co_`` in a name means ``async def``, and only then.
Registration (:mod:`blockcore.drivers`) refuses unknown names, other parameters and the wrong
coroutine-ness, naming the plugin, the hook and the fix.

How the core calls drivers: pluggy validates the contract and runs the true 1:N hooks
(``bdrv_probe``, ``bdrv_probe_device``). Everything per node goes through a call table built
once per driver (:class:`blockcore.drivers.BlockDriver`), so a request costs one direct call.
A hook the driver leaves out is ``None`` in that table and the core applies the fallback
written under "Optional" below. :class:`~blockcore.errors.NotSupportedError` raised by a
driver is the one signal that makes the core fall back where a fallback exists.

Drivers reach their children only through :mod:`blockcore.io` (``await
io.bdrv_co_preadv(bs.file, ...)``), so the core's checks run again at every layer.

Tiers: "GS" hooks run in the main thread outside any coroutine; "I/O" hooks are coroutines
running on the event loop of the node's AioContext, with the graph read lock held by the
caller. Each spec states its tier; the core checks it before calling.

Append-only: hooks and parameters are never renamed or removed; new ones are added with
``.. versionadded::``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .graph import BdrvChild, BlockDriverState
    from .types import (
        BdrvCheckMode,
        BdrvCheckResult,
        BdrvRequestFlags,
        BlockDriverInfo,
        BlockLimits,
        BlockMeasureInfo,
        BlockStatus,
        ChildRole,
        DriverDescriptor,
        OpenFlags,
        Perm,
        PreallocMode,
    )

hookspec = pluggy.HookspecMarker("blockcore")

# -------------------------------------------------------------------------------------------
# Driver description
# -------------------------------------------------------------------------------------------


@hookspec
def bdrv_describe() -> DriverDescriptor:
    """Return the driver's static facts: name, kind, flags it honours, concurrency.

    Tier: GS. Required: a driver without it is refused at registration.
    """


# -------------------------------------------------------------------------------------------
# Global state (GS) hooks: main thread, outside any coroutine
# -------------------------------------------------------------------------------------------


@hookspec
def bdrv_probe(buf: bytes, filename: str | None) -> int:
    """Score 0..100 how surely ``buf`` (the first bytes of an image) is this format.

    Tier: GS. Called on every installed format driver when no format is given; the highest
    score wins, ties go to the name sorting first. ``raw`` answers 1 (format of last resort).

    :param buf: up to :data:`~blockcore.types.BLOCK_PROBE_BUF_SIZE` bytes from offset 0,
        fewer for a shorter image.
    :param filename: the image's filename, if it has one.

    Optional. If not implemented, the driver never wins probing.
    """


@hookspec
def bdrv_probe_device(filename: str) -> int:
    """Score 0..100 how surely ``filename`` is a device this protocol driver handles.

    Tier: GS. Asked when a filename has no ``proto:`` prefix and no driver is named; a score
    above 0 beats the ``file`` protocol.

    Optional. If not implemented, the driver is never chosen by device probing.
    """


@hookspec
def bdrv_parse_filename(filename: str) -> dict[str, Any]:
    """Turn a ``proto:...`` filename into options for :func:`bdrv_open`.

    Tier: GS. ``filename`` still carries the protocol prefix (``blkdebug:cfg:img``).

    Optional. If not implemented, the core strips ``<protocol_name>:`` and passes the rest
    as the ``filename`` option.
    """


@hookspec
def bdrv_open(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
    """Open ``bs``: read the driver's options, open its children, set ``bs.opaque``.

    Tier: GS. Children are opened with :func:`blockcore.graph.bdrv_open_child` (which
    consumes ``options[name]``); metadata is read through :mod:`blockcore.io`'s sync
    wrappers. Keys left in ``options`` that the driver's ``runtime_opts`` do not name are
    refused by the core after this returns.

    :param options: this node's options (nested dicts; ``file.filename`` is ``options
        ["file"]["filename"]``). Generic keys (``driver``, ``node-name``, ``read-only``,
        ``cache.*``, ``discard``, ``force-share``) are already applied to ``bs`` and removed.
    :param flags: the node's :class:`~blockcore.types.OpenFlags`.
    :raises BlockError: with a message naming the file and the problem.

    Optional. If not implemented, the node opens with no state (in-memory test drivers).
    """


@hookspec
def bdrv_close(bs: BlockDriverState) -> None:
    """Release what ``bdrv_open`` took (caches written back first by the core's flush).

    Tier: GS. The core detaches and closes the children afterwards.

    Optional. If not implemented, nothing happens.
    """


@hookspec
def bdrv_refresh_limits(bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
    """Return the node's I/O limits, given ``limits`` merged from its children.

    Tier: GS. Derive with ``attrs.evolve(limits, request_alignment=...)``.

    Optional. If not implemented, the merged limits stand (request_alignment 1 for a leaf).
    """


@hookspec
def bdrv_child_perm(
    bs: BlockDriverState,
    child: BdrvChild | None,
    role: ChildRole,
    perm: Perm,
    shared: Perm,
) -> tuple[Perm, Perm]:
    """Return ``(perm, shared)`` this node needs on ``child``, given its parents' ``perm``
    (union) and ``shared`` (intersection).

    Tier: GS. ``child`` is None while the child is being attached.

    Optional. If not implemented, :func:`blockcore.graph.bdrv_default_perms` decides from
    the child's role, as QEMU's ``bdrv_default_perms``.
    """


@hookspec
def bdrv_check_perm(bs: BlockDriverState, perm: Perm, shared: Perm) -> None:
    """Check that the node can take ``perm`` while sharing only ``shared`` (image locks).

    Tier: GS. First phase of a permission update; raise
    :class:`~blockcore.errors.PermissionConflictError` to refuse it.

    Optional. If not implemented, every permission is granted.
    """


@hookspec
def bdrv_set_perm(bs: BlockDriverState, perm: Perm, shared: Perm) -> None:
    """Commit the permissions last checked by :func:`bdrv_check_perm`.

    Tier: GS. Must not fail.

    Optional.
    """


@hookspec
def bdrv_abort_perm_update(bs: BlockDriverState) -> None:
    """Drop what :func:`bdrv_check_perm` prepared; the old permissions stay.

    Tier: GS.

    Optional.
    """


@hookspec
def bdrv_reopen_prepare(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> Any:
    """Prepare to switch ``bs`` to ``flags`` (read-only <-> read-write) and ``options``.

    Tier: GS. Return any state object; the core passes it to commit or abort.

    Optional. If not implemented, only a change of the read-only flag is allowed and it
    takes effect with no driver work.
    """


@hookspec
def bdrv_reopen_commit(bs: BlockDriverState, state: Any) -> None:
    """Make the prepared reopen take effect. Tier: GS. Must not fail. Optional."""


@hookspec
def bdrv_reopen_commit_post(bs: BlockDriverState, state: Any) -> None:
    """Finish a committed reopen once every node of it has committed and the permissions
    are in place (QEMU's bdrv_reopen_commit_post): e.g. write to a child that just became
    writable. Tier: GS. Must not fail: report a problem and leave the node usable. Optional.
    """


@hookspec
def bdrv_reopen_abort(bs: BlockDriverState, state: Any) -> None:
    """Undo a prepared reopen. Tier: GS. Optional."""


@hookspec
def bdrv_join_options(options: dict[str, Any], old_options: dict[str, Any]) -> dict[str, Any]:
    """Return the options a reopen prepares with: the new ``options`` over the node's
    current runtime options ``old_options`` (QEMU's bdrv_join_options). Tier: GS.

    Optional. If not implemented, every new option simply replaces the old one.
    """


@hookspec
def bdrv_measure(options: dict[str, Any], in_bs: BlockDriverState | None) -> BlockMeasureInfo:
    """Return the space a new image with ``options`` needs, holding ``in_bs``'s data.

    Tier: GS. Without ``in_bs``, only the metadata (and preallocation) counts.

    Optional. If not implemented, ``bdrv_measure`` raises "not supported".
    """


@hookspec
def bdrv_get_specific_info(bs: BlockDriverState) -> dict[str, Any] | None:
    """Return format-specific info as ``qemu-img info --output=json`` shows it
    (``{"type": "qcow2", "data": {...}}``), or None.

    Tier: GS. Optional.
    """


@hookspec
def bdrv_get_specific_stats(bs: BlockDriverState) -> dict[str, Any] | None:
    """Return driver-specific statistics (QEMU's ``BlockStatsSpecific``) or None.

    Tier: GS. Optional.
    """


@hookspec
def bdrv_has_zero_init(bs: BlockDriverState) -> bool:
    """Whether the node, freshly created, reads as zeros everywhere.

    Tier: GS. Optional. If not implemented, the descriptor's ``has_zero_init`` answers;
    filters ask their child.
    """


@hookspec
def bdrv_change_backing_file(bs: BlockDriverState, backing_file: str, backing_fmt: str) -> None:
    """Rewrite the backing file name and format stored in the image header.

    Tier: GS. Used by rebase and commit. Optional. If not implemented, "not supported".
    """


@hookspec
def bdrv_amend_options(bs: BlockDriverState, options: dict[str, Any], force: bool) -> None:
    """Change creation options of an existing image (``blockcore-img amend``).

    Tier: GS. Refuse, with the option's name, what cannot change. Optional.
    """


@hookspec
def bdrv_make_empty(bs: BlockDriverState) -> None:
    """Drop all data of the node so it reads from its backing file again (after commit).

    Tier: GS. Optional. If not implemented, commit leaves the top image as it is.
    """


@hookspec
def bdrv_drain_begin(bs: BlockDriverState) -> None:
    """Stop the driver's own request sources (timers, background jobs). Must not poll.

    Tier: GS. Optional.
    """


@hookspec
def bdrv_drain_end(bs: BlockDriverState) -> None:
    """Restart what :func:`bdrv_drain_begin` stopped. Tier: GS. Optional."""


@hookspec
def bdrv_debug_breakpoint(bs: BlockDriverState, event: str, tag: str) -> None:
    """Suspend the next request that raises debug ``event`` under ``tag`` (blkdebug).

    Tier: GS. Optional. The core searches down the primary children for a driver with it.
    """


@hookspec
def bdrv_debug_remove_breakpoint(bs: BlockDriverState, tag: str) -> None:
    """Remove breakpoints with ``tag`` and resume requests suspended under it.

    Tier: GS. Optional.
    """


@hookspec
def bdrv_debug_resume(bs: BlockDriverState, tag: str) -> None:
    """Resume the request suspended under ``tag``. Tier: GS. Optional."""


@hookspec
def bdrv_debug_is_suspended(bs: BlockDriverState, tag: str) -> bool:
    """Whether a request is suspended under ``tag``. Tier: GS. Optional."""


# -------------------------------------------------------------------------------------------
# I/O hooks: coroutines on the node's AioContext, graph read lock held by the caller
# -------------------------------------------------------------------------------------------


@hookspec
async def bdrv_co_preadv(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    """Read ``length`` bytes at ``offset`` into ``buf``.

    Tier: I/O. The core guarantees: ``offset`` and ``length`` are multiples of
    ``request_alignment``; ``0 < length <= max_transfer`` (when set); ``len(buf) == length``;
    the range may pass the end of the node only within the last alignment unit (the core
    zero-fills anything beyond); ``flags`` holds only ``PREFETCH`` or ``COPY_ON_READ``
    (never both unless the driver is the COR node). ``buf`` is writable and may be reused by
    the caller after return: do not keep it.

    Required for a node that is read.
    """


@hookspec
async def bdrv_co_pwritev(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    """Write ``length`` bytes from ``buf`` at ``offset``.

    Tier: I/O. Guarantees as for :func:`bdrv_co_preadv`; ``flags`` holds only flags of the
    descriptor's ``supported_write_flags`` (FUA the driver lacks is emulated by a flush).
    Writing past the end grows the node (the caller holds the resize permission).

    Required for a node that is written.
    """


@hookspec
async def bdrv_co_pwritev_compressed(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview
) -> None:
    """Write ``buf`` compressed. Tier: I/O. Alignment and limits as for writes.

    Optional. Implementing it is what ``bdrv_supports_compressed_writes`` reports; without
    it a compressed write is "not supported".
    """


@hookspec
async def bdrv_co_pwrite_zeroes(
    bs: BlockDriverState, offset: int, length: int, flags: BdrvRequestFlags
) -> None:
    """Make ``[offset, offset+length)`` read as zeros without a data buffer.

    Tier: I/O. The bulk of a request is aligned to ``pwrite_zeroes_alignment`` (head and
    tail pieces may be smaller, never crossing such a boundary); ``length <=
    max_pwrite_zeroes`` when set; ``flags`` ⊆ ``supported_zero_flags`` (``MAY_UNMAP`` only on
    nodes opened with discard=unmap).

    :raises NotSupportedError: the core then writes zero buffers, in chunks, unless the
        caller passed ``NO_FALLBACK``.

    Optional. If not implemented, the core always writes zero buffers.
    """


@hookspec
async def bdrv_co_pdiscard(bs: BlockDriverState, offset: int, length: int) -> None:
    """Discard (unmap) a range; afterwards it reads as zeros or as before. Advisory.

    Tier: I/O. Only called on nodes opened with discard=unmap. Pieces are aligned to
    ``pdiscard_alignment`` where possible and at most ``max_pdiscard`` long.

    Optional. If not implemented, discard is a successful no-op; ``NotSupportedError`` is
    ignored the same way.
    """


@hookspec
async def bdrv_co_flush(bs: BlockDriverState) -> None:
    """Flush everything, children included, replacing the core's flush algorithm.

    Tier: I/O. Optional: drivers normally implement the two hooks below instead.
    """


@hookspec
async def bdrv_co_flush_to_os(bs: BlockDriverState) -> None:
    """Push the driver's own caches (metadata caches) down to its children.

    Tier: I/O. Called on every flush, even with cache.no-flush. Optional.
    """


@hookspec
async def bdrv_co_flush_to_disk(bs: BlockDriverState) -> None:
    """Make data written so far durable (fdatasync).

    Tier: I/O. Called only when something was written since the last flush and the node is
    not opened with cache.no-flush. Optional: without it, flush succeeds (writethrough).
    """


@hookspec
async def bdrv_co_block_status(
    bs: BlockDriverState, want_zero: bool, offset: int, length: int
) -> BlockStatus:
    """Return the status of this layer alone, starting at ``offset``.

    Tier: I/O. ``offset`` and ``length`` are aligned to ``request_alignment`` and clamped to
    the node's length. Return a :class:`~blockcore.types.BlockStatus` with ``pnum > 0``
    (aligned; it may pass ``length``, the core trims it) and DATA/ZERO/OFFSET_VALID/RAW/
    RECURSE bits; return no DATA and no ZERO to defer to the backing file. ``want_zero``
    False asks for speed over precision about zeros.

    Optional. If not implemented: protocol drivers report DATA|OFFSET_VALID at the same
    offset, filters RAW pointing at their child, formats DATA.
    """


@hookspec
async def bdrv_co_truncate(
    bs: BlockDriverState, offset: int, exact: bool, prealloc: PreallocMode, flags: BdrvRequestFlags
) -> None:
    """Resize the node to ``offset`` bytes.

    Tier: I/O. ``prealloc`` is OFF when shrinking (the core refuses the rest); ``flags`` ⊆
    ``supported_truncate_flags``. With ``exact`` False a larger result is acceptable.

    Optional. If not implemented, filters forward to their child and others refuse with
    "not supported".
    """


@hookspec
async def bdrv_co_getlength(bs: BlockDriverState) -> int:
    """Return the node's length in bytes (the core rounds it up to 512).

    Tier: I/O. Optional. If not implemented, the length stays what the core last knew
    (filters: their child's length).
    """


@hookspec
async def bdrv_co_get_allocated_file_size(bs: BlockDriverState) -> int:
    """Return the host bytes the node's storage uses. Tier: I/O.

    Optional. If not implemented: filters ask their child, formats sum their storage
    children, protocols raise "not supported".
    """


@hookspec
async def bdrv_co_get_info(bs: BlockDriverState) -> BlockDriverInfo:
    """Return the format's :class:`~blockcore.types.BlockDriverInfo`. Tier: I/O.

    Optional. If not implemented, filters ask their child, others raise "not supported".
    """


@hookspec
async def bdrv_co_check(
    bs: BlockDriverState, result: BdrvCheckResult, fix: BdrvCheckMode
) -> None:
    """Check the image's consistency, filling ``result`` and repairing what ``fix`` allows.

    Tier: I/O. Raise only when the check itself could not run.

    Optional. If not implemented, ``bdrv_check`` is "not supported" (qemu-img's exit 63).
    """


@hookspec
async def bdrv_co_invalidate_cache(bs: BlockDriverState) -> None:
    """Drop cached metadata and read it again. Tier: I/O. Optional."""


@hookspec
async def bdrv_co_create_opts(filename: str, options: dict[str, Any]) -> None:
    """Create an image at ``filename`` with creation ``options`` (``blockcore-img create``).

    Tier: I/O, run by the GS ``bdrv_create``. ``options`` has the keys of the descriptor's
    ``create_opts`` (``size`` in bytes); unknown keys are refused by the core first.

    Optional. If not implemented, the driver cannot create images.
    """


@hookspec
async def bdrv_co_delete_file(bs: BlockDriverState) -> None:
    """Delete the storage behind ``bs`` (cleanup after a failed create). Tier: I/O. Optional."""


@hookspec
async def bdrv_co_ioctl(bs: BlockDriverState, req: int, buf: Any) -> int:
    """Pass an ioctl (SG_IO) to the device. Tier: I/O. Optional: else "not supported"."""


@hookspec
async def bdrv_co_eject(bs: BlockDriverState, eject_flag: bool) -> None:
    """Eject (``eject_flag``) or load the medium. Tier: I/O. Optional: else a no-op."""


@hookspec
async def bdrv_co_lock_medium(bs: BlockDriverState, locked: bool) -> None:
    """Lock or unlock the drive door. Tier: I/O. Optional: else a no-op."""


@hookspec
async def bdrv_co_is_inserted(bs: BlockDriverState) -> bool:
    """Whether a medium is present. Tier: I/O. Optional: else all children's answer."""


@hookspec
async def bdrv_co_copy_range_from(
    bs: BlockDriverState,
    src: BdrvChild,
    src_offset: int,
    dst: BdrvChild,
    dst_offset: int,
    length: int,
    read_flags: BdrvRequestFlags,
    write_flags: BdrvRequestFlags,
) -> None:
    """Map the source range of ``bs`` (= ``src.bs``) to a child and continue the copy there
    with :func:`blockcore.special.bdrv_co_copy_range_from`, or perform it if ``bs`` is a leaf.

    Tier: I/O. Optional: else copy_range is "not supported" (never emulated by the core).
    """


@hookspec
async def bdrv_co_copy_range_to(
    bs: BlockDriverState,
    src: BdrvChild,
    src_offset: int,
    dst: BdrvChild,
    dst_offset: int,
    length: int,
    read_flags: BdrvRequestFlags,
    write_flags: BdrvRequestFlags,
) -> None:
    """Destination side of an offloaded copy (``bs`` = ``dst.bs``): map to a child, or copy
    from the leaf ``src.bs`` (e.g. ``copy_file_range``). Tier: I/O. Optional, as above.
    """


@hookspec
async def bdrv_co_readv_vmstate(bs: BlockDriverState, buf: memoryview, pos: int) -> None:
    """Read VM state at ``pos`` of the VM-state area into ``buf``. Tier: I/O.

    Not aligned or split by the core. Optional: else forwarded to the primary child, else
    "not supported".
    """


@hookspec
async def bdrv_co_writev_vmstate(bs: BlockDriverState, buf: memoryview, pos: int) -> None:
    """Write VM state. Tier: I/O. As :func:`bdrv_co_readv_vmstate`."""


@hookspec
async def bdrv_co_io_plug(bs: BlockDriverState) -> None:
    """Start collecting requests into a batch (outermost plug only). Tier: I/O. Optional."""


@hookspec
async def bdrv_co_io_unplug(bs: BlockDriverState) -> None:
    """Submit the batch collected since the outermost plug. Tier: I/O. Optional."""


@hookspec
async def bdrv_co_debug_event(bs: BlockDriverState, event: str) -> None:
    """Receive debug event ``event`` (a name of :data:`~blockcore.types.BLKDEBUG_EVENTS`).

    Tier: I/O. May suspend the calling request (blkdebug breakpoints). Optional: events
    reaching a driver without it are dropped.
    """


@hookspec
async def bdrv_co_can_store_new_dirty_bitmap(
    bs: BlockDriverState, name: str, granularity: int
) -> bool:
    """Whether a new persistent dirty bitmap ``name`` fits in the image.

    Tier: I/O. Raise with the reason to refuse. Optional: else "Can't store persistent
    bitmaps to <node>".
    """


# -------------------------------------------------------------------------------------------
# Additions of 0.2: persistent dirty bitmaps, internal snapshots
# -------------------------------------------------------------------------------------------


@hookspec
async def bdrv_co_remove_persistent_dirty_bitmap(bs: BlockDriverState, name: str) -> None:
    """Delete the stored copy of persistent dirty bitmap ``name`` from the image.

    Tier: I/O. The in-memory bitmap is released by the caller afterwards
    (:func:`blockcore.dirty_bitmap.bdrv_remove_persistent_dirty_bitmap`). A name the image
    does not store is not an error (the bitmap may have been created since open and never
    written).

    Optional. If not implemented, removing a persistent bitmap fails with "Can't remove
    persistent bitmaps from <node>".

    .. versionadded:: 0.2
    """


@hookspec
def bdrv_snapshot_create(bs: BlockDriverState, sn_info: dict[str, Any]) -> None:
    """Create an internal snapshot of the node's current state.

    Tier: GS. The node is drained. ``sn_info`` is a QAPI ``SnapshotInfo`` dict: ``id``
    (empty: the driver picks the next free one and stores it back into ``sn_info``),
    ``name``, ``vm-state-size``, ``date-sec``, ``date-nsec``, ``vm-clock-sec``,
    ``vm-clock-nsec`` and ``icount`` (-1 or absent: none).

    :raises BlockError: EEXIST for an id in use; the errno is what ``qemu-img snapshot -c``
        prints.

    Optional. If not implemented, callers (``blockcore-img snapshot``) try the node's
    primary child, as QEMU's fallback does, else "not supported".

    .. versionadded:: 0.2
    """


@hookspec
def bdrv_snapshot_goto(bs: BlockDriverState, snapshot_id: str) -> None:
    """Revert the node to the snapshot whose id, else whose name, is ``snapshot_id``.

    Tier: GS. The node is drained; the driver updates ``bs.total_bytes`` when the
    snapshot's virtual size differs.

    :raises BlockError: ENOENT when no snapshot matches.

    Optional, as :func:`bdrv_snapshot_create`.

    .. versionadded:: 0.2
    """


@hookspec
def bdrv_snapshot_delete(bs: BlockDriverState, snapshot_id: str | None, name: str | None) -> None:
    """Delete the snapshot matching ``snapshot_id`` and ``name`` (both must match when both
    are given, at least one is).

    Tier: GS. The node is drained. :raises BlockError: ENOENT when none matches.

    Optional, as :func:`bdrv_snapshot_create`.

    .. versionadded:: 0.2
    """


@hookspec
def bdrv_snapshot_load_tmp(bs: BlockDriverState, snapshot_id: str | None,
                           name: str | None) -> None:  # fmt: skip
    """Show the node as it was in the snapshot matching ``snapshot_id`` and/or ``name``
    (both must match when both are given), until it is closed; nothing is written.

    Tier: GS. The node is read-only (the core checks) and drained.

    :raises BlockError: ENOENT "Can't find snapshot" when none matches.

    Optional. If not implemented, temporary loading is refused with ENOTSUP.

    .. versionadded:: 0.3
    """


@hookspec
def bdrv_snapshot_list(bs: BlockDriverState) -> list[dict[str, Any]]:
    """Return the node's internal snapshots as QAPI ``SnapshotInfo`` dicts, in table order.

    Tier: GS. Optional. If not implemented, the node has no snapshots (or its primary
    child's, as QEMU's fallback).

    .. versionadded:: 0.2
    """

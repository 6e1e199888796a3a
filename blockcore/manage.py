"""Image management in the main thread: internal snapshots, backing-file rewrites, emptying,
amending, and blkdebug breakpoints.

Each function finds the first node at or below the given one, following primary children,
whose driver implements the hook (QEMU's fallback from a raw or filter node to the image
below it), drains it, and calls the driver. Where no driver below has the hook the answer is
:class:`~blockcore.errors.NotSupportedError`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from .errors import BlockError, NoMediumError, NotSupportedError
from .graph import bdrv_primary_child
from .info import bdrv_is_read_only
from .tiers import Tier, api, global_state_code

if TYPE_CHECKING:
    from .graph import BlockDriverState

__all__ = [
    "bdrv_amend_options",
    "bdrv_change_backing_file",
    "bdrv_debug_breakpoint",
    "bdrv_debug_is_suspended",
    "bdrv_debug_remove_breakpoint",
    "bdrv_debug_resume",
    "bdrv_find_hook_node",
    "bdrv_make_empty",
    "bdrv_snapshot_create",
    "bdrv_snapshot_delete",
    "bdrv_snapshot_goto",
    "bdrv_snapshot_list",
]


@api(Tier.GS)
def bdrv_find_hook_node(bs: BlockDriverState, hook: str) -> BlockDriverState | None:
    """The first node at or below ``bs`` along primary children whose driver has ``hook``.

    Tier: GS."""
    global_state_code("bdrv_find_hook_node")
    node: BlockDriverState | None = bs
    while node is not None and node.drv is not None:
        if getattr(node.drv, hook) is not None:
            return node
        child = bdrv_primary_child(node)
        node = child.bs if child is not None else None
    return None


def _call(bs: BlockDriverState, hook: str, what: str, *args: Any, drain: bool = True) -> Any:
    from .drain import bdrv_drained_begin, bdrv_drained_end

    node = bdrv_find_hook_node(bs, hook)
    if node is None:
        raise NotSupportedError(f"block driver does not support {what}",
                                bs.filename or bs.node_name)  # fmt: skip
    fn = getattr(node.drv, hook)
    if not drain:
        return fn(node, *args)
    bdrv_drained_begin(node)
    try:
        return fn(node, *args)
    finally:
        bdrv_drained_end(node)


@api(Tier.GS)
def bdrv_snapshot_list(bs: BlockDriverState) -> list[dict[str, Any]]:
    """Internal snapshots of the image (QEMU's QEMUSnapshotInfo fields); [] when the format
    has none. Tier: GS."""
    global_state_code("bdrv_snapshot_list")
    if bdrv_find_hook_node(bs, "bdrv_snapshot_list") is None:
        return []
    return list(_call(bs, "bdrv_snapshot_list", "snapshots", drain=False))


@api(Tier.GS)
def bdrv_snapshot_create(bs: BlockDriverState, sn_info: dict[str, Any]) -> None:
    """Create an internal snapshot described by ``sn_info``. Tier: GS."""
    global_state_code("bdrv_snapshot_create")
    _call(bs, "bdrv_snapshot_create", "snapshots", sn_info)


@api(Tier.GS)
def bdrv_snapshot_goto(bs: BlockDriverState, snapshot_id: str) -> None:
    """Revert the image to a snapshot (by id or name). Tier: GS."""
    global_state_code("bdrv_snapshot_goto")
    _call(bs, "bdrv_snapshot_goto", "snapshots", snapshot_id)


@api(Tier.GS)
def bdrv_snapshot_delete(bs: BlockDriverState, snapshot_id: str | None, name: str | None
                         ) -> None:  # fmt: skip
    """Delete a snapshot by id and/or name. Tier: GS."""
    global_state_code("bdrv_snapshot_delete")
    _call(bs, "bdrv_snapshot_delete", "snapshots", snapshot_id, name)


@api(Tier.GS)
def bdrv_snapshot_load_tmp(bs: BlockDriverState, snapshot_id: str | None,
                           name: str | None) -> None:  # fmt: skip
    """Show the read-only node as it was in a snapshot (by id and/or name) until it is
    closed, as ``qemu-img convert -l`` and ``measure -l`` do. Tier: GS.

    :raises BlockError: EINVAL without id and name or on a writable node, ENOENT when no
        snapshot matches; :class:`NotSupportedError` when the format cannot.
    """
    global_state_code("bdrv_snapshot_load_tmp")
    where = bs.filename or bs.node_name
    if bs.drv is None:
        raise NoMediumError(f"Device '{bs.node_name}' has no medium", where)
    if snapshot_id is None and name is None:
        raise BlockError(errno.EINVAL, "snapshot_id and name are both NULL", where)
    if not bdrv_is_read_only(bs):
        raise BlockError(errno.EINVAL, "Device is not readonly", where)
    if bdrv_find_hook_node(bs, "bdrv_snapshot_load_tmp") is None:
        raise NotSupportedError(f"Block format '{bs.drv.name}' used by device '' does not "
                                "support temporarily loading internal snapshots", where)
    _call(bs, "bdrv_snapshot_load_tmp", "snapshots", snapshot_id, name)


@api(Tier.GS)
def bdrv_snapshot_load_tmp_by_id_or_name(bs: BlockDriverState, id_or_name: str) -> None:
    """:func:`bdrv_snapshot_load_tmp` by id, else by name (``convert -s``/``-l NAME``).
    Tier: GS."""
    global_state_code("bdrv_snapshot_load_tmp_by_id_or_name")
    try:
        bdrv_snapshot_load_tmp(bs, id_or_name, None)
    except BlockError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL):
            raise
        bdrv_snapshot_load_tmp(bs, None, id_or_name)


@api(Tier.GS)
def bdrv_change_backing_file(bs: BlockDriverState, backing_file: str, backing_fmt: str) -> None:
    """Rewrite the backing file name and format stored in the image (rebase -u). Tier: GS."""
    global_state_code("bdrv_change_backing_file")
    _call(bs, "bdrv_change_backing_file", "changing the backing file", backing_file,
          backing_fmt)  # fmt: skip
    bs.backing_file, bs.backing_format = backing_file, backing_fmt


@api(Tier.GS)
def bdrv_make_empty(bs: BlockDriverState) -> None:
    """Drop all data of the image so it reads from its backing file again. Tier: GS."""
    global_state_code("bdrv_make_empty")
    _call(bs, "bdrv_make_empty", "emptying the image")


@api(Tier.GS)
def bdrv_amend_options(bs: BlockDriverState, options: dict[str, Any], force: bool) -> None:
    """Change creation options of an existing image (``amend``). Tier: GS."""
    global_state_code("bdrv_amend_options")
    _call(bs, "bdrv_amend_options", "amending options", options, force)


# -------------------------------------------------------------------------------------------
# Debug breakpoints (blkdebug)
# -------------------------------------------------------------------------------------------


def _debug_node(bs: BlockDriverState, hook: str) -> BlockDriverState:
    node = bdrv_find_hook_node(bs, hook)
    if node is None:
        raise NotSupportedError("no node below supports debug breakpoints", bs.node_name)
    return node


@api(Tier.GS)
def bdrv_debug_breakpoint(bs: BlockDriverState, event: str, tag: str) -> None:
    """Suspend the next request raising ``event`` under ``tag`` (qemu-io ``break``). Tier: GS."""
    global_state_code("bdrv_debug_breakpoint")
    node = _debug_node(bs, "bdrv_debug_breakpoint")
    node.drv.bdrv_debug_breakpoint(node, event, tag)  # type: ignore[union-attr]


@api(Tier.GS)
def bdrv_debug_remove_breakpoint(bs: BlockDriverState, tag: str) -> None:
    """Remove breakpoints ``tag`` and resume what they hold (``remove_break``). Tier: GS."""
    global_state_code("bdrv_debug_remove_breakpoint")
    node = _debug_node(bs, "bdrv_debug_remove_breakpoint")
    node.drv.bdrv_debug_remove_breakpoint(node, tag)  # type: ignore[union-attr]


@api(Tier.GS)
def bdrv_debug_resume(bs: BlockDriverState, tag: str) -> None:
    """Resume the request suspended under ``tag`` (``resume``). Tier: GS."""
    global_state_code("bdrv_debug_resume")
    node = _debug_node(bs, "bdrv_debug_resume")
    node.drv.bdrv_debug_resume(node, tag)  # type: ignore[union-attr]


@api(Tier.GS)
def bdrv_debug_is_suspended(bs: BlockDriverState, tag: str) -> bool:
    """Whether a request is suspended under ``tag`` (``wait_break`` polls it). Tier: GS."""
    global_state_code("bdrv_debug_is_suspended")
    try:
        node = _debug_node(bs, "bdrv_debug_is_suspended")
    except NotSupportedError:
        return False
    return bool(node.drv.bdrv_debug_is_suspended(node, tag))  # type: ignore[union-attr]

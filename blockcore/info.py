"""Questions about a node: flags, names, sizes, format info, alignment, buffers, backing name."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from .aio import co_wrapper
from .errors import BlockError, NoMediumError, NotSupportedError
from .graph import bdrv_filter_bs, bdrv_filter_child
from .io import _enter
from .tiers import Tier, api, global_state_code
from .types import BdrvRequestFlags, BlockDriverInfo, BlockMeasureInfo, ChildRole, OpenFlags
from .util import PAGE_SIZE, aligned_buffer, round_down, round_up

if TYPE_CHECKING:
    from .drivers import BlockDriver
    from .graph import BlockDriverState

__all__ = [
    "bdrv_apply_auto_read_only",
    "bdrv_can_write_zeroes_with_unmap",
    "bdrv_co_get_allocated_file_size",
    "bdrv_co_get_info",
    "bdrv_disable_copy_on_read",
    "bdrv_enable_copy_on_read",
    "bdrv_get_allocated_file_size",
    "bdrv_get_backing_filename",
    "bdrv_get_device_name",
    "bdrv_get_device_or_node_name",
    "bdrv_get_flags",
    "bdrv_get_format_name",
    "bdrv_get_info",
    "bdrv_get_node_name",
    "bdrv_get_specific_info",
    "bdrv_get_specific_stats",
    "bdrv_is_read_only",
    "bdrv_is_sg",
    "bdrv_is_writable",
    "bdrv_measure",
    "bdrv_min_mem_align",
    "bdrv_opt_mem_align",
    "bdrv_round_to_clusters",
    "bdrv_supports_compressed_writes",
    "qemu_blockalign",
    "qemu_blockalign0",
    "qemu_try_blockalign",
    "qemu_try_blockalign0",
]


@api(Tier.IO)
def bdrv_is_read_only(bs: BlockDriverState) -> bool:
    """Whether the node was opened without read-write access. Tier: I/O."""
    return not bs.open_flags & OpenFlags.RDWR


@api(Tier.IO)
def bdrv_is_writable(bs: BlockDriverState) -> bool:
    """Read-write and not inactive. Tier: I/O."""
    return bool(bs.open_flags & OpenFlags.RDWR and not bs.open_flags & OpenFlags.INACTIVE)


@api(Tier.IO)
def bdrv_is_sg(bs: BlockDriverState) -> bool:
    """Whether the node is a SCSI generic device (requests go as ioctls). Tier: I/O."""
    return bs.sg


@api(Tier.IO)
def bdrv_get_flags(bs: BlockDriverState) -> OpenFlags:
    """The node's open flags. Tier: I/O."""
    return OpenFlags(bs.open_flags)


@api(Tier.IO)
def bdrv_apply_auto_read_only(bs: BlockDriverState, errmsg: str | None = None) -> None:
    """For drivers that can only offer read-only access: fall back to read-only when the node
    allows it (auto-read-only), else raise ``EACCES`` with ``errmsg``. Tier: I/O."""
    if not bs.open_flags & OpenFlags.RDWR:
        return
    if not bs.open_flags & OpenFlags.AUTO_RDONLY:
        raise BlockError(errno.EACCES, errmsg or "image is read-only", bs.filename)
    if bs.copy_on_read:
        raise BlockError(errno.EINVAL, "cannot make node read-only while copy-on-read is on")
    bs.open_flags &= ~OpenFlags.RDWR


@api(Tier.IO)
def bdrv_get_format_name(bs: BlockDriverState) -> str | None:
    """The driver's name, or None for a closed node. Tier: I/O."""
    return bs.drv.name if bs.drv else None


@api(Tier.IO)
def bdrv_get_node_name(bs: BlockDriverState) -> str:
    """The node's name. Tier: I/O."""
    return bs.node_name


@api(Tier.IO)
def bdrv_get_device_name(bs: BlockDriverState) -> str:
    """The name of the first BlockBackend using the node, or "". Tier: I/O."""
    for c in bs.parents:
        name = getattr(c.parent, "name", "")
        if not c.parent.parent_is_bds and name:
            return str(name)
    return ""


@api(Tier.IO)
def bdrv_get_device_or_node_name(bs: BlockDriverState) -> str:
    """The device name if any, else the node name. Tier: I/O."""
    return bdrv_get_device_name(bs) or bs.node_name


@api(Tier.IO)
def bdrv_supports_compressed_writes(bs: BlockDriverState) -> bool:
    """Whether compressed writes work (filters ask their child). Tier: I/O."""
    while bs.drv is not None:
        if bs.drv.bdrv_co_pwritev_compressed is not None:
            return True
        nxt = bdrv_filter_bs(bs)
        if nxt is None:
            return False
        bs = nxt
    return False


@api(Tier.IO)
def bdrv_can_write_zeroes_with_unmap(bs: BlockDriverState) -> bool:
    """Opened with discard=unmap and the driver's zero write can unmap. Tier: I/O."""
    return bool(bs.open_flags & OpenFlags.UNMAP
                and bs.supported_zero_flags & BdrvRequestFlags.MAY_UNMAP)  # fmt: skip


@api(Tier.IO)
def bdrv_enable_copy_on_read(bs: BlockDriverState) -> None:
    """Count one more user of copy-on-read on ``bs``. Tier: I/O."""
    bs.copy_on_read += 1


@api(Tier.IO)
def bdrv_disable_copy_on_read(bs: BlockDriverState) -> None:
    """Drop one user of copy-on-read. Tier: I/O."""
    if bs.copy_on_read <= 0:
        raise AssertionError("bdrv_disable_copy_on_read without enable")
    bs.copy_on_read -= 1


@api(Tier.IO)
async def bdrv_co_get_info(bs: BlockDriverState) -> BlockDriverInfo:
    """Format facts (cluster size, VM-state offset, dirty). Filters ask their child.

    Tier: I/O. :raises NotSupportedError: the driver has none.
    """
    drv = _enter("bdrv_co_get_info", bs)
    if drv.bdrv_co_get_info is None:
        child = bdrv_filter_bs(bs)
        if child is not None:
            return await bdrv_co_get_info(child)
        raise NotSupportedError("driver has no format information", bs.node_name)
    bdi: BlockDriverInfo = await drv.bdrv_co_get_info(bs)
    if bdi.cluster_size > (1 << 30):
        raise BlockError(errno.EINVAL, f"cluster size {bdi.cluster_size} too large")
    if not bdi.subcluster_size:
        import attrs

        bdi = attrs.evolve(bdi, subcluster_size=bdi.cluster_size)
    return bdi


bdrv_get_info = co_wrapper(bdrv_co_get_info, "bdrv_get_info", mixed=True)


@api(Tier.IO)
async def bdrv_co_get_allocated_file_size(bs: BlockDriverState) -> int:
    """Host bytes used by the node: the driver's answer, a filter's child, or the sum of a
    format's storage children. Tier: I/O."""
    drv = _enter("bdrv_co_get_allocated_file_size", bs)
    if drv.bdrv_co_get_allocated_file_size is not None:
        return int(await drv.bdrv_co_get_allocated_file_size(bs))
    child = bdrv_filter_bs(bs)
    if child is not None:
        return await bdrv_co_get_allocated_file_size(child)
    if drv.descriptor.protocol_name is not None:
        raise NotSupportedError("allocated size unknown", bs.node_name)
    total = 0
    for c in bs.children:
        if c.role & (ChildRole.DATA | ChildRole.METADATA | ChildRole.FILTERED):
            total += await bdrv_co_get_allocated_file_size(c.bs)
    return total


bdrv_get_allocated_file_size = co_wrapper(bdrv_co_get_allocated_file_size,
                                          "bdrv_get_allocated_file_size")  # fmt: skip


@api(Tier.IO)
def bdrv_get_specific_info(bs: BlockDriverState) -> dict[str, Any] | None:
    """Format-specific info as ``qemu-img info --output=json`` shows it, or None. Tier: I/O."""
    if bs.drv is not None and bs.drv.bdrv_get_specific_info is not None:
        return bs.drv.bdrv_get_specific_info(bs)  # type: ignore[no-any-return]
    return None


@api(Tier.IO)
def bdrv_get_specific_stats(bs: BlockDriverState) -> dict[str, Any] | None:
    """Driver-specific statistics, or None. Tier: I/O."""
    if bs.drv is not None and bs.drv.bdrv_get_specific_stats is not None:
        return bs.drv.bdrv_get_specific_stats(bs)  # type: ignore[no-any-return]
    return None


@api(Tier.IO)
def bdrv_round_to_clusters(bs: BlockDriverState, offset: int, length: int) -> tuple[int, int]:
    """Widen a range to whole clusters: ``(cluster_offset, cluster_bytes)``. Tier: I/O."""
    try:
        cluster = bdrv_get_info(bs).cluster_size
    except NotSupportedError:
        cluster = 0
    if not cluster:
        return offset, length
    start = round_down(offset, cluster)
    return start, round_up(offset + length, cluster) - start


@api(Tier.IO)
def bdrv_get_backing_filename(bs: BlockDriverState) -> str:
    """The backing file name stored in the image header ("" if none). Tier: I/O."""
    return bs.backing_file


@api(Tier.IO)
def bdrv_measure(drv: BlockDriver, opts: dict[str, Any], in_bs: BlockDriverState | None
                 ) -> BlockMeasureInfo:  # fmt: skip
    """Space a new ``drv`` image with ``opts`` needs, optionally holding ``in_bs``'s data.

    Tier: I/O. :raises NotSupportedError: the driver cannot measure.
    """
    if drv.bdrv_measure is None:  # type: ignore[attr-defined]
        raise NotSupportedError(f"block driver {drv.name!r} does not support size measurement")
    return drv.bdrv_measure(opts, in_bs)  # type: ignore[attr-defined,no-any-return]


@api(Tier.IO)
def bdrv_min_mem_align(bs: BlockDriverState | None) -> int:
    """Buffer alignment needed to avoid bounce buffers anywhere below. Tier: I/O."""
    return bs.bl.min_mem_alignment if bs is not None else max(4096, PAGE_SIZE)


@api(Tier.IO)
def bdrv_opt_mem_align(bs: BlockDriverState | None) -> int:
    """Preferred alignment for new buffers. Tier: I/O."""
    return bs.bl.opt_mem_alignment if bs is not None else max(4096, PAGE_SIZE)


@api(Tier.IO)
def qemu_blockalign(bs: BlockDriverState | None, size: int) -> memoryview:
    """A buffer of ``size`` bytes aligned as ``bs`` prefers (size 0 gives one alignment
    unit). Python buffers start zeroed, so this equals :func:`qemu_blockalign0`. Tier: I/O."""
    align = bdrv_opt_mem_align(bs)
    return aligned_buffer(size or align, align)


@api(Tier.IO)
def qemu_blockalign0(bs: BlockDriverState | None, size: int) -> memoryview:
    """A zeroed aligned buffer. Tier: I/O."""
    return qemu_blockalign(bs, size)


@api(Tier.IO)
def qemu_try_blockalign(bs: BlockDriverState | None, size: int) -> memoryview | None:
    """Like :func:`qemu_blockalign` but None when memory runs out. Tier: I/O."""
    try:
        return qemu_blockalign(bs, size)
    except (MemoryError, OSError, OverflowError):
        return None


@api(Tier.IO)
def qemu_try_blockalign0(bs: BlockDriverState | None, size: int) -> memoryview | None:
    """Like :func:`qemu_try_blockalign`, zeroed. Tier: I/O."""
    return qemu_try_blockalign(bs, size)


def require_driver(bs: BlockDriverState) -> BlockDriver:
    if bs.drv is None:
        raise NoMediumError("no medium", bs.node_name)
    return bs.drv


@api(Tier.GS)
def bdrv_has_zero_init(bs: BlockDriverState) -> bool:
    """Whether a new image of this node reads as zeros everywhere. Tier: GS."""
    global_state_code("bdrv_has_zero_init")
    drv = require_driver(bs)
    if drv.bdrv_has_zero_init is not None:  # type: ignore[attr-defined]
        return bool(drv.bdrv_has_zero_init(bs))  # type: ignore[attr-defined]
    child = bdrv_filter_child(bs)
    if child is not None:
        return bdrv_has_zero_init(child.bs)
    return drv.descriptor.has_zero_init

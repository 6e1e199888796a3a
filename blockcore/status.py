"""Block status and allocation: which ranges hold data, read as zeros, or come from below.

One layer is asked with the driver's ``bdrv_co_block_status``; the core adds ALLOCATED, EOF,
ZERO for holes with nothing below, RAW pass-through and RECURSE refinement, then walks a
backing chain down to a base (QEMU's bdrv_co_common_block_status_above).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .aio import assert_bdrv_graph_readable, co_wrapper
from .errors import NoMediumError
from .graph import bdrv_filter_or_cow_bs
from .io import _call_driver, _enter
from .tiers import Tier, api
from .types import BlockStatus
from .types import BlockStatusFlags as S
from .util import round_down, round_up

if TYPE_CHECKING:
    from .graph import BlockDriverState

__all__ = [
    "bdrv_block_status",
    "bdrv_block_status_above",
    "bdrv_co_block_status",
    "bdrv_co_block_status_above",
    "bdrv_co_is_allocated",
    "bdrv_co_is_allocated_above",
    "bdrv_co_is_zero_fast",
    "bdrv_is_allocated",
    "bdrv_is_allocated_above",
]

_EMPTY = S.NONE


@api(Tier.IO)
async def bdrv_co_block_status(
    bs: BlockDriverState, want_zero: bool, offset: int, length: int
) -> BlockStatus:
    """Status of ``bs`` alone for ``[offset, offset+length)`` (QEMU's bdrv_co_do_block_status).

    Tier: I/O. ``pnum`` is 0 only at or past the end of the node (``EOF`` set).
    """
    drv = _enter("bdrv_co_block_status", bs)
    total = bs.total_bytes
    if offset >= total:
        return BlockStatus(S.EOF, 0)
    if length == 0:
        return BlockStatus(_EMPTY, 0)
    length = min(length, total - offset)
    desc = drv.descriptor
    if drv.bdrv_co_block_status is None:
        if desc.is_filter:
            from .graph import bdrv_filter_bs

            st = BlockStatus(S.RAW | S.OFFSET_VALID, length, offset, bdrv_filter_bs(bs))
        elif desc.protocol_name is not None or not desc.is_format:
            st = BlockStatus(S.DATA | S.OFFSET_VALID, length, offset, bs)
        else:
            st = BlockStatus(S.DATA, length)
        ret = st.ret | (S.ALLOCATED if st.ret & (S.DATA | S.ZERO) else _EMPTY)
        if offset + length >= total:
            ret |= S.EOF
        return BlockStatus(ret, st.pnum, st.map, st.file)

    align = bs.bl.request_alignment
    aligned_offset = round_down(offset, align)
    aligned_len = round_up(offset + length, align) - aligned_offset
    bs.in_flight += 1
    try:
        st = await _call_driver(bs, drv.bdrv_co_block_status, want_zero, aligned_offset,
                                aligned_len)  # fmt: skip
    finally:
        bs.in_flight -= 1
    if st.pnum <= 0 or st.pnum % align and aligned_offset + st.pnum < total:
        from .errors import BlockError

        raise BlockError(5, f"driver {drv.name} returned invalid pnum {st.pnum}", bs.node_name)
    ret, file, map_ = st.ret, st.file, st.map
    pnum = min(st.pnum - (offset - aligned_offset), length)
    if ret & S.OFFSET_VALID:
        map_ += offset - aligned_offset
    if ret & S.RAW:
        assert file is not None and ret & S.OFFSET_VALID
        inner = await bdrv_co_block_status(file, want_zero, map_, pnum)
        ret = inner.ret & ~S.EOF
        pnum, map_, file = inner.pnum, inner.map, inner.file
        if pnum == 0:  # past the end of the file: reads as zeros
            return BlockStatus(S.ZERO | S.ALLOCATED | (S.EOF if offset + length >= total else 0),
                               length)  # fmt: skip
    if ret & (S.DATA | S.ZERO):
        ret |= S.ALLOCATED
    elif desc.supports_backing:
        backing = bs.backing.bs if bs.backing else None
        if backing is None:
            ret |= S.ZERO
        elif want_zero and offset >= backing.total_bytes:
            ret |= S.ZERO
    if (want_zero and ret & S.RECURSE and ret & S.DATA and ret & S.OFFSET_VALID
            and file is not None and file is not bs):  # fmt: skip
        inner = await bdrv_co_block_status(file, want_zero, map_, pnum)
        if inner.ret & S.EOF and inner.pnum == 0:
            ret |= S.ZERO
        else:
            pnum = min(pnum, inner.pnum)
            ret |= inner.ret & S.ZERO
    ret &= ~(S.RECURSE | S.RAW)
    if offset + pnum >= total:
        ret |= S.EOF
    return BlockStatus(ret, pnum, map_ if ret & S.OFFSET_VALID else 0, file)


async def _common_status_above(
    bs: BlockDriverState,
    base: BlockDriverState | None,
    include_base: bool,
    want_zero: bool,
    offset: int,
    length: int,
) -> BlockStatus:
    """Walk from ``bs`` down to ``base``; depth counts the layers visited (1 = top)."""
    if bs.drv is None:
        raise NoMediumError("no medium", bs.node_name)
    if bs is base and not include_base:
        return BlockStatus(_EMPTY, length, 0, None, 0)
    st = await bdrv_co_block_status(bs, want_zero, offset, length)
    depth = 1
    if st.pnum == 0 or st.ret & S.ALLOCATED or bs is base:
        return BlockStatus(st.ret, st.pnum, st.map, st.file, depth)
    # EOF of the top layer: the only end that counts for the answer
    eof = offset + st.pnum if st.ret & S.EOF else -1
    length = st.pnum
    ret, pnum, map_, file = st.ret, st.pnum, st.map, st.file
    p = bdrv_filter_or_cow_bs(bs)
    while p is not None and (include_base or p is not base):
        depth += 1
        st = await bdrv_co_block_status(p, want_zero, offset, length)
        ret, pnum, map_, file = st.ret, st.pnum, st.map, st.file
        if pnum == 0:  # p is shorter: zeros beyond its end count as allocated there
            ret, pnum, map_, file = S.ZERO | S.ALLOCATED, length, 0, p
            break
        if ret & S.ALLOCATED:
            ret &= ~S.EOF  # not the top layer's end
            break
        if p is base:
            break
        length = pnum
        p = bdrv_filter_or_cow_bs(p)
    if offset + pnum == eof:
        ret |= S.EOF
    return BlockStatus(ret, pnum, map_, file, depth)


@api(Tier.IO)
async def bdrv_co_block_status_above(
    bs: BlockDriverState, base: BlockDriverState | None, offset: int, length: int
) -> BlockStatus:
    """Status of ``[offset, offset+length)`` over the chain from ``bs`` down to (but not
    including) ``base``; ``None`` means the whole chain. Tier: I/O."""
    assert_bdrv_graph_readable("bdrv_co_block_status_above")
    return await _common_status_above(bs, base, False, True, offset, length)


async def _co_block_status_self(bs: BlockDriverState, offset: int, length: int) -> BlockStatus:
    return await _common_status_above(bs, bdrv_filter_or_cow_bs(bs), False, True, offset, length)


@api(Tier.IO)
async def bdrv_co_is_allocated(bs: BlockDriverState, offset: int, length: int
                               ) -> tuple[bool, int]:  # fmt: skip
    """Whether ``bs`` itself (not its backing file) determines the range's content, and for
    how many bytes from ``offset`` that answer holds. Tier: I/O."""
    st = await _common_status_above(bs, bs, True, False, offset, length)
    return bool(st.ret & S.ALLOCATED), st.pnum


@api(Tier.IO)
async def bdrv_co_is_allocated_above(
    top: BlockDriverState,
    base: BlockDriverState | None,
    include_base: bool,
    offset: int,
    length: int,
) -> tuple[int, int]:
    """Depth (1 = ``top``) of the layer between ``top`` and ``base`` that provides the data,
    or 0 when none does; and the byte count the answer holds for. ``pnum`` is 0 only at the
    end of ``top``. Tier: I/O."""
    st = await _common_status_above(top, base, include_base, False, offset, length)
    return (st.depth if st.ret & S.ALLOCATED else 0), st.pnum


@api(Tier.IO)
async def bdrv_co_is_zero_fast(bs: BlockDriverState, offset: int, length: int) -> bool:
    """True when the chain cheaply proves the range reads as zeros (False proves nothing).

    Tier: I/O.
    """
    if length == 0:
        return True
    st = await _common_status_above(bs, None, False, False, offset, length)
    return st.pnum == length and bool(st.ret & S.ZERO)


bdrv_block_status = co_wrapper(_co_block_status_self, "bdrv_block_status", rdlock=True)
bdrv_block_status.__doc__ = """Status of ``bs`` alone (sync, precise). Tier: I/O."""


async def _co_status_above_entry(bs: BlockDriverState, base: BlockDriverState | None,
                                 offset: int, length: int) -> BlockStatus:  # fmt: skip
    return await _common_status_above(bs, base, False, True, offset, length)


bdrv_block_status_above = co_wrapper(_co_status_above_entry, "bdrv_block_status_above",
                                     rdlock=True)  # fmt: skip
bdrv_is_allocated = co_wrapper(bdrv_co_is_allocated, "bdrv_is_allocated", rdlock=True)
bdrv_is_allocated_above = co_wrapper(bdrv_co_is_allocated_above, "bdrv_is_allocated_above",
                                     rdlock=True)  # fmt: skip

"""Zero writes and discard: the driver's own zero write in aligned pieces, else zero
buffers in bounded chunks; advisory discard split at the node's discard limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .aio import _waiters, aio_wait_kick, assert_bdrv_graph_readable, co_wrapper
from .errors import NotSupportedError
from .io import (
    _DISCARD,
    _FUA,
    _MAY_UNMAP,
    _NO_FALLBACK,
    _NONE,
    _O_UNMAP,
    _ZERO,
    F,
    TrackedRequest,
    _call_driver,
    _check_medium,
    _check_request,
    _driver_pwritev,
    _enter,
    _wait_serialising,
    _write_allowed,
    _write_finish,
    bdrv_co_flush,
    bdrv_co_pwritev,
)
from .tiers import Tier, api
from .types import BDRV_REQUEST_MAX_BYTES, MAX_BOUNCE_BUFFER
from .util import aligned_buffer, round_down

if TYPE_CHECKING:
    from .graph import BdrvChild, BlockDriverState

# -------------------------------------------------------------------------------------------
# Zero writes
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_pwrite_zeroes(child: BdrvChild, offset: int, length: int, flags: F = _NONE
                                ) -> None:  # fmt: skip
    """Make a range read as zeros, using the driver's zero write where it has one. Tier: I/O.

    ``MAY_UNMAP`` is dropped unless the node was opened with discard=unmap; ``NO_FALLBACK``
    makes the request fail with "not supported" instead of writing zero buffers.
    """
    flags = int(flags)
    if not child.bs.open_flags & _O_UNMAP:
        flags &= ~_MAY_UNMAP
    await bdrv_co_pwritev(child, offset, length, None, flags | _ZERO)


async def _do_pwrite_zeroes(bs: BlockDriverState, offset: int, length: int, flags: F) -> None:
    """bdrv_co_do_pwrite_zeroes: driver zero write in aligned pieces, else zero buffers."""
    drv = bs.drv
    if flags & _NO_FALLBACK and not bs.supported_zero_flags & _NO_FALLBACK:
        raise NotSupportedError("zero writes without fallback not supported", bs.node_name)
    bl = bs.bl
    align = max(bl.pwrite_zeroes_alignment, bl.request_alignment)
    max_zero = round_down(min(bl.max_pwrite_zeroes or 2**62, 2**62), align) or align
    head = offset % align
    tail = (offset + length) % align
    fua_flush = False
    bounce: memoryview | None = None
    while length > 0:
        num = length
        if head:
            num = min(length, align - head)
            head = (head + num) % align
        elif tail and num > align:
            num -= tail
        num = min(num, max_zero)
        done = False
        if drv.bdrv_co_pwrite_zeroes is not None:
            zflags = flags & bs.supported_zero_flags & ~_ZERO
            if flags & _FUA and not bs.supported_zero_flags & _FUA:
                fua_flush = True
            try:
                await _call_driver(bs, drv.bdrv_co_pwrite_zeroes, offset, num, zflags)
                done = True
            except NotSupportedError:
                if flags & _NO_FALLBACK:
                    raise
        elif flags & _NO_FALLBACK:
            raise NotSupportedError("zero writes without fallback not supported", bs.node_name)
        if not done:
            chunk_max = min(bl.max_transfer or MAX_BOUNCE_BUFFER, MAX_BOUNCE_BUFFER)
            chunk_max = max(round_down(chunk_max, bl.request_alignment), bl.request_alignment)
            pos = 0
            while pos < num:
                n = min(num - pos, chunk_max)
                if bounce is None or len(bounce) < n:
                    bounce = aligned_buffer(min(num, chunk_max), bl.opt_mem_alignment)
                await _driver_pwritev(bs, offset + pos, n, bounce[:n], flags & ~(
                    _ZERO | _MAY_UNMAP | _NO_FALLBACK | _FUA))  # fmt: skip
                pos += n
            if flags & _FUA:
                fua_flush = True
        offset += num
        length -= num
    if fua_flush:
        bs.write_gen += 1  # the flush must see these writes
        await bdrv_co_flush(bs)


@api(Tier.IO)
def bdrv_make_zero(child: BdrvChild, flags: F = _NONE) -> None:
    """Zero the whole node, skipping ranges block status already reports as zero. Tier: I/O.

    Sync: runs in the node's context and waits (QEMU's bdrv_make_zero loops over sync
    calls); zeroes at most ``BDRV_REQUEST_MAX_BYTES`` per request.
    """
    from .resize import bdrv_getlength
    from .status import bdrv_block_status

    bs = child.bs
    length = bdrv_getlength(bs)
    offset = 0
    while offset < length:
        num = min(length - offset, BDRV_REQUEST_MAX_BYTES)
        st = bdrv_block_status(bs, offset, num)
        if not st.ret & 0x2:  # BDRV_BLOCK_ZERO
            bdrv_pwrite_zeroes(child, offset, st.pnum, flags)
        offset += st.pnum


# -------------------------------------------------------------------------------------------
# Discard, flush, truncate, length
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_pdiscard(child: BdrvChild, offset: int, length: int) -> None:
    """Discard a range (advisory). Tier: I/O.

    A no-op on nodes not opened with discard=unmap or whose driver cannot discard;
    refused on read-only nodes. Split at ``pdiscard_alignment`` and ``max_pdiscard``.
    """
    bs = child.bs
    drv = _enter("bdrv_co_pdiscard", bs)
    assert_bdrv_graph_readable("bdrv_co_pdiscard")
    if bs.removable_below:
        await _check_medium(bs)
    _check_request(bs, offset, length, False)
    if not bs.open_flags & _O_UNMAP or drv.bdrv_co_pdiscard is None or length == 0:
        return
    bl = bs.bl
    align = max(bl.pdiscard_alignment, bl.request_alignment)
    max_pdiscard = round_down(min(bl.max_pdiscard or 2**62, 2**62), align) or align
    head = offset % align
    tail = (offset + length) % align
    bs.in_flight += 1
    req = TrackedRequest(bs, offset, length, _DISCARD)
    try:
        if bs.serialising_in_flight:
            await _wait_serialising(req)
        _write_allowed(child, 0, _NONE)
        pos, remaining = offset, length
        while remaining > 0:
            num = remaining
            if head:
                # small pieces up to the alignment boundary; an unaligned start first reaches
                # the next request_alignment boundary, an aligned one stays aligned (discard
                # is advisory: pieces smaller than request_alignment still go down, as QEMU)
                num = min(remaining, align - head)
                ra = bl.request_alignment
                if pos % ra:
                    num = min(num, ra - pos % ra)
                elif (pos + num) % ra and num > ra:
                    num = round_down(pos + num, ra) - pos
                head = (head + num) % align
            elif tail:
                if num > align:
                    num -= tail
                elif tail % bl.request_alignment and tail > bl.request_alignment:
                    tail %= bl.request_alignment
                    num -= tail
            num = min(num, max_pdiscard)
            try:
                await _call_driver(bs, drv.bdrv_co_pdiscard, pos, num)
            except NotSupportedError:
                pass
            pos += num
            remaining -= num
    finally:
        _write_finish(bs, offset, length, _DISCARD)
        req.end()
        bs.in_flight -= 1
        if _waiters:
            aio_wait_kick()


bdrv_pwrite_zeroes = co_wrapper(bdrv_co_pwrite_zeroes, "bdrv_pwrite_zeroes", mixed=True,
                                rdlock=True)  # fmt: skip
bdrv_pdiscard = co_wrapper(bdrv_co_pdiscard, "bdrv_pdiscard", mixed=True, rdlock=True,
                           tier=Tier.IO_OR_GS)  # fmt: skip

"""Allocating writes: new clusters filled with copy-on-write data and linked into L2, and
subcluster writes of extended L2 (QEMU's qcow2_alloc_host_offset and
qcow2_alloc_cluster_link_l2 in qcow2-cluster.c, plus the COW of handle_copied/do_perform_cow).

Callers hold the image lock. An allocating write drops it for its data I/O, as
qcow2_co_pwritev_task does; until its L2 entries are linked it sits in ``img.inflight`` (QEMU's
cluster_allocs list of QCowL2Meta), and requests touching the same clusters wait for it
(handle_dependencies) while requests on other clusters go on.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

import attrs

from blockcore.util import aligned_buffer

from .cluster import ClusterType as CT
from .cluster import SubclusterType as ST
from .cluster import cluster_type, subcluster_type
from .format import L2_BITMAP_ALL_ALLOC, OFLAG_COPIED

if TYPE_CHECKING:
    from .image import Qcow2Image


@attrs.define(eq=False)
class InFlight:
    """Guest clusters ``[start, end)`` allocated but not yet linked into L2 (QCowL2Meta)."""

    start: int
    end: int
    done: asyncio.Event = attrs.Factory(asyncio.Event)


def first_overlap(img: Qcow2Image, start: int, end: int) -> InFlight | None:
    """The in-flight allocation overlapping guest ``[start, end)`` that starts first."""
    best = None
    for m in img.inflight:
        if m.start < end and start < m.end and (best is None or m.start < best.start):
            best = m
    return best


async def wait_for(img: Qcow2Image, m: InFlight) -> None:
    """Wait, without the image lock, until ``m`` is linked (or has failed)."""
    async with img.unlocked():
        await m.done.wait()


async def wait_dependencies(img: Qcow2Image, start: int, end: int) -> None:
    """With the lock held: wait until no allocation in flight overlaps ``[start, end)``."""
    while (m := first_overlap(img, start, end)) is not None:
        await wait_for(img, m)


async def write_kept(img: Qcow2Image, l1_index: int, l2: bytearray, pos: int,
                     data: memoryview, n: int) -> None:  # fmt: skip
    """Write into ``n`` host-contiguous clusters the image owns alone (COPIED, with data or
    zero with host space): as they are when every touched subcluster holds data, else
    widened over the zero or unallocated (sub)clusters at either end (copying what they read
    as now) and the L2 entries pointed at the same clusters again, which clears their zero
    state (handle_copied's QCowL2Meta with keep_old_clusters)."""
    geo = img.geo
    cs = geo.cluster_size
    cstart = geo.start_of_cluster(pos)
    host = img._host(img._entry(l2, geo.offset_to_l2_index(pos))[0], pos)
    bounds = keep_bounds(img, l2, pos, pos + len(data), n)
    if bounds is None:
        await img.check_overlap(host + pos - cstart, len(data))
        async with img.unlocked():
            await img.file.event("write_aio")
            await img.data.pwrite(host + pos - cstart, data)
        return
    a, b = bounds
    await img.check_overlap(host + a - cstart, b - a)
    m = InFlight(cstart, cstart + n * cs)
    img.inflight.append(m)
    try:
        async with img.unlocked():
            await _write_filled(img, pos, data, a, b, host + a - cstart)
        await link(img, l1_index, cstart, host, n, a - cstart, b - cstart, keep_old=True)
    finally:
        img.inflight.remove(m)
        m.done.set()


def keep_bounds(img: Qcow2Image, l2: bytearray, pos: int, end: int,
                n: int) -> tuple[int, int] | None:  # fmt: skip
    """For a write of ``[pos, end)`` into ``n`` kept clusters: None when every touched
    subcluster is NORMAL, else the guest range to write, ``[pos, end)`` stretched to the
    subcluster (or, without extended L2, cluster) bounds at an end whose subcluster reads as
    zero or from the backing file (calculate_l2_meta with keep_old)."""
    geo = img.geo
    cs = geo.cluster_size
    cstart = geo.start_of_cluster(pos)
    idx = geo.offset_to_l2_index(pos)
    types = []
    for k in range(n):
        entry, bitmap = img._entry(l2, idx + k)
        first = geo.offset_to_sc_index(max(pos, cstart + k * cs))
        last = geo.offset_to_sc_index(min(end, cstart + (k + 1) * cs) - 1)
        types += [subcluster_type(entry, bitmap, sc, geo) for sc in range(first, last + 1)]
    if all(t is ST.NORMAL for t in types):
        return None
    ss = geo.subcluster_size
    a = pos if types[0] is ST.NORMAL else pos - pos % ss
    b = end if types[-1] is ST.NORMAL else -(-end // ss) * ss
    return a, b


async def write_alloc(img: Qcow2Image, l1_index: int, l2: bytearray, pos: int,
                      data: memoryview, n: int) -> None:  # fmt: skip
    """Allocate ``n`` new clusters, fill them with COW data around ``data`` with the lock
    dropped, then point the L2 entries at them and drop the old references
    (qcow2_alloc_cluster_link_l2). The caller has taken the L2 table ``l2`` for
    ``l1_index`` already, so the table is allocated before the data clusters, as in QEMU."""
    geo = img.geo
    cs = geo.cluster_size
    cstart = geo.start_of_cluster(pos)
    cend = cstart + n * cs
    a, b = cow_bounds(img, l2, pos, pos + len(data), n)
    if img.has_data_file:
        new = cstart
    else:
        new = await img.refcounts.alloc_clusters(n)
        await img.check_overlap(new, n * cs)  # refcounts that lie about metadata
    m = InFlight(cstart, cend)
    img.inflight.append(m)
    try:
        try:
            async with img.unlocked():
                await _write_filled(img, pos, data, a, b, new + a - cstart)
        except BaseException:
            # qcow2_alloc_cluster_abort: nothing links the clusters, give them back
            if not img.has_data_file:
                try:
                    await img.refcounts.update(new, n * cs, -1)
                except OSError:
                    pass  # leaked, which check -r leaks repairs
            raise
        await link(img, l1_index, cstart, new, n, a - cstart, b - cstart)
    finally:
        img.inflight.remove(m)
        m.done.set()


async def _write_filled(img: Qcow2Image, pos: int, data: memoryview, a: int, b: int,
                        host: int) -> None:  # fmt: skip
    """With the lock dropped: write ``data`` (guest ``pos``) into the clusters whose guest
    ``[a, b)`` starts at ``host``, the copy-on-write regions around it zeroed in one request
    when they read as zero (handle_alloc_space, for new and kept clusters alike), else
    copied (perform_cow)."""
    if await zero_new_space(img, pos, len(data), a, b, host):
        out, host = data, host + pos - a  # the COW regions read as zero now
    else:
        out = await _with_cow(img, pos, data, a, b)
    await img.file.event("write_aio")
    await img.data.pwrite(host, out)


async def zero_new_space(img: Qcow2Image, pos: int, length: int, a: int, b: int,
                         host: int) -> bool:  # fmt: skip
    """Zero the new guest range ``[a, b)``, at ``host`` in the data file, with one zero write
    that must not fall back to writing buffers, instead of writing copy-on-write regions that
    are all zeros (QEMU's handle_alloc_space). Only when the write ``[pos, pos+length)``
    leaves COW regions, both cheaply prove to read as zero (is_zero_cow) and the data file
    takes such writes at all. True when done: the caller writes the guest data alone; False
    (also when the zero write turns out "not supported" or EAGAIN): copy on write as usual.
    """
    end = pos + length
    if not img.data.fast_zeroes or (a == pos and b == end):
        return False
    if not (await _reads_as_zero_fast(img, a, pos - a)
            and await _reads_as_zero_fast(img, end, b - end)):  # fmt: skip
        return False
    await img.file.event("cluster_alloc_space")
    try:
        await img.data.pwrite_zeroes(host, b - a, no_fallback=True)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EAGAIN):
            return False
        raise
    return True


async def _reads_as_zero_fast(img: Qcow2Image, offset: int, length: int) -> bool:
    """Whether guest ``[offset, +length)`` is one run known to read as zeros (as
    bdrv_co_is_zero_fast: a false answer proves nothing). Takes the lock itself."""
    if not length:
        return True
    if img.is_zero_fast is not None:
        return await img.is_zero_fast(offset, length)
    if offset + length > img.header.size:
        return False
    stype, n, _ = await img.block_status(offset, length)
    zero = stype in (ST.ZERO_PLAIN, ST.ZERO_ALLOC) or (
        stype in (ST.UNALLOCATED_PLAIN, ST.UNALLOCATED_ALLOC) and not img.has_backing())
    return zero and n >= length


def _ctz32(x: int) -> int:
    return (x & -x).bit_length() - 1 if x else 32


def cow_bounds(img: Qcow2Image, l2: bytearray, pos: int, end: int, n: int) -> tuple[int, int]:
    """The guest range a new allocation of the ``n`` clusters around ``[pos, end)`` writes:
    whole clusters, or with extended L2 only the touched subclusters plus the allocated ones
    of the old cluster next to them (calculate_l2_meta's cow_start/cow_end)."""
    geo = img.geo
    cs, sb = geo.cluster_size, geo.subcluster_bits
    cstart = geo.start_of_cluster(pos)
    cend = cstart + n * cs
    if not geo.extended_l2:
        return cstart, cend
    idx = geo.offset_to_l2_index(pos)
    entry, bitmap = img._entry(l2, idx)
    sc = geo.offset_to_sc_index(pos)
    t = subcluster_type(entry, bitmap, sc, geo)
    if t is ST.COMPRESSED:
        a = cstart
    elif t in (ST.ZERO_PLAIN, ST.UNALLOCATED_PLAIN):
        a = cstart + (sc << sb)
    else:  # skip leading zero and unallocated subclusters
        a = cstart + (min(sc, _ctz32(bitmap & L2_BITMAP_ALL_ALLOC)) << sb)
    entry, bitmap = img._entry(l2, idx + n - 1)
    sc = geo.offset_to_sc_index(end - 1)
    t = subcluster_type(entry, bitmap, sc, geo)
    if t is ST.COMPRESSED:
        b = cend
    elif t in (ST.ZERO_PLAIN, ST.UNALLOCATED_PLAIN):
        b = -(-end >> sb) << sb
    else:  # skip trailing zero and unallocated subclusters
        clz = 32 - (bitmap & L2_BITMAP_ALL_ALLOC).bit_length()
        b = cend - (min(geo.subclusters_per_cluster - sc - 1, clz) << sb)
    return a, b


async def _with_cow(img: Qcow2Image, pos: int, data: memoryview, cstart: int,
                    cend: int) -> memoryview:  # fmt: skip
    """``data`` widened to ``[cstart, cend)`` with the current guest content around it.
    Reads take the lock per lookup; nobody else changes these clusters while we own them."""
    end = pos + len(data)
    if pos == cstart and end == cend:
        return data
    out = aligned_buffer(cend - cstart)
    if pos > cstart:
        await img.file.event("cow_read")
        await img._read(cstart, out[: pos - cstart])
    if end < cend:
        await img.file.event("cow_read")
        await img._read(end, out[end - cstart :])
    out[pos - cstart : end - cstart] = data
    await img.file.event("cow_write")
    return out


async def link(img: Qcow2Image, l1_index: int, cstart: int, new: int, n: int,
               written_from: int, written_to: int, keep_old: bool = False) -> None:  # fmt: skip
    """Point the L2 entries of guest clusters ``cstart..`` at ``new..`` and free what they
    held (unless ``keep_old``: the same clusters); with extended L2, mark the subclusters of
    ``[written_from, written_to)`` (relative to ``cstart``) allocated. The table is looked
    up again: it may have left the cache while we were unlocked."""
    geo = img.geo
    cs = geo.cluster_size
    await img._link_dependency()
    l2off, l2 = await img._l2_for_write(l1_index)
    idx = geo.offset_to_l2_index(cstart)
    old = []
    for k in range(n):
        entry, bitmap = img._entry(l2, idx + k)
        old.append((entry, bitmap))
        new_bitmap = 0
        if geo.extended_l2:
            first = geo.offset_to_sc_index(max(written_from, k * cs))
            last = geo.offset_to_sc_index(min(written_to, (k + 1) * cs) - 1)
            mask = ((1 << (last + 1 - first)) - 1) << first
            if cluster_type(entry, geo) is CT.COMPRESSED:
                bitmap = 0
            new_bitmap = (bitmap | mask) & ~(mask << 32)
        img._set_entry(l2, idx + k, (new + k * cs) | OFLAG_COPIED, new_bitmap)
    img.l2_cache.mark_dirty(l2off)
    for entry, bitmap in [] if keep_old else old:
        await img._free_entry(entry, bitmap)

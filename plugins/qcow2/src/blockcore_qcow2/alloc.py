"""Allocating writes: new clusters filled with copy-on-write data and linked into L2, and
subcluster writes of extended L2 (QEMU's qcow2_alloc_host_offset and
qcow2_alloc_cluster_link_l2 in qcow2-cluster.c, plus the COW of handle_copied/do_perform_cow).
Callers hold the image lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockcore.util import aligned_buffer

from .format import L2_BITMAP_ALL_ALLOC, OFLAG_COPIED

if TYPE_CHECKING:
    from .image import Qcow2Image


async def write_inplace_ext(img: Qcow2Image, l2off: int, l2: bytearray, pos: int,
                            data: memoryview) -> None:  # fmt: skip
    """Extended L2, allocated clusters: widen to subcluster bounds (copying what the
    subclusters read as now), write, then mark the subclusters allocated."""
    geo = img.geo
    ss = geo.subcluster_size
    end = pos + len(data)
    cstart = geo.start_of_cluster(pos)
    while pos < end:
        cend = min(end, geo.start_of_cluster(pos) + geo.cluster_size)
        idx = geo.offset_to_l2_index(pos)
        entry, bitmap = img._entry(l2, idx)
        host = img._host(entry, pos)
        a = pos - pos % ss
        b = -(-cend // ss) * ss
        wide = aligned_buffer(b - a)
        if a < pos:
            await img._current(a, wide[: pos - a])
        if cend < b:
            await img._current(cend, wide[cend - a :])
        wide[pos - a : cend - a] = data[pos - (end - len(data)) : cend - (end - len(data))]
        await img.check_overlap(host + geo.offset_into_cluster(a), len(wide))
        await img.file.event("write_aio")
        await img.data.pwrite(host + geo.offset_into_cluster(a), wide)
        first = geo.offset_to_sc_index(a)
        count = (b - a) // ss
        mask = ((1 << count) - 1) << first
        new_bitmap = (bitmap | mask) & ~(mask << 32)
        if new_bitmap != bitmap:
            img._set_entry(l2, idx, entry, new_bitmap)
            img.l2_cache.mark_dirty(l2off)
        pos = cend
    del cstart


async def write_alloc(img: Qcow2Image, l2off: int, l2: bytearray, pos: int, data: memoryview,
                      n: int) -> None:  # fmt: skip
    """Allocate ``n`` new clusters, fill them with COW data around ``data``, then point
    the L2 entries at them and drop the old references (qcow2_alloc_cluster_link_l2)."""
    geo = img.geo
    cs = geo.cluster_size
    cstart = geo.start_of_cluster(pos)
    end = pos + len(data)
    cend = cstart + n * cs
    idx = geo.offset_to_l2_index(pos)
    if img.has_data_file:
        new = cstart
    else:
        new = await img.refcounts.alloc_clusters(n)
        await img.check_overlap(new, n * cs)  # refcounts that lie about metadata
    whole = pos == cstart and end == cend
    if whole:
        out = data
    else:
        outbuf = aligned_buffer(cend - cstart)
        if pos > cstart:
            await img.file.event("cow_read")
            await img._current(cstart, outbuf[: pos - cstart])
        if end < cend:
            await img.file.event("cow_read")
            await img._current(end, outbuf[end - cstart :])
        outbuf[pos - cstart : end - cstart] = data
        out = outbuf
        await img.file.event("cow_write")
    await img.file.event("write_aio")
    await img.data.pwrite(new, out)
    await img._link_dependency()
    old = []
    for k in range(n):
        entry, bitmap = img._entry(l2, idx + k)
        old.append((entry, bitmap))
        img._set_entry(l2, idx + k, (new + k * cs) | OFLAG_COPIED,
                        L2_BITMAP_ALL_ALLOC if geo.extended_l2 else 0)  # fmt: skip
    img.l2_cache.mark_dirty(l2off)
    for entry, bitmap in old:
        await img._free_entry(entry, bitmap)

"""Mapping changes without guest data: zero writes, discard, resize, preallocation and L1
growth.

Mirrors QEMU's qcow2_cluster_zeroize/qcow2_cluster_discard (qcow2-cluster.c) and
qcow2_co_truncate/preallocate_co (qcow2.c). Each entry point takes the image lock itself.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

import attrs

from blockcore.errors import BlockError, NotSupportedError, error_prepend

from . import alloc
from .cluster import ClusterType as CT
from .cluster import SubclusterType as ST
from .cluster import cluster_type
from .format import (
    L1E_OFFSET_MASK,
    L2_BITMAP_ALL_ZERO,
    L2E_OFFSET_MASK,
    MAX_L1_SIZE,
    OFLAG_COPIED,
    OFLAG_ZERO,
)

if TYPE_CHECKING:
    from .image import Qcow2Image


async def write_zeroes(img: Qcow2Image, offset: int, length: int, unmap: bool) -> None:
    """Make whole (sub)clusters read as zero in metadata (qcow2_co_pwrite_zeroes).

    A request covering part of a (sub)cluster (the core sends those alone) zeroes the whole
    one when the rest of it already reads as zero (``img.is_zero``: through the backing
    chain under the driver), as QEMU does; otherwise, and for v2 images with a backing
    file, NotSupportedError makes the core write zeros (or fail, with NO_FALLBACK).
    """
    geo = img.geo
    unit = geo.subcluster_size
    head = offset % unit
    tail = -(offset + length) % unit
    if offset + length >= img.header.size:
        tail = 0  # the disk's last, partial subcluster counts as whole
    if head + length + tail > unit and (head or tail):
        raise NotSupportedError("zero write not aligned to (sub)clusters", img.file.name)
    # asked before taking the lock, which the node's block status takes (as QEMU)
    if (head or tail) and not (await img.is_zero(offset - head, head)
                               and await img.is_zero(offset + length, tail)):  # fmt: skip
        raise NotSupportedError("zero write covers part of a (sub)cluster whose rest "
                                "is not zero", img.file.name)  # fmt: skip
    async with img.lock:
        await img.ensure_writable()
        await alloc.wait_dependencies(img, geo.start_of_cluster(offset), offset + length)
        if head or tail:
            # a write may have come in since the check: only unallocated or zero ones
            offset -= head
            length = unit
            run = await img.lookup(offset, unit)
            if run.type not in (ST.UNALLOCATED_PLAIN, ST.UNALLOCATED_ALLOC, ST.ZERO_PLAIN,
                                ST.ZERO_ALLOC):  # fmt: skip
                raise NotSupportedError("zero write covers part of an allocated (sub)cluster",
                                        img.file.name)  # fmt: skip
        if img.header.version < 3 and img.has_backing():
            raise NotSupportedError("v2 image with backing file: no zero clusters",
                                    img.file.name)  # fmt: skip
        await img.file.event("pwritev_zero")
        await zero_or_discard(img, offset, length, unmap=unmap, discard=False)


async def reads_as_zero(img: Qcow2Image, offset: int, length: int) -> bool:
    """Whether ``[offset, offset+length)`` (clipped to the disk) reads as zeros by this
    image's own mapping: zero clusters, or unallocated ones with no backing file."""
    end = min(offset + length, img.header.size)
    pos = offset
    while pos < end:
        async with img.lock:
            run = await img.lookup(pos, end - pos)
        unallocated = run.type in (ST.UNALLOCATED_PLAIN, ST.UNALLOCATED_ALLOC)
        if not (run.type in (ST.ZERO_PLAIN, ST.ZERO_ALLOC) or unallocated
                and not img.has_backing()):  # fmt: skip
            return False
        pos += run.length
    return True


async def discard(img: Qcow2Image, offset: int, length: int) -> None:
    """Free whole clusters; v3 (or a backing file) leaves them reading as zero. A v2 image
    with a backing file refuses (NotSupportedError, which the core ignores): without zero
    clusters the backing file's data would show (qcow2_co_pdiscard)."""
    if img.header.version < 3 and img.has_backing():
        raise NotSupportedError("v2 image with backing file: discard would expose the "
                                "backing file", img.file.name)  # fmt: skip
    geo = img.geo
    cs = geo.cluster_size
    a = -(-offset // cs) * cs
    b = (offset + length) // cs * cs
    if offset + length >= img.header.size:
        b = -(-img.header.size // cs) * cs  # the last partial cluster counts as whole
    if a >= b:
        return
    async with img.lock:
        await img.ensure_writable()
        await alloc.wait_dependencies(img, a, b)
        await zero_or_discard(img, a, b - a, unmap=True, discard=True)


async def zero_or_discard(img: Qcow2Image, offset: int, length: int, *, unmap: bool,
                          discard: bool) -> None:  # fmt: skip
    geo = img.geo
    cs = geo.cluster_size
    ss = geo.subcluster_size
    v3 = img.header.version >= 3
    punch: list[int] = []
    pos, end = offset, offset + length
    while pos < end:
        l1i = geo.offset_to_l1_index(pos)
        if discard and (l1i >= len(img.l1) or not img.l1[l1i] & L1E_OFFSET_MASK):
            if not v3 or not img.has_backing():
                pos = min(end, (l1i + 1) * geo.l1_entry_span())
                continue
        l2off, l2 = await img._l2_for_write(l1i)
        stop = min(end, (l1i + 1) * geo.l1_entry_span())
        while pos < stop:
            idx = geo.offset_to_l2_index(pos)
            entry, bitmap = img._entry(l2, idx)
            cstart = geo.start_of_cluster(pos)
            cend = min(stop, cstart + cs)
            full = pos == cstart and cend == cstart + cs
            ctype = cluster_type(entry, geo)
            if geo.extended_l2 and not full:
                # Subcluster-granular zeroing inside one cluster.
                first = geo.offset_to_sc_index(pos)
                count = (cend - pos) // ss
                mask = ((1 << count) - 1) << first
                if ctype is CT.COMPRESSED:
                    raise NotSupportedError("partial zero write on a compressed cluster",
                                            img.file.name)  # fmt: skip
                new_bitmap = (bitmap & ~mask) | (mask << 32)
                img._set_entry(l2, idx, entry, new_bitmap)
                img.l2_cache.mark_dirty(l2off)
                pos = cend
                continue
            keep = ctype is CT.NORMAL and not unmap and not img.has_data_file
            keep = keep or ctype is CT.ZERO_ALLOC and not unmap
            # a data file cluster keeps its offset on a zero write; a discard drops it
            # (discard_in_l2_slice), and the data file range is discarded
            keep = keep or (img.has_data_file and ctype is CT.NORMAL and not discard)
            keep = keep and v3  # v2 has no zero flag: zeroing discards (QEMU's zeroize)
            if discard and not (v3 and (img.has_backing() or ctype is not CT.UNALLOCATED)):
                new_entry, new_bitmap = 0, 0  # v2, or nothing to hide: unallocated
            elif geo.extended_l2:
                new_entry = entry & (L2E_OFFSET_MASK | OFLAG_COPIED) if keep else 0
                new_bitmap = L2_BITMAP_ALL_ZERO
            elif not v3:
                new_entry, new_bitmap = 0, 0
            else:
                new_entry = (entry & (L2E_OFFSET_MASK | OFLAG_COPIED) if keep else 0) | OFLAG_ZERO
                new_bitmap = 0
            if (new_entry, new_bitmap) != (entry, bitmap):
                img._set_entry(l2, idx, new_entry, new_bitmap)
                img.l2_cache.mark_dirty(l2off)
                if not keep:
                    # guest discards and zero writes free as QCOW2_DISCARD_REQUEST
                    await img._free_entry(entry, bitmap, punch)
            pos = cend
    await img.punch_freed(punch)


async def truncate(img: Qcow2Image, size: int, prealloc: str = "off") -> None:
    """Grow (with optional preallocation) or shrink the virtual disk."""
    async with img.lock:
        await img.ensure_writable()
        await alloc.wait_dependencies(img, 0, 1 << 63)
        geo = img.geo
        old = img.header.size
        if size < old:
            if prealloc != "off":  # qcow2_co_truncate's check and text
                raise BlockError(errno.EINVAL, "preallocation can't be used for shrinking an "
                                 "image", img.file.name)  # fmt: skip
            if img.header.nb_snapshots:
                raise NotSupportedError("cannot shrink an image with snapshots",
                                        img.file.name)  # fmt: skip
            cs = geo.cluster_size
            start = -(-size // cs) * cs
            await shrink_unmap(img, start, -(-old // cs) * cs)
        else:
            await img.grow_l1(geo.size_to_l1(size))
        await img.flush_metadata()
        await img.file.flush()
        await img.write_header(attrs.evolve(img.header, size=size))
        if size > old and prealloc in ("falloc", "full") and not img.has_data_file:
            await preallocate_area(img, old, size, prealloc)
        elif size > old and prealloc != "off":
            await preallocate(img, old, size, prealloc)


async def shrink_unmap(img: Qcow2Image, start: int, end: int) -> None:
    geo = img.geo
    pos = start
    while pos < end:
        l1i = geo.offset_to_l1_index(pos)
        stop = min(end, (l1i + 1) * geo.l1_entry_span())
        if l1i < len(img.l1) and img.l1[l1i] & L1E_OFFSET_MASK:
            l2off, l2 = await img._l2_for_write(l1i)
            for idx in range(geo.offset_to_l2_index(pos),
                             geo.offset_to_l2_index(stop - 1) + 1):  # fmt: skip
                entry, bitmap = img._entry(l2, idx)
                if entry or bitmap:
                    img._set_entry(l2, idx, 0, 0)
                    img.l2_cache.mark_dirty(l2off)
                    await img._free_entry(entry, bitmap)
            if pos == l1i * geo.l1_entry_span():
                # The whole L2 table is out of range now: drop it (l1_shrink_*).
                await img.flush_metadata()
                img.l1[l1i] = 0
                await img.file.event("l1_shrink_write_table")
                await img._write_l1_entry(l1i)
                await img.file.flush()
                await img.file.event("l1_shrink_free_l2_clusters")
                img.l2_cache.discard(l2off)
                await img.refcounts.update(l2off, geo.cluster_size, -1)
        pos = stop


async def preallocate(img: Qcow2Image, start: int, end: int, mode: str) -> None:
    """Map every cluster of ``[start, end)`` (metadata), reserving host space for
    falloc and writing zeros for full (qcow2's preallocate_co)."""
    geo = img.geo
    cs = geo.cluster_size
    pos = geo.start_of_cluster(start)
    host_end = 0
    while pos < end:
        l1i = geo.offset_to_l1_index(pos)
        stop = min(-(-end // cs) * cs, (l1i + 1) * geo.l1_entry_span())
        l2off, l2 = await img._l2_for_write(l1i)
        first = geo.offset_to_l2_index(pos)
        n = (stop - pos) // cs
        todo = [i for i in range(first, first + n) if not img._entry(l2, i)[0]
                & L2E_OFFSET_MASK and cluster_type(img._entry(l2, i)[0], geo)
                is not CT.COMPRESSED]  # fmt: skip
        if todo and img.has_data_file:
            # host offset == guest offset; offset 0 is valid with COPIED set
            for i in todo:
                entry, bitmap = img._entry(l2, i)
                guest = pos + (i - first) * cs
                img._set_entry(l2, i, guest | OFLAG_COPIED,
                                bitmap if geo.extended_l2 else 0)  # fmt: skip
            img.l2_cache.mark_dirty(l2off)
        elif todo:
            new = await img.refcounts.alloc_clusters(len(todo))
            await img._link_dependency()
            for k, i in enumerate(todo):
                entry, bitmap = img._entry(l2, i)
                host = new + k * cs
                zero = entry & OFLAG_ZERO if not geo.extended_l2 else 0
                img._set_entry(l2, i, host | OFLAG_COPIED | zero,
                                bitmap if geo.extended_l2 else 0)  # fmt: skip
            img.l2_cache.mark_dirty(l2off)
            host_end = max(host_end, new + len(todo) * cs)
            if mode == "full":
                await img.check_overlap(new, len(todo) * cs)
                await img.file.pwrite_zeroes(new, len(todo) * cs)
        pos = stop
    await img.flush_metadata()
    if host_end and await img.file.getlength() < host_end:
        await img.file.truncate(host_end)


async def preallocate_area(img: Qcow2Image, start: int, end: int, mode: str) -> None:
    """falloc/full growth as qcow2_co_truncate does it: refcount structures for the whole
    new area first (behind the used end of the file), then the data clusters right after
    them, reserved (falloc) or zeroed (full) by truncating the file with ``mode``, then
    the L2 entries; new L2 tables take free clusters as usual."""
    geo = img.geo
    cs = geo.cluster_size
    refcounts = img.refcounts
    await img.flush_metadata()
    file_end = await img.file.getlength()
    last = await refcounts.get_last_cluster(file_end)
    file_end = (last + 1) * cs if last >= 0 else -(-file_end // cs) * cs
    first = geo.start_of_cluster(start)
    count = (-(-end // cs) * cs - first) // cs
    # refcounts for the L2 tables too (they are counted wherever they land), plus one for
    # an area not aligned to L2 spans
    l2_tables = -(-count // (cs // geo.l2_entry_size)) + 1
    host = await refcounts.refcount_area(file_end, count + l2_tables, exact=True)
    got = await refcounts.alloc_clusters_at(host, count)
    if got != count:
        raise await img.mark_corrupt(f"clusters {host:#x}.. behind new refcount structures "
                                     "are in use")  # fmt: skip
    try:
        await img.file.truncate(host + count * cs, mode)
    except OSError as exc:
        await refcounts.update(host, count * cs, -1)  # give the reserved clusters back
        await img.flush_metadata()  # with the old refcount table's release: a clean image
        raise error_prepend(exc, "Failed to resize underlying file: ") from exc
    if start > first:
        # the old last cluster is only partly inside the old disk: its data moves along
        # (QEMU's cow_start of the allocation)
        head = bytearray(start - first)
        await img._current(first, memoryview(head))
        await img.file.pwrite(host, head)
    await img._link_dependency()
    guest = first
    while guest < first + count * cs:
        l1i = geo.offset_to_l1_index(guest)
        stop = min(first + count * cs, (l1i + 1) * geo.l1_entry_span())
        l2off, l2 = await img._l2_for_write(l1i)
        for i in range(geo.offset_to_l2_index(guest), geo.offset_to_l2_index(stop - 1) + 1):
            entry, bitmap = img._entry(l2, i)
            # subcluster bits stay (unallocated reads as zero); QEMU's prealloc link
            img._set_entry(l2, i, host | OFLAG_COPIED, bitmap if geo.extended_l2 else 0)
            host += cs
            if entry:
                # QCOW2_DISCARD_NEVER: the collected offsets are never punched
                await img._free_entry(entry, bitmap, [])
        img.l2_cache.mark_dirty(l2off)
        await img._link_dependency()
        guest = stop
    await img.flush_metadata()


async def grow_l1(img: Qcow2Image, min_size: int) -> None:
    """Move the L1 table to a larger one (qcow2_grow_l1_table)."""
    if min_size <= len(img.l1):
        return
    new_size = max(min_size, len(img.l1) * 3 // 2)
    if new_size * 8 > MAX_L1_SIZE:
        new_size = min_size
    if new_size * 8 > MAX_L1_SIZE:
        raise BlockError(errno.EFBIG, f"L1 table of {new_size} entries too large",
                         img.file.name)  # fmt: skip
    cs = img.geo.cluster_size
    nbytes = new_size * 8
    await img.file.event("l1_grow_alloc_table")
    new_off = await img.refcounts.alloc_clusters(-(-nbytes // cs))
    # The refcounts of the new table must be on disk before the header names it.
    await img.flush_metadata()
    new_l1 = img.l1 + [0] * (new_size - len(img.l1))
    await img.file.event("l1_grow_write_table")
    await img.file.pwrite(new_off, struct.pack(f">{new_size}Q", *new_l1))
    await img.file.flush()
    await img.file.event("l1_grow_activate_table")
    old_off, old_size = img.header.l1_table_offset, len(img.l1)
    await img.write_header(attrs.evolve(img.header, l1_table_offset=new_off,
                                        l1_size=new_size))  # fmt: skip
    img.l1 = new_l1
    if old_size:
        await img.refcounts.update(old_off, old_size * 8, -1)

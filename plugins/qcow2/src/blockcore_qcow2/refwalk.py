"""Counting references for the consistency check: an in-memory refcount table filled by
walking every structure that points at clusters (QEMU's calculate_refcounts with its L1, L2,
snapshot, bitmap and refcount-block walks), reporting what is broken on the way."""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from blockcore.types import BdrvCheckMode as Mode
from blockcore.types import BdrvCheckResult

from . import bitmap
from .cluster import ClusterType, cluster_type
from .format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2_BITMAP_ALL_ALLOC,
    L2_BITMAP_ALL_ZERO,
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_L1_SIZE,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    decode_compressed,
)

if TYPE_CHECKING:
    from .image import Qcow2Image
    from .snaptable import SnapshotTable


class Imrt:
    """In-memory refcount table: the references counted from every metadata structure,
    one entry per cluster (QEMU's IMRT). ``counts`` starts with one entry per cluster of
    the file and grows when something is referenced (or allocated) past it."""

    def __init__(self, image: Qcow2Image, file_len: int) -> None:
        self.cluster_bits = image.geo.cluster_bits
        self.cluster_size = image.geo.cluster_size
        self.max_refcount = image.refcounts.max_refcount
        self.file_len = file_len
        self.counts = [0] * image.geo.size_to_clusters(file_len)

    def reset(self) -> None:
        self.counts = [0] * len(self.counts)

    def get(self, ci: int) -> int:
        return self.counts[ci] if ci < len(self.counts) else 0

    def grow(self, nb_clusters: int) -> None:
        if nb_clusters > len(self.counts):
            self.counts.extend([0] * (nb_clusters - len(self.counts)))

    def inc(self, offset: int, size: int, result: BdrvCheckResult) -> None:
        """Count one reference to every cluster of ``[offset, offset+size)``
        (qcow2_inc_refcounts_imrt)."""
        if size <= 0:
            return
        cs = self.cluster_size
        # the last cluster may be partly beyond the end of the file, but no more than that
        if offset + size - self.file_len >= cs:
            result.messages.append(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}")  # fmt: skip
            result.corruptions += 1
            return
        first, last = offset >> self.cluster_bits, (offset + size - 1) >> self.cluster_bits
        self.grow(last + 1)
        for ci in range(first, last + 1):
            if self.counts[ci] >= self.max_refcount:
                result.messages.append(f"ERROR: overflow cluster offset=0x{ci * cs:x}")
                result.messages.append(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing")
                result.corruptions += 1
                continue
            self.counts[ci] += 1

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """Take ``count`` contiguous free clusters at or after ``first_free``, growing the
        table past its end if needed (alloc_clusters_imrt). Returns the byte offset and the
        new ``first_free`` (the first gap seen, even one too small to use)."""
        ci, run, first_gap = first_free, 0, True
        while ci < len(self.counts) and run < count:
            if not self.counts[ci]:
                run += 1
                if first_gap:
                    first_free, first_gap = ci, False
            else:
                run = 0
            ci += 1
        if run < count:
            self.grow(ci + count - run)
        start = ci - run
        for c in range(start, start + count):
            self.counts[c] = 1
        return start << self.cluster_bits, first_free


# -------------------------------------------------------------------------------------------
# Counting references (calculate_refcounts and the L1/L2/refblock walks)
# -------------------------------------------------------------------------------------------


async def calculate_refcounts(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult,
                               snapshots: SnapshotTable, fix: Mode) -> bool:  # fmt: skip
    """Count every reference into ``refs`` (``snapshots``: the table as check read it);
    True when the refcount structure itself is broken and must be rebuilt."""
    cs = image.geo.cluster_size
    refs.inc(0, cs, result)
    await _walk_l1(image, refs, result, image.header.l1_table_offset, image.l1, fix,
                   active=True)  # fmt: skip
    await _walk_snapshots(image, refs, result, snapshots, fix)
    rc = image.refcounts
    refs.inc(rc.table_offset, rc.table_clusters * cs, result)
    await _walk_bitmaps(image, refs, result)
    return await _check_refblocks(image, refs, result, fix)


async def _walk_l1(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult, l1_offset: int,
                   l1: list[int], fix: Mode, active: bool) -> None:  # fmt: skip
    """check_refcounts_l1: the L1 table, its L2 tables and what they point to."""
    if not l1:
        return
    cs = image.geo.cluster_size
    msgs = result.messages
    refs.inc(l1_offset, len(l1) * 8, result)
    for e in l1:
        if not e:
            continue
        if e & L1E_RESERVED_MASK:
            msgs.append(f"ERROR found L1 entry with reserved bits set: {e:x}")
            result.corruptions += 1
        l2_offset = e & L1E_OFFSET_MASK
        refs.inc(l2_offset, cs, result)
        if l2_offset & (cs - 1):
            msgs.append(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                        "L1 entry corrupted")  # fmt: skip
            result.corruptions += 1
        await _walk_l2(image, refs, result, l2_offset, fix, active)


async def _walk_l2(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult, l2_offset: int,
                   fix: Mode, active: bool) -> None:  # fmt: skip
    """check_refcounts_l2 (the fragmentation figures count the active table only). The
    table is read from the file, as QEMU does; the caller flushed the cache first."""
    geo = image.geo
    cs = geo.cluster_size
    msgs = result.messages
    l2 = bytearray(geo.l2_size * geo.l2_entry_size)
    await image.file.pread(l2_offset, memoryview(l2))
    next_contiguous = 0
    for i in range(geo.l2_size):
        entry, bitmap = image._entry(l2, i)
        ctype = cluster_type(entry, geo)
        if ctype is not ClusterType.COMPRESSED and entry & L2E_STD_RESERVED_MASK:
            msgs.append(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            result.corruptions += 1
        if ctype is ClusterType.COMPRESSED:
            if entry & OFLAG_COPIED:
                msgs.append(f"ERROR: coffset=0x{entry & L2E_COMPRESSED_OFFSET_SIZE_MASK:x}: "
                            "copied flag must never be set for compressed clusters")
                entry &= ~OFLAG_COPIED
                result.corruptions += 1
            if image.has_data_file:
                msgs.append(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                result.corruptions += 1
                continue
            if bitmap:
                msgs.append(f"ERROR compressed cluster {i} with non-zero subcluster "
                            f"allocation bitmap, entry=0x{entry:x}")  # fmt: skip
                result.corruptions += 1
                continue
            coff, csize = decode_compressed(entry & L2E_COMPRESSED_OFFSET_SIZE_MASK,
                                            geo.cluster_bits)  # fmt: skip
            refs.inc(coff, csize, result)
            if active:
                result.allocated_clusters += 1
                result.compressed_clusters += 1
                result.fragmented_clusters += 1  # compressed clusters are fragmented by nature
        elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            host = entry & L2E_OFFSET_MASK
            if (bitmap >> 32) & bitmap:
                result.corruptions += 1
                msgs.append(f"ERROR offset={host:x}: Allocated cluster has corrupted "
                            "subcluster allocation bitmap")  # fmt: skip
            if host & (cs - 1):
                result.corruptions += 1
                has_data = bitmap & L2_BITMAP_ALL_ALLOC if geo.extended_l2 \
                    else not entry & OFLAG_ZERO  # fmt: skip
                if has_data:
                    msgs.append(f"ERROR offset={host:x}: Data cluster is not properly aligned; "
                                "L2 entry corrupted.")  # fmt: skip
                else:
                    repair = bool(fix & Mode.FIX_ERRORS)
                    msgs.append(f"{'Repairing' if repair else 'ERROR'} offset={host:x}: "
                                "Preallocated cluster is not properly aligned; L2 entry "
                                "corrupted.")  # fmt: skip
                    if repair and await _zero_entry(image, result, l2_offset, l2, i, bitmap):
                        continue  # it no longer points anywhere
            if active:
                result.allocated_clusters += 1
                if next_contiguous and host != next_contiguous:
                    result.fragmented_clusters += 1
                next_contiguous = host + cs
            if not image.has_data_file:
                refs.inc(host, cs, result)
        elif ctype is ClusterType.UNALLOCATED and bitmap & L2_BITMAP_ALL_ALLOC:
            result.corruptions += 1
            msgs.append("ERROR: Unallocated cluster has non-zero subcluster allocation map")


async def _zero_entry(image: Qcow2Image, result: BdrvCheckResult, l2_offset: int,
                      l2: bytearray, index: int, bitmap: int) -> bool:  # fmt: skip
    """Make a misaligned preallocated zero cluster a plain zero cluster, on disk and in
    the cached copy of its table (fix_l2_entry_by_zero)."""
    geo = image.geo
    if geo.extended_l2:
        # the allocated subclusters read as zeros from now on
        image._set_entry(l2, index, 0, (bitmap | bitmap << 32) & L2_BITMAP_ALL_ZERO)
    else:
        image._set_entry(l2, index, OFLAG_ZERO)
    size = geo.l2_entry_size
    pos = index * size
    try:
        await image.file.pwrite(l2_offset + pos, l2[pos : pos + size])
        await image.file.flush()
    except OSError as exc:
        result.messages.append("ERROR: Failed to overwrite L2 table entry: "
                               f"{os.strerror(exc.errno or 5)}")  # fmt: skip
        result.check_errors += 1
        return False
    cached = image.l2_cache.tables.get(l2_offset)
    if cached is not None:
        cached[pos : pos + size] = l2[pos : pos + size]
    result.corruptions -= 1
    result.corruptions_fixed += 1
    return True


async def _walk_snapshots(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult,
                          table: SnapshotTable, fix: Mode) -> None:  # fmt: skip
    """Every snapshot's L1 table and what it points to, then the snapshot table (as check
    read it before: QEMU's s->snapshots)."""
    snapshots = table.snapshots
    if image.has_data_file and snapshots:
        result.messages.append(f"ERROR {len(snapshots)} snapshots in image with data file")
        result.corruptions += 1
    for sn in snapshots:
        what = f"ERROR snapshot {sn.id_str} ({sn.name})"
        if sn.l1_table_offset & (image.geo.cluster_size - 1):
            result.messages.append(f"{what} l1_offset={_c_hex(sn.l1_table_offset)}: L1 table "
                                   "is not cluster aligned; snapshot table entry corrupted")
            result.corruptions += 1
            continue
        if sn.l1_size > MAX_L1_SIZE // 8:
            result.messages.append(f"{what} l1_size={_c_hex(sn.l1_size)}: L1 table is too "
                                   "large; snapshot table entry corrupted")  # fmt: skip
            result.corruptions += 1
            continue
        buf = bytearray(sn.l1_size * 8)
        await image.file.pread(sn.l1_table_offset, memoryview(buf))
        l1 = list(struct.unpack(f">{sn.l1_size}Q", buf))
        await _walk_l1(image, refs, result, sn.l1_table_offset, l1, fix, active=False)
    refs.inc(image.header.snapshots_offset, table.size, result)


def _c_hex(value: int) -> str:
    """printf's %#x: no prefix for zero."""
    return f"{value:#x}" if value else "0"


async def _walk_bitmaps(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult) -> None:
    ranges = await bitmap.referenced_ranges(image)
    if ranges is None:
        result.messages.append("ERROR bitmap directory too large")
        result.corruptions += 1
        return
    for offset, length in ranges:
        refs.inc(offset, length, result)


async def _raw_reftable(image: Qcow2Image) -> list[int]:
    """The refcount table as stored, reserved bits included (the engine keeps them masked)."""
    rc = image.refcounts
    buf = bytearray(rc.table_clusters * rc.cluster_size)
    await image.file.pread(rc.table_offset, memoryview(buf))
    return list(struct.unpack(f">{len(buf) // 8}Q", buf))


async def _check_refblocks(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult,
                           fix: Mode) -> bool:  # fmt: skip
    """check_refblocks: count every refcount block; True if the structure must be rebuilt.
    With FIX_ERRORS a block past the end of the file is repaired by growing the file."""
    cs = image.geo.cluster_size
    msgs = result.messages
    rebuild = False
    for i, e in enumerate(await _raw_reftable(image)):
        offset = e & REFT_OFFSET_MASK
        ci = offset >> image.geo.cluster_bits
        if e & REFT_RESERVED_MASK:
            msgs.append(f"ERROR refcount table entry {i} has reserved bits set")
            result.corruptions += 1
            rebuild = True
            continue
        if offset & (cs - 1):
            msgs.append(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                        "entry corrupted")  # fmt: skip
            result.corruptions += 1
            rebuild = True
            continue
        if ci >= len(refs.counts):
            result.corruptions += 1
            repair = bool(fix & Mode.FIX_ERRORS)
            msgs.append(f"{'Repairing' if repair else 'ERROR'} refcount block {i} is outside "
                        "image")  # fmt: skip
            if repair:
                try:
                    await image.file.truncate(offset + cs)
                    refs.file_len = await image.file.getlength()
                except OSError as exc:
                    rebuild = True
                    msgs.append(f"ERROR could not resize image: {os.strerror(exc.errno or 5)}")
                    continue
                refs.grow(image.geo.size_to_clusters(refs.file_len))
                result.corruptions -= 1
                result.corruptions_fixed += 1
                refs.inc(offset, cs, result)
            continue
        if offset:
            refs.inc(offset, cs, result)
            if refs.get(ci) != 1:
                msgs.append(f"ERROR refcount block {i} refcount={refs.get(ci)}")
                result.corruptions += 1
                rebuild = True
    return rebuild

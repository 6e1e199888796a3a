"""Consistency check and repair (mirrors qcow2_check_refcounts and its helpers in QEMU's
qcow2-refcount.c, including rebuild_refcount_structure)."""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

import attrs

from blockcore.errors import BlockError, ImageCorruptError
from blockcore.types import BdrvCheckMode as Mode
from blockcore.types import BdrvCheckResult

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
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    Incompat,
    decode_compressed,
)
from .refcount import set_entry

if TYPE_CHECKING:
    from .image import Qcow2Image

#: BdrvCheckResult fields that QEMU saves and restores as a whole (``*res = saved``).
_FIGURES = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
            "allocated_clusters", "fragmented_clusters", "compressed_clusters")  # fmt: skip


def _figures(result: BdrvCheckResult) -> dict[str, int]:
    return {k: getattr(result, k) for k in _FIGURES}


def _restore(result: BdrvCheckResult, figures: dict[str, int]) -> None:
    for k, v in figures.items():
        setattr(result, k, v)


class _Imrt:
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


async def _calculate(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult,
                     fix: Mode) -> bool:  # fmt: skip
    """Count every reference into ``refs``; True when the refcount structure itself is
    broken and must be rebuilt."""
    cs = image.geo.cluster_size
    refs.inc(0, cs, result)
    await _walk_l1(image, refs, result, image.header.l1_table_offset, image.l1, fix,
                   active=True)  # fmt: skip
    await _walk_snapshots(image, refs, result, fix)
    rc = image.refcounts
    refs.inc(rc.table_offset, rc.table_clusters * cs, result)
    await _walk_bitmaps(image, refs, result)
    return await _check_refblocks(image, refs, result, fix)


async def _walk_l1(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult, l1_offset: int,
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


async def _walk_l2(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult, l2_offset: int,
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


async def _walk_snapshots(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult,
                          fix: Mode) -> None:  # fmt: skip
    """Every snapshot's L1 table and what it points to, then the snapshot table."""
    from .snapshot import read_table

    h = image.header
    if not h.nb_snapshots:
        return
    try:
        snapshots, table_size = await read_table(image)
    except ImageCorruptError as exc:
        # QEMU refuses to open such an image; its check never gets here
        result.messages.append(f"ERROR snapshot table: {exc.strerror}")
        result.corruptions += 1
        return
    if image.has_data_file:
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
    refs.inc(h.snapshots_offset, table_size, result)


def _c_hex(value: int) -> str:
    """printf's %#x: no prefix for zero."""
    return f"{value:#x}" if value else "0"


async def _walk_bitmaps(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult) -> None:
    from .format import ExtType

    ext = image.header.extension(ExtType.BITMAPS)
    if ext is None or len(ext.data) < 24:
        return
    nb, _res, dir_size, dir_off = struct.unpack_from(">IIQQ", ext.data)
    if dir_size > 64 << 20:
        result.messages.append("ERROR bitmap directory too large")
        result.corruptions += 1
        return
    refs.inc(dir_off, dir_size, result)
    d = bytearray(dir_size)
    await image.file.pread(dir_off, memoryview(d))
    pos = 0
    for _ in range(nb):
        if pos + 24 > len(d):
            break
        tab_off, tab_size, _flags, _t, _g, name_size, extra = struct.unpack_from(">QIIBBHI", d, pos)
        refs.inc(tab_off, tab_size * 8, result)
        tab = bytearray(tab_size * 8)
        await image.file.pread(tab_off, memoryview(tab))
        for e in struct.unpack(f">{tab_size}Q", tab):
            if e & L1E_OFFSET_MASK:
                refs.inc(e & L1E_OFFSET_MASK, image.geo.cluster_size, result)
        pos += -(-(24 + extra + name_size) // 8) * 8


async def _raw_reftable(image: Qcow2Image) -> list[int]:
    """The refcount table as stored, reserved bits included (the engine keeps them masked)."""
    rc = image.refcounts
    buf = bytearray(rc.table_clusters * rc.cluster_size)
    await image.file.pread(rc.table_offset, memoryview(buf))
    return list(struct.unpack(f">{len(buf) // 8}Q", buf))


async def _check_refblocks(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult,
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


# -------------------------------------------------------------------------------------------
# Comparing with the refcounts on disk
# -------------------------------------------------------------------------------------------


class _Stored:
    """The refcounts the image records, a whole refcount block decoded at a time (the
    comparison asks for every cluster in turn). A block past the end of the file reads as
    zeros, as a short read from the file does in QEMU; a misaligned one is an error for
    each of its clusters, as in qcow2_get_refcount."""

    def __init__(self, image: Qcow2Image, file_len: int) -> None:
        self.refcounts = image.refcounts
        self.name = image.file.name
        self.file_len = file_len
        self.blocks: dict[int, list[int] | None] = {}

    async def get(self, ci: int) -> int:
        rc = self.refcounts
        t = ci >> rc.block_bits
        if t not in self.blocks:
            self.blocks[t] = await self._load(t)
        values = self.blocks[t]
        return values[ci & (rc.entries_per_block - 1)] if values is not None else 0

    async def _load(self, t: int) -> list[int] | None:
        rc = self.refcounts
        block = rc.table[t] if t < len(rc.table) else 0
        if not block:
            return None
        if block & (rc.cluster_size - 1):
            raise BlockError(errno.EIO, f"refcount block offset {block:#x} of refcount table "
                             f"entry {t} is not cluster aligned", self.name)  # fmt: skip
        if block >= self.file_len:
            return None
        return _unpack_block(await rc.cache.get(block), rc.order)

    def set(self, ci: int, value: int) -> None:
        """Keep the decoded copy in step with a repair."""
        values = self.blocks.get(ci >> self.refcounts.block_bits)
        if values is not None:
            values[ci & (self.refcounts.entries_per_block - 1)] = value


def _unpack_block(block: bytearray, order: int) -> list[int]:
    if order >= 3:
        code = {3: "B", 4: "H", 5: "I", 6: "Q"}[order]
        return list(struct.unpack(f">{len(block) >> (order - 3)}{code}", block))
    bits = 1 << order
    mask = (1 << bits) - 1
    shifts = range(0, 8, bits)  # entries fill a byte from its low bits up
    return [(byte >> k) & mask for byte in block for k in shifts]


async def _compare(image: Qcow2Image, refs: _Imrt, result: BdrvCheckResult, fix: Mode,
                   rebuild: bool) -> tuple[bool, int]:  # fmt: skip
    """compare_refcounts: report (and, as ``fix`` allows, repair) every cluster whose
    stored refcount differs from the references counted. Returns the rebuild flag and the
    highest cluster that is referenced or has a refcount (the image end)."""
    rc = image.refcounts
    msgs = result.messages
    stored = _Stored(image, refs.file_len)
    highest = 0
    for ci in range(len(refs.counts)):
        try:
            have = await stored.get(ci)
        except OSError as exc:
            msgs.append(f"Can't get refcount for cluster {ci}: {os.strerror(exc.errno or 5)}")
            result.check_errors += 1
            continue
        want = refs.counts[ci]
        if have or want:
            highest = ci
        if have == want:
            continue
        repair = False
        if have == 0:
            rebuild = True  # nothing to fix in place: the block may not even exist
        elif have > want:
            repair = bool(fix & Mode.FIX_LEAKS)
        else:
            repair = bool(fix & Mode.FIX_ERRORS)
        word = "Repairing" if repair else "ERROR" if have < want else "Leaked"
        msgs.append(f"{word} cluster {ci} refcount={have} reference={want}")
        if repair:
            try:
                await rc.set(ci, min(want, rc.max_refcount))
            except OSError:
                pass
            else:
                stored.set(ci, min(want, rc.max_refcount))
                if want == 0:
                    # nothing uses it any more: give the space back (QCOW2_DISCARD_ALWAYS)
                    await _discard(image, ci)
                if have > want:
                    result.leaks_fixed += 1
                else:
                    result.corruptions_fixed += 1
                continue
        if have < want:
            result.corruptions += 1
        else:
            result.leaks += 1
    return rebuild, highest


async def _discard(image: Qcow2Image, ci: int) -> None:
    try:
        await image.file.discard(ci << image.geo.cluster_bits, image.geo.cluster_size)
    except OSError:
        pass  # only space is lost


# -------------------------------------------------------------------------------------------
# Rebuilding the refcount structure
# -------------------------------------------------------------------------------------------


def _pack_block(counts: list[int], start: int, order: int, cluster_size: int) -> bytearray:
    """One refcount block holding ``counts[start:]`` (as many as fit)."""
    per_block = cluster_size * 8 >> order
    values = counts[start : start + per_block]
    if order == 4:
        block = bytearray(struct.pack(f">{len(values)}H", *values))
        block.extend(bytes(cluster_size - len(block)))
        return block
    block = bytearray(cluster_size)
    for i, v in enumerate(values):
        if v:
            set_entry(block, i, order, v)
    return block


async def _write_refblocks(image: Qcow2Image, refs: _Imrt, first: int, end: int,
                           reftable: list[int]) -> bool:  # fmt: skip
    """Write the refcount blocks for every counted cluster in ``[first, end)``, allocating
    the blocks not yet in ``reftable`` (and growing it, in whole clusters) from ``refs``.
    Returns whether ``reftable`` grew (rebuild_refcounts_write_refblocks)."""
    rc = image.refcounts
    cs, cb, bb = rc.cluster_size, rc.cluster_bits, rc.block_bits
    first_free = 0
    grown = False
    ci = first
    while ci < end:
        if not refs.get(ci):
            ci += 1
            continue
        t = ci >> bb
        block_start = t << bb
        if t < len(reftable) and reftable[t]:
            block = reftable[t]  # allocated by an earlier pass
        else:
            # never in a block that is already written: its counts would go stale
            block, first_free = refs.alloc(1, max(first_free, block_start))
            end = max(end, (block >> cb) + 1)
            if t >= len(reftable):
                entries = -(-(t + 1) * 8 // cs) * cs // 8
                reftable.extend([0] * (entries - len(reftable)))
                grown = True
            reftable[t] = block
        await image.file.pwrite(block, _pack_block(refs.counts, block_start, rc.order, cs))
        ci = block_start + rc.entries_per_block
    return grown


async def _rebuild(image: Qcow2Image, refs: _Imrt) -> None:
    """Write a new refcount structure from ``refs`` into clusters no reference uses, then
    switch the header to it (rebuild_refcount_structure). The old table and blocks are
    left behind as leaks for the caller's second pass; until the header write, the image
    on disk still names the old structure, so a crash loses nothing."""
    rc = image.refcounts
    cs, cb = rc.cluster_size, rc.cluster_bits
    await rc.cache.flush()
    rc.cache.invalidate()
    reftable: list[int] = []
    await _write_refblocks(image, refs, 0, len(refs.counts), reftable)
    while True:
        # placing the table changes counts of blocks already written: write those again,
        # and if that needed a bigger table, place it anew (the old place stays a leak)
        clusters = -(-len(reftable) * 8 // cs)
        table_offset, _ = refs.alloc(clusters, 0)
        first = table_offset >> cb
        if not await _write_refblocks(image, refs, first, first + clusters, reftable):
            break
    await image.file.pwrite(table_offset, b"".join(struct.pack(">Q", e) for e in reftable))
    await image.file.flush()
    # refcount_table_offset and refcount_table_clusters are adjacent: one write switches
    await image.file.pwrite(48, struct.pack(">QI", table_offset, clusters))
    await image.file.flush()
    image.header = attrs.evolve(image.header, refcount_table_offset=table_offset,
                                refcount_table_clusters=clusters)  # fmt: skip
    rc.table, rc.table_offset, rc.table_clusters = reftable, table_offset, clusters
    rc.free_cluster_index = 0


# -------------------------------------------------------------------------------------------
# The whole check
# -------------------------------------------------------------------------------------------


async def check_image(image: Qcow2Image, result: BdrvCheckResult, fix: Mode) -> None:
    """Recompute every refcount from the metadata, compare, and repair what ``fix`` allows
    (qcow2_co_check_locked + qcow2_check_refcounts).

    Fills QEMU's figures (corruptions, leaks, fixed counts, allocation statistics, image
    end offset) and appends QEMU's per-problem lines to ``result.messages``.
    :raises BlockError: EIO when the refcount structure needs a rebuild that ``fix`` does
        not allow (after "ERROR need to rebuild refcount structures").
    """
    if image.read_only:
        fix = Mode.NONE
    async with image.lock:
        await image.flush_metadata()
        await _check_refcounts(image, result, fix)
        if fix and not result.check_errors and not result.corruptions:
            # the image is consistent now (qcow2_mark_clean, qcow2_mark_consistent)
            await image.set_incompat(Incompat.DIRTY | Incompat.CORRUPT, False)
            image.dirty = image.corrupt = False


async def _check_refcounts(image: Qcow2Image, result: BdrvCheckResult, fix: Mode) -> None:
    rc = image.refcounts
    geo = image.geo
    msgs = result.messages
    refs = _Imrt(image, await image.file.getlength())
    result.total_clusters = geo.size_to_clusters(image.header.size)
    rebuild = await _calculate(image, refs, result, fix)
    before_compare = _figures(result)
    rebuild, highest = await _compare(image, refs, result, Mode.NONE, rebuild)
    if rebuild and fix & Mode.FIX_ERRORS:
        old = _figures(result)
        msgs.append("Rebuilding refcount structure")
        try:
            await _rebuild(image, refs)
        except OSError:
            result.check_errors += 1
            raise
        result.corruptions = result.leaks = 0
        # the references again, now to the new structure; the allocation figures of the
        # first pass stand (QEMU counts them twice here, but nobody sees that)
        stats = {k: getattr(result, k) for k in _FIGURES[5:]}
        refs.reset()
        refs.file_len = await image.file.getlength()  # the new structure may extend the file
        rebuild = await _calculate(image, refs, result, Mode.NONE)
        _restore(result, stats)
        fresh_leaks = 0
        if fix & Mode.FIX_LEAKS:
            # the old table and blocks are leaked now: free them; leaks that remain were
            # made by the rebuild itself
            scratch = BdrvCheckResult(messages=msgs)
            rebuild, highest = await _compare(image, refs, scratch, Mode.FIX_LEAKS, rebuild)
            if rebuild:
                msgs.append("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = scratch.leaks
        if result.corruptions < old["corruptions"]:
            result.corruptions_fixed += old["corruptions"] - result.corruptions
        if result.leaks < old["leaks"]:
            result.leaks_fixed += old["leaks"] - result.leaks
        result.leaks += fresh_leaks
    elif fix:
        if rebuild:
            msgs.append("ERROR need to rebuild refcount structures")
            result.check_errors += 1
            raise BlockError(errno.EIO, "the refcount structure must be rebuilt; that needs "
                             "-r all", image.file.name)  # fmt: skip
        if result.leaks or result.corruptions:
            _restore(result, before_compare)
            rebuild, highest = await _compare(image, refs, result, fix, rebuild)
    await rc.flush()
    await _check_copied(image, result, fix)
    result.image_end_offset = (highest + 1) * geo.cluster_size
    if fix:
        await image.flush_metadata()


async def _check_copied(image: Qcow2Image, result: BdrvCheckResult, fix: Mode) -> None:
    """COPIED flags must match refcount == 1 (check_oflag_copied). With only FIX_LEAKS the
    flags are repaired when the refcounts are known to be right by now."""
    geo = image.geo
    if fix & Mode.FIX_ERRORS:
        repair = True
    elif fix & Mode.FIX_LEAKS:
        repair = not (result.check_errors or result.corruptions or result.leaks)
    else:
        repair = False
    word = "Repairing" if repair else "ERROR"
    stored = _Stored(image, await image.file.getlength())
    for i, e in enumerate(image.l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        try:
            refcount = await stored.get(off >> geo.cluster_bits)
        except OSError:
            continue  # reported by the comparison already
        if (refcount == 1) != bool(e & OFLAG_COPIED):
            result.corruptions += 1
            result.messages.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} "
                                   f"l1_entry={e:x} refcount={refcount}")  # fmt: skip
            if repair:
                image.l1[i] = off | (OFLAG_COPIED if refcount == 1 else 0)
                await image._write_l1_entry(i)
                result.corruptions -= 1
                result.corruptions_fixed += 1
        if off & (geo.cluster_size - 1):
            continue
        l2 = await image.l2_cache.get(off)
        dirty = 0
        for idx in range(geo.l2_size):
            entry, bitmap = image._entry(l2, idx)
            if entry & OFLAG_COMPRESSED or cluster_type(entry, geo) not in (
                    ClusterType.NORMAL, ClusterType.ZERO_ALLOC):  # fmt: skip
                continue
            if image.has_data_file:
                refcount = 1
            else:
                try:
                    host = entry & L2E_OFFSET_MASK
                    refcount = await stored.get(host >> geo.cluster_bits)
                except OSError:
                    continue
            if (refcount == 1) != bool(entry & OFLAG_COPIED):
                result.corruptions += 1
                result.messages.append(f"{word} OFLAG_COPIED data cluster: "
                                       f"l2_entry={entry:x} refcount={refcount}")  # fmt: skip
                if repair:
                    new = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
                    image._set_entry(l2, idx, new, bitmap)
                    dirty += 1
        if dirty:
            image.l2_cache.mark_dirty(off)
            result.corruptions -= dirty
            result.corruptions_fixed += dirty

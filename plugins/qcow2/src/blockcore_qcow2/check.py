"""Consistency check and repair (mirrors qcow2_check_refcounts and its helpers in QEMU's
qcow2-refcount.c, including rebuild_refcount_structure). The references are counted in
:mod:`.refwalk`; this module compares them with the refcounts on disk and repairs."""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

import attrs

from blockcore.errors import BlockError
from blockcore.types import BdrvCheckMode as Mode
from blockcore.types import BdrvCheckResult

from . import snaptable
from .cluster import ClusterType, cluster_type
from .format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    Incompat,
)
from .refcount import set_entry
from .refwalk import Imrt, calculate_refcounts

if TYPE_CHECKING:
    from .image import Qcow2Image
    from .snaptable import SnapshotTable

#: BdrvCheckResult fields that QEMU saves and restores as a whole (``*res = saved``).
_FIGURES = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
            "allocated_clusters", "fragmented_clusters", "compressed_clusters")  # fmt: skip


def _figures(result: BdrvCheckResult) -> dict[str, int]:
    return {k: getattr(result, k) for k in _FIGURES}


def _restore(result: BdrvCheckResult, figures: dict[str, int]) -> None:
    for k, v in figures.items():
        setattr(result, k, v)


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


async def _compare(image: Qcow2Image, refs: Imrt, result: BdrvCheckResult, fix: Mode,
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


async def _write_refblocks(image: Qcow2Image, refs: Imrt, first: int, end: int,
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


async def _rebuild(image: Qcow2Image, refs: Imrt) -> None:
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
        # the snapshot table first, with figures of its own (QEMU's snapshot_res), added
        # to the refcount check's at the end, or at once when it fails
        snapshot_result = BdrvCheckResult(messages=result.messages)
        try:
            table = await snaptable.check_read(image, snapshot_result, fix)
            await _check_refcounts(image, result, fix, table)
            await snaptable.check_fix(image, table, snapshot_result, fix)
        finally:
            _add(result, snapshot_result)
        if fix and not result.check_errors and not result.corruptions:
            # the image is consistent now (qcow2_mark_clean, qcow2_mark_consistent)
            await image.set_incompat(Incompat.DIRTY | Incompat.CORRUPT, False)
            image.dirty = image.corrupt = False


def _add(result: BdrvCheckResult, other: BdrvCheckResult) -> None:
    """qcow2_add_check_result without the allocation figures."""
    for k in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
        setattr(result, k, getattr(result, k) + getattr(other, k))


async def _check_refcounts(image: Qcow2Image, result: BdrvCheckResult, fix: Mode,
                           snapshots: SnapshotTable) -> None:  # fmt: skip
    rc = image.refcounts
    geo = image.geo
    msgs = result.messages
    refs = Imrt(image, await image.file.getlength())
    result.total_clusters = geo.size_to_clusters(image.header.size)
    rebuild = await calculate_refcounts(image, refs, result, snapshots, fix)
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
        rebuild = await calculate_refcounts(image, refs, result, snapshots, Mode.NONE)
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
    await _check_copied(image, result, fix, snapshots)
    result.image_end_offset = (highest + 1) * geo.cluster_size
    if fix:
        await image.flush_metadata()


async def _check_copied(image: Qcow2Image, result: BdrvCheckResult, fix: Mode,
                        snapshots: SnapshotTable) -> None:  # fmt: skip
    """COPIED flags must match refcount == 1 (check_oflag_copied). With only FIX_LEAKS the
    flags are repaired when the refcounts are known to be right by now. Repairs pass
    QEMU's overlap check first (a broken snapshot entry can claim the active tables)."""
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
                start = i - i % 64  # qcow2_write_l1_entry writes the entry's sector
                what = snaptable.overlap(image, snapshots, image.header.l1_table_offset +
                                         8 * start, 8 * min(64, len(image.l1) - start),
                                         "active L1 table")  # fmt: skip
                if what is not None:
                    result.check_errors += 1
                    raise await snaptable.signal_corruption(image, result.messages, what)
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
            what = snaptable.overlap(image, snapshots, off, geo.cluster_size,
                                     "active L2 table")  # fmt: skip
            if what is not None:
                image.l2_cache.discard(off)  # the repaired copy is never written
                exc = await snaptable.signal_corruption(image, result.messages, what)
                result.messages.append("ERROR: Could not write L2 table; metadata overlap "
                                       "check failed: Input/output error")  # fmt: skip
                result.check_errors += 1
                raise exc
            image.l2_cache.mark_dirty(off)
            result.corruptions -= dirty
            result.corruptions_fixed += dirty

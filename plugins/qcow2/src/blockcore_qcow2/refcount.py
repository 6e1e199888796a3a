"""Refcount table and blocks: lookup, update, cluster and byte allocation, table growth."""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable

from blockcore.errors import BlockError, ImageCorruptError

from .cache import ImageFile, TableCache
from .cluster import VersionedList
from .format import MAX_REFTABLE_SIZE, REFT_OFFSET_MASK, refcount_metadata_counts


def get_entry(block: bytearray, index: int, order: int) -> int:
    """Refcount ``index`` of a refcount block with ``1 << order``-bit entries."""
    if order >= 3:
        width = 1 << (order - 3)
        return int.from_bytes(block[index * width : (index + 1) * width], "big")
    bits = 1 << order
    per_byte = 8 // bits
    byte = block[index // per_byte]
    return (byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)


def set_entry(block: bytearray, index: int, order: int, value: int) -> None:
    if order >= 3:
        width = 1 << (order - 3)
        block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return
    bits = 1 << order
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    pos = index // per_byte
    block[pos] = (block[pos] & ~mask) | (value << shift)


class Refcounts:
    """The refcount structure of one image (QEMU's qcow2-refcount.c, simplified).

    ``table`` is the in-memory refcount table (block offsets, reserved bits dropped); the
    on-disk copy is updated entry by entry, always after the block it points to is written.
    """

    def __init__(self, file: ImageFile, cluster_bits: int, order: int, table_offset: int,
                 table: list[int], table_clusters: int, cache_capacity: int,
                 set_table: Callable[[int, int], Awaitable[None]]) -> None:  # fmt: skip
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = order
        self.max_refcount = (1 << (1 << order)) - 1
        self.block_bits = cluster_bits + 3 - order
        self.entries_per_block = 1 << self.block_bits
        self.table_offset = table_offset
        self.table = table  # a VersionedList (see the property)
        self.table_clusters = table_clusters
        self.cache = TableCache(file, self.cluster_size, cache_capacity, "refcount",
                                "refblock_load", "refblock_update_part")  # fmt: skip
        self.free_cluster_index = 0
        self.free_byte_offset = 0
        #: Called with (offset, clusters) after the table moved; it rewrites the header.
        self.set_table = set_table

    @property
    def table(self) -> VersionedList:
        """The in-memory refcount table; assigning any list stores a :class:`VersionedList`."""
        return self._table

    @table.setter
    def table(self, entries: list[int]) -> None:
        self._table = entries if isinstance(entries, VersionedList) else VersionedList(entries)

    @classmethod
    async def load(cls, file: ImageFile, cluster_bits: int, order: int, offset: int,
                   clusters: int, cache_capacity: int,
                   set_table: Callable[[int, int], Awaitable[None]]) -> Refcounts:  # fmt: skip
        nbytes = clusters << cluster_bits
        if nbytes > MAX_REFTABLE_SIZE:
            raise BlockError(errno.EFBIG, f"refcount table of {nbytes} bytes too large", file.name)
        buf = bytearray(nbytes)
        await file.event("reftable_load")
        await file.pread(offset, memoryview(buf))
        # Like QEMU, accept any entry here: reserved bits are ignored, a misaligned block
        # is refused when used, and ``check -r all`` reports and rebuilds both.
        table = [e & REFT_OFFSET_MASK for e in struct.unpack(f">{nbytes // 8}Q", buf)]
        return cls(file, cluster_bits, order, offset, table, clusters, cache_capacity, set_table)

    # ------------------------------------------------------------------ lookup

    def _aligned(self, t: int) -> int:
        """The offset of refcount block ``t``, refused when misaligned (as qcow2_get_refcount)."""
        off = self.table[t]
        if off & (self.cluster_size - 1):
            raise ImageCorruptError(f"refcount block offset {off:#x} of refcount table entry "
                                    f"{t} is not cluster aligned", self.file.name)  # fmt: skip
        return off

    async def get(self, cluster_index: int) -> int:
        t = cluster_index >> self.block_bits
        if t >= len(self.table) or not self.table[t]:
            return 0
        block = await self.cache.get(self._aligned(t))
        return get_entry(block, cluster_index & (self.entries_per_block - 1), self.order)

    async def get_many(self, start: int, count: int) -> list[int]:
        """Refcounts of clusters ``start .. start+count-1``."""
        out = []
        for ci in range(start, start + count):
            out.append(await self.get(ci))
        return out

    # ------------------------------------------------------------------ update

    async def _block_for(self, cluster_index: int) -> tuple[int, bytearray]:
        t = cluster_index >> self.block_bits
        if t >= len(self.table) or not self.table[t]:
            await self._reserve(0, {t})
        off = self._aligned(t)
        return off, await self.cache.get(off)

    async def set(self, cluster_index: int, value: int) -> None:
        """Set a refcount (dirtying its block; the cache writes it back)."""
        if not 0 <= value <= self.max_refcount:
            raise ImageCorruptError(
                f"refcount {value} of cluster {cluster_index} out of range "
                f"0..{self.max_refcount}", self.file.name
            )  # fmt: skip
        off, block = await self._block_for(cluster_index)
        set_entry(block, cluster_index & (self.entries_per_block - 1), self.order, value)
        self.cache.mark_dirty(off)
        if value == 0 and cluster_index < self.free_cluster_index:
            self.free_cluster_index = cluster_index

    async def update(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of every cluster touched by ``[offset, +length)``."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for ci in range(first, last + 1):
            value = await self.get(ci) + addend
            if value < 0 or value > self.max_refcount:
                raise ImageCorruptError(
                    f"refcount of cluster {ci} would become {value} (range 0.."
                    f"{self.max_refcount})", self.file.name
                )  # fmt: skip
            await self.set(ci, value)

    # ------------------------------------------------------------------ allocation

    async def alloc_clusters(self, count: int) -> int:
        """Find ``count`` contiguous free clusters, give them refcount 1, return the offset."""
        await self.file.event("cluster_alloc")
        start = await self._reserve(count, set())
        for ci in range(start, start + count):
            await self.set(ci, 1)
        self.free_cluster_index = start + count
        return start << self.cluster_bits

    async def _reserve(self, count: int, ranges_wanted: set[int]) -> int:
        """First cluster of a free run of ``count`` clusters whose refcount blocks all
        exist. Missing blocks (and those in ``ranges_wanted``) are created first, in the
        free clusters directly in front of the run (QEMU retries with -EAGAIN instead)."""
        pos = self.free_cluster_index
        bb = self.block_bits
        while True:
            start = await self._find_free(pos, count)
            k = 0
            while True:
                ranges = {t for t in ranges_wanted if t >= len(self.table) or not self.table[t]}
                last = start + k + count - 1
                for t in range(start >> bb, (max(last, start) >> bb) + 1):
                    if t >= len(self.table) or not self.table[t]:
                        ranges.add(t)
                if len(ranges) == k:
                    break
                k = len(ranges)
            if k == 0:
                return start
            if max(ranges) >= len(self.table):
                await self._grow_table(max(ranges) + 1)
                pos = self.free_cluster_index
                continue
            again = await self._find_free(start, count + k)
            if again != start:
                pos = again
                continue
            await self._create_blocks(sorted(ranges), start)
            return start + k

    async def _create_blocks(self, ranges: list[int], at: int) -> None:
        """Write new refcount blocks for ``ranges`` into clusters ``at, at+1, ...``, then
        hook them into the table (blocks reach the file before the entries naming them)."""
        await self.file.event("refblock_alloc")
        bb, mask = self.block_bits, self.entries_per_block - 1
        new = {t: bytearray(self.cluster_size) for t in ranges}
        for i in range(len(ranges)):
            ci = at + i
            t = ci >> bb
            if t in new:
                set_entry(new[t], ci & mask, self.order, 1)
            else:
                off = self.table[t]
                block = await self.cache.get(off)
                set_entry(block, ci & mask, self.order, get_entry(block, ci & mask, self.order) + 1)
                self.cache.mark_dirty(off)
        await self.cache.flush()
        await self.file.event("refblock_alloc_write")
        for i, t in enumerate(ranges):
            await self.file.pwrite((at + i) << self.cluster_bits, new[t])
        await self.file.flush()
        await self.file.event("refblock_alloc_hookup")
        for i, t in enumerate(ranges):
            off = (at + i) << self.cluster_bits
            # the entry reaches the file before the block counts in memory: if this write
            # fails, nothing is counted into a block the table on disk does not name
            await self.file.pwrite(self.table_offset + 8 * t, struct.pack(">Q", off))
            self.table[t] = off
            cached = await self.cache.get(off, load=False)
            cached[:] = new[t]
        if self.free_cluster_index >= at:
            self.free_cluster_index = max(self.free_cluster_index, at + len(ranges))

    async def _find_free(self, start: int, count: int) -> int:
        run_start, run = start, 0
        ci = start
        while run < count:
            t = ci >> self.block_bits
            if t >= len(self.table) or not self.table[t]:
                # A whole missing block: every cluster it covers is free.
                block_end = (t + 1) << self.block_bits
                run += block_end - ci
                ci = block_end
                continue
            if await self.get(ci) == 0:
                run += 1
            else:
                run, run_start = 0, ci + 1
            ci += 1
        return run_start

    async def alloc_bytes(self, size: int) -> int:
        """Allocate ``size`` bytes (at most a cluster) for compressed data, packing them
        after the previous compressed allocation (mirrors qcow2_alloc_bytes)."""
        await self.file.event("cluster_alloc_bytes")
        off = self.free_byte_offset
        cs = self.cluster_size
        if off and (off & (cs - 1)) and (off & (cs - 1)) + size <= cs:
            ci = off >> self.cluster_bits
            if await self.get(ci) > 0 and await self.get(ci) < self.max_refcount:
                await self.set(ci, await self.get(ci) + 1)
                self.free_byte_offset = off + size
                return off
        need = 1 if size <= cs else 2
        new = await self.alloc_clusters(need)
        if off and (off & (cs - 1)) and new == (off & ~(cs - 1)) + cs and \
                (off & (cs - 1)) + size > cs:  # fmt: skip
            # The new cluster directly follows the open one: straddle the boundary.
            prev = off >> self.cluster_bits
            await self.set(prev, await self.get(prev) + 1)
            if need == 2:
                await self.update(new + cs, cs, -1)
            self.free_byte_offset = off + size
            return off
        if need == 2:
            await self.update(new + cs, cs, -1)
        self.free_byte_offset = new + size
        return new

    async def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one at the end of the covered range, with
        new self-describing refcount blocks for the area it occupies."""
        await self.file.event("reftable_grow")
        epb, cs = self.entries_per_block, self.cluster_size
        new_entries = max(min_entries, len(self.table) * 3 // 2 + 1)
        first_ci = len(self.table) << self.block_bits
        nb_blocks = 1
        while True:
            need_entries = max(new_entries, (first_ci >> self.block_bits) + nb_blocks + 1)
            table_clusters = -(-need_entries * 8 // cs)
            area = nb_blocks + table_clusters
            blocks_needed = -(-area // epb)
            if blocks_needed <= nb_blocks:
                break
            nb_blocks = blocks_needed
        new_entries = table_clusters * cs // 8
        if new_entries * 8 > MAX_REFTABLE_SIZE:
            raise BlockError(errno.EFBIG, "refcount table would exceed 8 MiB", self.file.name)
        t0 = first_ci >> self.block_bits
        new_table = self.table + [0] * (new_entries - len(self.table))
        await self.file.event("refblock_alloc_write_blocks")
        for i in range(nb_blocks):
            block = bytearray(cs)
            for j in range(epb):
                ci = ((t0 + i) << self.block_bits) + j
                if first_ci <= ci < first_ci + nb_blocks + table_clusters:
                    set_entry(block, j, self.order, 1)
            boff = (first_ci + i) << self.cluster_bits
            await self.file.pwrite(boff, block)
            new_table[t0 + i] = boff
        toff = (first_ci + nb_blocks) << self.cluster_bits
        await self.file.event("refblock_alloc_write_table")
        await self.file.pwrite(toff, b"".join(struct.pack(">Q", e) for e in new_table))
        await self.file.flush()
        await self.file.event("refblock_alloc_switch_table")
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table, self.table_offset, self.table_clusters = new_table, toff, table_clusters
        await self.set_table(toff, table_clusters)
        await self.update(old_off, old_clusters << self.cluster_bits, -1)

    async def get_last_cluster(self, file_size: int) -> int:
        """Index of the last cluster below ``file_size`` in use, -1 if none
        (qcow2_get_last_cluster)."""
        for ci in range(-(-file_size >> self.cluster_bits) - 1, -1, -1):
            if await self.get(ci):
                return ci
        return -1

    async def alloc_clusters_at(self, offset: int, count: int) -> int:
        """Give the free clusters from ``offset`` on (at most ``count``, up to the first
        used one) refcount 1; their number (qcow2_alloc_clusters_at)."""
        first = offset >> self.cluster_bits
        n = 0
        while n < count and await self.get(first + n) == 0:
            n += 1
        for ci in range(first, first + n):
            await self.set(ci, 1)
        return n

    async def refcount_area(self, start: int, additional: int, exact: bool) -> int:
        """Build refcount structures at ``start`` (the end of the used file) that cover
        themselves and ``additional`` clusters after them: the missing refcount blocks,
        then a new refcount table, switched in with one header write; the old table is
        freed. Returns where the ``additional`` clusters go (QEMU's qcow2_refcount_area,
        used to preallocate without refcount updates in the middle of the data).
        """
        cs, epb = self.cluster_size, self.entries_per_block
        blocks, _ = refcount_metadata_counts(start // cs + additional, cs, self.order,
                                             generous=not exact)  # fmt: skip
        if blocks * 8 > MAX_REFTABLE_SIZE:
            raise BlockError(errno.EFBIG, "refcount table would exceed 8 MiB", self.file.name)
        first_t = (start // cs) >> self.block_bits
        entries = blocks if exact else blocks + -(-blocks // 2)
        per_cluster = cs // 8
        entries = -(-entries // per_cluster) * per_cluster
        table_clusters = entries // per_cluster
        if entries * 8 > MAX_REFTABLE_SIZE:
            raise BlockError(errno.EFBIG, "refcount table would exceed 8 MiB", self.file.name)
        used = max((i + 1 for i, e in enumerate(self.table) if e), default=1)
        # entries past the area are empty by the caller's guarantee: growing keeps all
        # the used ones, shrinking (improbable) drops only empty ones
        new_table = list(self.table[: min(used, entries)]) + [0] * (entries - min(used, entries))
        missing = sum(1 for t in range(first_t, blocks) if not new_table[t])
        table_off = start + missing * cs
        end = table_off + table_clusters * cs
        block_off = start
        for t in range(first_t, blocks):
            if new_table[t]:
                off = self._aligned(t)  # an entry kept from the current table
                block = await self.cache.get(off)
            else:
                off = block_off
                block = await self.cache.get(off, load=False)
                block[:] = bytes(cs)
                new_table[t] = off
                block_off += cs
                self.cache.mark_dirty(off)
            covered = t * epb * cs
            if covered < end:
                self.cache.mark_dirty(off)
                # the new blocks and table count themselves
                for j in range(max(0, (start - covered) // cs), min((end - covered) // cs, epb)):
                    if get_entry(block, j, self.order):
                        raise ImageCorruptError(f"cluster {t * epb + j} past the end of the "
                                                "used file is in use", self.file.name)  # fmt: skip
                    set_entry(block, j, self.order, 1)
        await self.file.event("refblock_alloc_write_blocks")
        await self.cache.flush()
        await self.file.event("refblock_alloc_write_table")
        await self.file.pwrite(table_off, struct.pack(f">{entries}Q", *new_table))
        await self.file.flush()
        await self.file.event("refblock_alloc_switch_table")
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table, self.table_offset, self.table_clusters = new_table, table_off, table_clusters
        await self.set_table(table_off, table_clusters)
        await self.update(old_off, old_clusters << self.cluster_bits, -1)
        return end

    async def flush(self) -> None:
        await self.cache.flush()

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
            await self._alloc_block(cluster_index)
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
        """Find ``count`` contiguous free clusters, give them refcount 1, return the offset
        (qcow2_alloc_clusters). A refcount block the run lacks is created first, behind the
        run, and the search starts over (QEMU's -EAGAIN from alloc_refcount_block)."""
        await self.file.event("cluster_alloc")
        while True:
            start = await self._alloc_noref(count)
            missing = self._first_uncovered(start, count)
            if missing is None:
                break
            await self._alloc_block(missing)
            self.free_cluster_index = min(self.free_cluster_index, start)
        for ci in range(start, start + count):
            await self.set(ci, 1)
        return start << self.cluster_bits

    def _first_uncovered(self, start: int, count: int) -> int | None:
        """The first cluster of ``start .. start+count-1`` without a refcount block."""
        bb = self.block_bits
        for t in range(start >> bb, ((start + count - 1) >> bb) + 1):
            if t >= len(self.table) or not self.table[t]:
                return max(start, t << bb)
        return None

    async def _alloc_noref(self, count: int) -> int:
        """The first run of ``count`` free clusters from ``free_cluster_index``, which moves
        past it; no refcount changes (alloc_clusters_noref)."""
        start = await self._find_free(self.free_cluster_index, count)
        self.free_cluster_index = start + count
        return start

    async def _alloc_block(self, cluster_index: int) -> None:
        """Create the refcount block covering ``cluster_index`` (alloc_refcount_block): in the
        first free cluster from ``free_cluster_index``, counted in itself or (its own range
        lacking a block too) in a block made for it first; written, then hooked into the
        table, or into a bigger table built behind both (qcow2_refcount_area)."""
        await self.file.event("refblock_alloc")
        cs, bb = self.cluster_size, self.block_bits
        t = cluster_index >> bb
        new = await self._alloc_noref(1)
        if new == 0:
            raise ImageCorruptError("refusing to place a refcount block at offset 0",
                                    self.file.name)  # fmt: skip
        off = new << self.cluster_bits
        if new >> bb != t:
            await self.update(off, cs, 1)
            await self.cache.flush()
        block = await self.cache.get(off, load=False)
        block[:] = bytes(cs)
        if new >> bb == t:
            set_entry(block, new & (self.entries_per_block - 1), self.order, 1)
        await self.file.event("refblock_alloc_write")
        self.cache.mark_dirty(off)
        await self.cache.flush()
        await self.file.flush()
        if t < len(self.table):
            await self.file.event("refblock_alloc_hookup")
            await self.file.pwrite(self.table_offset + 8 * t, struct.pack(">Q", off))
            await self.file.flush()
            self.table[t] = off
            return
        await self.file.event("reftable_grow")
        blocks_used = -(-(max(cluster_index, new) + 1) // self.entries_per_block)
        await self.refcount_area(blocks_used * self.entries_per_block * cs, 0, exact=False,
                                 new_block=(t, off))  # fmt: skip

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
        while True:
            n = 0
            while n < count and await self.get(first + n) == 0:
                n += 1
            missing = self._first_uncovered(first, n) if n else None
            if missing is None:
                break
            await self._alloc_block(missing)  # then count again: it may have taken one
            self.free_cluster_index = min(self.free_cluster_index, first)
        for ci in range(first, first + n):
            await self.set(ci, 1)
        return n

    async def refcount_area(self, start: int, additional: int, exact: bool,
                            new_block: tuple[int, int] | None = None) -> int:  # fmt: skip
        """Build refcount structures at ``start`` (the end of the used file) that cover
        themselves and ``additional`` clusters after them: the missing refcount blocks,
        then a new refcount table, switched in with one header write; the old table is
        freed. Returns where the ``additional`` clusters go (QEMU's qcow2_refcount_area,
        used to preallocate without refcount updates in the middle of the data).
        ``new_block``: (table index, offset) of a block written already, below ``start``,
        that the new table names too (alloc_refcount_block's).
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
        if new_block is not None:
            new_table[new_block[0]] = new_block[1]
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

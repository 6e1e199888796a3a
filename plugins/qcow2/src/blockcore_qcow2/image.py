"""The qcow2 engine: guest offset mapping, reads, allocating writes (zero writes, discard
and resize are in :mod:`.clusterops`, compressed clusters in :mod:`.compress`).

Independent of the node graph: it talks to its storage through :class:`cache.ImageFile`
adapters, so the driver hooks stay thin and tests can run it on an in-memory file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import zstandard

from blockcore.errors import BlockError, ImageCorruptError

from . import alloc, clusterops, compress
from .cache import ImageFile, TableCache
from .cluster import ClusterType as CT
from .cluster import Geometry, SubclusterType, VersionedList, cluster_type, subcluster_run
from .cluster import SubclusterType as ST
from .format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_L1_SIZE,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Compat,
    Incompat,
    QCowHeader,
    decode_compressed,
)
from .refcount import Refcounts

_Q = struct.Struct(">Q")

#: Reads the backing file: (guest offset, buffer) -> None; zero-filled past its end.
BackingReader = Callable[[int, memoryview], Awaitable[None]]


@attrs.define(eq=False)
class Run:
    """A stretch of guest bytes with one mapping type (qcow2_get_host_offset's answer)."""

    type: SubclusterType
    length: int
    host: int = 0
    """Host offset of the first byte (NORMAL/ZERO_ALLOC/UNALLOCATED_ALLOC); for COMPRESSED
    the raw L2 entry."""


_L2_TABLE = "an active L2 table"
_REFBLOCK = "a refcount block"


class Qcow2Image:
    """One open qcow2 image. Metadata is guarded by ``lock`` (QEMU's s->lock)."""

    def __init__(self, file: ImageFile, header: QCowHeader, l1: list[int],
                 refcounts: Refcounts, *, data_file: ImageFile | None = None,
                 read_only: bool = True, l2_cache_tables: int = 32,
                 lazy_refcounts: bool = False, discard_request: bool = False,
                 discard_other: bool = False) -> None:  # fmt: skip
        self.file = file
        self.data = data_file or file
        self.has_data_file = data_file is not None
        self.header = header
        self.geo = Geometry.from_header(header, self.has_data_file)
        self.l1 = l1  # a VersionedList (see the property)
        self._meta: dict[int, str] = {}
        self._meta_key: tuple[int, ...] = ()
        self.refcounts = refcounts
        self.read_only = read_only
        cs = self.geo.cluster_size
        self.l2_cache = TableCache(file, cs, l2_cache_tables, "l2", "l2_load", "l2_update")
        self.lock = asyncio.Lock()
        #: allocating writes between cluster allocation and L2 update (see :mod:`.alloc`)
        self.inflight: list[alloc.InFlight] = []
        self.backing: BackingReader | None = None
        #: whether the node has a backing file now (the driver's answer follows graph
        #: changes; ``backing`` alone is always set under the driver and zero-fills)
        self.has_backing: Callable[[], bool] = lambda: self.backing is not None
        #: whether a guest range cheaply proves to read as zeros, backing chain included
        #: (the driver sets bdrv_co_is_zero_fast); None: this image's mapping decides
        self.is_zero_fast: Callable[[int, int], Awaitable[bool]] | None = None
        #: whether guest ``[offset, offset+length)`` reads as zeros, asked without the lock
        #: (QEMU's is_zero: the driver asks the node's block status, backing chain
        #: included; alone the engine knows only its own zero and unallocated clusters)
        self.is_zero: Callable[[int, int], Awaitable[bool]] = (
            lambda offset, length: clusterops.reads_as_zero(self, offset, length))
        self.lazy_refcounts = lazy_refcounts
        self.discard_request = discard_request
        self.discard_other = discard_other
        self.corrupt = bool(header.incompatible_features & Incompat.CORRUPT)
        self.dirty = bool(header.incompatible_features & Incompat.DIRTY)
        self._zstd_d: zstandard.ZstdDecompressor | None = None
        # Plain ints for the lock-free fast paths (Geometry's properties cost a call each).
        g = self.geo
        self._cb = g.cluster_bits
        self._l1_shift = g.cluster_bits + g.l2_bits
        self._l2_mask = g.l2_size - 1
        self._fast = not g.extended_l2 and not self.has_data_file
        #: bits a valid NORMAL entry never has: reserved, zero, compressed, sub-cluster offset
        self._not_normal = 0xFFFFFFFFFFFFFFFF & ~(OFLAG_COPIED | L2E_OFFSET_MASK) | (cs - 1)
        self._l2_tables = self.l2_cache.tables

    @property
    def l1(self) -> VersionedList:
        """The active L1 table; assigning any list stores a :class:`VersionedList`."""
        return self._l1

    @l1.setter
    def l1(self, entries: list[int]) -> None:
        self._l1 = entries if isinstance(entries, VersionedList) else VersionedList(entries)

    # ================================================================== open / header

    @classmethod
    async def open(cls, file: ImageFile, *, data_file: ImageFile | None = None,
                   read_only: bool = True, l2_cache_tables: int = 32,
                   refcount_cache_tables: int = 8, lazy_refcounts: bool | None = None,
                   discard_request: bool = False, discard_other: bool = False,
                   header: QCowHeader | None = None) -> Qcow2Image:  # fmt: skip
        if header is None:
            header = await read_header(file)
        if header.l1_size * 8 > MAX_L1_SIZE:
            raise BlockError(errno.EFBIG, f"L1 table of {header.l1_size} entries too large",
                             file.name)  # fmt: skip
        buf = bytearray(header.l1_size * 8)
        if buf:
            await file.pread(header.l1_table_offset, memoryview(buf))
        l1 = list(struct.unpack(f">{header.l1_size}Q", buf))
        image: Qcow2Image | None = None

        async def set_table(offset: int, clusters: int) -> None:
            assert image is not None
            await image.write_header(attrs.evolve(
                image.header, refcount_table_offset=offset, refcount_table_clusters=clusters))

        refcounts = await Refcounts.load(
            file, header.cluster_bits, header.refcount_order, header.refcount_table_offset,
            header.refcount_table_clusters, refcount_cache_tables, set_table,
        )
        if lazy_refcounts is None:
            lazy_refcounts = bool(header.compatible_features & Compat.LAZY_REFCOUNTS)
        image = cls(file, header, l1, refcounts, data_file=data_file, read_only=read_only,
                    l2_cache_tables=l2_cache_tables, lazy_refcounts=lazy_refcounts,
                    discard_request=discard_request, discard_other=discard_other)  # fmt: skip
        return image

    async def write_header(self, header: QCowHeader) -> None:
        """Write cluster 0's header part and make it current; a header shorter than the one
        before (an extension dropped) is zero-padded over the old one's bytes, as QEMU's
        whole-cluster header write leaves them."""
        data = header.pack()
        old_len = len(self.header.pack())
        if old_len > len(data):
            data += bytes(old_len - len(data))
        await self.file.pwrite(0, data)
        await self.file.flush()
        self.header = header

    async def set_incompat(self, bit: int, on: bool) -> None:
        feats = self.header.incompatible_features
        new = feats | bit if on else feats & ~bit
        if new != feats:
            await self.write_header(attrs.evolve(self.header, incompatible_features=new))

    async def mark_corrupt(self, why: str) -> ImageCorruptError:
        """Set the corrupt bit (when writable) and return the error to raise."""
        if not self.read_only and not self.corrupt:
            self.corrupt = True
            try:
                await self.set_incompat(Incompat.CORRUPT, True)
            except OSError:
                pass
        return ImageCorruptError(f"{why}; further writes are refused (image marked corrupt)",
                                 self.file.name)  # fmt: skip

    async def flush_metadata(self) -> None:
        """Write back every cached table, refcounts before the L2 tables that need them."""
        if self.lazy_refcounts and self.dirty:
            await self.l2_cache.flush()
            return
        await self.l2_cache.flush()
        await self.refcounts.flush()

    async def close(self) -> None:
        """Clean shutdown: write everything and clear the dirty bit (lazy refcounts)."""
        if self.read_only:
            return
        await self.mark_clean()

    async def mark_clean(self) -> None:
        """Write every cached table, refcount blocks included, then clear the dirty bit
        (qcow2_mark_clean): the refcounts on disk are right again."""
        await self.l2_cache.flush()
        await self.refcounts.flush()
        if self.dirty:
            await self.file.flush()
            await self.set_incompat(Incompat.DIRTY, False)
            self.dirty = False

    # ================================================================== mapping

    def _entry(self, l2: bytearray, index: int) -> tuple[int, int]:
        pos = index * self.geo.l2_entry_size
        if self.geo.extended_l2:
            entry, bitmap = struct.unpack_from(">QQ", l2, pos)
            return entry, bitmap
        return struct.unpack_from(">Q", l2, pos)[0], 0

    def _set_entry(self, l2: bytearray, index: int, entry: int, bitmap: int = 0) -> None:
        pos = index * self.geo.l2_entry_size
        if self.geo.extended_l2:
            struct.pack_into(">QQ", l2, pos, entry, bitmap)
        else:
            struct.pack_into(">Q", l2, pos, entry)

    async def _l2_table(self, l1_index: int) -> tuple[int, bytearray | None]:
        if l1_index >= len(self.l1):
            return 0, None
        e = self.l1[l1_index]
        if e & L1E_RESERVED_MASK:
            raise await self.mark_corrupt(f"L1 entry {l1_index} has reserved bits set ({e:#x})")
        off = e & L1E_OFFSET_MASK
        if not off:
            return 0, None
        if off & (self.geo.cluster_size - 1) or off < self.geo.cluster_size:
            raise await self.mark_corrupt(f"L2 table offset {off:#x} invalid (L1 entry {l1_index})")
        if off not in self.l2_cache.tables:
            what = self.overlap(off, self.geo.cluster_size, l2=False)
            if what:
                raise await self.mark_corrupt(f"L2 table at {off:#x} (L1 entry {l1_index}) "
                                              f"overlaps {what}")  # fmt: skip
        return off, await self.l2_cache.get(off)

    async def lookup(self, offset: int, length: int) -> Run:
        """Map guest ``offset``: the type of its (sub)cluster and how many bytes from it,
        up to ``length``, share the type with contiguous host offsets."""
        geo = self.geo
        cs = geo.cluster_size
        l1i = geo.offset_to_l1_index(offset)
        span_end = (l1i + 1) * geo.l1_entry_span()
        length = min(length, span_end - offset)
        l2off, l2 = await self._l2_table(l1i)
        if l2 is None:
            return Run(ST.UNALLOCATED_PLAIN, length)
        idx = geo.offset_to_l2_index(offset)
        in_cluster = geo.offset_into_cluster(offset)
        sc = geo.offset_to_sc_index(offset)
        entry, bitmap = self._entry(l2, idx)
        stype, nsc = subcluster_run(entry, bitmap, sc, geo)
        await self._validate(stype, entry, offset)
        if stype is ST.COMPRESSED:
            return Run(stype, min(length, cs - in_cluster), entry)
        mapped = stype in (ST.NORMAL, ST.ZERO_ALLOC, ST.UNALLOCATED_ALLOC)
        guest_cluster = offset - in_cluster

        def host_of(e: int, k: int) -> int:
            # With an external data file, host offset == guest offset.
            h = e & L2E_OFFSET_MASK
            return h if h or not self.has_data_file else guest_cluster + k * cs

        base = host_of(entry, 0) if mapped else 0
        run_len = (sc + nsc) * geo.subcluster_size - in_cluster
        # Extend over following clusters of the same type (and contiguous host clusters).
        k = 0
        if sc + nsc == geo.subclusters_per_cluster:
            # standard L2 entries equal to the first one but for the host offset moving on
            # by a cluster each (or equal outright, unmapped) share its type and validity:
            # compared as ints, without classifying each (a 2 MiB convert chunk is 32 of them)
            fast, step = self._fast, (cs if mapped else 0)
            while run_len < length and idx + 1 < geo.l2_size:
                idx += 1
                k += 1
                if fast:
                    e2 = _Q.unpack_from(l2, idx << 3)[0]
                    if e2 == entry + k * step and not e2 & L2E_STD_RESERVED_MASK & ~OFLAG_ZERO:
                        run_len += cs
                        continue
                e2, b2 = self._entry(l2, idx)
                t2, n2 = subcluster_run(e2, b2, 0, geo)
                if t2 is not stype or (mapped and host_of(e2, k) != base + k * cs):
                    break
                await self._validate(t2, e2, guest_cluster + k * cs)
                run_len += n2 * geo.subcluster_size
                if n2 != geo.subclusters_per_cluster:
                    break
        host = base + in_cluster if mapped else 0
        return Run(stype, min(run_len, length), host)

    async def _validate(self, stype: SubclusterType, entry: int, offset: int) -> None:
        if stype is ST.INVALID:
            raise await self.mark_corrupt(f"invalid subcluster bitmap for guest offset {offset:#x}")
        if stype is ST.COMPRESSED:
            if self.has_data_file:
                raise await self.mark_corrupt("compressed cluster in an image with a data file")
            return
        if entry & L2E_STD_RESERVED_MASK and not (entry & OFLAG_ZERO and not self.geo.extended_l2
                                                  and not entry & ~OFLAG_ZERO & L2E_STD_RESERVED_MASK):
            raise await self.mark_corrupt(
                f"L2 entry {entry:#x} for guest offset {offset:#x} has reserved bits set")
        host = entry & L2E_OFFSET_MASK
        if host and (host & (self.geo.cluster_size - 1) or (not self.has_data_file and
                                                              host < self.geo.cluster_size)):
            raise await self.mark_corrupt(
                f"cluster offset {host:#x} for guest offset {offset:#x} is invalid")

    # ================================================================== read

    def _cached_host(self, offset: int, length: int, write: bool) -> int | None:
        """Lock-free mapping from the L2 cache (no await, so atomic for other coroutines):
        the host offset when the whole range sits in one run of contiguous valid NORMAL
        clusters (COPIED ones, for a write), -1 when a read of it is all zeros, None when
        the locked slow path must decide (uncached table, other types, anything odd)."""
        if not self._fast:
            return None
        sh = self._l1_shift
        end = offset + length
        l1i = offset >> sh
        if (end - 1) >> sh != l1i:
            return None
        zeros = -1 if not write and not self.has_backing() else None
        l1 = self._l1
        if l1i >= len(l1):
            return zeros
        e = l1[l1i]
        l2off = e & L1E_OFFSET_MASK
        if e & L1E_RESERVED_MASK or not l2off:
            return None if e & L1E_RESERVED_MASK else zeros
        table = self._l2_tables.get(l2off)
        if table is None or write and not e & OFLAG_COPIED:
            return None
        self._l2_tables.move_to_end(l2off)
        cb = self._cb
        i = (offset >> cb) & self._l2_mask
        n = ((end - 1) >> cb) - (offset >> cb) + 1
        entries = struct.unpack_from(f">{n}Q", table, i << 3)
        first = entries[0]
        if first & self._not_normal or not first & L2E_OFFSET_MASK:
            if zeros is None:
                return None
            for entry in entries:  # unallocated or zero clusters (plain or allocated)
                if entry and (not entry & OFLAG_ZERO or entry & (self._not_normal ^ OFLAG_ZERO)):
                    return None
            return zeros
        if write and not first & OFLAG_COPIED:
            return None
        step = 1 << cb
        expect = first
        for entry in entries[1:]:
            expect += step
            if entry != expect:
                return None
        return (first & L2E_OFFSET_MASK) + (offset & (step - 1))

    def read(self, offset: int, buf: memoryview) -> Awaitable[None]:
        """Read guest bytes; the range may pass the virtual size only up to the node end.

        Not a coroutine function: the commonest case (one cluster, cached table, NORMAL
        entry, nobody listening for debug events) returns the child read itself, one frame
        less per request."""
        cb = self._cb
        if self._fast and not (offset ^ (offset + len(buf) - 1)) >> cb:
            l1i = offset >> self._l1_shift
            l1 = self._l1  # the attribute behind the property: one call less per request
            if l1i < len(l1):
                e = l1[l1i]
                l2off = e & L1E_OFFSET_MASK
                table = self._l2_tables.get(l2off)
                if table is not None and not e & L1E_RESERVED_MASK:
                    entry = _Q.unpack_from(table, ((offset >> cb) & self._l2_mask) << 3)[0]
                    if entry & L2E_OFFSET_MASK and not entry & self._not_normal \
                            and not self.file.wants_events:  # fmt: skip
                        self._l2_tables.move_to_end(l2off)
                        host = (entry & L2E_OFFSET_MASK) | (offset & ((1 << cb) - 1))
                        return self.data.pread(host, buf)
        return self._read(offset, buf)

    async def _read(self, offset: int, buf: memoryview) -> None:
        host = self._cached_host(offset, len(buf), False)
        if host is not None:
            if host < 0:
                buf[:] = bytes(len(buf))
                return
            if self.file.wants_events:
                await self.file.event("read_aio")
            await self.data.pread(host, buf)
            return
        pos, end = 0, len(buf)
        while pos < end:
            async with self.lock:
                run = await self.lookup(offset + pos, end - pos)
            piece = buf[pos : pos + run.length]
            await self._read_run(offset + pos, run, piece)
            pos += run.length

    async def _read_run(self, offset: int, run: Run, piece: memoryview) -> None:
        t = run.type
        if t is ST.NORMAL:
            await self.file.event("read_aio")
            await self.data.pread(run.host, piece)
        elif t in (ST.ZERO_PLAIN, ST.ZERO_ALLOC):
            piece[:] = bytes(len(piece))
        elif t is ST.COMPRESSED:
            await self.file.event("read_compressed")
            cluster = await compress.read_cluster(self, run.host)
            start = self.geo.offset_into_cluster(offset)
            piece[:] = cluster[start : start + len(piece)]
        elif self.backing is not None and self.has_backing():
            await self.file.event("read_backing_aio")
            await self.backing(offset, piece)
        else:
            piece[:] = bytes(len(piece))

    # ================================================================== write helpers

    async def ensure_writable(self) -> None:
        if self.read_only:
            raise BlockError(errno.EACCES, "image is opened read-only", self.file.name)
        if self.corrupt:
            raise ImageCorruptError("image is marked corrupt; repair it with check -r all",
                                    self.file.name)  # fmt: skip
        if self.lazy_refcounts and not self.dirty:
            await self.set_incompat(Incompat.DIRTY, True)
            self.dirty = True

    async def _link_dependency(self) -> None:
        """L2 updates about to point at freshly counted clusters: refcounts go first."""
        if not (self.lazy_refcounts and self.dirty):
            await self.l2_cache.set_dependency(self.refcounts.cache)

    async def _free_dependency(self) -> None:
        """Refcount decreases about to follow an L2 update: the L2 table goes first."""
        if not (self.lazy_refcounts and self.dirty):
            await self.refcounts.cache.set_dependency(self.l2_cache)

    async def _write_l1_entry(self, index: int) -> None:
        await self.file.event("l1_update")
        await self.file.pwrite(self.header.l1_table_offset + 8 * index,
                               struct.pack(">Q", self.l1[index]))  # fmt: skip

    async def _l2_for_write(self, l1_index: int) -> tuple[int, bytearray]:
        """The L2 table for ``l1_index``, allocated (or copied when shared) as needed."""
        if l1_index >= len(self.l1):
            await self.grow_l1(l1_index + 1)
        off, table = await self._l2_table(l1_index)
        if table is not None and self.l1[l1_index] & OFLAG_COPIED:
            return off, table
        await self.file.event("l2_alloc_cow_read" if table is not None else "l2_alloc_write")
        new = await self.refcounts.alloc_clusters(1)
        new_table = await self.l2_cache.get(new, load=False)
        new_table[:] = table if table is not None else bytes(self.geo.cluster_size)
        self.l2_cache.mark_dirty(new)
        await self._link_dependency()
        # The new table (and its refcount) reach the file before the L1 entry naming it.
        await self.l2_cache.flush()
        self.l1[l1_index] = new | OFLAG_COPIED
        await self._write_l1_entry(l1_index)
        if off:
            await self.file.flush()
            await self.refcounts.update(off, self.geo.cluster_size, -1)
        return new, new_table

    async def _free_entry(self, entry: int, bitmap: int, punch: list[int] | None = None
                          ) -> None:  # fmt: skip
        """Drop the reference an old L2 entry held (mirrors qcow2_free_any_cluster).

        Clusters whose refcount drops to 0 are passed down as QEMU's discard types say:
        without ``punch`` the free is internal (QCOW2_DISCARD_OTHER) and they are punched at
        once with pass-discard-other; with ``punch`` it serves a guest discard or zero write
        (QCOW2_DISCARD_REQUEST) and, with pass-discard-request, their offsets are appended
        to it for :meth:`punch_freed` once the metadata no longer names them.
        """
        ctype = cluster_type(entry, self.geo)
        cs = self.geo.cluster_size
        if ctype is CT.COMPRESSED:
            coff, csize = decode_compressed(entry & L2E_COMPRESSED_OFFSET_SIZE_MASK,
                                            self.geo.cluster_bits)  # fmt: skip
            await self._free_dependency()
            await self.file.event("cluster_free")
            await self.refcounts.update(coff, csize, -1)
            first, end = coff // cs * cs, coff + csize
        else:
            host = entry & L2E_OFFSET_MASK
            if self.has_data_file:
                # no refcounts in a data file: the range is discarded there at once when
                # its discard type passes down (qcow2_free_any_cluster)
                passdown = self.discard_other if punch is None else self.discard_request
                if passdown and ctype in (CT.NORMAL, CT.ZERO_ALLOC):
                    try:
                        await self.data.discard(host, cs)
                    except OSError:
                        pass  # advisory
                return
            if not host or ctype not in (CT.NORMAL, CT.ZERO_ALLOC):
                return
            await self._free_dependency()
            await self.file.event("cluster_free")
            await self.refcounts.update(host, cs, -1)
            first, end = host, host + cs
        if not (self.discard_other if punch is None else self.discard_request):
            return
        for host in range(first, end, cs):
            if await self.refcounts.get(host >> self.geo.cluster_bits) != 0:
                continue
            if punch is not None:
                punch.append(host)
                continue
            try:
                await self.file.discard(host, cs)
            except OSError:
                pass

    async def punch_freed(self, hosts: list[int]) -> None:
        """Discard clusters a request freed (see :meth:`_free_entry`) in the file, after
        the metadata that dropped them is written (QEMU queues them the same way and
        sends them in qcow2_process_discards); contiguous clusters go down as one range."""
        if not hosts:
            return
        await self.flush_metadata()
        cs = self.geo.cluster_size
        hosts = sorted(set(hosts))
        start = prev = hosts[0]
        for host in [*hosts[1:], -1]:
            if host == prev + cs:
                prev = host
                continue
            try:
                await self.file.discard(start, prev + cs - start)
            except OSError:
                pass  # advisory, as QEMU ignores a failed discard here
            start = prev = host

    async def _current(self, offset: int, buf: memoryview) -> None:
        """Read guest content with the lock already held (COW source)."""
        pos = 0
        while pos < len(buf):
            run = await self.lookup(offset + pos, len(buf) - pos)
            await self._read_run(offset + pos, run, buf[pos : pos + run.length])
            pos += run.length

    # ================================================================== write

    async def write(self, offset: int, buf: memoryview) -> None:
        if not (self.read_only or self.corrupt or self.lazy_refcounts and not self.dirty):
            # In place into allocated COPIED clusters: no metadata changes, so no lock (as
            # qcow2_co_pwritev_task runs its data I/O outside s->lock)
            host = self._cached_host(offset, len(buf), True)
            if host is not None and self.overlap(host, len(buf)) is None:
                if self.file.wants_events:
                    await self.file.event("pwritev")
                    await self.file.event("write_aio")
                await self.data.pwrite(host, buf)
                return
        async with self.lock:
            await self.ensure_writable()
            await self.file.event("pwritev")
            pos, end = offset, offset + len(buf)
            while pos < end:
                pos = await self._write_step(pos, end, offset, buf)

    @contextlib.asynccontextmanager
    async def unlocked(self) -> AsyncIterator[None]:
        """Drop the held lock for the body (qemu_co_mutex_unlock ... lock around I/O).

        The lock is always held again on the way out, even when the task is cancelled while
        it waits for it (the caller's metadata work and its ``async with`` need it); the
        cancellation is raised once it is."""
        self.lock.release()
        try:
            yield
        finally:
            cancelled = False
            while True:
                try:
                    await self.lock.acquire()
                    break
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError

    async def _write_step(self, pos: int, end: int, offset: int, buf: memoryview) -> int:
        """Write from guest ``pos`` within one L2 table, up to the first cluster another
        allocating write owns (or wait for it when that is the first one); return where it
        stopped (qcow2_alloc_host_offset's loop with handle_dependencies)."""
        geo = self.geo
        l1i = geo.offset_to_l1_index(pos)
        stop = min(end, (l1i + 1) * geo.l1_entry_span())
        if self.inflight:
            cstart = geo.start_of_cluster(pos)
            dep = alloc.first_overlap(self, cstart, stop)
            if dep is not None:
                if dep.start <= cstart:
                    await alloc.wait_for(self, dep)
                    return pos  # look again: the mapping has changed
                stop = dep.start
        l2off, l2 = await self._l2_for_write(l1i)
        return await self._write_some(l2off, l2, pos, stop, offset, buf)

    def _inplace(self, entry: int) -> bool:
        """Whether a write keeps the entry's host cluster: data or zero with host space,
        referenced only here (QEMU's cluster_needs_new_alloc is false)."""
        return (cluster_type(entry, self.geo) in (CT.NORMAL, CT.ZERO_ALLOC)
                and bool(entry & OFLAG_COPIED))  # fmt: skip

    async def _write_some(self, l2off: int, l2: bytearray, pos: int, stop: int,
                          offset: int, buf: memoryview) -> int:  # fmt: skip
        """Write from guest ``pos`` a run of clusters that are all writable in place or all
        need allocation; return where it stopped."""
        geo = self.geo
        cs = geo.cluster_size
        idx = geo.offset_to_l2_index(pos)
        entry, bitmap = self._entry(l2, idx)
        inplace = self._inplace(entry)
        host0 = self._host(entry, pos)
        n = 1
        while pos - geo.offset_into_cluster(pos) + n * cs < stop and idx + n < geo.l2_size:
            e2, _ = self._entry(l2, idx + n)
            if self._inplace(e2) != inplace:
                break
            if inplace and self._host(e2, pos + n * cs) != host0 + n * cs:
                break
            if not inplace and n >= 256:
                break
            n += 1
        run_end = min(stop, pos - geo.offset_into_cluster(pos) + n * cs)
        data = buf[pos - offset : run_end - offset]
        if inplace:
            await alloc.write_kept(self, geo.offset_to_l1_index(pos), l2, pos, data, n)
            return run_end
        await alloc.write_alloc(self, geo.offset_to_l1_index(pos), l2, pos, data, n)
        return run_end

    def overlap(self, host: int, length: int, *, l2: bool = True) -> str | None:
        """The metadata structure ``[host, host+length)`` overlaps, if any (QEMU's
        overlap-check "cached" template: header, active L1, refcount table, every refcount
        block and, with ``l2``, every active L2 table, plus tables cached but not linked yet)."""
        if self.has_data_file or length <= 0:
            return None
        cb = self.geo.cluster_bits
        first, last = host >> cb, (host + length - 1) >> cb
        h, rc = self.header, self.refcounts
        l1a = h.l1_table_offset >> cb
        l1b = (h.l1_table_offset + 8 * max(1, len(self.l1)) - 1) >> cb
        rta = rc.table_offset >> cb
        if first == 0:
            return "the image header"
        if first <= l1b and l1a <= last:
            return "the active L1 table"
        if first <= rta + rc.table_clusters - 1 and rta <= last:
            return "the refcount table"
        meta = self._metadata_clusters()
        l2s, blocks = self.l2_cache.tables, rc.cache.tables
        for c in range(first, last + 1):
            what = meta.get(c)
            if what is not None and (l2 or what is _REFBLOCK):
                return what
            if l2 and c << cb in l2s:  # cached, maybe not linked into the L1 table yet
                return _L2_TABLE
            if c << cb in blocks:
                return _REFBLOCK
        return None

    def _metadata_clusters(self) -> dict[int, str]:
        """Host cluster index -> what it holds, for every L2 table the L1 table points at and
        every refcount block the refcount table points at (QEMU's "cached" overlap template
        checks them all, not just those in the caches); rebuilt after either table changed."""
        rc = self.refcounts
        l1, table = self._l1, rc.table
        key = (l1.serial, l1.version, table.serial, table.version)
        if key != self._meta_key:
            cb = self._cb
            meta = {e >> cb: _REFBLOCK for e in table if e}
            meta.update(((e & L1E_OFFSET_MASK) >> cb, _L2_TABLE) for e in l1
                        if e & L1E_OFFSET_MASK)  # fmt: skip
            self._meta, self._meta_key = meta, key
        return self._meta

    async def check_overlap(self, host: int, length: int) -> None:
        """Refuse a data write into metadata: mark the image corrupt instead."""
        what = self.overlap(host, length)
        if what:
            raise await self.mark_corrupt(f"data write at host offset {host:#x} ({length} "
                                          f"bytes) would overwrite {what}")  # fmt: skip

    def _host(self, entry: int, guest: int) -> int:
        h = entry & L2E_OFFSET_MASK
        if not h and self.has_data_file:
            return self.geo.start_of_cluster(guest)
        return h

    # ================================================================== zero / discard / resize

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await clusterops.write_zeroes(self, offset, length, unmap)

    async def discard(self, offset: int, length: int) -> None:
        await clusterops.discard(self, offset, length)

    async def truncate(self, size: int, prealloc: str = "off") -> None:
        await clusterops.truncate(self, size, prealloc)

    # ================================================================== VM state

    def vm_state_offset(self) -> int:
        """Where VM state starts: the first L1 entry not covering the disk
        (qcow2_vm_state_offset)."""
        return self.geo.vm_state_offset(self.header.size)

    async def vmstate_io(self, pos: int, buf: memoryview, write: bool) -> None:
        """Read or write VM state: guest data past the disk, at ``vm_state_offset + pos``,
        allocated like any cluster (qcow2_co_save_vmstate/qcow2_co_load_vmstate)."""
        offset = self.vm_state_offset() + pos
        if write:
            await self.file.event("vmstate_save")
            await self.write(offset, buf)
        else:
            await self.file.event("vmstate_load")
            await self.read(offset, buf)

    # ================================================================== status / L1

    async def block_status(self, offset: int, length: int) -> tuple[SubclusterType, int, int]:
        """(type, bytes, host offset) for the run at ``offset``."""
        async with self.lock:
            run = await self.lookup(offset, length)
        return run.type, run.length, run.host

    async def grow_l1(self, min_size: int) -> None:
        """Move the L1 table to a larger one (qcow2_grow_l1_table)."""
        await clusterops.grow_l1(self, min_size)

    # ================================================================== compressed

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """Store an already compressed cluster at cluster-aligned ``offset``."""
        await compress.store(self, offset, [data])


async def read_header(file: ImageFile) -> QCowHeader:
    """Read and parse cluster 0 (header, extensions, backing file name)."""
    flen = await file.getlength()
    first = bytearray(min(flen, 512))
    if first:
        await file.pread(0, memoryview(first))
    if len(first) < 24:
        raise BlockError(errno.EINVAL, "image is not in qcow2 format (too short)", file.name)
    cluster_bits = struct.unpack_from(">I", first, 20)[0]
    if not 9 <= cluster_bits <= 21:
        return QCowHeader.unpack(first, file.name)  # raises with the right message
    buf = bytearray(min(flen, 1 << cluster_bits))
    await file.pread(0, memoryview(buf))
    return QCowHeader.unpack(buf, file.name)

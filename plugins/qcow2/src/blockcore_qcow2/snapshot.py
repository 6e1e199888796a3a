"""Internal snapshots: the snapshot table, and create / apply / delete (qcow2-snapshot.c).

The table itself (its format, reading and repair) is in :mod:`.snaptable`.

How changes are made safe: QEMU raises and drops refcounts in place and fixes the COPIED
flags afterwards, so a crash in between leaves flags that ``qemu-img check`` reports as
errors. Here every snapshot operation builds the whole new metadata state beside the old
one and switches to it with a single header write, the only write that makes anything
live:

- the new active L1 table, new snapshot table and a new refcount structure (table and
  blocks, computed by counting every reference of the new state, as check does) go into
  clusters that are free in the old state and that the old refcounts do not record, so
  until the header switch they are garbage in free space;
- L2 tables of the new active L1 whose COPIED flags must change are copied when the old
  active L1 uses them, or fixed in place when only snapshots use them (check looks at the
  flags of the active tables only);
- the header write switches L1 table, refcount table and snapshot table at once (all
  three sit in the first 72 bytes); the old structures are free in the new refcounts.

A crash at any point leaves either the old or the new image, both consistent; the new
refcounts are exact, so leaked clusters of the old state are reclaimed as a side effect.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from blockcore.errors import BlockError, ImageCorruptError, NotSupportedError

from . import bitmap
from .format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    MAX_L1_SIZE,
    MAX_SNAPSHOTS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    V3_HEADER_LENGTH,
    decode_compressed,
)
from .refcount import Refcounts, set_entry
from .snaptable import QCowSnapshot, pack_table, read_image_table

if TYPE_CHECKING:
    from .image import Qcow2Image

async def read_snapshots(img: Qcow2Image) -> list[QCowSnapshot]:
    """The snapshot table named by the header."""
    return (await read_image_table(img)).snapshots


def find_snapshot(snapshots: list[QCowSnapshot], snapshot_id: str | None,
                  name: str | None) -> int:  # fmt: skip
    """Index of the first snapshot matching ``snapshot_id`` and/or ``name`` (both must match
    when both are given), or -1 (find_snapshot_by_id_and_name)."""
    for i, sn in enumerate(snapshots):
        if (snapshot_id is None or sn.id_str == snapshot_id) and \
                (name is None or sn.name == name):  # fmt: skip
            return i
    return -1


def find_snapshot_by_id_or_name(snapshots: list[QCowSnapshot], id_or_name: str) -> int:
    i = find_snapshot(snapshots, id_or_name, None)
    return i if i >= 0 else find_snapshot(snapshots, None, id_or_name)


def new_snapshot_id(snapshots: list[QCowSnapshot]) -> str:
    """One more than the largest numeric id (leading digits, as strtoul reads them)."""
    best = 0
    for sn in snapshots:
        digits = ""
        for ch in sn.id_str:
            if not ch.isdigit():
                break
            digits += ch
        best = max(best, int(digits) if digits else 0)
    return str(best + 1)


# -------------------------------------------------------------------------------------------
# Operations (image lock taken here; GS callers have drained the node)
# -------------------------------------------------------------------------------------------


async def list_snapshots(img: Qcow2Image) -> list[dict[str, Any]]:
    async with img.lock:
        return [sn.info() for sn in await read_snapshots(img)]


async def create(img: Qcow2Image, sn_info: dict[str, Any]) -> None:
    """Add a snapshot of the active state; fills ``sn_info["id"]`` when it is empty."""
    if img.has_data_file:
        raise NotSupportedError("internal snapshots are not supported with an external data "
                                "file", img.file.name)  # fmt: skip
    async with img.lock:
        await img.ensure_writable()
        await img.flush_metadata()
        snapshots = await read_snapshots(img)
        if len(snapshots) >= MAX_SNAPSHOTS:
            raise BlockError(errno.EFBIG, f"too many snapshots (at most {MAX_SNAPSHOTS})",
                             img.file.name)  # fmt: skip
        sn_id = str(sn_info.get("id") or "") or new_snapshot_id(snapshots)
        if find_snapshot(snapshots, sn_id, None) >= 0:
            raise BlockError(errno.EEXIST, f"snapshot id {sn_id!r} already exists", img.file.name)
        active = [e & L1E_OFFSET_MASK for e in img.l1]
        clock = int(sn_info.get("vm-clock-sec", 0)) * 1_000_000_000 + \
            int(sn_info.get("vm-clock-nsec", 0))  # fmt: skip
        sn = QCowSnapshot(
            l1_table_offset=0, l1_size=len(active), id_str=sn_id,
            name=str(sn_info.get("name", "")), date_sec=int(sn_info.get("date-sec", 0)),
            date_nsec=int(sn_info.get("date-nsec", 0)), vm_clock_nsec=clock,
            vm_state_size=int(sn_info.get("vm-state-size", 0)), disk_size=img.header.size,
            icount=int(sn_info.get("icount", -1)), pending_l1=active,
        )  # fmt: skip
        await commit(img, active, [*snapshots, sn], img.header.size, discard=_punch(img))
    sn_info["id"] = sn_id


async def goto(img: Qcow2Image, id_or_name: str) -> int:
    """Make snapshot ``id_or_name`` (an id first, else a name) the active state; returns the
    virtual disk size, which becomes the snapshot's."""
    if img.has_data_file:
        raise NotSupportedError("internal snapshots are not supported with an external data "
                                "file", img.file.name)  # fmt: skip
    async with img.lock:
        await img.ensure_writable()
        await img.flush_metadata()
        table = await read_image_table(img)
        snapshots, table_size = table.snapshots, table.size
        i = find_snapshot_by_id_or_name(snapshots, id_or_name)
        if i < 0:
            raise BlockError(errno.ENOENT, "No such file or directory", img.file.name)
        sn = snapshots[i]
        l1 = await _read_l1(img, sn.l1_table_offset, sn.l1_size)
        size = sn.disk_size
        n = max(len(img.l1), sn.l1_size, img.geo.size_to_l1(size))
        active = [e & L1E_OFFSET_MASK for e in l1] + [0] * (n - len(l1))
        await commit(img, active, snapshots, size, keep_table=table_size,
                     discard=_punch(img))
        return size


async def load_tmp(img: Qcow2Image, snapshot_id: str | None, name: str | None) -> None:
    """Read through the snapshot's L1 table from now on (qcow2_snapshot_load_tmp): the
    image is read-only, so nothing else changes; the virtual size stays the active one."""
    assert img.read_only
    snapshots = await read_snapshots(img)
    i = find_snapshot(snapshots, snapshot_id, name)
    if i < 0:
        raise BlockError(errno.ENOENT, "Can't find snapshot", img.file.name)
    sn = snapshots[i]
    img.l1 = await _read_l1(img, sn.l1_table_offset, sn.l1_size)


async def delete(img: Qcow2Image, snapshot_id: str | None, name: str | None) -> None:
    """Remove the snapshot matching ``snapshot_id`` and/or ``name``."""
    async with img.lock:
        await img.ensure_writable()
        await img.flush_metadata()
        snapshots = await read_snapshots(img)
        i = find_snapshot(snapshots, snapshot_id, name)
        if i < 0:
            raise BlockError(errno.ENOENT, "Can't find the snapshot", img.file.name)
        rest = snapshots[:i] + snapshots[i + 1 :]
        active = [e & L1E_OFFSET_MASK for e in img.l1]
        await commit(img, active, rest, img.header.size, discard=_punch(img))


# -------------------------------------------------------------------------------------------
# The commit: build the new state beside the old one, switch with one header write
# -------------------------------------------------------------------------------------------


class _Refs:
    """Reference count per host cluster of the state being built."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def add(self, ci: int, n: int = 1) -> None:
        if ci >= len(self.counts):
            self.counts.extend([0] * (ci + 1 - len(self.counts)))
        self.counts[ci] += n

    def add_range(self, first: int, count: int, n: int = 1) -> None:
        for ci in range(first, first + count):
            self.add(ci, n)

    def get(self, ci: int) -> int:
        return self.counts[ci] if ci < len(self.counts) else 0


class _Allocator:
    """Clusters free in the old state (refcount 0 there) and unused by the new one."""

    def __init__(self, img: Qcow2Image, refs: _Refs) -> None:
        self.img = img
        self.refs = refs
        self.taken: set[int] = set()
        self.hint = max(1, img.refcounts.free_cluster_index)

    async def _free(self, ci: int) -> bool:
        return ci not in self.taken and self.refs.get(ci) == 0 and \
            await self.img.refcounts.get(ci) == 0  # fmt: skip

    async def run(self, count: int) -> int:
        """First cluster of ``count`` contiguous free clusters, now taken and counted."""
        start, ci = self.hint, self.hint
        while ci - start < count:
            if await self._free(ci):
                ci += 1
            else:
                ci += 1
                start = ci
        for c in range(start, start + count):
            self.taken.add(c)
        if start == self.hint:
            self.hint = start + count
        self.refs.add_range(start, count)
        return start

    def release(self, start: int, count: int) -> None:
        for c in range(start, start + count):
            self.taken.discard(c)
        self.refs.add_range(start, count, -1)
        self.hint = min(self.hint, start)


async def _read_l1(img: Qcow2Image, offset: int, size: int) -> list[int]:
    if size * 8 > MAX_L1_SIZE:
        raise ImageCorruptError(f"snapshot L1 table of {size} entries too large", img.file.name)
    if offset & (img.geo.cluster_size - 1) or (size and not offset):
        raise ImageCorruptError(f"snapshot L1 table offset {offset:#x} invalid", img.file.name)
    if not size:
        return []
    buf = bytearray(size * 8)
    await img.file.pread(offset, memoryview(buf))
    return list(struct.unpack(f">{size}Q", buf))


def _l2_offset(img: Qcow2Image, entry: int) -> int:
    off = entry & L1E_OFFSET_MASK
    if off and (entry & L1E_RESERVED_MASK or off & (img.geo.cluster_size - 1)):
        raise ImageCorruptError(f"L1 entry {entry:#x} is invalid", img.file.name)
    return off


def _table_refs(img: Qcow2Image, table: bytes | bytearray) -> list[int]:
    """Host clusters an L2 table references (with repetition), as check counts them."""
    geo = img.geo
    cb = geo.cluster_bits
    step = 2 if geo.extended_l2 else 1
    out: list[int] = []
    for e in struct.unpack(f">{len(table) // 8}Q", table)[::step]:
        if e & OFLAG_COMPRESSED:
            coff, csize = decode_compressed(e & L2E_COMPRESSED_OFFSET_SIZE_MASK, cb)
            out.extend(range(coff >> cb, ((coff + csize - 1) >> cb) + 1))
            continue
        host = e & L2E_OFFSET_MASK
        if host and not img.has_data_file:
            if host & (geo.cluster_size - 1):
                raise ImageCorruptError(f"L2 entry {e:#x} is not cluster aligned", img.file.name)
            out.append(host >> cb)
    return out


def _fixed_flags(img: Qcow2Image, table: bytes, refs: _Refs) -> bytearray | None:
    """``table`` with COPIED set exactly on allocated entries of refcount 1, or None when
    nothing changes."""
    geo = img.geo
    step = 2 if geo.extended_l2 else 1
    vals = list(struct.unpack(f">{len(table) // 8}Q", table))
    changed = False
    for i in range(0, len(vals), step):
        e = vals[i]
        host = e & L2E_OFFSET_MASK
        if e & OFLAG_COMPRESSED or not host or img.has_data_file:
            continue
        want = e | OFLAG_COPIED if refs.get(host >> geo.cluster_bits) == 1 else e & ~OFLAG_COPIED
        if want != e:
            vals[i] = want
            changed = True
    return bytearray(struct.pack(f">{len(vals)}Q", *vals)) if changed else None


async def _count_bitmaps(img: Qcow2Image, refs: _Refs) -> None:
    """Bitmap directory, tables and data clusters named by the bitmaps extension."""
    ranges = await bitmap.referenced_ranges(img)
    if ranges is None:
        raise ImageCorruptError("bitmap directory too large", img.file.name)
    cb = img.geo.cluster_bits
    for offset, length in ranges:
        if length:
            refs.add_range(offset >> cb, ((offset + length - 1) >> cb) - (offset >> cb) + 1)


async def commit(img: Qcow2Image, active: list[int], snapshots: list[QCowSnapshot],
                 size: int, *, keep_table: int = 0, refcount_order: int | None = None,
                 version: int | None = None, discard: bool = False,
                 before_switch: Callable[[], Awaitable[None]] | None = None
                 ) -> None:  # fmt: skip
    """Make (active L1 = ``active`` L2 offsets, ``snapshots``, virtual ``size``) the image's
    state with one header write. ``keep_table``: the snapshot table on disk is unchanged and
    this many bytes long. ``refcount_order``: build the new refcount structure with entries
    of ``1 << refcount_order`` bits (amend's refcount_bits). ``version``: header version to
    write (amend's upgrade). ``discard``: punch the clusters the switch frees in the file
    (pass-discard-snapshot). ``before_switch``: called right before the header write (debug
    events). The caller holds the image lock and flushed the caches."""
    geo, rc, h = img.geo, img.refcounts, img.header
    order = rc.order if refcount_order is None else refcount_order
    max_refcount = (1 << (1 << order)) - 1
    cs, cb = geo.cluster_size, geo.cluster_bits
    refs = _Refs()
    refs.add(0)  # header
    l2_refs: dict[int, list[int]] = {}

    async def count_l1(entries: list[int]) -> None:
        for off in entries:
            if not off:
                continue
            refs.add(off >> cb)
            if off not in l2_refs:
                l2_refs[off] = _table_refs(img, await img.l2_cache.get(off))
            for ci in l2_refs[off]:
                refs.add(ci)

    for sn in snapshots:
        if sn.pending_l1 is not None:
            await count_l1(sn.pending_l1)
            continue
        l1 = await _read_l1(img, sn.l1_table_offset, sn.l1_size)
        if sn.l1_size:
            refs.add_range(sn.l1_table_offset >> cb, -(-sn.l1_size * 8 // cs))
        await count_l1([_l2_offset(img, e) for e in l1])
    await count_l1(active)
    await _count_bitmaps(img, refs)
    if keep_table and snapshots:
        refs.add_range(h.snapshots_offset >> cb, -(-keep_table // cs))

    # Active L2 tables whose COPIED flags must change: copied if the old active L1 uses
    # them (a change in place would be live before the switch), else fixed in place.
    old_active = {e & L1E_OFFSET_MASK for e in img.l1} - {0}
    rewrite: dict[int, bytearray] = {}
    copy: set[int] = set()
    for off in dict.fromkeys(a for a in active if a):
        fixed = _fixed_flags(img, bytes(await img.l2_cache.get(off)), refs)
        if fixed is None:
            continue
        rewrite[off] = fixed
        if off in old_active:
            copy.add(off)
            refs.add(off >> cb, -active.count(off))

    alloc = _Allocator(img, refs)
    moved = {off: (await alloc.run(1)) << cb for off in sorted(copy)}
    for off, new in moved.items():
        refs.add(new >> cb, active.count(off) - 1)
    for sn in snapshots:
        if sn.pending_l1 is not None:
            sn.l1_table_offset = (await alloc.run(-(-sn.l1_size * 8 // cs))) << cb \
                if sn.l1_size else 0  # fmt: skip
    l1_size = len(active)
    l1_off = (await alloc.run(-(-l1_size * 8 // cs))) << cb if l1_size else 0
    table = pack_table(snapshots)
    if keep_table or not snapshots:
        sn_off = h.snapshots_offset if snapshots else 0
    else:
        sn_off = (await alloc.run(-(-len(table) // cs))) << cb
    final_l1 = []
    for off in active:
        new = moved.get(off, off)
        final_l1.append(new | OFLAG_COPIED if new and refs.get(new >> cb) == 1 else new)
    bb = cb + 3 - order  # refcount block bits
    rt_off, rt_clusters, blocks = await _plan_refcounts(img, refs, alloc, bb)
    worst = max(refs.counts)
    if worst > max_refcount or min(refs.counts) < 0:
        if refcount_order is not None:
            ci = next(i for i, c in enumerate(refs.counts) if c > max_refcount)
            raise BlockError(errno.EINVAL, f"Cannot decrease refcount entry width to "
                             f"{1 << order} bits: Cluster at offset {ci << cb:#x} has a "
                             f"refcount of {refs.counts[ci]}", img.file.name)  # fmt: skip
        raise BlockError(errno.EINVAL, f"refcount {worst} out of range 0..{max_refcount}",
                         img.file.name)  # fmt: skip

    # Clusters in use now (refcount > 0 in the old structure) that the new state leaves
    # free: punched once the switch is done, as QEMU passes QCOW2_DISCARD_SNAPSHOT frees on.
    in_use: list[int] = []
    if discard:
        last = -(-await img.file.getlength() // cs)
        in_use = [ci for ci in range(1, last) if refs.get(ci) == 0 and await rc.get(ci) > 0]

    # Everything below goes to clusters nothing live references; the header makes it live.
    f = img.file
    for off, data in rewrite.items():
        await f.pwrite(moved.get(off, off), data)
    for sn in snapshots:
        if sn.pending_l1 is not None and sn.l1_size:
            await f.pwrite(sn.l1_table_offset, struct.pack(f">{sn.l1_size}Q", *sn.pending_l1))
    if l1_size:
        await f.pwrite(l1_off, struct.pack(f">{l1_size}Q", *final_l1))
    if snapshots and not keep_table:
        await f.pwrite(sn_off, table)
    epb = 1 << bb
    for t, boff in sorted(blocks.items()):
        block = bytearray(cs)
        base = t << bb
        for j, count in enumerate(refs.counts[base : base + epb]):
            if count:
                set_entry(block, j, order, count)
        await f.pwrite(boff << cb, block)
    entries = [0] * (rt_clusters * cs // 8)
    for t, boff in blocks.items():
        entries[t] = boff << cb
    await f.pwrite(rt_off << cb, struct.pack(f">{len(entries)}Q", *entries))
    await f.flush()
    for sn in snapshots:
        sn.pending_l1 = None
    new_header = attrs.evolve(
        h, l1_table_offset=l1_off, l1_size=l1_size, refcount_table_offset=rt_off << cb,
        refcount_table_clusters=rt_clusters, nb_snapshots=len(snapshots),
        snapshots_offset=sn_off, size=size, refcount_order=order)  # fmt: skip
    if version is not None and version != h.version:
        new_header = attrs.evolve(new_header, version=version, header_length=V3_HEADER_LENGTH,
                                  extra_fields=bytes(V3_HEADER_LENGTH - 105))  # fmt: skip
        new_header = new_header.with_standard_extensions(h.backing_format, h.data_file)
    if before_switch is not None:
        await before_switch()
    await img.write_header(new_header)

    # The new state is live: bring the in-memory structures in line.
    img.l1 = final_l1
    img.l2_cache.invalidate()
    await _discard_runs(img, in_use)
    if order != rc.order:
        img.refcounts = Refcounts(img.file, cb, order, rt_off << cb, entries, rt_clusters,
                                  rc.cache.capacity, rc.set_table)  # fmt: skip
        return
    rc.table = entries
    rc.table_offset, rc.table_clusters = rt_off << cb, rt_clusters
    rc.cache.invalidate()
    rc.free_cluster_index = 0
    rc.free_byte_offset = 0


def _punch(img: Qcow2Image) -> bool:
    # set by the driver from pass-discard-snapshot (default on, as QEMU); engines opened
    # directly (tests, create) have no such option and never punch
    return bool(getattr(img, "discard_snapshot", False))


async def _discard_runs(img: Qcow2Image, clusters: list[int]) -> None:
    """Discard ``clusters`` (sorted indices) in the file, a run of neighbours at a time;
    failures are ignored (the clusters are free either way)."""
    cb = img.geo.cluster_bits
    i = 0
    while i < len(clusters):
        j = i
        while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1:
            j += 1
        try:
            await img.file.discard(clusters[i] << cb, (j - i + 1) << cb)
        except OSError:
            pass
        i = j + 1


async def _plan_refcounts(img: Qcow2Image, refs: _Refs, alloc: _Allocator, bb: int
                          ) -> tuple[int, int, dict[int, int]]:  # fmt: skip
    """Place a refcount table and blocks (of ``1 << bb`` entries) covering every counted
    cluster, themselves included: (table cluster, table clusters, {range: block cluster})."""
    rc = img.refcounts
    cs = img.geo.cluster_size
    blocks: dict[int, int] = {}
    table_start = table_clusters = 0
    for _ in range(1000):
        counts = refs.counts
        ranges = {ci >> bb for ci in range(len(counts)) if counts[ci]}
        need = max(rc.table_clusters, -(-(max(ranges) + 1) * 8 // cs))
        if need > table_clusters:
            if table_clusters:
                alloc.release(table_start, table_clusters)
            table_start, table_clusters = await alloc.run(need), need
            continue
        missing = sorted(ranges - blocks.keys())
        extra = sorted(blocks.keys() - ranges)
        if not missing and not extra:
            return table_start, table_clusters, blocks
        for t in extra:
            alloc.release(blocks.pop(t), 1)
        for t in missing:
            blocks[t] = await alloc.run(1)
    raise BlockError(errno.EIO, "refcount structure placement does not converge", img.file.name)

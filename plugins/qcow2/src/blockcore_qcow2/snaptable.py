"""The snapshot table: its entries, reading it as QEMU does (qcow2_do_read_snapshots), the
checks at open, and check's validation and repair of it (qcow2_check_read_snapshot_table,
qcow2_check_fix_snapshot_table and qcow2_write_snapshots in QEMU's qcow2-snapshot.c).

Entries are 40-byte headers, extra data (large VM-state size, virtual disk size, icount,
then bytes we do not know, kept), the id and name strings, padding to 8. We always write
24 bytes of known extra data plus the unknown bytes, as QEMU 7.2 does. Parts of the table
past the end of the file read as zeros, as they do through QEMU's block layer.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Any

import attrs

from blockcore.errors import BlockError
from blockcore.types import BdrvCheckMode as Mode
from blockcore.types import BdrvCheckResult, CheckErrorLine

from .format import L1E_OFFSET_MASK, MAX_SNAPSHOTS, Incompat

if TYPE_CHECKING:
    from .cache import ImageFile
    from .image import Qcow2Image

HEAD = struct.Struct(">QIHHIIQII")  # 40 bytes
EXTRA = struct.Struct(">QQq")  # vm_state_size_large, disk_size, icount
#: QEMU's limits: extra data per entry, and the whole table.
MAX_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS
_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1
#: byte offset of nb_snapshots in the header; snapshots_offset follows it
_NB_SNAPSHOTS_AT = 60
_FIX_HINT = "You can force-remove this extra metadata with qemu-img check -r all\n"


def _overhang_hint(count: int) -> str:
    return f"You can force-remove all {count} overhanging snapshots with qemu-img check -r all\n"


@attrs.define(eq=False)
class QCowSnapshot:
    """One entry of the snapshot table (QEMU's QCowSnapshot)."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = -1
    #: Extra data past the fields we know, written back unchanged.
    unknown_extra: bytes = b""
    #: L1 entries of a snapshot being created, written by the commit (not on disk yet).
    pending_l1: list[int] | None = None

    def pack(self) -> bytes:
        id_b, name_b = _encode(self.id_str), _encode(self.name)
        extra = EXTRA.pack(self.vm_state_size, self.disk_size, self.icount) + self.unknown_extra
        # a VM state too large for 32 bits is left out there (older readers see none)
        vm32 = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        head = HEAD.pack(self.l1_table_offset, self.l1_size, len(id_b), len(name_b),
                         self.date_sec, self.date_nsec, self.vm_clock_nsec, vm32,
                         len(extra))  # fmt: skip
        data = head + extra + id_b + name_b
        return data + bytes(-len(data) % 8)

    def info(self) -> dict[str, Any]:
        """QAPI's SnapshotInfo, keys in declaration order."""
        out: dict[str, Any] = {
            "id": self.id_str, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }  # fmt: skip
        if self.icount != -1:
            out["icount"] = self.icount
        return out


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _c_string(raw: bytes) -> str:
    """The bytes up to the first NUL (QEMU keeps ids and names as C strings)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def pack_table(snapshots: list[QCowSnapshot]) -> bytes:
    return b"".join(sn.pack() for sn in snapshots)


@attrs.define(eq=False)
class SnapshotTable:
    """The snapshot table as read (QEMU's s->snapshots, s->snapshots_size)."""

    snapshots: list[QCowSnapshot]
    #: bytes the entries take on disk, from the first to the end of the last name
    size: int
    #: each entry's extra data size (after a repair cut it to MAX_EXTRA_DATA)
    extra_sizes: list[int] = attrs.Factory(list)
    #: entries dropped off the end (repair of a table too large)
    overhanging: int = 0
    #: entries whose extra data was cut (repair)
    extra_dropped: int = 0


class _Reader:
    """Reads of the table through a window, so that thousands of small entries do not each
    cost a request; a failing window read is retried exactly, so errors come where QEMU's
    own reads would fail."""

    WINDOW = 1 << 16

    def __init__(self, file: ImageFile) -> None:
        self.file = file
        self.start = 0
        self.data = b""

    async def read(self, offset: int, length: int) -> bytes:
        if not length:
            return b""
        if self.start <= offset and offset + length <= self.start + len(self.data):
            return self.data[offset - self.start : offset - self.start + length]
        buf = bytearray(max(length, self.WINDOW))
        try:
            await self.file.pread(offset, memoryview(buf))
        except OSError:
            buf = bytearray(length)
            await self.file.pread(offset, memoryview(buf))
        self.start, self.data = offset, bytes(buf)
        return self.data[:length]


async def read_table(file: ImageFile, offset: int, count: int, disk_size: int,
                     *, repair: bool = False, notes: list[str] | None = None
                     ) -> SnapshotTable:  # fmt: skip
    """Read ``count`` entries from ``offset`` (qcow2_do_read_snapshots). With ``repair``
    (check -r all), extra data beyond QEMU's limit is cut and entries beyond the table size
    limit are dropped, each noted in ``notes``; otherwise both are refused. Tier: I/O
    (the image lock held, or the open).

    :raises BlockError: EFBIG for those two (with QEMU's hint), or the read's error.
    """
    reader = _Reader(file)
    default_disk_size = disk_size // 512 * 512  # bs->total_sectors
    table = SnapshotTable([], 0)
    pos, table_length = offset, 0
    for i in range(count):
        entry_start = pos
        table_length = -(-table_length // 8) * 8
        pos = -(-pos // 8) * 8
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = HEAD.unpack(await _read(reader, pos, HEAD.size))  # fmt: skip
        pos += HEAD.size
        cut = False
        if extra_size > MAX_EXTRA_DATA:
            if not repair:
                raise _hinted(errno.EFBIG, f"Too much extra metadata in snapshot table entry {i}",
                              _FIX_HINT, file.name)  # fmt: skip
            if notes is not None:
                notes.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                             f"({extra_size} > {MAX_EXTRA_DATA})")  # fmt: skip
            table.extra_dropped += 1
            cut = True
        known_size = min(EXTRA.size, extra_size)
        known = (await _read(reader, pos, known_size)).ljust(EXTRA.size, b"\0")
        pos += known_size
        vm_large, sn_disk_size, icount = EXTRA.unpack(known)
        unknown = b""
        if extra_size > EXTRA.size:
            extra_end = pos + extra_size - EXTRA.size
            if cut:
                extra_size = MAX_EXTRA_DATA
            unknown = await _read(reader, pos, extra_size - EXTRA.size)
            pos = extra_end
        id_str = _c_string(await _read(reader, pos, id_len))
        pos += id_len
        name = _c_string(await _read(reader, pos, name_len))
        pos += name_len
        table_length += HEAD.size + extra_size + id_len + name_len
        if table_length > MAX_SNAPSHOTS_SIZE or pos - offset > _INT_MAX:
            if not repair:
                raise _hinted(errno.EFBIG, "Snapshot table is too big",
                              _overhang_hint(count - i), file.name)  # fmt: skip
            if notes is not None:
                notes.append(f"Discarding {count - i} overhanging snapshots (snapshot table is "
                             "too big)")  # fmt: skip
            table.overhanging += count - i
            pos = entry_start
            break
        table.snapshots.append(QCowSnapshot(
            l1_table_offset=l1_off, l1_size=l1_size, id_str=id_str, name=name,
            date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
            vm_state_size=vm_large if extra_size >= 8 else vm_state,
            disk_size=sn_disk_size if extra_size >= 16 else default_disk_size,
            icount=icount if extra_size >= 24 else -1, unknown_extra=unknown,
        ))  # fmt: skip
        table.extra_sizes.append(extra_size)
    table.size = pos - offset if count else 0
    return table


async def _read(reader: _Reader, offset: int, length: int) -> bytes:
    try:
        return await reader.read(offset, length)
    except OSError as exc:
        code = exc.errno or errno.EIO
        raise BlockError(code, f"Failed to read snapshot table: {os.strerror(code)}",
                         reader.file.name) from exc  # fmt: skip


def _hinted(code: int, message: str, hint: str, name: str) -> BlockError:
    err = BlockError(code, message, name)
    err.hint = hint  # type: ignore[attr-defined]
    return err


def pointer_error(nb_snapshots: int, offset: int, cluster_size: int) -> tuple[int, str] | None:
    """What QEMU's qcow2_validate_table says of the header's snapshot table pointer: (errno,
    message without the table's name) or None when it is acceptable. Tier: common."""
    if nb_snapshots > MAX_SNAPSHOTS:
        return errno.EFBIG, "too large"
    if _INT64_MAX - nb_snapshots * HEAD.size < offset or offset & (cluster_size - 1):
        return errno.EINVAL, "offset invalid"
    return None


async def read_at_open(image: Qcow2Image) -> SnapshotTable:
    """The table as a normal (not check) open reads it: a bad pointer or table refuses the
    open, with QEMU's messages (qcow2_do_open). Tier: GS (bdrv_open)."""
    h = image.header
    bad = pointer_error(h.nb_snapshots, h.snapshots_offset, image.geo.cluster_size)
    if bad is not None:
        raise BlockError(bad[0], f"Snapshot table {bad[1]}", image.file.name)
    return await read_image_table(image)


async def read_image_table(image: Qcow2Image) -> SnapshotTable:
    """The table the header names, for snapshot operations (the open validated it).
    Tier: I/O, under the image lock."""
    h = image.header
    return await read_table(image.file, h.snapshots_offset, h.nb_snapshots, h.size)


# -------------------------------------------------------------------------------------------
# check: validation before the refcount check, rewrite after it
# -------------------------------------------------------------------------------------------


async def check_read(image: Qcow2Image, result: BdrvCheckResult, fix: Mode) -> SnapshotTable:
    """qcow2_check_read_snapshot_table: read the table named by the header into ``result``'s
    figures (QEMU's snapshot_res). With FIX_ERRORS, too many entries and a too large table
    are cut at once (only the header's count changes: what they used leaks, and the
    refcount check reclaims it), too much extra data is cut in memory; broken entries count
    as corruptions that :func:`check_fix` repairs by rewriting the table.

    Tier: I/O, under the image lock (bdrv_co_check).

    :raises BlockError: when the table cannot be read (after the check's error lines).
    """
    msgs = result.messages
    file = image.file
    raw = bytearray(12)
    try:
        await file.pread(_NB_SNAPSHOTS_AT, memoryview(raw))
    except OSError as exc:
        result.check_errors += 1
        msgs.append("ERROR failed to read the snapshot table pointer from the image header: "
                    f"{os.strerror(exc.errno or errno.EIO)}")  # fmt: skip
        raise
    nb, offset = struct.unpack(">IQ", raw)
    repair = bool(fix & Mode.FIX_ERRORS)
    reduced = 0
    if nb > MAX_SNAPSHOTS and repair:
        msgs.append(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
        reduced, nb = nb - MAX_SNAPSHOTS, MAX_SNAPSHOTS
    bad = pointer_error(nb, offset, image.geo.cluster_size)
    if bad is not None:
        result.check_errors += 1
        msgs.append(CheckErrorLine(f"ERROR snapshot table {bad[1]}"))
        if nb > MAX_SNAPSHOTS:
            msgs.append(_overhang_hint(nb - MAX_SNAPSHOTS).rstrip("\n"))
        raise BlockError(bad[0], f"snapshot table {bad[1]}", file.name)
    h = image.header
    try:
        table = await read_table(file, offset, nb, h.size, repair=repair, notes=msgs)
    except BlockError as exc:
        result.check_errors += 1
        msgs.append(CheckErrorLine(f"ERROR failed to read the snapshot table: {exc.strerror}"))
        hint = getattr(exc, "hint", None)
        if hint:
            msgs.append(hint.rstrip("\n"))
        raise
    reduced += table.overhanging
    result.corruptions += reduced + table.extra_dropped
    nb -= table.overhanging
    if reduced:
        # the count alone shrinks (one 4-byte write): a crash leaves the old or new count
        try:
            await file.pwrite(_NB_SNAPSHOTS_AT, struct.pack(">I", nb))
            await file.flush()
        except OSError as exc:
            result.check_errors += 1
            msgs.append("ERROR failed to update the snapshot count in the image header: "
                        f"{os.strerror(exc.errno or errno.EIO)}")  # fmt: skip
            raise
        result.corruptions_fixed += reduced
        result.corruptions -= reduced
    image.header = attrs.evolve(h, nb_snapshots=nb, snapshots_offset=offset)
    if h.version >= 3:
        word = "Repairing" if repair else "ERROR"
        for i, size in enumerate(table.extra_sizes):
            if size < 16:  # v3 entries need the large VM-state size and the disk size
                result.corruptions += 1
                msgs.append(f"{word} snapshot table entry {i} is incomplete")
    return table


async def check_fix(image: Qcow2Image, table: SnapshotTable, result: BdrvCheckResult,
                    fix: Mode) -> None:  # fmt: skip
    """qcow2_check_fix_snapshot_table: with FIX_ERRORS, rewrite a table that had
    corruptions (the refcounts are right by now, so new clusters can be allocated).
    Tier: I/O, under the image lock."""
    if not (result.corruptions and fix & Mode.FIX_ERRORS):
        return
    try:
        await write_table(image, table, result.messages)
    except OSError as exc:
        result.check_errors += 1
        result.messages.append("ERROR failed to update snapshot table: "
                               f"{os.strerror(exc.errno or errno.EIO)}")  # fmt: skip
        raise
    result.corruptions_fixed += result.corruptions
    result.corruptions = 0


async def write_table(image: Qcow2Image, table: SnapshotTable, notes: list[str]) -> None:
    """Write ``table`` to new clusters and switch the header to it (qcow2_write_snapshots):
    the new clusters are counted and flushed first, the table written and flushed, then one
    header write names it, and only then the old table's clusters are freed. A crash at
    any point leaves the old or the new table, and at most leaked clusters. A failure to
    free the old table is only noted (in ``notes``, QEMU's line): it leaks. Tier: I/O,
    under the image lock."""
    data = pack_table(table.snapshots)
    size = _unpadded_size(table.snapshots)
    if size > MAX_SNAPSHOTS_SIZE:
        raise BlockError(errno.EFBIG, "snapshot table too large", image.file.name)
    rc = image.refcounts
    h = image.header
    new_offset = await rc.alloc_clusters(image.geo.size_to_clusters(size)) if size else 0
    await image.flush_metadata()
    await image.file.flush()
    what = overlap(image, table, new_offset, size)
    if what is not None:
        # clusters the refcount repair freed can still be metadata to QEMU's overlap check
        # (the old table, a snapshot's L1 table): refused as there; the new clusters leak
        raise await signal_corruption(image, notes, what)
    if size:
        await image.file.pwrite(new_offset, data[:size])
        await image.file.flush()
    await image.file.pwrite(_NB_SNAPSHOTS_AT, struct.pack(">IQ", len(table.snapshots),
                                                          new_offset))  # fmt: skip
    await image.file.flush()
    image.header = attrs.evolve(h, nb_snapshots=len(table.snapshots), snapshots_offset=new_offset)
    old_offset, old_size = h.snapshots_offset, table.size
    table.size = size
    try:
        await _free(image, old_offset, old_size)
    except OSError as exc:
        notes.append(f"qcow2_free_clusters failed: {os.strerror(exc.errno or errno.EIO)}")


def overlap(image: Qcow2Image, table: SnapshotTable, offset: int, size: int,
            ignore: str | None = None) -> str | None:
    """The metadata ``[offset, +size)`` would overwrite, named and checked in the order of
    QEMU's qcow2_check_metadata_overlap with the "cached" template, which also protects the
    snapshot table and the snapshots' L1 tables (``table``, as check read it); ``ignore``:
    the kind being rewritten on purpose. Tier: common."""
    if size <= 0:
        return None
    cs = image.geo.cluster_size
    if offset < cs and ignore != "qcow2_header":
        return "qcow2_header"
    first = offset // cs * cs
    end = -(-(offset + size) // cs) * cs

    def hits(start: int, length: int) -> bool:
        return length > 0 and start < end and first < start + length

    h, rc = image.header, image.refcounts
    ranges = [("active L1 table", h.l1_table_offset, 8 * len(image.l1)),
              ("refcount table", rc.table_offset, rc.table_clusters * cs),
              ("snapshot table", h.snapshots_offset, table.size)]  # fmt: skip
    ranges += [("inactive L1 table", sn.l1_table_offset, 8 * sn.l1_size)
               for sn in table.snapshots]  # fmt: skip
    ranges += [("active L2 table", e & L1E_OFFSET_MASK, cs) for e in image.l1
               if e & L1E_OFFSET_MASK]  # fmt: skip
    ranges += [("refcount block", e, cs) for e in rc.table if e]
    for name, start, length in ranges:
        if name != ignore and hits(start, length):
            return name
    return None


async def signal_corruption(image: Qcow2Image, notes: list[str], what: str) -> BlockError:
    """A metadata write refused by the overlap check: QEMU's line, the corrupt bit set (the
    driver is gone after that in QEMU: nothing more is written) and the error to raise.
    Tier: I/O, under the image lock."""
    notes.append("qcow2: Marking image as corrupt: Preventing invalid write on metadata "
                 f"(overlaps with {what}); further corruption events will be suppressed")
    image.corrupt = True
    await image.set_incompat(Incompat.CORRUPT, True)
    return BlockError(errno.EIO, f"write would overwrite the {what}", image.file.name)


def _unpadded_size(snapshots: list[QCowSnapshot]) -> int:
    """The table's length up to the end of the last name, as QEMU sizes it."""
    size = 0
    for sn in snapshots:
        size = -(-size // 8) * 8
        size += HEAD.size + EXTRA.size + len(sn.unknown_extra) + len(_encode(sn.id_str)) + \
            len(_encode(sn.name))  # fmt: skip
    return size


async def _free(image: Qcow2Image, offset: int, size: int) -> None:
    """Drop one reference from every cluster of ``[offset, +size)``, all or none, as
    qcow2_free_clusters: a cluster without a refcount block gets one (QEMU's
    alloc_refcount_block) and the free fails with EAGAIN; a refcount of 0 fails with EINVAL."""
    if size <= 0:
        return
    rc = image.refcounts
    cb = image.geo.cluster_bits
    first, last = offset >> cb, (offset + size - 1) >> cb
    for ci in range(first, last + 1):
        t = ci >> rc.block_bits
        if t >= len(rc.table) or not rc.table[t]:
            await rc._alloc_block(ci)
            raise BlockError(errno.EAGAIN, "refcount block allocated", image.file.name)
        if await rc.get(ci) == 0:
            raise BlockError(errno.EINVAL, f"refcount of cluster {ci} is 0", image.file.name)
    freed = []
    for ci in range(first, last + 1):
        value = await rc.get(ci) - 1
        await rc.set(ci, value)
        if not value:
            freed.append(ci)
    await image.flush_metadata()
    if getattr(image, "discard_snapshot", False):
        for ci in freed:
            try:
                await image.file.discard(ci << cb, 1 << cb)
            except OSError:
                pass

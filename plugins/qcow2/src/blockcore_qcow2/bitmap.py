"""Persistent dirty bitmaps: the bitmaps extension, directory and tables (qcow2-bitmap.c).

Layout (docs/interop/qcow2.txt): the bitmaps header extension names a directory of
entries (table offset and size, flags in-use/auto, type, granularity, name, extra data);
each bitmap table entry points at one cluster of the bitmap's bits (the core's
:class:`~blockcore.dirty_bitmap.BdrvDirtyBitmap` serialization), 0 meaning all zeros and 1
all ones. Autoclear bit 0 says the extension is valid: a program without bitmap support
clears it, and the bitmaps are then ignored.

Life cycle, as QEMU's: the driver loads every bitmap when the image opens; read-write,
each one is then marked in-use on disk, so a crash leaves them marked inconsistent (they
load as inconsistent, only removal is allowed); on close the persistent bitmaps are
written to new clusters, a new directory without the in-use flags replaces the old one in
the header, and the old clusters are freed (a crash in between leaks clusters, no more).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

import attrs

from blockcore.errors import BlockError, ImageCorruptError

from .format import MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS, Autoclear, ExtType, HeaderExtension

if TYPE_CHECKING:
    from blockcore.dirty_bitmap import BdrvDirtyBitmap

    from .image import Qcow2Image

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
# QEMU 7.2 refuses the extra-data-compatible flag too (it supports no extra data)
BME_RESERVED_FLAGS = ~0x3 & 0xFFFFFFFF
BME_TYPE_DIRTY_TRACKING = 1
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
_EXT = struct.Struct(">IIQQ")


def dir_entry_size(name_size: int, extra_size: int) -> int:
    return -(-(_ENTRY.size + name_size + extra_size) // 8) * 8


def bitmap_bytes(disk_size: int, granularity: int) -> int:
    """Bytes of serialized bits for a disk of ``disk_size`` bytes."""
    granules = -(-disk_size // granularity)
    return -(-granules // 8)


@attrs.define(eq=False)
class BitmapEntry:
    """One bitmap directory entry."""

    name: str
    granularity_bits: int
    flags: int = 0
    table_offset: int = 0
    table_size: int = 0
    type: int = BME_TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def pack(self) -> bytes:
        name = self.name.encode()
        data = _ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                           self.granularity_bits, len(name), len(self.extra_data))  # fmt: skip
        data += self.extra_data + name
        return data + bytes(-len(data) % 8)

    def info(self) -> dict[str, Any]:
        """QAPI's Qcow2BitmapInfo (name, granularity, flags)."""
        flags = []
        if self.flags & BME_FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            flags.append("auto")
        return {"name": self.name, "granularity": self.granularity, "flags": flags}


def _ext_fields(img: Qcow2Image) -> tuple[int, int, int] | None:
    """(nb_bitmaps, directory size, directory offset) of a valid extension, else None."""
    h = img.header
    ext = h.extension(ExtType.BITMAPS)
    if ext is None or h.version < 3 or not h.autoclear_features & Autoclear.BITMAPS:
        return None
    nb, _res, size, offset = _EXT.unpack_from(ext.data)
    return nb, size, offset


def stale_extension(img: Qcow2Image) -> bool:
    """The extension is there but a program without bitmap support cleared its autoclear
    bit: the bitmaps are to be ignored (and dropped from the header when writable)."""
    h = img.header
    return h.extension(ExtType.BITMAPS) is not None and not h.autoclear_features & \
        Autoclear.BITMAPS  # fmt: skip


async def read_directory(img: Qcow2Image) -> list[BitmapEntry]:
    """The bitmap directory named by a valid bitmaps extension (empty without one), read and
    refused as QEMU's bitmap_list_load does, with its messages: the entries fill the whole
    directory, as many as the extension says, none with extra data."""
    fields = _ext_fields(img)
    if fields is None:
        return []
    nb, size, offset = fields  # the header parse checked the extension's own fields
    name = img.file.name
    if not size:
        raise ImageCorruptError("Requested bitmap directory size is zero", name)
    buf = bytearray(size)
    await img.file.pread(offset, memoryview(buf))
    out: list[BitmapEntry] = []
    pos = 0
    while pos < size:
        if pos + _ENTRY.size > size:
            raise ImageCorruptError("Broken bitmap directory", name)
        if len(out) == nb:
            raise ImageCorruptError("More bitmaps found than specified in header extension",
                                    name)  # fmt: skip
        tab_off, tab_size, flags, typ, gbits, name_size, extra = _ENTRY.unpack_from(buf, pos)
        end = pos + dir_entry_size(name_size, extra)
        if end > size:
            raise ImageCorruptError("Broken bitmap directory", name)
        if extra:
            raise ImageCorruptError("Bitmap extra data is not supported", name)
        start = pos + _ENTRY.size
        e = BitmapEntry(
            name=bytes(buf[start : start + name_size]).decode("utf-8", "replace"),
            granularity_bits=gbits, flags=flags, table_offset=tab_off, table_size=tab_size,
            type=typ, extra_data=b"",
        )  # fmt: skip
        _check_entry(img, e, name_size)
        out.append(e)
        pos = end
    if len(out) != nb:
        raise ImageCorruptError("Less bitmaps found than specified in header extension", name)
    return out


def _check_entry(img: Qcow2Image, e: BitmapEntry, name_size: int) -> None:
    """QEMU's check_dir_entry, and load_bitmap's table size check (QEMU loads every bitmap
    at open, so both refuse the open): a table of the wrong size is only allowed for a
    bitmap in use, which is loaded inconsistent anyway."""
    cs = img.geo.cluster_size
    in_use = e.flags & BME_FLAG_IN_USE
    bad = (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cs
           or e.table_size > BME_MAX_TABLE_SIZE or e.table_size * cs > BME_MAX_PHYS_SIZE
           or e.flags & BME_RESERVED_FLAGS
           or not BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= BME_MAX_GRANULARITY_BITS
           or not 0 < name_size <= BME_MAX_NAME_SIZE
           or e.type != BME_TYPE_DIRTY_TRACKING)  # fmt: skip
    need = 0 if bad else -(-bitmap_bytes(img.header.size, e.granularity) // cs)
    if bad or not in_use and e.table_size < need:
        raise ImageCorruptError(f"Bitmap '{e.name}' doesn't satisfy the constraints",
                                img.file.name)  # fmt: skip
    if not in_use and e.table_size != need:
        raise ImageCorruptError(f"Could not read bitmap '{e.name}' from image: Invalid argument",
                                img.file.name)  # fmt: skip


async def referenced_ranges(img: Qcow2Image) -> list[tuple[int, int]] | None:
    """Every byte range the bitmaps extension points at, as stored and unvalidated (for
    counting references): the directory, each bitmap table and each table's data clusters,
    as (offset, length). None when the directory claims more than 64 MiB (not read)."""
    ext = img.header.extension(ExtType.BITMAPS)
    if ext is None or len(ext.data) < _EXT.size or stale_extension(img):
        return []  # a stale extension's clusters are leaked, as QEMU's check says
    nb, _res, dir_size, dir_off = _EXT.unpack_from(ext.data)
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
        return None
    ranges = [(dir_off, dir_size)]
    d = bytearray(dir_size)
    await img.file.pread(dir_off, memoryview(d))
    pos = 0
    for _ in range(nb):
        if pos + _ENTRY.size > len(d):
            break
        tab_off, tab_size, _f, _t, _g, name_size, extra = _ENTRY.unpack_from(d, pos)
        ranges.append((tab_off, tab_size * 8))
        if tab_size * img.geo.cluster_size > BME_MAX_PHYS_SIZE:
            break  # not a table any open accepts: no allocation its size asks for
        tab = bytearray(tab_size * 8)
        await img.file.pread(tab_off, memoryview(tab))
        for e in struct.unpack(f">{tab_size}Q", tab):
            if e & BME_TABLE_ENTRY_OFFSET_MASK:
                ranges.append((e & BME_TABLE_ENTRY_OFFSET_MASK, img.geo.cluster_size))
        pos += dir_entry_size(name_size, extra)
    return ranges


async def _read_table(img: Qcow2Image, e: BitmapEntry) -> list[int]:
    buf = bytearray(e.table_size * 8)
    await img.file.pread(e.table_offset, memoryview(buf))
    table = list(struct.unpack(f">{e.table_size}Q", buf))
    for t in table:
        off = t & BME_TABLE_ENTRY_OFFSET_MASK
        if t & BME_TABLE_ENTRY_RESERVED_MASK or off % img.geo.cluster_size or \
                (off and t & BME_TABLE_ENTRY_FLAG_ALL_ONES):  # fmt: skip
            raise ImageCorruptError(f"bitmap '{e.name}' has an invalid table entry {t:#x}",
                                    img.file.name)  # fmt: skip
    return table


# -------------------------------------------------------------------------------------------
# Open and close
# -------------------------------------------------------------------------------------------


async def load(img: Qcow2Image, make: Any, writable: bool) -> list[BdrvDirtyBitmap]:
    """Load every bitmap; ``make(entry)`` returns the new in-memory bitmap for an entry.

    Bitmaps found in-use are inconsistent (no data loaded). When ``writable`` the others
    are marked in-use on disk, else they are readonly. A stale extension (autoclear bit
    cleared) is dropped from the header when writable.
    """
    if stale_extension(img):
        if writable:
            await drop_stale_extension(img)
        return []
    entries = await read_directory(img)
    out = []
    cs = img.geo.cluster_size
    for e in entries:
        bm = make(e)
        bm.persistent = True
        if not e.flags & BME_FLAG_AUTO:
            bm.disabled = True
        if e.flags & BME_FLAG_IN_USE:
            bm.inconsistent = True
        else:
            unit = cs * 8 * e.granularity  # disk bytes one table entry covers
            for i, t in enumerate(await _read_table(img, e)):
                off = t & BME_TABLE_ENTRY_OFFSET_MASK
                if off:
                    buf = bytearray(cs)
                    await img.file.pread(off, memoryview(buf))
                    bm.deserialize_part(buf, i * unit, unit)
                elif t & BME_TABLE_ENTRY_FLAG_ALL_ONES:
                    bm.deserialize_ones(i * unit, unit)
        if not writable:
            bm.readonly = True
        out.append(bm)
    if writable and any(not e.flags & BME_FLAG_IN_USE for e in entries):
        for e in entries:
            e.flags |= BME_FLAG_IN_USE
        await _rewrite_directory_in_place(img, entries)
    return out


async def drop_stale_extension(img: Qcow2Image) -> None:
    """Remove a bitmaps extension whose autoclear bit a program without bitmap support
    cleared: its bitmaps may be stale (done when the image becomes writable)."""
    if stale_extension(img):
        h = img.header
        exts = tuple(e for e in h.extensions if e.type != ExtType.BITMAPS)
        await img.write_header(attrs.evolve(h, extensions=exts))


async def reopen_rw(img: Qcow2Image, bitmaps: list[BdrvDirtyBitmap], filename: str) -> None:
    """The image became writable: mark every loaded bitmap in-use on disk and make the
    in-memory ones writable (qcow2_reopen_bitmaps_rw, with QEMU's checks and messages)."""
    if stale_extension(img) or _ext_fields(img) is None:
        return
    by_name = {b.name: b for b in bitmaps if b.persistent}
    entries = await read_directory(img)
    update = False
    for e in entries:
        bm = by_name.get(e.name)
        if bm is None:
            raise BlockError(errno.EINVAL, f"Unexpected bitmap '{e.name}' in image "
                             f"'{filename}'", filename)  # fmt: skip
        if not e.flags & BME_FLAG_IN_USE:
            if not bm.readonly:
                raise BlockError(errno.EINVAL, f"Corruption: bitmap '{e.name}' is not marked "
                                 f"IN_USE in the image '{filename}' and not marked readonly "
                                 "in RAM", filename)  # fmt: skip
            if bm.inconsistent:
                raise BlockError(errno.EINVAL, f"Corruption: bitmap '{e.name}' is "
                                 "inconsistent but is not marked IN_USE in the image "
                                 f"'{filename}'", filename)  # fmt: skip
            e.flags |= BME_FLAG_IN_USE
            update = True
        elif bm.readonly and not bm.inconsistent:
            raise BlockError(errno.EINVAL, f"Corruption: bitmap '{e.name}' is marked IN_USE "
                             f"in the image '{filename}' but it is readonly and consistent "
                             "in RAM", filename)  # fmt: skip
    if update:
        await _rewrite_directory_in_place(img, entries)
    for e in entries:
        by_name[e.name].readonly = False


async def _rewrite_directory_in_place(img: Qcow2Image, entries: list[BitmapEntry]) -> None:
    """Flags changed, sizes did not: write the directory where it is, with the autoclear bit
    cleared meanwhile so a torn directory is never taken for valid bitmaps."""
    fields = _ext_fields(img)
    assert fields is not None
    h = img.header
    await img.write_header(attrs.evolve(h, autoclear_features=h.autoclear_features
                                        & ~Autoclear.BITMAPS))  # fmt: skip
    await img.file.pwrite(fields[2], b"".join(e.pack() for e in entries))
    await img.file.flush()
    await img.write_header(h)


async def store(img: Qcow2Image, bitmaps: list[BdrvDirtyBitmap]) -> None:
    """Write ``bitmaps`` (persistent, consistent, writable) into the image, replacing their
    entries; entries without an in-memory bitmap (inconsistent ones) are kept as they are."""
    if not bitmaps:
        return
    async with img.lock:
        entries = await read_directory(img)
        by_name = {e.name: e for e in entries}
        rc = img.refcounts
        cs = img.geo.cluster_size
        old: list[tuple[int, int]] = []  # (offset, length) to free after the switch
        for bm in bitmaps:
            assert bm.name is not None
            e = by_name.get(bm.name)
            if e is None:
                e = BitmapEntry(bm.name, bm.granularity.bit_length() - 1)
                entries.append(e)
                by_name[bm.name] = e
            elif not e.flags & BME_FLAG_IN_USE:
                raise BlockError(errno.EEXIST, f"Bitmap '{bm.name}' already exists in the image",
                                 img.file.name)  # fmt: skip
            else:
                old.extend(await _clusters_of(img, e))
            e.granularity_bits = bm.granularity.bit_length() - 1
            e.flags = BME_FLAG_AUTO if bm.enabled else 0
            e.type = BME_TYPE_DIRTY_TRACKING
            data = bm.serialize_part(0, bm.size)
            table = []
            for pos in range(0, max(len(data), 1), cs):
                chunk = data[pos : pos + cs]
                if not chunk.strip(b"\0"):
                    table.append(0)
                    continue
                off = await rc.alloc_clusters(1)
                await img.file.pwrite(off, chunk.ljust(cs, b"\0"))
                table.append(off)
            e.table_size = len(table)
            e.table_offset = await rc.alloc_clusters(-(-len(table) * 8 // cs))
            await img.file.pwrite(e.table_offset, struct.pack(f">{len(table)}Q", *table))
        await _replace_directory(img, entries, old)


async def _clusters_of(img: Qcow2Image, e: BitmapEntry) -> list[tuple[int, int]]:
    """Host ranges an entry's table and data occupy."""
    out = [(e.table_offset, e.table_size * 8)]
    for t in await _read_table(img, e):
        if t & BME_TABLE_ENTRY_OFFSET_MASK:
            out.append((t & BME_TABLE_ENTRY_OFFSET_MASK, img.geo.cluster_size))
    return out


async def _replace_directory(img: Qcow2Image, entries: list[BitmapEntry],
                             free: list[tuple[int, int]]) -> None:  # fmt: skip
    """Write ``entries`` as a new directory, point the header at it, then free the old
    directory and the ranges in ``free`` (new clusters are counted before the header names
    them; old ones are dropped after it stopped naming them)."""
    cs = img.geo.cluster_size
    rc = img.refcounts
    fields = _ext_fields(img)
    if fields is not None and fields[1]:
        free = [(fields[2], fields[1]), *free]
    h = img.header
    exts = [x for x in h.extensions if x.type != ExtType.BITMAPS]
    autoclear = h.autoclear_features & ~Autoclear.BITMAPS
    if entries:
        directory = b"".join(e.pack() for e in entries)
        if len(directory) > MAX_BITMAP_DIRECTORY_SIZE:
            raise BlockError(errno.EINVAL, "bitmap directory too large", img.file.name)
        dir_off = await rc.alloc_clusters(-(-len(directory) // cs))
        await img.file.pwrite(dir_off, directory)
        exts.append(HeaderExtension(ExtType.BITMAPS,
                                    _EXT.pack(len(entries), 0, len(directory), dir_off)))
        autoclear |= Autoclear.BITMAPS
    await img.flush_metadata()
    await rc.flush()
    await img.file.flush()
    new = attrs.evolve(h, extensions=tuple(exts), autoclear_features=autoclear)
    await img.write_header(new.with_standard_extensions(h.backing_format, h.data_file))
    for off, length in free:
        await rc.update(off, length, -1)
    await rc.flush()


# -------------------------------------------------------------------------------------------
# Requests from the core
# -------------------------------------------------------------------------------------------


async def can_store(img: Qcow2Image, name: str, granularity: int, disk_size: int,
                    node_name: str) -> bool:  # fmt: skip
    """qcow2_co_can_store_new_dirty_bitmap: True, or BlockError with QEMU's message."""

    def refuse(why: str) -> BlockError:
        return BlockError(errno.EINVAL, f"Can't make bitmap '{name}' persistent in "
                          f"'{node_name}': {why}", img.file.name)  # fmt: skip

    if img.header.version < 3:
        raise refuse("Cannot store dirty bitmaps in qcow2 v2 files")
    gbits = granularity.bit_length() - 1
    if gbits < BME_MIN_GRANULARITY_BITS:
        raise refuse(f"Granularity exceeds minimum ({1 << BME_MIN_GRANULARITY_BITS} bytes)")
    if gbits > BME_MAX_GRANULARITY_BITS:
        raise refuse(f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)")
    if disk_size > BME_MAX_PHYS_SIZE * img.geo.cluster_size * granularity:
        raise refuse("Too much space will be occupied by the bitmap. Use larger granularity")
    if len(name.encode()) > BME_MAX_NAME_SIZE:
        raise refuse(f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)")
    fields = _ext_fields(img)
    if fields is None:
        return True
    nb, size, _off = fields
    if nb >= MAX_BITMAPS:
        raise refuse("Maximum number of persistent bitmaps is already reached")
    if size + dir_entry_size(len(name.encode()), 0) > MAX_BITMAP_DIRECTORY_SIZE:
        raise refuse("Not enough space in the bitmap directory")
    async with img.lock:
        entries = await read_directory(img)
    if any(e.name == name for e in entries):
        raise refuse("Bitmap with the same name is already stored")
    return True


async def remove(img: Qcow2Image, name: str) -> None:
    """Delete bitmap ``name`` from the image; absent is not an error."""
    async with img.lock:
        entries = await read_directory(img)
        e = next((x for x in entries if x.name == name), None)
        if e is None:
            return
        free = await _clusters_of(img, e)
        await _replace_directory(img, [x for x in entries if x is not e], free)


async def info_list(img: Qcow2Image) -> list[dict[str, Any]]:
    async with img.lock:
        return [e.info() for e in await read_directory(img)]


def stored_size(bitmaps: list[BdrvDirtyBitmap], cluster_size: int) -> int:
    """Bytes the persistent ``bitmaps`` need in an image with ``cluster_size`` clusters
    (qcow2_get_persistent_dirty_bitmap_size, used by measure)."""
    total = dir_size = 0
    for bm in bitmaps:
        if not bm.persistent or bm.name is None:
            continue
        clusters = -(-bitmap_bytes(bm.size, bm.granularity) // cluster_size)
        total += clusters * cluster_size
        total += -(-clusters * 8 // cluster_size) * cluster_size
        dir_size += dir_entry_size(len(bm.name.encode()), 0)
    return total + -(-dir_size // cluster_size) * cluster_size

"""Dirty bitmaps (QEMU's block/dirty-bitmap.c): which parts of a node were written.

A :class:`BdrvDirtyBitmap` covers the node's length in granules of ``granularity`` bytes (a
power of two, at least 512); bit ``i`` stands for bytes ``[i * granularity, (i+1) *
granularity)``. The request path marks every enabled bitmap in ``bs.dirty_bitmaps`` after
each write, zero write and discard (``bitmap.mark``) and resizes them all after a truncate
(``bitmap.resize``), as QEMU's ``write_req_finish`` and ``bdrv_co_truncate`` do.

The bits are held in a ``bytearray`` in the layout qcow2 stores on disk (and QEMU's
``hbitmap_serialize_part`` produces): bit ``i`` is bit ``i % 8`` (least significant first) of
byte ``i // 8``, and the bits past the end of the last granule are always zero. Serialising
a range is therefore a slice copy.

Flags, as QEMU's: *disabled* bitmaps are not marked by writes; *persistent* ones are stored
by the format driver when the node closes; *busy* ones are in use by an operation;
*readonly* ones were loaded from a read-only image; *inconsistent* ones were found marked
in-use on disk (a crash) and only removing them is allowed. :func:`bdrv_dirty_bitmap_check`
refuses operations on them with QEMU's messages.

The GS functions below (:func:`bdrv_create_dirty_bitmap` ...) change the set of bitmaps of a
node: main thread only, like every graph change. ``bs.dirty_bitmaps`` is replaced, never
mutated in place, so a request iterating it in another thread sees a consistent list.
"""

from __future__ import annotations

import enum
import errno
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, final

from .aio import assert_bdrv_graph_readable, co_wrapper
from .errors import BlockError, NoMediumError, NotSupportedError
from .tiers import Tier, api, global_state_code

if TYPE_CHECKING:
    from .graph import BlockDriverState

__all__ = [
    "BDRV_BITMAP_MAX_NAME_SIZE",
    "BdrvDirtyBitmap",
    "BitmapCheck",
    "bdrv_clear_dirty_bitmap",
    "bdrv_co_remove_persistent_dirty_bitmap",
    "bdrv_create_dirty_bitmap",
    "bdrv_dirty_bitmap_check",
    "bdrv_disable_dirty_bitmap",
    "bdrv_enable_dirty_bitmap",
    "bdrv_find_dirty_bitmap",
    "bdrv_has_readonly_bitmaps",
    "bdrv_merge_dirty_bitmap",
    "bdrv_release_dirty_bitmap",
    "bdrv_release_named_dirty_bitmaps",
    "bdrv_remove_persistent_dirty_bitmap",
]

#: Longest bitmap name QEMU accepts (qcow2 stores names of up to 1023 bytes).
BDRV_BITMAP_MAX_NAME_SIZE = 1023

_NONZERO = re.compile(b"[^\x00]")
_NOT_FULL = re.compile(b"[^\xff]")


def _lowest_bit(byte: int) -> int:
    return (byte & -byte).bit_length() - 1


class BitmapCheck(enum.IntFlag):
    """What :func:`bdrv_dirty_bitmap_check` refuses (QEMU's BDRV_BITMAP_* flags)."""

    BUSY = 1
    RO = 2
    INCONSISTENT = 4
    #: Refuse busy, readonly and inconsistent bitmaps (modifying operations).
    DEFAULT = BUSY | RO | INCONSISTENT
    #: Refuse busy and inconsistent bitmaps (operations that only read or flip flags).
    ALLOW_RO = BUSY | INCONSISTENT


@final
class BdrvDirtyBitmap:
    """A named (or anonymous) dirty bitmap of one node."""

    __slots__ = ("_bits", "_lock", "_nbits", "_shift", "bs", "busy", "disabled", "granularity",
                 "inconsistent", "name", "persistent", "readonly", "size", "skip_store")

    def __init__(self, bs: BlockDriverState | None, size: int, granularity: int,
                 name: str | None = None) -> None:  # fmt: skip
        if granularity < 512 or granularity & (granularity - 1):
            raise BlockError(errno.EINVAL, "Granularity must be power of 2 and at least 512")
        if size < 0:
            raise BlockError(errno.EINVAL, f"bitmap size {size} is negative")
        self.bs = bs
        self.name = name
        self.granularity = granularity
        self.size = size
        self.disabled = False
        self.persistent = False
        self.busy = False
        self.readonly = False
        self.inconsistent = False
        #: Set by a format driver for a bitmap it must not write back (loaded inconsistent).
        self.skip_store = False
        self._shift = granularity.bit_length() - 1
        self._nbits = -(-size >> self._shift)
        self._bits = bytearray(-(-self._nbits // 8))
        self._lock = threading.Lock()  # QEMU's bs->dirty_bitmap_mutex, per bitmap

    def __repr__(self) -> str:
        state = "disabled" if self.disabled else "enabled"
        return (f"<BdrvDirtyBitmap {self.name!r} granularity={self.granularity} "
                f"size={self.size} {state} dirty={self.count()}>")  # fmt: skip

    # ------------------------------------------------------------------ queries (I/O)

    @property
    def enabled(self) -> bool:
        """Writes mark the bitmap (QEMU's bdrv_dirty_bitmap_enabled)."""
        return not self.disabled

    def get(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty (bdrv_dirty_bitmap_get)."""
        i = offset >> self._shift
        if i < 0 or i >= self._nbits:
            return False
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    def count(self) -> int:
        """Dirty bytes, whole granules counted (bdrv_get_dirty_count); may pass ``size``."""
        with self._lock:
            n = int.from_bytes(self._bits, "little").bit_count()
        return n << self._shift

    def is_empty(self) -> bool:
        return _NONZERO.search(self._bits) is None

    def next_dirty(self, offset: int, end: int | None = None) -> int:
        """First dirty byte offset in ``[offset, end)`` (granule start, at least ``offset``),
        or -1 (bdrv_dirty_bitmap_next_dirty)."""
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return -1
        i = self._find(offset >> self._shift, _NONZERO, 0)
        if i < 0:
            return -1
        pos = max(offset, i << self._shift)
        return pos if pos < end else -1

    def next_zero(self, offset: int, end: int | None = None) -> int:
        """First clean byte offset in ``[offset, end)``, or -1 (bdrv_dirty_bitmap_next_zero)."""
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return -1
        i = self._find(offset >> self._shift, _NOT_FULL, 0xFF)
        if i < 0 or i >= self._nbits:
            return -1
        pos = max(offset, i << self._shift)
        return pos if pos < end else -1

    def _find(self, i: int, pattern: re.Pattern[bytes], full: int) -> int:
        """Index of the first bit from ``i`` that is set (``full`` 0) or clear (0xFF)."""
        bits = self._bits
        byte_i = i >> 3
        if byte_i >= len(bits):
            return -1
        first = (bits[byte_i] ^ full) >> (i & 7) << (i & 7) & 0xFF
        if first:
            return (byte_i << 3) + _lowest_bit(first)
        m = pattern.search(bits, byte_i + 1)
        if m is None:
            return -1
        j = m.start()
        return (j << 3) + _lowest_bit(bits[j] ^ full)

    def next_dirty_area(self, offset: int, end: int | None = None,
                        max_length: int | None = None) -> tuple[int, int] | None:  # fmt: skip
        """The first dirty run at or after ``offset`` within ``[offset, end)``, as
        ``(start, length)`` clipped to ``max_length``, or None
        (bdrv_dirty_bitmap_next_dirty_area)."""
        end = self.size if end is None else min(end, self.size)
        start = self.next_dirty(offset, end)
        if start < 0:
            return None
        stop = self.next_zero(start, end)
        stop = end if stop < 0 else stop
        length = stop - start
        if max_length is not None:
            length = min(length, max_length)
        return start, length

    def dirty_ranges(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Every dirty run ``(start, length)`` in ``[offset, end)``, in order."""
        end = self.size if end is None else min(end, self.size)
        pos = offset
        while pos < end:
            area = self.next_dirty_area(pos, end)
            if area is None:
                return
            yield area
            pos = area[0] + area[1]

    # ------------------------------------------------------------------ changes (I/O)

    def mark(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` dirty if the bitmap is enabled. Called by the
        request path for writes, zero writes and discards (QEMU's bdrv_set_dirty)."""
        if self.disabled or length <= 0:
            return
        self.set(offset, length)

    def set(self, offset: int, length: int) -> None:
        """Mark a range dirty, enabled or not (bdrv_set_dirty_bitmap). Clamped to the size."""
        self._fill(offset, length, True)

    def reset(self, offset: int, length: int) -> None:
        """Mark the granules fully or partly inside a range clean (bdrv_reset_dirty_bitmap;
        QEMU requires granule-aligned ranges except at the end, and clears whole granules)."""
        self._fill(offset, length, False)

    def _fill(self, offset: int, length: int, value: bool) -> None:
        if length <= 0 or offset >= self.size:
            return
        a = max(0, offset) >> self._shift
        b = min(self._nbits, ((min(offset + length, self.size) - 1) >> self._shift) + 1)
        with self._lock:
            _fill_bits(self._bits, a, b, value)

    def clear(self) -> None:
        """Mark everything clean (hbitmap_reset_all)."""
        with self._lock:
            self._bits[:] = bytes(len(self._bits))

    def resize(self, new_size: int) -> None:
        """Follow a truncate of the node: bits past a shrunk end are dropped, new bits are
        clean (bdrv_dirty_bitmap_truncate)."""
        with self._lock:
            nbits = -(-new_size >> self._shift)
            nbytes = -(-nbits // 8)
            bits = self._bits
            if nbytes < len(bits):
                del bits[nbytes:]
            elif nbytes > len(bits):
                bits.extend(bytes(nbytes - len(bits)))
            if nbits & 7 and nbits < self._nbits:
                bits[-1] &= (1 << (nbits & 7)) - 1
            self.size = new_size
            self._nbits = nbits

    def merge_from(self, src: BdrvDirtyBitmap) -> None:
        """OR ``src`` into this bitmap; the granularities may differ, the sizes may not
        (hbitmap_merge)."""
        if src.size != self.size:
            raise _size_mismatch(self, src)
        if src.granularity == self.granularity:
            with src._lock:
                other = int.from_bytes(src._bits, "little")
            with self._lock:
                mine = int.from_bytes(self._bits, "little") | other
                self._bits[:] = mine.to_bytes(len(self._bits), "little")
            return
        for start, length in list(src.dirty_ranges()):
            self.set(start, length)

    def copy(self, name: str | None = None) -> BdrvDirtyBitmap:
        """An unattached copy of the bits and granularity (for backups of merge/clear)."""
        dup = BdrvDirtyBitmap(None, self.size, self.granularity, name)
        with self._lock:
            dup._bits[:] = self._bits
        return dup

    def restore_from(self, backup: BdrvDirtyBitmap) -> None:
        """Put back bits saved with :meth:`copy` (bdrv_restore_dirty_bitmap)."""
        if backup.size != self.size or backup.granularity != self.granularity:
            raise BlockError(errno.EINVAL, "backup does not match the bitmap")
        with self._lock:
            self._bits[:] = backup._bits

    # ------------------------------------------------------------------ serialization

    def serialization_unit(self) -> int:
        """Disk bytes one serialized byte covers: ranges passed to the serialization methods
        must start at a multiple of it (QEMU's bdrv_dirty_bitmap_serialization_align)."""
        return self.granularity * 8

    def _byte_range(self, offset: int, length: int) -> tuple[int, int]:
        unit = self.serialization_unit()
        if offset % unit or offset < 0 or length < 0:
            raise BlockError(errno.EINVAL, f"serialization range at {offset} not aligned to "
                             f"{unit} bytes")  # fmt: skip
        end = min(offset + length, self.size)
        first = offset // unit
        if end <= offset:
            return first, first
        nbits = -(-end >> self._shift)  # granules up to the end of the range
        return first, -(-nbits // 8)

    def serialization_size(self, offset: int, length: int) -> int:
        """Bytes :meth:`serialize_part` returns for the range."""
        a, b = self._byte_range(offset, length)
        return b - a

    def serialize_part(self, offset: int, length: int) -> bytes:
        """The on-disk bytes of ``[offset, offset+length)`` (clipped to the size)."""
        a, b = self._byte_range(offset, length)
        with self._lock:
            return bytes(self._bits[a:b])

    def deserialize_part(self, buf: bytes | bytearray | memoryview, offset: int,
                         length: int) -> None:  # fmt: skip
        """Load bits for ``[offset, offset+length)`` from their on-disk bytes; bits past
        the bitmap's end in ``buf`` are ignored."""
        a, b = self._byte_range(offset, length)
        with self._lock:
            self._bits[a:b] = bytes(buf[: b - a]).ljust(b - a, b"\0")
            self._trim()

    def deserialize_zeroes(self, offset: int, length: int) -> None:
        a, b = self._byte_range(offset, length)
        with self._lock:
            self._bits[a:b] = bytes(b - a)

    def deserialize_ones(self, offset: int, length: int) -> None:
        a, b = self._byte_range(offset, length)
        with self._lock:
            self._bits[a:b] = b"\xff" * (b - a)
            self._trim()

    def _trim(self) -> None:
        if self._nbits & 7 and self._bits:
            self._bits[-1] &= (1 << (self._nbits & 7)) - 1


def _size_mismatch(dest: BdrvDirtyBitmap, src: BdrvDirtyBitmap) -> BlockError:
    return BlockError(errno.EINVAL, f"Bitmaps are of different sizes (destination size is "
                      f"{dest.size}, source size is {src.size}) and can't be merged")  # fmt: skip


def _fill_bits(bits: bytearray, a: int, b: int, value: bool) -> None:
    """Set (or clear) bits ``[a, b)``."""
    if a >= b:
        return
    fa, fb = a >> 3, (b - 1) >> 3
    if fa == fb:
        mask = ((1 << (b - a)) - 1) << (a & 7)
        bits[fa] = bits[fa] | mask if value else bits[fa] & ~mask
        return
    head = (0xFF << (a & 7)) & 0xFF
    tail = (1 << (((b - 1) & 7) + 1)) - 1
    if value:
        bits[fa] |= head
        bits[fb] |= tail
        bits[fa + 1 : fb] = b"\xff" * (fb - fa - 1)
    else:
        bits[fa] &= ~head & 0xFF
        bits[fb] &= ~tail & 0xFF
        bits[fa + 1 : fb] = bytes(fb - fa - 1)


# -------------------------------------------------------------------------------------------
# Checks
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
def bdrv_dirty_bitmap_check(bitmap: BdrvDirtyBitmap, flags: BitmapCheck) -> None:
    """Refuse a bitmap that is busy, readonly or inconsistent, as ``flags`` asks, with
    QEMU's messages. Tier: I/O (pure)."""
    name = bitmap.name or ""
    if flags & BitmapCheck.BUSY and bitmap.busy:
        raise BlockError(errno.EBUSY, f"Bitmap '{name}' is currently in use by another "
                         "operation and cannot be used")  # fmt: skip
    if flags & BitmapCheck.RO and bitmap.readonly:
        raise BlockError(errno.EPERM, f"Bitmap '{name}' is readonly and cannot be modified")
    if flags & BitmapCheck.INCONSISTENT and bitmap.inconsistent:
        err = BlockError(errno.EINVAL, f"Bitmap '{name}' is inconsistent and cannot be used")
        err.hint = "Try block-dirty-bitmap-remove to delete this bitmap from disk\n"  # type: ignore[attr-defined]
        raise err


@api(Tier.IO)
def bdrv_has_readonly_bitmaps(bs: BlockDriverState) -> bool:
    """Whether any bitmap of ``bs`` is readonly (QEMU then refuses writes). Tier: I/O."""
    return any(b.readonly for b in bs.dirty_bitmaps)


# -------------------------------------------------------------------------------------------
# Global state: the set of bitmaps of a node
# -------------------------------------------------------------------------------------------


@api(Tier.GS)
def bdrv_find_dirty_bitmap(bs: BlockDriverState, name: str) -> BdrvDirtyBitmap | None:
    """The bitmap of ``bs`` called ``name``, or None. Tier: GS."""
    global_state_code("bdrv_find_dirty_bitmap")
    for bitmap in bs.dirty_bitmaps:
        if bitmap.name is not None and bitmap.name == name:
            return bitmap
    return None


@api(Tier.GS)
def bdrv_create_dirty_bitmap(bs: BlockDriverState, granularity: int,
                             name: str | None) -> BdrvDirtyBitmap:  # fmt: skip
    """Create an enabled, clean bitmap covering the node's current length. Tier: GS.

    ``name`` None makes an anonymous bitmap (for jobs). :raises BlockError: duplicate name
    ("Bitmap already exists: NAME"), name longer than 1023 bytes, granularity not a power
    of two of at least 512.
    """
    from .io import bdrv_getlength

    global_state_code("bdrv_create_dirty_bitmap")
    if name is not None:
        if bdrv_find_dirty_bitmap(bs, name) is not None:
            raise BlockError(errno.EEXIST, f"Bitmap already exists: {name}")
        if len(name.encode()) > BDRV_BITMAP_MAX_NAME_SIZE:
            raise BlockError(errno.EINVAL, f"Bitmap name too long: {name}")
    if bs.drv is None:
        raise NoMediumError("no medium", bs.node_name)
    size = bdrv_getlength(bs)
    bitmap = BdrvDirtyBitmap(bs, size, granularity, name)
    bs.dirty_bitmaps = [*bs.dirty_bitmaps, bitmap]
    return bitmap


@api(Tier.GS)
def bdrv_release_dirty_bitmap(bitmap: BdrvDirtyBitmap) -> None:
    """Detach ``bitmap`` from its node (it stops being marked). Tier: GS.

    :raises BlockError: the bitmap is busy.
    """
    global_state_code("bdrv_release_dirty_bitmap")
    if bitmap.busy:
        bdrv_dirty_bitmap_check(bitmap, BitmapCheck.BUSY)
    bs = bitmap.bs
    if bs is not None:
        bs.dirty_bitmaps = [b for b in bs.dirty_bitmaps if b is not bitmap]
    bitmap.bs = None


@api(Tier.GS)
def bdrv_release_named_dirty_bitmaps(bs: BlockDriverState) -> None:
    """Release every named bitmap that is not busy (done when a node closes). Tier: GS."""
    global_state_code("bdrv_release_named_dirty_bitmaps")
    keep = [b for b in bs.dirty_bitmaps if b.name is None or b.busy]
    for b in bs.dirty_bitmaps:
        if b not in keep:
            b.bs = None
    bs.dirty_bitmaps = keep


@api(Tier.GS)
def bdrv_enable_dirty_bitmap(bitmap: BdrvDirtyBitmap) -> None:
    """Let writes mark the bitmap again. Tier: GS. Refuses busy or inconsistent bitmaps
    (QMP's block-dirty-bitmap-enable)."""
    global_state_code("bdrv_enable_dirty_bitmap")
    bdrv_dirty_bitmap_check(bitmap, BitmapCheck.ALLOW_RO)
    bitmap.disabled = False


@api(Tier.GS)
def bdrv_disable_dirty_bitmap(bitmap: BdrvDirtyBitmap) -> None:
    """Stop marking the bitmap on writes. Tier: GS. Refuses busy or inconsistent bitmaps."""
    global_state_code("bdrv_disable_dirty_bitmap")
    bdrv_dirty_bitmap_check(bitmap, BitmapCheck.ALLOW_RO)
    bitmap.disabled = True


@api(Tier.GS)
def bdrv_clear_dirty_bitmap(bitmap: BdrvDirtyBitmap, backup: bool = False
                            ) -> BdrvDirtyBitmap | None:  # fmt: skip
    """Mark the whole bitmap clean; with ``backup`` return a copy of the old bits. Tier: GS.

    Refuses busy, readonly and inconsistent bitmaps.
    """
    global_state_code("bdrv_clear_dirty_bitmap")
    bdrv_dirty_bitmap_check(bitmap, BitmapCheck.DEFAULT)
    old = bitmap.copy() if backup else None
    bitmap.clear()
    return old


@api(Tier.GS)
def bdrv_merge_dirty_bitmap(dest: BdrvDirtyBitmap, src: BdrvDirtyBitmap, backup: bool = False
                            ) -> BdrvDirtyBitmap | None:  # fmt: skip
    """OR ``src`` into ``dest`` (same size; granularities may differ); with ``backup``
    return a copy of ``dest``'s old bits. Tier: GS.

    ``dest`` must not be busy, readonly or inconsistent; ``src`` not busy or inconsistent.
    """
    global_state_code("bdrv_merge_dirty_bitmap")
    bdrv_dirty_bitmap_check(dest, BitmapCheck.DEFAULT)
    bdrv_dirty_bitmap_check(src, BitmapCheck.ALLOW_RO)
    if src.size != dest.size:
        raise _size_mismatch(dest, src)
    old = dest.copy() if backup else None
    dest.merge_from(src)
    return old


# -------------------------------------------------------------------------------------------
# Persistent bitmaps (stored by the format driver)
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_remove_persistent_dirty_bitmap(bs: BlockDriverState, name: str) -> None:
    """Delete the stored copy of bitmap ``name`` from the image. Tier: I/O.

    :raises NotSupportedError: "Can't remove persistent bitmaps from <node>" when the driver
        has no ``bdrv_co_remove_persistent_dirty_bitmap``.
    """
    assert_bdrv_graph_readable("bdrv_co_remove_persistent_dirty_bitmap")
    drv = bs.drv
    if drv is None:
        raise NoMediumError(f"Can't find node '{bs.node_name}'", bs.node_name)
    if drv.bdrv_co_remove_persistent_dirty_bitmap is None:
        raise NotSupportedError(f"Can't remove persistent bitmaps from {bs.node_name}",
                                bs.node_name)  # fmt: skip
    await drv.bdrv_co_remove_persistent_dirty_bitmap(bs, name)


bdrv_remove_persistent_dirty_bitmap = co_wrapper(
    bdrv_co_remove_persistent_dirty_bitmap, "bdrv_remove_persistent_dirty_bitmap", rdlock=True
)

"""qcow2 on-disk layouts: header, header extensions, feature bits and table entry masks."""

from __future__ import annotations

import enum
import errno
import struct

import attrs

from blockcore.errors import BlockError, ImageCorruptError, NotSupportedError

# -------------------------------------------------------------------------------------------
# Constants (docs/interop/qcow2.txt)
# -------------------------------------------------------------------------------------------

QCOW_MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU refuses L1 tables above 32 MiB and refcount tables above 8 MiB; so do we, which
#: also bounds every allocation made from header values.
MAX_L1_SIZE = 32 << 20
MAX_REFTABLE_SIZE = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_FILE_NAME = 1023
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
#: What QEMU 7.2 writes: 104 bytes plus the compression type byte, padded to 8.
V3_HEADER_LENGTH = 112

# Table entry bits and masks.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COMPRESSED_OFFSET_SIZE_MASK = 0x3FFFFFFFFFFFFFFF
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
L2_BITMAP_ALL_ZERO = 0xFFFFFFFF << 32
#: Compressed data is measured in 512-byte sectors whatever the cluster size.
COMPRESSED_SECTOR_SIZE = 512


class Incompat(enum.IntFlag):
    """Incompatible feature bits (header offset 72)."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


class Compat(enum.IntFlag):
    """Compatible feature bits (header offset 80)."""

    LAZY_REFCOUNTS = 1 << 0


class Autoclear(enum.IntFlag):
    """Autoclear feature bits (header offset 88)."""

    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


INCOMPAT_MASK = 0x1F
COMPAT_MASK = 0x1
AUTOCLEAR_MASK = 0x3


class CompressionType(enum.IntEnum):
    ZLIB = 0
    ZSTD = 1


class ExtType(enum.IntEnum):
    """Header extension types."""

    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_TABLE = 0x6803F857
    CRYPTO_HEADER = 0x0537BE77
    BITMAPS = 0x23852875
    DATA_FILE = 0x44415441


#: (type, bit, name) as QEMU 7.2 writes them into the feature name table.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 more bytes: features, refcount_order, header_length
_EXT = struct.Struct(">II")


def _corrupt(msg: str, filename: str | None) -> ImageCorruptError:
    return ImageCorruptError(msg, filename)


def _invalid(msg: str, filename: str | None) -> BlockError:
    return BlockError(errno.EINVAL, msg, filename)


#: QEMU's limits on persistent bitmaps (QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE)
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS


def _check_bitmaps_extension(data: bytes, header: QCowHeader, filename: str | None) -> None:
    """Refuse a bitmaps extension as QEMU's qcow2_read_extensions does, in its order and
    words; a stale one (autoclear bit cleared by a program without bitmap support) is not
    looked at, only dropped later."""

    def refuse(msg: str) -> BlockError:
        exc = _invalid(msg, filename)
        exc.verbatim = True  # type: ignore[attr-defined]  # QEMU's lowercase start
        return exc

    if len(data) != 24:
        raise refuse("bitmaps_ext: Invalid extension length")
    if not header.autoclear_features & Autoclear.BITMAPS:
        return
    nb, reserved, size, offset = struct.unpack(">IIQQ", data)
    if reserved:
        raise refuse("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise refuse(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported "
                     f"maximum of {MAX_BITMAPS}")  # fmt: skip
    if nb == 0:
        raise refuse("found bitmaps extension with zero bitmaps")
    if offset & (header.cluster_size - 1):
        raise refuse("bitmaps_ext: invalid bitmap directory offset")
    if size > MAX_BITMAP_DIRECTORY_SIZE:
        raise refuse(f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum "
                     f"supported size ({MAX_BITMAP_DIRECTORY_SIZE})")  # fmt: skip


@attrs.frozen
class HeaderExtension:
    """One header extension, kept byte for byte (unknown types included)."""

    type: int
    data: bytes

    def pack(self) -> bytes:
        pad = -len(self.data) % 8
        return _EXT.pack(self.type, len(self.data)) + self.data + bytes(pad)


def feature_table_extension() -> HeaderExtension:
    """The feature name table QEMU writes into every v3 image."""
    data = b"".join(
        struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES
    )
    return HeaderExtension(ExtType.FEATURE_TABLE, data)


@attrs.frozen
class QCowHeader:
    """The qcow2 header with its extensions and backing file name (all of cluster 0 we use).

    Build it from bytes with :meth:`unpack`, change it with :func:`attrs.evolve`, write it
    with :meth:`pack`.
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    #: Header bytes past offset 105 up to header_length (padding and unknown additional
    #: fields), preserved when the header is written back.
    extra_fields: bytes = b""
    extensions: tuple[HeaderExtension, ...] = ()
    backing_file: str | None = None

    # ---------------------------------------------------------------- derived values

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & Incompat.EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    def extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(ExtType.BACKING_FORMAT)
        return ext.data.decode("utf-8", "replace") if ext is not None else None

    @property
    def data_file(self) -> str | None:
        ext = self.extension(ExtType.DATA_FILE)
        return ext.data.decode("utf-8", "replace") if ext is not None else None

    def feature_name(self, kind: int, bit: int) -> str | None:
        """The name the image's own feature table gives a bit, if it has one."""
        ext = self.extension(ExtType.FEATURE_TABLE)
        if ext is None:
            return None
        for pos in range(0, len(ext.data) - 47, 48):
            if ext.data[pos] == kind and ext.data[pos + 1] == bit:
                return ext.data[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
        return None

    # ---------------------------------------------------------------- parsing

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, filename: str | None = None) -> QCowHeader:
        """Parse and validate the header at the start of ``buf`` (the image's cluster 0, or
        at least its first ``header_length`` bytes plus extensions and backing name).

        :raises BlockError: EINVAL for a file that is not qcow2 or not valid,
            ENOTSUP for features we do not implement, naming the value and the rule.
        """
        buf = bytes(buf)
        if len(buf) < V2_HEADER_LENGTH:
            raise _invalid(f"image is not in qcow2 format (only {len(buf)} header bytes)", filename)
        (magic, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf)  # fmt: skip
        if magic != QCOW_MAGIC:
            # QEMU's words exactly (qemu-img prints them): no magic value
            raise _invalid("image is not in qcow2 format", filename)
        if version not in (2, 3):
            raise NotSupportedError(f"unsupported qcow2 version {version}", filename)
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise _invalid(
                f"cluster_bits {cluster_bits} out of range "
                f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", filename
            )  # fmt: skip
        cluster_size = 1 << cluster_bits
        if version == 2:
            incompat = compat = autoclear = 0
            refcount_order, header_length, compression_type, extra = 4, V2_HEADER_LENGTH, 0, b""
        else:
            if len(buf) < V3_MIN_HEADER_LENGTH:
                raise _invalid(f"qcow2 v3 header truncated at {len(buf)} bytes", filename)
            incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(buf, 72)
            if header_length < V3_MIN_HEADER_LENGTH:
                raise _invalid(f"header_length {header_length} below 104", filename)
            if header_length > cluster_size:
                raise _invalid(
                    f"header_length {header_length} exceeds cluster size {cluster_size}", filename
                )
            if len(buf) < header_length:
                raise _invalid(f"header truncated: {len(buf)} of {header_length} bytes", filename)
            compression_type = buf[104] if header_length > 104 else 0
            extra = buf[105:header_length] if header_length > 105 else b""
        if refcount_order > 6:
            raise _invalid(f"refcount_order {refcount_order} out of range 0..6", filename)
        unknown = incompat & ~INCOMPAT_MASK
        if unknown:
            names = []
            for bit in range(64):
                if unknown & (1 << bit):
                    name = None
                    try:
                        name = cls._feature_name_from_buf(buf, header_length, cluster_size, bit)
                    except BlockError:
                        pass
                    names.append(f"bit {bit}" + (f" ({name})" if name else ""))
            raise NotSupportedError(
                f"unsupported qcow2 incompatible feature {', '.join(names)}", filename
            )
        if crypt != 0:
            raise NotSupportedError(f"encrypted images are not supported (crypt_method {crypt})",
                                    filename)  # fmt: skip
        if incompat & Incompat.EXTL2 and cluster_bits < 14:
            raise _invalid(
                f"extended L2 entries need cluster_bits >= 14, not {cluster_bits}", filename
            )
        if compression_type not in (0, 1):
            raise NotSupportedError(f"unknown compression type {compression_type}", filename)
        if compression_type != 0 and not incompat & Incompat.COMPRESSION:
            raise _invalid(
                f"compression type {compression_type} set without the compression type "
                "incompatible bit", filename
            )  # fmt: skip
        if compression_type == 0 and incompat & Incompat.COMPRESSION:
            raise _invalid("compression type bit set with compression type zlib", filename)
        if autoclear & Autoclear.DATA_FILE_RAW and not incompat & Incompat.DATA_FILE:
            raise _invalid("data-file-raw autoclear bit set without an external data file",
                           filename)  # fmt: skip

        # Sizes and table locations: refuse absurd values before anything is allocated.
        if size >= 1 << 63:
            raise _invalid(f"virtual size {size} too large", filename)
        if l1_size > MAX_L1_SIZE // 8:
            raise _invalid(f"active L1 table too large ({l1_size} entries)", filename)
        l2_bits = cluster_bits - (4 if incompat & Incompat.EXTL2 else 3)
        shift = cluster_bits + l2_bits
        need_l1 = -(-size >> shift) if shift < 64 else 1
        if size and need_l1 > l1_size:
            raise _corrupt(
                f"L1 table is too small: {l1_size} entries for virtual size {size}", filename
            )
        if rt_clusters > MAX_REFTABLE_SIZE // cluster_size:
            raise _invalid(f"refcount table too large ({rt_clusters} clusters)", filename)
        for what, off, nbytes in (
            ("L1 table", l1_off, l1_size * 8),
            ("refcount table", rt_off, rt_clusters * cluster_size),
        ):
            if off % cluster_size:
                raise _corrupt(f"{what} offset {off:#x} not aligned to cluster size", filename)
            if off + nbytes >= 1 << 63:
                raise _corrupt(f"{what} at {off:#x} extends beyond the maximum file size", filename)
        if rt_clusters == 0 or rt_off == 0:
            raise _corrupt("image has no refcount table", filename)
        # the snapshot table pointer is judged by the open (not in check mode, as QEMU),
        # see snaptable.read_at_open
        if l1_size and l1_off == 0:
            raise _corrupt("L1 table offset is 0", filename)

        # Extensions end at the backing file name, or at the end of cluster 0.
        ext_end = cluster_size
        if bf_off:
            if bf_size > MAX_BACKING_FILE_NAME or bf_off + bf_size > cluster_size:
                raise _invalid(f"backing file name too long ({bf_size} bytes at {bf_off})",
                               filename)  # fmt: skip
            ext_end = bf_off
        exts = cls._parse_extensions(buf, header_length, min(ext_end, len(buf)), filename)
        backing_file = None
        if bf_off:
            if bf_off + bf_size > len(buf):
                raise _invalid("backing file name truncated", filename)
            backing_file = buf[bf_off : bf_off + bf_size].decode("utf-8", "surrogateescape")
        header = cls(
            version=version, backing_file_offset=bf_off, backing_file_size=bf_size,
            cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
            l1_table_offset=l1_off, refcount_table_offset=rt_off,
            refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap, snapshots_offset=snap_off,
            incompatible_features=incompat, compatible_features=compat,
            autoclear_features=autoclear, refcount_order=refcount_order,
            header_length=header_length, compression_type=compression_type, extra_fields=extra,
            extensions=tuple(exts), backing_file=backing_file,
        )  # fmt: skip
        ext = header.extension(ExtType.BITMAPS)
        if ext is not None:
            _check_bitmaps_extension(ext.data, header, filename)
        return header

    @staticmethod
    def _parse_extensions(
        buf: bytes, start: int, end: int, filename: str | None
    ) -> list[HeaderExtension]:
        exts: list[HeaderExtension] = []
        seen: set[int] = set()
        pos = start
        while True:
            if pos + 8 > end:
                # QEMU accepts a missing end marker when the area is used up exactly.
                if pos >= end:
                    break
                raise _invalid(f"header extension at {pos:#x} truncated", filename)
            ext_type, ext_len = _EXT.unpack_from(buf, pos)
            pos += 8
            if ext_type == ExtType.END:
                break
            if ext_len > end - pos:
                raise _invalid(
                    f"header extension {ext_type:#010x} length {ext_len} runs past "
                    f"offset {end:#x}", filename
                )  # fmt: skip
            if ext_type in seen and ext_type in ExtType.__members__.values():
                raise _invalid(f"duplicate header extension {ext_type:#010x}", filename)
            seen.add(ext_type)
            exts.append(HeaderExtension(ext_type, buf[pos : pos + ext_len]))
            pos += (ext_len + 7) & ~7
        return exts

    @classmethod
    def _feature_name_from_buf(cls, buf: bytes, start: int, cluster_size: int, bit: int) -> str | None:
        for ext in cls._parse_extensions(buf, start, min(cluster_size, len(buf)), None):
            if ext.type == ExtType.FEATURE_TABLE:
                for pos in range(0, len(ext.data) - 47, 48):
                    if ext.data[pos] == 0 and ext.data[pos + 1] == bit:
                        raw = ext.data[pos + 2 : pos + 48].split(b"\0", 1)[0]
                        return raw.decode("utf-8", "replace")
        return None

    # ---------------------------------------------------------------- writing

    def pack(self) -> bytes:
        """Header, extensions, end marker and backing file name, as they go into cluster 0.

        ``backing_file_offset``/``backing_file_size`` are recomputed from where the name
        lands; raises EINVAL if it all does not fit in cluster 0.
        """
        if self.version == 2:
            head_len = V2_HEADER_LENGTH
        else:
            head_len = self.header_length
        body = bytearray(head_len)
        ext_area = b"".join(e.pack() for e in self.extensions) + _EXT.pack(0, 0)
        name = (self.backing_file or "").encode("utf-8", "surrogateescape")
        if len(name) > MAX_BACKING_FILE_NAME:
            raise _invalid(f"backing file name too long ({len(name)} bytes, at most 1023)", None)
        bf_off = head_len + len(ext_area) if self.backing_file is not None else 0
        total = head_len + len(ext_area) + len(name)
        if total > self.cluster_size:
            raise _invalid(
                f"header with extensions needs {total} bytes, more than cluster size "
                f"{self.cluster_size}", None
            )  # fmt: skip
        _V2.pack_into(
            body, 0, QCOW_MAGIC, self.version, bf_off, len(name) if bf_off else 0,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset,
        )  # fmt: skip
        if self.version >= 3:
            _V3.pack_into(body, 72, self.incompatible_features, self.compatible_features,
                          self.autoclear_features, self.refcount_order, head_len)  # fmt: skip
            if head_len > 104:
                body[104] = self.compression_type
                extra = self.extra_fields[: head_len - 105]
                body[105 : 105 + len(extra)] = extra
        return bytes(body) + ext_area + name

    def with_standard_extensions(
        self, backing_format: str | None, data_file: str | None
    ) -> QCowHeader:
        """Rebuild the extension list in QEMU's order: backing format, data file, crypto,
        feature table (v3), bitmaps, then unknown ones, keeping what we do not manage."""
        keep = {e.type: e for e in self.extensions}
        out: list[HeaderExtension] = []
        if backing_format:
            out.append(HeaderExtension(ExtType.BACKING_FORMAT, backing_format.encode()))
        if data_file:
            out.append(HeaderExtension(ExtType.DATA_FILE, data_file.encode()))
        if ExtType.CRYPTO_HEADER in keep:
            out.append(keep[ExtType.CRYPTO_HEADER])
        rest = [keep[ExtType.BITMAPS]] if ExtType.BITMAPS in keep else []
        known = {int(t) for t in ExtType}
        rest.extend(e for e in self.extensions if e.type not in known)
        if self.version >= 3:
            table = keep.get(ExtType.FEATURE_TABLE) or feature_table_extension()
            used = self.header_length + sum(len(e.pack()) for e in out + rest) + 8
            used += len((self.backing_file or "").encode("utf-8", "surrogateescape"))
            # The table is optional: like qemu-img 7.2, leave it out with clusters of 4 KiB
            # or less (observed for create, snapshot, bitmap and amend) and when cluster 0
            # is too small.
            if self.cluster_size > 4096 and used + len(table.pack()) < self.cluster_size:
                out.append(table)
        return attrs.evolve(self, extensions=tuple(out + rest))


# -------------------------------------------------------------------------------------------
# Compressed cluster descriptors
# -------------------------------------------------------------------------------------------


def csize_shift(cluster_bits: int) -> int:
    """Bit where the sector count starts in a compressed descriptor."""
    return 62 - (cluster_bits - 8)


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """Host byte offset and byte count to read for a compressed L2 entry.

    The count covers whole 512-byte sectors from the one holding the start, so it may
    include bytes of the next compressed cluster; decompression stops at a full cluster.
    """
    shift = csize_shift(cluster_bits)
    offset = entry & ((1 << shift) - 1)
    nb_sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, nb_sectors * COMPRESSED_SECTOR_SIZE - (offset & (COMPRESSED_SECTOR_SIZE - 1))


def encode_compressed(offset: int, nbytes: int, cluster_bits: int) -> int:
    """The L2 entry (with the compressed flag) for ``nbytes`` of data at host ``offset``."""
    shift = csize_shift(cluster_bits)
    if offset >> shift:
        raise _invalid(f"compressed data offset {offset:#x} beyond what the entry holds", None)
    extra_sectors = (offset + nbytes - 1) // COMPRESSED_SECTOR_SIZE - offset // COMPRESSED_SECTOR_SIZE
    return OFLAG_COMPRESSED | (extra_sectors << shift) | offset


# -------------------------------------------------------------------------------------------
# New images and space estimates
# -------------------------------------------------------------------------------------------


def empty_image(*, cluster_bits: int = 16, version: int = 3, refcount_order: int = 4,
                lazy_refcounts: bool = False, extended_l2: bool = False,
                compression_type: int = 0, backing_file: str | None = None,
                backing_format: str | None = None, data_file: str | None = None,
                data_file_raw: bool = False) -> bytes:  # fmt: skip
    """Clusters 0..2 of a new image of size 0 (header, refcount table, one refcount block),
    laid out as qemu-img does; the driver then grows it to its size."""
    cs = 1 << cluster_bits
    incompat = 0
    if extended_l2:
        incompat |= Incompat.EXTL2
    if compression_type:
        incompat |= Incompat.COMPRESSION
    if data_file:
        incompat |= Incompat.DATA_FILE
    header = QCowHeader(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=0, crypt_method=0, l1_size=0, l1_table_offset=0, refcount_table_offset=cs,
        refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0,
        incompatible_features=incompat if version >= 3 else 0,
        compatible_features=Compat.LAZY_REFCOUNTS if lazy_refcounts else 0,
        autoclear_features=Autoclear.DATA_FILE_RAW if data_file_raw else 0,
        refcount_order=refcount_order,
        header_length=V3_HEADER_LENGTH if version >= 3 else V2_HEADER_LENGTH,
        compression_type=compression_type, extra_fields=bytes(7) if version >= 3 else b"",
        backing_file=backing_file,
    )  # fmt: skip
    header = header.with_standard_extensions(backing_format, data_file)
    out = bytearray(3 * cs)
    head = header.pack()
    out[: len(head)] = head
    struct.pack_into(">Q", out, cs, 2 * cs)  # refcount table entry 0 -> block at cluster 2
    # Refcount 1 for clusters 0, 1, 2 in the block.
    from .refcount import set_entry

    block = bytearray(cs)
    for i in range(3):
        set_entry(block, i, refcount_order, 1)
    out[2 * cs :] = block
    return bytes(out)


def refcount_metadata_counts(clusters: int, cluster_size: int, refcount_order: int,
                             generous: bool = False) -> tuple[int, int]:  # fmt: skip
    """Refcount blocks and table clusters needed to cover ``clusters`` clusters plus
    themselves (fixed point, as QEMU's qcow2_refcount_metadata_size); ``generous`` adds
    room for half the table again once, as QEMU's generous_increase."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    last, n = -1, 0
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n, generous = 0, False  # one more round with the extra room
    return blocks, table


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks needed to cover ``clusters`` clusters plus
    themselves (fixed point, as QEMU's qcow2_refcount_metadata_size)."""
    return sum(refcount_metadata_counts(clusters, cluster_size, refcount_order)) * cluster_size


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:  # fmt: skip
    """Size of a fully allocated image of ``total_size`` bytes (qcow2_calc_prealloc_size)."""
    entry = 16 if extended_l2 else 8
    aligned = -(-total_size // cluster_size) * cluster_size
    meta = cluster_size  # header
    nl2e = aligned // cluster_size
    per_l2 = cluster_size // entry
    nl2e = -(-nl2e // per_l2) * per_l2
    meta += nl2e * entry
    nl1e = nl2e * entry // cluster_size
    per_l1 = cluster_size // 8
    nl1e = -(-nl1e // per_l1) * per_l1
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned

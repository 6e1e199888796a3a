"""format.py and cluster.py against images made by qemu-img and qemu-io."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import attrs
import pytest
import zstandard

from blockcore.errors import BlockError, ImageCorruptError, NotSupportedError
from blockcore_qcow2 import format as fmt
from blockcore_qcow2.cluster import (
    ClusterType,
    Geometry,
    SubclusterType,
    cluster_type,
    subcluster_run,
    subcluster_type,
)
from blockcore_qcow2.format import QCowHeader

from .conftest import create, info, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu

CREATE_CASES = [
    "",
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=4096",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=8",
    "refcount_bits=32",
    "refcount_bits=64",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "compression_type=zstd",
    "lazy_refcounts=on",
    "cluster_size=1k,refcount_bits=4,compression_type=zstd,lazy_refcounts=on",
]


def _header(path: Path) -> tuple[QCowHeader, bytes]:
    data = path.read_bytes()
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    buf = data[: 1 << cluster_bits]
    return QCowHeader.unpack(buf, str(path)), buf


def _compare_with_info(h: QCowHeader, path: Path) -> None:
    js = info(path)
    assert js["virtual-size"] == h.size
    assert js["cluster-size"] == h.cluster_size
    spec = js["format-specific"]["data"]
    assert spec["compat"] == ("0.10" if h.version == 2 else "1.1")
    assert spec["refcount-bits"] == h.refcount_bits
    assert spec["compression-type"] == ("zstd" if h.compression_type else "zlib")
    if h.version == 3:
        assert spec["lazy-refcounts"] == bool(h.compatible_features & fmt.Compat.LAZY_REFCOUNTS)
        assert spec["extended-l2"] == h.extended_l2
        assert spec.get("data-file") == h.data_file
    assert js.get("backing-filename") == h.backing_file
    assert js.get("backing-filename-format") == h.backing_format


@pytest.mark.parametrize("opts", CREATE_CASES)
def test_header_matches_qemu_img_info(tmp_path: Path, opts: str) -> None:
    img = create(tmp_path / "a.qcow2", "5M", opts)
    h, buf = _header(img)
    _compare_with_info(h, img)
    assert h.pack() == buf[: len(h.pack())]


def test_backing_and_data_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    img = create(tmp_path / "top.qcow2", "1M", "", "-b", str(base), "-F", "raw")
    h, buf = _header(img)
    assert h.backing_file == str(base)
    assert h.backing_format == "raw"
    assert h.backing_file_offset == 0x210
    _compare_with_info(h, img)
    assert h.pack() == buf[: len(h.pack())]

    img2 = create(tmp_path / "d.qcow2", "1M", f"data_file={tmp_path / 'd.raw'},data_file_raw=on")
    h2, buf2 = _header(img2)
    assert h2.data_file == str(tmp_path / "d.raw")
    assert h2.incompatible_features & fmt.Incompat.DATA_FILE
    assert h2.autoclear_features & fmt.Autoclear.DATA_FILE_RAW
    _compare_with_info(h2, img2)
    assert h2.pack() == buf2[: len(h2.pack())]


def test_standard_extensions_rebuild_like_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create(base, "1M")
    img = create(tmp_path / "top.qcow2", "1M", "", "-b", str(base), "-F", "qcow2")
    h, buf = _header(img)
    stripped = attrs.evolve(h, extensions=())
    rebuilt = stripped.with_standard_extensions("qcow2", None)
    assert rebuilt.pack() == buf[: len(rebuilt.pack())]


def test_unknown_extension_preserved(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", "1M")
    h, _ = _header(img)
    odd = fmt.HeaderExtension(0x12345678, b"hello")
    h2 = attrs.evolve(h, extensions=(*h.extensions, odd))
    again = QCowHeader.unpack(h2.pack() + bytes(100))
    assert again.extension(0x12345678) == odd
    assert again.with_standard_extensions(None, None).extension(0x12345678) == odd


def _patch(buf: bytes, off: int, fmt_: str, value: int) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt_, b, off, value)
    return bytes(b)


def test_validation_errors(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", "1M")
    _, buf = _header(img)
    with pytest.raises(BlockError, match="not in qcow2 format"):
        QCowHeader.unpack(b"\0" * 512)
    with pytest.raises(BlockError, match="cluster_bits 30 out of range 9..21"):
        QCowHeader.unpack(_patch(buf, 20, ">I", 30))
    with pytest.raises(NotSupportedError, match="unsupported qcow2 version 4"):
        QCowHeader.unpack(_patch(buf, 4, ">I", 4))
    with pytest.raises(NotSupportedError, match=r"incompatible feature bit 7"):
        QCowHeader.unpack(_patch(buf, 72, ">Q", 1 << 7))
    # the name comes from the image's own feature table (entry 4 renumbered to bit 9)
    renamed = _patch(_patch(buf, 0x139, ">B", 9), 72, ">Q", 1 << 9)
    with pytest.raises(NotSupportedError, match=r"bit 9 \(extended L2 entries\)"):
        QCowHeader.unpack(renamed)
    with pytest.raises(BlockError, match="active L1 table too large"):
        QCowHeader.unpack(_patch(buf, 36, ">I", 0xFFFFFFFF))
    with pytest.raises(BlockError, match="refcount table too large"):
        QCowHeader.unpack(_patch(buf, 56, ">I", 0xFFFFFFF))
    with pytest.raises(ImageCorruptError, match="L1 table is too small"):
        QCowHeader.unpack(_patch(buf, 24, ">Q", 1 << 50))
    with pytest.raises(ImageCorruptError, match="not aligned"):
        QCowHeader.unpack(_patch(buf, 40, ">Q", 0x30001))
    with pytest.raises(BlockError, match="refcount_order 7"):
        QCowHeader.unpack(_patch(buf, 96, ">I", 7))
    with pytest.raises(NotSupportedError, match="encrypted"):
        QCowHeader.unpack(_patch(buf, 32, ">I", 1))
    with pytest.raises(BlockError, match="length .* runs past"):
        QCowHeader.unpack(_patch(buf, 0x74, ">I", 0x100000))
    with pytest.raises(BlockError, match="header_length 100 below 104"):
        QCowHeader.unpack(_patch(buf, 100, ">I", 100))


def test_every_header_byte_fuzzed_gives_oserror_only(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", "1M", "", "-u", "-b", "x.raw", "-F", "raw")
    _, buf = _header(img)
    for pos in range(0, 0x220):
        for val in (0x00, 0xFF, 0x80, 0x01):
            b = bytearray(buf)
            b[pos] = val
            try:
                QCowHeader.unpack(bytes(b))
            except OSError:
                pass


def _l2_entries(path: Path, geo: Geometry, h: QCowHeader) -> list[tuple[int, int]]:
    data = path.read_bytes()
    l1 = struct.unpack_from(f">{h.l1_size}Q", data, h.l1_table_offset)
    l2_off = l1[0] & fmt.L1E_OFFSET_MASK
    out = []
    for i in range(geo.l2_size):
        pos = l2_off + i * geo.l2_entry_size
        entry = struct.unpack_from(">Q", data, pos)[0]
        bitmap = struct.unpack_from(">Q", data, pos + 8)[0] if geo.extended_l2 else 0
        out.append((entry, bitmap))
    return out


def test_l2_decoding_standard(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", "4M")
    qemu_io(img, "write -P 1 0 64k", "write -z 64k 64k", "write -P 2 128k 64k",
            "write -z -u 128k 64k", "write -P 3 192k 64k", "write -z 192k 64k")
    h, _ = _header(img)
    geo = Geometry.from_header(h)
    l2 = _l2_entries(img, geo, h)
    assert cluster_type(l2[0][0], geo) is ClusterType.NORMAL
    assert l2[0][0] & fmt.OFLAG_COPIED
    assert cluster_type(l2[1][0], geo) is ClusterType.ZERO_PLAIN
    assert cluster_type(l2[2][0], geo) is ClusterType.ZERO_PLAIN
    assert cluster_type(l2[3][0], geo) is ClusterType.ZERO_ALLOC
    assert cluster_type(l2[4][0], geo) is ClusterType.UNALLOCATED
    assert subcluster_type(l2[3][0], 0, 0, geo) is SubclusterType.ZERO_ALLOC


def test_l2_decoding_extended(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", "4M", "extended_l2=on")
    qemu_io(img, "write 2k 4k", "write -z 16k 2k")
    h, _ = _header(img)
    geo = Geometry.from_header(h)
    assert geo.subcluster_size == 2048 and geo.l2_size == 4096
    entry, bitmap = _l2_entries(img, geo, h)[0]
    assert bitmap == 0x0000010000000006
    assert subcluster_type(entry, bitmap, 0, geo) is SubclusterType.UNALLOCATED_ALLOC
    assert subcluster_run(entry, bitmap, 1, geo) == (SubclusterType.NORMAL, 2)
    assert subcluster_run(entry, bitmap, 3, geo) == (SubclusterType.UNALLOCATED_ALLOC, 5)
    assert subcluster_run(entry, bitmap, 8, geo) == (SubclusterType.ZERO_ALLOC, 1)
    assert subcluster_run(entry, bitmap, 9, geo) == (SubclusterType.UNALLOCATED_ALLOC, 23)
    assert subcluster_type(entry, bitmap | (1 << 8), 8, geo) is SubclusterType.INVALID
    assert subcluster_type(0, 1, 0, geo) is SubclusterType.INVALID
    assert subcluster_type(0, 1 << 33, 1, geo) is SubclusterType.ZERO_PLAIN


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", ["4k", "64k", "2M"])
def test_compressed_descriptor(tmp_path: Path, ctype: str, cluster_size: str) -> None:
    raw = tmp_path / "in.raw"
    pattern = (b"blockcore " * 300000)[: 4 << 20]
    raw.write_bytes(pattern)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cluster_size}", str(raw), str(img))
    h, _ = _header(img)
    geo = Geometry.from_header(h)
    entry, _ = _l2_entries(img, geo, h)[0]
    assert cluster_type(entry, geo) is ClusterType.COMPRESSED
    off, nbytes = fmt.decode_compressed(entry & fmt.L2E_COMPRESSED_OFFSET_SIZE_MASK, h.cluster_bits)
    data = img.read_bytes()[off : off + nbytes]
    if ctype == "zlib":
        out = zlib.decompressobj(-12).decompress(data, geo.cluster_size)
    else:
        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)[: geo.cluster_size]
    assert out == pattern[: geo.cluster_size]
    clean = entry & fmt.L2E_COMPRESSED_OFFSET_SIZE_MASK
    assert fmt.encode_compressed(off, nbytes - (-(off + nbytes) % 512), h.cluster_bits) >= 0
    assert fmt.decode_compressed(clean, h.cluster_bits) == (off, nbytes)


def test_encode_decode_compressed_roundtrip() -> None:
    for bits in (9, 12, 16, 21):
        for off, n in ((0x12345, 100), (0x50000, 512), (0x501FF, 1), (0x10000, 3000)):
            if n > (1 << bits):
                continue
            e = fmt.encode_compressed(off, n, bits)
            got_off, got_n = fmt.decode_compressed(e & fmt.L2E_COMPRESSED_OFFSET_SIZE_MASK, bits)
            assert got_off == off and got_n >= n and (got_off + got_n) % 512 == 0


def test_geometry_helpers() -> None:
    g = Geometry(16)
    assert g.l2_size == 8192 and g.l1_entry_span() == 512 << 20
    assert g.offset_to_l1_index((512 << 20) + 5) == 1
    assert g.offset_to_l2_index(3 << 16) == 3
    assert g.size_to_l1(1) == 1 and g.size_to_l1(0) == 0
    assert g.vm_state_offset(64 << 20) == 512 << 20
    e = Geometry(16, extended_l2=True)
    assert e.l2_size == 4096 and e.offset_to_sc_index(0x1800) == 3

"""Header extensions qcow2 does not know are kept, byte for byte, across every header rewrite
blockcore does (as QEMU keeps ``unknown_header_ext`` in qcow2_update_header). Each operation
also runs through qemu-img on a copy: both must keep the extension and pass check."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blockcore import BlockBackend, OpenFlags

from .conftest import check_clean, create, image_tool, qemu_io, requires_qemu

pytestmark = requires_qemu

MAGIC = 0x0B10CC0E  # not one of QEMU's extension types
DATA = b"unknown extension, kept!"  # 24 bytes: no padding needed
DATA_ODD = b"odd length 13"  # padded to 16 on disk


def _extensions(path: Path) -> list[tuple[int, bytes]]:
    b = path.read_bytes()[:65536]
    version = struct.unpack_from(">I", b, 4)[0]
    pos = 72 if version == 2 else struct.unpack_from(">I", b, 100)[0]
    out = []
    while True:
        typ, n = struct.unpack_from(">II", b, pos)
        if typ == 0:
            return out
        out.append((typ, b[pos + 8 : pos + 8 + n]))
        pos += 8 + (n + 7) // 8 * 8


def _add_extension(path: Path, typ: int, data: bytes) -> None:
    """Insert an extension before the end marker (the image has no backing file name)."""
    b = bytearray(path.read_bytes())
    version = struct.unpack_from(">I", b, 4)[0]
    pos = 72 if version == 2 else struct.unpack_from(">I", b, 100)[0]
    while struct.unpack_from(">I", b, pos)[0]:
        pos += 8 + (struct.unpack_from(">I", b, pos + 4)[0] + 7) // 8 * 8
    padded = data + bytes(-len(data) % 8)
    b[pos : pos + 8 + len(padded) + 8] = struct.pack(">II", typ, len(data)) + padded + bytes(8)
    path.write_bytes(bytes(b))


# name -> (create options, image-tool arguments before the filename, after it)
OPERATIONS = {
    "resize-grow-l1": ("", ["resize"], ["20G"]),  # new L1 table and size in the header
    "resize-shrink": ("", ["resize", "--shrink"], ["1M"]),
    "amend-lazy-on": ("", ["amend", "-o", "lazy_refcounts=on"], []),
    "amend-refcount-bits": ("", ["amend", "-o", "refcount_bits=4"], []),
    "amend-size": ("", ["amend", "-o", "size=32M"], []),
    "amend-compat-0.10": ("", ["amend", "-o", "compat=0.10"], []),
    "amend-compat-1.1": ("compat=0.10", ["amend", "-o", "compat=1.1"], []),
    "snapshot-create": ("", ["snapshot", "-c", "s1"], []),
    "bitmap-add": ("", ["bitmap", "--add"], ["b0"]),
    "rebase-unsafe": ("", ["rebase", "-u", "-b", "", "-F", "raw"], []),
}


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("data", [DATA, DATA_ODD], ids=["len24", "len13"])
def test_unknown_extension_survives_header_rewrites(tmp_path: Path, op: str, data: bytes) -> None:
    opts, before, after = OPERATIONS[op]
    for tool in ("qemu", "blockcore"):
        img = create(tmp_path / f"{tool}.qcow2", "8M", opts)
        qemu_io(img, "write -P 0x3c 0 128k", "write -P 0x4d 7M 64k")
        _add_extension(img, MAGIC, data)
        check_clean(img)
        if op == "resize-shrink":
            qemu_io(img, "discard 1M 7M")  # nothing past the new end
        if op == "rebase-unsafe":
            image_tool("qemu", "rebase", "-u", "-b", str(tmp_path / "gone.raw"), "-F", "raw",
                  str(img))  # fmt: skip
        image_tool(tool, *before, str(img), *after)
        assert (MAGIC, data) in _extensions(img), (tool, _extensions(img))
        check_clean(img)
        qemu_io(img, "read -P 0x3c 0 128k")


def test_unknown_extension_survives_lazy_refcount_dirty_bit(tmp_path: Path) -> None:
    """The dirty bit set on the first write with lazy refcounts and cleared on close both
    rewrite the header; the extension is there in either state."""
    img = create(tmp_path / "lazy.qcow2", "8M", "lazy_refcounts=on")
    _add_extension(img, MAGIC, DATA)
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"\x5e" * 70000)
        blk.flush()
        assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 1  # dirty
        assert (MAGIC, DATA) in _extensions(img)
    assert not struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 1
    assert (MAGIC, DATA) in _extensions(img)
    check_clean(img)
    qemu_io(img, "read -P 0x5e 0 70000")


def test_unknown_extension_survives_dirty_repair_and_reftable_growth(tmp_path: Path) -> None:
    """A dirty image repaired on a read-write open, then a refcount table that grows (new
    table offset in the header) and an unknown autoclear bit cleared on open."""
    # 512-byte clusters: one refcount table cluster covers 8 MiB of file
    img = create(tmp_path / "grow.qcow2", "16M", "cluster_size=512,lazy_refcounts=on")
    _add_extension(img, MAGIC, DATA)
    b = bytearray(img.read_bytes())
    struct.pack_into(">Q", b, 72, struct.unpack_from(">Q", b, 72)[0] | 1)  # dirty
    struct.pack_into(">Q", b, 88, 1 << 7)  # an autoclear bit nobody knows
    img.write_bytes(bytes(b))
    table = struct.unpack_from(">Q", b, 48)[0]
    with BlockBackend.open(str(img), {"lazy-refcounts": "off"}, OpenFlags.RDWR) as blk:
        for i in range(12):
            blk.pwrite(i << 20, b"\x61" * (1 << 20))
    h = img.read_bytes()
    assert struct.unpack_from(">Q", h, 48)[0] != table, "refcount table did not move"
    assert struct.unpack_from(">Q", h, 88)[0] == 0
    assert (MAGIC, DATA) in _extensions(img)
    check_clean(img)
    qemu_io(img, "read -P 0x61 0 12M", "read -P 0 12M 4M")


@pytest.mark.parametrize("op", ["write", "amend-lazy-off", "resize"])
def test_unknown_feature_bits_as_qemu(tmp_path: Path, op: str) -> None:
    """Unknown compatible bits are kept, unknown autoclear bits cleared by a read-write user
    (qcow2_do_open / qcow2_update_header): the header's feature words end up as qemu's."""
    words = {}
    for tool in ("qemu", "blockcore"):
        img = create(tmp_path / f"{tool}.qcow2", "8M", "lazy_refcounts=on")
        b = bytearray(img.read_bytes())
        struct.pack_into(">Q", b, 80, struct.unpack_from(">Q", b, 80)[0] | 1 << 5)
        struct.pack_into(">Q", b, 88, 1 << 6)
        img.write_bytes(bytes(b))
        if op == "write":
            argv = ["qemu-io"] if tool == "qemu" else [sys.executable, "-m", "blockcore.qemu_io"]
            proc = subprocess.run([*argv, "-f", "qcow2", "-c", "write 0 64k", str(img)],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            assert proc.returncode == 0, proc.stdout + proc.stderr
        elif op == "amend-lazy-off":
            image_tool(tool, "amend", "-o", "lazy_refcounts=off", str(img))
        else:
            image_tool(tool, "resize", str(img), "16M")
        words[tool] = struct.unpack_from(">QQQ", img.read_bytes(), 72)
        check_clean(img)
    assert words["blockcore"] == words["qemu"]
    assert words["qemu"][1] & 1 << 5 and not words["qemu"][2]

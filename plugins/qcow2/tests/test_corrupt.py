"""Metadata found inconsistent while the image is in use marks it corrupt (QEMU's
qcow2_signal_corruption): the corrupt bit reaches the file, the failing write and every later
write are refused with EIO naming the file, nothing is written over the metadata, and
``qemu-img info`` reports ``"corrupt": true``."""

from __future__ import annotations

import errno
import struct
import subprocess
from pathlib import Path

import pytest

from blockcore import BlockBackend, OpenFlags

from .conftest import create, info, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu

KiB, MiB = 1 << 10, 1 << 20
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _layout(img: Path) -> dict[str, int]:
    b = img.read_bytes()
    l1 = struct.unpack_from(">Q", b, 40)[0]
    rt = struct.unpack_from(">Q", b, 48)[0]
    l2 = struct.unpack_from(">Q", b, l1)[0] & OFFSET_MASK
    l2b = struct.unpack_from(">Q", b, l1 + 8)[0] & OFFSET_MASK  # second L2 table (64M+)
    rb = struct.unpack_from(">Q", b, rt)[0]
    return {"l1": l1, "reftable": rt, "refblock": rb, "l2": l2, "other-l2": l2b}


def _image(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Data at 0 and 1M (one L2 table) and at 600M (another L2 table): 64 KiB clusters."""
    img = create(tmp_path / "c.qcow2", "1G")
    qemu_io(img, "write -P 1 0 64k", "write -P 2 1M 64k", "write -P 4 600M 64k")
    b = img.read_bytes()
    lay = _layout(img)
    lay["other-l2"] = struct.unpack_from(">Q", b, lay["l1"] + 8 * (600 * MiB >> 29))[0] \
        & OFFSET_MASK  # fmt: skip
    return img, lay


def _poke_l2(img: Path, l2: int, index: int, value: int) -> None:
    with img.open("r+b") as f:
        f.seek(l2 + 8 * index)
        f.write(struct.pack(">Q", value))


# Which metadata the first L2 entry (guest 0) is made to point at, and whether blockcore
# has that structure in memory before the write (QEMU's overlap check knows every refcount
# block from the refcount table and every active L2 table from the L1 table, cached or not).
TARGETS = {
    "active-l1": ("l1", False),
    "refcount-table": ("reftable", False),
    "refcount-block-cached": ("refblock", True),
    "refcount-block-uncached": ("refblock", False),
    "own-l2-table": ("l2", False),
    "other-l2-table-cached": ("other-l2", True),
    "other-l2-table-uncached": ("other-l2", False),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_write_onto_metadata_marks_image_corrupt(tmp_path: Path, target: str) -> None:
    img, lay = _image(tmp_path)
    what, warm = TARGETS[target]
    meta = lay[what]
    _poke_l2(img, lay["l2"], 0, COPIED | meta)
    before = img.read_bytes()[meta : meta + 64 * KiB]
    # QEMU on a copy: the write fails with EIO and the image is marked corrupt
    ref = tmp_path / "ref.qcow2"
    ref.write_bytes(img.read_bytes())
    out = qemu_io(ref, "read -P 2 1M 4k", "write -P 3 0 4k", check=False)
    assert "write failed: Input/output error" in out, out
    assert info(ref)["format-specific"]["data"]["corrupt"] is True
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:
        assert blk.pread(1 * MiB, 4 * KiB) == b"\x02" * 4096  # loads the L2 table
        if warm:
            if what == "refblock":
                blk.pwrite(2 * MiB, b"\x05" * 4096)  # an allocation loads the refcount block
            else:
                assert blk.pread(600 * MiB, 4 * KiB) == b"\x04" * 4096
        with pytest.raises(OSError) as exc:
            blk.pwrite(0, b"\x03" * 4096)
        assert exc.value.errno == errno.EIO
        assert exc.value.filename == str(img), exc.value
        assert "corrupt" in str(exc.value)
        # the corrupt bit is already on disk (QEMU writes it at once)
        assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 2
        # every later write is refused, allocating or in place, with the same error
        for off in (1 * MiB, 5 * MiB):
            with pytest.raises(OSError) as exc:
                blk.pwrite(off, b"\x06" * 4096)
            assert exc.value.errno == errno.EIO and exc.value.filename == str(img)
        with pytest.raises(OSError):
            blk.pwrite_zeroes(1 * MiB, 64 * KiB)
        # QEMU makes the node unusable (reads then fail with ENOMEDIUM); reading on is
        # allowed here, but only ever the right data
        try:
            data = blk.pread(1 * MiB, 64 * KiB)
        except OSError:
            pass
        else:
            assert data == b"\x02" * (64 * KiB)
    # nothing was written over the metadata (the warm-up allocation may count a cluster)
    after = img.read_bytes()[meta : meta + 64 * KiB]
    assert b"\x03" * 64 not in after
    if not warm:
        assert after == before
    assert info(img)["format-specific"]["data"]["corrupt"] is True
    # the image now opens read-only only; qemu-io refuses read-write as well
    with pytest.raises(OSError, match="corrupt"):
        BlockBackend.open(str(img), {}, OpenFlags.RDWR)
    out = qemu_io(img, "write 0 512", check=False)
    assert "corrupt" in out.lower() and "wrote" not in out
    with BlockBackend.open(str(img)) as blk:
        assert blk.pread(600 * MiB, 64 * KiB) == b"\x04" * (64 * KiB)


def test_corrupt_bit_from_invalid_l2_entry_on_read(tmp_path: Path) -> None:
    """An unaligned data cluster offset found by a read (qcow2_get_host_offset) is fatal in
    QEMU: the read fails with EIO and the image is marked corrupt."""
    img, lay = _image(tmp_path)
    _poke_l2(img, lay["l2"], 16, COPIED | 0x50200)  # guest 1M: host offset not aligned
    proc = qemu_img("info", "--output=json", str(img))
    assert '"corrupt": false' in proc.stdout
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:
        with pytest.raises(OSError) as exc:
            blk.pread(1 * MiB, 4096)
        assert exc.value.errno == errno.EIO and exc.value.filename == str(img)
        with pytest.raises(OSError) as exc:
            blk.pwrite(600 * MiB, b"\x07" * 512)  # an unrelated cluster
        assert exc.value.errno == errno.EIO
    assert info(img)["format-specific"]["data"]["corrupt"] is True
    # qemu-io refuses it read-write and reads the unaffected data read-only
    assert "corrupt" in qemu_io(img, "read 0 512", check=False)
    proc = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 4 600M 64k",
                           str(img)], check=False, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "read 65536/65536" in proc.stdout, proc.stdout + proc.stderr


def test_corrupt_image_can_be_repaired_by_qemu(tmp_path: Path) -> None:
    """What blockcore leaves behind is an ordinary corrupt image: ``qemu-img check -r all``
    clears the bit and the untouched data reads back."""
    img, lay = _image(tmp_path)
    _poke_l2(img, lay["l2"], 0, COPIED | lay["reftable"])
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk, pytest.raises(OSError):
        blk.pwrite(0, b"\x03" * 4096)
    assert info(img)["format-specific"]["data"]["corrupt"] is True
    qemu_img("check", "-q", "-r", "all", str(img), check=False)
    assert info(img)["format-specific"]["data"]["corrupt"] is False
    qemu_io(img, "read -P 2 1M 64k", "read -P 4 600M 64k")

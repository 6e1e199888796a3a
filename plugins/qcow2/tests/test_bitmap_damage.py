"""Damaged persistent-bitmap metadata is refused at open exactly as QEMU 7.2 refuses it: the
bitmaps header extension (qcow2_read_extensions) and the bitmap directory (bitmap_list_load),
through ``info`` (which opens without I/O) and through qemu-io, on twin copies of an image
with two bitmaps."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import create, qemu_img, requires_qemu

pytestmark = requires_qemu

BITMAPS_EXT = 0x23852875
ENTRY0_GRANULARITY_BITS = 17  # byte offset in a directory entry
ENTRY0_EXTRA_SIZE = 20


def _ext_position(data: bytes) -> int:
    """Offset of the bitmaps extension's payload in the header cluster."""
    pos = struct.unpack_from(">I", data, 100)[0]  # header_length: extensions follow
    while True:
        typ, length = struct.unpack_from(">II", data, pos)
        if typ == BITMAPS_EXT:
            return pos + 8
        assert typ, "no bitmaps extension"
        pos += 8 + -(-length // 8) * 8


def _damage(path: Path, case: str) -> None:
    with open(path, "r+b") as f:
        data = f.read(65536)
        ext = _ext_position(data)
        nb, _res, size, offset = struct.unpack_from(">IIQQ", data, ext)
        f.seek(offset + 8)
        table_size, flags = struct.unpack(">II", f.read(8))
        bigger = struct.pack(">I", table_size + 1)
        patches: dict[str, Any] = {
            "ext-length": (ext - 4, struct.pack(">I", 16)),
            "ext-reserved": (ext + 4, struct.pack(">I", 1)),
            "ext-too-many": (ext, struct.pack(">I", 65536)),
            "ext-zero-bitmaps": (ext, struct.pack(">I", 0)),
            "ext-dir-offset": (ext + 16, struct.pack(">Q", offset + 512)),
            "ext-dir-too-big": (ext + 8, struct.pack(">Q", 65535 * 1024 + 1)),
            "dir-size-zero": (ext + 8, struct.pack(">Q", 0)),
            "dir-truncated": (ext + 8, struct.pack(">Q", 16)),
            "dir-fewer-than-said": (ext, struct.pack(">I", nb + 1)),
            "dir-more-than-said": (ext, struct.pack(">I", nb - 1)),
            "entry-granularity": (offset + ENTRY0_GRANULARITY_BITS, b"\0"),
            "entry-extra-data": (offset + ENTRY0_EXTRA_SIZE, struct.pack(">I", 8)),
            "entry-table-offset-zero": (offset, bytes(8)),
            "entry-extra-data-flag": (offset + 12, struct.pack(">I", flags | 4)),
            "entry-table-too-big": (offset + 8, bigger),
            # in use: loaded inconsistent, the table size does not matter (QEMU opens it)
            "entry-table-too-big-in-use": [(offset + 8, bigger + struct.pack(">I", flags | 1))],
            # a program without bitmap support cleared the autoclear bit: a warning, leaks
            "stale-extension": (88, bytes(8)),
        }
        for where, patch in ([patches[case]] if isinstance(patches[case], tuple)
                             else patches[case]):  # fmt: skip
            f.seek(where)
            f.write(patch)


def _run(argv: list[str]) -> tuple[str, int]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr, proc.returncode


def _first_line(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, (argv, proc.stdout)
    return (proc.stdout + proc.stderr).splitlines()[0]


@pytest.mark.parametrize("case", [
    "ext-length", "ext-reserved", "ext-too-many", "ext-zero-bitmaps", "ext-dir-offset",
    "ext-dir-too-big", "dir-size-zero", "dir-truncated", "dir-fewer-than-said",
    "dir-more-than-said", "entry-granularity", "entry-extra-data", "entry-table-offset-zero",
    "entry-extra-data-flag", "entry-table-too-big",
])  # fmt: skip
def test_damaged_bitmaps_refused_as_qemu(tmp_path: Path, case: str) -> None:
    theirs = create(tmp_path / "theirs.qcow2", "1M")
    qemu_img("bitmap", "--add", str(theirs), "b0")
    qemu_img("bitmap", "--add", str(theirs), "b1")
    _damage(theirs, case)
    ours = tmp_path / "ours.qcow2"
    shutil.copyfile(theirs, ours)
    me = [sys.executable, "-m"]
    q = _first_line(["qemu-img", "info", str(theirs)]).replace("qemu-img", "blockcore-img")
    b = _first_line([*me, "blockcore.img", "info", str(ours)])
    assert b == q.replace("theirs", "ours")
    q = _first_line(["qemu-io", "-c", "read 0 512", str(theirs)])
    b = _first_line([*me, "blockcore.io", "-c", "read 0 512", str(ours)])
    assert b == q.replace("qemu-io", "blockcore-io").replace("theirs", "ours")


@pytest.mark.parametrize("case", ["entry-table-too-big-in-use", "stale-extension"])
def test_damaged_bitmaps_opened_as_qemu(tmp_path: Path, case: str) -> None:
    """What QEMU still opens: the same output from info (warnings included) and check (leaked
    clusters of a stale extension), and the same status."""
    theirs = create(tmp_path / "theirs.qcow2", "1M")
    qemu_img("bitmap", "--add", str(theirs), "b0")
    _damage(theirs, case)
    ours = tmp_path / "ours.qcow2"
    shutil.copyfile(theirs, ours)
    def norm(out: str) -> str:  # the program's name, the file's, its allocation
        out = re.sub(r"^(qemu-img|blockcore-img):", "PROG:", out, flags=re.MULTILINE)
        return re.sub(r"^disk size: .*\n", "", out.replace("theirs", "ours"), flags=re.M)

    for cmd in ("info", "check"):
        q_out, q_rc = _run(["qemu-img", cmd, str(theirs)])
        b_out, b_rc = _run([sys.executable, "-m", "blockcore.img", cmd, str(ours)])
        assert (norm(b_out), b_rc) == (norm(q_out), q_rc)

"""External data files created and written by blockcore (the create API and
``blockcore-img create -o data_file=...``), judged by qemu-img/qemu-io: check is clean, the
guest data reads back, the image equals the one qemu writes for the same requests, and with
``data_file_raw`` the data file alone is a raw image of the guest."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import blockcore
from blockcore import BdrvRequestFlags, BlockBackend, OpenFlags

from .conftest import check_clean, image_tool, info, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def _create(tool: str, work: Path, name: str, opts: str) -> Path:
    img = work / f"{name}.qcow2"
    if tool == "qemu":
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
    elif tool == "cli":
        image_tool("cli", "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
    else:
        o: dict[str, object] = {"size": SIZE}
        for kv in opts.split(","):
            k, v = kv.split("=", 1)
            o[k] = v
        blockcore.bdrv_create("qcow2", str(img), o)
    return img


# the same requests through qemu-io and through blockcore
WORK = [("write", 0, 64 * KiB, 0x11), ("write", 100_000, 300_000, 0x22),
        ("zero", 1 * MiB, 128 * KiB, 0), ("write", 3 * MiB + 512, 5000, 0x33),
        ("discard", 5 * MiB, 128 * KiB, 0), ("write", 8 * MiB - 4096, 4096, 0x44)]  # fmt: skip


def _qemu_cmds() -> list[str]:
    out = []
    for op, off, n, pat in WORK:
        out.append({"write": f"write -P {pat} {off} {n}", "zero": f"write -z {off} {n}",
                    "discard": f"discard {off} {n}"}[op])  # fmt: skip
    return out


def _ours(img: Path) -> None:
    with BlockBackend.open(str(img), {"discard": "unmap"}, OpenFlags.RDWR) as blk:
        for op, off, n, pat in WORK:
            if op == "write":
                blk.pwrite(off, bytes([pat]) * n)
            elif op == "zero":
                blk.pwrite_zeroes(off, n, BdrvRequestFlags.NONE)
            else:
                blk.pdiscard(off, n)
        blk.flush()


def _expected() -> bytes:
    buf = bytearray(SIZE)
    for op, off, n, pat in WORK:
        if op == "write":
            buf[off : off + n] = bytes([pat]) * n
        elif op == "zero":
            buf[off : off + n] = bytes(n)
    return bytes(buf)


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
@pytest.mark.parametrize("tool", ["api", "cli"])
def test_data_file_created_and_written_by_blockcore(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path, tool: str,
                                                    raw: bool) -> None:  # fmt: skip
    """Create (relative data file name, as qemu-img stores it), write, zero, discard through
    blockcore; compare with qemu doing the same on its own image."""
    results = {}
    for who in ("qemu", tool):
        work = tmp_path / who
        work.mkdir()
        monkeypatch.chdir(work)  # the relative data file name resolves next to the image
        opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "")
        img = _create(who, work, "t", opts)
        assert (work / "d.raw").exists()
        if who == "qemu":
            qemu_io(img, *_qemu_cmds())
        else:
            _ours(img)
        check_clean(img)
        results[who] = img
    ours, ref = results[tool], results["qemu"]
    # the images themselves: same header and metadata as qemu-img create + qemu-io wrote
    data = info(ours)["format-specific"]["data"]
    assert data["data-file"] == "d.raw" and data["data-file-raw"] is raw
    assert info(ref)["format-specific"]["data"] == data
    proc = qemu_img("compare", str(ref), str(ours), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = qemu_io(ours, "read -P 0x11 0 64k", "read -P 0x22 100000 300000",
                  "read -P 0 1M 128k", "read -P 0x33 3146240 5000", "read -P 0 5M 128k",
                  "read -P 0x44 8384512 4096")  # fmt: skip
    assert "Pattern verification failed" not in out
    raw_out = tmp_path / "ours.raw"
    qemu_img("convert", "-O", "raw", str(ours), str(raw_out))
    assert raw_out.read_bytes() == _expected()
    if raw:
        # the data file alone is the guest disk, byte for byte (and as big as qemu's)
        d = ours.parent / "d.raw"
        assert d.stat().st_size == (ref.parent / "d.raw").stat().st_size == SIZE
        assert d.read_bytes() == _expected()
        proc = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(d), str(ref), check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # qemu-img map: the written ranges at the same host offsets in the data file
    maps = [json.loads(qemu_img("map", "--output=json", str(p)).stdout) for p in (ours, ref)]
    assert [m for m in maps[0] if m["data"]] == [m for m in maps[1] if m["data"]]


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_discard_in_data_file_image_maps_as_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 raw: bool) -> None:  # fmt: skip
    """The same requests as above: qemu-img map of both images is identical (a discard
    drops the data file offset, leaving a plain zero cluster, as QEMU)."""
    results = {}
    for who in ("qemu", "api"):
        work = tmp_path / who
        work.mkdir()
        monkeypatch.chdir(work)
        img = _create(who, work, "t", "data_file=d.raw" + (",data_file_raw=on" if raw else ""))
        if who == "qemu":
            qemu_io(img, *_qemu_cmds())
        else:
            _ours(img)
        results[who] = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    assert results["api"] == results["qemu"]


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_created_image_matches_qemu_img_create(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               raw: bool) -> None:  # fmt: skip
    """blockcore's create writes the same qcow2 file as qemu-img create (data file option
    included) and the same data file size."""
    files = {}
    for who in ("qemu", "api"):
        work = tmp_path / who
        work.mkdir()
        monkeypatch.chdir(work)
        opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "")
        files[who] = _create(who, work, "t", opts)
    assert files["api"].read_bytes() == files["qemu"].read_bytes()
    assert (tmp_path / "api" / "d.raw").stat().st_size == \
        (tmp_path / "qemu" / "d.raw").stat().st_size  # fmt: skip


def test_data_file_opened_by_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An image whose data file was moved opens with the data-file option, and writes go
    to the named file (QEMU's ``data-file`` runtime option)."""
    monkeypatch.chdir(tmp_path)
    img = _create("api", tmp_path, "m", "data_file=orig.raw")
    (tmp_path / "orig.raw").rename(tmp_path / "moved.raw")
    moved = str(tmp_path / "moved.raw")
    opts = {"driver": "qcow2", "data-file": {"driver": "file", "filename": moved}}
    with BlockBackend.open(str(img), opts, OpenFlags.RDWR) as blk:
        blk.pwrite(4096, b"\x5c" * 8192)
    cmd = f"open -o data-file.filename={moved} {img}"
    proc = subprocess.run(["qemu-io", "-c", cmd, "-c", "read -P 0x5c 4k 8k"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0 and "verification" not in proc.stdout, proc.stdout
    assert (tmp_path / "moved.raw").read_bytes()[4096 : 4096 + 8192] == b"\x5c" * 8192

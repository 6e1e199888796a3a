"""Through the node graph: blockcore's qemu-img/qemu-io against QEMU's own tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import create, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu


def ours(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", f"blockcore.{tool}", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    if check and proc.returncode:
        raise AssertionError(f"{tool} {args}: {proc.stdout}{proc.stderr}")
    return proc


WORK = ("write -P 0x11 0 64k", "write -P 0x22 100k 3k", "write -z 200k 64k",
        "write -P 0x33 1M 1536k", "write -z -u 1100k 64k", "discard 1400k 128k")  # fmt: skip


@pytest.mark.parametrize("opts", ["", "compat=0.10", "cluster_size=4k,refcount_bits=1",
                                  "extended_l2=on", "compression_type=zstd"])  # fmt: skip
def test_convert_map_info_match_qemu(tmp_path: Path, opts: str) -> None:
    base = tmp_path / "base.qcow2"
    create(base, "4M")
    qemu_io(base, "write -P 0x77 0 2M")
    img = create(tmp_path / "top.qcow2", "4M", opts, "-b", str(base), "-F", "qcow2")
    qemu_io(img, *WORK)
    ours("img", "convert", "-O", "raw", str(img), str(tmp_path / "o.raw"))
    qemu_img("convert", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
    assert json.loads(ours("img", "map", "--output=json", str(img)).stdout) == json.loads(
        qemu_img("map", "--output=json", str(img)).stdout)
    a = json.loads(ours("img", "info", "--output=json", str(img)).stdout)
    b = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert a["format-specific"] == b["format-specific"]
    assert a["cluster-size"] == b["cluster-size"]


@pytest.mark.parametrize("opts", ["", "compat=0.10", "cluster_size=512,refcount_bits=64",
                                  "extended_l2=on", "lazy_refcounts=on",
                                  "preallocation=metadata", "preallocation=full"])  # fmt: skip
def test_created_and_written_by_us(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "ours.qcow2"
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [str(img), "4M"]
    ours("img", *args)
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(ref), "4M")
    if "preallocation" not in opts:  # QEMU lays preallocated images out differently
        assert img.read_bytes()[:512] == ref.read_bytes()[:512]
    ours("qemu_io", "-f", "qcow2", *sum((["-c", c] for c in WORK), []), str(img))
    proc = qemu_img("check", "--output=json", str(img), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = qemu_io(img, "read -P 0x11 0 64k", "read -P 0x22 100k 3k", "read -P 0 200k 64k",
                  "read -P 0x33 1M 76k", "read -P 0 1100k 64k", "read -P 0x33 1164k 236k")
    assert "Pattern verification failed" not in out


def test_measure_matches(tmp_path: Path) -> None:
    for size in ("1G", "5M"):
        for o in ("cluster_size=512", "refcount_bits=64,extended_l2=on"):
            a = json.loads(ours("img", "measure", "--output=json", "-O", "qcow2", "-o", o,
                                "--size", size).stdout)  # fmt: skip
            b = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-o", o,
                                    "--size", size).stdout)  # fmt: skip
            assert a == b
    img = create(tmp_path / "m.qcow2", "8M")
    qemu_io(img, "write 0 3M", "write -z 4M 1M")
    a = json.loads(ours("img", "measure", "--output=json", "-O", "qcow2", str(img)).stdout)
    b = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", str(img)).stdout)
    assert a == b


@pytest.mark.parametrize("opts", [
    "cluster_size=3k", "cluster_size=4M", "cluster_size=0", "extended_l2=on,cluster_size=4k",
    "refcount_bits=3", "refcount_bits=0", "compat=0.10,refcount_bits=8", "compat=v3",
    "preallocation=FULL", "cluster_size=3k,refcount_bits=3,compat=bogus,preallocation=bogus",
    "refcount_bits=3,compat=bogus", "refcount_bits=3,preallocation=bogus",
])  # fmt: skip
def test_measure_refuses_bad_options_like_qemu(opts: str) -> None:
    args = ("measure", "--size", "1G", "-O", "qcow2", "-o", opts)
    a, b = ours("img", *args, check=False), qemu_img(*args, check=False)
    assert b.returncode == 1 and not b.stdout
    assert (a.stdout, a.stderr.replace("blockcore-img:", "qemu-img:"), a.returncode) == \
        (b.stdout, b.stderr, b.returncode)  # fmt: skip


def test_compressed_convert_and_resize(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(b"".join(f"line {i}\n".encode() for i in range(400000))[: 3 << 20])
    for ctype in ("zlib", "zstd"):
        out = tmp_path / f"c-{ctype}.qcow2"
        ours("img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
             str(src), str(out))  # fmt: skip
        assert qemu_img("check", str(out), check=False).returncode == 0
        qemu_img("convert", "-O", "raw", str(out), str(tmp_path / "back.raw"))
        assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
    img = create(tmp_path / "r.qcow2", "4M")
    qemu_io(img, "write -P 9 3M 1M")
    ours("img", "resize", str(img), "2G")
    ours("img", "resize", "--shrink", str(img), "3M")
    assert qemu_img("check", str(img), check=False).returncode == 0
    assert json.loads(qemu_img("info", "--output=json", str(img)).stdout)["virtual-size"] == 3 << 20


def test_dirty_lazy_image_is_repaired_on_open(tmp_path: Path) -> None:
    img = create(tmp_path / "l.qcow2", "4M", "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 128k", "-c", "sigraise 9",
                    str(img)], capture_output=True)  # fmt: skip
    assert qemu_img("check", str(img), check=False).returncode == 2
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(img.read_bytes())
    q = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 3 0 128k", str(theirs)],
                       capture_output=True, text=True, check=True)  # fmt: skip
    o = ours("qemu_io", "-f", "qcow2", "-c", "read -P 3 0 128k", str(img))
    assert qemu_img("check", str(img), check=False).returncode == 0
    # the same repair, reported the same way (QEMU's check prints while opening)
    assert "Rebuilding refcount structure" in o.stderr and o.stderr == q.stderr
    assert img.read_bytes() == theirs.read_bytes()

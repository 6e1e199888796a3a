"""The same qemu-io commands through QEMU's qemu-io and blockcore's, on twin images: the
messages, ``qemu-img map --output=json``, the guest data and ``qemu-img check`` must agree
(zero writes with NO_FALLBACK, compressed writes, extended L2 subcluster allocation,
placement of new refcount blocks and refcount table growth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import create, qemu_img, requires_qemu, to_raw

pytestmark = requires_qemu

BLOCKCORE_IO = [sys.executable, "-c",
                "import sys; from blockcore.qemu_io import main; sys.exit(main())"]


def run_io(tool: list[str], path: Path, cmds: list[str]) -> tuple[list[str], int]:
    argv = [*tool, "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if " ops; " not in ln]
    return lines, proc.returncode


def twins(tmp_path: Path, opts: str, cmds: list[str], backing: bytes | None = None,
          size: str = "4M") -> tuple[Path, Path]:  # fmt: skip
    """Run ``cmds`` with both tools on identical fresh images; assert the same output,
    mapping, data and a clean check; return (qemu's image, ours)."""
    extra: list[str] = []
    if backing is not None:
        base = tmp_path / "base.raw"
        base.write_bytes(backing)
        extra = ["-b", str(base), "-F", "raw"]
    paths = []
    outs = []
    for name, tool in (("qemu", ["qemu-io"]), ("ours", BLOCKCORE_IO)):
        path = create(tmp_path / f"{name}.qcow2", size, opts, *extra)
        outs.append(run_io(tool, path, cmds))
        paths.append(path)
    assert outs[0] == outs[1]
    theirs, ours = paths
    for path in paths:
        res = json.loads(qemu_img("check", "--output=json", str(path), check=False).stdout)
        assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, (path, res)
    assert mapping(ours) == mapping(theirs)
    assert to_raw(ours, tmp_path / "o.raw") == to_raw(theirs, tmp_path / "q.raw")
    return theirs, ours


def mapping(path: Path) -> list[tuple[int, int, bool, bool, int]]:
    """Guest ranges with their status (host offsets left out: allocation order may differ)."""
    out = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return [(m["start"], m["length"], m["data"], m["zero"], m["depth"]) for m in out]


# -------------------------------------------------------------------------------------------
# Zero writes covering part of a cluster, with NO_FALLBACK
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmds", [
    ["write -z -n 128k 512", "map"],  # rest reads as zero: the cluster becomes a zero one
    ["write -z -n 130k 512", "map"],  # also in the middle
    ["write -P 7 136k 4k", "write -z -n 128k 512", "map"],  # data in the rest: ENOTSUP
    ["write -z 128k 64k", "write -z -n 128k 512", "map"],  # a zero cluster already
    ["write -z -n 0 64k", "write -z -n 64k 1k", "map"],
], ids=["unallocated", "middle", "data-in-rest", "zero-cluster", "aligned"])  # fmt: skip
def test_partial_zero_write_no_fallback(tmp_path: Path, cmds: list[str]) -> None:
    theirs, _ = twins(tmp_path, "", cmds)
    assert run_io(["qemu-io"], theirs, ["read -P 0 128k 512"])[1] == 0


def test_partial_zero_write_no_fallback_over_backing(tmp_path: Path) -> None:
    """The rest of the cluster reads from a backing file: not zero (as QEMU's is_zero)."""
    twins(tmp_path, "", ["write -z -n 128k 512", "write -z 256k 512", "map"],
          backing=b"\x55" * (4 << 20))  # fmt: skip


def test_zero_write_v2_without_backing(tmp_path: Path) -> None:
    """No zero flag in v2: zeroing without a backing file deallocates (and frees); with
    NO_FALLBACK it always fails (QEMU's qcow2 offers no zero flags for v2 images)."""
    twins(tmp_path, "compat=0.10", ["write -P 1 0 256k", "write -z 0 64k", "write -z -n 64k 512",
                                    "write -z -n 128k 64k", "write -z -u 192k 64k", "map"])


def test_partial_zero_write_no_fallback_extended_l2(tmp_path: Path) -> None:
    twins(tmp_path, "extended_l2=on,cluster_size=64k",
          ["write -z -n 2k 512", "write -P 1 64k 2k", "write -z -n 66k 512",
           "write -z -n 200k 1k", "map"])  # fmt: skip


# -------------------------------------------------------------------------------------------
# Compressed writes
# -------------------------------------------------------------------------------------------


def test_compressed_write_never_overwrites(tmp_path: Path) -> None:
    theirs, _ = twins(tmp_path, "", [
        "write -c -P 0xcd 1M 64k", "write -c -P 0xce 1M 64k",  # compressed: EIO
        "write -P 1 0 64k", "write -c -P 2 0 64k",  # data: EIO
        "write -z 128k 64k", "write -c -P 3 128k 64k",  # a zero cluster: allowed
        "write -c -P 4 192k 128k",  # two fresh clusters
        "read -P 0xcd 1M 64k", "read -P 3 128k 64k", "read -P 4 192k 128k",
    ])  # fmt: skip
    lines, _ = run_io(["qemu-io"], theirs, ["read -P 0xcd 1M 64k"])
    assert not any("fail" in ln for ln in lines), lines


# -------------------------------------------------------------------------------------------
# Extended L2: a new cluster gets only the touched subclusters
# -------------------------------------------------------------------------------------------

EXT = "extended_l2=on,cluster_size=64k"


@pytest.mark.parametrize("cmds", [
    ["write -P 1 4k 1k", "map"],  # one subcluster (2 KiB) of an unallocated cluster
    ["write -P 1 3k 2k", "write -P 2 40k 8k", "map"],  # two subclusters, then more
    ["write -P 1 60k 8k", "map"],  # across a cluster boundary
    ["write -P 1 10k 200k", "map"],  # partial first and last, whole middle clusters
    ["write -z 0 64k", "write -P 3 8k 1k", "map"],  # into a zero cluster
    ["write -z 0 16k", "write -P 3 20k 1k", "write -P 4 2k 1k", "map"],  # zero subclusters
], ids=["one-sc", "two-writes", "boundary", "multi", "zero-cluster", "zero-subclusters"])  # fmt: skip
def test_extended_l2_subcluster_allocation(tmp_path: Path, cmds: list[str]) -> None:
    backing = bytes(range(256)) * (4 << 12)  # 4 MiB that is not zero anywhere
    _, ours = twins(tmp_path, EXT, cmds, backing=backing)
    # untouched subclusters, also inside allocated clusters, still read the backing file
    raw = to_raw(ours, tmp_path / "ours.raw")
    out = json.loads(qemu_img("map", "--output=json", str(ours)).stdout)
    through = [(m["start"], m["length"]) for m in out if m["depth"] == 1]
    assert through, out
    for start, length in through:
        assert raw[start : start + length] == backing[start : start + length], start


def test_extended_l2_without_backing_reads_zero(tmp_path: Path) -> None:
    _, ours = twins(tmp_path, EXT, ["write -P 9 5k 1k", "map"])
    lines, rc = run_io(["qemu-io"], ours, ["read -P 0 0 4k", "read -P 0 4k 1k",
                                           "read -P 9 5k 1k", "read -P 0 6k 58k"])  # fmt: skip
    assert rc == 0 and not any("fail" in ln for ln in lines), lines
    out = json.loads(qemu_img("map", "--output=json", str(ours)).stdout)
    data = [(m["start"], m["length"]) for m in out if m["data"]]
    assert data == [(4096, 2048)], out  # only the touched 2 KiB subcluster


# -------------------------------------------------------------------------------------------
# Allocation order: the L2 table before the data cluster, as QEMU
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cmds", "fragmented"), [
    (["write -P 0x11 0 4k", "write -P 0x22 64k 4k", "write -P 1 0 64k"], "0.00%"),  # golden
    (["write -P 1 1M 4k", "write -P 2 600M 64k", "write -P 3 0 128k"], "25.00%"),  # 2 tables
], ids=["one-table", "two-tables"])  # fmt: skip
def test_allocation_order_matches_qemu(tmp_path: Path, cmds: list[str], fragmented: str) -> None:
    theirs, ours = twins(tmp_path, "", cmds, size="1G")
    maps = [json.loads(qemu_img("map", "--output=json", str(p)).stdout) for p in (theirs, ours)]
    assert maps[0] == maps[1]  # host offsets included
    checks = [qemu_img("check", str(p)).stdout for p in (theirs, ours)]
    assert checks[0] == checks[1]
    assert f"{fragmented} fragmented" in checks[1]


# -------------------------------------------------------------------------------------------
# New refcount blocks behind the run that needed them, and refcount table growth
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("opts", "size", "cmds"), [
    ("cluster_size=1k", "64M", ["write -P 1 0 1M"]),
    ("cluster_size=512,refcount_bits=64", "8M", ["write -P 1 0 3M"]),  # the table grows
    ("cluster_size=512,refcount_bits=1", "64M",
     ["write -P 1 0 3M", "discard 0 3M", "write -P 2 1M 5M", "write -P 3 20M 100k"]),
    ("cluster_size=512,refcount_bits=4", "1G",
     ["write -P 1 0 100k", "write -P 2 500M 100k", "write -P 3 100M 2M"]),
], ids=["1k", "512-r64-growth", "512-r1-reuse", "512-r4-sparse"])  # fmt: skip
def test_refcount_block_placement_matches_qemu(tmp_path: Path, opts: str, size: str,
                                               cmds: list[str]) -> None:  # fmt: skip
    theirs, ours = twins(tmp_path, opts, cmds, size=size)
    maps = [json.loads(qemu_img("map", "--output=json", str(p)).stdout) for p in (theirs, ours)]
    assert maps[0] == maps[1]  # host offsets included
    assert ours.read_bytes() == theirs.read_bytes()

"""Zero writes and writes into zero clusters as QEMU 7.2 does them: the same qemu-io
commands through QEMU's qemu-io and blockcore's on twin images must give the same messages,
the same ``qemu-img map --output=json`` (host offsets included), the same file size, the same
guest data (``qemu-img compare``) and a clean ``qemu-img check``.

- a zero write covering part of a subcluster zeroes the whole one when the rest of it reads
  as zero through the backing chain (QEMU's is_zero asks block status), else falls back;
- a write into a zero cluster that keeps its host space (ZERO_ALLOC with COPIED) reuses that
  cluster (cluster_needs_new_alloc, handle_copied with keep_old_clusters);
- a discard on a v2 image with a backing file is refused (qcow2_co_pdiscard).

Where ours differs on purpose: zero writes and discards wait for allocating writes in flight
on their clusters (QEMU's do not, and the race tests below show what that costs).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import pytest
from blockcore_qcow2 import alloc
from blockcore_qcow2.format import empty_image
from blockcore_qcow2.image import Qcow2Image

from .conftest import create, qemu_img, qemu_io, requires_qemu
from .memfile import MemFile, paused_at_data_write
from .test_qemu_parity import BLOCKCORE_IO, run_io

pytestmark = requires_qemu

EXT = "extended_l2=on,cluster_size=64k"


def exact_twins(tmp_path: Path, opts: str, cmds: list[str], *, backing: Path | None = None,
                backing_fmt: str = "raw", prep: Callable[[Path], None] | None = None,
                size: str = "4M") -> tuple[Path, Path]:  # fmt: skip
    """Run ``cmds`` with QEMU's qemu-io and ours on identical fresh images (``{name}`` in
    ``opts`` names the twin, for per-image data files; ``prep`` runs on both first) and
    assert they agree in everything QEMU's choices determine; return (qemu's, ours)."""
    extra = ["-b", str(backing), "-F", backing_fmt] if backing is not None else []
    paths, outs = [], []
    for name, tool in (("qemu", ["qemu-io"]), ("ours", BLOCKCORE_IO)):
        path = create(tmp_path / f"{name}.qcow2", size, opts.format(name=tmp_path / name),
                      *extra)  # fmt: skip
        if prep is not None:
            prep(path)
        outs.append(run_io(tool, path, cmds))
        paths.append(path)
    assert outs[0] == outs[1]
    theirs, ours = paths
    for path in paths:
        res = json.loads(qemu_img("check", "--output=json", str(path), check=False).stdout)
        assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, (path, res)
    maps = [json.loads(qemu_img("map", "--output=json", str(p)).stdout) for p in paths]
    assert maps[1] == maps[0]
    assert ours.stat().st_size == theirs.stat().st_size
    proc = qemu_img("compare", str(theirs), str(ours), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return theirs, ours


def qcow2_backing(tmp_path: Path, *cmds: str, below: Path | None = None) -> Path:
    """A qcow2 backing file written by QEMU's qemu-io (over the raw file ``below``)."""
    extra = ["-b", str(below), "-F", "raw"] if below is not None else []
    path = create(tmp_path / "base.qcow2", "4M", "", *extra)
    if cmds:
        qemu_io(path, *cmds)
    return path


def sparse_raw(tmp_path: Path, size: int = 4 << 20, data: tuple[int, ...] = (1 << 20,)) -> Path:
    """A sparse raw file of ``size`` bytes with 64 KiB of 0x5a at each of ``data``."""
    path = tmp_path / "base.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for off in data:
            f.seek(off)
            f.write(b"\x5a" * 65536)
    return path


def zero_mapped(path: Path, start: int) -> dict[str, object]:
    """The map entry of ``path`` that covers guest ``start``."""
    out = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return next(m for m in out if m["start"] <= start < m["start"] + m["length"])


# -------------------------------------------------------------------------------------------
# Zero writes covering part of a subcluster, over a backing file
# -------------------------------------------------------------------------------------------

PARTIAL = [
    "write -z 128k 512",  # the backing file has a hole there: a zero cluster
    "write -z 300k 4k",  # in the middle of a cluster
    "write -z 1M 512",  # the backing file has data there: zeros written, cluster allocated
    "write -z -n 2M 1k",  # NO_FALLBACK over a hole: fine
    "write -z -n 1040k 512",  # NO_FALLBACK over data: ENOTSUP
    "write -z 4194303 1",  # the last byte: the last cluster counts as whole
    "map",
]


def test_partial_zero_write_over_sparse_raw_backing(tmp_path: Path) -> None:
    theirs, ours = exact_twins(tmp_path, "", PARTIAL, backing=sparse_raw(tmp_path))
    for path in (theirs, ours):
        assert zero_mapped(path, 128 << 10) == {
            "start": 128 << 10, "length": 64 << 10, "depth": 0, "present": True,
            "zero": True, "data": False}  # fmt: skip
        assert zero_mapped(path, 1 << 20)["data"] is True


def test_partial_zero_write_over_qcow2_chain(tmp_path: Path) -> None:
    """Zero in a middle layer hides data below; unallocated in every layer reads as zero."""
    raw = sparse_raw(tmp_path, data=(0, 1 << 20, 2 << 20))
    base = qcow2_backing(tmp_path, "write -z 0 64k", "write -P 7 192k 64k", below=raw)
    cmds = ["write -z 1k 512", "write -z -n 200k 512", "write -z -n 1M 512",
            "write -z 512k 3k", "write -z 2M 512", "map"]  # fmt: skip
    theirs, _ = exact_twins(tmp_path, "", cmds, backing=base, backing_fmt="qcow2")
    assert zero_mapped(theirs, 0)["depth"] == 0 and zero_mapped(theirs, 0)["zero"] is True
    assert zero_mapped(theirs, 512 << 10)["depth"] == 0
    assert zero_mapped(theirs, 2 << 20)["data"] is True  # data below: zeros written


def test_partial_zero_write_past_short_backing(tmp_path: Path) -> None:
    raw = tmp_path / "short.raw"
    raw.write_bytes(b"\x11" * (1 << 20))  # 1 MiB of data under a 4 MiB disk
    cmds = ["write -z -n 2M 512", "write -z -n 1020k 512", "write -z 1023k 2k", "map"]
    theirs, _ = exact_twins(tmp_path, "", cmds, backing=raw)
    assert zero_mapped(theirs, 2 << 20)["depth"] == 0


@pytest.mark.parametrize("backed", [False, True], ids=["alone", "backing"])
def test_partial_zero_write_in_partial_last_cluster(tmp_path: Path, backed: bool) -> None:
    """A disk of 4 MiB + 4 KiB: the rest of the last cluster is past the end and counts as
    zero; a request ending at the disk's end has no tail."""
    raw = sparse_raw(tmp_path, size=(4 << 20) + 4096, data=()) if backed else None
    cmds = ["write -z -n 4096k 512", "write -z -n 4098k 512", "write -P 1 4099k 512",
            "write -z -n 4099k 1k", "write -z -n 4099k 512", "map"]  # fmt: skip
    exact_twins(tmp_path, "", cmds, backing=raw, size=str((4 << 20) + 4096))


def test_partial_zero_write_extended_l2_over_backing(tmp_path: Path) -> None:
    """Extended L2: the subcluster (2 KiB) is what must read as zero around the request."""
    raw = sparse_raw(tmp_path, data=(64 << 10, 1 << 20))
    cmds = ["write -z -n 1k 512", "write -z -n 66k 512", "write -z 130k 1k",
            "write -P 3 192k 1k", "write -z -n 195k 512", "write -z 1M 512", "map"]  # fmt: skip
    theirs, _ = exact_twins(tmp_path, EXT, cmds, backing=raw)
    assert zero_mapped(theirs, 0)["length"] == 2048  # only the subcluster became zero


def test_partial_zero_write_v2_over_zero_backing(tmp_path: Path) -> None:
    """v2 has no zero flag: even over a hole of the backing file the core writes zeros."""
    cmds = ["write -z 128k 512", "write -z -n 256k 512", "map"]
    theirs, _ = exact_twins(tmp_path, "compat=0.10", cmds, backing=sparse_raw(tmp_path))
    assert zero_mapped(theirs, 128 << 10)["data"] is True


# -------------------------------------------------------------------------------------------
# Writes into zero clusters with host space: the host cluster is reused
# -------------------------------------------------------------------------------------------

ZERO_ALLOC = ["write -P 1 0 256k", "write -z 0 256k"]  # zeroed, host space kept (COPIED)


@pytest.mark.parametrize("cmds", [
    ["write -P 2 4k 4k"],  # inside one cluster: COW of zeros around it
    ["write -P 2 0 64k"],  # a whole cluster
    ["write -P 2 60k 72k"],  # partial, whole, partial
    ["write -P 2 64k 64k", "write -P 3 32k 64k"],  # data cluster then a zero one
    ["write -P 2 0 4k", "write -P 1 1M 64k", "write -P 3 8k 200k"],
], ids=["inside", "whole", "spanning", "after-data", "mixed"])  # fmt: skip
def test_write_into_zero_alloc_reuses_cluster(tmp_path: Path, cmds: list[str]) -> None:
    theirs, _ = exact_twins(tmp_path, "", [*ZERO_ALLOC, *cmds, "map"])
    first = zero_mapped(theirs, 0)
    assert first["offset"] == 5 * 65536  # header, L1, refcount table and block, L2


def test_write_into_zero_alloc_over_backing(tmp_path: Path) -> None:
    """The rest of the reused cluster is zero, not the backing file's data."""
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x33" * (4 << 20))
    theirs, _ = exact_twins(tmp_path, "", [*ZERO_ALLOC, "write -P 2 4k 1k", "map",
                                           "read -P 0 0 4k", "read -P 0 5k 59k"],
                            backing=raw)  # fmt: skip
    out = qemu_io(theirs, "read -P 0 0 4k", "read -P 2 4k 1k", "read -P 0 5k 59k")
    assert "fail" not in out


def test_write_into_zero_alloc_shared_with_snapshot(tmp_path: Path) -> None:
    """Without COPIED (a snapshot holds the cluster too) a write allocates a new one; the
    partial one zeroes the COW areas of the new cluster in one request (handle_alloc_space)."""

    def prep(path: Path) -> None:
        qemu_io(path, *ZERO_ALLOC)
        qemu_img("snapshot", "-c", "s1", str(path))

    theirs, _ = exact_twins(tmp_path, "", ["write -P 2 0 64k", "write -P 3 128k 128k",
                                           "write -P 4 68k 4k", "map"], prep=prep)  # fmt: skip
    assert zero_mapped(theirs, 0)["offset"] != 5 * 65536


def test_write_into_zero_alloc_with_data_file(tmp_path: Path) -> None:
    exact_twins(tmp_path, "data_file={name}.data", [*ZERO_ALLOC, "write -P 2 4k 4k",
                                                     "write -P 3 60k 8k", "map"])  # fmt: skip


@pytest.mark.parametrize("cmds", [
    ["write -z 0 8k", "write -P 2 1k 1k"],  # a zero subcluster
    ["write -z 0 8k", "write -P 2 3k 8k"],  # zero subclusters then data ones
    ["write -z 8k 8k", "write -P 2 10k 1k", "write -P 3 4k 2k"],
], ids=["zero-sc", "zero-then-data", "middle"])  # fmt: skip
def test_write_into_zero_subclusters_of_own_cluster(tmp_path: Path, cmds: list[str]) -> None:
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x44" * (4 << 20))
    theirs, _ = exact_twins(tmp_path, EXT, ["write -P 1 0 64k", *cmds, "map"], backing=raw)
    assert zero_mapped(theirs, 0)["offset"] == 5 * 65536


@pytest.mark.parametrize("opts", ["compat=0.10", ""], ids=["v2", "v3"])
def test_discard_over_backing(tmp_path: Path, opts: str) -> None:
    """v2 has no zero flag: QEMU refuses the discard rather than show the backing file."""
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x55" * (4 << 20))
    cmds = ["write -P 1 0 256k", "discard 0 128k", "discard 192k 4k", "map"]
    theirs, _ = exact_twins(tmp_path, opts, cmds, backing=raw)
    assert zero_mapped(theirs, 0)["data"] is (opts == "compat=0.10")


# -------------------------------------------------------------------------------------------
# Zero writes and discards while an allocating write is in flight on the same cluster.
# QEMU's qcow2_co_pwrite_zeroes and qcow2_co_pdiscard do not wait for in-flight allocations
# (no handle_dependencies); ours do, because not waiting loses data or breaks refcounts.
# -------------------------------------------------------------------------------------------




@attrs.frozen
class Race:
    path: Path
    second_waited: bool
    first_cluster: bytes


def race(tmp_path: Path, setup: list[tuple[str, int, int]], write: tuple[int, int],
         second: Callable[[Qcow2Image], Awaitable[None]], backing: int | None = None) -> Race:
    """On a new engine image (over a backing file of byte ``backing`` everywhere, if
    given): run ``setup`` (("w", offset, length) writes 0x11, ("z", ...) zeroes without
    unmap), start ``write`` (0x22 at offset, length), start ``second`` while that write is at
    its data I/O, then let both finish; say whether ``second`` waited for the write and what
    the first cluster reads as at the end."""
    mem = MemFile(empty_image())

    async def read_backing(offset: int, buf: memoryview) -> None:
        buf[:] = bytes([backing or 0]) * len(buf)

    async def go() -> Race:
        img = await Qcow2Image.open(mem, read_only=False)
        if backing is not None:
            img.backing = read_backing
        await img.truncate(4 << 20)
        for op, off, n in setup:
            if op == "w":
                await img.write(off, memoryview(b"\x11" * n))
            else:
                await img.write_zeroes(off, n, unmap=False)
        gate, at_data = paused_at_data_write(mem)
        off, n = write
        writer = asyncio.ensure_future(img.write(off, memoryview(b"\x22" * n)))
        await at_data.wait()
        other = asyncio.ensure_future(second(img))
        for _ in range(20):
            await asyncio.sleep(0)
        waited = not other.done()
        gate.set()
        await asyncio.gather(writer, other)
        content = bytearray(65536)
        await img.read(0, memoryview(content))
        await img.close()
        mem.save(tmp_path / "race.qcow2")
        return Race(tmp_path / "race.qcow2", waited, bytes(content))

    return asyncio.run(go())


def check_result(path: Path) -> dict[str, int]:
    return json.loads(qemu_img("check", "--output=json", str(path), check=False).stdout)


ZERO_ALLOC_SETUP = [("w", 0, 65536), ("z", 0, 65536)]
ZERO_ALLOC_SETUP_CMDS = ["write -P 1 0 64k", "write -z 0 64k"]
ZEROS = bytes(65536)


@pytest.mark.parametrize("unmap", [True, False], ids=["unmap", "keep"])
def test_zero_write_waits_for_write_reusing_zero_cluster(tmp_path: Path, unmap: bool) -> None:
    """A whole-cluster zero write during a write into the same ZERO_ALLOC cluster waits:
    it comes after, so the cluster reads as zero and check is clean."""
    r = race(tmp_path, ZERO_ALLOC_SETUP, (4096, 4096),
             lambda img: img.write_zeroes(0, 65536, unmap=unmap))  # fmt: skip
    assert r.second_waited and r.first_cluster == ZEROS
    res = check_result(r.path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res


def test_discard_waits_for_write_reusing_zero_cluster(tmp_path: Path) -> None:
    r = race(tmp_path, ZERO_ALLOC_SETUP, (4096, 4096), lambda img: img.discard(0, 65536))
    assert r.second_waited and r.first_cluster == ZEROS
    res = check_result(r.path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res


def test_zero_write_waits_for_new_cluster_over_backing(tmp_path: Path) -> None:
    """The new cluster's COW copies the backing file; the zero write after it wins."""
    r = race(tmp_path, [], (4096, 4096), lambda img: img.write_zeroes(0, 65536, unmap=True),
             backing=0x55)  # fmt: skip
    assert r.second_waited and r.first_cluster == ZEROS


def test_not_waiting_as_qemu_would_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:  # fmt: skip
    """Why ours waits: without it the zero write frees the host cluster the in-flight write
    keeps, which links it again with refcount 0 (QEMU's keep_old_clusters path has that
    window); and a zero write landing between a new cluster's COW read and its link is lost
    (the COW copy of the backing file comes back, which no order of the two gives)."""

    async def no_wait(img: Qcow2Image, start: int, end: int) -> None:
        return None

    monkeypatch.setattr(alloc, "wait_dependencies", no_wait)
    r = race(tmp_path, ZERO_ALLOC_SETUP, (4096, 4096),
             lambda img: img.write_zeroes(0, 65536, unmap=True))  # fmt: skip
    assert not r.second_waited
    assert check_result(r.path).get("corruptions", 0) > 0
    r = race(tmp_path, [], (4096, 4096), lambda img: img.write_zeroes(0, 65536, unmap=True),
             backing=0x55)  # fmt: skip
    assert not r.second_waited
    assert r.first_cluster[:4096] == b"\x55" * 4096  # neither zero-then-write nor the reverse


@pytest.mark.blkdebug
@pytest.mark.skipif(importlib.util.find_spec("blockcore_blkdebug") is None,
                    reason="needs the blkdebug driver")  # fmt: skip
def test_zero_write_during_reuse_through_qemu_io(tmp_path: Path) -> None:
    """The same race driven by qemu-io commands with a blkdebug breakpoint: ours finishes the
    write first, then the zero write, and the image is clean. (QEMU 7.2's qemu-io, given
    these commands, leaves "ERROR cluster 5 refcount=0 reference=1".)"""
    path = create(tmp_path / "r.qcow2", "4M")
    qemu_io(path, *ZERO_ALLOC_SETUP_CMDS)
    lines, rc = run_io(BLOCKCORE_IO, Path(f"blkdebug::{path}"), [
        "break write_aio A", "aio_write -P 2 4k 4k", "wait_break A",
        "aio_write -z -u 0 64k", "resume A", "aio_flush"])  # fmt: skip
    wrote = [ln for ln in lines if ln.startswith("wrote")]
    assert rc == 0 and wrote == ["wrote 4096/4096 bytes at offset 4096",
                                 "wrote 65536/65536 bytes at offset 0"], lines  # fmt: skip
    res = check_result(path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res
    assert "fail" not in qemu_io(path, "read -P 0 0 64k")

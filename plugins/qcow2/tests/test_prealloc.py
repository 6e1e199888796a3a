"""Preallocated qcow2 images created (and grown) by blockcore against qemu-img doing the
same: the same qcow2 file size and bytes, the same ``qemu-img map``, space really allocated
for falloc/full, and a clean ``qemu-img check``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import blockcore

from .conftest import check_clean, image_tool, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20
SIZE = 6 * MiB + 512 * 1024  # not a multiple of the L2 span or of 2 MiB clusters


def _map(img: Path) -> list[dict[str, object]]:
    return json.loads(qemu_img("map", "--output=json", str(img)).stdout)


OPTS = ["", "cluster_size=4k", "cluster_size=2M", "extended_l2=on", "compat=0.10",
        "refcount_bits=1,cluster_size=512"]  # fmt: skip


def _create_both(tmp_path: Path, how: str, mode: str, opts: str) -> tuple[Path, Path]:
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    full_opts = ",".join(o for o in (opts, f"preallocation={mode}") if o)
    qemu_img("create", "-q", "-f", "qcow2", "-o", full_opts, str(ref), str(SIZE))
    if how == "cli":
        image_tool(
            "blockcore", "create", "-q", "-f", "qcow2", "-o", full_opts, str(ours), str(SIZE)
        )
    else:
        o: dict[str, object] = {"size": SIZE}
        for kv in full_opts.split(","):
            k, v = kv.split("=", 1)
            o[k] = v
        blockcore.bdrv_create("qcow2", str(ours), o)
    return ref, ours


def _flags(img: Path) -> list[tuple[bool, bool, bool, int]]:
    """qemu-img map without host offsets, neighbours with the same flags merged."""
    out: list[tuple[bool, bool, bool, int]] = []
    for e in _map(img):
        key = (bool(e["present"]), bool(e["zero"]), bool(e["data"]))
        if out and out[-1][:3] == key:
            out[-1] = (*key, out[-1][3] + int(e["length"]))  # type: ignore[arg-type]
        else:
            out.append((*key, int(e["length"])))  # type: ignore[arg-type]
    return out


CASES = [
    pytest.param(how, mode, opts, id=f"{how}-{mode}-{opts or 'default'}")
    for how in ("api", "cli")
    for mode in ("metadata", "falloc", "full")
    for opts in (OPTS if how == "api" else OPTS[:1])  # the CLI runs the same code
]


@pytest.mark.parametrize(("how", "mode", "opts"), CASES)
def test_preallocated_create_valid(tmp_path: Path, how: str, mode: str, opts: str) -> None:
    """Check clean, the file as big as qemu-img's, the same map flags, zeros to read."""
    ref, ours = _create_both(tmp_path, how, mode, opts)
    check_clean(ours)
    assert ours.stat().st_size == ref.stat().st_size
    assert _flags(ours) == _flags(ref)
    out = qemu_io(ours, f"read -P 0 0 {SIZE}", "write -P 0x3e 1M 64k", "read -P 0x3e 1M 64k")
    assert "verification" not in out
    check_clean(ours)


@pytest.mark.parametrize(("how", "mode", "opts"), CASES)
def test_preallocated_create_reserves_space(tmp_path: Path, how: str, mode: str,
                                            opts: str) -> None:  # fmt: skip
    """falloc and full allocate the data area in the file as qemu-img does (within a
    cluster of metadata); metadata does not."""
    ref, ours = _create_both(tmp_path, how, mode, opts)
    blocks = {p.name: os.stat(p).st_blocks * 512 for p in (ref, ours)}
    if mode == "metadata":
        assert blocks["ours.qcow2"] <= blocks["ref.qcow2"] + 64 * 1024, blocks
    else:
        assert blocks["ref.qcow2"] >= SIZE
        assert blocks["ours.qcow2"] >= blocks["ref.qcow2"] - 64 * 1024, blocks


@pytest.mark.parametrize(("how", "mode", "opts"), CASES)
def test_preallocated_create_same_layout(tmp_path: Path, how: str, mode: str, opts: str) -> None:
    """Byte for byte the qcow2 file qemu-img writes, host offsets in qemu-img map included."""
    ref, ours = _create_both(tmp_path, how, mode, opts)
    assert _map(ours) == _map(ref)
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocated_resize_as_qemu_img(tmp_path: Path, mode: str) -> None:
    """``resize --preallocation=MODE`` growing an image with data: same map, size, bytes."""
    files = {}
    for tool in ("qemu", "blockcore"):
        img = tmp_path / f"{tool}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "3M")
        qemu_io(img, "write -P 0x51 0 100k", "write -P 0x52 2M 1M")
        args = ("resize", "-q", f"--preallocation={mode}", str(img), "+5M")
        if tool == "qemu":
            qemu_img(*args)
        else:
            image_tool("blockcore", *args)
        check_clean(img)
        qemu_io(img, "read -P 0x51 0 100k", "read -P 0x52 2M 1M", "read -P 0 3M 5M")
        files[tool] = img
    assert files["blockcore"].stat().st_size == files["qemu"].stat().st_size
    assert _flags(files["blockcore"]) == _flags(files["qemu"])
    assert _map(files["blockcore"]) == _map(files["qemu"])
    assert files["blockcore"].read_bytes() == files["qemu"].read_bytes()

"""qcow2 runtime options: metadata cache sizes (``l2-cache-size``, ``refcount-cache-size``,
``cache-size``, ``l2-cache-entry-size``, ``cache-clean-interval``) bound the caches as QEMU
splits them and are refused with QEMU's messages; ``pass-discard-*`` decide whether freed
clusters are punched in the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockcore import BdrvRequestFlags, BlockBackend, OpenFlags

from .conftest import check_clean, create, image_tool, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu

KiB, MiB = 1 << 10, 1 << 20
CS = 4096  # an L2 table maps 2 MiB, a refcount block 8 MiB of file


# -------------------------------------------------------------------------------------------
# Metadata caches
# -------------------------------------------------------------------------------------------

# options -> (L2 tables, refcount blocks) for a 64 MiB image with 4 KiB clusters: 32 L2
# tables (128 KiB of them), QEMU's minimum of 4 refcount blocks (16 KiB)
SPLITS: dict[str, tuple[dict[str, Any], int, int]] = {
    "l2-2-tables": ({"l2-cache-size": "8k"}, 2, None),
    "l2-0-is-minimum": ({"l2-cache-size": "0"}, 2, None),
    "l2-capped-at-disk": ({"l2-cache-size": "64M"}, 32, None),
    "refcount-minimum": ({"refcount-cache-size": "1k"}, None, 4),
    "refcount-6": ({"refcount-cache-size": "24k"}, None, 6),
    "total-small": ({"cache-size": "64k"}, 12, 4),  # refcount gets its minimum first
    "total-large": ({"cache-size": "1M"}, 32, 224),  # every L2 table, the rest to refcounts
    "total-with-l2": ({"cache-size": "64k", "l2-cache-size": "16k"}, 4, 12),
    "total-with-refcount": ({"cache-size": "64k", "refcount-cache-size": "32k"}, 8, 8),
    "entry-size": ({"l2-cache-size": "8k", "l2-cache-entry-size": "512"}, 2, None),
    "clean-interval": ({"l2-cache-size": "8k", "cache-clean-interval": "30"}, 2, None),
    "clean-interval-hex": ({"l2-cache-size": "8k", "cache-clean-interval": "0x1e"}, 2, None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SPLITS))
def test_cache_sizes_bound_the_caches(tmp_path: Path, case: str) -> None:
    """A workload over every L2 table and across several refcount blocks: the caches never
    hold more tables than the options allow; qemu-img check is clean and qemu-io reads the
    data back."""
    opts, l2_tables, rc_blocks = SPLITS[case]
    img = create(tmp_path / "c.qcow2", "64M", f"cluster_size={CS}")
    seen_l2 = seen_rc = 0
    with BlockBackend.open(str(img), {"driver": "qcow2", **opts}, OpenFlags.RDWR) as blk:
        image = blk.bs.opaque.image
        l2, rc = image.l2_cache, image.refcounts.cache
        if l2_tables is not None:
            assert l2.capacity == l2_tables
        if rc_blocks is not None:
            assert rc.capacity == rc_blocks
        for rnd in range(2):
            for i in range(32):  # one 64 KiB piece in each L2 table's range
                off = i * 2 * MiB + rnd * 512 * KiB
                blk.pwrite(off, bytes([i + 1]) * (64 * KiB))
                seen_l2, seen_rc = max(seen_l2, len(l2.tables)), max(seen_rc, len(rc.tables))
                assert len(l2.tables) <= l2.capacity and len(rc.tables) <= rc.capacity
        for i in range(32):
            assert blk.pread(i * 2 * MiB, 64 * KiB) == bytes([i + 1]) * (64 * KiB)
            assert len(l2.tables) <= l2.capacity
        blk.flush()
    assert seen_l2 == min(l2.capacity, 32)  # the cache was used up to its size
    check_clean(img)
    cmds = [f"read -P {i + 1} {i * 2 * MiB + r * 512 * KiB} 64k" for i in range(32)
            for r in range(2)]  # fmt: skip
    qemu_io(img, *cmds)


ERRORS = {
    "cache-size=1M,l2-cache-size=512k,refcount-cache-size=256k":
        "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
    "cache-size=1M,l2-cache-size=2M": "l2-cache-size may not exceed cache-size",
    "cache-size=1M,refcount-cache-size=2M": "refcount-cache-size may not exceed cache-size",
    "l2-cache-entry-size=1000": "L2 cache entry size must be a power of two between 512 and "
                                "the cluster size (65536)",
    "l2-cache-entry-size=256": "L2 cache entry size must be a power of two between 512 and "
                               "the cluster size (65536)",
    "l2-cache-entry-size=128k": "L2 cache entry size must be a power of two between 512 and "
                                "the cluster size (65536)",
    "l2-cache-size=foo": "Parameter 'l2-cache-size' expects a non-negative number below 2^64",
    "cache-clean-interval=-1": "Cache clean interval too big",
    "cache-clean-interval=4294967296": "Cache clean interval too big",
    "cache-clean-interval=abc": "Parameter 'cache-clean-interval' expects a number",
    "cache-clean-interval=08": "Parameter 'cache-clean-interval' expects a number",  # octal
}  # fmt: skip


@pytest.mark.parametrize("opts", list(ERRORS))
def test_invalid_cache_options_as_qemu_io(tmp_path: Path, opts: str) -> None:
    """The first line qemu-io prints for the open, from blockcore-io: the same text."""
    img = create(tmp_path / "e.qcow2", "64M")
    lines = {}
    for tool in ("qemu-io", "blockcore"):
        argv = ["qemu-io"] if tool == "qemu-io" else [sys.executable, "-m", "blockcore.qemu_io"]
        proc = subprocess.run([*argv, "-c", f"open -o {opts} {img}"], capture_output=True,
                              text=True, check=False)  # fmt: skip
        first = (proc.stderr + proc.stdout).splitlines()[0]
        lines[tool] = first.split(": ", 1)[1]
    assert lines["qemu-io"] == f"can't open device {img}: {ERRORS[opts]}"
    assert lines["blockcore"] == lines["qemu-io"]


def test_invalid_cache_options_through_the_api(tmp_path: Path) -> None:
    img = create(tmp_path / "e.qcow2", "64M")
    with pytest.raises(OSError, match="may not exceed cache-size") as exc:
        BlockBackend.open(str(img), {"driver": "qcow2", "cache-size": 1 << 20,
                                     "l2-cache-size": 2 << 20})  # fmt: skip
    assert exc.value.filename == str(img)


# -------------------------------------------------------------------------------------------
# pass-discard-*
# -------------------------------------------------------------------------------------------


def _blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _punched(before: int, after: int) -> bool:
    if after <= before - 4 * MiB:
        return True
    assert after >= before - 256 * KiB, f"partly punched: {before} -> {after}"
    return False


OPS = {  # qemu-io command, blockcore call
    "discard": ("discard 0 8M", lambda blk: blk.pdiscard(0, 8 * MiB)),
    "zero-unmap": ("write -z -u 0 8M",
                   lambda blk: blk.pwrite_zeroes(0, 8 * MiB, BdrvRequestFlags.MAY_UNMAP)),
}  # fmt: skip


@pytest.mark.parametrize("unmap", [True, False], ids=["unmap", "ignore"])
@pytest.mark.parametrize("other", [None, "on"])
@pytest.mark.parametrize("request_opt", [None, "on", "off"])
@pytest.mark.parametrize("op", list(OPS))
def test_pass_discard_as_qemu(tmp_path: Path, op: str, request_opt: str | None,
                              other: str | None, unmap: bool) -> None:  # fmt: skip
    """The same freeing operation through qemu-io and through blockcore, with the same
    pass-discard-request/-other options and discard=unmap|ignore: the file is punched in
    both or in neither, the guest data is the same (qemu-img compare), check is clean.

    Guest discards and MAY_UNMAP zero writes free clusters as QCOW2_DISCARD_REQUEST
    (pass-discard-request decides, never pass-discard-other), and qemu-io's ``write -z -u``
    keeps MAY_UNMAP even with discard=ignore (blk_co_pwrite_zeroes skips the BDRV_O_UNMAP
    rule of bdrv_co_pwrite_zeroes)."""
    opts = {k: v for k, v in (("pass-discard-request", request_opt),
                              ("pass-discard-other", other)) if v is not None}  # fmt: skip
    punched = {}
    paths = {}
    for tool in ("qemu", "blockcore"):
        img = create(tmp_path / f"{tool}.qcow2", "64M")
        qemu_io(img, "write -P 0x5a 0 8M", "write -P 0x6b 8M 1M")
        before = _blocks(img)
        if tool == "qemu":
            o = "".join(f"{k}={v}," for k, v in opts.items())
            cmd = f"open -d {'unmap' if unmap else 'ignore'} -o {o}driver=qcow2 {img}"
            proc = subprocess.run(["qemu-io", "-c", cmd, "-c", OPS[op][0]],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout
        else:
            flags = OpenFlags.RDWR | (OpenFlags.UNMAP if unmap else OpenFlags.NONE)
            with BlockBackend.open(str(img), {"driver": "qcow2", **opts}, flags) as blk:
                OPS[op][1](blk)
                blk.flush()
        punched[tool] = _punched(before, _blocks(img))
        paths[tool] = img
        check_clean(img)
    assert punched["blockcore"] == punched["qemu"], punched
    proc = qemu_img("compare", str(paths["qemu"]), str(paths["blockcore"]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if op == "zero-unmap" or unmap:
        qemu_io(paths["blockcore"], "read -P 0 0 8M", "read -P 0x6b 8M 1M")


@pytest.mark.parametrize("value", [None, "on", "off"])
@pytest.mark.parametrize("op", ["-d", "-a"])
def test_pass_discard_snapshot_as_qemu_img(tmp_path: Path, op: str, value: str | None) -> None:
    """Deleting a snapshot (or applying one) frees clusters: with pass-discard-snapshot on
    (the default) they are punched in the file as qemu-img does, with off they are not;
    check is clean and the content equals qemu's."""
    punched = {}
    paths = {}
    for tool in ("qemu", "blockcore"):
        img = create(tmp_path / f"{tool}.qcow2", "64M")
        qemu_io(img, "write -P 0x5a 0 8M")
        qemu_img("snapshot", "-c", "s1", str(img))
        qemu_io(img, "write -P 0x6b 0 8M")
        before = _blocks(img)
        spec = f"driver=qcow2,file.filename={img}"
        if value is not None:
            spec += f",pass-discard-snapshot={value}"
        image_tool(tool, "snapshot", op, "s1", "--image-opts", spec)
        punched[tool] = _punched(before, _blocks(img))
        paths[tool] = img
        check_clean(img)
    assert punched["blockcore"] == punched["qemu"] == (value != "off"), punched
    proc = qemu_img("compare", str(paths["qemu"]), str(paths["blockcore"]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

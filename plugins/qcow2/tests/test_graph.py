"""qcow2 through the node graph: creation over any protocol, the core's conformance kit,
crash consistency at every write of a protocol driver below qcow2, damaged images."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockcore
from blockcore import BlockBackend, OpenFlags

from .conftest import create, qemu_img, qemu_io, requires_qemu
from .crashmem import CrashMem

MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[CrashMem]:
    drv = CrashMem()
    drv.register()
    yield drv
    drv.unregister()


def _on(mem: CrashMem, key: str, **extra: object) -> dict[str, object]:
    return {"driver": "qcow2", "file": {"driver": mem.name, "filename": key}, **extra}


@requires_qemu
@pytest.mark.parametrize("opts", [{}, {"cluster_size": "4k", "refcount_bits": 1},
                                  {"extended_l2": True, "preallocation": "metadata"},
                                  {"compat": "0.10", "preallocation": "full"}],
                         ids=["default", "4k-r1", "extl2-meta", "v2-full"])  # fmt: skip
def test_create_over_another_protocol(mem: CrashMem, tmp_path: Path,
                                      opts: dict[str, object]) -> None:  # fmt: skip
    """bdrv_co_create_opts reaches its file through the graph, so a protocol other than
    ``file`` holds the new image; qemu-img accepts what lands there."""
    blockcore.bdrv_create("qcow2", f"{mem.name}:disk", {"size": 4 * MiB, **opts})
    with BlockBackend.open(None, _on(mem, "disk"), OpenFlags.RDWR) as blk:
        assert blk.getlength() == 4 * MiB
        blk.pwrite(100_000, b"\x5a" * 300_000)
        blk.flush()
    path = tmp_path / "disk.qcow2"
    path.write_bytes(bytes(mem.images["disk"]))
    proc = qemu_img("check", str(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = qemu_io(path, "read -P 0 0 100000", "read -P 0x5a 100000 300000",
                  "read -P 0 400000 100000")  # fmt: skip
    assert "Pattern verification failed" not in out


# -------------------------------------------------------------------------------------------
# VM state
# -------------------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize(("size", "opts"), [("4M", ""), ("100k", "cluster_size=512"),
                                            ("1G", "compat=0.10,cluster_size=4k")],
                         ids=["64k", "512", "v2-4k"])  # fmt: skip
def test_vmstate_both_ways_with_qemu(tmp_path: Path, size: str, opts: str) -> None:
    """VM state lives past the disk at the L1 boundary QEMU uses: what qemu-io saves we
    load, what we save qemu-io loads, the disk is untouched and qemu-img check is clean."""
    from blockcore.special import bdrv_load_vmstate, bdrv_save_vmstate

    img = create(tmp_path / "v.qcow2", size, opts)
    qemu_io(img, "write -P 0x11 0 64k", "write -b -P 0x5a 0 64k", "write -b -P 0x6b 70144 5120")
    m = re.search(r"vm state offset: (.*)", qemu_io(img, "info"))
    assert m is not None
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:
        assert _human_size(blockcore.info.bdrv_get_info(blk.bs).vm_state_offset) == m.group(1)
        buf = bytearray(75264)
        bdrv_load_vmstate(blk.bs, buf, 0, len(buf))
        assert buf[:65536] == b"\x5a" * 65536 and buf[65536:70144] == bytes(4608)
        assert buf[70144:] == b"\x6b" * 5120
        bdrv_save_vmstate(blk.bs, b"\x7c" * 3000, 65000, 3000)  # unaligned, over both
        bdrv_save_vmstate(blk.bs, b"\x8d" * 200_000, 1 << 20, 200_000)  # new clusters
        assert blk.pread(0, 65536) == b"\x11" * 65536
    proc = qemu_img("check", str(img), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # qemu-io wants sector-aligned VM state requests
    out = qemu_io(img, "read -b -P 0x5a 0 64512", "read -b -P 0x7c 65024 2560",
                  "read -b -P 0 68096 2048", "read -b -P 0x6b 70144 5120",
                  f"read -b -P 0x8d {1 << 20} 199680", "read -P 0x11 0 64k",
                  "read -P 0 64k 36k")  # fmt: skip
    assert "Pattern verification failed" not in out
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    assert raw.stat().st_size == blockcore_size(size)


def blockcore_size(size: str) -> int:
    from blockcore.util import parse_size

    return parse_size(size)


def _human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def test_vmstate_events_and_read_only(mem: CrashMem) -> None:
    from blockcore.special import bdrv_load_vmstate, bdrv_save_vmstate

    blockcore.bdrv_create("qcow2", f"{mem.name}:vm", {"size": 1 * MiB})
    with BlockBackend.open(None, _on(mem, "vm"), OpenFlags.RDWR) as blk:
        mem.events.clear()
        bdrv_save_vmstate(blk.bs, b"abc" * 1000, 10, 3000)
        assert "vmstate_save" in mem.events and "vmstate_load" not in mem.events
        buf = bytearray(3010)
        bdrv_load_vmstate(blk.bs, buf, 0, 3010)
        assert "vmstate_load" in mem.events
        assert buf == bytes(10) + b"abc" * 1000
        assert blk.getlength() == 1 * MiB  # the disk does not grow
    with BlockBackend.open(None, _on(mem, "vm")) as blk:
        with pytest.raises(OSError, match="read-only"):
            bdrv_save_vmstate(blk.bs, b"x", 0, 1)

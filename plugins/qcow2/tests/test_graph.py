"""qcow2 through the node graph: creation over any protocol, the core's conformance kit,
crash consistency at every write of a protocol driver below qcow2, damaged images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import blockcore
from blockcore import BlockBackend, OpenFlags

from .conftest import qemu_img, qemu_io, requires_qemu
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

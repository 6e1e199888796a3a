"""A qcow2 image on a loop device (root): created by qemu-img, probed, read and written by
blockcore through the qcow2 driver stacked on host_device, then checked by qemu-img check
and read back by qemu-io on the same device."""

from __future__ import annotations

import subprocess

import pytest
from blockcore import BlockBackend, OpenFlags
from blockcore.testing import requires_qemu

pytest.importorskip("blockcore_qcow2.driver", reason="needs the qcow2 driver (blockcore-qcow2)")
pytestmark = pytest.mark.skipif(requires_qemu() is not None, reason=str(requires_qemu()))

MiB = 1 << 20


def _qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("sector", "direct"), [(512, False), (4096, True)],
                         ids=["512B-buffered", "4KiB-direct"])  # fmt: skip
def test_qcow2_on_a_loop_device(make_loop, sector: int, direct: bool) -> None:
    lo = make_loop(sector_size=sector)
    res = _qemu("qemu-img", "create", "-f", "qcow2", lo.dev, "32M")
    assert res.returncode == 0, res.stderr
    res = _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", lo.dev)
    assert res.returncode == 0, res.stderr
    options = {"cache": {"direct": direct}}
    with BlockBackend.open(lo.dev, options, OpenFlags.RDWR) as blk:
        bs = blk.bs
        assert bs.drv.name == "qcow2" and bs.file.bs.drv.name == "host_device"
        assert blk.getlength() == 32 * MiB
        assert blk.pread(0, MiB) == b"\x11" * MiB
        blk.pwrite(MiB + 100, b"\x22" * 70000)  # unaligned, allocates clusters
        blk.pwrite(20 * MiB, b"\x33" * (3 * MiB))  # several clusters, past max_transfer
        blk.pwrite_zeroes(0, 65536)
        assert blk.pread(MiB + 99, 70002) == b"\x00" + b"\x22" * 70000 + b"\x00"
        blk.flush()
    res = _qemu("qemu-img", "check", "-f", "qcow2", lo.dev)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found on the image." in res.stdout
    res = _qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64k", "-c", "read -P 0x11 64k 960k",
                "-c", f"read -P 0x22 {MiB + 100} 70000",
                "-c", f"read -P 0x33 {20 * MiB} {3 * MiB}", lo.dev)  # fmt: skip
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout

"""host_device on real loop devices (root): sizes, limits, O_DIRECT with 512 B and 4 KiB
sectors, discard and zero-out seen in the backing file, locking, refusals."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from blockcore import BlockBackend, OpenFlags
from blockcore.drivers import bdrv_find_format, bdrv_find_protocol
from blockcore.errors import BlockError, NotSupportedError, PermissionConflictError
from blockcore.graph import bdrv_open, bdrv_unref
from blockcore.info import bdrv_get_allocated_file_size, bdrv_is_sg
from blockcore.special import bdrv_co_ioctl
from blockcore.status import bdrv_block_status
from blockcore.testing import check_driver, requires_qemu
from blockcore.types import BdrvRequestFlags as F
from blockcore.types import BlockStatusFlags as S
from blockcore.types import PreallocMode

from blockcore_host_device import ioctl as io_
from blockcore_host_device.ioctl import LinuxIoctl, use_layer

MiB = 1 << 20
RW = OpenFlags.RDWR


class Recorder(LinuxIoctl):
    """The real layer, remembering which ioctls were asked."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    def ioctl(self, fd, request, arg=0):
        self.requests.append(request)
        return super().ioctl(fd, request, arg)


def _open(dev: str, direct: bool = False, flags: OpenFlags = RW, **opts) -> BlockBackend:
    options = {"driver": "host_device", "cache": {"direct": direct}, **opts}
    return BlockBackend.open(dev, options, flags)


# -- probing and refusals (no root needed) ----------------------------------------------------


def test_probe_scores() -> None:
    drv = bdrv_find_format("host_device")
    assert drv.bdrv_probe_device("/dev/cdrom") == 50
    assert drv.bdrv_probe_device("/dev/null") == 0  # a character device, not sg
    assert drv.bdrv_probe_device("/nonexistent/disk") == 0
    cd = bdrv_find_format("host_cdrom")
    assert cd.bdrv_probe_device("/dev/null") == 0


def test_regular_file_is_refused_naming_the_file_driver(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    with pytest.raises(BlockError, match=r"'host_device' driver requires '.*disk\.img' to be "
                       r"either a character or block device") as e:  # QEMU's text
        _open(str(img))
    assert e.value.errno == errno.EINVAL
    assert e.value.hint == "Use driver 'file' for image files."  # the CLI prints it below
    with pytest.raises(BlockError, match="not a regular file: use driver 'file'"):
        BlockBackend.open(str(img), {"driver": "host_cdrom"})


def test_other_nodes_are_refused() -> None:
    with pytest.raises(BlockError, match="not a character device that is not SCSI generic"):
        _open("/dev/null", flags=OpenFlags.NONE)
    with pytest.raises(BlockError, match="not a character device: use driver 'host_device'"):
        BlockBackend.open("/dev/null", {"driver": "host_cdrom"})
    with pytest.raises(BlockError, match="not a directory"):
        _open("/dev", flags=OpenFlags.NONE)
    with pytest.raises(FileNotFoundError):
        _open("/dev/no-such-device", flags=OpenFlags.NONE)


def test_bad_options_are_refused() -> None:
    with pytest.raises(BlockError, match="invalid locking value 'maybe'"):
        _open("/dev/null", locking="maybe")
    with pytest.raises(BlockError, match="aio=native was specified, but it requires "
                       "cache.direct=on"):
        _open("/dev/null", aio="native")
    with pytest.raises(BlockError, match="invalid parameter value: posix"):
        _open("/dev/null", aio="posix")


# -- loop devices ------------------------------------------------------------------------------


def test_probing_picks_host_device_for_a_loop_device(loop) -> None:
    drv = bdrv_find_protocol(loop.dev)
    assert drv is not None and drv.name == "host_device"
    assert bdrv_find_format("host_cdrom").bdrv_probe_device(loop.dev) == 0  # EINVAL: no CD


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_size_and_limits(any_loop, direct: bool) -> None:
    sector = any_loop.sector_size
    with _open(any_loop.dev, direct) as blk:
        bs = blk.bs
        assert bs.drv.name == "host_device" and not bdrv_is_sg(bs)
        assert blk.getlength() == 64 * MiB
        bl = bs.bl
        assert bl.request_alignment == (sector if direct else 1)
        assert bl.min_mem_alignment == (512 if direct else 1)  # 512 even for 4 KiB sectors
        assert bl.pwrite_zeroes_alignment == sector
        assert bl.opt_transfer == sector  # the physical sector size
        assert bl.pdiscard_alignment >= sector
        fd = os.open(any_loop.dev, os.O_RDONLY)
        try:
            sectors = io_.query(LinuxIoctl(), fd, io_.BLKSECTGET, "H")
        finally:
            os.close(fd)
        assert bl.max_transfer == sectors * 512
        assert not bl.has_variable_length


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_unaligned_requests_reach_the_device(any_loop, direct: bool) -> None:
    """Under O_DIRECT the core pads requests to the logical sector (read-modify-write)."""
    with _open(any_loop.dev, direct) as blk:
        blk.pwrite(0, b"\x11" * 8192)
        blk.pwrite(100, b"\x22" * 200)
        blk.pwrite(5000, b"\x33" * 3)
        assert blk.pread(99, 202) == b"\x11" + b"\x22" * 200 + b"\x11"
        assert blk.pread(4999, 5) == b"\x11\x33\x33\x33\x11"
        big = os.urandom(3 * MiB + 123)  # crosses max_transfer several times
        blk.pwrite(777, big)
        assert blk.pread(777, len(big)) == big
        blk.flush()
    expect = bytearray(b"\x11" * 8192)
    expect[100:300] = b"\x22" * 200
    expect[5000:5003] = b"\x33" * 3
    assert any_loop.backing_bytes(0, 777) == bytes(expect[:777])
    assert any_loop.backing_bytes(777, len(big)) == big


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_zero_write_and_discard_reach_the_backing_file(any_loop, direct: bool) -> None:
    sector = any_loop.sector_size
    rec = Recorder()
    with use_layer(rec), _open(any_loop.dev, direct, discard="unmap") as blk:
        blk.pwrite(0, b"\xee" * (4 * MiB))
        blk.flush()
        assert any_loop.backing_bytes(MiB, 16) == b"\xee" * 16
        blk.pwrite_zeroes(MiB, 256 * 1024)  # no unmap allowed: BLKZEROOUT
        assert io_.BLKZEROOUT in rec.requests
        blk.pdiscard(2 * MiB, 512 * 1024)
        assert io_.BLKDISCARD in rec.requests
        blk.pwrite_zeroes(3 * MiB, 64 * 1024, F.MAY_UNMAP)  # fallocate(PUNCH_HOLE)
        unaligned = sector + 100
        blk.pwrite_zeroes(unaligned, 3 * sector)  # partial blocks: the core writes zeros
        blk.flush()
        assert blk.pread(MiB - 1, 256 * 1024 + 2) == b"\xee" + bytes(256 * 1024) + b"\xee"
        assert blk.pread(unaligned - 1, 3 * sector + 2) == b"\xee" + bytes(3 * sector) + b"\xee"
    assert any_loop.backing_bytes(MiB, 256 * 1024) == bytes(256 * 1024)
    assert any_loop.backing_bytes(2 * MiB, 512 * 1024) == bytes(512 * 1024)
    assert any_loop.backing_bytes(3 * MiB, 64 * 1024) == bytes(64 * 1024)
    assert any_loop.backing_bytes(3 * MiB + 64 * 1024, 4) == b"\xee" * 4
    assert any_loop.backing_bytes(unaligned, 3 * sector) == bytes(3 * sector)


def test_discard_is_a_no_op_without_unmap(loop) -> None:
    with _open(loop.dev) as blk:
        blk.pwrite(0, b"\x55" * 65536)
        blk.pdiscard(0, 65536)
        assert blk.pread(0, 65536) == b"\x55" * 65536


def test_fast_zero_writes(loop) -> None:
    """NO_FALLBACK: BLKZEROOUT may write zeroes slowly, so only an unmapping zero write
    (discard=unmap and MAY_UNMAP) counts as fast on a device, as in QEMU."""
    with _open(loop.dev) as blk, pytest.raises(NotSupportedError):
        blk.pwrite_zeroes(0, 65536, F.NO_FALLBACK)
    with _open(loop.dev, discard="unmap") as blk:
        blk.pwrite(0, b"\x66" * 65536)
        blk.pwrite_zeroes(0, 65536, F.NO_FALLBACK | F.MAY_UNMAP)
        assert blk.pread(0, 65536) == bytes(65536)


def test_status_size_and_truncate(loop, co) -> None:
    with _open(loop.dev) as blk:
        bs = blk.bs
        st = bdrv_block_status(bs, 0, 64 * MiB)
        assert st.ret & (S.DATA | S.OFFSET_VALID | S.ALLOCATED) == S.DATA | S.OFFSET_VALID | (
            S.ALLOCATED)  # fmt: skip
        assert st.pnum == 64 * MiB
        assert bdrv_get_allocated_file_size(bs) == 0
        blk.truncate(64 * MiB)
        blk.truncate(32 * MiB, exact=False)
        assert blk.getlength() == 64 * MiB
        # QEMU's order: an exact size other than the device's is refused first
        for size in (32 * MiB, 65 * MiB):
            with pytest.raises(NotSupportedError, match="^.*cannot resize device files:"):
                blk.truncate(size)
        with pytest.raises(BlockError, match="^.*cannot grow device files:") as exc:
            blk.truncate(65 * MiB, exact=False)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(NotSupportedError, match="Preallocation mode 'full' unsupported for "
                           "this non-regular file"):  # fmt: skip
            blk.truncate(64 * MiB, prealloc=PreallocMode.FULL)
        assert blk.getlength() == 64 * MiB


def test_ioctls_other_than_sg_io_are_refused(loop, co) -> None:
    from blockcore_host_device.ioctl import SgIoHdr

    with _open(loop.dev) as blk:
        with pytest.raises(NotSupportedError, match=r"ioctl 0x5309 not supported"):
            co(bdrv_co_ioctl(blk.bs, io_.CDROMEJECT, 0))
        # a loop device takes no SCSI commands (it answers SG_GET_VERSION_NUM with EINVAL)
        with pytest.raises(NotSupportedError, match="does not take SCSI generic requests"):
            co(bdrv_co_ioctl(blk.bs, io_.SG_IO, SgIoHdr()))


def test_read_only_device(make_loop) -> None:
    lo = make_loop(read_only=True)
    with pytest.raises(BlockError, match="the device is not writable") as exc:
        _open(lo.dev)
    assert exc.value.errno == errno.EACCES
    with _open(lo.dev, **{"auto-read-only": True}) as blk:
        assert not blk.bs.open_flags & OpenFlags.RDWR
        assert blk.pread(0, 512) == bytes(512)
    with _open(lo.dev, flags=OpenFlags.NONE) as blk:
        assert blk.pread(0, 512) == bytes(512)


def test_locking_between_users(loop) -> None:
    a = _open(loop.dev, flags=RW | OpenFlags.NO_SHARE)  # takes write, shares no write
    try:
        with pytest.raises(PermissionConflictError, match='Failed to get "write" lock'):
            _open(loop.dev)
        with _open(loop.dev, flags=OpenFlags.NONE) as b:  # reading shares everything
            assert b.pread(0, 512) == bytes(512)
        with _open(loop.dev, locking="off") as b:
            assert b.pread(0, 512) == bytes(512)
    finally:
        a.close()
    with _open(loop.dev) as b:  # released with the fd
        assert b.getlength() == 64 * MiB


@pytest.mark.skipif(requires_qemu() is not None, reason=str(requires_qemu()))
def test_locks_are_seen_by_qemu(loop) -> None:
    with _open(loop.dev, flags=RW | OpenFlags.NO_SHARE):
        res = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", loop.dev],
                             capture_output=True, text=True, check=False)  # fmt: skip
        assert res.returncode != 0
        assert 'Failed to get "write" lock' in res.stderr
    res = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", loop.dev],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(requires_qemu() is not None, reason=str(requires_qemu()))
def test_qemu_locks_are_seen_by_blockcore(loop) -> None:
    qemu = subprocess.Popen(["qemu-io", "-f", "raw", loop.dev], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert qemu.stdin is not None and qemu.stdout is not None
        qemu.stdin.write("read 0 512\n")
        qemu.stdin.flush()
        for line in qemu.stdout:  # the image is open once the read is reported
            if "read 512/512" in line:
                break
        # qemu-io holds "consistent read" and "write" on a raw image and shares everything
        with pytest.raises(PermissionConflictError, match='Failed to get shared "write" lock'):
            _open(loop.dev, flags=RW | OpenFlags.NO_SHARE)
        with _open(loop.dev) as blk:
            assert blk.pread(0, 512) == bytes(512)
    finally:
        qemu.communicate("quit\n", timeout=30)


@pytest.mark.skipif(requires_qemu() is not None, reason=str(requires_qemu()))
def test_qemu_reads_what_blockcore_wrote(make_loop) -> None:
    lo = make_loop(sector_size=4096)
    with _open(lo.dev, direct=True) as blk:
        blk.pwrite(100, b"\x5a" * 200)
    res = subprocess.run(["qemu-io", "-f", "raw", "-t", "none", "-c", "read -P 0x5a 100 200",
                          "-c", "read -P 0 0 100", lo.dev],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_conformance_kit(any_loop, direct: bool) -> None:
    # discard=ignore: the kit wants a discarded range all old or all zeros, while the device
    # (as in QEMU) discards only the whole logical blocks of it; discard is tested above
    check_driver(lambda: _open(any_loop.dev, direct), rounds=100)


def test_node_is_closed_with_its_fd(loop) -> None:
    bs = bdrv_open(loop.dev, {"driver": "host_device"}, RW)
    fd = bs.opaque.fd
    bdrv_unref(bs)
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


def test_format_probing_puts_raw_on_host_device(loop) -> None:
    pytest.importorskip("blockcore_raw")
    with BlockBackend.open(loop.dev, None, RW) as blk:
        assert blk.bs.drv.name == "raw"
        assert blk.bs.file.bs.drv.name == "host_device"

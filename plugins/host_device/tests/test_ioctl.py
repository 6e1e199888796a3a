"""The real ioctl layer against loop devices (root), and the layout of its structures."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import pytest

from blockcore_host_device import ioctl as io_
from blockcore_host_device.ioctl import LinuxIoctl, SgIoHdr, query, range_arg

MiB = 1 << 20


def test_sg_io_hdr_layout_matches_the_kernel() -> None:
    # offsets of struct sg_io_hdr on 64-bit Linux (include/scsi/sg.h)
    assert ctypes.sizeof(SgIoHdr) == 88
    assert SgIoHdr.dxferp.offset == 16
    assert SgIoHdr.timeout.offset == 40
    assert SgIoHdr.usr_ptr.offset == 56
    assert SgIoHdr.status.offset == 64
    assert SgIoHdr.resid.offset == 72
    assert SgIoHdr.info.offset == 80


def test_sg_io_request_points_at_its_buffers() -> None:
    data = ctypes.create_string_buffer(96)
    sense = ctypes.create_string_buffer(32)
    hdr = SgIoHdr.request(bytes([0x12, 0, 0, 0, 96, 0]), data, io_.SG_DXFER_FROM_DEV, sense)
    assert hdr.interface_id == ord("S")
    assert (hdr.cmd_len, hdr.dxfer_len, hdr.mx_sb_len) == (6, 96, 32)
    assert ctypes.string_at(hdr.cmdp, 6) == bytes([0x12, 0, 0, 0, 96, 0])
    assert hdr.dxferp == ctypes.addressof(data)
    assert range_arg(512, 4096) == (512).to_bytes(8, "little") + (4096).to_bytes(8, "little")


def test_queue_limit_of_a_missing_device_is_none() -> None:
    assert LinuxIoctl().queue_limit(os.makedev(4095, 4095), "max_sectors_kb") is None


def test_loop_device_answers(any_loop) -> None:
    """Size, sector sizes and limits as the reference's loop-device table records them."""
    layer = LinuxIoctl()
    st = layer.stat(any_loop.dev)
    assert stat.S_ISBLK(st.st_mode)
    fd = layer.open(any_loop.dev, writable=True)
    try:
        assert query(layer, fd, io_.BLKGETSIZE64, "Q") == 64 * MiB
        assert query(layer, fd, io_.BLKSSZGET, "i") == any_loop.sector_size
        assert query(layer, fd, io_.BLKPBSZGET, "I") == any_loop.sector_size
        assert query(layer, fd, io_.BLKROGET, "i") == 0
        sectors = query(layer, fd, io_.BLKSECTGET, "H")
        assert sectors > 0
        assert layer.queue_limit(st.st_rdev, "max_sectors_kb") == sectors // 2
        assert layer.queue_limit(st.st_rdev, "logical_block_size") == any_loop.sector_size
    finally:
        layer.close(fd)


def test_loop_device_refuses_cdrom_and_sg_requests_with_einval(loop) -> None:
    layer = LinuxIoctl()
    fd = layer.open(loop.dev, writable=False, nonblock=True)
    try:
        for request, arg in ((io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT), (io_.CDROMEJECT, 0),
                             (io_.CDROM_LOCKDOOR, 1), (io_.CDROM_MEDIA_CHANGED, io_.CDSL_CURRENT),
                             (io_.SG_GET_VERSION_NUM, bytes(4)),
                             (io_.SG_GET_SCSI_ID, bytes(32))):  # fmt: skip
            with pytest.raises(OSError) as exc:
                layer.ioctl(fd, request, arg)
            assert exc.value.errno == errno.EINVAL, hex(request)
    finally:
        layer.close(fd)


def test_range_ioctls_need_whole_blocks(any_loop) -> None:
    layer = LinuxIoctl()
    fd = layer.open(any_loop.dev, writable=True)
    try:
        os.pwrite(fd, b"\xaa" * 65536, 0)
        os.fsync(fd)
        layer.ioctl(fd, io_.BLKZEROOUT, range_arg(0, 8192))
        layer.ioctl(fd, io_.BLKDISCARD, range_arg(8192, 8192))
        assert os.pread(fd, 16384, 0) == bytes(16384)
        for request in (io_.BLKZEROOUT, io_.BLKDISCARD):
            with pytest.raises(OSError) as exc:
                layer.ioctl(fd, request, range_arg(100, 4096))
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as exc:
            layer.ioctl(fd, io_.BLKZEROOUT, range_arg(64 * MiB, 4096))  # past the end
        assert exc.value.errno == errno.EINVAL
    finally:
        layer.close(fd)


def test_read_only_loop_device_says_so(make_loop) -> None:
    lo = make_loop(read_only=True)
    layer = LinuxIoctl()
    fd = layer.open(lo.dev, writable=False)
    try:
        assert query(layer, fd, io_.BLKROGET, "i") == 1
    finally:
        layer.close(fd)

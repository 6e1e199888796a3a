"""The fake kernel answers as Linux does for an optical drive (sr) and a SCSI generic node (sg).

This machine has neither, so these answers are checked against the kernel paths the fake
cites (cdrom.c, sr.c, scsi_ioctl.c, sg.c), not against hardware. Where the same request can
be asked of a loop device, the loop device's real answer is checked too (test_ioctl.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import pytest

from blockcore_host_device import ioctl as io_
from blockcore_host_device.fake import FakeCdrom, FakeLinux, FakeSg
from blockcore_host_device.ioctl import SgIoHdr, query

DISC = bytes(range(256)) * 8 * 64  # 128 KiB, 64 sectors of 2 KiB


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def _sg(layer, fd, cdb: bytes, length: int = 0, *, arg_type=bytearray):
    data = ctypes.create_string_buffer(max(length, 1))
    sense = ctypes.create_string_buffer(32)
    direction = io_.SG_DXFER_FROM_DEV if length else io_.SG_DXFER_NONE
    hdr = SgIoHdr.request(cdb, data if length else None, direction, sense)
    buf = arg_type(bytes(hdr))
    ret = layer.ioctl(fd, io_.SG_IO, buf)
    out = SgIoHdr.from_buffer_copy(ret if isinstance(ret, bytes) else buf)
    return ret, out, data.raw[:length], sense.raw[: out.sb_len_wr]


@pytest.fixture
def drive(fake: FakeLinux) -> FakeCdrom:
    return fake.add("/dev/sr0", FakeCdrom(DISC))


def test_sr_node_looks_like_a_cd_drive(fake, drive) -> None:
    st = fake.stat("/dev/sr0")
    assert stat.S_ISBLK(st.st_mode)
    assert os.major(st.st_rdev) == 11
    fd = fake.open("/dev/sr0", writable=False, nonblock=True)
    assert query(fake, fd, io_.BLKGETSIZE64, "Q") == len(DISC)
    assert query(fake, fd, io_.BLKSSZGET, "i") == 2048
    assert query(fake, fd, io_.BLKROGET, "i") == 1
    assert os.pread(fd, 16, 2048) == DISC[2048:2064]  # the data path reads the medium
    assert fake.ioctl(fd, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT) == io_.CDS_DISC_OK
    assert query(fake, fd, io_.SG_GET_VERSION_NUM, "i") == 30527
    fake.close(fd)


def test_sr_open_without_o_nonblock(fake) -> None:
    """cdrom_open/open_for_data: no disc is ENOMEDIUM, writing a CD-ROM is EROFS, a data
    open locks the door until the last close."""
    empty = fake.add("/dev/sr1", FakeCdrom(None, minor=1))
    assert _errno(lambda: fake.open("/dev/sr1", writable=False)) == errno.ENOMEDIUM
    assert empty.use_count == 0
    fd = fake.open("/dev/sr1", writable=True, nonblock=True)  # O_NONBLOCK: always opens
    fake.close(fd)
    cd = fake.add("/dev/sr2", FakeCdrom(DISC, minor=2))
    assert _errno(lambda: fake.open("/dev/sr2", writable=True)) == errno.EROFS
    fd = fake.open("/dev/sr2", writable=False)
    assert cd.door_locked
    fake.close(fd)
    assert not cd.door_locked


def test_sr_eject_and_door_lock(fake, drive) -> None:
    fd = fake.open("/dev/sr0", writable=False, nonblock=True)
    assert fake.ioctl(fd, io_.CDROM_LOCKDOOR, 1) == 0
    assert drive.door_locked
    # since 5.18 sr sends CDROMEJECT as START STOP UNIT: a locked door is a SCSI CHECK
    # CONDITION, returned as status 2, not as an errno
    assert fake.ioctl(fd, io_.CDROMEJECT, 0) == 2
    assert not drive.tray_open
    assert fake.ioctl(fd, io_.CDROM_LOCKDOOR, 0) == 0
    assert fake.ioctl(fd, io_.CDROMEJECT, 0) == 0
    assert drive.tray_open
    assert fake.ioctl(fd, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT) == io_.CDS_TRAY_OPEN
    assert query(fake, fd, io_.BLKGETSIZE64, "Q") == 0
    assert fake.ioctl(fd, io_.CDROMCLOSETRAY, 0) == 0
    assert fake.ioctl(fd, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT) == io_.CDS_DISC_OK
    fake.close(fd)


def test_sr_unlock_with_other_users_needs_cap_sys_admin(fake) -> None:
    cd = fake.add("/dev/sr3", FakeCdrom(DISC, minor=3, capable=False))
    a = fake.open("/dev/sr3", writable=False, nonblock=True)
    b = fake.open("/dev/sr3", writable=False, nonblock=True)
    assert fake.ioctl(a, io_.CDROM_LOCKDOOR, 1) == 0
    assert _errno(fake.ioctl, a, io_.CDROM_LOCKDOOR, 0) == errno.EBUSY
    assert cd.door_locked and not cd.keeplocked  # keeplocked is cleared before the check
    fake.close(b)
    assert fake.ioctl(a, io_.CDROM_LOCKDOOR, 0) == 0
    fake.close(a)


def test_sr_without_a_lock_says_eopnotsupp(fake) -> None:
    fake.add("/dev/sr4", FakeCdrom(DISC, minor=4, lockable=False))
    fd = fake.open("/dev/sr4", writable=False, nonblock=True)
    assert _errno(fake.ioctl, fd, io_.CDROM_LOCKDOOR, 1) == errno.EOPNOTSUPP
    fake.close(fd)


def test_sr_media_changed_is_reported_once(fake, drive) -> None:
    fd = fake.open("/dev/sr0", writable=False, nonblock=True)
    fake.ioctl(fd, io_.CDROM_MEDIA_CHANGED, io_.CDSL_CURRENT)  # the initial insertion
    assert fake.ioctl(fd, io_.CDROM_MEDIA_CHANGED, io_.CDSL_CURRENT) == 0
    drive.insert(DISC[:4096])
    assert fake.ioctl(fd, io_.CDROM_MEDIA_CHANGED, io_.CDSL_CURRENT) == 1
    assert fake.ioctl(fd, io_.CDROM_MEDIA_CHANGED, io_.CDSL_CURRENT) == 0
    assert query(fake, fd, io_.BLKGETSIZE64, "Q") == 4096
    drive.remove()
    assert fake.ioctl(fd, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT) == io_.CDS_TRAY_OPEN
    fake.close(fd)


def test_sr_errnos(fake, drive) -> None:
    ro = fake.open("/dev/sr0", writable=False, nonblock=True)
    assert _errno(fake.ioctl, ro, io_.SG_GET_SCSI_ID, bytes(32)) == errno.EINVAL
    assert _errno(fake.ioctl, ro, 0x1234, 0) == errno.EINVAL
    assert _errno(fake.ioctl, ro, io_.BLKGETSIZE64, 0) == errno.EFAULT  # int is no buffer
    assert _errno(fake.ioctl, ro, io_.BLKDISCARD, bytes(16)) == errno.EBADF
    fake.close(ro)


def test_sr_sg_io(fake, drive) -> None:
    fd = fake.open("/dev/sr0", writable=False, nonblock=True)
    ret, hdr, data, _ = _sg(fake, fd, bytes([0x12, 0, 0, 0, 36, 0]), 36)
    assert ret == 0 and hdr.status == 0 and hdr.info == 0
    assert data[0] == 5 and data[8:16] == b"BLKCORE "
    ret, hdr, data, _ = _sg(fake, fd, bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0]), 4096,
                            arg_type=bytes)  # fmt: skip
    assert ret != 0 and data == DISC[2048:6144]  # bytes in, a copy of the header out
    drive.remove()
    ret, hdr, _, sense = _sg(fake, fd, bytes(6))  # TEST UNIT READY
    assert (hdr.status, hdr.masked_status, hdr.driver_status) == (2, 1, 0x08)
    assert hdr.info & io_.SG_INFO_CHECK
    assert (sense[2], sense[12], sense[13]) == (2, 0x3A, 0x02)  # not ready, tray open
    bad = SgIoHdr.request(bytes(6), None, io_.SG_DXFER_NONE, ctypes.create_string_buffer(8))
    bad.interface_id = ord("Q")
    assert _errno(fake.ioctl, fd, io_.SG_IO, bytearray(bytes(bad))) == errno.EINVAL
    short = SgIoHdr.request(bytes(6), None, io_.SG_DXFER_NONE, ctypes.create_string_buffer(8))
    short.cmd_len = 4
    assert _errno(fake.ioctl, fd, io_.SG_IO, bytearray(bytes(short))) == errno.EMSGSIZE
    fake.close(fd)


def test_sg_node(fake) -> None:
    sg = fake.add("/dev/sg0", FakeSg(DISC))
    st = fake.stat("/dev/sg0")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 21
    ro = fake.open("/dev/sg0", writable=False)
    rw = fake.open("/dev/sg0", writable=True)
    assert query(fake, ro, io_.SG_GET_VERSION_NUM, "i") == 30536
    raw = fake.ioctl(ro, io_.SG_GET_SCSI_ID, bytes(32))
    assert len(raw) == 32 and raw[16] == 5  # scsi_type
    assert query(fake, ro, io_.SG_GET_SG_TABLESIZE, "i") == sg.tablesize
    assert query(fake, ro, io_.BLKSECTGET, "i") == 512 * 512
    # what sg does not know: EPERM on a read-only fd, EINVAL (scsi_ioctl) on a read-write one
    assert _errno(fake.ioctl, ro, io_.BLKGETSIZE64, bytes(8)) == errno.EPERM
    assert _errno(fake.ioctl, rw, io_.BLKGETSIZE64, bytes(8)) == errno.EINVAL
    assert _errno(fake.ioctl, rw, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT) == errno.EINVAL
    bad = SgIoHdr.request(bytes(6), None, io_.SG_DXFER_NONE, ctypes.create_string_buffer(8))
    bad.interface_id = ord("Q")
    assert _errno(fake.ioctl, rw, io_.SG_IO, bytearray(bytes(bad))) == errno.ENOSYS
    ret, hdr, data, _ = _sg(fake, rw, bytes([0x25] + [0] * 9), 8)  # READ CAPACITY(10)
    assert ret == 0 and int.from_bytes(data[:4], "big") == len(DISC) // 2048 - 1
    ret, hdr, _, sense = _sg(fake, rw, bytes([0xFF, 0, 0, 0, 0, 0]))
    assert hdr.status == 2 and (sense[2], sense[12]) == (5, 0x20)  # invalid opcode
    fake.close(ro)
    fake.close(rw)


def test_unknown_paths_go_to_the_real_kernel(fake) -> None:
    assert stat.S_ISCHR(fake.stat("/dev/null").st_mode)
    fd = fake.open("/dev/null", writable=False)
    assert _errno(fake.ioctl, fd, io_.BLKGETSIZE64, bytes(8)) == errno.ENOTTY
    fake.close(fd)
    assert _errno(fake.stat, "/nonexistent/sr9") == errno.ENOENT

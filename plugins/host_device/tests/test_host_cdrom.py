"""host_cdrom against the fake sr drive: this machine has no optical drive, so every test here
runs on :class:`blockcore_host_device.fake.FakeCdrom` (answers as Linux; see test_fake.py)."""

from __future__ import annotations

import errno
import logging

import pytest
from blockcore import BlockBackend, OpenFlags
from blockcore.drivers import bdrv_find_format, bdrv_find_protocol
from blockcore.errors import BlockError, NoMediumError
from blockcore.io import bdrv_co_getlength
from blockcore.special import bdrv_co_eject, bdrv_co_ioctl, bdrv_co_is_inserted, bdrv_co_lock_medium

from blockcore_host_device import ioctl as io_
from blockcore_host_device.fake import FakeCdrom

DISC = bytes(range(256)) * 8 * 256  # 512 KiB
OTHER = b"\x77" * (1 << 20)


@pytest.fixture
def drive(fake) -> FakeCdrom:
    return fake.add("/dev/sr0", FakeCdrom(DISC))


def _open(**opts) -> BlockBackend:
    return BlockBackend.open("/dev/sr0", {"driver": "host_cdrom", **opts}, OpenFlags.NONE)


def test_probing_prefers_host_cdrom_for_a_cd_drive(fake, drive) -> None:
    assert bdrv_find_format("host_cdrom").bdrv_probe_device("/dev/sr0") == 100
    assert bdrv_find_protocol("/dev/sr0").name == "host_cdrom"  # ties go to the first name
    assert drive.use_count == 0  # probing closed what it opened


def test_read_a_disc(fake, drive) -> None:
    with _open() as blk:
        bs = blk.bs
        assert bs.drv.name == "host_cdrom"
        assert blk.getlength() == len(DISC)
        assert bs.bl.has_variable_length
        assert blk.pread(2048 * 3 + 5, 100) == DISC[2048 * 3 + 5 : 2048 * 3 + 105]
        assert drive.use_count == 1
    assert drive.use_count == 0


def test_a_cd_rom_is_not_writable(fake, drive) -> None:
    with pytest.raises(BlockError, match="the device is not writable") as exc:
        BlockBackend.open("/dev/sr0", {"driver": "host_cdrom"}, OpenFlags.RDWR)
    assert exc.value.errno == errno.EACCES
    with BlockBackend.open("/dev/sr0", {"driver": "host_cdrom", "auto-read-only": True},
                           OpenFlags.RDWR) as blk:  # fmt: skip
        assert not blk.bs.open_flags & OpenFlags.RDWR
    assert drive.use_count == 0


def test_open_without_a_medium(fake, co) -> None:
    """Opens (O_NONBLOCK), has length 0, and reads fail with "no medium" at the driver."""
    fake.add("/dev/sr0", FakeCdrom(None))
    with _open() as blk:
        bs = blk.bs
        assert blk.getlength() == 0
        assert co(bdrv_co_is_inserted(bs)) is False
        buf = memoryview(bytearray(2048))
        with pytest.raises(NoMediumError, match="no medium in the drive") as exc:
            co(bs.drv.bdrv_co_preadv(bs, 0, 2048, buf, 0))
        assert exc.value.errno == errno.ENOMEDIUM


def test_backend_read_without_a_medium_says_no_medium(fake) -> None:
    fake.add("/dev/sr0", FakeCdrom(None))
    with _open() as blk, pytest.raises(NoMediumError):
        blk.pread(0, 2048)


def test_media_change_is_seen_and_the_size_read_again(fake, drive, co) -> None:
    with _open() as blk:
        bs = blk.bs
        assert co(bdrv_co_getlength(bs)) == len(DISC)
        seen = bs.opaque.media_changes
        drive.remove()
        assert co(bdrv_co_is_inserted(bs)) is False
        assert co(bdrv_co_getlength(bs)) == 0
        drive.insert(OTHER)
        assert co(bdrv_co_is_inserted(bs)) is True
        assert co(bdrv_co_getlength(bs)) == len(OTHER)
        assert bs.opaque.media_changes == seen + 2
        assert blk.pread(len(DISC), 16) == OTHER[:16]  # past the old disc's end


def test_eject_unlocks_the_door_this_node_locked(fake, drive, co) -> None:
    with _open() as blk:
        bs = blk.bs
        co(bdrv_co_lock_medium(bs, True))
        assert drive.door_locked and bs.opaque.door_locked
        with pytest.raises(RuntimeError):
            drive.remove()  # the button does nothing while the door is locked
        co(bdrv_co_eject(bs, True))
        assert drive.tray_open and not drive.door_locked
        assert co(bdrv_co_is_inserted(bs)) is False
        assert co(bdrv_co_getlength(bs)) == 0
        co(bdrv_co_eject(bs, False))  # load: close the tray
        assert not drive.tray_open
        assert co(bdrv_co_is_inserted(bs)) is True
        assert co(bdrv_co_getlength(bs)) == len(DISC)
    requests = [r for r, _ in fake.calls]
    lock_calls = [i for i, r in enumerate(requests) if r == io_.CDROM_LOCKDOOR]
    assert requests.index(io_.CDROMEJECT) > lock_calls[1]  # unlocked, then ejected


def test_eject_lock_and_medium_pass_through_raw(fake, drive, co) -> None:
    """A drive opened with no driver named gets raw on top; raw hands the removable-media
    calls to host_cdrom (QEMU's raw_eject/raw_lock_medium)."""
    with BlockBackend.open("/dev/sr0", {}, OpenFlags.NONE) as blk:
        bs = blk.bs
        assert bs.drv.name == "raw" and bs.file.bs.drv.name == "host_cdrom"
        co(bdrv_co_lock_medium(bs, True))
        assert drive.door_locked
        co(bdrv_co_eject(bs, True))
        assert drive.tray_open and not drive.door_locked
        assert co(bdrv_co_is_inserted(bs)) is False
        with pytest.raises(NoMediumError):
            blk.pread(0, 512)
        co(bdrv_co_eject(bs, False))
        assert blk.pread(0, 16) == DISC[:16]


def test_eject_refused_while_another_user_holds_the_door(fake, drive, co) -> None:
    other = fake.open("/dev/sr0", writable=False, nonblock=True)
    fake.ioctl(other, io_.CDROM_LOCKDOOR, 1)
    try:
        with _open() as blk:
            with pytest.raises(BlockError, match=r"the drive refused to eject \(SCSI status "
                               r"0x2\)") as exc:  # fmt: skip
                co(bdrv_co_eject(blk.bs, True))
            assert exc.value.errno == errno.EIO
            assert not drive.tray_open
    finally:
        fake.ioctl(other, io_.CDROM_LOCKDOOR, 0)
        fake.close(other)


def test_lock_medium_failure_is_logged_not_raised(fake, co, caplog) -> None:
    drive = fake.add("/dev/sr0", FakeCdrom(DISC, lockable=False))
    with _open() as blk, caplog.at_level(logging.WARNING, "blockcore_host_device"):
        co(bdrv_co_lock_medium(blk.bs, True))
        assert not blk.bs.opaque.door_locked and not drive.door_locked
    assert "CDROM_LOCKDOOR 1 failed: Operation not supported" in caplog.text


def test_sg_io_through_a_cd_drive(fake, drive, co) -> None:
    import ctypes

    from blockcore_host_device.ioctl import SgIoHdr

    data, sense = ctypes.create_string_buffer(36), ctypes.create_string_buffer(32)
    hdr = SgIoHdr.request(bytes([0x12, 0, 0, 0, 36, 0]), data, io_.SG_DXFER_FROM_DEV, sense)
    with _open() as blk:
        assert co(bdrv_co_ioctl(blk.bs, io_.SG_IO, hdr)) == 0
        assert hdr.status == 0 and data.raw[0] == 5  # a CD/DVD unit answered INQUIRY
        assert not blk.bs.sg  # a block device is never "sg"


def test_image_locks_as_for_files(fake, drive) -> None:
    flags = OpenFlags.NONE | OpenFlags.NO_SHARE  # a reader that shares no write
    with BlockBackend.open("/dev/sr0", {"driver": "host_cdrom"}, flags) as a:
        assert a.bs.opaque.lock.held_bytes() == [100, 201, 203]
        with _open() as b:  # another reader shares everything: no conflict
            assert b.pread(0, 16) == DISC[:16]
        with _open(locking="off") as c:
            assert c.bs.opaque.lock is None

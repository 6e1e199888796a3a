"""A fake kernel for the device nodes this machine lacks: a CD/DVD drive (``sr``) and a SCSI
generic node (``sg``). Install it with :func:`blockcore_host_device.ioctl.use_layer`.

Each fake answers stat, open, close and ioctl the way Linux 6.x does, errno values and
positive SCSI statuses included, following the kernel's paths (cited per method):

- ``sr``: the block layer answers BLK* requests; ``sr_block_ioctl`` sends CDROMEJECT and
  CDROMCLOSETRAY straight to ``scsi_ioctl`` (START STOP UNIT, since 5.18) and everything else
  to ``cdrom_ioctl`` first, then ``scsi_ioctl`` when it says ENOSYS; unknown requests end
  as EINVAL (a SCSI host without its own ioctl handler, such as usb-storage).
- ``sg``: ``sg_ioctl_common``, then ``scsi_ioctl``; SG_IO through ``sg_new_write``.

The medium's bytes live in a memfd; the fd that ``open`` returns is a new open file
description of it, so :class:`blockcore.posix.PosixEngine` reads the drive's data and OFD
image locks work as on a device. Nodes not added here go to the real layer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from typing import Any

import attrs

from . import ioctl as io_
from .ioctl import IoctlLayer, LinuxIoctl

__all__ = ["FakeCdrom", "FakeLinux", "FakeSg"]

SR_MAJOR = 11
SG_VERSION_BLOCK = 30527  # scsi_ioctl.c sg_get_version (block devices: sr, sd)
SG_VERSION_SG = 30536  # sg.c sg_version_num
CDSL_NONE = 0x7FFFFFFE
DRIVER_SENSE = 0x08
SAM_STAT_CHECK_CONDITION = 0x02
NOT_READY, ILLEGAL_REQUEST = 0x02, 0x05
MAX_CDB_BLOCK, MAX_CDB_SG = 32, 252  # sizeof(scmd->cmnd); SG_MAX_CDB_SIZE
#: commands anyone who can open the node may send (scsi_cmd_allowed, the part we emulate)
_READ_SAFE = frozenset({0x00, 0x03, 0x12, 0x1A, 0x1B, 0x25, 0x28, 0x43, 0x46, 0x4A, 0x5A})
_WRITE_SAFE = frozenset({0x1E, 0x2A})  # PREVENT ALLOW MEDIUM REMOVAL, WRITE(10): need FMODE_WRITE


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _reply(arg: Any, fmt: str, *values: Any) -> Any:
    """``put_user``: fill the caller's buffer as fcntl.ioctl does (a copy for ``bytes``)."""
    if isinstance(arg, int):
        raise _err(errno.EFAULT)  # an integer is no address the kernel can write to
    if isinstance(arg, bytes):
        out = bytearray(arg)
        struct.pack_into(fmt, out, 0, *values)
        return bytes(out)
    struct.pack_into(fmt, memoryview(arg).cast("B"), 0, *values)
    return 0


@attrs.define
class _Lun:
    """A SCSI logical unit answering the few commands the tests need (SPC/MMC/SBC)."""

    device_type: int  # 5 = CD/DVD, 0 = disk
    block_size: int
    product: bytes
    medium: bytes | None = None
    tray_open: bool = False
    prevent: bool = False  # PREVENT ALLOW MEDIUM REMOVAL
    changed: bool = False  # a medium change not yet reported to CDROM_MEDIA_CHANGED

    @property
    def ready(self) -> bool:
        return self.medium is not None and not self.tray_open

    def execute(self, cdb: bytes, data_out: bytes) -> tuple[int, bytes, bytes]:
        """Run one CDB; returns (SCSI status, fixed-format sense, data in)."""
        op = cdb[0]
        if op == 0x12:  # INQUIRY
            if cdb[1] & 1:
                return self._check(ILLEGAL_REQUEST, 0x24, 0)  # no VPD pages here
            rmb = 0x80 if self.device_type == 5 else 0  # removable medium
            std = bytes([self.device_type, rmb, 5, 2, 31, 0, 0, 0]) + b"BLKCORE "
            std += self.product.ljust(16)[:16] + b"1.0 "
            return 0, b"", std[: int.from_bytes(cdb[3:5], "big")]
        if op == 0x1B:  # START STOP UNIT
            if cdb[4] & 2:  # LoEj: move the tray
                if self.prevent:
                    return self._check(ILLEGAL_REQUEST, 0x53, 0x02)  # medium removal prevented
                self.tray_open = not cdb[4] & 1
                self.changed = self.changed or self.medium is not None
            return 0, b"", b""
        if op == 0x1E:  # PREVENT ALLOW MEDIUM REMOVAL
            self.prevent = bool(cdb[4] & 3)
            return 0, b"", b""
        if op in (0x00, 0x25, 0x28) and not self.ready:  # medium not present, tray state
            return self._check(NOT_READY, 0x3A, 0x02 if self.tray_open else 0x01)
        if op == 0x00:  # TEST UNIT READY
            return 0, b"", b""
        if op == 0x25:  # READ CAPACITY(10)
            last = len(self.medium or b"") // self.block_size - 1
            return 0, b"", struct.pack(">II", last, self.block_size)
        if op == 0x28:  # READ(10)
            lba, count = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
            data = self.medium or b""
            if (lba + count) * self.block_size > len(data):
                return self._check(ILLEGAL_REQUEST, 0x21, 0)  # LBA out of range
            return 0, b"", data[lba * self.block_size : (lba + count) * self.block_size]
        return self._check(ILLEGAL_REQUEST, 0x20, 0)  # invalid command operation code

    @staticmethod
    def _check(key: int, asc: int, ascq: int) -> tuple[int, bytes, bytes]:
        sense = bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])
        return SAM_STAT_CHECK_CONDITION, sense, b""


@attrs.define(eq=False)
class _OpenFile:
    node: _FakeNode
    writable: bool
    nonblock: bool


class _FakeNode:
    """Common part of the fake nodes: the memfd holding the readable bytes, SG_IO."""

    mode = stat.S_IFBLK
    major = SR_MAJOR
    max_cdb = MAX_CDB_BLOCK

    def __init__(self, lun: _Lun, minor: int, capable: bool, max_sectors: int) -> None:
        self.lun = lun
        self.rdev = os.makedev(self.major, minor)
        self.capable = capable  # CAP_SYS_ADMIN / CAP_SYS_RAWIO (root)
        self.max_sectors = max_sectors
        self.use_count = 0
        self._memfd = os.memfd_create(f"fake-{self.major}-{minor}", os.MFD_CLOEXEC)
        self._sync()

    def _sync(self) -> None:
        """Make the memfd hold what a read of the node returns now."""
        os.ftruncate(self._memfd, 0)
        if self.lun.ready and self.mode == stat.S_IFBLK:
            os.pwrite(self._memfd, self.lun.medium or b"", 0)

    def stat(self) -> os.stat_result:
        return os.stat_result((self.mode | 0o660, 0, 0, 1, 0, 6, 0, 0, 0, 0),
                              {"st_rdev": self.rdev})  # fmt: skip

    def capacity(self) -> int:
        return len(self.lun.medium or b"") if self.lun.ready else 0

    def open(self, writable: bool, direct: bool, nonblock: bool) -> int:
        fd = self._reopen(writable, direct, nonblock)
        self.use_count += 1
        return fd

    def _reopen(self, writable: bool, direct: bool, nonblock: bool) -> int:
        """A new open file description of the memfd (its own OFD locks)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        flags |= (os.O_DIRECT if direct else 0) | (os.O_NONBLOCK if nonblock else 0)
        return os.open(f"/proc/self/fd/{self._memfd}", flags)

    def release(self, f: _OpenFile) -> None:
        self.use_count -= 1

    def close(self) -> None:
        os.close(self._memfd)

    def sg_io(self, f: _OpenFile, arg: Any, *, sg_node: bool) -> Any:
        """SG_IO: ``sg_io`` in scsi_ioctl.c for block nodes, ``sg_new_write`` for sg."""
        if isinstance(arg, int):
            raise _err(errno.EFAULT)
        raw = bytearray(bytes(memoryview(arg).cast("B")[:88]))
        if len(raw) < 88:
            raise _err(errno.EINVAL if sg_node else errno.EFAULT)
        hdr = io_.SgIoHdr.from_buffer(raw)
        if hdr.interface_id != ord("S"):
            raise _err(errno.ENOSYS if sg_node else errno.EINVAL)
        if not sg_node and hdr.dxfer_len > self.max_sectors << 9:
            raise _err(errno.EIO)
        if hdr.dxfer_len and hdr.dxfer_direction not in (
            io_.SG_DXFER_TO_DEV, io_.SG_DXFER_FROM_DEV, io_.SG_DXFER_TO_FROM_DEV
        ):  # fmt: skip
            raise _err(errno.EINVAL)
        if not sg_node and hdr.cmd_len > self.max_cdb:
            raise _err(errno.EINVAL)
        if not hdr.cmdp or hdr.cmd_len < 6 or hdr.cmd_len > self.max_cdb:
            raise _err(errno.EMSGSIZE)
        cdb = ctypes.string_at(hdr.cmdp, hdr.cmd_len)
        if not self.capable and not (cdb[0] in _READ_SAFE or (cdb[0] in _WRITE_SAFE
                                                               and f.writable)):  # fmt: skip
            raise _err(errno.EPERM)
        data_out = b""
        if hdr.dxfer_direction in (io_.SG_DXFER_TO_DEV, io_.SG_DXFER_TO_FROM_DEV):
            data_out = ctypes.string_at(hdr.dxferp, hdr.dxfer_len)
        status, sense, data_in = self.lun.execute(cdb, data_out)
        if data_in and hdr.dxfer_direction in (io_.SG_DXFER_FROM_DEV, io_.SG_DXFER_TO_FROM_DEV):
            data_in = data_in[: hdr.dxfer_len]
            ctypes.memmove(hdr.dxferp, data_in, len(data_in))
        else:
            data_in = b""
        hdr.status = status
        hdr.masked_status = (status >> 1) & 0x7F
        hdr.msg_status = hdr.host_status = 0
        hdr.driver_status = DRIVER_SENSE if status == SAM_STAT_CHECK_CONDITION else 0
        hdr.sb_len_wr = 0
        if sense and hdr.sbp:
            n = min(hdr.mx_sb_len, len(sense))
            ctypes.memmove(hdr.sbp, sense, n)
            hdr.sb_len_wr = n
        hdr.resid = hdr.dxfer_len - len(data_in or data_out)
        hdr.duration = 0
        hdr.info = io_.SG_INFO_CHECK if (hdr.masked_status or hdr.driver_status) else 0
        self._sync()  # START STOP UNIT may have moved the tray
        if isinstance(arg, bytes):
            return bytes(raw) + arg[88:]
        memoryview(arg).cast("B")[:88] = raw
        return 0

    def ioctl(self, f: _OpenFile, request: int, arg: Any) -> Any:
        raise NotImplementedError


class FakeCdrom(_FakeNode):
    """An ``sr`` CD/DVD drive: a tray, an optional medium, a door lock, a use count.

    ``insert`` and ``remove`` are what a person at the drive does; the kernel side (open,
    release, ioctl) follows ``cdrom_open``/``cdrom_release``/``cdrom_ioctl`` and sr with the
    default sysctls (autoclose=1, lock=1, autoeject=0, check_media=0). Media are read-only.
    """

    def __init__(self, medium: bytes | None = None, *, minor: int = 0, lockable: bool = True,
                 capable: bool = True, max_sectors: int = 512) -> None:  # fmt: skip
        super().__init__(_Lun(5, 2048, b"FAKE CD-ROM", medium), minor, capable, max_sectors)
        self.lockable = lockable
        self.keeplocked = False

    # -- the person at the drive -----------------------------------------------------------

    def insert(self, medium: bytes) -> None:
        """Put ``medium`` in (opening the tray if needed) and push the tray in."""
        if self.lun.prevent:
            raise RuntimeError("the door is locked")
        self.lun.medium, self.lun.tray_open, self.lun.changed = medium, False, True
        self._sync()

    def remove(self) -> None:
        """Open the tray and take the medium out (the button works unless locked)."""
        if self.lun.prevent:
            raise RuntimeError("the door is locked")
        self.lun.medium, self.lun.tray_open, self.lun.changed = None, True, True
        self._sync()

    @property
    def tray_open(self) -> bool:
        return self.lun.tray_open

    @property
    def door_locked(self) -> bool:
        return self.lun.prevent

    # -- the kernel ------------------------------------------------------------------------

    def open(self, writable: bool, direct: bool, nonblock: bool) -> int:
        self.use_count += 1
        try:
            if not nonblock:  # open_for_data: autoclose, need a disc, lock the door
                if self.lun.tray_open:
                    self._scsi(bytes([0x1B, 0, 0, 0, 3, 0]))
                if not self.lun.ready:
                    raise _err(errno.ENOMEDIUM)
                if writable:
                    raise _err(errno.EROFS)  # not a rewritable (CDC_RAM) medium
                if self.lockable:
                    self._lock_door(True)
            return self._reopen(writable, direct, nonblock)
        except BaseException:
            self.use_count -= 1
            raise

    def release(self, f: _OpenFile) -> None:
        super().release(f)
        if self.use_count == 0 and self.lockable and not self.keeplocked:
            self._lock_door(False)  # cdrom_release unlocks after the last close

    def _scsi(self, cdb: bytes) -> int:
        status, _sense, _data = self.lun.execute(cdb, b"")
        self._sync()
        return status  # ioctl_internal_command returns the SCSI result: > 0 on failure

    def _lock_door(self, lock: bool) -> int:
        return self._scsi(bytes([0x1E, 0, 0, 0, int(lock), 0]))  # scsi_set_medium_removal

    def ioctl(self, f: _OpenFile, request: int, arg: Any) -> Any:
        # the block layer (blkdev_common_ioctl) answers first
        if request == io_.BLKGETSIZE64:
            return _reply(arg, "Q", self.capacity())
        if request in (io_.BLKSSZGET, io_.BLKPBSZGET):
            return _reply(arg, "i", self.lun.block_size)
        if request == io_.BLKIOOPT:
            return _reply(arg, "I", 0)
        if request == io_.BLKSECTGET:
            return _reply(arg, "H", min(self.max_sectors, 0xFFFF))
        if request == io_.BLKROGET:
            return _reply(arg, "i", 1)  # set_disk_ro: CD-ROM media are not writable
        if request in (io_.BLKDISCARD, io_.BLKZEROOUT):
            raise _err(errno.EBADF if not f.writable else errno.EOPNOTSUPP)
        # sr_block_ioctl
        if request == io_.CDROMEJECT:
            return self._scsi(bytes([0x1B, 0, 0, 0, 2, 0]))
        if request == io_.CDROMCLOSETRAY:
            return self._scsi(bytes([0x1B, 0, 0, 0, 3, 0]))
        if request == io_.CDROM_DRIVE_STATUS:  # sr_drive_status (no changer: any slot)
            if self.lun.tray_open:
                return io_.CDS_TRAY_OPEN
            return io_.CDS_DISC_OK if self.lun.ready else io_.CDS_NO_DISC
        if request == io_.CDROM_MEDIA_CHANGED:  # media_changed(cdi, 1): once per change
            changed, self.lun.changed = self.lun.changed, False
            return int(changed)
        if request == io_.CDROM_LOCKDOOR:  # cdrom_ioctl_lock_door
            if not self.lockable:
                raise _err(errno.EOPNOTSUPP)  # EDRIVE_CANT_DO_THIS
            self.keeplocked = bool(arg)
            if self.use_count != 1 and not arg and not self.capable:
                raise _err(errno.EBUSY)
            return self._lock_door(bool(arg))
        # cdrom_ioctl said ENOSYS: scsi_ioctl
        if request == io_.SG_GET_VERSION_NUM:
            return _reply(arg, "i", SG_VERSION_BLOCK)
        if request == io_.SG_IO:
            return self.sg_io(f, arg, sg_node=False)
        raise _err(errno.EINVAL)


class FakeSg(_FakeNode):
    """An ``sg`` node (character device, major 21) in front of a logical unit: a CD drive
    (``device_type`` 5, with ``medium``) or a disk (0)."""

    mode = stat.S_IFCHR
    major = io_.SCSI_GENERIC_MAJOR
    max_cdb = MAX_CDB_SG

    def __init__(self, medium: bytes | None = None, *, device_type: int = 5, minor: int = 0,
                 capable: bool = True, max_sectors: int = 512, tablesize: int = 128
                 ) -> None:  # fmt: skip
        product = b"FAKE CD-ROM" if device_type == 5 else b"FAKE DISK"
        block = 2048 if device_type == 5 else 512
        super().__init__(_Lun(device_type, block, product, medium), minor, capable,
                         max_sectors)  # fmt: skip
        self.tablesize = tablesize

    def ioctl(self, f: _OpenFile, request: int, arg: Any) -> Any:
        # sg_ioctl_common
        if request == io_.SG_IO:
            return self.sg_io(f, arg, sg_node=True)
        if request == io_.SG_GET_VERSION_NUM:
            return _reply(arg, "i", SG_VERSION_SG)
        if request == io_.SG_GET_SCSI_ID:  # host_no, channel, id, lun, type, cmd/lun, depth
            return _reply(arg, "iiiiihh8x", 0, 0, 0, 0, self.lun.device_type, 1, 1)
        if request == io_.SG_GET_SG_TABLESIZE:
            return _reply(arg, "i", self.tablesize)
        if request == io_.BLKSECTGET:  # max_sectors_bytes, an int
            return _reply(arg, "i", self.max_sectors << 9)
        if not f.writable:
            raise _err(errno.EPERM)  # "don't know so take safe approach"
        raise _err(errno.EINVAL)  # scsi_ioctl: nothing else here


class FakeLinux:
    """An :class:`~blockcore_host_device.ioctl.IoctlLayer` with fake nodes at chosen paths;
    other paths and fds go to ``real``. Records ``(request, result)`` of fake ioctls in
    :attr:`calls`."""

    def __init__(self, real: IoctlLayer | None = None) -> None:
        self.real = real or LinuxIoctl()
        self.nodes: dict[str, _FakeNode] = {}
        self.files: dict[int, _OpenFile] = {}
        self.calls: list[tuple[int, Any]] = []

    def add(self, path: str, node: _FakeNode) -> _FakeNode:
        self.nodes[path] = node
        return node

    def stat(self, path: str) -> os.stat_result:
        node = self.nodes.get(path)
        if node is None:
            return self.real.stat(path)
        return node.stat()

    def open(self, path: str, *, writable: bool, direct: bool = False,
             nonblock: bool = False) -> int:  # fmt: skip
        node = self.nodes.get(path)
        if node is None:
            return self.real.open(path, writable=writable, direct=direct, nonblock=nonblock)
        fd = node.open(writable, direct, nonblock)
        self.files[fd] = _OpenFile(node, writable, nonblock)
        return fd

    def close(self, fd: int) -> None:
        f = self.files.pop(fd, None)
        if f is None:
            self.real.close(fd)
            return
        os.close(fd)
        f.node.release(f)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> Any:
        f = self.files.get(fd)
        if f is None:
            return self.real.ioctl(fd, request, arg)
        try:
            result = f.node.ioctl(f, request, arg)
        except OSError as exc:
            self.calls.append((request, exc.errno))
            raise
        self.calls.append((request, result if isinstance(result, int) else "buffer"))
        return result

    def queue_limit(self, rdev: int, name: str) -> int | None:
        for node in self.nodes.values():
            if node.rdev == rdev:
                return {"max_sectors_kb": node.max_sectors // 2, "discard_max_bytes": 0,
                        "discard_granularity": 0}.get(name)  # fmt: skip
        return self.real.queue_limit(rdev, name)

    def close_all(self) -> None:
        """Close the fds still open and the nodes' memfds (test teardown)."""
        for fd in list(self.files):
            self.close(fd)
        for node in self.nodes.values():
            node.close()

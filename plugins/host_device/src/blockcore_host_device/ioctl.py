"""The seam between the drivers and the kernel: device nodes' stat, open, close and ioctl.

The drivers never call ``os.stat``, ``os.open`` or ``fcntl.ioctl`` on a device themselves; they
ask an :class:`IoctlLayer`. :class:`LinuxIoctl` (the default) is the real thing. Tests that
need hardware this machine lacks (an optical drive, a SCSI generic node) install
:class:`blockcore_host_device.fake.FakeLinux` with :func:`use_layer`; it answers like Linux,
errno values included, and hands everything else to the real layer.

Data I/O does not pass through the seam: it goes to :class:`blockcore.posix.PosixEngine` on
the fd that :meth:`IoctlLayer.open` returned.

Request numbers are Linux x86_64/aarch64 values, checked against the kernel headers with gcc
on this host (docs: the reference notes, section C.2).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
from collections.abc import Iterator
from typing import Any, Protocol

from blockcore import posix

__all__ = [
    "IoctlLayer",
    "LinuxIoctl",
    "SgIoHdr",
    "get_layer",
    "query",
    "range_arg",
    "use_layer",
]

# -- block layer (include/uapi/linux/fs.h) ----------------------------------------------------
BLKROGET = 0x125E  # int: 1 if the device is read-only
BLKSECTGET = 0x1267  # block device: unsigned short, max sectors per request; sg: int bytes
BLKSSZGET = 0x1268  # int: logical block size
BLKDISCARD = 0x1277  # u64[2] {offset, length}
BLKIOMIN = 0x1278  # unsigned int: minimum I/O size
BLKIOOPT = 0x1279  # unsigned int: optimal I/O size (0 = none)
BLKPBSZGET = 0x127B  # unsigned int: physical block size
BLKZEROOUT = 0x127F  # u64[2] {offset, length}
BLKGETSIZE64 = 0x80081272  # u64: size in bytes

# -- CD-ROM (include/uapi/linux/cdrom.h) ------------------------------------------------------
CDROMEJECT = 0x5309
CDROMCLOSETRAY = 0x5319
CDROM_MEDIA_CHANGED = 0x5325  # arg slot; returns 1 once after each change
CDROM_DRIVE_STATUS = 0x5326  # arg slot; returns a CDS_* value
CDROM_LOCKDOOR = 0x5329  # arg 0 / 1
CDSL_CURRENT = 0x7FFFFFFF  # "the current slot" (INT_MAX)
CDS_NO_INFO, CDS_NO_DISC, CDS_TRAY_OPEN, CDS_DRIVE_NOT_READY, CDS_DISC_OK = range(5)

# -- SCSI generic (include/scsi/sg.h) ---------------------------------------------------------
SG_GET_SCSI_ID = 0x2276  # struct sg_scsi_id (32 bytes)
SG_GET_SG_TABLESIZE = 0x227F  # int: max scatter-gather segments
SG_GET_VERSION_NUM = 0x2282  # int
SG_IO = 0x2285  # struct sg_io_hdr (88 bytes)
SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV, SG_DXFER_TO_FROM_DEV = -1, -2, -3, -4
SG_INFO_CHECK = 0x1
SCSI_GENERIC_MAJOR = 21  # /dev/sg*


class SgIoHdr(ctypes.Structure):
    """``struct sg_io_hdr`` (88 bytes on 64-bit Linux): the argument of :data:`SG_IO`.

    Pointers (``dxferp``, ``cmdp``, ``sbp``) are addresses in this process; keep the buffers
    they point to alive until the request returns.
    """

    _fields_ = [
        ("interface_id", ctypes.c_int),
        ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte),
        ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p),
        ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p),
        ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte),
        ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort),
        ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint),
        ("info", ctypes.c_uint),
    ]

    @classmethod
    def request(cls, cdb: bytes, data: ctypes.Array[ctypes.c_char] | None,
                direction: int, sense: ctypes.Array[ctypes.c_char]) -> SgIoHdr:  # fmt: skip
        """A header for ``cdb`` moving ``data`` in ``direction``, sense going to ``sense``.

        The CDB is copied into memory owned by the header, so only ``data`` and ``sense``
        need to outlive the call.
        """
        hdr = cls()
        hdr._cdb = ctypes.create_string_buffer(bytes(cdb), len(cdb))  # keeps it alive
        hdr.interface_id = ord("S")
        hdr.dxfer_direction = direction if data is not None else SG_DXFER_NONE
        hdr.cmd_len = len(cdb)
        hdr.mx_sb_len = len(sense)
        hdr.dxfer_len = len(data) if data is not None else 0
        hdr.dxferp = ctypes.addressof(data) if data is not None else None
        hdr.cmdp = ctypes.addressof(hdr._cdb)
        hdr.sbp = ctypes.addressof(sense)
        hdr.timeout = 30_000
        return hdr


assert ctypes.sizeof(SgIoHdr) == 88, "struct sg_io_hdr layout"


class IoctlLayer(Protocol):
    """What the drivers need from the kernel for a device node. Tier: common (blocking)."""

    def stat(self, path: str) -> os.stat_result:
        """``stat(2)`` of the node (follows symlinks such as /dev/cdrom)."""
        ...

    def open(self, path: str, *, writable: bool, direct: bool = False,
             nonblock: bool = False) -> int:  # fmt: skip
        """Open the node (O_CLOEXEC always; O_DIRECT, O_NONBLOCK when asked); an fd."""
        ...

    def close(self, fd: int) -> None:
        """Close an fd returned by :meth:`open`."""
        ...

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> Any:
        """``ioctl(2)`` with ``fcntl.ioctl``'s conventions: an int ``arg`` returns the call's
        int result; ``bytes`` returns the buffer as the kernel left it; a writable buffer
        is changed in place and the int result returned. Failure raises ``OSError``."""
        ...

    def queue_limit(self, rdev: int, name: str) -> int | None:
        """A number from ``/sys/dev/block/MAJ:MIN/queue/<name>``, or None."""
        ...


class LinuxIoctl:
    """The real layer: the calls go to this kernel."""

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)  # noqa: PTH116 (a device node, by path as the user gave it)

    def open(self, path: str, *, writable: bool, direct: bool = False,
             nonblock: bool = False) -> int:  # fmt: skip
        fd: int = posix.open_fd(path, writable=writable, direct=direct,
                                extra=os.O_NONBLOCK if nonblock else 0)  # fmt: skip
        return fd

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> Any:
        return fcntl.ioctl(fd, request, arg)

    def queue_limit(self, rdev: int, name: str) -> int | None:
        path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/{name}"
        try:
            with open(path, encoding="ascii") as f:  # noqa: PTH123 (sysfs, one short read)
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None


_layer: IoctlLayer = LinuxIoctl()


def get_layer() -> IoctlLayer:
    """The layer nodes opened now will use (they keep it until closed). Tier: common."""
    return _layer


@contextlib.contextmanager
def use_layer(layer: IoctlLayer) -> Iterator[IoctlLayer]:
    """Open nodes through ``layer`` inside the ``with`` block (tests). Tier: GS."""
    global _layer
    old, _layer = _layer, layer
    try:
        yield layer
    finally:
        _layer = old


def query(layer: IoctlLayer, fd: int, request: int, fmt: str) -> int:
    """An ioctl that fills one value of struct format ``fmt`` (``"Q"``, ``"i"``, ``"H"``)."""
    raw = layer.ioctl(fd, request, bytes(struct.calcsize(fmt)))
    return int(struct.unpack(fmt, raw)[0])


def range_arg(offset: int, length: int) -> bytes:
    """The ``uint64_t[2]`` argument of BLKDISCARD and BLKZEROOUT."""
    return struct.pack("=QQ", offset, length)

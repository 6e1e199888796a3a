"""The ``host_cdrom`` protocol driver: CD/DVD drives with removable media (QEMU's
file-posix ``cdrom_*``); everything but the medium handling is host_device's."""

from __future__ import annotations

import errno
import logging
import stat
from typing import Any

from blockcore import hookimpl
from blockcore.create import CREATE_OPTS_SIMPLE, bdrv_co_create_opts_simple
from blockcore.errors import BlockError, NoMediumError
from blockcore.graph import BlockDriverState
from blockcore.types import BdrvRequestFlags, Concurrency, DriverDescriptor, OpenFlags

from . import ioctl as io_
from .host_device import (  # noqa: F401  (hook implementations shared with host_device)
    RUNTIME_OPTS,
    DeviceState,
    bdrv_abort_perm_update,
    bdrv_check_perm,
    bdrv_close,
    bdrv_co_flush_to_disk,
    bdrv_co_get_allocated_file_size,
    bdrv_co_ioctl,
    bdrv_co_truncate,
    bdrv_refresh_limits,
    bdrv_set_perm,
    device_length,
    open_device,
    state,
)

log = logging.getLogger("blockcore_host_device")

# No bdrv_co_pwrite_zeroes / bdrv_co_pdiscard: QEMU's host_cdrom has none (optical media
# do not discard; zero writes go through the core's fallback on writable media).


@hookimpl
def bdrv_describe() -> DriverDescriptor:
    return DriverDescriptor(
        format_name="host_cdrom",
        protocol_name="host_cdrom",
        concurrency=Concurrency.PARALLEL,
        create_opts=CREATE_OPTS_SIMPLE,
        runtime_opts=RUNTIME_OPTS,
        needs_filename=True,
    )


@hookimpl
def bdrv_probe_device(filename: str) -> int:
    """100 for a block device that answers CDROM_DRIVE_STATUS (QEMU's cdrom_probe_device);
    loop devices and disks answer EINVAL there."""
    layer = io_.get_layer()
    try:
        if not stat.S_ISBLK(layer.stat(filename).st_mode):
            return 0
        fd = layer.open(filename, writable=False, nonblock=True)
    except (OSError, ValueError):
        return 0
    try:
        layer.ioctl(fd, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT)
    except OSError:
        return 0
    finally:
        layer.close(fd)
    return 100


@hookimpl
async def bdrv_co_create_opts(filename: str, options: dict[str, Any]) -> None:
    """As host_device's: format the medium in place (QEMU gives both the same fallback)."""
    await bdrv_co_create_opts_simple("host_cdrom", filename, options)


@hookimpl
def bdrv_open(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
    bs.opaque = open_device(bs, options, flags, "host_cdrom")


# -------------------------------------------------------------------------------------------
# The medium
# -------------------------------------------------------------------------------------------


def _drive_status(st: DeviceState) -> int:
    """CDS_* for the current slot; any error means "no information" (a drive that is not a
    CD drive answers EINVAL, one without the capability ENOSYS)."""
    try:
        return int(st.layer.ioctl(st.fd, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT))
    except OSError:
        return io_.CDS_NO_INFO


def _check_medium(st: DeviceState) -> None:
    # QEMU asks is_inserted before every request (blk_check_byte_request); the same
    # TEST UNIT READY, issued where the request meets the drive
    if _drive_status(st) != io_.CDS_DISC_OK:
        raise NoMediumError("no medium in the drive", st.filename)


def _media_changed(st: DeviceState) -> bool:
    """Whether the medium changed since the last question (the kernel clears the flag)."""
    try:
        changed = int(st.layer.ioctl(st.fd, io_.CDROM_MEDIA_CHANGED, io_.CDSL_CURRENT)) > 0
    except OSError:
        return False
    if changed:
        st.media_changes += 1
        log.info("%s: medium changed", st.filename)
    return changed


@hookimpl
async def bdrv_co_is_inserted(bs: BlockDriverState) -> bool:
    st = state(bs)
    _media_changed(st)
    return _drive_status(st) == io_.CDS_DISC_OK


@hookimpl
async def bdrv_co_getlength(bs: BlockDriverState) -> int:
    """The medium's size, read again on every call (the node has variable length); 0 with
    no medium."""
    st = state(bs)
    _media_changed(st)
    return device_length(st)


@hookimpl
async def bdrv_co_preadv(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    st = state(bs)
    _check_medium(st)
    await st.engine.preadv(buf, offset)


@hookimpl
async def bdrv_co_pwritev(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    st = state(bs)
    _check_medium(st)
    await st.engine.pwritev(buf, offset)


def _refused(st: DeviceState, what: str, result: int) -> BlockError:
    # sr sends CDROMEJECT/CDROMCLOSETRAY as START STOP UNIT: a SCSI error comes back as a
    # positive status, not an errno (scsi_ioctl -> ioctl_internal_command)
    return BlockError(errno.EIO, f"the drive refused to {what} (SCSI status {result:#x})",
                      st.filename)  # fmt: skip


@hookimpl
async def bdrv_co_eject(bs: BlockDriverState, eject_flag: bool) -> None:
    """Open the tray (``eject_flag``) or close it. A door this node locked is unlocked
    first: since Linux 5.18 CDROMEJECT on sr no longer does it, and a drive with a locked
    door refuses (QEMU's cdrom_co_eject fails there)."""
    st = state(bs)
    if eject_flag and st.door_locked:
        await bdrv_co_lock_medium(bs, False)
    request, what = (io_.CDROMEJECT, "eject") if eject_flag else (io_.CDROMCLOSETRAY, "load")
    try:
        result = int(st.layer.ioctl(st.fd, request, 0))
    except OSError as exc:
        raise BlockError(exc.errno or errno.EIO, f"cannot {what} the medium: {exc.strerror}",
                         st.filename) from None  # fmt: skip
    if result > 0:
        raise _refused(st, what, result)


@hookimpl
async def bdrv_co_lock_medium(bs: BlockDriverState, locked: bool) -> None:
    """CDROM_LOCKDOOR. Failures are logged, not raised, as in QEMU: a desktop that mounted
    the disc may hold the door, and the guest must not fail for it."""
    st = state(bs)
    try:
        result = int(st.layer.ioctl(st.fd, io_.CDROM_LOCKDOOR, int(locked)))
    except OSError as exc:
        log.warning("%s: CDROM_LOCKDOOR %d failed: %s", st.filename, locked, exc.strerror)
        return
    if result > 0:
        log.warning("%s: CDROM_LOCKDOOR %d refused (SCSI status %#x)", st.filename, locked,
                    result)  # fmt: skip
        return
    st.door_locked = locked

"""The ``host_device`` protocol driver: Linux block devices and SCSI generic nodes (QEMU's
file-posix ``hdev_*``), on :mod:`blockcore.posix`'s engine. ``host_cdrom`` reuses it."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable
from typing import Any

import attrs
from blockcore import hookimpl, posix
from blockcore.create import CREATE_OPTS_SIMPLE, bdrv_co_create_opts_simple
from blockcore.errors import BlockError, NotSupportedError, PermissionConflictError
from blockcore.graph import BlockDriverState
from blockcore.info import bdrv_apply_auto_read_only
from blockcore.types import (
    BDRV_REQUEST_MAX_BYTES,
    BdrvRequestFlags,
    BlockLimits,
    Concurrency,
    DriverDescriptor,
    OpenFlags,
    OptionSpec,
    Perm,
    PreallocMode,
)
from blockcore.util import round_down, round_up

from . import ioctl as io_
from .ioctl import IoctlLayer

F = BdrvRequestFlags

RUNTIME_OPTS = (
    OptionSpec("filename", "string", "path of the device node"),
    OptionSpec("aio", "string", "I/O engine: threads, or native (needs cache.direct=on)",
               "threads"),  # fmt: skip
    OptionSpec("locking", "string", "image locking: auto, on or off", "auto"),
)
#: errnos meaning "this device cannot do that" (QEMU's translate_err maps them to -ENOTSUP)
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY,
                          errno.ENODEV})  # fmt: skip


@attrs.define(eq=False)
class DeviceState:
    """Per-node state of a host_device or host_cdrom node (QEMU's BDRVRawState)."""

    layer: IoctlLayer
    fd: int
    filename: str
    engine: posix.PosixEngine
    lock: posix.ImageLock | None
    is_block: bool
    sg: bool = False
    """A SCSI generic node: no data I/O, requests go as SG_IO ioctls."""
    sg_io: bool = False
    """The device answers SCSI generic ioctls (SCSI disks, CD drives, sg nodes)."""
    cdrom: bool = False
    direct: bool = False
    logical: int = 512
    physical: int = 512
    opt_io: int = 0
    request_alignment: int = 1
    buf_alignment: int = 1
    max_transfer: int = 0
    discard_granularity: int = 0
    has_discard: bool = True
    has_write_zeroes: bool = True
    door_locked: bool = False
    """host_cdrom: this node locked the drive door."""
    media_changes: int = 0
    """host_cdrom: medium changes seen (CDROM_MEDIA_CHANGED)."""


def state(bs: BlockDriverState) -> DeviceState:
    st: DeviceState = bs.opaque
    return st


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking device call (SG_IO, BLKDISCARD, BLKZEROOUT) in the engine's pool."""
    return await posix.run_blocking(fn, *args)


@hookimpl
def bdrv_describe() -> DriverDescriptor:
    return DriverDescriptor(
        format_name="host_device",
        protocol_name="host_device",
        supported_zero_flags=F.MAY_UNMAP | F.NO_FALLBACK,
        concurrency=Concurrency.PARALLEL,
        create_opts=CREATE_OPTS_SIMPLE,
        runtime_opts=RUNTIME_OPTS,
        needs_filename=True,
    )


@hookimpl
def bdrv_probe_device(filename: str) -> int:
    """100 for block devices and SCSI generic nodes; 50 under /dev/cdrom, which
    host_cdrom takes (QEMU's hdev_probe_device)."""
    if filename.startswith("/dev/cdrom"):
        return 50
    try:
        st = io_.get_layer().stat(filename)
    except (OSError, ValueError):
        return 0
    if stat.S_ISBLK(st.st_mode):
        return 100
    if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == io_.SCSI_GENERIC_MAJOR:
        return 100
    return 0


# -------------------------------------------------------------------------------------------
# Open and close (shared with host_cdrom)
# -------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a device"


def _check_node(driver: str, filename: str, mode: int) -> None:
    """Refuse what the driver cannot open, saying which driver to use instead."""
    if stat.S_ISBLK(mode) or (driver == "host_device" and stat.S_ISCHR(mode)):
        return  # character devices: only SCSI generic nodes pass the check after open
    if driver == "host_device" and stat.S_ISREG(mode):
        # QEMU's hdev_open text, as it is: a failed create prints it after its own prefix
        err = BlockError(errno.EINVAL, f"'host_device' driver requires '{filename}' to be "
                         "either a character or block device", filename)  # fmt: skip
        err.hint = "Use driver 'file' for image files."  # type: ignore[attr-defined]
        raise err
    want = "a block device" if driver == "host_cdrom" else "a block device or an sg node"
    hint = {
        "a regular file": "use driver 'file' for image files",
        "a character device": "use driver 'host_device' for SCSI generic nodes",
    }.get(_kind(mode), "give the path of a device node")
    raise BlockError(errno.EINVAL, f"'{driver}' driver requires {filename!r} to be {want}, "
                     f"not {_kind(mode)}: {hint}", filename)  # fmt: skip


def _open_fd(layer: IoctlLayer, filename: str, bs: BlockDriverState, flags: OpenFlags,
             *, nonblock: bool, is_block: bool) -> int:  # fmt: skip
    """Open read-write or read-only as the node asks; fall back to read-only where the node
    allows it (auto-read-only) when the node or the device refuses writing."""
    direct = bool(flags & OpenFlags.NOCACHE)
    if flags & OpenFlags.RDWR:
        try:
            fd = layer.open(filename, writable=True, direct=direct, nonblock=nonblock)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if not flags & OpenFlags.AUTO_RDONLY:
                # QEMU reports EROFS as EACCES ("Permission denied")
                raise BlockError(errno.EACCES, f"could not open read-write: {exc.strerror}",
                                 filename) from None  # fmt: skip
            bdrv_apply_auto_read_only(bs, f"could not open {filename!r} read-write")
        else:
            # open(O_RDWR) of a read-only device succeeds, its writes would fail with EPERM:
            # ask the device (QEMU's raw_open_common)
            try:
                read_only = is_block and io_.query(layer, fd, io_.BLKROGET, "i") != 0
            except OSError:
                read_only = False
            if not read_only:
                return fd
            layer.close(fd)
            if not flags & OpenFlags.AUTO_RDONLY:
                raise BlockError(errno.EACCES, "the device is not writable", filename)
            bdrv_apply_auto_read_only(bs, "the device is not writable")
    return layer.open(filename, writable=False, direct=direct, nonblock=nonblock)


def _is_sg(layer: IoctlLayer, fd: int) -> bool:
    """A SCSI generic node answers SG_GET_VERSION_NUM and SG_GET_SCSI_ID (QEMU's
    hdev_is_sg; callers check it is a character device)."""
    try:
        io_.query(layer, fd, io_.SG_GET_VERSION_NUM, "i")
        layer.ioctl(fd, io_.SG_GET_SCSI_ID, bytes(32))
    except OSError:
        return False
    return True


def _probe_limits(st: DeviceState, rdev: int) -> None:
    """Sector sizes, transfer and discard limits from the device (QEMU's raw_refresh_limits,
    hdev_get_max_hw_transfer)."""
    layer, fd = st.layer, st.fd
    if st.sg:
        try:  # sg: BLKSECTGET answers an int in bytes
            st.max_transfer = io_.query(layer, fd, io_.BLKSECTGET, "i")
        except OSError:
            pass
        return
    for attr, request, fmt in (("logical", io_.BLKSSZGET, "i"),
                               ("physical", io_.BLKPBSZGET, "I"),
                               ("opt_io", io_.BLKIOOPT, "I")):  # fmt: skip
        try:
            setattr(st, attr, io_.query(layer, fd, request, fmt))
        except OSError:
            pass
    st.physical = max(st.physical, st.logical)
    try:  # block device: an unsigned short count of 512-byte sectors
        st.max_transfer = io_.query(layer, fd, io_.BLKSECTGET, "H") * 512
    except OSError:
        kib = layer.queue_limit(rdev, "max_sectors_kb")
        st.max_transfer = (kib or 0) * 1024
    st.discard_granularity = layer.queue_limit(rdev, "discard_granularity") or 0
    if layer.queue_limit(rdev, "discard_max_bytes") == 0:
        st.has_discard = False  # the queue says it cannot discard; skip the ioctl


def open_device(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags,
                driver: str) -> DeviceState:  # fmt: skip
    """Open ``options['filename']`` for ``driver`` and probe what it can do. Tier: GS."""
    direct = bool(flags & OpenFlags.NOCACHE)
    opts = posix.PosixOpenOptions.from_options(driver, options, flags, bs.node_name)
    filename = opts.filename
    layer = io_.get_layer()
    node = layer.stat(filename)
    _check_node(driver, filename, node.st_mode)
    is_block = stat.S_ISBLK(node.st_mode)
    cdrom = driver == "host_cdrom"
    # host_cdrom opens with O_NONBLOCK so that a drive without a disc opens too
    fd = _open_fd(layer, filename, bs, flags, nonblock=cdrom, is_block=is_block)
    try:
        sg = not is_block and _is_sg(layer, fd)
        if not is_block and not sg:
            raise BlockError(errno.EINVAL, f"'{driver}' driver requires {filename!r} to be a "
                             "block device or an sg node, not a character device that is "
                             "not SCSI generic: use driver 'file' for image files",
                             filename)  # fmt: skip
        lock = opts.image_lock(fd)
        st = DeviceState(layer, fd, filename, posix.PosixEngine(fd, filename, direct=direct),
                         lock, is_block, sg=sg, cdrom=cdrom, direct=direct)  # fmt: skip
        try:
            io_.query(layer, fd, io_.SG_GET_VERSION_NUM, "i")
            st.sg_io = True
        except OSError:
            pass
        _probe_limits(st, node.st_rdev)
        if direct and not sg:  # sg nodes move no data through read/write: no alignment
            st.request_alignment, st.buf_alignment = posix.probe_alignment(fd, filename)
    except BaseException:
        layer.close(fd)
        raise
    bs.sg = sg
    bs.filename = filename
    return st


@hookimpl
def bdrv_open(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
    bs.opaque = open_device(bs, options, flags, "host_device")


@hookimpl
def bdrv_close(bs: BlockDriverState) -> None:
    st: DeviceState | None = bs.opaque  # None when bdrv_open failed (the core closes anyway)
    if st is not None and st.fd >= 0:
        st.layer.close(st.fd)  # drops the image locks with the open file description
        st.fd = -1


@hookimpl
def bdrv_refresh_limits(bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
    """Under O_DIRECT the logical block size is the request alignment; otherwise requests
    are byte-aligned and the sector sizes only say what is preferred."""
    st = state(bs)
    align = st.request_alignment
    max_transfer = min(st.max_transfer, BDRV_REQUEST_MAX_BYTES)
    return BlockLimits(
        request_alignment=align,
        max_transfer=round_down(max_transfer, align),
        opt_transfer=0 if st.sg else max(st.physical, st.opt_io),
        pdiscard_alignment=max(st.discard_granularity, st.logical),
        pwrite_zeroes_alignment=st.logical,
        min_mem_alignment=st.buf_alignment,
        opt_mem_alignment=max(st.buf_alignment, mmap.PAGESIZE),
        has_variable_length=st.cdrom,
    )


# -------------------------------------------------------------------------------------------
# Image locking, as for 'file': the two phases of a permission update
# -------------------------------------------------------------------------------------------


def _refuse_formats_on_sg(bs: BlockDriverState) -> None:
    """Only raw may sit on a SCSI generic node: it has no data to hold an image format
    (QEMU's find_image_format gives raw for sg, and raw passes the ioctls through)."""
    for c in bs.parents:
        parent = c.parent
        drv = getattr(parent, "drv", None) if parent.parent_is_bds else None
        if drv is not None and drv.descriptor.is_format and drv.name != "raw":
            raise PermissionConflictError(f"SCSI generic node {bs.filename!r} cannot hold a "
                                          f"{drv.name!r} image: use 'raw' or no format",
                                          bs.filename)  # fmt: skip


@hookimpl
def bdrv_check_perm(bs: BlockDriverState, perm: Perm, shared: Perm) -> None:
    st = state(bs)
    if st.sg:
        _refuse_formats_on_sg(bs)
    if st.lock is not None and not bs.open_flags & OpenFlags.INACTIVE:
        st.lock.prepare(perm, shared)


@hookimpl
def bdrv_set_perm(bs: BlockDriverState, perm: Perm, shared: Perm) -> None:
    st = state(bs)
    if st.lock is not None and not bs.open_flags & OpenFlags.INACTIVE:
        st.lock.commit(perm, shared)


@hookimpl
def bdrv_abort_perm_update(bs: BlockDriverState) -> None:
    st = state(bs)
    if st.lock is not None:
        st.lock.abort()


# -------------------------------------------------------------------------------------------
# I/O
# -------------------------------------------------------------------------------------------


def _no_data(st: DeviceState) -> NotSupportedError:
    return NotSupportedError("SCSI generic node: data moves only by SG_IO requests",
                             st.filename)  # fmt: skip


@hookimpl
async def bdrv_co_preadv(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    st = state(bs)
    if st.sg:
        raise _no_data(st)
    await st.engine.preadv(buf, offset)


@hookimpl
async def bdrv_co_pwritev(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    st = state(bs)
    if st.sg:
        raise _no_data(st)
    await st.engine.pwritev(buf, offset)


def _range_ioctl(st: DeviceState, request: int, offset: int, length: int) -> None:
    st.layer.ioctl(st.fd, request, io_.range_arg(offset, length))


@hookimpl
async def bdrv_co_pwrite_zeroes(
    bs: BlockDriverState, offset: int, length: int, flags: BdrvRequestFlags
) -> None:
    """Punch a hole when unmapping is allowed, else BLKZEROOUT; the device takes whole
    logical blocks only, so partial blocks go back to the core (it writes zero buffers).
    The order follows QEMU's handle_aiocb_write_zeroes_unmap and _block."""
    st = state(bs)
    if st.sg:
        raise _no_data(st)
    if (offset | length) % st.logical:
        raise NotSupportedError(f"zeroing {offset}+{length} needs whole {st.logical}-byte "
                                "blocks", st.filename)  # fmt: skip
    if flags & F.MAY_UNMAP:
        # on a block device the kernel turns this into a zero-out that never falls back to
        # writing zeroes (BLKDEV_ZERO_NOFALLBACK)
        try:
            await st.engine.punch_hole(offset, length)
        except NotSupportedError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBUSY):
                raise
        else:
            return
    if flags & F.NO_FALLBACK:
        # BLKZEROOUT may write zeroes in the kernel, slowly: not a "fast" zero write
        raise NotSupportedError("fast zero writes need MAY_UNMAP on a device", st.filename)
    if not st.has_write_zeroes:
        raise NotSupportedError("the device cannot zero out", st.filename)
    try:
        await blocking(_range_ioctl, st, io_.BLKZEROOUT, offset, length)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        st.has_write_zeroes = False
        raise NotSupportedError(f"BLKZEROOUT: {exc.strerror}", st.filename) from None


@hookimpl
async def bdrv_co_pdiscard(bs: BlockDriverState, offset: int, length: int) -> None:
    """BLKDISCARD on the whole logical blocks of the range (discard is advisory, partial
    blocks are left alone)."""
    st = state(bs)
    if st.sg or not st.has_discard:
        raise NotSupportedError("discard not supported", st.filename)
    start, end = round_up(offset, st.logical), round_down(offset + length, st.logical)
    if end <= start:
        return
    try:
        await blocking(_range_ioctl, st, io_.BLKDISCARD, start, end - start)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        st.has_discard = False  # QEMU's raw_do_pdiscard: stop asking the device
        raise NotSupportedError(f"BLKDISCARD: {exc.strerror}", st.filename) from None


@hookimpl
async def bdrv_co_flush_to_disk(bs: BlockDriverState) -> None:
    await state(bs).engine.flush()


def device_length(st: DeviceState) -> int:
    """Size in bytes: BLKGETSIZE64, else the end of the fd; 0 for sg nodes."""
    if st.sg:
        return 0  # QEMU reports no length for SCSI generic nodes
    try:
        return io_.query(st.layer, st.fd, io_.BLKGETSIZE64, "Q")
    except OSError:
        return int(st.engine.getlength())


@hookimpl
async def bdrv_co_getlength(bs: BlockDriverState) -> int:
    return device_length(state(bs))


@hookimpl
async def bdrv_co_truncate(
    bs: BlockDriverState, offset: int, exact: bool, prealloc: PreallocMode, flags: BdrvRequestFlags
) -> None:
    """Devices keep their size: "resizing" to it, or to less with ``exact`` False, succeeds;
    nothing can be preallocated (QEMU's raw_co_truncate for devices)."""
    st = state(bs)
    if prealloc is not PreallocMode.OFF:
        raise NotSupportedError(f"Preallocation mode '{prealloc.value}' unsupported for this "
                                "non-regular file", st.filename)  # fmt: skip
    # QEMU's texts and order (a failed create prints them as they are)
    size = device_length(st)
    if exact and offset != size:
        raise NotSupportedError("cannot resize device files", st.filename)
    if offset > size:
        raise BlockError(errno.EINVAL, "cannot grow device files", st.filename)


@hookimpl
async def bdrv_co_create_opts(filename: str, options: dict[str, Any]) -> None:
    """Format the existing device: it must be at least ``size`` bytes and keeps its size."""
    await bdrv_co_create_opts_simple("host_device", filename, options)


@hookimpl
async def bdrv_co_get_allocated_file_size(bs: BlockDriverState) -> int:
    return 0  # a device node's inode holds no blocks (qemu-img: "actual-size": 0)


@hookimpl
async def bdrv_co_ioctl(bs: BlockDriverState, req: int, buf: Any) -> int:
    """SG_IO only, to devices that speak SCSI; ``buf`` is a writable ``struct sg_io_hdr``
    (:class:`~blockcore_host_device.ioctl.SgIoHdr`) and is filled in place."""
    st = state(bs)
    if req != io_.SG_IO:
        raise NotSupportedError(f"ioctl {req:#x} not supported (only SG_IO)", st.filename)
    if not st.sg_io:
        raise NotSupportedError("the device does not take SCSI generic requests", st.filename)
    return int(await blocking(st.layer.ioctl, st.fd, req, buf))

"""The ``raw`` format driver: the child's bytes as they are, optionally a window onto them."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from blockcore import hookimpl, info, io, special
from blockcore.drivers import bdrv_find_format, bdrv_list_drivers
from blockcore.errors import BlockError, NoSpaceError, NotSupportedError
from blockcore.graph import bdrv_default_perms, bdrv_open_child
from blockcore.types import (
    BDRV_SECTOR_SIZE,
    BLOCK_PROBE_BUF_SIZE,
    BdrvRequestFlags,
    BlockDriverInfo,
    BlockLimits,
    BlockMeasureInfo,
    BlockStatus,
    BlockStatusFlags,
    ChildRole,
    Concurrency,
    DriverDescriptor,
    OpenFlags,
    OptionSpec,
    Perm,
    PreallocMode,
)
from blockcore.util import parse_size

if TYPE_CHECKING:
    from blockcore.graph import BdrvChild, BlockDriverState

F = BdrvRequestFlags
log = logging.getLogger("blockcore_raw")

RUNTIME_OPTS = (
    OptionSpec("offset", "size", "offset in the child where the image starts", 0),
    OptionSpec("size", "size", "size of the image (a multiple of 512); default: to the end"),
)
CREATE_OPTS = (
    OptionSpec("size", "size", "virtual disk size"),
    OptionSpec("preallocation", "string", "preallocation mode (off, falloc, full)", "off"),
)


@attrs.define(eq=False)
class RawState:
    """Per-node state: the window (QEMU's BDRVRawState of raw-format.c)."""

    offset: int = 0
    size: int | None = None
    """Window size; None: up to the end of the child."""
    probes: list[tuple[str, Callable[[bytes, str | None], int]]] | None = None
    """Every format's probe, when the format was probed (sector-0 write check)."""
    window: bool = False
    """``offset`` or ``size`` given: requests are checked and shifted."""


def _state(bs: BlockDriverState) -> RawState:
    st: RawState = bs.opaque
    return st


@hookimpl
def bdrv_describe() -> DriverDescriptor:
    return DriverDescriptor(
        format_name="raw",
        is_format=True,
        supported_write_flags=F.FUA | F.WRITE_UNCHANGED,
        supported_zero_flags=F.FUA | F.MAY_UNMAP | F.NO_FALLBACK | F.WRITE_UNCHANGED,
        supported_truncate_flags=F.ZERO_WRITE,
        concurrency=Concurrency.PARALLEL,
        create_opts=CREATE_OPTS,
        runtime_opts=RUNTIME_OPTS,
        child_names=("file",),
        has_zero_init=True,
    )


@hookimpl
def bdrv_probe(buf: bytes, filename: str | None) -> int:
    return 1  # the format of last resort


# -------------------------------------------------------------------------------------------
# Open
# -------------------------------------------------------------------------------------------


@hookimpl
def bdrv_open(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
    offset = parse_size(options.pop("offset", 0))
    size = options.pop("size", None)
    size = None if size is None else parse_size(size)
    # without a window raw behaves like a filter (QEMU gives its child the FILTERED role)
    window = bool(offset) or size is not None
    role = ChildRole.PRIMARY | (ChildRole.DATA if window else ChildRole.FILTERED)
    child = bdrv_open_child(bs, options, "file", role)
    assert child is not None
    cbs = child.bs
    name = cbs.filename or cbs.node_name
    if window and cbs.sg:
        raise BlockError(errno.EINVAL, "cannot use offset/size with SCSI generic devices", name)
    real = cbs.total_bytes
    if offset > real:
        raise BlockError(errno.EINVAL, f"offset {offset} is beyond the end of {name!r} "
                         f"({real} bytes)", name)  # fmt: skip
    if size is not None:
        if size % BDRV_SECTOR_SIZE:
            raise BlockError(errno.EINVAL, f"size {size} is not a multiple of "
                             f"{BDRV_SECTOR_SIZE}", name)  # fmt: skip
        if real - offset < size:
            raise BlockError(errno.EINVAL, f"offset {offset} plus size {size} exceeds the "
                             f"{real} bytes of {name!r}", name)  # fmt: skip
    st = RawState(offset, size, window=window)
    if bs.probed_format:
        log.warning(
            "image format was not specified for %r and probing guessed raw; automatically "
            "detecting the format is dangerous for raw images, write operations on block 0 "
            "will be restricted; specify the 'raw' format explicitly to remove the "
            "restrictions", name,
        )  # fmt: skip
        st.probes = _format_probes()
    bs.opaque = st
    bs.sg = cbs.sg
    # flags pass through to the child where it honours them (raw_open)
    bs.supported_write_flags = F.WRITE_UNCHANGED | (F.FUA & cbs.supported_write_flags)
    bs.supported_zero_flags = F.WRITE_UNCHANGED | (
        (F.FUA | F.MAY_UNMAP | F.NO_FALLBACK) & cbs.supported_zero_flags
    )
    bs.supported_truncate_flags = F.ZERO_WRITE & cbs.supported_truncate_flags


def _format_probes() -> list[tuple[str, Callable[[bytes, str | None], int]]]:
    """Every installed format's probe, collected here (GS) for use in the write path."""
    probes = []
    for name, dist in bdrv_list_drivers().items():
        if dist is not None and dist.startswith("failed:"):
            continue
        drv = bdrv_find_format(name)
        if drv.descriptor.is_format and drv.bdrv_probe is not None:  # type: ignore[attr-defined]
            probes.append((name, drv.bdrv_probe))  # type: ignore[attr-defined]
    return sorted(probes, key=lambda p: p[0])


@hookimpl
def bdrv_refresh_limits(bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
    if _state(bs).probes is not None:
        # a probed image's first sector is checked as a whole: no partial-sector writes
        align = max(BDRV_SECTOR_SIZE, limits.request_alignment)
        mt = limits.max_transfer - limits.max_transfer % align
        return attrs.evolve(limits, request_alignment=align, max_transfer=mt)
    return limits


@hookimpl
def bdrv_child_perm(bs: BlockDriverState, child: BdrvChild | None, role: ChildRole, perm: Perm,
                    shared: Perm) -> tuple[Perm, Perm]:  # fmt: skip
    nperm, nshared = bdrv_default_perms(bs, child, role, perm, shared)
    # the default policy for data children adds write and resize; take them only when a
    # parent does (raw_child_perm)
    return nperm & (perm | ~(Perm.WRITE | Perm.RESIZE)), nshared


@hookimpl
def bdrv_has_zero_init(bs: BlockDriverState) -> bool:
    return bool(bs.file) and info.bdrv_has_zero_init(bs.file.bs)  # type: ignore[union-attr]


# -------------------------------------------------------------------------------------------
# I/O
# -------------------------------------------------------------------------------------------


def _adjust(bs: BlockDriverState, offset: int, length: int, write: bool) -> int:
    """Map a request into the window, refusing what leaves it (raw_adjust_offset)."""
    st = _state(bs)
    if st.size is not None and (offset > st.size or length > st.size - offset):
        what = f"{'write' if write else 'read'} of {length} bytes at {offset}"
        msg = f"{what} leaves the window of {st.size} bytes"
        if write:
            raise NoSpaceError(msg, bs.filename or bs.node_name)
        raise BlockError(errno.EINVAL, msg, bs.filename or bs.node_name)
    return offset + st.offset


@hookimpl
async def bdrv_co_preadv(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    if bs.opaque.window:
        offset = _adjust(bs, offset, length, False)
    if flags:  # (IntFlag arithmetic costs ~1 us: skip it for the usual flags=0)
        flags &= ~F.COPY_ON_READ  # it stays here: the file below has no backing to copy from
    child = bs.file
    if _wants_events(child):
        await io.bdrv_co_debug_event(child.bs, "read_aio")  # type: ignore[union-attr]
    await io.bdrv_co_preadv(child, offset, length, buf, flags)  # type: ignore[arg-type]


def _wants_events(child: BdrvChild | None) -> bool:
    """Whether the child's driver takes debug events (blkdebug): QEMU's raw sends read_aio
    and write_aio; asking first keeps the common path free of the extra coroutine."""
    drv = child.bs.drv if child is not None else None
    return drv is not None and drv.bdrv_co_debug_event is not None  # type: ignore[attr-defined]


async def _check_probed_write(bs: BlockDriverState, offset: int, buf: memoryview) -> None:
    """Refuse to write a header of another format into a probed raw image (raw_check_write),
    so that the next probe cannot take the guest's data for, say, a qcow2 header."""
    head = bytearray(min(BLOCK_PROBE_BUF_SIZE, bs.total_bytes, max(offset + len(buf), 512)))
    if offset > 0 or len(buf) < len(head):
        await io.bdrv_co_preadv(bs.file, 0, len(head), memoryview(head))  # type: ignore[arg-type]
    n = min(len(buf), len(head) - offset)
    head[offset : offset + n] = buf[:n]
    best, best_score = "raw", 0
    for name, probe in _state(bs).probes or ():
        score = probe(bytes(head), None)
        if score > best_score:
            best, best_score = name, score
    if best != "raw":
        raise BlockError(errno.EPERM, f"refusing to write a {best!r} header into the first "
                         "sector of an image whose format was probed as raw; open it with "
                         "driver 'raw' to allow it", bs.filename or bs.node_name)  # fmt: skip


@hookimpl
async def bdrv_co_pwritev(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    st = bs.opaque
    if st.probes is not None and offset < BLOCK_PROBE_BUF_SIZE:
        await _check_probed_write(bs, offset, buf)
    if st.window:
        offset = _adjust(bs, offset, length, True)
    child = bs.file
    if _wants_events(child):
        await io.bdrv_co_debug_event(child.bs, "write_aio")  # type: ignore[union-attr]
    await io.bdrv_co_pwritev(child, offset, length, buf, flags)  # type: ignore[arg-type]


@hookimpl
async def bdrv_co_pwrite_zeroes(
    bs: BlockDriverState, offset: int, length: int, flags: BdrvRequestFlags
) -> None:
    offset = _adjust(bs, offset, length, True)
    await io.bdrv_co_pwrite_zeroes(bs.file, offset, length, flags)  # type: ignore[arg-type]


@hookimpl
async def bdrv_co_pdiscard(bs: BlockDriverState, offset: int, length: int) -> None:
    offset = _adjust(bs, offset, length, True)
    await io.bdrv_co_pdiscard(bs.file, offset, length)  # type: ignore[arg-type]


@hookimpl
async def bdrv_co_block_status(
    bs: BlockDriverState, want_zero: bool, offset: int, length: int
) -> BlockStatus:
    assert bs.file is not None
    return BlockStatus(BlockStatusFlags.RAW | BlockStatusFlags.OFFSET_VALID, length,
                       offset + _state(bs).offset, bs.file.bs)  # fmt: skip


@hookimpl
async def bdrv_co_truncate(
    bs: BlockDriverState, offset: int, exact: bool, prealloc: PreallocMode, flags: BdrvRequestFlags
) -> None:
    st = _state(bs)
    if st.size is not None:
        raise NotSupportedError(f"cannot resize a raw image with a fixed size ({st.size} "
                                "bytes, option 'size')", bs.filename or bs.node_name)  # fmt: skip
    child: BdrvChild = bs.file  # type: ignore[assignment]
    await io.bdrv_co_truncate(child, offset + st.offset, exact, prealloc, flags)


@hookimpl
async def bdrv_co_getlength(bs: BlockDriverState) -> int:
    assert bs.file is not None
    st = _state(bs)
    real = await io.bdrv_co_getlength(bs.file.bs)
    available = max(0, real - st.offset)
    return available if st.size is None else min(st.size, available)


@hookimpl
def bdrv_measure(options: dict[str, Any], in_bs: BlockDriverState | None) -> BlockMeasureInfo:
    """A raw image needs exactly its virtual size, rounded up to a sector (QEMU's
    raw_measure)."""
    if in_bs is not None:
        size = io.bdrv_getlength(in_bs)
    else:
        size = parse_size(options.get("size") or 0)
    required = -(-size // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE
    return BlockMeasureInfo(required=required, fully_allocated=required)


# Removable media and ioctls belong to the device below (QEMU's raw_eject, raw_lock_medium,
# raw_co_ioctl): pass them to the file child.


@hookimpl
async def bdrv_co_eject(bs: BlockDriverState, eject_flag: bool) -> None:
    assert bs.file is not None
    await special.bdrv_co_eject(bs.file.bs, eject_flag)


@hookimpl
async def bdrv_co_lock_medium(bs: BlockDriverState, locked: bool) -> None:
    assert bs.file is not None
    await special.bdrv_co_lock_medium(bs.file.bs, locked)


@hookimpl
async def bdrv_co_ioctl(bs: BlockDriverState, req: int, buf: Any) -> int:
    assert bs.file is not None
    st = _state(bs)
    if st.offset or st.size is not None:
        raise NotSupportedError("ioctl not supported on a raw window", bs.filename)
    return await special.bdrv_co_ioctl(bs.file.bs, req, buf)


@hookimpl
async def bdrv_co_get_info(bs: BlockDriverState) -> BlockDriverInfo:
    assert bs.file is not None
    try:
        return await info.bdrv_co_get_info(bs.file.bs)
    except NotSupportedError:
        return BlockDriverInfo()


@hookimpl
async def bdrv_co_copy_range_from(
    bs: BlockDriverState, src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int,
    length: int, read_flags: BdrvRequestFlags, write_flags: BdrvRequestFlags,
) -> None:  # fmt: skip
    src_offset = _adjust(bs, src_offset, length, False)
    child: BdrvChild = bs.file  # type: ignore[assignment]
    await special.bdrv_co_copy_range_from(child, src_offset, dst, dst_offset, length,
                                          read_flags, write_flags)  # fmt: skip


@hookimpl
async def bdrv_co_copy_range_to(
    bs: BlockDriverState, src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int,
    length: int, read_flags: BdrvRequestFlags, write_flags: BdrvRequestFlags,
) -> None:  # fmt: skip
    dst_offset = _adjust(bs, dst_offset, length, True)
    child: BdrvChild = bs.file  # type: ignore[assignment]
    await special.bdrv_co_copy_range_to(src, src_offset, child, dst_offset, length,
                                        read_flags, write_flags)  # fmt: skip


@hookimpl
async def bdrv_co_create_opts(filename: str, options: dict[str, Any]) -> None:
    # raw has no metadata: creating it is creating the protocol's storage, whichever protocol
    # the filename names (raw_co_create_opts): a file, or a device formatted in place
    await special.bdrv_co_create_file(filename, options)

"""The ``file`` protocol driver: POSIX regular files (QEMU's file-posix for files)."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from typing import TYPE_CHECKING, Any

import attrs

from blockcore import hookimpl, posix, special
from blockcore.create import create_size_and_prealloc
from blockcore.errors import BlockError, NotSupportedError
from blockcore.info import bdrv_apply_auto_read_only
from blockcore.types import (
    BdrvRequestFlags,
    BlockDriverInfo,
    BlockLimits,
    BlockStatus,
    BlockStatusFlags,
    Concurrency,
    DriverDescriptor,
    OpenFlags,
    OptionSpec,
    Perm,
    PreallocMode,
)
from blockcore.util import parse_bool, round_down, round_up

if TYPE_CHECKING:
    from blockcore.graph import BdrvChild, BlockDriverState

F = BdrvRequestFlags
S = BlockStatusFlags

_PREALLOC_HELP = "preallocation mode (off, falloc, full)"
CREATE_OPTS = (
    OptionSpec("size", "size", "virtual disk size"),
    OptionSpec("preallocation", "string", _PREALLOC_HELP, "off"),
    OptionSpec("nocow", "bool", "turn off copy-on-write (btrfs)", False),
    OptionSpec("extent_size_hint", "size", "extent size hint (XFS), 0 to disable", 1 << 20),
)
RUNTIME_OPTS = (
    OptionSpec("filename", "string", "file name of the image"),
    OptionSpec("aio", "string", "I/O engine: threads or native (O_DIRECT only)", "threads"),
    OptionSpec("aio-max-batch", "number", "accepted for compatibility; requests never batch", 0),
    OptionSpec("locking", "string", "image locking: auto, on or off", "auto"),
)
_FULL_CHUNK = 1 << 20  # zero buffer for preallocation=full


@attrs.define(eq=False)
class FileState:
    """Per-node state of a ``file`` node (QEMU's BDRVRawState)."""

    fd: int
    filename: str
    engine: posix.PosixEngine
    lock: posix.ImageLock | None
    request_alignment: int = 1
    buf_alignment: int = 1
    # capabilities learnt from the filesystem: off after the first "not supported"
    has_zero_range: bool = True
    has_discard: bool = True
    has_fallocate: bool = True


def _state(bs: BlockDriverState) -> FileState:
    st: FileState = bs.opaque
    return st


@hookimpl
def bdrv_describe() -> DriverDescriptor:
    return DriverDescriptor(
        format_name="file",
        protocol_name="file",
        supported_zero_flags=F.MAY_UNMAP | F.NO_FALLBACK,
        concurrency=Concurrency.PARALLEL,
        create_opts=CREATE_OPTS,
        runtime_opts=RUNTIME_OPTS,
        needs_filename=True,
        has_zero_init=True,
    )


# -------------------------------------------------------------------------------------------
# Open and close
# -------------------------------------------------------------------------------------------


def _open(filename: str, flags: OpenFlags, bs: BlockDriverState) -> int:
    """Open read-write or read-only as asked; auto-read-only falls back to read-only."""
    direct = bool(flags & OpenFlags.NOCACHE)
    if not flags & OpenFlags.RDWR:
        return posix.open_fd(filename, writable=False, direct=direct)
    try:
        return posix.open_fd(filename, writable=True, direct=direct)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        if not flags & OpenFlags.AUTO_RDONLY:
            raise
        bdrv_apply_auto_read_only(bs, f"could not open {filename!r} read-write")
        return posix.open_fd(filename, writable=False, direct=direct)


@hookimpl
def bdrv_open(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
    opts = posix.PosixOpenOptions.from_options("file", options, flags, bs.node_name)
    filename = opts.filename
    fd = _open(filename, flags, bs)
    try:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(st_mode):
            raise BlockError(errno.EISDIR, "is a directory, not an image file", filename)
        if not stat.S_ISREG(st_mode):
            raise BlockError(errno.EINVAL, f"'file' driver requires {filename!r} to be a "
                             "regular file (use 'host_device' for devices)", filename)  # fmt: skip
        direct = bool(flags & OpenFlags.NOCACHE)
        lock = opts.image_lock(fd)
        st = FileState(fd, filename, posix.PosixEngine(fd, filename, direct=direct), lock)
        if direct:
            st.request_alignment, st.buf_alignment = posix.probe_alignment(fd, filename)
    except BaseException:
        os.close(fd)
        raise
    bs.opaque = st
    bs.filename = filename


@hookimpl
def bdrv_close(bs: BlockDriverState) -> None:
    st: FileState | None = bs.opaque  # None when bdrv_open failed
    if st is not None and st.fd >= 0:
        os.close(st.fd)  # drops the image locks with the open file description
        st.fd = -1


@hookimpl
def bdrv_refresh_limits(bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
    st = _state(bs)
    return attrs.evolve(
        limits,
        request_alignment=st.request_alignment,
        max_transfer=round_down(limits.max_transfer, st.request_alignment),
        min_mem_alignment=st.buf_alignment,
        opt_mem_alignment=max(st.buf_alignment, mmap.PAGESIZE),
    )


@attrs.define(eq=False)
class ReopenState:
    """A prepared reopen: the new descriptor (or None when the old one stays) and the old
    lock, to move the locks back on abort."""

    fd: int | None = None
    engine: posix.PosixEngine | None = None
    alignment: tuple[int, int] = (1, 1)
    old_lock: posix.ImageLock | None = None


@hookimpl
def bdrv_reopen_prepare(bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> Any:
    """A new access mode or O_DIRECT needs a new descriptor (raw_reopen_prepare). The locks
    move to it at once, so permission checks during the reopen see no second holder."""
    st = _state(bs)
    for key, current in (("filename", st.filename), ("locking", None), ("aio", None)):
        value = options.pop(key, current)
        if key == "filename" and value != current:
            raise BlockError(errno.EINVAL, f"cannot change 'filename' to {value!r} on reopen",
                             st.filename)  # fmt: skip
    options.pop("aio-max-batch", None)
    mask = OpenFlags.RDWR | OpenFlags.NOCACHE
    if (flags & mask) == (bs.open_flags & mask):
        return ReopenState()
    direct = bool(flags & OpenFlags.NOCACHE)
    fd = posix.open_fd(st.filename, writable=bool(flags & OpenFlags.RDWR), direct=direct)
    try:
        alignment = posix.probe_alignment(fd, st.filename) if direct else (1, 1)
        state = ReopenState(fd, posix.PosixEngine(fd, st.filename, direct=direct), alignment)
        if st.lock is not None:
            state.old_lock, st.lock = st.lock, st.lock.transfer(fd)
    except BaseException:
        os.close(fd)
        raise
    return state


@hookimpl
def bdrv_reopen_commit(bs: BlockDriverState, state: Any) -> None:
    st = _state(bs)
    if state.fd is not None:
        os.close(st.fd)
        st.fd, st.engine = state.fd, state.engine
        st.request_alignment, st.buf_alignment = state.alignment


@hookimpl
def bdrv_reopen_abort(bs: BlockDriverState, state: Any) -> None:
    st = _state(bs)
    if state.fd is not None:
        if state.old_lock is not None and st.lock is not None:
            st.lock = st.lock.transfer(st.fd)
        os.close(state.fd)


# -------------------------------------------------------------------------------------------
# Image locking: the two phases of a permission update
# -------------------------------------------------------------------------------------------


@hookimpl
def bdrv_check_perm(bs: BlockDriverState, perm: Perm, shared: Perm) -> None:
    st = _state(bs)
    if st.lock is not None and not bs.open_flags & OpenFlags.INACTIVE:
        st.lock.prepare(perm, shared)


@hookimpl
def bdrv_set_perm(bs: BlockDriverState, perm: Perm, shared: Perm) -> None:
    st = _state(bs)
    if st.lock is not None and not bs.open_flags & OpenFlags.INACTIVE:
        st.lock.commit(perm, shared)


@hookimpl
def bdrv_abort_perm_update(bs: BlockDriverState) -> None:
    st = _state(bs)
    if st.lock is not None:
        st.lock.abort()


# -------------------------------------------------------------------------------------------
# I/O
# -------------------------------------------------------------------------------------------


@hookimpl
async def bdrv_co_preadv(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    engine = bs.opaque.engine
    done = engine.read_now(buf, offset)
    if done != length:
        await engine.preadv(buf[done:], offset + done)


@hookimpl
async def bdrv_co_pwritev(
    bs: BlockDriverState, offset: int, length: int, buf: memoryview, flags: BdrvRequestFlags
) -> None:
    await bs.opaque.engine.pwritev(buf, offset)


@hookimpl
async def bdrv_co_pwrite_zeroes(
    bs: BlockDriverState, offset: int, length: int, flags: BdrvRequestFlags
) -> None:
    """fallocate only, never zero buffers (so NO_FALLBACK always holds); the order of
    attempts follows QEMU's handle_aiocb_write_zeroes{,_unmap}."""
    st = _state(bs)
    eng = st.engine
    size = eng.getlength()
    end = offset + length
    if flags & F.MAY_UNMAP and st.has_discard and end <= size:
        try:
            await eng.punch_hole(offset, length)  # zeros and frees the blocks at once
            return
        except NotSupportedError:
            st.has_discard = False
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBUSY):
                raise
    if st.has_zero_range:
        try:
            await eng.zero_range(offset, length)  # without KEEP_SIZE: grows the file
            return
        except NotSupportedError:
            st.has_zero_range = False
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    if st.has_fallocate and (offset >= size or st.has_discard):
        try:
            if offset < size:  # punch, then allocate again so the range stays allocated
                await eng.punch_hole(offset, min(end, size) - offset)
            await eng.allocate(offset, length)  # past EOF this grows the file with zeros
            return
        except NotSupportedError:
            st.has_fallocate = False  # a failed punch leaves the data: fall back below
    raise NotSupportedError("no fallocate mode to write zeroes", st.filename)


@hookimpl
async def bdrv_co_pdiscard(bs: BlockDriverState, offset: int, length: int) -> None:
    st = _state(bs)
    if not st.has_discard:
        raise NotSupportedError("discard not supported", st.filename)
    try:
        await st.engine.punch_hole(offset, length)
    except NotSupportedError:
        st.has_discard = False
        raise


@hookimpl
async def bdrv_co_flush_to_disk(bs: BlockDriverState) -> None:
    await bs.opaque.engine.flush()


@hookimpl
async def bdrv_co_block_status(
    bs: BlockDriverState, want_zero: bool, offset: int, length: int
) -> BlockStatus:
    """Data or hole from SEEK_DATA/SEEK_HOLE (QEMU's raw_co_block_status); holes read as
    zeros. Extents ending inside an alignment unit (EOF) round to DATA, which is safe."""
    if not want_zero:
        return BlockStatus(S.DATA | S.OFFSET_VALID, length, offset, bs)
    st = _state(bs)
    align = st.request_alignment
    size = st.engine.getlength()
    if offset >= size:  # the tail of the last 512-byte sector: reads as zeros
        return BlockStatus(S.ZERO | S.OFFSET_VALID, length, offset, bs)
    is_data, end = posix.seek_extent(st.fd, offset)
    pnum = end - offset
    if is_data:
        return BlockStatus(S.DATA | S.OFFSET_VALID, round_up(pnum, align), offset, bs)
    if end >= size:
        pnum = round_up(pnum, align)  # a hole to EOF covers the zero tail too
    elif pnum >= align:
        pnum = round_down(pnum, align)
    else:
        return BlockStatus(S.DATA | S.OFFSET_VALID, align, offset, bs)
    return BlockStatus(S.ZERO | S.OFFSET_VALID, pnum, offset, bs)


async def _regular_truncate(st: FileState, offset: int, prealloc: PreallocMode) -> None:
    """Resize, preallocating the new tail as asked (QEMU's raw_regular_truncate)."""
    if prealloc not in (PreallocMode.OFF, PreallocMode.FALLOC, PreallocMode.FULL):
        raise NotSupportedError(f"unsupported preallocation mode: {prealloc.value}",
                                st.filename)  # fmt: skip
    eng = st.engine
    current = eng.getlength()
    if offset < current and prealloc is not PreallocMode.OFF:
        raise NotSupportedError("cannot use preallocation for shrinking files", st.filename)
    if prealloc is PreallocMode.OFF or offset <= current:
        await eng.truncate(offset)
    elif prealloc is PreallocMode.FALLOC:
        try:
            await eng.allocate(current, offset - current)
        except NotSupportedError:
            raise NotSupportedError("preallocation mode 'falloc' not supported by the "
                                    "filesystem", st.filename) from None  # fmt: skip
    else:  # full: write zeros, then make them durable
        await eng.truncate(offset)
        zeros = memoryview(bytes(min(_FULL_CHUNK, offset - current)))
        pos = current
        try:
            while pos < offset:
                n = min(len(zeros), offset - pos)
                await eng.pwritev(zeros[:n], pos)
                pos += n
            await eng.flush()
        except BaseException:
            await eng.truncate(current)  # no half-preallocated file on failure
            raise


@hookimpl
async def bdrv_co_truncate(
    bs: BlockDriverState, offset: int, exact: bool, prealloc: PreallocMode, flags: BdrvRequestFlags
) -> None:
    # a regular file always takes the exact size, as in QEMU (``exact`` matters for devices)
    await _regular_truncate(_state(bs), offset, prealloc)


@hookimpl
async def bdrv_co_getlength(bs: BlockDriverState) -> int:
    return bs.opaque.engine.getlength()


@hookimpl
async def bdrv_co_get_allocated_file_size(bs: BlockDriverState) -> int:
    return posix.allocated_size(_state(bs).fd)


@hookimpl
async def bdrv_co_get_info(bs: BlockDriverState) -> BlockDriverInfo:
    return BlockDriverInfo()


# -------------------------------------------------------------------------------------------
# Offloaded copy (copy_file_range between two nodes with a POSIX engine)
# -------------------------------------------------------------------------------------------


@hookimpl
async def bdrv_co_copy_range_from(
    bs: BlockDriverState, src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int,
    length: int, read_flags: BdrvRequestFlags, write_flags: BdrvRequestFlags,
) -> None:  # fmt: skip
    # the source is a leaf: let the destination side finish the copy
    await special.bdrv_co_copy_range_to(src, src_offset, dst, dst_offset, length, read_flags,
                                        write_flags)  # fmt: skip


@hookimpl
async def bdrv_co_copy_range_to(
    bs: BlockDriverState, src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int,
    length: int, read_flags: BdrvRequestFlags, write_flags: BdrvRequestFlags,
) -> None:  # fmt: skip
    src_engine = getattr(src.bs.opaque, "engine", None)
    if not isinstance(src_engine, posix.PosixEngine):
        raise NotSupportedError("copy offload needs a POSIX source node", src.bs.node_name)
    await src_engine.copy_range(_state(bs).engine, src_offset, dst_offset, length)


# -------------------------------------------------------------------------------------------
# Create and delete
# -------------------------------------------------------------------------------------------


@hookimpl
async def bdrv_co_create_opts(filename: str, options: dict[str, Any]) -> None:
    """Create (or empty) ``filename`` with size and preallocation, holding QEMU's create
    locks (write and resize, resize unshared) meanwhile."""
    filename = filename.removeprefix("file:")
    size, prealloc = create_size_and_prealloc(options)
    nocow = parse_bool(options.get("nocow", False), "nocow")
    fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BlockError(errno.EINVAL, "not a regular file", filename)
        lock = posix.ImageLock(fd, filename) if posix.ofd_locks_available() else None
        if lock is not None:
            lock.prepare(Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.RESIZE)
            lock.commit(Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.RESIZE)
        if nocow:
            _set_nocow(fd)
        st = FileState(fd, filename, posix.PosixEngine(fd, filename), lock)
        await st.engine.truncate(0)  # clear the file, then grow it as asked
        await _regular_truncate(st, size, prealloc)
    finally:
        os.close(fd)


def _set_nocow(fd: int) -> None:
    """chattr +C (FS_NOCOW_FL); filesystems without it ignore the request, as in QEMU."""
    import fcntl
    import struct

    fs_ioc_getflags, fs_ioc_setflags, fs_nocow_fl = 0x80086601, 0x40086602, 0x00800000
    try:
        (attr,) = struct.unpack("l", fcntl.ioctl(fd, fs_ioc_getflags, bytes(8)))
        fcntl.ioctl(fd, fs_ioc_setflags, struct.pack("l", attr | fs_nocow_fl))
    except OSError:
        pass


@hookimpl
async def bdrv_co_delete_file(bs: BlockDriverState) -> None:
    st = _state(bs)
    if not stat.S_ISREG(os.fstat(st.fd).st_mode):
        raise BlockError(errno.EPERM, "refusing to delete a non-regular file", st.filename)
    os.unlink(st.filename)

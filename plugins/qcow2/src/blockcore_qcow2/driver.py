"""The qcow2 driver hooks: adapt the node graph to the engine in :mod:`.image`."""

from __future__ import annotations

import errno
import math
import os
import sys
from collections.abc import Coroutine
from typing import Any

import attrs

from blockcore import backend, graph, hookimpl, io, special, status
from blockcore.aio import run_co
from blockcore.cliutil import warn_report
from blockcore.errors import BlockError, NotSupportedError, error_prepend
from blockcore.types import (
    BdrvCheckMode,
    BdrvCheckResult,
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
    PreallocMode,
)
from blockcore.util import parse_bool, parse_size

from . import bitmap, compress, reopen, snaptable
from .check import check_image
from .cluster import SubclusterType as ST
from .format import QCOW_MAGIC, Autoclear, Compat, Incompat, empty_image, prealloc_size
from .image import Qcow2Image, read_header
from .options import RUNTIME_OPTS, join_options, parse_runtime_options, pop_runtime_options

F = BdrvRequestFlags
S = BlockStatusFlags


class ChildFile:
    """:class:`.cache.ImageFile` over a child edge, through :mod:`blockcore.io`."""

    def __init__(self, child: Any, name: str) -> None:
        self.child = child
        self.name = name

    def pread(self, offset: int, buf: memoryview) -> Coroutine[Any, Any, None]:
        return io.bdrv_co_preadv(self.child, offset, len(buf), buf)  # no extra frame

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview
               ) -> Coroutine[Any, Any, None]:  # fmt: skip
        view = memoryview(data)
        return io.bdrv_co_pwritev(self.child, offset, view.nbytes, view)

    async def pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False
                            ) -> None:  # fmt: skip
        flags = F.NO_FALLBACK if no_fallback else F.NONE
        await io.bdrv_co_pwrite_zeroes(self.child, offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await io.bdrv_co_pdiscard(self.child, offset, length)

    async def flush(self) -> None:
        await io.bdrv_co_flush(self.child.bs)

    async def getlength(self) -> int:
        return await io.bdrv_co_getlength(self.child.bs)

    async def truncate(self, length: int, prealloc: str = "off") -> None:
        await io.bdrv_co_truncate(self.child, length, False, PreallocMode(prealloc), F.NONE)

    async def event(self, name: str) -> None:
        await io.bdrv_co_debug_event(self.child.bs, name)

    @property
    def wants_events(self) -> bool:
        drv = self.child.bs.drv
        return drv is not None and drv.bdrv_co_debug_event is not None

    @property
    def fast_zeroes(self) -> bool:
        return bool(self.child.bs.supported_zero_flags & F.NO_FALLBACK)


class BackendFile:
    """:class:`.cache.ImageFile` over a BlockBackend, for writing a new image in create.

    The backend refuses writes past the end (QEMU's qcow2_co_create sets
    ``allow_write_beyond_eof`` instead), so a write that extends the file grows it first.
    """

    def __init__(self, blk: Any, name: str) -> None:
        self.blk = blk
        self.name = name

    async def _grow(self, end: int) -> None:
        if end > self.blk.getlength():
            await self.blk.co_truncate(end, False)

    async def pread(self, offset: int, buf: memoryview) -> None:
        n = max(0, min(len(buf), self.blk.getlength() - offset))
        if n:
            await self.blk.co_preadv(offset, n, buf[:n])
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        await self._grow(offset + view.nbytes)
        await self.blk.co_pwritev(offset, view.nbytes, view)

    async def pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False
                            ) -> None:  # fmt: skip
        await self._grow(offset + length)
        await self.blk.co_pwrite_zeroes(offset, length, F.NO_FALLBACK if no_fallback else F.NONE)

    async def discard(self, offset: int, length: int) -> None:
        await self.blk.co_pdiscard(offset, length)

    async def flush(self) -> None:
        await self.blk.co_flush()

    async def getlength(self) -> int:
        return int(self.blk.getlength())

    async def truncate(self, length: int, prealloc: str = "off") -> None:
        await self.blk.co_truncate(length, False, PreallocMode(prealloc))

    async def event(self, name: str) -> None:
        pass

    wants_events = False
    fast_zeroes = False  # qemu-img create writes no guest data


@attrs.define(eq=False)
class Qcow2State:
    """Per-node state: the engine and the adapters it uses."""

    image: Qcow2Image
    file: ChildFile
    data: ChildFile | None


# -------------------------------------------------------------------------------------------
# Options
# -------------------------------------------------------------------------------------------

CREATE_OPTS = (
    OptionSpec("size", "size", "virtual disk size"),
    OptionSpec("compat", "string", "compatibility level (v2, v3, 0.10, 1.1)", "1.1"),
    OptionSpec("backing_file", "string", "file name of a base image"),
    OptionSpec("backing_fmt", "string", "image format of the base image"),
    OptionSpec("data_file", "string", "file name of an external data file"),
    OptionSpec("data_file_raw", "bool", "the external data file is a valid raw image", False),
    OptionSpec("cluster_size", "size", "qcow2 cluster size", 65536),
    OptionSpec("preallocation", "string", "off, metadata, falloc or full", "off"),
    OptionSpec("lazy_refcounts", "bool", "postpone refcount updates", False),
    OptionSpec("refcount_bits", "number", "width of a reference count entry in bits", 16),
    OptionSpec("extended_l2", "bool", "extended L2 tables (32 subclusters)", False),
    OptionSpec("compression_type", "string", "zlib or zstd", "zlib"),
)
# -------------------------------------------------------------------------------------------
# GS hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def bdrv_describe() -> DriverDescriptor:
    return DriverDescriptor(
        format_name="qcow2", is_format=True, supports_backing=True,
        supported_zero_flags=F.MAY_UNMAP | F.NO_FALLBACK,
        concurrency=Concurrency.PARALLEL,  # the engine's asyncio.Lock guards metadata
        create_opts=CREATE_OPTS, runtime_opts=RUNTIME_OPTS,
        child_names=("file", "data-file"), has_zero_init=True,
    )  # fmt: skip


@hookimpl
def bdrv_probe(buf: bytes, filename: str | None) -> int:
    if len(buf) >= 8 and int.from_bytes(buf[:4], "big") == QCOW_MAGIC \
            and int.from_bytes(buf[4:8], "big") >= 2:  # fmt: skip
        return 100
    return 0


@hookimpl
def bdrv_open(bs: Any, options: dict[str, Any], flags: OpenFlags) -> None:
    opt = pop_runtime_options(options)
    graph.bdrv_open_child(bs, options, "file", ChildRole.IMAGE)
    name = bs.file.bs.filename or bs.node_name
    file = ChildFile(bs.file, name)
    header = run_co(bs, read_header(file))
    rw = bool(flags & OpenFlags.RDWR)
    if header.incompatible_features & Incompat.CORRUPT and rw and not flags & OpenFlags.CHECK:
        # only check -r may write to a corrupt image: it repairs it and clears the bit
        raise BlockError(errno.EACCES, "image is corrupt; cannot be opened read/write", name)
    data = None
    if header.incompatible_features & Incompat.DATA_FILE:
        ref = options.get("data-file") or header.data_file
        if not ref:
            raise BlockError(errno.EINVAL, "missing data-file option for an image with an "
                             "external data file", name)  # fmt: skip
        if isinstance(ref, str) and "data-file" not in options and not os.path.isabs(ref):
            ref = os.path.join(os.path.dirname(name), ref)
        options["data-file"] = ref
        graph.bdrv_open_child(bs, options, "data-file", ChildRole.DATA)
        data_child = next(c for c in bs.children if c.name == "data-file")
        data = ChildFile(data_child, data_child.bs.filename or name)
    elif "data-file" in options:
        raise BlockError(errno.EINVAL, "'data-file' can only be set for images with an "
                         "external data file", name)  # fmt: skip
    ro = parse_runtime_options(opt, header, flags, name)
    image = run_co(bs, Qcow2Image.open(
        file, data_file=data, read_only=not rw, header=header,
        l2_cache_tables=ro.l2_tables, refcount_cache_tables=ro.refcount_tables,
        lazy_refcounts=ro.lazy_refcounts, discard_request=ro.discard_request,
        discard_other=ro.discard_other,
    ))  # fmt: skip
    # read by .snapshot: punch clusters snapshot operations free (QEMU's default: on)
    image.discard_snapshot = ro.discard_snapshot  # type: ignore[attr-defined]
    if bitmap.stale_extension(image):
        _warn_stale_bitmaps(header.version)
    if not flags & OpenFlags.CHECK:
        # a bad snapshot table refuses the open; check reads it itself (qcow2_do_open)
        run_co(bs, snaptable.read_at_open(image))
    if rw and image.dirty and not flags & OpenFlags.CHECK:
        run_co(bs, reopen.repair_dirty(image))
    if rw:
        run_co(bs, reopen.clear_unknown_autoclear(image))
    if header.version < 3:
        bs.supported_zero_flags = 0  # no zero clusters: NO_FALLBACK can never work (QEMU)
    bs.backing_file = header.backing_file or ""
    bs.backing_format = header.backing_format or ""
    bs.opaque = Qcow2State(image, file, data)
    if not flags & (OpenFlags.INACTIVE | OpenFlags.NO_IO):
        _load_bitmaps(bs, image, rw)
    elif not flags & OpenFlags.INACTIVE:  # (info) QEMU loads them: a broken directory fails
        run_co(bs, bitmap.read_directory(image))

    async def read_backing(offset: int, buf: memoryview) -> None:
        if bs.backing is None:
            buf[:] = bytes(len(buf))
            return
        await io.bdrv_co_preadv(bs.backing, offset, len(buf), buf)

    image.backing = read_backing
    image.has_backing = lambda: bs.backing is not None
    image.is_zero_fast = lambda offset, length: status.bdrv_co_is_zero_fast(bs, offset, length)
    image.is_zero = lambda offset, length: _is_zero(bs, offset, length)


def _warn_stale_bitmaps(version: int) -> None:
    """QEMU's words when a program without bitmap support cleared the bitmaps' autoclear
    bit (qcow2_read_extensions): the bitmaps are dropped, their clusters maybe leaked. The
    second line has no newline in QEMU either."""
    if version < 3:
        warn_report("This qcow2 v2 image contains bitmaps, but they may have been modified "
                    "by a program without persistent bitmap support; so now they must all be "
                    "considered inconsistent")  # fmt: skip
    else:
        warn_report("a program lacking bitmap support modified this file, so all bitmaps are "
                    "now considered inconsistent")  # fmt: skip
    sys.stderr.write("Some clusters may be leaked, run 'qemu-img check -r' on the image file "
                     "to fix.")  # fmt: skip
    sys.stderr.flush()


async def _is_zero(bs: Any, offset: int, length: int) -> bool:
    """Whether the node reads as zeros there, backing chain included, by block status (QEMU's
    is_zero in qcow2.c: clipped to the disk; zeros of different kinds come in pieces)."""
    end = min(offset + length, bs.total_bytes)
    while offset < end:
        st = await status.bdrv_co_block_status_above(bs, None, offset, end - offset)
        if not st.pnum or not st.ret & S.ZERO:
            return False
        offset += st.pnum
    return True


@hookimpl
def bdrv_reopen_prepare(bs: Any, options: dict[str, Any], flags: OpenFlags) -> Any:
    return reopen.prepare(bs, options, flags)


@hookimpl
def bdrv_reopen_commit(bs: Any, state: Any) -> None:
    reopen.commit(bs, state)


@hookimpl
def bdrv_reopen_commit_post(bs: Any, state: Any) -> None:
    reopen.commit_post(bs, state)


@hookimpl
def bdrv_reopen_abort(bs: Any, state: Any) -> None:
    reopen.abort(bs, state)


@hookimpl
def bdrv_join_options(options: dict[str, Any], old_options: dict[str, Any]) -> dict[str, Any]:
    return join_options(options, old_options)


@hookimpl
def bdrv_close(bs: Any) -> None:
    st: Qcow2State | None = bs.opaque
    if st is None:
        return
    try:
        if not st.image.read_only:
            _store_bitmaps(bs, st.image)
        run_co(bs, st.image.close())
    finally:
        bs.opaque = None


@hookimpl
def bdrv_refresh_limits(bs: Any, limits: BlockLimits) -> BlockLimits:
    geo = bs.opaque.image.geo
    return attrs.evolve(limits, request_alignment=1, pwrite_zeroes_alignment=geo.subcluster_size,
                        pdiscard_alignment=geo.cluster_size)  # fmt: skip


@hookimpl
def bdrv_get_specific_info(bs: Any) -> dict[str, Any] | None:
    img: Qcow2Image = bs.opaque.image
    h = img.header
    data: dict[str, Any] = {"compat": "0.10" if h.version == 2 else "1.1",
                            "compression-type": "zstd" if h.compression_type else "zlib"}
    if h.version >= 3:
        data["lazy-refcounts"] = bool(h.compatible_features & Compat.LAZY_REFCOUNTS)
    data["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        data["corrupt"] = bool(h.incompatible_features & Incompat.CORRUPT)
        data["extended-l2"] = h.extended_l2
        if h.incompatible_features & Incompat.DATA_FILE:
            data["data-file"] = h.data_file
            data["data-file-raw"] = bool(h.autoclear_features & Autoclear.DATA_FILE_RAW)

        bitmaps = run_co(bs, bitmap.info_list(img))
        if bitmaps:
            data["bitmaps"] = bitmaps
    return {"type": "qcow2", "data": data}


@hookimpl
def bdrv_has_zero_init(bs: Any) -> bool:
    img: Qcow2Image = bs.opaque.image
    return not (img.has_data_file and img.header.autoclear_features & Autoclear.DATA_FILE_RAW)


def _measure_options(options: dict[str, Any]) -> tuple[int, int, bool, str]:
    """Cluster size, refcount width, extended L2 and preallocation, checked in the order
    and with the words of qcow2_measure (they differ from create's)."""

    def bad(msg: str) -> BlockError:
        err = BlockError(errno.EINVAL, msg)
        err.verbatim = True  # type: ignore[attr-defined]
        return err

    ext = parse_bool(options.get("extended_l2", False), "extended_l2")
    given = options.get("cluster_size")
    cs = 65536 if given in (None, "") else parse_size(given)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise bad("Cluster size must be a power of two between 512 and 2048k")
    if ext and cs < 16384:
        raise bad("Extended L2 entries are only supported with cluster sizes of at least "
                  "16384 bytes")  # fmt: skip
    compat = options.get("compat") or "1.1"
    if compat not in ("0.10", "1.1"):
        raise bad(f"Invalid compatibility level: '{compat}'")
    given = options.get("refcount_bits")
    refbits = 16 if given in (None, "") else int(given)
    if refbits < 1 or refbits > 64 or refbits & (refbits - 1):
        raise bad("Refcount width must be a power of two and may not exceed 64 bits")
    if compat == "0.10" and refbits != 16:
        raise bad("Different refcount widths than 16 bits require compatibility level 1.1 "
                  "or above (use compat=1.1 or greater)")  # fmt: skip
    prealloc = str(options.get("preallocation") or "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise bad(f"invalid parameter value: {prealloc}")
    return cs, refbits, ext, prealloc


@hookimpl
def bdrv_measure(options: dict[str, Any], in_bs: Any) -> BlockMeasureInfo:
    cs, refbits, ext, prealloc = _measure_options(options)
    if in_bs is not None:
        size = in_bs.total_bytes
        required = _allocated_bytes(in_bs, cs)
    else:
        if "size" not in options:
            raise BlockError(errno.EINVAL, "either --size or a source image is required")
        size = parse_size(options["size"])
        required = 0
    aligned = -(-size // cs) * cs
    full = prealloc_size(size, cs, int(math.log2(refbits)), ext)
    if prealloc in ("falloc", "full"):
        required = aligned
    bitmaps = None
    if in_bs is not None and in_bs.drv is not None and in_bs.drv.name == "qcow2" \
            and in_bs.opaque.image.header.version >= 3 \
            and str(options.get("compat") or "1.1") not in ("0.10", "v2"):  # fmt: skip

        # both sides support persistent bitmaps (qcow2_get_persistent_dirty_bitmap_size)
        bitmaps = bitmap.stored_size(in_bs.dirty_bitmaps, cs)
    return BlockMeasureInfo(required=full - aligned + required, fully_allocated=full,
                            bitmaps=bitmaps)  # fmt: skip


def _allocated_bytes(bs: Any, cs: int) -> int:
    total, pos, end = 0, 0, bs.total_bytes
    while pos < end:
        st = status.bdrv_block_status_above(bs, None, pos, end - pos)
        n = st.pnum or end - pos
        if not st.ret & S.ZERO and st.ret & (S.DATA | S.ALLOCATED) == S.DATA | S.ALLOCATED:
            a, b = pos // cs * cs, -(-(pos + n) // cs) * cs
            total += b - a
        pos += n
    return total


# -------------------------------------------------------------------------------------------
# I/O hooks
# -------------------------------------------------------------------------------------------


@hookimpl
async def bdrv_co_preadv(bs: Any, offset: int, length: int, buf: memoryview,
                         flags: BdrvRequestFlags) -> None:  # fmt: skip
    await bs.opaque.image.read(offset, buf)


@hookimpl
async def bdrv_co_pwritev(bs: Any, offset: int, length: int, buf: memoryview,
                          flags: BdrvRequestFlags) -> None:  # fmt: skip
    await bs.opaque.image.write(offset, buf)


@hookimpl
async def bdrv_co_pwritev_compressed(bs: Any, offset: int, length: int,
                                     buf: memoryview) -> None:  # fmt: skip
    await compress.write_clusters(bs.opaque.image, offset, length, buf)


@hookimpl
async def bdrv_co_pwrite_zeroes(bs: Any, offset: int, length: int,
                                flags: BdrvRequestFlags) -> None:  # fmt: skip
    await bs.opaque.image.write_zeroes(offset, length, unmap=bool(flags & F.MAY_UNMAP))


@hookimpl
async def bdrv_co_pdiscard(bs: Any, offset: int, length: int) -> None:
    await bs.opaque.image.discard(offset, length)


@hookimpl
async def bdrv_co_flush_to_os(bs: Any) -> None:
    if bs.opaque is None:
        return  # bdrv_open failed before setting up the image
    img: Qcow2Image = bs.opaque.image
    if not img.read_only:
        async with img.lock:
            await img.flush_metadata()


@hookimpl
async def bdrv_co_block_status(bs: Any, want_zero: bool, offset: int, length: int
                               ) -> BlockStatus:  # fmt: skip
    st: Qcow2State = bs.opaque
    img = st.image
    length = min(length, max(0, img.header.size - offset)) or length
    stype, n, host = await img.block_status(offset, length)
    target = (st.data or st.file).child.bs
    if stype is ST.NORMAL:
        return BlockStatus(S.DATA | S.OFFSET_VALID, n, host, target)
    if stype is ST.ZERO_ALLOC:
        return BlockStatus(S.ZERO | S.OFFSET_VALID, n, host, target)
    if stype is ST.ZERO_PLAIN:
        return BlockStatus(S.ZERO, n)
    if stype is ST.COMPRESSED:
        return BlockStatus(S.DATA | S.COMPRESSED, n)
    if stype is ST.UNALLOCATED_ALLOC:
        return BlockStatus(S.OFFSET_VALID, n, host, target)
    return BlockStatus(S.NONE, n)


@hookimpl
async def bdrv_co_getlength(bs: Any) -> int:
    return int(bs.opaque.image.header.size)


@hookimpl
async def bdrv_co_get_info(bs: Any) -> BlockDriverInfo:
    img: Qcow2Image = bs.opaque.image
    return BlockDriverInfo(cluster_size=img.geo.cluster_size,
                           subcluster_size=img.geo.subcluster_size,
                           vm_state_offset=img.vm_state_offset(),
                           is_dirty=bool(img.header.incompatible_features & Incompat.DIRTY))


@hookimpl
async def bdrv_co_check(bs: Any, result: BdrvCheckResult, fix: BdrvCheckMode) -> None:
    await check_image(bs.opaque.image, result, fix)


@hookimpl
async def bdrv_co_truncate(bs: Any, offset: int, exact: bool, prealloc: PreallocMode,
                           flags: BdrvRequestFlags) -> None:  # fmt: skip
    img: Qcow2Image = bs.opaque.image
    if offset % 512:
        raise BlockError(errno.EINVAL, f"size {offset} must be a multiple of 512", bs.node_name)
    await img.truncate(offset, prealloc.value)


@hookimpl
async def bdrv_co_readv_vmstate(bs: Any, buf: memoryview, pos: int) -> None:
    await bs.opaque.image.vmstate_io(pos, buf, False)


@hookimpl
async def bdrv_co_writev_vmstate(bs: Any, buf: memoryview, pos: int) -> None:
    await bs.opaque.image.vmstate_io(pos, buf, True)


@hookimpl
async def bdrv_co_invalidate_cache(bs: Any) -> None:
    img: Qcow2Image = bs.opaque.image
    img.l2_cache.invalidate()
    img.refcounts.cache.invalidate()


@hookimpl
async def bdrv_co_create_opts(filename: str, options: dict[str, Any]) -> None:
    # As qcow2_co_create_opts: create the protocol file empty, open it through the graph
    # (any protocol: file, host_device...), write the layout, then grow the new image.
    o = _create_options(filename, options)
    await special.bdrv_co_create_file(filename, {"size": 0})
    flags = OpenFlags.RDWR | OpenFlags.RESIZE | OpenFlags.PROTOCOL
    blk = await backend.blk_co_new_open(filename, {}, flags)
    data_blk = None
    try:
        f = BackendFile(blk, filename)
        data = None
        if o["layout"]["data_file"]:
            df = o["layout"]["data_file"]
            path = df if os.path.isabs(df) else os.path.join(os.path.dirname(filename), df)
            prealloc = o["prealloc"] if o["prealloc"] in ("falloc", "full") else "off"
            await special.bdrv_co_create_file(path, {"size": o["size"], "preallocation": prealloc})
            data_blk = await backend.blk_co_new_open(path, {}, flags)
            data = BackendFile(data_blk, path)
        await f.pwrite(0, empty_image(**o["layout"]))
        img = await Qcow2Image.open(f, data_file=data, read_only=False)
        try:
            await img.truncate(o["size"], o["prealloc"])
        except OSError as exc:  # qcow2_co_create's wording around blk_truncate's error
            raise error_prepend(exc, "Could not resize image: ") from exc
        await img.close()
        await blk.co_flush()
    finally:
        if data_blk is not None:
            await backend.blk_co_unref(data_blk)
        await backend.blk_co_unref(blk)


def _create_options(filename: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate create options with qemu-img's rules and messages."""

    def bad(msg: str) -> BlockError:
        return BlockError(errno.EINVAL, msg, filename)

    compat = str(options.get("compat") or "1.1")
    versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
    if compat not in versions:
        raise bad(f"parameter 'version' does not accept value {compat!r}")
    version = versions[compat]
    cs = parse_size(options.get("cluster_size") or 65536)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise bad("cluster size must be a power of two between 512 and 2048k")
    refbits = int(options.get("refcount_bits") or 16)
    if refbits < 1 or refbits > 64 or refbits & (refbits - 1):
        raise bad("refcount width must be a power of two and may not exceed 64 bits")
    lazy = parse_bool(options.get("lazy_refcounts", False), "lazy_refcounts")
    ext = parse_bool(options.get("extended_l2", False), "extended_l2")
    ctype = str(options.get("compression_type") or "zlib")
    if ctype not in ("zlib", "zstd"):
        raise bad(f"invalid compression type {ctype!r}")
    data_file = options.get("data_file") or None
    data_raw = parse_bool(options.get("data_file_raw", False), "data_file_raw")
    backing = options.get("backing_file") or None
    prealloc = str(options.get("preallocation") or "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise bad(f"invalid preallocation mode {prealloc!r}")
    suffix = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    if version == 2:
        if refbits != 16:
            raise bad("different refcount widths than 16 bits require compatibility level 1.1 "
                      "or above (use version=v3 or greater)")  # fmt: skip
        for flag, what in ((lazy, "lazy refcounts are"), (ext, "extended L2 entries are"),
                           (ctype != "zlib", "non-zlib compression type is"),
                           (data_file, "external data files are")):  # fmt: skip
            if flag:
                raise bad(f"{what} {suffix}")
    if ext and cs < 16384:
        raise bad("extended L2 entries are only supported with cluster sizes of at least "
                  "16384 bytes")  # fmt: skip
    if data_raw and not data_file:
        raise bad("data-file-raw requires data-file")
    if data_raw and backing:
        raise bad("backing file and data-file-raw cannot be used at the same time")
    if options.get("backing_fmt") and not backing:
        raise bad("backing format cannot be used without backing file")
    if "size" not in options:
        raise bad("image size must be specified")
    size = parse_size(options["size"])
    if size % 512:
        raise bad(f"image size {size} must be a multiple of 512 bytes")
    layout = dict(cluster_bits=cs.bit_length() - 1, version=version,
                  refcount_order=refbits.bit_length() - 1, lazy_refcounts=lazy, extended_l2=ext,
                  compression_type=1 if ctype == "zstd" else 0, backing_file=backing,
                  backing_format=options.get("backing_fmt") or None, data_file=data_file,
                  data_file_raw=data_raw)  # fmt: skip
    if prealloc != "off" and backing:
        raise bad("backing file and preallocation can only be used at the same time if "
                  "extended_l2 is on") if not ext else bad("preallocation with backing unsupported")
    if data_raw and prealloc == "off":
        prealloc = "metadata"  # a raw data file is mapped 1:1 from the start (as QEMU)
    return {"layout": layout, "size": size, "prealloc": prealloc}


@hookimpl
def bdrv_change_backing_file(bs: Any, backing_file: str, backing_fmt: str) -> None:
    st: Qcow2State = bs.opaque
    img = st.image
    if img.header.autoclear_features & Autoclear.DATA_FILE_RAW and backing_file:
        raise NotSupportedError("cannot set a backing file on an image with data-file-raw",
                                bs.node_name)  # fmt: skip
    h = attrs.evolve(img.header, backing_file=backing_file or None)
    h = h.with_standard_extensions(backing_fmt or None, h.data_file)
    run_co(bs, img.write_header(h))
    bs.backing_file = backing_file
    bs.backing_format = backing_fmt


# -------------------------------------------------------------------------------------------
# Internal snapshots (engine in .snapshot)
# -------------------------------------------------------------------------------------------


@hookimpl
def bdrv_snapshot_create(bs: Any, sn_info: dict[str, Any]) -> None:
    from . import snapshot

    run_co(bs, snapshot.create(bs.opaque.image, sn_info))


@hookimpl
def bdrv_snapshot_goto(bs: Any, snapshot_id: str) -> None:
    from . import snapshot

    size = run_co(bs, snapshot.goto(bs.opaque.image, snapshot_id))
    if size != bs.total_bytes:
        bs.total_bytes = -(-size // 512) * 512
        for bitmap in bs.dirty_bitmaps:
            bitmap.resize(bs.total_bytes)


@hookimpl
def bdrv_snapshot_delete(bs: Any, snapshot_id: str | None, name: str | None) -> None:
    from . import snapshot

    run_co(bs, snapshot.delete(bs.opaque.image, snapshot_id, name))


@hookimpl
def bdrv_snapshot_load_tmp(bs: Any, snapshot_id: str | None, name: str | None) -> None:
    from . import snapshot

    run_co(bs, snapshot.load_tmp(bs.opaque.image, snapshot_id, name))


@hookimpl
def bdrv_snapshot_list(bs: Any) -> list[dict[str, Any]]:
    from . import snapshot

    return run_co(bs, snapshot.list_snapshots(bs.opaque.image))


# -------------------------------------------------------------------------------------------
# Persistent dirty bitmaps (engine in .bitmap)
# -------------------------------------------------------------------------------------------


def _load_bitmaps(bs: Any, image: Qcow2Image, rw: bool) -> None:
    """Create the image's bitmaps on ``bs`` (qcow2_load_dirty_bitmaps); read-write, they are
    marked in-use on disk until they are stored again at close."""
    from blockcore.dirty_bitmap import BdrvDirtyBitmap


    size = -(-image.header.size // 512) * 512

    def make(entry: bitmap.BitmapEntry) -> BdrvDirtyBitmap:
        return BdrvDirtyBitmap(bs, size, entry.granularity, entry.name)

    loaded = run_co(bs, bitmap.load(image, make, rw))
    if loaded:
        bs.dirty_bitmaps = [*bs.dirty_bitmaps, *loaded]


def _store_bitmaps(bs: Any, image: Qcow2Image) -> None:
    """Write the persistent bitmaps back and release them (qcow2_store_persistent_dirty_bitmaps);
    a failure loses them, as in QEMU, but does not stop the close."""


    try:
        run_co(bs, bitmap.store(image, reopen.writable_bitmaps(bs)))
    except OSError as exc:
        sys.stderr.write(f"Lost persistent bitmaps during inactivation of node "
                         f"'{bs.node_name}': {exc.strerror or exc}\n")  # fmt: skip
    bs.dirty_bitmaps = [b for b in bs.dirty_bitmaps if not b.persistent]


@hookimpl
async def bdrv_co_can_store_new_dirty_bitmap(bs: Any, name: str, granularity: int) -> bool:

    img: Qcow2Image = bs.opaque.image
    return await bitmap.can_store(img, name, granularity, bs.total_bytes, bs.node_name)


@hookimpl
async def bdrv_co_remove_persistent_dirty_bitmap(bs: Any, name: str) -> None:

    await bitmap.remove(bs.opaque.image, name)


@hookimpl
def bdrv_amend_options(bs: Any, options: dict[str, Any], force: bool) -> None:
    from . import amend

    size = run_co(bs, amend.amend(bs.opaque.image, options, bs.backing is not None))
    if size is not None and size != bs.total_bytes:
        bs.total_bytes = -(-size // 512) * 512
        for bitmap in bs.dirty_bitmaps:
            bitmap.resize(bs.total_bytes)


@hookimpl
def bdrv_make_empty(bs: Any) -> None:
    from . import amend

    run_co(bs, amend.make_empty(bs.opaque.image))

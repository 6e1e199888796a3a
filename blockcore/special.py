"""The less common requests: offloaded copy, VM state, removable media, ioctl, batching,
check, cache invalidation, file deletion, bitmap capacity, request cancellation, create."""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

from .aio import assert_bdrv_graph_readable, co_wrapper
from .errors import BlockError, NoMediumError, NotSupportedError
from .graph import bdrv_filter_bs, bdrv_primary_child
from .io import (
    F,
    TrackedRequest,
    _check_request,
    _enter,
    _is_inserted,
    _wait_serialising,
    _write_allowed,
    _write_finish,
)
from .tiers import Tier, api, global_state_code
from .types import BdrvCheckMode, BdrvCheckResult
from .zero import bdrv_co_pwrite_zeroes

if TYPE_CHECKING:
    from .graph import BdrvChild, BlockDriverState

__all__ = [
    "BlockAIOCB",
    "bdrv_aio_cancel",
    "bdrv_aio_cancel_async",
    "bdrv_check",
    "bdrv_co_can_store_new_dirty_bitmap",
    "bdrv_co_check",
    "bdrv_co_copy_range",
    "bdrv_co_delete_file",
    "bdrv_co_delete_file_noerr",
    "bdrv_co_eject",
    "bdrv_co_invalidate_cache",
    "bdrv_co_io_plug",
    "bdrv_co_io_unplug",
    "bdrv_co_ioctl",
    "bdrv_co_is_inserted",
    "bdrv_co_lock_medium",
    "bdrv_co_readv_vmstate",
    "bdrv_co_writev_vmstate",
    "bdrv_create",
    "bdrv_load_vmstate",
    "bdrv_save_vmstate",
]

# -------------------------------------------------------------------------------------------
# copy_range: offloaded only, never emulated here (callers fall back to read + write)
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_copy_range(
    src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int, length: int,
    read_flags: F = F.NONE, write_flags: F = F.NONE,
) -> None:  # fmt: skip
    """Copy a range from ``src`` to ``dst`` by offload (e.g. ``copy_file_range``). Tier: I/O.

    ``ZERO_WRITE`` in ``write_flags`` zeroes the destination instead. ``NO_SERIALISING`` in
    ``read_flags`` is accepted and has no effect (QEMU dropped that flag).
    :raises NotSupportedError: a driver on either side cannot offload; no bounce-buffer
        fallback happens here, callers fall back to reading and writing themselves.
    """
    assert_bdrv_graph_readable("bdrv_co_copy_range")
    await bdrv_co_copy_range_from(src, src_offset, dst, dst_offset, length, read_flags,
                                  write_flags)  # fmt: skip


async def _copy_range_internal(src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int,
                               length: int, read_flags: F, write_flags: F, recurse_src: bool
                               ) -> None:  # fmt: skip
    if read_flags & F.NO_FALLBACK or write_flags & F.NO_FALLBACK:
        raise BlockError(errno.EINVAL, "copy_range does not take NO_FALLBACK")
    if dst.bs.drv is None:
        raise NoMediumError("no medium", dst.bs.node_name)
    _check_request(dst.bs, dst_offset, length, True)
    if write_flags & F.ZERO_WRITE:
        await bdrv_co_pwrite_zeroes(dst, dst_offset, length, write_flags & ~F.ZERO_WRITE)
        return
    if src.bs.drv is None:
        raise NoMediumError("no medium", src.bs.node_name)
    _check_request(src.bs, src_offset, length, True)
    if recurse_src:
        bs = _enter("bdrv_co_copy_range_from", src.bs)
        hook = bs.bdrv_co_copy_range_from
        if hook is None or dst.bs.drv.bdrv_co_copy_range_to is None:
            raise NotSupportedError("copy offload not supported", src.bs.node_name)
        src.bs.in_flight += 1
        req = TrackedRequest(src.bs, src_offset, length, "read")
        try:
            await _wait_serialising(req)
            await hook(src.bs, src, src_offset, dst, dst_offset, length, read_flags, write_flags)
        finally:
            req.end()
            src.bs.in_flight -= 1
    else:
        bs = _enter("bdrv_co_copy_range_to", dst.bs)
        hook = bs.bdrv_co_copy_range_to
        if hook is None or src.bs.drv.bdrv_co_copy_range_from is None:
            raise NotSupportedError("copy offload not supported", dst.bs.node_name)
        _write_allowed(dst, dst_offset + length, write_flags)
        dst.bs.in_flight += 1
        req = TrackedRequest(dst.bs, dst_offset, length, "write")
        try:
            await _wait_serialising(req)
            await hook(dst.bs, src, src_offset, dst, dst_offset, length, read_flags, write_flags)
        finally:
            _write_finish(dst.bs, dst_offset, length, "write")
            req.end()
            dst.bs.in_flight -= 1


@api(Tier.IO)
async def bdrv_co_copy_range_from(src: BdrvChild, src_offset: int, dst: BdrvChild,
                                  dst_offset: int, length: int, read_flags: F, write_flags: F
                                  ) -> None:  # fmt: skip
    """Continue an offloaded copy on the source side (drivers call it for their child).

    Tier: I/O."""
    await _copy_range_internal(src, src_offset, dst, dst_offset, length, read_flags,
                               write_flags, True)  # fmt: skip


@api(Tier.IO)
async def bdrv_co_copy_range_to(src: BdrvChild, src_offset: int, dst: BdrvChild,
                                dst_offset: int, length: int, read_flags: F, write_flags: F
                                ) -> None:  # fmt: skip
    """Continue an offloaded copy on the destination side. Tier: I/O."""
    await _copy_range_internal(src, src_offset, dst, dst_offset, length, read_flags,
                               write_flags, False)  # fmt: skip


# -------------------------------------------------------------------------------------------
# VM state
# -------------------------------------------------------------------------------------------


async def _vmstate(bs: BlockDriverState, buf: memoryview, pos: int, write: bool) -> None:
    drv = _enter("bdrv_co_writev_vmstate" if write else "bdrv_co_readv_vmstate", bs)
    hook = drv.bdrv_co_writev_vmstate if write else drv.bdrv_co_readv_vmstate
    if pos < 0:
        raise BlockError(errno.EINVAL, f"vmstate position {pos} is negative")
    bs.in_flight += 1
    try:
        if hook is not None:
            await hook(bs, buf, pos)
            return
        child = bdrv_primary_child(bs)
        if child is None:
            raise NotSupportedError("operation not supported", bs.filename or bs.node_name)
        await _vmstate(child.bs, buf, pos, write)
    finally:
        bs.in_flight -= 1


@api(Tier.IO)
async def bdrv_co_readv_vmstate(bs: BlockDriverState, buf: Any, pos: int) -> None:
    """Read VM state at ``pos`` into ``buf``. Tier: I/O. Not aligned or split."""
    await _vmstate(bs, memoryview(buf).cast("B"), pos, False)


@api(Tier.IO)
async def bdrv_co_writev_vmstate(bs: BlockDriverState, buf: Any, pos: int) -> None:
    """Write VM state at ``pos``. Tier: I/O."""
    await _vmstate(bs, memoryview(buf).cast("B"), pos, True)


bdrv_readv_vmstate = co_wrapper(bdrv_co_readv_vmstate, "bdrv_readv_vmstate", mixed=True,
                                rdlock=True, tier=Tier.IO_OR_GS)  # fmt: skip
bdrv_writev_vmstate = co_wrapper(bdrv_co_writev_vmstate, "bdrv_writev_vmstate", mixed=True,
                                 rdlock=True, tier=Tier.IO_OR_GS)  # fmt: skip


@api(Tier.IO)
def bdrv_save_vmstate(bs: BlockDriverState, buf: Any, pos: int, size: int) -> int:
    """Write ``size`` bytes of VM state from ``buf``; returns ``size``. Tier: I/O."""
    bdrv_writev_vmstate(bs, memoryview(buf).cast("B")[:size], pos)
    return size


@api(Tier.IO)
def bdrv_load_vmstate(bs: BlockDriverState, buf: Any, pos: int, size: int) -> int:
    """Read ``size`` bytes of VM state into ``buf``; returns ``size``. Tier: I/O."""
    bdrv_readv_vmstate(bs, memoryview(buf).cast("B")[:size], pos)
    return size


# -------------------------------------------------------------------------------------------
# Removable media, ioctl, batching
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_is_inserted(bs: BlockDriverState) -> bool:
    """Whether the node and every child have their medium. Tier: I/O."""
    return await _is_inserted(bs)


bdrv_is_inserted = co_wrapper(bdrv_co_is_inserted, "bdrv_is_inserted", rdlock=True)


@api(Tier.IO)
async def bdrv_co_eject(bs: BlockDriverState, eject_flag: bool) -> None:
    """Eject or load the medium (no-op for drivers without removable media). Tier: I/O."""
    drv = _enter("bdrv_co_eject", bs)
    if drv.bdrv_co_eject is not None:
        await drv.bdrv_co_eject(bs, eject_flag)


@api(Tier.IO)
async def bdrv_co_lock_medium(bs: BlockDriverState, locked: bool) -> None:
    """Lock or unlock the drive door (no-op without removable media). Tier: I/O."""
    drv = _enter("bdrv_co_lock_medium", bs)
    if drv.bdrv_co_lock_medium is not None:
        await drv.bdrv_co_lock_medium(bs, locked)


@api(Tier.IO)
async def bdrv_co_ioctl(bs: BlockDriverState, req: int, buf: Any) -> int:
    """Pass an ioctl to the driver (SCSI generic). Filters forward it. Tier: I/O.

    :raises NotSupportedError: no driver below handles ioctls.
    """
    drv = _enter("bdrv_co_ioctl", bs)
    assert_bdrv_graph_readable("bdrv_co_ioctl")
    bs.in_flight += 1
    try:
        if drv.bdrv_co_ioctl is not None:
            return int(await drv.bdrv_co_ioctl(bs, req, buf))
        child = bdrv_filter_bs(bs)
        if child is not None:
            return await bdrv_co_ioctl(child, req, buf)
        raise NotSupportedError("ioctl not supported", bs.filename or bs.node_name)
    finally:
        bs.in_flight -= 1


@api(Tier.IO)
async def bdrv_co_io_plug(bs: BlockDriverState) -> None:
    """Start a batch: children first, then the driver on the outermost plug. Tier: I/O.

    Drivers that submit requests in batches (io_uring) collect them until the matching
    unplug; for the others this is a no-op.
    """
    for c in bs.children:
        await bdrv_co_io_plug(c.bs)
    bs.io_plugged += 1
    if bs.io_plugged == 1 and bs.drv is not None and bs.drv.bdrv_co_io_plug is not None:
        await bs.drv.bdrv_co_io_plug(bs)


@api(Tier.IO)
async def bdrv_co_io_unplug(bs: BlockDriverState) -> None:
    """End a batch: the driver submits on the outermost unplug, then children. Tier: I/O."""
    if bs.io_plugged <= 0:
        raise AssertionError("bdrv_co_io_unplug without plug")
    bs.io_plugged -= 1
    if bs.io_plugged == 0 and bs.drv is not None and bs.drv.bdrv_co_io_unplug is not None:
        await bs.drv.bdrv_co_io_unplug(bs)
    for c in bs.children:
        await bdrv_co_io_unplug(c.bs)


# -------------------------------------------------------------------------------------------
# Check, cache invalidation, deletion, bitmaps
# -------------------------------------------------------------------------------------------


@api(Tier.IO)
async def bdrv_co_check(bs: BlockDriverState, fix: BdrvCheckMode = BdrvCheckMode.NONE,
                        result: BdrvCheckResult | None = None) -> BdrvCheckResult:  # fmt: skip
    """Check (and with ``fix`` repair) the image's consistency. Tier: I/O.

    Pass ``result`` to keep what the check gathered even when it raises (qemu-img prints
    those lines before the error).
    :raises NotSupportedError: the format cannot be checked (qemu-img's exit code 63).
    """
    drv = _enter("bdrv_co_check", bs)
    if drv.bdrv_co_check is None:
        raise NotSupportedError(
            "this image format does not support checks", bs.filename or bs.node_name
        )
    if result is None:
        result = BdrvCheckResult()
    bs.in_flight += 1
    try:
        await drv.bdrv_co_check(bs, result, fix)
    finally:
        bs.in_flight -= 1
    return result


bdrv_check = co_wrapper(bdrv_co_check, "bdrv_check", mixed=True, rdlock=True,
                        tier=Tier.IO_OR_GS)  # fmt: skip


@api(Tier.IO)
async def bdrv_co_invalidate_cache(bs: BlockDriverState) -> None:
    """Drop cached metadata of ``bs`` and its children and read it again. Tier: I/O."""
    drv = _enter("bdrv_co_invalidate_cache", bs)
    for c in bs.children:
        await bdrv_co_invalidate_cache(c.bs)
    if drv.bdrv_co_invalidate_cache is not None:
        await drv.bdrv_co_invalidate_cache(bs)


bdrv_invalidate_cache = co_wrapper(bdrv_co_invalidate_cache, "bdrv_invalidate_cache",
                                   mixed=True, rdlock=True, tier=Tier.IO_OR_GS)  # fmt: skip


@api(Tier.IO)
async def bdrv_co_delete_file(bs: BlockDriverState) -> None:
    """Delete the storage behind ``bs``. Tier: I/O. :raises NotSupportedError:"""
    drv = _enter("bdrv_co_delete_file", bs)
    assert_bdrv_graph_readable("bdrv_co_delete_file")
    if drv.bdrv_co_delete_file is None:
        raise NotSupportedError(f"driver {drv.name!r} does not support image deletion",
                                bs.filename)  # fmt: skip
    await drv.bdrv_co_delete_file(bs)


@api(Tier.IO)
async def bdrv_co_delete_file_noerr(bs: BlockDriverState | None) -> None:
    """Delete the file behind ``bs``, ignoring "not supported" and reporting other errors on
    stderr (QEMU's error_report). Tier: I/O."""
    import sys

    if bs is None:
        return
    try:
        await bdrv_co_delete_file(bs)
    except NotSupportedError:
        pass
    except OSError as exc:
        print(f"Could not delete file {bs.filename!r}: {exc}", file=sys.stderr)


@api(Tier.IO)
async def bdrv_co_can_store_new_dirty_bitmap(bs: BlockDriverState, name: str,
                                             granularity: int) -> bool:  # fmt: skip
    """Whether a new persistent dirty bitmap fits in the image. Tier: I/O.

    :raises NotSupportedError: "Can't store persistent bitmaps to <node>".
    """
    assert_bdrv_graph_readable("bdrv_co_can_store_new_dirty_bitmap")
    drv = bs.drv
    if drv is None:
        raise NoMediumError(f"can't store persistent bitmaps to {bs.node_name}", bs.node_name)
    if drv.bdrv_co_can_store_new_dirty_bitmap is None:
        raise NotSupportedError(f"can't store persistent bitmaps to {bs.node_name}",
                                bs.node_name)  # fmt: skip
    return bool(await drv.bdrv_co_can_store_new_dirty_bitmap(bs, name, granularity))


bdrv_can_store_new_dirty_bitmap = co_wrapper(bdrv_co_can_store_new_dirty_bitmap,
                                             "bdrv_can_store_new_dirty_bitmap", rdlock=True)


# -------------------------------------------------------------------------------------------
# Asynchronous request handles
# -------------------------------------------------------------------------------------------


class BlockAIOCB:
    """A submitted request (QEMU's BlockAIOCB). Its callback runs exactly once.

    Cancellation: a request that has not reached the driver yet (queued behind a drained
    section or a serialising request) is abandoned and completes with ``ECANCELED``; one
    already in a driver runs to completion, as QEMU's default cancel does, because stopping
    a driver mid-request could leave metadata half-written.
    """

    def __init__(self, bs: BlockDriverState, coro: Any, cb: Any = None) -> None:
        self.bs = bs
        self.cb = cb
        self.result: BaseException | None | int = None
        self.started = False
        self.cancelled = False
        self.done = False
        self._task = asyncio.ensure_future(self._run(coro), loop=bs.aio_context.loop)

    async def _run(self, coro: Any) -> None:
        await asyncio.sleep(0)  # let a cancel issued right after submission take effect
        if self.cancelled:
            coro.close()
            self.result = BlockError(errno.ECANCELED, "request cancelled", self.bs.node_name)
        else:
            self.started = True
            try:
                await coro
                self.result = 0
            except Exception as exc:  # noqa: BLE001 (handed to the callback)
                self.result = exc
        self.done = True
        if self.cb is not None:
            self.cb(self.result)
        from .aio import _waiters, aio_wait_kick

        if _waiters:
            aio_wait_kick()


@api(Tier.IO)
def bdrv_aio_cancel_async(acb: BlockAIOCB) -> None:
    """Ask for ``acb`` to be cancelled; returns at once. Tier: I/O."""
    if not acb.started and not acb.done:
        acb.cancelled = True


@api(Tier.IO)
def bdrv_aio_cancel(acb: BlockAIOCB) -> None:
    """Cancel ``acb`` and wait until its callback has run. Tier: I/O (polls: from the main
    thread, or the node's home thread outside its running loop)."""
    from .aio import aio_wait_while

    bdrv_aio_cancel_async(acb)
    ctx = acb.bs.aio_context
    if ctx.in_home_thread():
        if ctx.loop.is_running():
            raise BlockError(errno.EDEADLK, "bdrv_aio_cancel from inside the node's event loop")
        ctx.loop.run_until_complete(acb._task)
    else:
        aio_wait_while(ctx, lambda: not acb.done)


# -------------------------------------------------------------------------------------------
# Create
# -------------------------------------------------------------------------------------------


@api(Tier.GS)
def bdrv_create(driver_name: str, filename: str, options: dict[str, Any]) -> None:
    """Create an image with driver ``driver_name`` (``qemu-img create``). Tier: GS.

    ``options`` use the driver's create option names; ``size`` may carry a suffix (``1G``).
    Unknown options are refused with their name.
    """
    from .aio import run
    from .drivers import bdrv_find_format
    from .util import parse_size

    global_state_code("bdrv_create")
    drv = bdrv_find_format(driver_name)
    if drv.bdrv_co_create_opts is None:  # type: ignore[attr-defined]
        raise NotSupportedError(f"format {driver_name!r} does not support image creation",
                                filename)  # fmt: skip
    known = {o.name: o for o in drv.descriptor.create_opts}
    opts: dict[str, Any] = {}
    for key, value in options.items():
        if key not in known:
            raise BlockError(errno.EINVAL, f"invalid parameter {key!r}", filename)
        opts[key] = parse_size(value) if known[key].type == "size" and value is not None \
            else value  # fmt: skip
    for name, spec in known.items():
        if name not in opts and spec.default is not None:
            opts[name] = spec.default
    run(drv.bdrv_co_create_opts(filename, opts))  # type: ignore[attr-defined]


@api(Tier.IO)
async def bdrv_co_create_file(filename: str, options: dict[str, Any]) -> None:
    """Create the protocol-level file of a new image (QEMU's bdrv_co_create_file). Tier: I/O.

    Format drivers call it from ``bdrv_co_create_opts``; the protocol driver is chosen from
    the filename (``file`` for plain paths) and gets the options it declares (``size``,
    ``preallocation``...), the others are dropped.
    """
    from .aio import run_in_main_loop
    from .drivers import bdrv_find_format, bdrv_find_protocol

    drv = await run_in_main_loop(bdrv_find_protocol, filename)
    if drv is None:
        drv = await run_in_main_loop(bdrv_find_format, "file")
    if drv.bdrv_co_create_opts is None:  # type: ignore[attr-defined]
        raise NotSupportedError(f"protocol driver {drv.name!r} does not support image creation",
                                filename)  # fmt: skip
    known = {o.name for o in drv.descriptor.create_opts}
    prefix = f"{drv.descriptor.protocol_name}:"
    name = filename[len(prefix):] if filename.startswith(prefix) else filename
    await drv.bdrv_co_create_opts(name, {k: v for k, v in options.items() if k in known})  # type: ignore[attr-defined]

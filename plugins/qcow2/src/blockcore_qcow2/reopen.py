"""Reopening a qcow2 node: read-only <-> read-write and new runtime options, in the core's
prepare / commit / abort / commit-post transaction (QEMU's qcow2_reopen_prepare,
qcow2_update_options_*, qcow2_reopen_bitmaps_ro/rw, qcow2_mark_clean).

Prepare validates the options and does only what an abort may leave done: it writes back
the metadata caches and, before the node turns read-only, stores the persistent bitmaps
and marks the image clean, while the file can still be written. Commit switches the
engine's settings and cannot fail. An image turning writable is written to only after
every node committed (the file child is writable then): it is repaired when dirty and its
unknown autoclear bits are cleared, as at open, and its bitmaps are marked in use.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

import attrs

from blockcore.aio import run_co
from blockcore.cliutil import print_check_messages
from blockcore.errors import BlockError
from blockcore.types import BdrvCheckMode, BdrvCheckResult, OpenFlags

from . import bitmap
from .check import check_image
from .format import Autoclear, Incompat
from .image import Qcow2Image
from .options import RuntimeOptions, parse_runtime_options, pop_runtime_options


@attrs.define(eq=False)
class ReopenState:
    """A prepared reopen: the settings commit applies and what abort must put back."""

    runtime: RuntimeOptions
    flags: OpenFlags
    to_read_only: bool
    to_read_write: bool
    #: persistent bitmaps prepare stored and made read-only (made writable again on abort)
    stored_bitmaps: list[Any] = attrs.field(factory=list)


# -------------------------------------------------------------------------------------------
# Becoming writable (at open and at reopen)
# -------------------------------------------------------------------------------------------


async def repair_dirty(image: Qcow2Image) -> None:
    """Lazy refcounts left stale refcounts behind: rebuild them (as qcow2_co_open)."""
    result = BdrvCheckResult()
    try:
        await check_image(image, result, BdrvCheckMode.FIX_LEAKS | BdrvCheckMode.FIX_ERRORS)
    finally:
        print_check_messages(result.messages)  # QEMU's check prints them here too
    await image.refcounts.flush()
    await image.set_incompat(Incompat.DIRTY, False)
    image.dirty = False


async def clear_unknown_autoclear(image: Qcow2Image) -> None:
    """Autoclear bits we do not maintain must be cleared before writing."""
    known = int(Autoclear.DATA_FILE_RAW | Autoclear.BITMAPS)  # ~ of an IntFlag drops bits
    h = image.header
    if h.autoclear_features & ~known:
        await image.write_header(attrs.evolve(h, autoclear_features=h.autoclear_features
                                              & known))  # fmt: skip


def writable_bitmaps(bs: Any) -> list[Any]:
    """The node's persistent bitmaps that must be written back to the image."""
    return [b for b in bs.dirty_bitmaps
            if b.persistent and b.name and not b.readonly and not b.inconsistent]  # fmt: skip


# -------------------------------------------------------------------------------------------
# The transaction
# -------------------------------------------------------------------------------------------


def prepare(bs: Any, options: dict[str, Any], flags: OpenFlags) -> ReopenState:
    """Validate ``options`` (the handled ones are removed) and get the image ready for
    ``flags``. Tier: GS.

    :raises BlockError: QEMU's message for a bad option; an I/O error from writing back.
    """
    img: Qcow2Image = bs.opaque.image
    name = img.file.name
    runtime = parse_runtime_options(pop_runtime_options(options), img.header, flags, name)
    writable = not img.read_only
    rw = bool(flags & OpenFlags.RDWR)
    state = ReopenState(runtime, flags, writable and not rw, not writable and rw)
    if img.lazy_refcounts and not runtime.lazy_refcounts and img.dirty:
        # as QEMU: turning lazy refcounts off makes the image clean, which needs writing
        if not writable:
            raise BlockError(errno.EPERM, "Failed to disable lazy refcounts: Operation not "
                             "permitted", name)  # fmt: skip
        _run(bs, img.mark_clean(), "Failed to disable lazy refcounts")
    if writable:
        _run(bs, _locked(img, img.l2_cache.flush()), "Failed to flush the L2 table cache")
        _run(bs, _locked(img, img.refcounts.flush()),
             "Failed to flush the refcount block cache")  # fmt: skip
    if state.to_read_only:
        try:
            _store_bitmaps(bs, img, state)
            run_co(bs, _flush_and_mark_clean(img))
        except BaseException:
            abort(bs, state)
            raise
    return state


def _run(bs: Any, coro: Any, what: str) -> None:
    try:
        run_co(bs, coro)
    except OSError as exc:
        raise BlockError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}",
                         getattr(exc, "filename", None)) from exc  # fmt: skip


async def _locked(img: Qcow2Image, coro: Any) -> None:
    async with img.lock:
        await coro


async def _flush_and_mark_clean(img: Qcow2Image) -> None:
    async with img.lock:
        await img.mark_clean()
        await img.file.flush()


def _store_bitmaps(bs: Any, img: Qcow2Image, state: ReopenState) -> None:
    """Write the persistent bitmaps back and keep them, read-only (qcow2_reopen_bitmaps_ro)."""
    run_co(bs, bitmap.store(img, writable_bitmaps(bs)))
    for b in bs.dirty_bitmaps:
        if b.persistent and not b.readonly:
            b.readonly = True
            state.stored_bitmaps.append(b)


def commit(bs: Any, state: ReopenState) -> None:
    """Apply the prepared settings. Tier: GS. Does not fail."""
    img: Qcow2Image = bs.opaque.image
    r = state.runtime
    img.lazy_refcounts = r.lazy_refcounts
    img.discard_request = r.discard_request
    img.discard_other = r.discard_other
    img.discard_snapshot = r.discard_snapshot  # type: ignore[attr-defined]
    img.l2_cache.resize(r.l2_tables)  # prepare wrote back the dirty tables
    img.refcounts.cache.resize(r.refcount_tables)
    if state.to_read_only:
        img.read_only = True


def abort(bs: Any, state: ReopenState) -> None:
    """Undo prepare: the bitmaps it stored are the node's writable ones again. Tier: GS."""
    if not state.stored_bitmaps:
        return
    img: Qcow2Image = bs.opaque.image
    try:
        run_co(bs, bitmap.reopen_rw(img, state.stored_bitmaps, img.file.name))
    except OSError as exc:
        sys.stderr.write(f"{bs.node_name}: Failed to make dirty bitmaps writable: "
                         f"{exc.strerror or exc}\n")  # fmt: skip
    state.stored_bitmaps = []


def commit_post(bs: Any, state: ReopenState) -> None:
    """The node and its file are writable now: get the image ready for writing as open
    does, then make the bitmaps writable (qcow2_reopen_commit_post). Tier: GS.

    A failure is reported on stderr: an image that could not be repaired stays read-only
    for the engine (writes fail), bitmaps that could not be marked stay read-only.
    """
    if not state.to_read_write:
        return
    img: Qcow2Image = bs.opaque.image
    img.read_only = False
    try:
        if img.dirty and not state.flags & OpenFlags.CHECK:
            run_co(bs, repair_dirty(img))
        run_co(bs, clear_unknown_autoclear(img))
    except OSError as exc:
        img.read_only = True
        sys.stderr.write(f"{bs.node_name}: Could not repair dirty image: "
                         f"{exc.strerror or exc}\n")  # fmt: skip
        return
    if state.flags & (OpenFlags.INACTIVE | OpenFlags.NO_IO):
        return
    try:
        run_co(bs, bitmap.drop_stale_extension(img))
        run_co(bs, bitmap.reopen_rw(img, list(bs.dirty_bitmaps), bs.filename))
    except OSError as exc:
        sys.stderr.write(f"{bs.node_name}: Failed to make dirty bitmaps writable: "
                         f"{exc.strerror or exc}\n")  # fmt: skip

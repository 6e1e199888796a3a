"""BlockBackend: the user's handle on a node graph (QEMU's block-backend.c).

A backend is the root parent of a graph. It holds permissions on its root node, takes the
graph read lock for its users, refuses requests past the end (``EIO``), and queues new
requests while its root is drained, then runs them.

    with BlockBackend.open("disk.qcow2", flags=OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"hello")
        assert blk.pread(0, 5) == b"hello"
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any, final

from . import aio as aio_mod
from .aio import (
    AioContext,
    _rdlock_depth,
    _run_in_context,
    _waiters,
    aio_wait_kick,
    bdrv_graph_co_rdlock,
)
from .errors import BlockError, NoMediumError
from .graph import (
    BdrvChild,
    BlockDriverState,
    bdrv_open,
    bdrv_root_attach_child,
    bdrv_root_unref_child,
)
from .io import bdrv_co_flush, bdrv_co_preadv, bdrv_co_pwritev
from .resize import bdrv_co_truncate
from .special import BlockAIOCB
from .tiers import Tier, api, global_state_code, running
from .types import BdrvRequestFlags, ChildRole, OpenFlags, Perm, PreallocMode
from .zero import bdrv_co_pdiscard

__all__ = ["BlockBackend", "blk_co_new_open", "blk_co_unref"]

F = BdrvRequestFlags


@final
class BlockBackend:
    """A handle on a node graph. Create it with :meth:`open` (GS) or :meth:`attach` (GS)."""

    parent_is_bds = False

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.root: BdrvChild | None = None
        self.quiesce_counter = 0
        self.in_flight = 0
        self.ctx: AioContext | None = None
        self._queued: list[asyncio.Future[None]] = []
        #: Let writes pass the end of the image, growing it (QEMU's
        #: blk_set_allow_write_beyond_eof, for writers of new images); needs a backend
        #: opened with ``OpenFlags.RESIZE``.
        self.allow_write_beyond_eof = False

    # -- construction ---------------------------------------------------------------------

    @classmethod
    @api(Tier.GS)
    def open(
        cls,
        filename: str | None = None,
        options: dict[str, Any] | None = None,
        flags: OpenFlags = OpenFlags.NONE,
        *,
        name: str = "",
        force_share: bool = False,
    ) -> BlockBackend:
        """Open an image (``blk_new_open``): read-write with ``OpenFlags.RDWR``. Tier: GS.

        The backend asks for consistent read (and write when read-write) and shares every
        permission with other users, like qemu-io; ``force_share`` opens read-only images
        even while another process writes them (``-U``).
        """
        global_state_code("BlockBackend.open")
        opts = dict(options or {})
        if force_share:
            opts["force-share"] = True
        bs = bdrv_open(filename, opts, flags)
        try:
            return cls.attach(bs, name=name, flags=flags)
        finally:
            bs.refcnt -= 1  # the backend's edge holds the reference now

    @classmethod
    @api(Tier.GS)
    def attach(cls, bs: BlockDriverState, *, name: str = "",
               flags: OpenFlags | None = None) -> BlockBackend:  # fmt: skip
        """Make a backend over an open node (takes its own reference). Tier: GS."""
        global_state_code("BlockBackend.attach")
        flags = bs.open_flags if flags is None else flags
        perm = Perm.CONSISTENT_READ
        if flags & OpenFlags.RDWR and bs.open_flags & OpenFlags.RDWR:
            perm |= Perm.WRITE
        if flags & OpenFlags.RESIZE:
            perm |= Perm.RESIZE
        shared = Perm.ALL
        if flags & OpenFlags.NO_SHARE:
            shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        blk = cls(name)
        blk.ctx = bs.aio_context
        bs.refcnt += 1
        try:
            blk.root = bdrv_root_attach_child(bs, "root", ChildRole.IMAGE, perm, shared, blk)
        except BaseException:
            bs.refcnt -= 1
            raise
        return blk

    @api(Tier.GS)
    def reopen(self, read_only: bool, options: dict[str, Any] | None = None,
               flags: OpenFlags | None = None) -> None:  # fmt: skip
        """Reopen the image read-only or read-write, adjusting this backend's write
        permission (qemu-io ``reopen -r``/``-w``), with new runtime ``options`` and open
        ``flags`` (default: the current ones) in the same transaction. Tier: GS."""
        global_state_code("BlockBackend.reopen")
        from .lifecycle import bdrv_reopen

        root = self.root
        if root is None:
            raise NoMediumError("backend has no medium", self.name)
        old = root.perm
        if read_only:
            root.perm &= ~(Perm.WRITE | Perm.RESIZE)
        try:
            new = root.bs.open_flags if flags is None else flags
            bdrv_reopen(root.bs, new & ~OpenFlags.RDWR if read_only else new | OpenFlags.RDWR,
                        options)  # fmt: skip
            if not read_only:
                root.perm |= Perm.WRITE
                from .graph import bdrv_refresh_perms

                bdrv_refresh_perms(root.bs)
        except BaseException:
            root.perm = old
            raise

    @api(Tier.GS)
    def close(self) -> None:
        """Detach from the graph; the nodes close when nothing else holds them. Tier: GS."""
        global_state_code("BlockBackend.close")
        if self.root is not None:
            root, self.root = self.root, None
            bdrv_root_unref_child(root)

    def __enter__(self) -> BlockBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bs(self) -> BlockDriverState:
        """The root node. Tier: I/O."""
        if self.root is None:
            raise NoMediumError("backend has no medium", self.name)
        return self.root.bs

    # -- parent callbacks (QEMU's child_root class) ---------------------------------------

    def parent_desc(self) -> str:
        return f"block device {self.name!r}" if self.name else "a block device"

    def parent_aio_context(self) -> AioContext:
        assert self.ctx is not None
        return self.ctx

    def set_aio_context(self, ctx: AioContext) -> None:
        self.ctx = ctx

    def parent_drained_begin(self) -> None:
        self.quiesce_counter += 1

    def parent_drained_end(self) -> None:
        self.quiesce_counter -= 1
        if self.quiesce_counter == 0 and self._queued:
            waiters, self._queued = self._queued, []
            for fut in waiters:
                fut.get_loop().call_soon_threadsafe(_resolve, fut)

    def parent_drained_poll(self) -> bool:
        return self.in_flight > 0

    def parent_resize(self) -> None:
        pass

    # -- requests ---------------------------------------------------------------------------

    async def _start(self, offset: int, length: int, check_eof: bool) -> BdrvChild:
        root = self.root
        if root is None:
            raise NoMediumError("backend has no medium", self.name)
        from .special import bdrv_co_is_inserted

        if root.bs.bl.has_variable_length or root.bs.total_bytes == 0:
            if not await bdrv_co_is_inserted(root.bs):
                raise NoMediumError("no medium found", root.bs.filename or root.bs.node_name)
            from .resize import bdrv_co_getlength

            await bdrv_co_getlength(root.bs)
        while self.quiesce_counter:
            # a queued request is not in flight: drain must not wait for it (QEMU's
            # blk_wait_while_drained)
            fut = asyncio.get_running_loop().create_future()
            self._queued.append(fut)
            self.in_flight -= 1
            if _waiters:
                aio_wait_kick()
            try:
                await fut
            finally:
                self.in_flight += 1
        if offset < 0 or length < 0:
            raise BlockError(errno.EIO, f"request offset {offset} length {length} out of range",
                             root.bs.filename or root.bs.node_name)  # fmt: skip
        if check_eof and offset + length > root.bs.total_bytes:
            raise BlockError(errno.EIO, f"request at {offset} of {length} bytes is beyond the "
                             f"end of the image ({root.bs.total_bytes} bytes)",
                             root.bs.filename or root.bs.node_name)  # fmt: skip
        return root

    def _inline_rdlock(self, root: BdrvChild) -> Any:
        """Take the graph read lock inline when no writer waits and we run on the node's
        loop (QEMU's reader count, no coroutine); returns the token for
        :meth:`_inline_rdunlock`, or None when the caller must take the full lock."""
        ctx = root.bs.aio_context
        if running.loop is not ctx.loop:
            return None  # (running.loop can only miss: the full lock then checks exactly)
        ctx.graph_readers += 1  # count first, then look for a writer, as __aenter__ does:
        if aio_mod._has_writer:  # a writer that came in between sees the count and waits
            ctx.graph_readers -= 1
            aio_wait_kick()
            return None
        return _rdlock_depth.set(1)

    @staticmethod
    def _inline_rdunlock(root: BdrvChild, token: Any) -> None:
        _rdlock_depth.reset(token)
        root.bs.aio_context.graph_readers -= 1
        if aio_mod._has_writer:
            aio_wait_kick()

    async def co_preadv(self, offset: int, length: int, buf: Any, flags: F = F.NONE) -> None:
        """Read into ``buf``. Tier: I/O (coroutine on the backend's context)."""
        self.in_flight += 1
        try:
            root = self.root
            if root is None or self.quiesce_counter or offset < 0 or length < 0 \
                    or offset + length > root.bs.total_bytes \
                    or root.bs.bl.has_variable_length:  # fmt: skip
                root = await self._start(offset, length, True)
            token = self._inline_rdlock(root)
            if token is None:
                async with bdrv_graph_co_rdlock():
                    await bdrv_co_preadv(root, offset, length, buf, flags)
                return
            try:
                await bdrv_co_preadv(root, offset, length, buf, flags)
            finally:
                self._inline_rdunlock(root, token)
        finally:
            self._end()

    async def co_pwritev(self, offset: int, length: int, buf: Any, flags: F = F.NONE) -> None:
        """Write from ``buf``. Tier: I/O."""
        self.in_flight += 1
        try:
            root = self.root
            if root is None or self.quiesce_counter or offset < 0 or length < 0 \
                    or offset + length > root.bs.total_bytes:  # fmt: skip
                root = await self._start(offset, length, not self.allow_write_beyond_eof)
            token = self._inline_rdlock(root)
            if token is None:
                async with bdrv_graph_co_rdlock():
                    await bdrv_co_pwritev(root, offset, length, buf, flags)
                return
            try:
                await bdrv_co_pwritev(root, offset, length, buf, flags)
            finally:
                self._inline_rdunlock(root, token)
        finally:
            self._end()

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: F = F.NONE) -> None:
        """Zero a range. Tier: I/O.

        Goes straight to ``bdrv_co_pwritev`` as QEMU 7.2's blk_co_pwrite_zeroes does, so
        ``MAY_UNMAP`` reaches the root node even without discard=unmap (only
        ``bdrv_co_pwrite_zeroes``, used between nodes, drops it there).
        """
        self.in_flight += 1
        try:
            root = await self._start(offset, length, True)
            async with bdrv_graph_co_rdlock():
                await bdrv_co_pwritev(root, offset, length, None, flags | F.ZERO_WRITE)
        finally:
            self._end()

    async def co_pdiscard(self, offset: int, length: int) -> None:
        """Discard a range. Tier: I/O."""
        self.in_flight += 1
        try:
            root = await self._start(offset, length, True)
            async with bdrv_graph_co_rdlock():
                await bdrv_co_pdiscard(root, offset, length)
        finally:
            self._end()

    async def co_flush(self) -> None:
        """Flush. Tier: I/O."""
        self.in_flight += 1
        try:
            root = await self._start(0, 0, False)
            async with bdrv_graph_co_rdlock():
                await bdrv_co_flush(root.bs)
        finally:
            self._end()

    async def co_truncate(self, offset: int, exact: bool = True,
                          prealloc: PreallocMode = PreallocMode.OFF, flags: F = F.NONE
                          ) -> None:  # fmt: skip
        """Resize the image. Tier: I/O."""
        self.in_flight += 1
        try:
            try:
                root = await self._start(0, 0, False)
            except NoMediumError as exc:  # blk_co_truncate's own wording
                raise NoMediumError("no medium inserted", exc.filename) from None
            async with bdrv_graph_co_rdlock():
                await bdrv_co_truncate(root, offset, exact, prealloc, flags)
        finally:
            self._end()

    def _end(self) -> None:
        self.in_flight -= 1
        if _waiters:
            aio_wait_kick()

    def aio_preadv(self, offset: int, buf: Any, cb: Any = None) -> BlockAIOCB:
        """Submit a read; ``cb(result)`` runs once when it ends. Tier: I/O (node's thread)."""
        return BlockAIOCB(self.bs, self.co_preadv(offset, len(buf), buf), cb)

    def aio_pwritev(self, offset: int, buf: Any, cb: Any = None, flags: F = F.NONE
                    ) -> BlockAIOCB:  # fmt: skip
        """Submit a write. Tier: I/O."""
        return BlockAIOCB(self.bs, self.co_pwritev(offset, len(buf), buf, flags), cb)

    # -- sync convenience (poll the backend's context) --------------------------------------

    def _run(self, coro: Any, name: str) -> Any:
        return _run_in_context(self.bs.aio_context, coro, name)

    def pread(self, offset: int, length: int, flags: F = F.NONE) -> bytes:
        """Read and return ``length`` bytes. Tier: I/O or GS (polls)."""
        buf = bytearray(length)
        self._run(self.co_preadv(offset, length, buf, flags), "blk_pread")
        return bytes(buf)

    def pread_into(self, offset: int, buf: Any, flags: F = F.NONE) -> None:
        """Read ``len(buf)`` bytes into ``buf``. Tier: I/O or GS."""
        self._run(self.co_preadv(offset, memoryview(buf).nbytes, buf, flags), "blk_pread")

    def pwrite(self, offset: int, data: Any, flags: F = F.NONE) -> None:
        """Write ``data``. Tier: I/O or GS."""
        self._run(self.co_pwritev(offset, memoryview(data).nbytes, data, flags), "blk_pwrite")

    def pwrite_zeroes(self, offset: int, length: int, flags: F = F.NONE) -> None:
        """Zero a range. Tier: I/O or GS."""
        self._run(self.co_pwrite_zeroes(offset, length, flags), "blk_pwrite_zeroes")

    def pdiscard(self, offset: int, length: int) -> None:
        """Discard a range. Tier: I/O or GS."""
        self._run(self.co_pdiscard(offset, length), "blk_pdiscard")

    def flush(self) -> None:
        """Flush. Tier: I/O or GS."""
        self._run(self.co_flush(), "blk_flush")

    def truncate(self, offset: int, exact: bool = True,
                 prealloc: PreallocMode = PreallocMode.OFF) -> None:  # fmt: skip
        """Resize, taking the resize permission for the call if needed. Tier: GS."""
        global_state_code("BlockBackend.truncate")
        root = self.root
        if root is not None and not root.perm & Perm.RESIZE:
            from .graph import bdrv_refresh_perms

            root.perm |= Perm.RESIZE
            try:
                bdrv_refresh_perms(root.bs)
            except BaseException:
                root.perm &= ~Perm.RESIZE
                raise
        self._run(self.co_truncate(offset, exact, prealloc), "blk_truncate")

    def getlength(self) -> int:
        """Length in bytes (asked again for devices whose length varies). Tier: I/O."""
        bs = self.bs
        if bs.bl.has_variable_length:
            from .resize import bdrv_getlength

            return int(bdrv_getlength(bs))
        return bs.total_bytes


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@api(Tier.IO)
async def blk_co_new_open(filename: str | None, options: dict[str, Any] | None = None,
                          flags: OpenFlags = OpenFlags.NONE) -> BlockBackend:  # fmt: skip
    """Open a BlockBackend from a coroutine (``bdrv_co_create_opts`` writing a new image):
    the open runs in the main thread through :func:`blockcore.aio.run_in_main_loop`.
    Close it with ``await blk_co_unref(blk)``. Tier: I/O."""
    from .aio import run_in_main_loop

    return await run_in_main_loop(BlockBackend.open, filename, options, flags)


@api(Tier.IO)
async def blk_co_unref(blk: BlockBackend) -> None:
    """Close a backend from a coroutine (in the main thread). Tier: I/O."""
    from .aio import run_in_main_loop

    await run_in_main_loop(blk.close)

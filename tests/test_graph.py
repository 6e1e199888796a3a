"""Node graph: open options, children, permissions, backing chains, contexts, close."""

from __future__ import annotations

import errno

import pytest

import blockcore
from blockcore import BlockBackend, BlockError, OpenFlags, Perm, PermissionConflictError
from blockcore.drain import bdrv_drained_begin, bdrv_drained_end
from blockcore.graph import (
    _all_nodes,
    bdrv_default_perms,
    bdrv_find_node,
    bdrv_root_attach_child,
    bdrv_try_change_aio_context,
)
from blockcore.types import ChildRole


def test_open_by_options_and_node_name(memdrv) -> None:
    drv = memdrv()
    bs = blockcore.bdrv_open(None, {"driver": drv.name, "size": "64K", "node-name": "disk0"},
                             OpenFlags.RDWR)  # fmt: skip
    assert bdrv_find_node("disk0") is bs
    assert bs.total_bytes == 65536
    blockcore.bdrv_unref(bs)
    assert bdrv_find_node("disk0") is None
    assert bs.drv is None


def test_json_filename_and_flat_keys(memdrv) -> None:
    drv = memdrv()
    bs = blockcore.bdrv_open(f'json:{{"driver": "{drv.name}", "size": 1024, "read-only": true}}')
    assert bs.total_bytes == 1024
    assert not bs.open_flags & OpenFlags.RDWR
    blockcore.bdrv_unref(bs)


def test_unknown_option_is_refused_with_its_name(memdrv) -> None:
    drv = memdrv()
    with pytest.raises(BlockError, match="does not support the option 'sizee'") as info:
        blockcore.bdrv_open(None, {"driver": drv.name, "sizee": 1})
    assert info.value.errno == errno.EINVAL
    assert not [n for n in _all_nodes.values() if n.drv and n.drv.name == drv.name]


def test_duplicate_node_name_refused(memdrv) -> None:
    drv = memdrv()
    bs = blockcore.bdrv_open(None, {"driver": drv.name, "node-name": "dup"})
    with pytest.raises(BlockError, match="duplicate node name 'dup'"):
        blockcore.bdrv_open(None, {"driver": drv.name, "node-name": "dup"})
    blockcore.bdrv_unref(bs)


def test_default_perms_follow_qemu_rules(memdrv) -> None:
    drv = memdrv()
    bs = blockcore.bdrv_open(None, {"driver": drv.name}, OpenFlags.RDWR)
    # a storage child of a writable format holds write+resize and shares neither
    perm, shared = bdrv_default_perms(bs, None, ChildRole.IMAGE, Perm.CONSISTENT_READ, Perm.ALL)
    assert perm == Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    assert not shared & (Perm.WRITE | Perm.RESIZE)
    # a backing child is only read
    perm, shared = bdrv_default_perms(bs, None, ChildRole.COW, Perm.ALL, Perm.ALL)
    assert perm == Perm.CONSISTENT_READ
    # a filter passes through
    perm, shared = bdrv_default_perms(bs, None, ChildRole.FILTERED | ChildRole.PRIMARY,
                                      Perm.WRITE, Perm.CONSISTENT_READ)  # fmt: skip
    assert perm == Perm.WRITE and shared == Perm.CONSISTENT_READ
    blockcore.bdrv_unref(bs)


class _User:
    parent_is_bds = False

    def __init__(self, bs):
        self.bs = bs

    def parent_desc(self):
        return "test user"

    def parent_aio_context(self):
        return self.bs.aio_context

    def parent_drained_begin(self):
        pass

    def parent_drained_end(self):
        pass

    def parent_drained_poll(self):
        return False

    def parent_resize(self):
        pass


def test_permission_conflict_refused_and_nothing_attached(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 512}, OpenFlags.RDWR) as blk:
        bs = blk.bs
        parents_before = list(bs.parents)
        with pytest.raises(PermissionConflictError, match="does not allow 'write'") as info:
            bdrv_root_attach_child(bs, "other", ChildRole.IMAGE, Perm.CONSISTENT_READ,
                                   Perm.CONSISTENT_READ, _User(bs))  # fmt: skip
        assert info.value.errno == errno.EPERM
        assert bs.parents == parents_before


def test_read_only_node_refuses_writes(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}) as blk:
        with pytest.raises(BlockError) as info:
            blk.pwrite(0, b"x")
        assert info.value.errno == errno.EPERM
        assert "read-only" in str(info.value)


def test_backend_refuses_requests_past_end(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        with pytest.raises(BlockError) as info:
            blk.pread(4000, 100)
        assert info.value.errno == errno.EIO


def test_iothread_context_move_and_io(memdrv) -> None:
    drv = memdrv(request_alignment=512)
    with blockcore.IOThread("io-test") as ctx:
        blk = BlockBackend.open(None, {"driver": drv.name, "size": 1 << 20}, OpenFlags.RDWR)
        bdrv_try_change_aio_context(blk.bs, ctx)
        assert blk.bs.aio_context is ctx
        blk.pwrite(100, b"abc")  # sync call from main thread polls the iothread
        assert blk.pread(99, 5) == b"\0abc\0"
        bdrv_drained_begin(blk.bs)
        bdrv_drained_end(blk.bs)
        bdrv_try_change_aio_context(blk.bs, blockcore.main_context())
        blk.close()


def test_length_rounded_up_to_sector(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 1000}, OpenFlags.RDWR) as blk:
        assert blk.getlength() == 1024
        assert blk.pread(990, 34) == bytes(34)


def test_sync_wrapper_from_foreign_thread_refused_not_hung(memdrv) -> None:
    import threading

    from blockcore import DeadlockError

    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        caught: list[BaseException] = []

        def worker() -> None:
            try:
                blk.pread(0, 512)
            except BaseException as exc:  # noqa: BLE001
                caught.append(exc)

        t = threading.Thread(target=worker, name="stranger")
        t.start()
        t.join(10)
        assert not t.is_alive()
        assert isinstance(caught[0], DeadlockError)
        assert "stranger" in str(caught[0])


def test_graph_write_lock_waits_for_readers(memdrv) -> None:
    import asyncio
    import threading

    from blockcore.aio import bdrv_graph_co_rdlock, bdrv_graph_wrlock, bdrv_graph_wrunlock

    with blockcore.IOThread("rdlock-holder") as ctx:
        released = threading.Event()
        order: list[str] = []

        async def reader() -> None:
            async with bdrv_graph_co_rdlock():
                order.append("reader in")
                await asyncio.sleep(0.2)
                order.append("reader out")
                released.set()

        fut = asyncio.run_coroutine_threadsafe(reader(), ctx.loop)
        while not order:
            pass
        bdrv_graph_wrlock()
        order.append("writer in")
        bdrv_graph_wrunlock()
        fut.result(5)
        assert order == ["reader in", "reader out", "writer in"]


def test_coroutine_hands_global_state_work_to_main_thread(memdrv) -> None:
    from blockcore.aio import run_in_main_loop
    from blockcore.backend import blk_co_new_open, blk_co_unref

    drv = memdrv()

    async def create_and_write() -> bytes:
        blk = await blk_co_new_open(None, {"driver": drv.name, "size": 4096, "filename": "k"},
                                    OpenFlags.RDWR)  # fmt: skip
        await blk.co_pwritev(10, 3, b"abc")
        await blk_co_unref(blk)
        node = await run_in_main_loop(bdrv_find_node, "nosuch")
        return b"none" if node is None else b"some"

    assert blockcore.run(create_and_write()) == b"none"
    assert drv.images["k"][10:13] == b"abc"


def test_gs_call_from_coroutine_error_reaches_the_coroutine(memdrv) -> None:
    from blockcore.aio import run_in_main_loop

    async def bad() -> None:
        await run_in_main_loop(blockcore.bdrv_open, None, {"driver": "no-such-driver"})

    with pytest.raises(blockcore.DriverNotFoundError, match="no-such-driver"):
        blockcore.run(bad())


def test_run_co_runs_driver_coroutine_with_rdlock(memdrv) -> None:
    from blockcore.aio import run_co
    from blockcore.io import bdrv_co_pread

    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"xyz")
        buf = bytearray(3)
        run_co(blk.bs, bdrv_co_pread(blk.root, 0, 3, buf))
        assert buf == b"xyz"


def test_reopen_read_only_and_back(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"a")
        blk.reopen(read_only=True)
        assert not blk.bs.open_flags & OpenFlags.RDWR
        with pytest.raises(BlockError) as info:
            blk.pwrite(0, b"b")
        assert info.value.errno == errno.EPERM
        blk.reopen(read_only=False)
        blk.pwrite(0, b"c")
        assert blk.pread(0, 1) == b"c"


def test_reopen_read_only_refused_while_a_writer_holds_the_node(memdrv) -> None:
    from blockcore.graph import bdrv_reopen_set_read_only

    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        with pytest.raises(PermissionConflictError, match="block node is read-only"):
            bdrv_reopen_set_read_only(blk.bs, True)
        assert blk.bs.open_flags & OpenFlags.RDWR  # nothing changed
        blk.pwrite(0, b"still writable")


def test_reopen_refuses_options_the_driver_cannot_change(memdrv) -> None:
    from blockcore.graph import bdrv_reopen

    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        with pytest.raises(BlockError, match="Cannot change the option 'size'"):
            bdrv_reopen(blk.bs, blk.bs.open_flags, {"size": 8192})
        assert blk.bs.options["size"] == 4096


def test_reopen_keeps_options_not_given_and_accepts_unchanged_ones(memdrv) -> None:
    """As QEMU's reopen queue: the node's options are merged under the new ones, so an
    option given again with its current value is no change."""
    from blockcore.graph import bdrv_reopen

    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"size": 4096})
        assert blk.bs.options["size"] == 4096
        blk.pwrite(0, b"still open")
        assert blk.pread(0, 10) == b"still open"


def test_debug_breakpoint_without_blkdebug_is_not_supported(memdrv) -> None:
    from blockcore.manage import bdrv_debug_breakpoint, bdrv_debug_is_suspended

    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096}, OpenFlags.RDWR) as blk:
        with pytest.raises(blockcore.NotSupportedError, match="debug breakpoints"):
            bdrv_debug_breakpoint(blk.bs, "write_aio", "A")
        assert bdrv_debug_is_suspended(blk.bs, "A") is False


def test_serialising_write_waits_for_untracked_reads_in_flight() -> None:
    """Plain aligned reads run untracked; an unaligned (read-modify-write) write arriving
    while one is in the driver must wait for it before touching the driver."""
    import asyncio

    from blockcore import hookimpl
    from blockcore.testing import MemoryDriver

    events: list[str] = []

    class Slow(MemoryDriver):
        @hookimpl
        async def bdrv_co_preadv(self, bs, offset, length, buf, flags):  # noqa: ANN001
            events.append(f"read {offset} start")
            await asyncio.sleep(0.05 if offset == 0 else 0)
            await super().bdrv_co_preadv(bs, offset, length, buf, flags)
            events.append(f"read {offset} end")

        @hookimpl
        async def bdrv_co_pwritev(self, bs, offset, length, buf, flags):  # noqa: ANN001
            events.append(f"write {offset}")
            await super().bdrv_co_pwritev(bs, offset, length, buf, flags)

    drv = Slow("slowmem", request_alignment=512).register()
    try:
        with BlockBackend.open(None, {"driver": "slowmem", "size": 65536}, OpenFlags.RDWR) as blk:
            async def race() -> None:
                buf = bytearray(4096)
                reader = asyncio.ensure_future(blk.co_preadv(0, 4096, buf))
                await asyncio.sleep(0.01)  # the read is in the driver, untracked
                assert blk.bs.untracked_in_flight == 1
                await blk.co_pwritev(100, 10, b"x" * 10)  # unaligned: serialising
                await reader

            blockcore.run(race())
            # the write's read-modify-write read starts only after the untracked read ended
            assert events[:3] == ["read 0 start", "read 0 end", "read 0 start"]
            assert events[-1] == "write 0"
            assert blk.bs.untracked_in_flight == 0 and not blk.bs.tracked_requests
    finally:
        drv.unregister()


class _NoReopen:
    """A protocol driver without reopen hooks (it would hold its storage open)."""

    @blockcore.hookimpl
    def bdrv_describe(self):  # noqa: ANN201
        return blockcore.DriverDescriptor(format_name="noreopen", protocol_name="noreopen")

    @blockcore.hookimpl
    async def bdrv_co_getlength(self, bs):  # noqa: ANN001, ANN201
        return 4096

    @blockcore.hookimpl
    async def bdrv_co_preadv(self, bs, offset, length, buf, flags):  # noqa: ANN001, ANN201
        buf[:] = bytes(length)


def test_protocol_without_reopen_hooks_refuses_reopen() -> None:
    blockcore.register_driver(_NoReopen())
    try:
        with BlockBackend.open(None, {"driver": "noreopen"}) as blk:
            with pytest.raises(BlockError, match="does not support reopening files") as info:
                blk.reopen(read_only=False)
            assert info.value.errno == errno.ENOTSUP
            assert not blk.bs.open_flags & OpenFlags.RDWR
            assert blk.pread(0, 4) == bytes(4)
    finally:
        blockcore.unregister_driver("noreopen")


def test_allow_write_beyond_eof(memdrv) -> None:
    drv = memdrv()
    with BlockBackend.open(None, {"driver": drv.name, "size": 4096},
                           OpenFlags.RDWR | OpenFlags.RESIZE) as blk:  # fmt: skip
        with pytest.raises(BlockError):
            blk.pwrite(4096, b"more")
        blk.allow_write_beyond_eof = True
        blk.pwrite(4096, b"more")
        assert blk.getlength() == 4608 and blk.pread(4096, 4) == b"more"


def test_copy_on_read_open_flag(memdrv) -> None:
    """OpenFlags.COPY_ON_READ turns copy-on-read on for the opened node, as QEMU's
    bdrv_open_common; a read-only node refuses it and leaves no node behind."""
    import errno

    drv = memdrv()
    bs = blockcore.bdrv_open(None, {"driver": drv.name, "size": "64K", "node-name": "cor0"},
                             OpenFlags.RDWR | OpenFlags.COPY_ON_READ)  # fmt: skip
    assert bs.copy_on_read == 1
    blockcore.bdrv_unref(bs)
    with pytest.raises(blockcore.BlockError) as info:
        blockcore.bdrv_open(None, {"driver": drv.name, "size": "64K", "node-name": "cor1"},
                            OpenFlags.COPY_ON_READ)  # fmt: skip
    assert info.value.errno == errno.EINVAL
    assert "Can't use copy-on-read on read-only device" in str(info.value)
    assert bdrv_find_node("cor1") is None

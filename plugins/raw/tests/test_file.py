"""Tests of the ``file`` protocol driver on real files (regular filesystem and tmpfs)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from raw_helpers import MiB, locked_bytes, make_image, qemu_img, qemu_io

from blockcore import (
    BlockBackend,
    BlockError,
    NotSupportedError,
    OpenFlags,
    PermissionConflictError,
    PreallocMode,
    bdrv_create,
    run,
)
from blockcore.aio import bdrv_graph_co_rdlock
from blockcore.info import bdrv_get_allocated_file_size, bdrv_get_info, bdrv_has_zero_init
from blockcore.special import bdrv_co_copy_range
from blockcore.status import bdrv_block_status
from blockcore.testing import check_driver
from blockcore.types import BdrvRequestFlags, BlockStatusFlags

F = BdrvRequestFlags
S = BlockStatusFlags
RW = OpenFlags.RDWR
RWR = OpenFlags.RDWR | OpenFlags.RESIZE


def open_file(path: Path | str, flags: OpenFlags = RW, **opts: object) -> BlockBackend:
    return BlockBackend.open(str(path), {"driver": "file", **opts}, flags)


# -------------------------------------------------------------------------------------------
# Conformance and basic I/O
# -------------------------------------------------------------------------------------------


def test_conformance_kit(fsdir: Path) -> None:
    path = make_image(fsdir / "k.img", 2 * MiB, {0: os.urandom(MiB)})
    check_driver(lambda: open_file(path, RW, discard="unmap"), rounds=150)


def test_conformance_kit_direct(ext4_4k: Path) -> None:
    path = make_image(ext4_4k / "k.img", 2 * MiB, {4096: os.urandom(MiB)})
    check_driver(lambda: open_file(path, RW, cache={"direct": True}, discard="unmap"), rounds=80)


def test_data_interoperates_with_qemu(fsdir: Path, qemu: None) -> None:
    path = make_image(fsdir / "i.img", MiB)
    with open_file(path) as blk:
        blk.pwrite(4096, b"\x5a" * 8192)
        blk.flush()
    res = qemu_io("-f", "raw", "-c", "read -P 0x5a 4096 8192", "-c", "read -P 0 0 4096",
                  str(path))  # fmt: skip
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout
    assert qemu_io("-f", "raw", "-c", "write -P 0x33 65536 512", str(path)).returncode == 0
    with open_file(path, OpenFlags.NONE) as blk:
        assert blk.pread(65536, 512) == b"\x33" * 512


def test_unaligned_file_length(fsdir: Path) -> None:
    path = make_image(fsdir / "u.img", 1000, {0: b"u" * 1000})
    with open_file(path) as blk:
        assert blk.getlength() == 1024  # whole sectors, as QEMU reports
        assert blk.pread(990, 34) == b"u" * 10 + bytes(24)
        st = bdrv_block_status(blk.bs, 0, 1024)
        assert st.ret & S.DATA and st.pnum == 1000
        st = bdrv_block_status(blk.bs, 1000, 24)
        assert st.ret & S.ZERO and st.pnum == 24


# -------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        open_file(tmp_path / "nope.img")
    assert info.value.filename == str(tmp_path / "nope.img")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:  # read-write: the kernel refuses
        open_file(tmp_path)
    assert info.value.errno == errno.EISDIR and info.value.filename == str(tmp_path)
    with pytest.raises(BlockError, match="is a directory") as info:  # read-only: we refuse
        open_file(tmp_path, OpenFlags.NONE)
    assert info.value.errno == errno.EISDIR


def test_not_a_regular_file() -> None:
    with pytest.raises(BlockError, match="requires '/dev/null' to be a regular file"):
        open_file("/dev/null", OpenFlags.NONE)


def _immutable(path: Path) -> bool:
    res = subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True)
    return res.returncode == 0


def test_no_permission_and_auto_read_only(tmp_path: Path) -> None:
    path = make_image(tmp_path / "ro.img", MiB, {0: b"r" * 512})
    if os.geteuid() == 0:  # root passes mode bits: make the file immutable instead
        if not _immutable(path):
            pytest.skip("cannot make a file immutable here")
    else:
        path.chmod(stat.S_IRUSR)
    try:
        with pytest.raises(PermissionError) as info:
            open_file(path)
        assert info.value.filename == str(path)
        with open_file(path, RW | OpenFlags.AUTO_RDONLY) as blk:
            assert not blk.bs.open_flags & OpenFlags.RDWR
            assert blk.pread(0, 512) == b"r" * 512
            with pytest.raises(BlockError) as w:
                blk.pwrite(0, b"x")
            assert w.value.errno in (errno.EPERM, errno.EACCES)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)


def test_read_only_filesystem(scratch_mount) -> None:
    point = scratch_mount()
    make_image(point / "f.img", MiB)
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    with pytest.raises(OSError) as info:
        open_file(point / "f.img")
    assert info.value.errno == errno.EROFS and info.value.filename == str(point / "f.img")
    with open_file(point / "f.img", RW | OpenFlags.AUTO_RDONLY) as blk:
        assert blk.pread(0, 16) == bytes(16)


def test_enospc_is_reported_and_names_the_file(scratch_mount) -> None:
    point = scratch_mount(size="256k")
    path = make_image(point / "full.img", 4 * MiB)  # sparse: larger than the filesystem
    with open_file(path) as blk:
        blk.pwrite(0, b"a" * 65536)
        with pytest.raises(OSError) as info:
            blk.pwrite(MiB, os.urandom(MiB))
        assert info.value.errno == errno.ENOSPC
        assert str(path) in str(info.value)
        assert blk.pread(0, 65536) == b"a" * 65536  # earlier data intact


def test_lock_held_by_qemu_io(tmp_path: Path, qemu: None) -> None:
    # qemu-io on a qcow2 image refuses to share "write" (byte 201)
    path = tmp_path / "held.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(path), "1M").returncode == 0
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        import time

        deadline = time.monotonic() + 10
        while 201 not in locked_bytes(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(PermissionConflictError) as info:
            open_file(path)
        assert info.value.strerror == 'Failed to get "write" lock'
        assert info.value.filename == str(path)
        assert info.value.hint == f"Is another process using the image [{path}]?"
        with open_file(path, OpenFlags.NONE) as blk:  # reading, sharing everything: fine
            assert blk.pread(0, 4) == b"QFI\xfb"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def test_locks_match_qemu_and_block_qemu_io(tmp_path: Path, qemu: None) -> None:
    path = make_image(tmp_path / "l.img", MiB)
    with open_file(path):
        assert locked_bytes(path) == [100, 101]  # the same bytes `qemu-io -f raw` holds
        assert qemu_io("-f", "raw", "-c", "read 0 512", str(path)).returncode == 0
    with open_file(path, OpenFlags.NONE):
        assert locked_bytes(path) == [100]
    blk = open_file(path, RW | OpenFlags.NO_SHARE)
    try:
        res = qemu_io("-f", "raw", "-c", "read 0 512", str(path))
        assert res.returncode != 0
        assert 'Failed to get "write" lock' in res.stderr
        assert f"Is another process using the image [{path}]?" in res.stderr
        assert qemu_io("-r", "-f", "raw", "-c", "read 0 512", str(path)).returncode == 0
    finally:
        blk.close()
    assert locked_bytes(path) == []
    with open_file(path, RW | OpenFlags.NO_SHARE, locking="off"):
        assert locked_bytes(path) == []


def test_option_errors(tmp_path: Path) -> None:
    path = make_image(tmp_path / "o.img", MiB)
    with pytest.raises(BlockError, match="aio=native was specified, but it requires"):
        open_file(path, aio="native")
    with pytest.raises(BlockError, match="invalid parameter value: uring"):
        open_file(path, aio="uring")
    with pytest.raises(BlockError, match="invalid locking value 'maybe'"):
        open_file(path, locking="maybe")
    for aio in ("io_uring", "threads"):  # io_uring is accepted and runs on the same engine
        with open_file(path, RW, aio=aio) as blk:
            blk.pwrite(4096, b"u" * 512)
            assert blk.pread(4096, 512) == b"u" * 512
    with pytest.raises(BlockError, match="does not support the option 'sizee'"):
        open_file(path, sizee=1)
    with open_file(path, aio="threads", locking="on", **{"aio-max-batch": 4}) as blk:
        assert blk.getlength() == MiB


# -------------------------------------------------------------------------------------------
# Zero writes, discard, block status
# -------------------------------------------------------------------------------------------


def test_zero_write_without_buffers(fsdir: Path) -> None:
    path = make_image(fsdir / "z.img", MiB, {0: b"d" * MiB})
    with open_file(path) as blk:
        # NO_FALLBACK succeeds: fallocate does it (zero range on ext4, punch+allocate on tmpfs)
        blk.pwrite_zeroes(65536, 131072, F.NO_FALLBACK)
        assert blk.pread(65536, 131072) == bytes(131072)
        assert blk.pread(0, 65536) == b"d" * 65536
        assert blk.pread(196608, 4096) == b"d" * 4096
        # the range stays allocated without MAY_UNMAP
        assert bdrv_get_allocated_file_size(blk.bs) >= MiB


def test_zero_write_may_unmap_punches(fsdir: Path) -> None:
    path = make_image(fsdir / "zu.img", MiB, {0: b"d" * MiB})
    with open_file(path, discard="unmap") as blk:
        before = bdrv_get_allocated_file_size(blk.bs)
        blk.pwrite_zeroes(0, 262144, F.MAY_UNMAP)
        assert blk.pread(0, 262144) == bytes(262144)
        assert bdrv_get_allocated_file_size(blk.bs) <= before - 262144
        st = bdrv_block_status(blk.bs, 0, MiB)
        assert st.ret & S.ZERO and st.pnum == 262144


def test_zero_write_falls_back_to_buffers_without_fallocate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A filesystem refusing every fallocate mode (some FUSE and NFSv3 mounts; simulated at
    the libc call, as no filesystem here does): the driver says ENOTSUP and the core writes
    zero buffers; NO_FALLBACK requests then fail with ENOTSUP instead."""
    from blockcore import posix

    class NoFallocate:
        def __init__(self) -> None:
            self.calls = 0

        def fallocate(self, *_args: object) -> int:
            self.calls += 1
            ctypes.set_errno(errno.EOPNOTSUPP)
            return -1

        def __getattr__(self, name: str) -> object:
            return getattr(real_libc, name)

    real_libc = posix._libc
    libc = NoFallocate()
    monkeypatch.setattr(posix, "_libc", libc)
    path = make_image(tmp_path / "nf.img", MiB, {0: b"d" * MiB})
    with open_file(path, discard="unmap") as blk:
        blk.pwrite_zeroes(65536, 131072, F.MAY_UNMAP)
        assert blk.pread(0, 65536 + 131072 + 4096) == b"d" * 65536 + bytes(131072) + b"d" * 4096
        assert Path(path).read_bytes()[65536:196608] == bytes(131072)  # on disk too
        tried = libc.calls
        assert tried >= 1
        blk.pwrite_zeroes(MiB - 4096, 4096)  # the driver remembers: no more fallocate calls
        assert libc.calls == tried and blk.pread(MiB - 4096, 4096) == bytes(4096)
        with pytest.raises(NotSupportedError):
            blk.pwrite_zeroes(0, 4096, F.NO_FALLBACK)
        assert blk.pread(0, 4096) == b"d" * 4096
        assert os.path.getsize(path) == MiB


def _on_root(blk: BlockBackend, coro_fn, *args: object) -> None:
    """Run an I/O function on the backend's root edge (below the backend's EOF check)."""

    async def go() -> None:
        async with bdrv_graph_co_rdlock():
            await coro_fn(blk.root, *args)

    run(go())


def test_zero_write_past_end_grows_file(fsdir: Path) -> None:
    from blockcore.io import bdrv_co_pwrite_zeroes

    path = make_image(fsdir / "zg.img", MiB, {0: b"d" * 4096})
    with open_file(path, RWR) as blk:
        _on_root(blk, bdrv_co_pwrite_zeroes, MiB - 4096, 12288, F.NO_FALLBACK)
        assert os.path.getsize(path) == MiB + 8192
        assert blk.getlength() == MiB + 8192
        assert blk.pread(MiB - 4096, 12288) == bytes(12288)


def test_discard(fsdir: Path) -> None:
    path = make_image(fsdir / "d.img", MiB, {0: b"d" * MiB})
    with open_file(path) as blk:  # discard=ignore (the default): a no-op
        blk.pdiscard(0, 65536)
        assert blk.pread(0, 4) == b"dddd"
    with open_file(path, discard="unmap") as blk:
        blk.pdiscard(0, 65536)
        assert blk.pread(0, 65536) == bytes(65536)
        st = bdrv_block_status(blk.bs, 0, MiB)
        assert st.ret == S.ZERO | S.OFFSET_VALID | S.ALLOCATED and st.pnum == 65536


def test_block_status_sparse(fsdir: Path, qemu: None) -> None:
    path = make_image(fsdir / "s.img", 4 * MiB, {MiB: b"x" * 65536, 3 * MiB: b"y" * 4096})
    with open_file(path, OpenFlags.NONE) as blk:
        ours = []
        off = 0
        while off < 4 * MiB:
            st = bdrv_block_status(blk.bs, off, 4 * MiB - off)
            assert st.ret & S.OFFSET_VALID and st.map == off and st.file is blk.bs
            ours.append((off, st.pnum, bool(st.ret & S.DATA), bool(st.ret & S.ZERO)))
            off += st.pnum
    res = qemu_img("map", "--output=json", "-f", "raw", str(path))
    theirs = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(res.stdout)]
    assert ours == theirs


def test_block_status_without_want_zero(tmp_path: Path) -> None:
    from blockcore.status import bdrv_co_block_status

    path = make_image(tmp_path / "w.img", MiB)
    with open_file(path, OpenFlags.NONE) as blk:

        async def go() -> object:
            async with bdrv_graph_co_rdlock():
                return await bdrv_co_block_status(blk.bs, False, 0, MiB)

        st = run(go())  # want_zero=False: no lseek, everything data
        assert st.ret & S.DATA and st.pnum == MiB  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------
# Truncate, flush, sizes, info
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [PreallocMode.OFF, PreallocMode.FALLOC, PreallocMode.FULL])
def test_truncate_grow(fsdir: Path, mode: PreallocMode) -> None:
    path = make_image(fsdir / "t.img", MiB, {0: b"t" * 512})
    with open_file(path, RWR) as blk:
        blk.truncate(3 * MiB, True, mode)
        assert blk.getlength() == 3 * MiB
        assert blk.pread(MiB, 4096) == bytes(4096)
        allocated = bdrv_get_allocated_file_size(blk.bs)
        if mode is PreallocMode.OFF:
            assert allocated < MiB
        else:
            assert allocated >= 2 * MiB
        blk.truncate(4096)  # shrink
        assert os.path.getsize(path) == 4096
        assert blk.pread(0, 512) == b"t" * 512


def test_truncate_refusals(tmp_path: Path) -> None:
    path = make_image(tmp_path / "t.img", MiB)
    with open_file(path, RWR) as blk:
        with pytest.raises(NotSupportedError, match="unsupported preallocation mode: metadata"):
            blk.truncate(2 * MiB, True, PreallocMode.METADATA)
        with pytest.raises(NotSupportedError, match="preallocation for shrinking"):
            blk.truncate(4096, True, PreallocMode.FULL)
        assert os.path.getsize(path) == MiB


def test_flush_and_no_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    path = make_image(tmp_path / "f.img", MiB)
    with open_file(path) as blk:
        blk.pwrite(0, b"x" * 512)
        blk.flush()
        assert len(calls) == 1
        blk.flush()  # nothing written since: no fdatasync
        assert len(calls) == 1
    with open_file(path, cache={"no-flush": True}) as blk:
        blk.pwrite(0, b"y" * 512)
        blk.flush()
    assert len(calls) == 1


def test_info_and_sizes(tmp_path: Path) -> None:
    path = make_image(tmp_path / "s.img", 4 * MiB, {0: b"s" * 65536})
    with open_file(path, OpenFlags.NONE) as blk:
        assert bdrv_get_allocated_file_size(blk.bs) == os.stat(path).st_blocks * 512
        bdi = bdrv_get_info(blk.bs)
        assert bdi.cluster_size == 0 and not bdi.is_dirty
        assert bdrv_has_zero_init(blk.bs)


# -------------------------------------------------------------------------------------------
# Create, delete, copy offload, O_DIRECT
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create(fsdir: Path, prealloc: str, qemu: None) -> None:
    path = fsdir / "new.img"
    path.write_bytes(b"old contents")
    bdrv_create("file", str(path), {"size": 2 * MiB, "preallocation": prealloc})
    assert os.path.getsize(path) == 2 * MiB
    assert path.read_bytes() == bytes(2 * MiB)  # emptied first
    res = json.loads(qemu_img("info", "--output=json", "-f", "raw", str(path)).stdout)
    assert res["virtual-size"] == 2 * MiB
    if prealloc != "off":
        assert res["actual-size"] >= 2 * MiB


def test_create_refuses_metadata_and_respects_locks(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    with pytest.raises(NotSupportedError, match="unsupported preallocation mode: metadata"):
        bdrv_create("file", str(path), {"size": MiB, "preallocation": "metadata"})
    make_image(path, MiB, {0: b"keep"})
    with (
        open_file(path, RW | OpenFlags.NO_SHARE),  # we share neither write nor resize
        pytest.raises(PermissionConflictError, match='Failed to get "write" lock'),
    ):
        bdrv_create("file", str(path), {"size": MiB})
    assert path.read_bytes()[:4] == b"keep"


def test_delete_file(tmp_path: Path) -> None:
    from blockcore.special import bdrv_co_delete_file

    path = make_image(tmp_path / "del.img", MiB)
    with open_file(path) as blk:
        _on_root(blk, lambda child: bdrv_co_delete_file(child.bs))
    assert not path.exists()


def _copy(src: BlockBackend, dst: BlockBackend, so: int, do: int, n: int) -> None:
    async def go() -> None:
        async with bdrv_graph_co_rdlock():
            await bdrv_co_copy_range(src.root, so, dst.root, do, n)  # type: ignore[arg-type]

    run(go())


def test_copy_range_between_files(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    src_path = make_image(tmp_path / "src.img", 2 * MiB, {0: data})
    dst_path = make_image(tmp_path / "dst.img", 2 * MiB)
    with open_file(src_path, OpenFlags.NONE) as src, open_file(dst_path) as dst:
        _copy(src, dst, 0, 65536, MiB)
        assert dst.pread(65536, MiB) == data
    assert dst_path.read_bytes()[65536 : 65536 + MiB] == data


def test_copy_range_needs_posix_source(tmp_path: Path) -> None:
    from blockcore.testing import MemoryDriver

    mem = MemoryDriver("memcopy").register()
    try:
        src = BlockBackend.open(None, {"driver": "memcopy", "size": MiB}, RW)
        with (
            src,
            open_file(make_image(tmp_path / "d.img", MiB)) as dst,
            pytest.raises(NotSupportedError),
        ):
            _copy(src, dst, 0, 0, 65536)
    finally:
        mem.unregister()


def test_direct_io_on_4k_sectors(ext4_4k: Path, qemu: None) -> None:
    path = make_image(ext4_4k / "d.img", 4 * MiB)
    with open_file(path, RW, cache={"direct": True}) as blk:
        assert blk.bs.bl.request_alignment == 4096
        assert blk.bs.bl.min_mem_alignment in (512, 4096)
        blk.pwrite(100, b"unaligned")  # read-modify-write in the core
        blk.pwrite(8192, b"\x77" * 8192)
        assert blk.pread(98, 13) == b"\0\0unaligned\0\0"
        blk.flush()
    res = qemu_io("-f", "raw", "-t", "none", "-c", "read -P 0x77 8192 8192", str(path))
    assert res.returncode == 0 and "verification failed" not in res.stdout, res.stdout


def test_zero_write_enospc(scratch_mount) -> None:
    point = scratch_mount(size="64k")
    path = make_image(point / "x.img", MiB)
    with open_file(path) as blk, pytest.raises(OSError) as info:
        blk.pwrite_zeroes(0, MiB)  # fallocate cannot get the space either
    assert info.value.errno == errno.ENOSPC


# -------------------------------------------------------------------------------------------
# Reopen (the hooks, driven as the core's reopen transaction would)
# -------------------------------------------------------------------------------------------


def test_reopen_read_write_keeps_locks(tmp_path: Path) -> None:
    import fcntl

    path = make_image(tmp_path / "r.img", MiB)
    with open_file(path, OpenFlags.NO_SHARE) as blk:  # read-only, sharing only reads
        bs, drv = blk.bs, blk.bs.drv
        before = locked_bytes(path)
        assert before == [100, 201, 203]
        old_fd = bs.opaque.fd
        state = drv.bdrv_reopen_prepare(bs, {}, bs.open_flags | RW)  # type: ignore[union-attr]
        assert locked_bytes(path) == before  # moved to the new descriptor, never dropped
        drv.bdrv_reopen_commit(bs, state)  # type: ignore[union-attr]
        bs.open_flags |= RW
        assert bs.opaque.fd != old_fd
        assert fcntl.fcntl(bs.opaque.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert locked_bytes(path) == before
        run(bs.opaque.engine.pwritev(memoryview(b"w" * 512), 0))
        assert blk.pread(0, 512) == b"w" * 512
    assert locked_bytes(path) == []


def test_reopen_abort_and_no_op(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.img", MiB)
    with open_file(path, OpenFlags.NONE) as blk:
        bs, drv = blk.bs, blk.bs.drv
        assert drv is not None
        fd = bs.opaque.fd
        state = drv.bdrv_reopen_prepare(bs, {}, bs.open_flags | RW)  # type: ignore[union-attr]
        drv.bdrv_reopen_abort(bs, state)  # type: ignore[union-attr]
        assert bs.opaque.fd == fd and locked_bytes(path) == [100]
        with pytest.raises(OSError):  # the descriptor is still read-only
            run(bs.opaque.engine.pwritev(memoryview(b"x" * 512), 0))
        same = drv.bdrv_reopen_prepare(bs, {"filename": str(path)}, bs.open_flags)
        drv.bdrv_reopen_commit(bs, same)  # type: ignore[union-attr]
        assert bs.opaque.fd == fd
        with pytest.raises(BlockError, match="cannot change 'filename'"):
            drv.bdrv_reopen_prepare(bs, {"filename": "/other"}, bs.open_flags)


def test_reopen_direct(ext4_4k: Path) -> None:
    path = make_image(ext4_4k / "d.img", MiB)
    with open_file(path) as blk:
        bs, drv = blk.bs, blk.bs.drv
        assert drv is not None
        state = drv.bdrv_reopen_prepare(bs, {}, bs.open_flags | OpenFlags.NOCACHE)
        drv.bdrv_reopen_commit(bs, state)
        assert bs.opaque.engine.direct and bs.opaque.request_alignment == 4096


def test_reopen_through_the_core(tmp_path: Path, qemu: None) -> None:
    import fcntl

    path = make_image(tmp_path / "c.img", MiB)
    with BlockBackend.open(str(path), {"driver": "raw"}, OpenFlags.NONE) as blk:
        file_bs = blk.bs.file.bs  # type: ignore[union-attr]
        assert locked_bytes(path) == [100]
        blk.reopen(False)  # read-write: a new O_RDWR descriptor, write lock taken
        assert fcntl.fcntl(file_bs.opaque.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert locked_bytes(path) == [100, 101]
        blk.pwrite(0, b"reopened")
        blk.reopen(True)
        assert locked_bytes(path) == [100]
        assert blk.pread(0, 8) == b"reopened"
        res = qemu_io("-f", "raw", "-c", "read -P 0x72 0 1", str(path))  # 'r'
        assert res.returncode == 0 and "verification failed" not in res.stdout
    assert locked_bytes(path) == []

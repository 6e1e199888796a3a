"""Tests of blockcore.posix on real files: a regular filesystem (tmp_path) and tmpfs (/dev/shm),
with image locks checked against real qemu-io processes."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockcore import posix, threadpool
from blockcore.errors import NotSupportedError, PermissionConflictError
from blockcore.testing import requires_qemu, requires_root
from blockcore.types import Perm
from blockcore.util import aligned_buffer

MiB = 1 << 20


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["disk", "tmpfs"])
def fsdir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the regular filesystem or on tmpfs."""
    if request.param == "disk":
        yield tmp_path
        return
    if not Path("/dev/shm").is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="blockcore-test-"))
    yield d
    shutil.rmtree(d)


def make_file(path: Path, size: int, data: dict[int, bytes] | None = None) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
    os.ftruncate(fd, size)
    for off, chunk in (data or {}).items():
        os.pwrite(fd, chunk, off)
    return fd


# -------------------------------------------------------------------------------------------
# Engine
# -------------------------------------------------------------------------------------------


def test_read_write_roundtrip(fsdir: Path) -> None:
    fd = make_file(fsdir / "a.img", 4 * MiB)
    eng = posix.PosixEngine(fd, "a.img")
    data = os.urandom(3 * MiB + 512)
    buf = aligned_buffer(len(data))

    async def go() -> None:
        await eng.pwritev(memoryview(data), 4096)
        await eng.preadv(buf, 4096)

    run(go())
    assert bytes(buf) == data
    assert os.pread(fd, 16, 4096) == data[:16]
    os.close(fd)


def test_read_past_eof_zero_fills(fsdir: Path) -> None:
    fd = make_file(fsdir / "a.img", 0, {0: b"x" * 1000})
    eng = posix.PosixEngine(fd, "a.img")
    buf = bytearray(b"\xff" * 4096)
    run(eng.preadv(memoryview(buf), 0))
    assert buf == b"x" * 1000 + bytes(3096)
    buf[:] = b"\xff" * 4096
    run(eng.preadv(memoryview(buf), 8192))
    assert buf == bytes(4096)
    os.close(fd)


def test_engine_mode_per_filesystem(fsdir: Path) -> None:
    fd = make_file(fsdir / "a.img", MiB)
    eng = posix.PosixEngine(fd, "a.img")
    if "/dev/shm" in str(fsdir):
        assert eng.inline and not eng.nowait_read  # tmpfs refuses RWF_NOWAIT
    else:
        assert not eng.inline
    os.close(fd)


def test_cached_read_never_uses_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = make_file(tmp_path / "a.img", MiB, {0: b"y" * MiB})
    eng = posix.PosixEngine(fd, "a.img")
    buf = aligned_buffer(4096)
    run(eng.preadv(buf, 0))  # learns whether RWF_NOWAIT works here
    if not eng.nowait_read:
        pytest.skip("RWF_NOWAIT reads not supported by this filesystem")

    async def no_pool(*_args: object) -> None:
        raise AssertionError("cached read went to the thread pool")

    monkeypatch.setattr(posix, "run_blocking", no_pool)
    for off in range(0, MiB, 4096):
        run(eng.preadv(buf, off))
    assert bytes(buf) == b"y" * 4096
    os.close(fd)


def test_uncached_read_falls_back_to_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(MiB)
    fd = make_file(tmp_path / "a.img", MiB, {0: data})
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop it from the page cache
    calls: list[int] = []
    real = posix._pread_full

    def counting(fd_: int, buf: memoryview, offset: int, direct: bool = False) -> None:
        calls.append(offset)
        real(fd_, buf, offset, direct)

    monkeypatch.setattr(posix, "_pread_full", counting)
    eng = posix.PosixEngine(fd, "a.img")
    buf = aligned_buffer(MiB)
    run(eng.preadv(buf, 0))
    assert bytes(buf) == data
    assert calls, "an uncached read completed without the pool (or the cache was not dropped)"
    os.close(fd)


def test_read_now_does_only_what_needs_no_wait(tmp_path: Path) -> None:
    """read_now, which drivers try before awaiting preadv: all of a cached range, nothing
    of an uncached one, zero fill past EOF; nothing at all on an O_DIRECT engine."""
    data = os.urandom(MiB)
    fd = make_file(tmp_path / "a.img", MiB, {0: data})
    eng = posix.PosixEngine(fd, "a.img")
    buf = aligned_buffer(64 << 10)
    if eng.read_now(buf, 0) != len(buf) or not eng.nowait_read:
        pytest.skip("RWF_NOWAIT reads not supported by this filesystem")
    assert bytes(buf) == data[: len(buf)]
    assert eng.read_now(buf, MiB) == len(buf) and bytes(buf) == bytes(len(buf))  # past EOF
    os.fsync(fd)
    dropped = []
    for _ in range(5):  # the kernel may keep pages now and then under load: ask again
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        dropped.append(eng.read_now(buf, MiB - len(buf)) < len(buf))
        if dropped[-1]:
            break
    assert any(dropped), "read_now completed a range dropped from the page cache 5 times"
    run(eng.preadv(buf, MiB - len(buf)))
    assert bytes(buf) == data[-len(buf) :]
    assert posix.PosixEngine(fd, "a.img", direct=True).read_now(buf, 0) == 0
    os.close(fd)


def _pool_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of each function the engine hands to the thread pool."""
    sent: list[str] = []
    real = posix.run_blocking

    async def spy(fn, *args):  # type: ignore[no-untyped-def]
        sent.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(posix, "run_blocking", spy)
    return sent


def test_buffered_write_never_uses_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 refuses RWF_NOWAIT writes: writes up to INLINE_WRITE_MAX are then copied inline
    (XFS/btrfs take RWF_NOWAIT instead; neither path hops to the pool)."""
    fd = make_file(tmp_path / "a.img", 8 * MiB)
    eng = posix.PosixEngine(fd, "a.img")
    sent = _pool_spy(monkeypatch)
    data = os.urandom(posix.INLINE_WRITE_MAX)

    async def go() -> None:
        for off in range(0, 8 * MiB, MiB):
            await eng.pwritev(memoryview(data)[:MiB], off)
        await eng.pwritev(memoryview(data), 4 * MiB)

    run(go())
    assert sent == []
    assert os.pread(fd, MiB, 4 * MiB) == data[:MiB]
    run(eng.pwritev(memoryview(data + b"x"), 0))  # above INLINE_WRITE_MAX: the pool
    assert sent == ["_pwrite_full"] or eng.nowait_write
    os.close(fd)


def test_stalled_inline_write_sends_writes_to_pool(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel stall (dirty-page throttling) cannot be provoked on demand, so writes are
    slowed by a sleep: one stall is forgiven, a second within the back-off period sends the
    next writes to the pool until the back-off ends."""
    fd = make_file(tmp_path / "a.img", MiB)
    eng = posix.PosixEngine(fd, "a.img")
    eng.nowait_write = False  # as on ext4/tmpfs, whatever this filesystem is
    eng.inline = False
    monkeypatch.setattr(posix, "INLINE_BACKOFF", 0.5)
    sent = _pool_spy(monkeypatch)
    real = posix._pwrite_full
    slow = [False, True, False, True]  # popped from the end: slow, fast, slow, fast

    def pwrite(fd_: int, buf: memoryview, offset: int) -> None:
        if slow.pop() if slow else False:
            time.sleep(0.05)
        real(fd_, buf, offset)

    monkeypatch.setattr(posix, "_pwrite_full", pwrite)
    run(eng.pwritev(memoryview(b"a" * 4096), 0))  # stalls: forgiven
    run(eng.pwritev(memoryview(b"b" * 4096), 4096))
    assert sent == []
    run(eng.pwritev(memoryview(b"c" * 4096), 8192))  # stalls again: back off
    assert sent == []  # the slow write itself ran inline
    run(eng.pwritev(memoryview(b"d" * 4096), 12288))
    assert sent == ["pwrite"]
    time.sleep(0.6)
    run(eng.pwritev(memoryview(b"e" * 4096), 16384))
    assert sent == ["pwrite"]  # back inline after the back-off
    assert os.pread(fd, 5 * 4096, 0) == b"".join(c * 4096 for c in (b"a", b"b", b"c", b"d",
                                                                    b"e"))
    os.close(fd)


def test_stall_threshold() -> None:
    assert not posix._stalled(0.004, MiB)  # a busy machine's hiccup
    assert posix._stalled(0.050, MiB)
    assert not posix._stalled(0.015, 4 * MiB)  # 4 MiB at ~280 MB/s plus 10 ms is allowed
    assert posix._stalled(0.030, 4 * MiB)


def test_many_parallel_requests(fsdir: Path) -> None:
    fd = make_file(fsdir / "a.img", 8 * MiB)
    eng = posix.PosixEngine(fd, "a.img")
    blocks = [os.urandom(65536) for _ in range(64)]

    async def go() -> list[bytes]:
        await asyncio.gather(*(eng.pwritev(memoryview(b), i * 65536) for i, b in enumerate(blocks)))
        bufs = [aligned_buffer(65536) for _ in blocks]
        await asyncio.gather(*(eng.preadv(b, i * 65536) for i, b in enumerate(bufs)))
        return [bytes(b) for b in bufs]

    assert run(go()) == blocks
    os.close(fd)


def test_flush_error_is_sticky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = make_file(tmp_path / "a.img", MiB)
    eng = posix.PosixEngine(fd, "a.img")
    run(eng.flush())

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError, match="injected"):
        run(eng.flush())
    monkeypatch.undo()
    with pytest.raises(OSError, match="injected"):  # page cache state unknown: stays failed
        run(eng.flush())
    os.close(fd)


def test_write_error_propagates(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    make_file(path, MiB)
    fd = os.open(path, os.O_RDONLY)
    eng = posix.PosixEngine(fd, str(path))
    with pytest.raises(OSError) as info:
        run(eng.pwritev(memoryview(b"x" * 512), 0))
    assert info.value.errno == errno.EBADF
    os.close(fd)


def test_cancel_waits_for_pool_call() -> None:
    async def go() -> float:
        task = asyncio.ensure_future(threadpool.run_blocking(time.sleep, 0.3))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    assert run(go()) > 0.15  # the buffer stays in use until the syscall returns


# -------------------------------------------------------------------------------------------
# fallocate, block status, sizes
# -------------------------------------------------------------------------------------------


def test_sparse_file_block_status(fsdir: Path) -> None:
    fd = make_file(fsdir / "s.img", 4 * MiB, {MiB: b"d" * 8192})
    ext = posix.extents(fd)
    assert ext[0] == (0, MiB, False)
    assert ext[1][2] is True and ext[1][0] == MiB and ext[1][1] >= 8192
    assert ext[-1][2] is False and ext[-1][0] + ext[-1][1] == 4 * MiB
    assert posix.seek_extent(fd, 0) == (False, MiB)
    assert posix.seek_extent(fd, MiB)[0] is True
    assert 8192 <= posix.allocated_size(fd) < MiB
    os.close(fd)


def test_punch_hole_visible_via_seek_hole(fsdir: Path) -> None:
    fd = make_file(fsdir / "p.img", MiB, {0: b"z" * MiB})
    eng = posix.PosixEngine(fd, "p.img")
    before = posix.allocated_size(fd)
    run(eng.punch_hole(65536, 65536))
    assert posix.extents(fd) == [(0, 65536, True), (65536, 65536, False),
                                 (131072, MiB - 131072, True)]  # fmt: skip
    assert os.pread(fd, 65536, 65536) == bytes(65536)
    assert os.fstat(fd).st_size == MiB  # KEEP_SIZE
    assert posix.allocated_size(fd) == before - 65536
    os.close(fd)


def test_zero_range(fsdir: Path) -> None:
    fd = make_file(fsdir / "z.img", MiB, {0: b"q" * MiB})
    eng = posix.PosixEngine(fd, "z.img")
    if "/dev/shm" in str(fsdir):
        with pytest.raises(NotSupportedError) as info:  # tmpfs has no ZERO_RANGE
            run(eng.zero_range(4096, 4096))
        assert info.value.errno == errno.ENOTSUP
        assert info.value.filename == "z.img"
    else:
        run(eng.zero_range(4096, 8192))
        assert os.pread(fd, 8192, 4096) == bytes(8192)
        assert os.pread(fd, 4096, 0) == b"q" * 4096
        # whether SEEK_DATA now calls the range a hole depends on ext4's delayed allocation
    os.close(fd)


def test_allocate_grows_and_reports_hole(fsdir: Path) -> None:
    fd = make_file(fsdir / "g.img", 0)
    eng = posix.PosixEngine(fd, "g.img")
    run(eng.allocate(0, MiB))
    assert os.fstat(fd).st_size == MiB
    assert posix.allocated_size(fd) >= MiB
    assert posix.extents(fd) == [(0, MiB, False)]  # allocated, never written
    os.close(fd)


def test_copy_range(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    src = make_file(tmp_path / "src.img", MiB, {0: data})
    dst = make_file(tmp_path / "dst.img", 0)
    a, b = posix.PosixEngine(src, "src.img"), posix.PosixEngine(dst, "dst.img")
    run(a.copy_range(b, 4096, 8192, MiB - 4096))
    assert os.pread(dst, MiB, 8192) == data[4096:]
    with pytest.raises(NotSupportedError, match="no progress"):  # source ends early
        run(a.copy_range(b, MiB - 512, 0, 4096))
    os.close(src)
    os.close(dst)


def test_copy_range_across_filesystems(tmp_path: Path) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    src = make_file(tmp_path / "src.img", MiB, {0: b"c" * MiB})
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as tmp:
        dst = os.open(tmp.name, os.O_RDWR)
        a, b = posix.PosixEngine(src, "src.img"), posix.PosixEngine(dst, tmp.name)
        try:
            run(a.copy_range(b, 0, 0, MiB))
        except NotSupportedError as exc:  # EXDEV on kernels refusing cross-fs copies
            assert exc.errno == errno.ENOTSUP
        else:
            assert os.pread(dst, MiB, 0) == b"c" * MiB
        os.close(dst)
    os.close(src)


# -------------------------------------------------------------------------------------------
# O_DIRECT
# -------------------------------------------------------------------------------------------


def test_probe_alignment_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    make_file(path, MiB)
    try:
        fd = posix.open_fd(str(path), writable=True, direct=True)
    except OSError as exc:
        pytest.skip(f"no O_DIRECT here: {exc}")
    req, buf = posix.probe_alignment(fd, str(path))
    assert req in (512, 1024, 2048, 4096) and buf in (512, 1024, 2048, 4096)
    eng = posix.PosixEngine(fd, str(path), direct=True)
    data = os.urandom(req * 3)
    aligned = aligned_buffer(len(data))
    aligned[:] = data
    run(eng.pwritev(aligned, req))
    # a buffer starting one byte into a page goes through the bounce buffer
    raw = bytearray(len(data) + 1)
    run(eng.preadv(memoryview(raw)[1:], req))
    assert bytes(raw[1:]) == data
    os.close(fd)


@pytest.fixture
def loop4k(tmp_path: Path) -> Iterator[str]:
    """A loop device with 4 KiB logical sectors over a 16 MiB file (root only)."""
    reason = requires_root() or (None if shutil.which("losetup") else "needs losetup")
    if reason:
        pytest.skip(reason)
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"")
    os.truncate(backing, 16 * MiB)
    res = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", str(backing)],
                         check=False, capture_output=True, text=True)  # fmt: skip
    if res.returncode:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_probe_alignment_4k_loop_device(loop4k: str) -> None:
    fd = posix.open_fd(loop4k, writable=True, direct=True)
    req, buf = posix.probe_alignment(fd, loop4k)
    assert req == 4096  # BLKSSZGET
    assert buf in (512, 4096)
    eng = posix.PosixEngine(fd, loop4k, direct=True)
    assert eng.getlength() == 16 * MiB
    data = os.urandom(8192)
    run(eng.pwritev(memoryview(data), 4096))  # bytes object: not page-aligned, bounced
    out = aligned_buffer(8192)
    run(eng.preadv(out, 4096))
    assert bytes(out) == data
    with pytest.raises(OSError) as info:  # misaligned offset is the core's job, not ours
        run(eng.preadv(aligned_buffer(4096), 512))
    assert info.value.errno == errno.EINVAL
    assert posix.allocated_size(fd) == 0
    os.close(fd)


# -------------------------------------------------------------------------------------------
# Image locking
# -------------------------------------------------------------------------------------------

READ, WRITE, ALL = Perm.CONSISTENT_READ, Perm.WRITE, Perm.ALL


def test_locks_conflict_between_two_descriptions(tmp_path: Path) -> None:
    path = tmp_path / "l.img"
    fd1 = make_file(path, MiB)
    fd2 = os.open(path, os.O_RDWR)
    a, b = posix.ImageLock(fd1, str(path)), posix.ImageLock(fd2, str(path))
    a.prepare(READ | WRITE, ALL & ~WRITE)
    a.commit(READ | WRITE, ALL & ~WRITE)
    assert a.held_bytes() == [100, 101, 201]
    with pytest.raises(PermissionConflictError) as info:
        b.prepare(READ | WRITE, ALL)
    assert info.value.strerror == 'Failed to get "write" lock'
    assert info.value.hint == f"Is another process using the image [{path}]?"
    assert info.value.errno == errno.EPERM
    assert b.held_bytes() == []  # the failed prepare took nothing
    b.prepare(READ, ALL)  # reading is fine: a shares it
    b.commit(READ, ALL)
    with pytest.raises(PermissionConflictError, match='Failed to get shared "write" lock'):
        b.prepare(READ, ALL & ~WRITE)  # a writes, so b cannot refuse to share writing
    assert b.held_bytes() == [100]  # abort restored the committed state
    # a gives up write: now b may take it
    a.prepare(READ, ALL)
    a.commit(READ, ALL)
    b.prepare(READ | WRITE, ALL)
    b.commit(READ | WRITE, ALL)
    os.close(fd2)  # closing the description drops its locks
    a.prepare(READ, ALL & ~WRITE)
    os.close(fd1)


def test_locks_same_description_do_not_conflict(tmp_path: Path) -> None:
    fd = make_file(tmp_path / "l.img", MiB)
    a, b = posix.ImageLock(fd, "l.img"), posix.ImageLock(fd, "l.img")
    a.prepare(READ | WRITE, READ)
    a.commit(READ | WRITE, READ)
    b.prepare(READ | WRITE, READ)  # OFD locks belong to the description, not the process
    os.close(fd)


@pytest.fixture
def qemu_io_holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A raw image held open read-write by an interactive qemu-io."""
    if reason := requires_qemu():
        pytest.skip(reason)
    path = tmp_path / "held.img"
    make_file(path, MiB)
    proc = subprocess.Popen(["qemu-io", "-f", "raw", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    probe = os.open(path, os.O_RDONLY)
    lock = posix.ImageLock(probe, str(path))
    deadline = time.monotonic() + 10
    while True:  # wait until qemu-io holds "consistent read" (byte 100)
        try:
            lock.check(Perm.NONE, ALL & ~READ)
        except PermissionConflictError:
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("qemu-io did not lock the image")
        time.sleep(0.02)
    os.close(probe)
    try:
        yield path, proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def test_lock_check_fails_against_running_qemu_io(
    qemu_io_holder: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    path, _proc = qemu_io_holder
    fd = os.open(path, os.O_RDWR)
    lock = posix.ImageLock(fd, str(path))
    # qemu-io holds "consistent read" and "write" on a raw image and shares everything
    lock.prepare(READ | WRITE, ALL)
    lock.commit(READ | WRITE, ALL)
    with pytest.raises(PermissionConflictError) as info:
        lock.prepare(READ | WRITE, ALL & ~WRITE)
    assert info.value.strerror == 'Failed to get shared "write" lock'
    assert info.value.hint == f"Is another process using the image [{path}]?"
    with pytest.raises(PermissionConflictError, match='Failed to get shared "consistent read"'):
        lock.prepare(READ, ALL & ~READ)
    os.close(fd)


def _qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], check=False, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize(
    ("perm", "shared", "qemu_args", "expect"),
    [
        (READ | WRITE, ALL & ~WRITE, [], 'Failed to get "write" lock'),
        (READ | WRITE, ALL & ~WRITE, ["-r"], None),
        (READ, ALL & ~READ, ["-r"], 'Failed to get "consistent read" lock'),
        (READ | WRITE, ALL, [], None),  # raw users share everything
        (READ, ALL & ~Perm.RESIZE, [], None),  # qemu-io on raw does not take resize
    ],
)
def test_qemu_io_respects_our_locks(tmp_path: Path, perm: Perm, shared: Perm,
                                    qemu_args: list[str], expect: str | None) -> None:  # fmt: skip
    if reason := requires_qemu():
        pytest.skip(reason)
    path = tmp_path / "ours.img"
    fd = make_file(path, MiB)
    lock = posix.ImageLock(fd, str(path))
    lock.prepare(perm, shared)
    lock.commit(perm, shared)
    res = _qemu_io(*qemu_args, "-c", "read 0 512", "-f", "raw", str(path))
    if expect is None:
        assert res.returncode == 0, res.stderr
        assert "read 512/512 bytes" in res.stdout
    else:
        assert res.returncode != 0
        assert expect in res.stderr
        assert f"Is another process using the image [{path}]?" in res.stderr
    lock.commit(Perm.NONE, ALL)  # dropping everything lets qemu-io in
    assert _qemu_io("-c", "read 0 512", "-f", "raw", str(path)).returncode == 0
    os.close(fd)

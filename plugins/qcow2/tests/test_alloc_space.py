"""Allocating writes that leave copy-on-write regions of zeros: the new clusters are zeroed
with one zero write that must not fall back, and only the guest data is written (QEMU's
handle_alloc_space); anything else copies on write as before."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from blockcore.errors import BlockError, NotSupportedError
from blockcore_qcow2.image import Qcow2Image

from .conftest import check_clean, qemu_io, requires_qemu
from .memfile import MemFile
from .test_engine_write import new_image

pytestmark = requires_qemu

CS = 64 * 1024


class RecordingFile(MemFile):
    """A MemFile that logs its zero writes and data writes, and can fail the zero ones."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.zero_writes: list[tuple[int, int, bool]] = []
        self.data_writes: list[tuple[int, int]] = []
        self.zero_error: OSError | None = None

    async def pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False
                            ) -> None:  # fmt: skip
        self.zero_writes.append((offset, length, no_fallback))
        if self.zero_error is not None:
            raise self.zero_error
        await MemFile.pwrite(self, offset, bytes(length))  # not logged as a data write

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.data_writes.append((offset, memoryview(data).nbytes))
        await super().pwrite(offset, data)


def _write(mem: MemFile, offset: int, data: bytes, backing: bytes | None = None) -> None:
    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        if backing is not None:

            async def read_backing(pos: int, buf: memoryview) -> None:
                buf[:] = backing[pos : pos + len(buf)]

            img.backing = read_backing
        await img.write(offset, memoryview(data))
        await img.close()

    asyncio.run(go())


def _fresh(tmp_path: Path) -> RecordingFile:
    return RecordingFile(bytes(new_image(4 << 20).buf))


def _read_back(tmp_path: Path, mem: MemFile, *cmds: str) -> None:
    path = tmp_path / "t.qcow2"
    mem.save(path)
    check_clean(path)
    out = qemu_io(path, *cmds)
    assert "verification" not in out, out


def test_partial_write_zeroes_the_cluster_and_writes_only_the_data(tmp_path: Path) -> None:
    mem = _fresh(tmp_path)
    mem.events.clear()
    _write(mem, CS + 4096, b"\x11" * 4096)
    assert "cluster_alloc_space" in mem.events
    assert "cow_read" not in mem.events and "cow_write" not in mem.events
    [(host, length, no_fallback)] = mem.zero_writes
    assert length == CS and no_fallback and host % CS == 0
    assert (host + 4096, 4096) in mem.data_writes  # the guest data alone
    assert (host, CS) not in mem.data_writes  # no whole cluster of COW buffers
    _read_back(tmp_path, mem, f"read -P 0 {CS} 4k", f"read -P 0x11 {CS + 4096} 4k",
               f"read -P 0 {CS + 8192} {CS - 8192}")  # fmt: skip


def test_without_fast_zeroes_copies_on_write(tmp_path: Path) -> None:
    mem = _fresh(tmp_path)
    mem.fast_zeroes = False  # type: ignore[misc]
    mem.events.clear()
    _write(mem, CS + 4096, b"\x11" * 4096)
    assert "cluster_alloc_space" not in mem.events and "cow_write" in mem.events
    assert not mem.zero_writes
    _read_back(tmp_path, mem, f"read -P 0 {CS} 4k", f"read -P 0x11 {CS + 4096} 4k")


def test_whole_cluster_write_has_nothing_to_zero(tmp_path: Path) -> None:
    mem = _fresh(tmp_path)
    mem.events.clear()
    _write(mem, CS, b"\x22" * CS)
    assert "cluster_alloc_space" not in mem.events and not mem.zero_writes


def test_cow_regions_from_a_backing_file_are_copied(tmp_path: Path) -> None:
    mem = _fresh(tmp_path)
    mem.events.clear()
    _write(mem, CS + 4096, b"\x11" * 4096, backing=b"\x55" * (4 << 20))
    assert "cluster_alloc_space" not in mem.events and "cow_read" in mem.events
    assert not mem.zero_writes


@pytest.mark.parametrize("err", [errno.ENOTSUP, errno.EAGAIN])
def test_zero_write_not_supported_falls_back_to_cow(tmp_path: Path, err: int) -> None:
    mem = _fresh(tmp_path)
    mem.zero_error = NotSupportedError("no") if err == errno.ENOTSUP else \
        BlockError(err, "busy")  # fmt: skip
    mem.events.clear()
    _write(mem, CS + 4096, b"\x11" * 4096)
    assert "cluster_alloc_space" in mem.events and "cow_write" in mem.events
    assert len(mem.zero_writes) == 1
    _read_back(tmp_path, mem, f"read -P 0 {CS} 4k", f"read -P 0x11 {CS + 4096} 4k",
               f"read -P 0 {CS + 8192} {CS - 8192}")  # fmt: skip


def test_zero_write_error_fails_the_write(tmp_path: Path) -> None:
    mem = _fresh(tmp_path)
    mem.zero_error = BlockError(errno.EIO, "broken")
    with pytest.raises(OSError) as info:
        _write(mem, CS + 4096, b"\x11" * 4096)
    assert info.value.errno == errno.EIO
    assert not any(n == 4096 for _, n in mem.data_writes)  # the data never went out

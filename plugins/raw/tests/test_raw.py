"""Tests of the ``raw`` format driver over ``file``."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from raw_helpers import MiB, locked_bytes, make_image, qemu_img

from blockcore import (
    BlockBackend,
    BlockError,
    NotSupportedError,
    OpenFlags,
    bdrv_create,
    hookimpl,
    register_driver,
    run,
    unregister_driver,
)
from blockcore.aio import bdrv_graph_co_rdlock
from blockcore.errors import NoSpaceError
from blockcore.info import bdrv_get_allocated_file_size
from blockcore.special import bdrv_co_copy_range
from blockcore.status import bdrv_block_status, bdrv_block_status_above
from blockcore.testing import check_driver
from blockcore.types import BdrvRequestFlags, BlockStatusFlags, DriverDescriptor

F = BdrvRequestFlags
S = BlockStatusFlags
RW = OpenFlags.RDWR


def open_raw(path: Path | str, flags: OpenFlags = RW, **opts: object) -> BlockBackend:
    return BlockBackend.open(str(path), {"driver": "raw", **opts}, flags)


def open_window(path: Path, flags: OpenFlags = RW, **opts: object) -> BlockBackend:
    return BlockBackend.open(None, {"driver": "raw", "file": {"driver": "file",
                                                              "filename": str(path)},
                                    **opts}, flags)  # fmt: skip


def test_conformance_kit(fsdir: Path) -> None:
    path = make_image(fsdir / "k.img", 2 * MiB, {0: os.urandom(MiB)})
    check_driver(lambda: open_raw(path, RW, discard="unmap"), rounds=150)


def test_conformance_kit_window(tmp_path: Path) -> None:
    path = make_image(tmp_path / "w.img", 4 * MiB, {0: b"\xee" * 4 * MiB})
    check_driver(lambda: open_window(path, offset=65536 + 512, size=2 * MiB), rounds=150)
    data = path.read_bytes()
    assert data[:65536 + 512] == b"\xee" * (65536 + 512)  # nothing outside the window
    assert data[65536 + 512 + 2 * MiB :] == b"\xee" * (2 * MiB - 65536 - 512)


def test_flags_and_descriptor(tmp_path: Path) -> None:
    path = make_image(tmp_path / "f.img", MiB)
    with open_raw(path) as blk:
        file_bs = blk.bs.file.bs  # type: ignore[union-attr]
        assert blk.bs.drv.descriptor.concurrency.value == "parallel"  # type: ignore[union-attr]
        assert file_bs.drv.descriptor.concurrency.value == "parallel"  # type: ignore[union-attr]
        assert blk.bs.supported_zero_flags & F.MAY_UNMAP
        assert blk.bs.supported_zero_flags & F.NO_FALLBACK
        assert not blk.bs.supported_write_flags & F.FUA  # the file emulates no FUA itself
        assert blk.bs.bl.request_alignment == 1


def test_window_reads_and_writes(tmp_path: Path) -> None:
    content = bytes(range(256)) * 4096  # 1 MiB
    path = make_image(tmp_path / "w.img", MiB, {0: content})
    with open_window(path, offset=4096, size=65536) as blk:
        assert blk.getlength() == 65536
        assert blk.pread(0, 16) == content[4096 : 4096 + 16]
        blk.pwrite(65536 - 4, b"tail")
        blk.pwrite_zeroes(0, 512)
    data = path.read_bytes()
    assert data[4096 + 65536 - 4 : 4096 + 65536] == b"tail"
    assert data[4096 : 4096 + 512] == bytes(512)
    assert data[4096 + 65536 :] == content[4096 + 65536 :]
    assert data[:4096] == content[:4096]


def test_window_offset_only_follows_the_file(tmp_path: Path) -> None:
    path = make_image(tmp_path / "o.img", MiB)
    with open_window(path, RW | OpenFlags.RESIZE, offset=65536) as blk:
        assert blk.getlength() == MiB - 65536
        blk.truncate(2 * MiB)
        assert os.path.getsize(path) == 2 * MiB + 65536


def test_window_validation(tmp_path: Path) -> None:
    path = make_image(tmp_path / "v.img", MiB)
    with pytest.raises(BlockError, match=f"offset {2 * MiB} is beyond the end of") as info:
        open_window(path, offset=2 * MiB)
    assert info.value.errno == errno.EINVAL and info.value.filename == str(path)
    with pytest.raises(BlockError, match="plus size 1048576 exceeds the 1048576 bytes"):
        open_window(path, offset=512, size=MiB)
    with pytest.raises(BlockError, match="size 1000 is not a multiple of 512"):
        open_window(path, size=1000)
    with pytest.raises(BlockError, match="does not support the option 'sise'"):
        open_window(path, sise=512)


def _on_root(blk: BlockBackend, coro_fn: Any, *args: object) -> None:
    async def go() -> None:
        async with bdrv_graph_co_rdlock():
            await coro_fn(blk.root, *args)

    run(go())


def test_requests_leaving_the_window(tmp_path: Path) -> None:
    from blockcore.io import bdrv_co_pdiscard, bdrv_co_pwrite_zeroes, bdrv_co_pwritev

    path = make_image(tmp_path / "p.img", MiB, {0: b"\x11" * MiB})
    with open_window(path, RW | OpenFlags.RESIZE, offset=4096, size=8192,
                     discard="unmap") as blk:  # fmt: skip
        with pytest.raises(BlockError, match="beyond the end"):  # the backend's own check
            blk.pwrite(8192, b"x")
        # below the backend, the node would grow: raw refuses to leave its window
        with pytest.raises(NoSpaceError, match="write of 512 bytes at 8192 leaves the window "
                           "of 8192 bytes") as info:  # fmt: skip
            _on_root(blk, bdrv_co_pwritev, 8192, 512, b"y" * 512)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
        with pytest.raises(NoSpaceError):
            _on_root(blk, bdrv_co_pwrite_zeroes, 4096, 8192)
        with pytest.raises(NoSpaceError):
            _on_root(blk, bdrv_co_pdiscard, 8192, 512)
        with pytest.raises(NotSupportedError, match="cannot resize a raw image with a fixed "
                           "size"):  # fmt: skip
            blk.truncate(16384)
    assert path.read_bytes() == b"\x11" * MiB  # nothing written anywhere


def test_block_status_is_raw_and_mapped(tmp_path: Path) -> None:
    path = make_image(tmp_path / "b.img", 2 * MiB, {MiB: b"d" * 65536})
    with open_window(path, OpenFlags.NONE, offset=65536) as blk:
        file_bs = blk.bs.file.bs  # type: ignore[union-attr]
        st = bdrv_block_status(blk.bs, 0, MiB)
        assert st.file is file_bs and st.map == 65536
        assert st.ret & S.ZERO and st.pnum == MiB - 65536  # the hole below, seen through
        st = bdrv_block_status(blk.bs, MiB - 65536, 65536)
        assert st.ret & S.DATA and st.map == MiB
        above = bdrv_block_status_above(blk.bs, None, MiB - 65536, MiB)
        assert above.ret & S.DATA and above.pnum == 65536


def test_locks_match_qemu(tmp_path: Path) -> None:
    # measured with qemu-io 7.2 on the same kind of file
    path = make_image(tmp_path / "l.img", MiB)
    with open_raw(path):
        assert locked_bytes(path) == [100, 101]
    with open_raw(path, OpenFlags.NONE):
        assert locked_bytes(path) == [100]
    with open_window(path, offset=4096):
        assert locked_bytes(path) == [100, 101, 203]
    with open_window(path, size=65536):
        assert locked_bytes(path) == [100, 101, 203]


# -------------------------------------------------------------------------------------------
# Probing and the sector-0 rule
# -------------------------------------------------------------------------------------------


class FakeFormat:
    """A format that claims images starting with ``FAKEFMT!``; never opened."""

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        return DriverDescriptor(format_name="fakefmt", is_format=True)

    @hookimpl
    def bdrv_probe(self, buf: bytes, filename: str | None) -> int:
        return 100 if buf.startswith(b"FAKEFMT!") else 0


@pytest.fixture
def fake_format() -> Iterator[None]:
    register_driver(FakeFormat())
    try:
        yield
    finally:
        unregister_driver("fakefmt")


def test_probed_raw(tmp_path: Path, fake_format: None, caplog: pytest.LogCaptureFixture) -> None:
    path = make_image(tmp_path / "pr.img", MiB, {0: b"plain data"})
    with caplog.at_level(logging.WARNING, logger="blockcore_raw"):
        blk = BlockBackend.open(str(path), None, RW)
    with blk:
        assert blk.bs.drv.name == "raw" and blk.bs.probed_format  # type: ignore[union-attr]
        assert "probing guessed raw" in caplog.text and str(path) in caplog.text
        assert blk.bs.bl.request_alignment == 512
        blk.pwrite(0, b"still plain")  # harmless writes to sector 0 work
        blk.pwrite(4096, b"FAKEFMT!")  # a header elsewhere does not matter
        for offset, data in ((0, b"FAKEFMT!"), (3, b"EFMT!")):  # whole or completing one
            if offset == 3:
                blk.pwrite(0, b"FAK")
            with pytest.raises(BlockError, match="refusing to write a 'fakefmt' header") as e:
                blk.pwrite(offset, data)
            assert e.value.errno == errno.EPERM and e.value.filename == str(path)
        assert blk.pread(0, 8) == b"FAKll pl"
    with open_raw(path) as blk:  # named explicitly: no restriction
        blk.pwrite(0, b"FAKEFMT!")
    assert path.read_bytes()[:8] == b"FAKEFMT!"


def test_probe_score() -> None:
    from blockcore_raw import raw

    assert raw.bdrv_probe(b"QFI\xfb", None) == 1
    assert raw.bdrv_probe(b"", "x.img") == 1


# -------------------------------------------------------------------------------------------
# Create, info, copy offload
# -------------------------------------------------------------------------------------------


def test_create_and_info(tmp_path: Path, qemu: None) -> None:
    import json

    path = tmp_path / "c.img"
    bdrv_create("raw", str(path), {"size": "3M", "preallocation": "falloc"})
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format"] == "raw" and info["virtual-size"] == 3 * MiB
    with open_raw(path, OpenFlags.NONE) as blk:
        assert blk.getlength() == 3 * MiB
        assert bdrv_get_allocated_file_size(blk.bs) == info["actual-size"]
    with pytest.raises(BlockError, match="'cluster_size'"):
        bdrv_create("raw", str(path), {"size": MiB, "cluster_size": 65536})


def test_copy_range_through_windows(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    src_path = make_image(tmp_path / "s.img", 2 * MiB, {65536: data})
    dst_path = make_image(tmp_path / "d.img", 2 * MiB)
    with open_window(src_path, OpenFlags.NONE, offset=65536) as src, \
            open_window(dst_path, offset=4096) as dst:  # fmt: skip

        async def go() -> None:
            async with bdrv_graph_co_rdlock():
                await bdrv_co_copy_range(src.root, 0, dst.root, 0, MiB)  # type: ignore[arg-type]

        run(go())
        assert dst.pread(0, MiB) == data
    assert dst_path.read_bytes()[4096 : 4096 + MiB] == data


def test_debug_events_reach_the_child() -> None:
    from blockcore.graph import BlockDriverState
    from blockcore.testing import MemoryDriver

    class EventDriver(MemoryDriver):
        events: list[str]

        @hookimpl
        async def bdrv_co_debug_event(self, bs: BlockDriverState, event: str) -> None:
            self.events.append(event)

    drv = EventDriver("memevents")
    drv.events = []
    drv.register()
    try:
        with BlockBackend.open(None, {"driver": "raw", "file": {"driver": "memevents",
                                                                "size": MiB}}, RW) as blk:  # fmt: skip
            blk.pwrite(0, b"e" * 512)
            blk.pread(0, 512)
        assert "write_aio" in drv.events and "read_aio" in drv.events  # as QEMU's raw sends
        assert drv.events.index("write_aio") < drv.events.index("read_aio")
    finally:
        drv.unregister()

"""Fixtures: real loop devices (root only, always detached) and the fake kernel."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blockcore
import pytest
from blockcore.aio import bdrv_graph_co_rdlock
from blockcore.testing import requires_root

from blockcore_host_device.fake import FakeLinux
from blockcore_host_device.ioctl import use_layer

MiB = 1 << 20


def _loop_reason() -> str | None:
    reason = requires_root()
    if reason is None and shutil.which("losetup") is None:
        reason = "needs losetup (Debian package mount)"
    return reason


class Loop:
    """A loop device over a backing file; ``backing`` is the file's path."""

    def __init__(self, dev: str, backing: Path, sector_size: int) -> None:
        self.dev = dev
        self.backing = backing
        self.sector_size = sector_size

    def backing_bytes(self, offset: int, length: int) -> bytes:
        with self.backing.open("rb") as f:
            f.seek(offset)
            return f.read(length)


@pytest.fixture
def make_loop(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Loop]:
    """``make_loop(size=64 MiB, sector_size=512, read_only=False, data=None)`` attaches a loop
    device; a finalizer detaches every device it made, whatever the test did."""
    reason = _loop_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[str] = []

    def detach() -> None:
        for dev in made:
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)

    request.addfinalizer(detach)  # noqa: PT021 (runs even if the test body fails)

    def make(size: int = 64 * MiB, sector_size: int = 512, read_only: bool = False,
             data: bytes | None = None) -> Loop:  # fmt: skip
        backing = tmp_path / f"backing{len(made)}.img"
        with backing.open("wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
        cmd = ["losetup", "--find", "--show", "--sector-size", str(sector_size)]
        if read_only:
            cmd.append("--read-only")
        res = subprocess.run([*cmd, str(backing)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.skip(f"losetup failed: {res.stderr.strip()}")
        dev = res.stdout.strip()
        made.append(dev)
        return Loop(dev, backing, sector_size)

    return make


@pytest.fixture
def loop(make_loop: Callable[..., Loop]) -> Loop:
    """A 64 MiB loop device with 512-byte sectors."""
    return make_loop()


@pytest.fixture(params=[512, 4096], ids=["512B", "4KiB"])
def any_loop(make_loop: Callable[..., Loop], request: pytest.FixtureRequest) -> Loop:
    """A 64 MiB loop device with 512-byte, then 4 KiB logical sectors."""
    return make_loop(sector_size=request.param)


@pytest.fixture
def fake() -> Iterator[FakeLinux]:
    """The fake kernel installed as the ioctl layer (nodes opened meanwhile use it)."""
    layer = FakeLinux()
    with use_layer(layer):
        yield layer
    layer.close_all()


@pytest.fixture
def co() -> Callable[[Any], Any]:
    """``co(coroutine)`` runs it on the main context with the graph read lock held."""

    def run(coro: Any) -> Any:
        async def locked() -> Any:
            async with bdrv_graph_co_rdlock():
                return await coro

        return blockcore.run(locked())

    return run

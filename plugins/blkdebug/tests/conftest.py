"""Fixtures for the blkdebug tests: in-memory images, blkdebug backends, captured messages."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockcore import BlockBackend, OpenFlags
from blockcore.testing import MemoryDriver
from blockcore_blkdebug import driver as bd

_names = itertools.count()

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
requires_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-io")


@pytest.fixture(autouse=True)
def messages() -> Iterator[list[str]]:
    """The "blkdebug: Suspended request" lines printed during the test (not on stdout)."""
    lines: list[str] = []
    old = bd.set_message_sink(lines.append)
    yield lines
    bd.set_message_sink(old)


class Env:
    """Registers memory drivers under unique names and closes what a test opened."""

    def __init__(self) -> None:
        self.drivers: list[MemoryDriver] = []
        self.backends: list[BlockBackend] = []

    def mem(self, **kwargs: Any) -> MemoryDriver:
        drv = MemoryDriver(f"bdmem{next(_names)}", **kwargs).register()
        self.drivers.append(drv)
        return drv

    def open(self, image: MemoryDriver | dict[str, Any] | None = None, size: int = 1 << 20,
             flags: OpenFlags = OpenFlags.RDWR, **options: Any) -> BlockBackend:  # fmt: skip
        """A backend over blkdebug (``options``) over an in-memory image."""
        if image is None:
            image = self.mem()
        if isinstance(image, MemoryDriver):
            image = {"driver": image.name, "size": size}
        opts = {"driver": "blkdebug", "image": image, **options}
        return self.track(BlockBackend.open(None, opts, flags))

    def track(self, blk: BlockBackend) -> BlockBackend:
        self.backends.append(blk)
        return blk

    def close(self) -> None:
        for blk in reversed(self.backends):
            blk.close()
        for drv in self.drivers:
            drv.unregister()


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


@pytest.fixture
def conf(tmp_path: Path) -> Callable[[str], str]:
    """Write a config file and return its path."""
    counter = itertools.count()

    def write(text: str) -> str:
        path = tmp_path / f"blkdebug{next(counter)}.conf"
        path.write_text(text)
        return str(path)

    return write

"""Fixtures for the file and raw driver tests: images on disk and on tmpfs, qemu tools,
and small scratch filesystems (root only)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockcore.testing import requires_qemu, requires_root

from raw_helpers import MiB, make_image


@pytest.fixture(params=["disk", "tmpfs"])
def fsdir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the regular filesystem (ext4 here) or on tmpfs."""
    if request.param == "disk":
        yield tmp_path
        return
    if not Path("/dev/shm").is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="blockcore-raw-"))
    yield d
    shutil.rmtree(d)


@pytest.fixture
def qemu() -> None:
    if reason := requires_qemu():
        pytest.skip(reason)


@pytest.fixture
def scratch_mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs instances (``mount(size=..., ro=...)``); root only."""
    if reason := requires_root():
        pytest.skip(reason)
    mounted: list[Path] = []

    def mount(size: str = "1m", ro: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                             check=False, capture_output=True, text=True)  # fmt: skip
        if res.returncode:
            pytest.skip(f"cannot mount tmpfs: {res.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def ext4_4k(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem on a loop device with 4 KiB logical sectors (root only)."""
    reason = requires_root()
    for tool in ("losetup", "mkfs.ext4", "mount"):
        reason = reason or (None if shutil.which(tool) else f"needs {tool}")
    if reason:
        pytest.skip(reason)
    backing = make_image(tmp_path / "fs.img", 64 * MiB)
    res = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", str(backing)],
                         check=False, capture_output=True, text=True)  # fmt: skip
    if res.returncode:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-b", "4096", dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, str(point)], check=True, capture_output=True)
        try:
            yield point
        finally:
            subprocess.run(["umount", str(point)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)

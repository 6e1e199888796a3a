"""Helpers shared by the file and raw driver tests (images, QEMU's tools, lock bytes)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from pathlib import Path

MiB = 1 << 20


def make_image(path: Path, size: int = 4 * MiB, data: dict[int, bytes] | None = None) -> Path:
    """A sparse file of ``size`` bytes with ``data`` written at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, chunk in (data or {}).items():
            f.seek(off)
            f.write(chunk)
    return path


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], check=False, capture_output=True, text=True,
                          timeout=60)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], check=False, capture_output=True, text=True,
                          timeout=60)


def locked_bytes(path: Path | str) -> list[int]:
    """Lock bytes (100..103, 200..203) that any open file description holds on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        held = []
        for byte in (100, 101, 102, 103, 200, 201, 202, 203):
            raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                              struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, byte, 1, 0))  # fmt: skip
            if struct.unpack("hhqqi4x", raw)[0] != fcntl.F_UNLCK:
                held.append(byte)
        return held
    finally:
        os.close(fd)

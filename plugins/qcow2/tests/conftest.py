"""Helpers for the qcow2 tests: run qemu-img/qemu-io, build images."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
requires_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-io")


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check)


def qemu_io(path: Path | str, *cmds: str, fmt: str = "qcow2", check: bool = True) -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(path)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if check and (proc.returncode != 0 or "error" in out.lower() or "failed" in out.lower()):
        raise AssertionError(f"qemu-io {cmds} failed: {out}")
    return out


def create(path: Path, size: str | int = "4M", opts: str = "", *extra: str) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, *extra, str(path), str(size))
    return path


def info(path: Path) -> dict[str, Any]:
    return json.loads(qemu_img("info", "--output=json", str(path)).stdout)


def to_raw(path: Path, out: Path) -> bytes:
    qemu_img("convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def image_tool(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img`` (tool "qemu") or blockcore-img (anything else) and require success."""
    import sys

    argv = ["qemu-img"] if tool == "qemu" else [sys.executable, "-m", "blockcore.img"]
    proc = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def check_clean(path: Path | str) -> None:
    """``qemu-img check`` finds no errors and no leaks."""
    proc = qemu_img("check", str(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout, proc.stdout

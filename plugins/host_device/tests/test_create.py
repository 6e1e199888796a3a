"""Creating images on host devices (``blockcore-img create -f qcow2 /dev/loopN``): QEMU 7.2
formats the existing device in place (block.c's bdrv_co_create_opts_simple). Each CLI case
runs qemu-img and blockcore-img with the same arguments on the same device and compares
their output; the images made are judged by qemu-img check and qemu-io."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from blockcore import BlockBackend, OpenFlags, bdrv_create
from blockcore.create import CREATE_OPTS_SIMPLE, create_size_and_prealloc
from blockcore.drivers import bdrv_find_format
from blockcore.errors import BlockError, NotSupportedError
from blockcore.testing import requires_qemu
from blockcore.types import PreallocMode

MiB = 1 << 20
needs_qemu = pytest.mark.skipif(requires_qemu() is not None, reason=str(requires_qemu()))


def _need(module: str, distribution: str) -> None:
    pytest.importorskip(module, reason=f"needs the {distribution} distribution "
                        "(the tox environment host_device installs it)")  # fmt: skip


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img"] if tool == "qemu" else [sys.executable, "-m", "blockcore.img"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def _same_as_qemu(*args: str) -> subprocess.CompletedProcess[str]:
    """Run qemu-img, then blockcore-img, with ``args``; both print the same lines and exit
    the same way. Returns blockcore-img's result."""
    theirs = _run("qemu", *args)
    ours = _run("blockcore", *args)
    assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout, args
    assert ours.stderr.replace("blockcore-img:", "qemu-img:") == theirs.stderr, args
    return ours


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF or 1 for i in range(n))


# -- what host_device declares (no root needed) ------------------------------------------------


def test_device_drivers_take_only_size_and_preallocation_off() -> None:
    for name in ("host_device", "host_cdrom"):
        drv = bdrv_find_format(name)
        assert drv.bdrv_co_create_opts is not None, name
        assert drv.descriptor.create_opts == CREATE_OPTS_SIMPLE
    assert [o.name for o in CREATE_OPTS_SIMPLE] == ["size", "preallocation"]


def test_size_and_prealloc_are_read_once_for_every_protocol() -> None:
    assert create_size_and_prealloc({}) == (0, PreallocMode.OFF)
    assert create_size_and_prealloc({"size": "1M", "preallocation": "full"}) == (
        MiB, PreallocMode.FULL)  # fmt: skip
    with pytest.raises(BlockError, match="invalid parameter value: bogus"):
        create_size_and_prealloc({"preallocation": "bogus"})


def test_preallocation_other_than_off_is_refused_before_opening(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-device")  # never opened: the mode is checked first
    with pytest.raises(NotSupportedError, match="Unsupported preallocation mode 'falloc'"):
        bdrv_create("host_device", missing, {"size": MiB, "preallocation": "falloc"})


def test_a_regular_file_is_not_a_device(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(_pattern(MiB))
    with pytest.raises(BlockError, match=r"^\[Errno 22\] Protocol driver 'host_device' does "
                       r"not support image creation, and opening the image failed: "
                       r"'host_device' driver requires '.*disk\.img' to be either a "
                       r"character or block device") as exc:  # fmt: skip
        bdrv_create("host_device", str(img), {"size": MiB})
    assert exc.value.errno == errno.EINVAL
    assert img.read_bytes() == _pattern(MiB)  # not even the first sector was cleared


@needs_qemu
@pytest.mark.parametrize("args", [
    ("-f", "host_device", "{img}", "1M"),
    ("-f", "qcow2", "host_device:{img}", "1M"),
    ("-f", "raw", "host_device:{img}", "1M"),
    ("-f", "host_device", "{missing}", "1M"),
], ids=["host_device", "qcow2-on-prefix", "raw-on-prefix", "missing"])  # fmt: skip
def test_cli_refusals_without_a_device_match_qemu_img(tmp_path: Path, args: tuple[str, ...]
                                                      ) -> None:  # fmt: skip
    _need("blockcore_qcow2.driver", "blockcore-qcow2")
    img = tmp_path / "disk.img"
    img.write_bytes(_pattern(MiB))
    argv = [a.format(img=img, missing=tmp_path / "missing") for a in args]
    res = _same_as_qemu("create", *argv)
    assert res.returncode == 1
    assert "does not support image creation, and opening the image failed" in res.stderr
    assert img.read_bytes() == _pattern(MiB)


# -- loop devices (root) -----------------------------------------------------------------------


@needs_qemu
def test_cli_create_qcow2_on_a_device_passes_qemu_img_check(any_loop) -> None:
    _need("blockcore_qcow2.driver", "blockcore-qcow2")
    lo = any_loop
    res = _same_as_qemu("create", "-f", "qcow2", lo.dev, "32M")
    assert res.stdout.startswith(f"Formatting '{lo.dev}', fmt=qcow2 ")
    # formatting over qemu-img's image: the result must stand on its own, so start dirty
    subprocess.run(["dd", "if=/dev/urandom", f"of={lo.dev}", "bs=1M", "count=2",
                    "oflag=direct"], check=True, capture_output=True)  # fmt: skip
    res = _run("blockcore", "create", "-q", "-f", "qcow2", lo.dev, "32M")
    assert res.returncode == 0, res.stderr
    check = _run("qemu", "check", "-T", "none", lo.dev)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    io = subprocess.run(["qemu-io", "-t", "none", "-f", "qcow2", "-c", "read -P 0 0 32M",
                         "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", lo.dev],
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout
    with BlockBackend.open(lo.dev, {"cache": {"direct": True}}, OpenFlags.RDWR) as blk:
        assert blk.bs.drv.name == "qcow2" and blk.bs.file.bs.drv.name == "host_device"
        assert blk.getlength() == 32 * MiB
        assert blk.pread(MiB, 65536) == b"\x5a" * 65536


@needs_qemu
def test_cli_create_raw_on_a_device_clears_only_the_first_sector(any_loop) -> None:
    _need("blockcore_raw.raw", "blockcore-raw")
    data = b"QFI\xfb" + _pattern(MiB - 4)  # a qcow2 magic that must not be probed again
    lo = any_loop
    for tool in ("qemu", "blockcore"):
        with lo.backing.open("r+b") as f:
            f.write(data)
        subprocess.run(["blockdev", "--flushbufs", lo.dev], check=False)
        res = _run(tool, "create", "-f", "raw", lo.dev, "32M")
        assert res.returncode == 0, (tool, res.stderr)
        assert res.stdout == f"Formatting '{lo.dev}', fmt=raw size=33554432\n"
        assert lo.backing_bytes(0, MiB) == bytes(512) + data[512:], tool
    io = subprocess.run(["qemu-io", "-t", "none", "-f", "raw", "-c", "read -P 0 0 512",
                         lo.dev], capture_output=True, text=True, check=False)  # fmt: skip
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout


@needs_qemu
@pytest.mark.parametrize("args", [
    ("-f", "raw", "{dev}", "65M"),
    ("-f", "host_device", "{dev}", "65M"),
    ("-f", "raw", "-o", "preallocation=full", "{dev}", "32M"),
    ("-f", "host_device", "-o", "preallocation=falloc", "{dev}", "32M"),
    ("-f", "host_device", "-o", "nocow=on", "{dev}", "1M"),
    ("-f", "raw", "-o", "preallocation=bogus", "{dev}", "32M"),
    ("-f", "host_cdrom", "{dev}", "64M"),
], ids=["raw-too-large", "host_device-too-large", "raw-full", "host_device-falloc",
        "nocow", "bogus-prealloc", "host_cdrom-no-medium"])  # fmt: skip
def test_cli_refusals_on_a_device_match_qemu_img_and_leave_it_alone(loop, args) -> None:
    _need("blockcore_raw.raw", "blockcore-raw")
    with loop.backing.open("r+b") as f:
        f.write(_pattern(MiB))
    argv = [a.format(dev=loop.dev) for a in args]
    res = _same_as_qemu("create", *argv)
    assert res.returncode == 1
    assert loop.backing_bytes(0, MiB) == _pattern(MiB)
    assert loop.backing.stat().st_size == 64 * MiB


@needs_qemu
def test_cli_too_large_message_is_qemus(loop) -> None:
    _need("blockcore_raw.raw", "blockcore-raw")
    res = _same_as_qemu("create", "-f", "raw", loop.dev, "65M")
    assert res.stderr == f"blockcore-img: {loop.dev}: Cannot grow device files\n"


@needs_qemu
def test_cli_qcow2_larger_than_the_device_is_fine_as_in_qemu(loop) -> None:
    """qcow2 takes its own options: the device only has to hold the metadata."""
    _need("blockcore_qcow2.driver", "blockcore-qcow2")
    _same_as_qemu("create", "-q", "-f", "qcow2", loop.dev, "1G")
    res = _run("qemu", "info", "--output=json", loop.dev)
    assert '"virtual-size": 1073741824' in res.stdout
    check = _run("qemu", "check", loop.dev)
    assert "No errors were found" in check.stdout, check.stdout


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "host_device", "host_cdrom"])
def test_cli_option_help_lists_the_device_protocols_options(loop, fmt: str) -> None:
    _need("blockcore_raw.raw", "blockcore-raw")
    res = _same_as_qemu("create", "-f", fmt, "-o", "help", loop.dev)
    assert "preallocation=<str>    - Preallocation mode (allowed values: off)\n" in res.stdout
    assert "nocow" not in res.stdout


@needs_qemu
@pytest.mark.parametrize("mode", ["full", "falloc"])
def test_cli_qcow2_preallocation_on_a_device_fails_as_in_qemu_leaving_a_clean_image(
        loop, mode: str) -> None:  # fmt: skip
    """The device cannot preallocate: qcow2's growth fails through both its prefixes, and
    the clusters it had reserved are given back, as QEMU does."""
    _need("blockcore_qcow2.driver", "blockcore-qcow2")
    res = _same_as_qemu("create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}",
                        loop.dev, "32M")  # fmt: skip
    assert res.stderr == (f"blockcore-img: {loop.dev}: Could not resize image: Failed to "
                          f"resize underlying file: Preallocation mode '{mode}' unsupported "
                          "for this non-regular file\n")  # fmt: skip
    check = _run("qemu", "check", loop.dev)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout

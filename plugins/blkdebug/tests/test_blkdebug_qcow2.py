"""qcow2 over blkdebug over a file (iotest 026 and 046 in spirit): an error injected at each
qcow2 metadata event fails only the request that hit it and leaves an image that
``qemu-img check`` finds free of errors (leaks allowed); overlapping writes to one
unallocated cluster, raced with a breakpoint, serialise."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from blkdebug_helpers import requires_qemu, wait_done
from blockcore_blkdebug import driver as bd

from blockcore import BlockBackend, OpenFlags
from blockcore.errors import BlockError

pytest.importorskip("blockcore_raw", reason="needs blockcore-raw for the file protocol")
pytest.importorskip("blockcore_qcow2.driver", reason="needs the qcow2 driver")
pytestmark = requires_qemu

KiB, MiB = 1 << 10, 1 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def qemu_io(img: str, *cmds: str, fmt: str = "qcow2") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    out = subprocess.run([*argv, img], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "failed" not in text and "verification" not in text, text
    return text


def check(img: str) -> dict[str, Any]:
    """``qemu-img check``: corruptions and check errors must be 0; leaks are allowed."""
    out = qemu_img("check", "--output=json", img)
    assert out.returncode in (0, 3), out.stdout + out.stderr  # 3: leaked clusters only
    result: dict[str, Any] = json.loads(out.stdout)
    assert result.get("corruptions", 0) == 0 and result.get("check-errors", 0) == 0, result
    return result


def create(path: Path, size: str = "64M", opts: str = "cluster_size=65536",
           backing: str | None = None) -> str:  # fmt: skip
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing is not None:
        args += ["-b", backing, "-F", "raw"]
    res = qemu_img(*args, str(path), size)
    assert res.returncode == 0, res.stderr
    return str(path)


def open_over_blkdebug(img: str, **blkdebug: Any) -> BlockBackend:
    return BlockBackend.open(None, {"driver": "qcow2", "file": {
        "driver": "blkdebug", **blkdebug, "image": {"driver": "file", "filename": img}}},
        OpenFlags.RDWR)  # fmt: skip


# With 1 KiB clusters an L2 table maps 128 KiB and a refcount block 512 KiB, so a 512 KiB
# write to a fresh region allocates an L2 table, data clusters and a refcount block (as
# iotest 026 does with small clusters). Data written first at 32M must survive.
FRESH_WRITE_EVENTS = ["l1_update", "l2_alloc_write", "l2_update", "refblock_load",
                      "refblock_update_part", "refblock_alloc", "refblock_alloc_write",
                      "refblock_alloc_hookup",
                      "cluster_alloc", "write_aio"]  # fmt: skip


@pytest.mark.parametrize("errno_value", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("event", FRESH_WRITE_EVENTS)
def test_error_at_metadata_event_fails_only_that_request(tmp_path: Path, event: str,
                                                        errno_value: int) -> None:  # fmt: skip
    img = create(tmp_path / "t.qcow2", "64M", "cluster_size=1024")
    qemu_io(img, "write -P 0x77 32M 64k")
    rule = {"event": event, "errno": errno_value, "once": True}
    with open_over_blkdebug(img, **{"inject-error": [rule]}) as blk:
        with pytest.raises(BlockError) as info:
            blk.pwrite(0, b"\x11" * (512 * KiB))
        assert info.value.errno == errno_value
        assert "injected" in info.value.strerror
        # the rule was used up: the next requests work, old data is intact
        blk.pwrite(8 * MiB, b"\x22" * (512 * KiB))
        assert blk.pread(32 * MiB, 64 * KiB) == b"\x77" * (64 * KiB)
        assert blk.pread(8 * MiB, 512 * KiB) == b"\x22" * (512 * KiB)
        blk.flush()
    check(img)
    qemu_io(img, "read -P 0x77 32M 64k", "read -P 0x22 8M 512k")


@pytest.mark.parametrize("event", ["cow_read", "cow_write", "read_backing_aio"])
def test_error_during_copy_on_write(tmp_path: Path, event: str) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x55" * (4 * MiB))
    img = create(tmp_path / "top.qcow2", "4M", backing=str(base))
    rule = {"event": event, "errno": errno.EIO, "once": True}
    with open_over_blkdebug(img, **{"inject-error": [rule]}) as blk:
        with pytest.raises(BlockError):
            blk.pwrite(4 * KiB, b"\x11" * (4 * KiB))  # a partial cluster: COW of the rest
        assert blk.pread(0, 64 * KiB) == b"\x55" * (64 * KiB)  # still the backing data
        blk.pwrite(4 * KiB, b"\x11" * (4 * KiB))
        assert blk.pread(0, 12 * KiB) == b"\x55" * 4096 + b"\x11" * 4096 + b"\x55" * 4096
    check(img)


def test_error_at_l2_load(tmp_path: Path) -> None:
    """iotest 089: the L2 table load arms EIO and the read of the table fails."""
    img = create(tmp_path / "t.qcow2")
    qemu_io(img, "write -P 42 0x38000 512")
    with open_over_blkdebug(img, **{"inject-error": [{"event": "l2_load"}]}) as blk:
        with pytest.raises(BlockError) as info:
            blk.pread(0x38000, 512)
        assert info.value.errno == errno.EIO
    check(img)


def test_overlapping_writes_to_an_unallocated_cluster(tmp_path: Path) -> None:
    """iotest 046: the first write is parked while it allocates the cluster; a second write
    into the same cluster must not allocate it again nor lose either write."""
    img = create(tmp_path / "race.qcow2", "4M")
    with open_over_blkdebug(img) as blk:
        bd.debug_breakpoint(blk.bs, "write_aio", "A")
        a = blk.aio_pwritev(0, b"\x11" * (4 * KiB))
        bd.wait_break(blk.bs, "A", timeout=10)
        b = blk.aio_pwritev(8 * KiB, b"\x22" * (4 * KiB))
        c = blk.aio_pwritev(64 * KiB, b"\x33" * (4 * KiB))  # the next cluster
        bd.debug_resume(blk.bs, "A")
        wait_done(a, b, c, timeout=10)
        assert blk.pread(0, 12 * KiB) == b"\x11" * 4096 + bytes(4096) + b"\x22" * 4096
        assert blk.pread(64 * KiB, 4 * KiB) == b"\x33" * 4096
        blk.flush()
    result = check(img)
    assert result.get("leaks", 0) == 0
    qemu_io(img, "read -P 0x11 0 4k", "read -P 0 4k 4k", "read -P 0x22 8k 4k",
            "read -P 0x33 64k 4k")  # fmt: skip
    mapping = json.loads(qemu_img("map", "--output=json", img).stdout)
    assert sum(1 for m in mapping if m["data"] and m["start"] < 128 * KiB) >= 1


def test_qcow2_under_blkdebug_limits(tmp_path: Path) -> None:
    """iotest 177 in spirit: blkdebug above qcow2 imposes align=4k and max-transfer=64k."""
    img = create(tmp_path / "geo.qcow2", "8M", "cluster_size=4096")
    with BlockBackend.open(None, {"driver": "blkdebug", "align": 4096, "max-transfer": "64k",
                                  "image": {"driver": "qcow2", "file": {"driver": "file",
                                                                        "filename": img}}},
                           OpenFlags.RDWR) as blk:  # fmt: skip
        blk.pwrite(1000, b"\x21" * (128 * KiB))
        blk.pwrite_zeroes(64 * KiB, 8 * KiB)
        assert blk.pread(1000, 63 * KiB) == b"\x21" * (63 * KiB)
        blk.flush()
    check(img)
    qemu_io(img, "read -P 0x21 1000 64536", "read -P 0 64k 8k")


def test_cor_write_event_from_copy_on_read(tmp_path: Path) -> None:
    """iotest 197 in spirit: blkdebug above a qcow2 overlay with copy-on-read. A COR read of
    an unallocated range raises cor_write; an allocated range is not rewritten, so an error
    armed for its offset never fires."""
    from blockcore.info import bdrv_enable_copy_on_read

    base = tmp_path / "base.raw"
    base.write_bytes(b"\x66" * (4 * MiB))
    img = create(tmp_path / "top.qcow2", "4M", backing=str(base))
    qemu_io(img, "write -P 0 1M 128k")  # allocated in the overlay
    opts = {"driver": "blkdebug",
            "inject-error": [{"event": "cor_write", "sector": 2048}],  # 1M: allocated
            "set-state": [{"event": "cor_write", "new_state": 2}],
            "image": {"driver": "qcow2", "file": {"driver": "file", "filename": img}}}  # fmt: skip
    with BlockBackend.open(None, opts, OpenFlags.RDWR) as blk:
        bdrv_enable_copy_on_read(blk.bs)
        assert blk.pread(1 * MiB, 128 * KiB) == bytes(128 * KiB)
        assert blk.bs.opaque.engine.state == 1  # nothing was copied
        assert blk.pread(0, 64 * KiB) == b"\x66" * (64 * KiB)  # copied up from the backing
        assert blk.bs.opaque.engine.state == 2
    check(img)
    out = json.loads(qemu_img("map", "--output=json", img).stdout)
    assert any(m["start"] == 0 and m["depth"] == 0 and m["data"] for m in out), out


def test_qcow2_over_blkdebug_limits_batch(tmp_path: Path) -> None:
    """qcow2's data and metadata I/O through blkdebug with align=4096 and max-transfer=64K:
    no check fires, data matches the model, and qemu-img check is clean."""
    import random

    from blkdebug_helpers import BASE, run_batch

    img = create(tmp_path / "batch.qcow2", "2M", "cluster_size=4096")
    with BlockBackend.open(None, {"driver": "qcow2", "discard": "unmap", "file": {
            "driver": "blkdebug", **BASE, "image": {"driver": "file", "filename": img}}},
            OpenFlags.RDWR) as blk:  # fmt: skip
        run_batch(blk, random.Random(5), 300, truncate=False)
    result = check(img)
    assert result.get("leaks", 0) == 0

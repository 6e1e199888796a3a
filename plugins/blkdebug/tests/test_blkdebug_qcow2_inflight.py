"""qcow2 allocating writes parked at a blkdebug breakpoint below qcow2 (iotests 046/177 in
spirit): the image lock is not held during the data write, so requests on other clusters go
on, while requests on the clusters being allocated wait for the link (QEMU's
handle_dependencies); ``qemu-img check`` stays clean."""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from blkdebug_helpers import requires_qemu, settle, wait_done
from blockcore_blkdebug import driver as bd
from test_blkdebug_qcow2 import check, create, open_over_blkdebug, qemu_img, qemu_io

from blockcore import BlockBackend
from blockcore.errors import BlockError

pytest.importorskip("blockcore_raw", reason="needs blockcore-raw for the file protocol")
pytest.importorskip("blockcore_qcow2.driver", reason="needs the qcow2 driver")
pytestmark = requires_qemu

KiB = 1 << 10
X, Y, Z, W = b"\x11", b"\x22", b"\x33", b"\x44"


@contextlib.contextmanager
def unparked_on_failure(blk: BlockBackend) -> Iterator[None]:
    """A failing test resumes the parked request, so closing the node does not hang."""
    try:
        yield
    except BaseException:
        while bd.debug_is_suspended(blk.bs, "A"):
            bd.debug_resume(blk.bs, "A")
        raise


def read_now(blk: BlockBackend, offset: int, length: int) -> bytes:
    """Read, failing (not hanging) when the request cannot finish while another is parked."""
    buf = bytearray(length)
    wait_done(blk.aio_preadv(offset, buf), timeout=5)
    return bytes(buf)


OPTS = ["cluster_size=65536", "cluster_size=65536,extended_l2=on"]


@pytest.mark.parametrize("opts", OPTS, ids=["std", "extl2"])
def test_other_clusters_proceed_while_an_allocation_is_parked(tmp_path: Path,
                                                              opts: str) -> None:  # fmt: skip
    img = create(tmp_path / "a.qcow2", "4M", opts)
    qemu_io(img, "write -P 0x44 64k 64k")
    with open_over_blkdebug(img) as blk, unparked_on_failure(blk):
        bd.debug_breakpoint(blk.bs, "write_aio", "A")
        a = blk.aio_pwritev(0, X * (4 * KiB))
        bd.wait_break(blk.bs, "A", timeout=10)
        # a read of an allocated cluster, an in-place write, an allocating write elsewhere
        assert read_now(blk, 64 * KiB, 4 * KiB) == W * (4 * KiB)
        in_place = blk.aio_pwritev(68 * KiB, Y * (4 * KiB))
        wait_done(in_place, blk.aio_pwritev(192 * KiB, Z * (8 * KiB)))
        assert read_now(blk, 192 * KiB, 8 * KiB) == Z * (8 * KiB)
        assert not a.done and bd.debug_is_suspended(blk.bs, "A")
        bd.debug_resume(blk.bs, "A")
        wait_done(a, timeout=10)
        blk.flush()
    assert check(img).get("leaks", 0) == 0
    qemu_io(img, "read -P 0x11 0 4k", "read -P 0 4k 60k", "read -P 0x44 64k 4k",
            "read -P 0x22 68k 4k", "read -P 0x44 72k 56k", "read -P 0x33 192k 8k")  # fmt: skip


@pytest.mark.parametrize("opts", OPTS, ids=["std", "extl2"])
def test_overlapping_requests_wait_for_the_link(tmp_path: Path, opts: str) -> None:
    """A write into the parked cluster waits; a read of it sees the old content (QEMU's reads
    do not wait either); both end with the data of both writes."""
    img = create(tmp_path / "b.qcow2", "4M", opts)
    with open_over_blkdebug(img) as blk, unparked_on_failure(blk):
        bd.debug_breakpoint(blk.bs, "write_aio", "A")
        a = blk.aio_pwritev(4 * KiB, X * (4 * KiB))
        bd.wait_break(blk.bs, "A", timeout=10)
        b = blk.aio_pwritev(60 * KiB, Y * (8 * KiB))  # last 4k of cluster 0, first of 1
        settle(0.05)
        assert not b.done  # waits for cluster 0 ...
        assert blk.pread(64 * KiB, 4 * KiB) == bytes(4 * KiB)  # ... and has not started on 1
        assert blk.pread(0, 64 * KiB) == bytes(64 * KiB)  # A is not linked yet
        bd.debug_resume(blk.bs, "A")
        wait_done(a, b, timeout=10)
        expect = bytes(4 * KiB) + X * (4 * KiB) + bytes(52 * KiB) + Y * (8 * KiB)
        assert blk.pread(0, 68 * KiB) == expect
        blk.flush()
    assert check(img).get("leaks", 0) == 0
    qemu_io(img, "read -P 0 0 4k", "read -P 0x11 4k 4k", "read -P 0 8k 52k",
            "read -P 0x22 60k 8k", "read -P 0 68k 60k")  # fmt: skip
    mapping = json.loads(qemu_img("map", "--output=json", img).stdout)
    data = [(m["start"], m["length"]) for m in mapping if m["data"]]
    if "extended_l2" in opts:  # only the written 2 KiB subclusters
        assert data == [(4 * KiB, 4 * KiB), (60 * KiB, 8 * KiB)], mapping
    else:
        assert data == [(0, 128 * KiB)], mapping


def test_request_is_cut_at_a_parked_cluster(tmp_path: Path) -> None:
    """A write spanning clusters 0..3 while cluster 2 is being allocated writes 0..1 at
    once and the rest after the link (handle_dependencies shortens the request)."""
    img = create(tmp_path / "c.qcow2", "4M")
    with open_over_blkdebug(img) as blk, unparked_on_failure(blk):
        bd.debug_breakpoint(blk.bs, "write_aio", "A")
        a = blk.aio_pwritev(128 * KiB, X * (4 * KiB))
        bd.wait_break(blk.bs, "A", timeout=10)
        b = blk.aio_pwritev(0, Y * (256 * KiB))
        settle(0.05)
        assert not b.done
        assert blk.pread(0, 128 * KiB) == Y * (128 * KiB)  # the part before A is in
        assert blk.pread(192 * KiB, 64 * KiB) == bytes(64 * KiB)  # the part after is not
        bd.debug_resume(blk.bs, "A")
        wait_done(a, b, timeout=10)
        assert blk.pread(0, 256 * KiB) == Y * (256 * KiB)  # B came second
        blk.flush()
    assert check(img).get("leaks", 0) == 0
    qemu_io(img, "read -P 0x22 0 256k")


def test_failed_parked_allocation_frees_its_clusters(tmp_path: Path) -> None:
    """The data write of the parked request fails: it gives its clusters back
    (qcow2_alloc_cluster_abort) and the waiting write allocates the cluster itself."""
    img = create(tmp_path / "d.qcow2", "4M")
    rule = {"event": "write_aio", "errno": errno.EIO, "once": True}
    with open_over_blkdebug(img, **{"inject-error": [rule]}) as blk, unparked_on_failure(blk):
        bd.debug_breakpoint(blk.bs, "write_aio", "A")
        a = blk.aio_pwritev(0, X * (4 * KiB))
        bd.wait_break(blk.bs, "A", timeout=10)
        b = blk.aio_pwritev(8 * KiB, Y * (4 * KiB))
        settle(0.05)
        assert not b.done
        bd.debug_resume(blk.bs, "A")
        with pytest.raises(BlockError) as info:
            wait_done(a, timeout=10)
        assert info.value.errno == errno.EIO
        wait_done(b, timeout=10)
        assert blk.pread(0, 12 * KiB) == bytes(8 * KiB) + Y * (4 * KiB)
        blk.flush()
    result = check(img)
    assert result.get("leaks", 0) == 0, result
    qemu_io(img, "read -P 0 0 8k", "read -P 0x22 8k 4k")


def test_extended_l2_subcluster_write_in_allocated_cluster_is_parked(tmp_path: Path) -> None:
    """Extended L2, a write into an unallocated subcluster of an allocated cluster (QEMU:
    handle_copied with keep_old_clusters): parked without the lock; a read and a write
    elsewhere go on, a write into the same cluster waits; the subcluster bitmap ends right."""
    img = create(tmp_path / "e.qcow2", "4M", OPTS[1])
    qemu_io(img, "write -P 0x44 0 2k")
    with open_over_blkdebug(img) as blk, unparked_on_failure(blk):
        bd.debug_breakpoint(blk.bs, "write_aio", "A")
        a = blk.aio_pwritev(8 * KiB, X * (2 * KiB))
        bd.wait_break(blk.bs, "A", timeout=10)
        assert read_now(blk, 0, 2 * KiB) == W * (2 * KiB)
        wait_done(blk.aio_pwritev(64 * KiB, Z * (2 * KiB)))
        c = blk.aio_pwritev(9 * KiB, Y * KiB)
        settle(0.05)
        assert not c.done and not a.done
        bd.debug_resume(blk.bs, "A")
        wait_done(a, c, timeout=10)
        blk.flush()
    assert check(img).get("leaks", 0) == 0
    qemu_io(img, "read -P 0x44 0 2k", "read -P 0 2k 6k", "read -P 0x11 8k 1k",
            "read -P 0x22 9k 1k", "read -P 0 10k 54k", "read -P 0x33 64k 2k")  # fmt: skip
    mapping = json.loads(qemu_img("map", "--output=json", img).stdout)
    data = [(m["start"], m["length"]) for m in mapping if m["data"]]
    assert data == [(0, 2 * KiB), (8 * KiB, 2 * KiB), (64 * KiB, 2 * KiB)], mapping


def test_compressed_write_is_parked_without_the_lock(tmp_path: Path) -> None:
    """A compressed write parked at its data write: other clusters go on, a write into its
    cluster waits and lands on top after the link; a second compressed write there: EIO."""
    from blockcore import BdrvRequestFlags as F

    img = create(tmp_path / "f.qcow2", "4M")
    with open_over_blkdebug(img) as blk, unparked_on_failure(blk):
        bd.debug_breakpoint(blk.bs, "write_compressed", "A")
        a = blk.aio_pwritev(0, X * (64 * KiB), flags=F.WRITE_COMPRESSED)
        bd.wait_break(blk.bs, "A", timeout=10)
        assert read_now(blk, 64 * KiB, 4 * KiB) == bytes(4 * KiB)
        wait_done(blk.aio_pwritev(128 * KiB, Z * (4 * KiB)))
        b = blk.aio_pwritev(4 * KiB, Y * (4 * KiB))
        settle(0.05)
        assert not a.done and not b.done
        bd.debug_resume(blk.bs, "A")
        wait_done(a, b, timeout=10)
        assert blk.pread(0, 12 * KiB) == X * (4 * KiB) + Y * (4 * KiB) + X * (4 * KiB)
        with pytest.raises(BlockError) as info:
            blk.pwrite(64 * KiB * 2, X * (64 * KiB), flags=F.WRITE_COMPRESSED)
        assert info.value.errno == errno.EIO
        blk.flush()
    check(img)
    qemu_io(img, "read -P 0x11 0 4k", "read -P 0x22 4k 4k", "read -P 0x11 8k 56k",
            "read -P 0x33 128k 4k", "read -P 0 132k 60k")  # fmt: skip

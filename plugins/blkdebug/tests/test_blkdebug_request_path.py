"""blkdebug with align=4096 and max-transfer=64K under the core's request path: a random
batch of unaligned reads and writes, zero writes, discards, flushes and truncates must pass
every check blkdebug makes of the core's guarantees, with data matching a bytearray model."""

from __future__ import annotations

import random
from typing import Any

import pytest
from blkdebug_helpers import BASE, SIZE, Env, run_batch

from blockcore import BlockBackend, OpenFlags
from blockcore.testing import check_driver

EXTRA_LIMITS = {
    "none": {},
    "zero": {"opt-write-zero": "16k", "max-write-zero": "128k", "max-discard": "96k"},
    "zero-odd-sizes": {"opt-write-zero": "12k", "max-write-zero": "36k", "max-discard": "60k"},
    # opt-discard above the alignment trips a core bug for unaligned discards (see
    # test_core_bug_unaligned_discard_with_discard_alignment): discards stay 4K-aligned there
    "discard": {"opt-discard": "32k", "max-discard": "96k"},
    "discard-odd-sizes": {"opt-write-zero": "12k", "opt-discard": "20k", "max-discard": "60k"},
}  # fmt: skip
ALIGNED_DISCARDS = {"discard", "discard-odd-sizes"}
CHILDREN = {
    "bytes": {},
    "512": {"request_alignment": 512},
    "512-16k-nozero-nodiscard": {"request_alignment": 512, "max_transfer": 16384,
                                 "zero_write": False, "discard": False},
    "4k-fua": {"request_alignment": 4096, "fua": True},
}  # fmt: skip


@pytest.mark.parametrize("child", list(CHILDREN))
@pytest.mark.parametrize("limits", list(EXTRA_LIMITS))
def test_batch_passes_every_check(env: Env, child: str, limits: str) -> None:
    mem = env.mem(**CHILDREN[child])
    blk = env.open(mem, SIZE, **BASE, **EXTRA_LIMITS[limits])
    assert blk.bs.bl.request_alignment == 4096 and blk.bs.bl.max_transfer == 65536
    rng = random.Random(f"{child}/{limits}")
    done = run_batch(blk, rng, 400, aligned_discards=limits in ALIGNED_DISCARDS)
    assert set(done) >= {"read", "write", "zero", "discard", "flush", "truncate"}
    # what reached the image went through blkdebug's checks and its own max_transfer
    limit = CHILDREN[child].get("max_transfer") or 65536
    rw = [(h, o, n) for h, o, n, _f in mem.calls if h in ("preadv", "pwritev")]
    assert rw and all(n <= limit for _h, _o, n in rw)
    if "opt-write-zero" in EXTRA_LIMITS[limits] and CHILDREN[child].get("zero_write", True):
        zero_align = int(EXTRA_LIMITS[limits]["opt-write-zero"][:-1]) * 1024
        assert all(o % zero_align == 0 and n % zero_align == 0
                   for h, o, n, _f in mem.calls if h == "pwrite_zeroes")  # fmt: skip


def test_batch_under_stacked_blkdebug_nodes(env: Env) -> None:
    """blkdebug over blkdebug with different limits: each layer checks what it gets."""
    mem = env.mem(request_alignment=512)
    inner = {"driver": "blkdebug", "align": 512, "max-transfer": "16k", "opt-discard": "8k",
             "image": {"driver": mem.name, "size": SIZE}}  # fmt: skip
    blk = env.open(inner, **BASE, **{"opt-write-zero": "64k"})
    run_batch(blk, random.Random(7), 300)


def test_conformance_kit_over_blkdebug(env: Env) -> None:
    mem = env.mem()

    def open_backend() -> BlockBackend:
        return BlockBackend.open(None, {
            "driver": "blkdebug", **BASE, "opt-write-zero": "16k", "discard": "ignore",
            "image": {"driver": mem.name, "filename": "kit", "size": SIZE}}, OpenFlags.RDWR)

    check_driver(open_backend, seed=3, rounds=300)


def test_conformance_kit_over_blkdebug_with_unmap(env: Env) -> None:
    mem = env.mem()

    def open_backend() -> BlockBackend:
        return BlockBackend.open(None, {
            "driver": "blkdebug", **BASE, "image": {"driver": mem.name, "filename": "kit2",
                                                    "size": SIZE}}, OpenFlags.RDWR)  # fmt: skip

    check_driver(open_backend, seed=3, rounds=300)


def test_unaligned_discard_with_discard_alignment_keeps_pieces_aligned(env: Env) -> None:
    """blkdebug's guarantee checks raise if the core sends a piece crossing a 4K boundary
    from an unaligned start (it used to send [2345, 6249) then [6249, 10345))."""
    blk = env.open(discard="unmap", align=4096, **{"opt-discard": "32k"})
    blk.pdiscard(2345, 8000)


def test_reads_and_writes_at_node_level(env: Env) -> None:
    """Node-level requests (no backend end-of-image check): writes past the end grow the
    image, reads past the end return zeros; both stay within blkdebug's guarantees."""
    from blockcore.io import bdrv_pread, bdrv_pwrite

    mem = env.mem()
    blk = env.open(mem, SIZE, flags=OpenFlags.RDWR | OpenFlags.RESIZE, **BASE)
    root: Any = blk.root
    bdrv_pwrite(root, SIZE - 100, 300, b"\x07" * 300)
    assert blk.getlength() == SIZE + 512
    buf = bytearray(10000)
    bdrv_pread(root, SIZE - 100, 10000, buf)
    assert bytes(buf) == b"\x07" * 300 + bytes(9700)

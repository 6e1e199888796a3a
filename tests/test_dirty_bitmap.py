"""Dirty bitmaps: tracking through the request path, queries against a model, GS functions,
serialization layout and QEMU's error messages."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockcore
from blockcore import BlockBackend, BlockError, NotSupportedError, OpenFlags, TierViolation
from blockcore.dirty_bitmap import (
    BdrvDirtyBitmap,
    BitmapCheck,
    bdrv_clear_dirty_bitmap,
    bdrv_create_dirty_bitmap,
    bdrv_dirty_bitmap_check,
    bdrv_disable_dirty_bitmap,
    bdrv_enable_dirty_bitmap,
    bdrv_find_dirty_bitmap,
    bdrv_has_readonly_bitmaps,
    bdrv_merge_dirty_bitmap,
    bdrv_release_dirty_bitmap,
    bdrv_release_named_dirty_bitmaps,
    bdrv_remove_persistent_dirty_bitmap,
)
from blockcore.tiers import API, Tier

MiB = 1 << 20


@pytest.fixture
def blk(memdrv):  # type: ignore[no-untyped-def]
    drv = memdrv()
    b = BlockBackend.open(None, {"driver": drv.name, "size": str(4 * MiB)},
                          OpenFlags.RDWR | OpenFlags.UNMAP)  # fmt: skip
    yield b
    b.close()


def ranges(bm: BdrvDirtyBitmap) -> list[tuple[int, int]]:
    return list(bm.dirty_ranges())


# ------------------------------------------------------------------ request path


def test_writes_zero_writes_and_discards_mark_enabled_bitmaps(blk: BlockBackend) -> None:
    bs = blk.bs
    a = bdrv_create_dirty_bitmap(bs, 65536, "a")
    b = bdrv_create_dirty_bitmap(bs, 512, "b")
    off = bdrv_create_dirty_bitmap(bs, 4096, "off")
    bdrv_disable_dirty_bitmap(off)
    blk.pwrite(1000, b"x" * 10)
    assert ranges(a) == [(0, 65536)]
    assert ranges(b) == [(512, 512)]
    blk.pwrite_zeroes(MiB, 4096)
    assert ranges(b) == [(512, 512), (MiB, 4096)]
    blk.pdiscard(2 * MiB + 512, 1024)
    assert ranges(b)[-1] == (2 * MiB + 512, 1024)
    assert ranges(a) == [(0, 65536), (MiB, 65536), (2 * MiB, 65536)]
    assert off.is_empty() and off.count() == 0
    bdrv_enable_dirty_bitmap(off)
    blk.pwrite(4 * MiB - 1, b"z")
    assert ranges(off) == [(4 * MiB - 4096, 4096)]
    assert a.count() == 4 * 65536


def test_truncate_resizes_bitmaps(blk: BlockBackend) -> None:
    bs = blk.bs
    bm = bdrv_create_dirty_bitmap(bs, 4096, "t")
    blk.pwrite(4 * MiB - 4096, b"y" * 4096)
    blk.truncate(2 * MiB + 512)
    assert bm.size == 2 * MiB + 512 and bm.is_empty()
    blk.pwrite(2 * MiB, b"q" * 512)
    assert ranges(bm) == [(2 * MiB, 512)]  # the last granule is clipped to the size
    blk.truncate(3 * MiB)
    assert bm.size == 3 * MiB
    assert ranges(bm) == [(2 * MiB, 4096)]
    blk.pwrite(3 * MiB - 4096, b"w" * 4096)
    assert ranges(bm) == [(2 * MiB, 4096), (3 * MiB - 4096, 4096)]


# ------------------------------------------------------------------ GS functions


def test_create_find_release_and_errors(blk: BlockBackend) -> None:
    bs = blk.bs
    bm = bdrv_create_dirty_bitmap(bs, 65536, "one")
    assert bm.size == 4 * MiB and bm.enabled and not bm.persistent
    assert bdrv_find_dirty_bitmap(bs, "one") is bm
    assert bdrv_find_dirty_bitmap(bs, "two") is None
    with pytest.raises(BlockError, match="^.*Bitmap already exists: one") as ei:
        bdrv_create_dirty_bitmap(bs, 65536, "one")
    assert ei.value.errno == errno.EEXIST
    for g in (256, 1000, 3 << 10):
        with pytest.raises(BlockError, match="Granularity must be power of 2 and at least 512"):
            bdrv_create_dirty_bitmap(bs, g, "g")
    with pytest.raises(BlockError, match="Bitmap name too long"):
        bdrv_create_dirty_bitmap(bs, 65536, "n" * 1024)
    anon = bdrv_create_dirty_bitmap(bs, 512, None)
    anon2 = bdrv_create_dirty_bitmap(bs, 512, None)  # anonymous bitmaps never clash
    before = bs.dirty_bitmaps
    bdrv_release_dirty_bitmap(bm)
    assert bm not in bs.dirty_bitmaps and bm in before  # the list is replaced, not mutated
    blk.pwrite(0, b"a")
    assert bm.is_empty() and not anon.is_empty()
    anon2.busy = True
    with pytest.raises(BlockError, match="currently in use by another operation"):
        bdrv_release_dirty_bitmap(anon2)
    named = bdrv_create_dirty_bitmap(bs, 512, "n")
    bdrv_release_named_dirty_bitmaps(bs)
    assert named not in bs.dirty_bitmaps and anon in bs.dirty_bitmaps


def test_gs_functions_are_declared_and_checked(blk: BlockBackend) -> None:
    for name in ("bdrv_create_dirty_bitmap", "bdrv_release_dirty_bitmap",
                 "bdrv_find_dirty_bitmap", "bdrv_enable_dirty_bitmap",
                 "bdrv_disable_dirty_bitmap", "bdrv_merge_dirty_bitmap",
                 "bdrv_clear_dirty_bitmap"):  # fmt: skip
        assert API[name] is Tier.GS
    bs = blk.bs

    async def inside() -> None:
        bdrv_create_dirty_bitmap(bs, 65536, "x")

    with pytest.raises(TierViolation, match="bdrv_create_dirty_bitmap is a 'GS' function"):
        blockcore.run(inside())


def test_checks_and_messages(blk: BlockBackend) -> None:
    bm = bdrv_create_dirty_bitmap(blk.bs, 65536, "c")
    bm.set(0, 100)
    bm.readonly = True
    with pytest.raises(BlockError, match="Bitmap 'c' is readonly and cannot be modified"):
        bdrv_clear_dirty_bitmap(bm)
    bdrv_dirty_bitmap_check(bm, BitmapCheck.ALLOW_RO)
    bdrv_disable_dirty_bitmap(bm)  # flags may change on readonly bitmaps
    assert bdrv_has_readonly_bitmaps(blk.bs)
    bm.readonly = False
    bm.inconsistent = True
    with pytest.raises(BlockError, match="Bitmap 'c' is inconsistent and cannot be used") as ei:
        bdrv_enable_dirty_bitmap(bm)
    assert ei.value.hint == "Try block-dirty-bitmap-remove to delete this bitmap from disk\n"
    bm.inconsistent = False
    bm.busy = True
    with pytest.raises(BlockError, match="Bitmap 'c' is currently in use by another operation "
                       "and cannot be used"):  # fmt: skip
        bdrv_clear_dirty_bitmap(bm)
    bm.busy = False
    old = bdrv_clear_dirty_bitmap(bm, backup=True)
    assert bm.is_empty() and old is not None and ranges(old) == [(0, 65536)]
    bm.restore_from(old)
    assert ranges(bm) == [(0, 65536)]


def test_merge(blk: BlockBackend) -> None:
    bs = blk.bs
    fine = bdrv_create_dirty_bitmap(bs, 512, "fine")
    coarse = bdrv_create_dirty_bitmap(bs, 65536, "coarse")
    same = bdrv_create_dirty_bitmap(bs, 512, "same")
    bdrv_disable_dirty_bitmap(coarse)
    bdrv_disable_dirty_bitmap(same)
    blk.pwrite(70000, b"m" * 600)
    assert ranges(fine) == [(69632, 1024)]
    old = bdrv_merge_dirty_bitmap(coarse, fine, backup=True)
    assert old is not None and old.is_empty()
    assert ranges(coarse) == [(65536, 65536)]
    bdrv_merge_dirty_bitmap(same, fine)
    assert ranges(same) == ranges(fine)
    bdrv_merge_dirty_bitmap(fine, coarse)
    assert ranges(fine) == [(65536, 65536)]
    other = BdrvDirtyBitmap(None, 2 * MiB, 512, "o")
    with pytest.raises(BlockError, match=r"Bitmaps are of different sizes \(destination size is "
                       r"4194304, source size is 2097152\) and can't be merged"):
        bdrv_merge_dirty_bitmap(fine, other)
    fine.readonly = True
    with pytest.raises(BlockError, match="readonly"):
        bdrv_merge_dirty_bitmap(fine, same)
    bdrv_merge_dirty_bitmap(same, fine)  # a readonly source is fine


def test_remove_persistent_without_driver_support(blk: BlockBackend) -> None:
    with pytest.raises(NotSupportedError, match="Can't remove persistent bitmaps from"):
        bdrv_remove_persistent_dirty_bitmap(blk.bs, "p")


# ------------------------------------------------------------------ the bitmap itself


def test_serialization_layout_is_lsb_first() -> None:
    bm = BdrvDirtyBitmap(None, 100 * 512 + 1, 512)
    assert bm.serialization_unit() == 4096
    assert bm.serialization_size(0, bm.size) == 13  # 101 granules
    bm.set(0, 512)
    bm.set(9 * 512, 1)
    bm.set(100 * 512, 1)  # the last, partial granule
    data = bm.serialize_part(0, bm.size)
    assert data[0] == 0x01 and data[1] == 0x02 and data[12] == 0x10
    assert bm.serialize_part(4096, 4096) == b"\x02"
    copy = BdrvDirtyBitmap(None, bm.size, 512)
    copy.deserialize_part(data, 0, bm.size)
    assert ranges(copy) == ranges(bm)
    copy.deserialize_ones(8 * 4096, bm.size - 8 * 4096)
    assert copy.serialize_part(0, bm.size)[8:] == b"\xff" * 4 + b"\x1f"  # no bits past the end
    assert copy.count() == (1 + 1 + 37) * 512
    copy.deserialize_zeroes(0, 4096)
    assert not copy.get(0) and copy.get(9 * 512)
    with pytest.raises(BlockError, match="not aligned"):
        bm.serialize_part(512, 4096)


def test_resize_drops_bits_past_the_end() -> None:
    bm = BdrvDirtyBitmap(None, 64 * 512, 512)
    bm.set(0, 64 * 512)
    bm.resize(13 * 512)
    assert bm.serialize_part(0, bm.size) == b"\xff\x1f"
    bm.resize(64 * 512)
    assert ranges(bm) == [(0, 13 * 512)]
    assert bm.next_zero(0) == 13 * 512
    bm.resize(0)
    assert bm.is_empty() and bm.next_dirty(0) == -1 and bm.next_zero(0) == -1


G = 512


@settings(max_examples=200, deadline=None)
@given(
    nbits=st.integers(1, 300),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 300 * G), st.integers(0, 40 * G)),
                 max_size=25),
    probe=st.integers(0, 301 * G),
)
def test_queries_match_a_model(nbits: int, ops: list[tuple[bool, int, int]], probe: int) -> None:
    size = nbits * G - (G // 2 if nbits > 1 else 0)
    bm = BdrvDirtyBitmap(None, size, G)
    model = [False] * nbits
    for value, off, length in ops:
        (bm.set if value else bm.reset)(off, length)
        if length and off < size:
            for i in range(off // G, min(nbits, (min(off + length, size) - 1) // G + 1)):
                model[i] = value
    got = [bm.get(i * G) for i in range(nbits)]
    assert got == model
    assert bm.count() == sum(model) * G
    # next_dirty / next_zero from an arbitrary offset
    want_dirty = next((max(probe, i * G) for i in range(probe // G, nbits) if model[i]), -1)
    want_zero = next((max(probe, i * G) for i in range(probe // G, nbits) if not model[i]), -1)
    assert bm.next_dirty(probe) == (want_dirty if 0 <= want_dirty < size else -1)
    assert bm.next_zero(probe) == (want_zero if 0 <= want_zero < size else -1)
    # dirty ranges reassemble the model
    rebuilt = [False] * nbits
    for start, length in bm.dirty_ranges():
        assert length > 0
        for i in range(start // G, (start + length - 1) // G + 1):
            rebuilt[i] = True
    assert rebuilt == model
    # serialization round trip
    other = BdrvDirtyBitmap(None, size, G)
    other.deserialize_part(bm.serialize_part(0, size), 0, size)
    assert [other.get(i * G) for i in range(nbits)] == model

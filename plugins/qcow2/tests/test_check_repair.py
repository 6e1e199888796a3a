"""``check -r`` against qemu-img: images whose refcount structure is broken (a table entry
past the end of the file, a refcount block on top of an L2 table, a zeroed block, reserved
bits) are repaired by rebuilding it, printing what qemu-img prints; afterwards qemu-img
check finds nothing and the guest data reads back unchanged. A crash at every write of the
rebuild leaves an image that qemu-img accepts or that a second repair fixes."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from blockcore_qcow2.check import check_image
from blockcore_qcow2.image import Qcow2Image

from blockcore.types import BdrvCheckMode, BdrvCheckResult

from .conftest import create, qemu_img, qemu_io, requires_qemu, to_raw
from .memfile import MemFile

pytestmark = requires_qemu

CS = 4096
ALL = BdrvCheckMode.FIX_LEAKS | BdrvCheckMode.FIX_ERRORS


def ours(*args: str) -> subprocess.CompletedProcess[str]:
    """blockcore-img, its error prefix spelled as qemu-img's (it prints the name invoked)."""
    proc = subprocess.run([sys.executable, "-m", "blockcore.img", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    proc.stderr = proc.stderr.replace("blockcore-img: ", "qemu-img: ")
    return proc


def qcheck(path: Path) -> dict[str, Any]:
    proc = qemu_img("check", "--output=json", str(path), check=False)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """An image with 64-bit refcounts on 4 KiB clusters (512 clusters per refcount block,
    so several blocks), data spread over 6 MiB, a snapshot and copy-on-write after it."""
    tmp = tmp_path_factory.mktemp("pristine")
    path = create(tmp / "p.qcow2", "8M", "cluster_size=4k,refcount_bits=64")
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 3M 1M", "write -P 0x33 5M 1M")
    qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io(path, "write -P 0x44 512k 1M", "write -P 0x55 7M 4k")
    assert qcheck(path)["check-errors"] == 0 and "leaks" not in qcheck(path)
    return path, to_raw(path, tmp / "p.raw")


def _reftable(img: bytearray) -> tuple[int, list[int]]:
    offset, clusters = struct.unpack_from(">QI", img, 48)
    return offset, list(struct.unpack_from(f">{clusters * CS // 8}Q", img, offset))


def _set_reftable_entry(img: bytearray, index: int, value: int) -> None:
    offset, _ = _reftable(img)
    struct.pack_into(">Q", img, offset + 8 * index, value)


def entry_past_eof(img: bytearray) -> None:
    _set_reftable_entry(img, 0, -(-len(img) // CS) * CS + 16 * CS)


def block_on_l2_table(img: bytearray) -> None:
    l1_offset = struct.unpack_from(">Q", img, 40)[0]
    l2 = struct.unpack_from(">Q", img, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    _set_reftable_entry(img, 0, l2)


def zeroed_block(img: bytearray) -> None:
    block = _reftable(img)[1][1]
    img[block : block + CS] = bytes(CS)


def reserved_bits(img: bytearray) -> None:
    _, table = _reftable(img)
    _set_reftable_entry(img, 1, table[1] | 1)


CASES: dict[str, Callable[[bytearray], None]] = {
    "entry-past-eof": entry_past_eof, "block-on-l2-table": block_on_l2_table,
    "zeroed-block": zeroed_block, "reserved-bits": reserved_bits,
}

#: Cases whose repair fails in QEMU 7.2 (and succeeds here).
QEMU_FAILS = {"reserved-bits"}


@pytest.mark.parametrize("name", list(CASES))
def test_repair_all_rebuilds_like_qemu(tmp_path: Path, pristine: tuple[Path, bytes],
                                       name: str) -> None:  # fmt: skip
    src, guest = pristine
    img = bytearray(src.read_bytes())
    CASES[name](img)
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    theirs.write_bytes(bytes(img))
    mine.write_bytes(bytes(img))
    before = qcheck(mine)
    assert before.get("corruptions", 0) > 0, before  # the poke really broke something

    q = qemu_img("check", "-r", "all", str(theirs), check=False)
    o = ours("check", "-r", "all", str(mine))
    assert "Rebuilding refcount structure" in o.stderr
    if name in QEMU_FAILS:
        # QEMU places a new block on the old one its overlap check still protects, and
        # gives up; we finish the repair. Up to that point the lines are the same.
        assert q.returncode == 1 and "Preventing invalid write" in q.stderr, q.stderr
        assert o.returncode == 0, o.stderr
        upto = q.stderr.index("Rebuilding refcount structure\n") + 30
        assert o.stderr[:upto] == q.stderr[:upto]
    else:
        assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode)

    after = qcheck(mine)
    assert after.get("corruptions", 0) == 0 and after["check-errors"] == 0, after
    assert after.get("leaks", 0) == 0
    assert to_raw(mine, tmp_path / "mine.raw") == guest
    assert qemu_img("compare", str(src), str(mine), check=False).returncode == 0
    if name not in QEMU_FAILS:
        # the same algorithm puts the new structure at the same place
        assert mine.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("name", list(CASES))
def test_repair_leaks_refuses_to_rebuild(tmp_path: Path, pristine: tuple[Path, bytes],
                                         name: str) -> None:  # fmt: skip
    src, _ = pristine
    img = bytearray(src.read_bytes())
    CASES[name](img)
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    theirs.write_bytes(bytes(img))
    mine.write_bytes(bytes(img))
    q = qemu_img("check", "-r", "leaks", str(theirs), check=False)
    o = ours("check", "-r", "leaks", str(mine))
    assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode)
    assert o.returncode == 1 and "ERROR need to rebuild refcount structures" in o.stderr
    q = qemu_img("check", str(theirs), check=False)
    o = ours("check", str(mine))
    assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode)


def test_corrupt_bit_cleared_by_repair(tmp_path: Path, pristine: tuple[Path, bytes]) -> None:
    src, guest = pristine
    img = bytearray(src.read_bytes())
    zeroed_block(img)
    struct.pack_into(">Q", img, 72, struct.unpack_from(">Q", img, 72)[0] | 2)  # corrupt bit
    path, theirs = tmp_path / "c.qcow2", tmp_path / "theirs.qcow2"
    path.write_bytes(bytes(img))
    theirs.write_bytes(bytes(img))
    assert ours("check", str(path)).returncode == 2  # read-only: reported, not touched
    assert path.read_bytes() == bytes(img)
    repaired = ours("check", "-r", "all", str(path))
    q = qemu_img("check", "-r", "all", str(theirs), check=False)
    assert (repaired.stdout, repaired.stderr, repaired.returncode) == \
        (q.stdout, q.stderr, q.returncode) == (q.stdout, q.stderr, 0)  # fmt: skip
    assert path.read_bytes() == theirs.read_bytes()
    assert json.loads(qemu_img("info", "--output=json", str(path)).stdout)[
        "format-specific"]["data"]["corrupt"] is False
    assert qcheck(path).get("corruptions", 0) == 0
    assert to_raw(path, tmp_path / "c.raw") == guest


async def _repair(mem: MemFile) -> BdrvCheckResult:
    result = BdrvCheckResult()
    img = await Qcow2Image.open(mem, read_only=False)
    try:
        await check_image(img, result, ALL)
    finally:
        await img.close()
    return result


@pytest.mark.parametrize("name", ["zeroed-block", "block-on-l2-table"])
def test_crash_during_rebuild(tmp_path: Path, pristine: tuple[Path, bytes], name: str) -> None:
    src, guest = pristine
    img = bytearray(src.read_bytes())
    CASES[name](img)
    broken = bytes(img)
    full = MemFile(broken)
    result = asyncio.run(_repair(full))
    assert "Rebuilding refcount structure" in result.messages
    total = full.writes
    assert total >= 4
    path = tmp_path / "crash.qcow2"
    second_repairs = 0
    for n in range(total):
        mem = MemFile(broken)
        mem.crash_after = n
        asyncio.run(_repair(mem))
        mem.save(path)
        res = qcheck(path)
        if res.get("corruptions", 0) or res["check-errors"]:
            # the header still names the old structure: a second repair must finish the job
            second_repairs += 1
            again = MemFile(bytes(mem.buf))
            asyncio.run(_repair(again))
            again.save(path)
            res = qcheck(path)
        assert res.get("corruptions", 0) == 0 and res["check-errors"] == 0, (n, total, res)
        assert to_raw(path, tmp_path / "crash.raw") == guest, (n, total)
    # crashing before the header switch leaves the broken image; after it, a good one
    assert 0 < second_repairs < total


def test_engine_opens_image_with_bad_reftable_entries(pristine: tuple[Path, bytes]) -> None:
    src, _ = pristine
    img = bytearray(src.read_bytes())
    offset, table = _reftable(img)
    struct.pack_into(">Q", img, offset + 8, table[1] + 512)  # misaligned block

    async def go() -> None:
        image = await Qcow2Image.open(MemFile(bytes(img), "bad.qcow2"))
        assert await image.refcounts.get(0) == 1  # block 0 is fine
        with pytest.raises(OSError, match="not cluster aligned") as exc:
            await image.refcounts.get(512)
        assert exc.value.errno == 5 and exc.value.filename == "bad.qcow2"

    asyncio.run(go())


def test_leak_past_end_of_file_counts_in_image_end(tmp_path: Path) -> None:
    path = create(tmp_path / "l.qcow2", "1M")
    img = bytearray(path.read_bytes())
    img[0x20000 + 14 : 0x20000 + 16] = b"\0\1"  # cluster 7 counted, referenced by nothing
    img += bytes(0x80000 - len(img))
    path.write_bytes(bytes(img))
    shutil.copy(path, tmp_path / "q.qcow2")
    q = qemu_img("check", str(tmp_path / "q.qcow2"), check=False)
    o = ours("check", str(path))
    assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode)
    assert "Image end offset: 524288" in o.stdout and o.returncode == 3


def _random_damage(img: bytearray, rnd: random.Random) -> list[str]:
    """One to three pokes into refcount table, refcount blocks and the first L2 table."""
    offset, clusters = struct.unpack_from(">QI", img, 48)
    nb_clusters = len(img) // CS
    done = []
    for _ in range(rnd.randint(1, 3)):
        table = list(struct.unpack_from(f">{clusters * CS // 8}Q", img, offset))
        blocks = [b for b in table if b]
        kind = rnd.choice(["block-entry", "table-entry", "table-zero", "block-zero",
                           "l2-copied", "l2-offset"])  # fmt: skip
        if not blocks and kind in ("block-entry", "table-zero", "block-zero"):
            continue
        done.append(kind)
        if kind == "block-entry":
            struct.pack_into(">Q", img, rnd.choice(blocks) + 8 * rnd.randrange(CS // 8),
                             rnd.choice([0, 1, 2, 3]))  # fmt: skip
        elif kind == "table-entry":
            struct.pack_into(">Q", img, offset + 8 * rnd.randrange(len(blocks) + 1),
                             rnd.randrange(nb_clusters + 4) * CS)  # fmt: skip
        elif kind == "table-zero":
            struct.pack_into(">Q", img, offset + 8 * rnd.randrange(len(blocks)), 0)
        elif kind == "block-zero":
            block = rnd.choice(blocks)
            img[block : block + CS] = bytes(CS)
        else:
            l1 = struct.unpack_from(">Q", img, 40)[0]
            l2 = struct.unpack_from(">Q", img, l1)[0] & 0x00FFFFFFFFFFFE00
            used = [i for i in range(CS // 8) if struct.unpack_from(">Q", img, l2 + 8 * i)[0]]
            i = rnd.choice(used)
            e = struct.unpack_from(">Q", img, l2 + 8 * i)[0]
            e = e ^ 1 << 63 if kind == "l2-copied" else e & 1 << 63 | rnd.randrange(nb_clusters) * CS
            struct.pack_into(">Q", img, l2 + 8 * i, e)
    return done


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """Images with refcounts narrower than a byte (no snapshot: counts stay at 1)."""
    tmp = tmp_path_factory.mktemp("narrow")
    out = {}
    for bits in (1, 2, 4):
        path = create(tmp / f"n{bits}.qcow2", "8M", f"cluster_size=4k,refcount_bits={bits}")
        qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 3M 1M", "write -P 0x33 5M 64k")
        out[bits] = path.read_bytes()
    return out


@pytest.mark.parametrize("seed", range(8))
def test_random_damage_same_as_qemu(tmp_path: Path, pristine: tuple[Path, bytes],
                                    seed: int) -> None:  # fmt: skip
    """Whatever qemu-img check prints, repairs and writes, we print, repair and write."""
    _same_as_qemu(tmp_path, bytearray(pristine[0].read_bytes()), seed)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("seed", range(2))
def test_random_damage_narrow_refcounts(tmp_path: Path, narrow: dict[int, bytes], bits: int,
                                        seed: int) -> None:  # fmt: skip
    _same_as_qemu(tmp_path, bytearray(narrow[bits]), seed + 10 * bits)


def _same_as_qemu(tmp_path: Path, img: bytearray, seed: int) -> None:
    kinds = _random_damage(img, random.Random(seed))
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    for repair in ([], ["-r", "leaks"], ["-r", "all"]):
        theirs.write_bytes(bytes(img))
        mine.write_bytes(bytes(img))
        q = qemu_img("check", *repair, str(theirs), check=False)
        o = ours("check", *repair, str(mine))
        assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode), \
            (kinds, repair)  # fmt: skip
        assert mine.read_bytes() == theirs.read_bytes(), (kinds, repair)


@pytest.mark.parametrize("extended_l2", ["off", "on"])
def test_misaligned_preallocated_zero_cluster(tmp_path: Path, extended_l2: str) -> None:
    """-r all turns it into a plain zero cluster (fix_l2_entry_by_zero), as qemu-img does."""
    path = create(tmp_path / "z.qcow2", "4M", f"extended_l2={extended_l2}")
    qemu_io(path, "write -P 1 0 128k", "write -z 0 64k", "write -P 2 1M 64k")
    img = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", img, 40)[0]
    l2 = struct.unpack_from(">Q", img, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", img, l2, struct.unpack_from(">Q", img, l2)[0] + 0x200)
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    for repair in ([], ["-r", "leaks"], ["-r", "all"]):
        theirs.write_bytes(bytes(img))
        mine.write_bytes(bytes(img))
        q = qemu_img("check", *repair, str(theirs), check=False)
        o = ours("check", *repair, str(mine))
        assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode), repair
        assert mine.read_bytes() == theirs.read_bytes(), repair
    assert "Repairing offset=50200: Preallocated cluster" in o.stderr
    assert qcheck(mine).get("corruptions", 0) == 0


def test_misaligned_snapshot_l1_table(tmp_path: Path, pristine: tuple[Path, bytes]) -> None:
    src, _ = pristine
    img = bytearray(src.read_bytes())
    entry = struct.unpack_from(">Q", img, 64)[0]  # snapshots_offset: the first entry
    struct.pack_into(">Q", img, entry, struct.unpack_from(">Q", img, entry)[0] + 0x200)
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    for repair in ([], ["-r", "leaks"], ["-r", "all"]):
        theirs.write_bytes(bytes(img))
        mine.write_bytes(bytes(img))
        q = qemu_img("check", *repair, str(theirs), check=False)
        o = ours("check", *repair, str(mine))
        assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode), repair
        assert mine.read_bytes() == theirs.read_bytes(), repair
    assert "ERROR snapshot 1 (s1) l1_offset=0x" in o.stderr
    assert "L1 table is not cluster aligned; snapshot table entry corrupted" in o.stderr


def test_dirty_lazy_refcounts_image(tmp_path: Path) -> None:
    """Stale refcounts of a killed lazy-refcounts writer: check reports, -r leaks refuses,
    -r all rebuilds and clears the dirty bit, all as qemu-img does."""
    path = create(tmp_path / "d.qcow2", "4M", "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 128k", "-c",
                    "write -P 4 1M 64k", "-c", "sigraise 9", str(path)],
                   capture_output=True, check=False)  # fmt: skip
    img = path.read_bytes()
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    for repair in ([], ["-r", "leaks"], ["-r", "all"]):
        theirs.write_bytes(img)
        mine.write_bytes(img)
        q = qemu_img("check", *repair, str(theirs), check=False)
        o = ours("check", *repair, str(mine))
        assert (o.stdout, o.stderr, o.returncode) == (q.stdout, q.stderr, q.returncode), repair
        assert mine.read_bytes() == theirs.read_bytes(), repair
    assert "Rebuilding refcount structure" in o.stderr
    info = json.loads(qemu_img("info", "--output=json", str(mine)).stdout)
    assert info["dirty-flag"] is False

"""Damaged snapshot tables against qemu-img 7.2: images with snapshots made by ``qemu-img
snapshot -c`` get their table poked (header count and offset, an entry's L1 table offset and
size, extra data size, id and name sizes, a table running past the end of the file), then
``check``, ``check -r leaks`` and ``check -r all`` run on identical copies print the same
lines, exit alike, give the same JSON figures and leave the same bytes; opening them
(``info``, ``snapshot -l``) fails or succeeds as QEMU's open does. A crash at any write of
the repair leaves an image that a second repair finishes."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from blockcore_qcow2.check import check_image
from blockcore_qcow2.image import Qcow2Image

from blockcore.types import BdrvCheckMode, BdrvCheckResult

from .conftest import create, qemu_img, qemu_io, requires_qemu
from .memfile import MemFile
from .test_check_repair import ours

pytestmark = requires_qemu

ALL = BdrvCheckMode.FIX_LEAKS | BdrvCheckMode.FIX_ERRORS
_ENTRY = struct.Struct(">QIHHIIQII")


def _outcome(proc: subprocess.CompletedProcess[str]) -> tuple[str, str, int]:
    return proc.stdout, proc.stderr, proc.returncode


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """v3 and v2 images (4 KiB clusters) with two snapshots over different data."""
    tmp = tmp_path_factory.mktemp("snapbase")
    out = {}
    for version, compat in (("v3", "1.1"), ("v2", "0.10")):
        path = create(tmp / f"{version}.qcow2", "4M", f"cluster_size=4k,compat={compat}")
        qemu_io(path, "write -P 1 0 64k")
        qemu_img("snapshot", "-c", "s1", str(path))
        qemu_io(path, "write -P 2 0 8k", "write -P 3 1M 4k")
        qemu_img("snapshot", "-c", "s2", str(path))
        out[version] = path.read_bytes()
    return out


def entries(img: bytearray) -> list[int]:
    """Offsets of the snapshot table's entries."""
    count, pos = struct.unpack_from(">IQ", img, 60)
    out = []
    for _ in range(count):
        out.append(pos)
        head = _ENTRY.unpack_from(img, pos)
        pos = -(-(pos + _ENTRY.size + head[8] + head[2] + head[3]) // 8) * 8
    return out


def poke(fmt: str, where: Callable[[bytearray], int], value: int | Callable[[int], int]
         ) -> Callable[[bytearray], None]:  # fmt: skip
    def damage(img: bytearray) -> None:
        pos = where(img)
        old = struct.unpack_from(fmt, img, pos)[0]
        struct.pack_into(fmt, img, pos, value(old) if callable(value) else value)

    return damage


def header(offset: int) -> Callable[[bytearray], int]:
    return lambda img: offset


def entry(index: int, field: int) -> Callable[[bytearray], int]:
    return lambda img: entries(img)[index] + field


def cut_end(img: bytearray) -> None:
    del img[len(img) - 10 :]  # the end of the last name


def one_too_many(img: bytearray) -> None:
    """65537 entries (the two real ones, then all-zero ones: valid in v2) in clusters the
    refcounts cover, as qemu-iotests 261's "too many snapshots"."""
    offset = struct.unpack_from(">Q", img, 64)[0]
    end = offset + 65537 * 40
    img.extend(bytes(end - len(img)))
    struct.pack_into(">I", img, 60, 65537)
    block = struct.unpack_from(">Q", img, struct.unpack_from(">Q", img, 48)[0])[0]
    for cluster in range(offset >> 12, -(-end >> 12)):
        struct.pack_into(">H", img, block + 2 * cluster, 1)


L1_OFFSET, L1_SIZE, ID_SIZE, NAME_SIZE, EXTRA_SIZE = 0, 8, 12, 14, 36

#: name -> (base image, damage)
CASES: dict[str, tuple[str, Callable[[bytearray], None]]] = {
    "count-over-limit": ("v3", poke(">I", header(60), 70000)),
    "count-over-limit-v2": ("v2", poke(">I", header(60), 70000)),
    "count-one-over-limit-v2": ("v2", one_too_many),
    "count-one-more": ("v3", poke(">I", header(60), 3)),
    "offset-unaligned": ("v3", poke(">Q", header(64), lambda v: v + 8)),
    "offset-past-eof": ("v3", poke(">Q", header(64), 1 << 30)),
    "offset-huge": ("v3", poke(">Q", header(64), (1 << 63) - 4096)),
    "l1-offset-unaligned": ("v3", poke(">Q", entry(0, L1_OFFSET), lambda v: v + 0x200)),
    "l1-offset-past-eof": ("v3", poke(">Q", entry(0, L1_OFFSET), 1 << 30)),
    "l1-offset-zero": ("v3", poke(">Q", entry(1, L1_OFFSET), 0)),
    "l1-size-too-large": ("v3", poke(">I", entry(0, L1_SIZE), 0x10000000)),
    "l1-size-zero": ("v3", poke(">I", entry(1, L1_SIZE), 0)),
    "extra-too-large": ("v3", poke(">I", entry(1, EXTRA_SIZE), 5000)),
    "extra-zero": ("v3", poke(">I", entry(1, EXTRA_SIZE), 0)),
    "extra-8": ("v3", poke(">I", entry(0, EXTRA_SIZE), 8)),
    "extra-zero-v2": ("v2", poke(">I", entry(1, EXTRA_SIZE), 0)),
    "id-past-eof": ("v3", poke(">H", entry(1, ID_SIZE), 60000)),
    "name-size": ("v3", poke(">H", entry(0, NAME_SIZE), 3000)),
    "table-cut-at-eof": ("v3", cut_end),
}

#: -r all cases where QEMU's overlap check stops the repair after it has repaired refcounts
#: it then never writes (its driver is gone); ours are written by then: same lines, exit
#: code and corrupt bit, other refcount bytes.
BYTES_DIFFER = {"extra-8"}


def _damaged(bases: dict[str, bytes], name: str) -> bytes:
    base, damage = CASES[name]
    img = bytearray(bases[base])
    damage(img)
    return bytes(img)


def _copies(tmp_path: Path, img: bytes) -> tuple[Path, Path]:
    theirs, mine = tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
    theirs.write_bytes(img)
    mine.write_bytes(img)
    return theirs, mine


@pytest.mark.parametrize("repair", [[], ["-r", "leaks"], ["-r", "all"]],
                         ids=["check", "leaks", "all"])  # fmt: skip
@pytest.mark.parametrize("name", list(CASES))
def test_check_like_qemu(tmp_path: Path, bases: dict[str, bytes], name: str,
                         repair: list[str]) -> None:  # fmt: skip
    img = _damaged(bases, name)
    theirs, mine = _copies(tmp_path, img)
    q = qemu_img("check", *repair, str(theirs), check=False)
    o = ours("check", *repair, str(mine))
    assert _outcome(o) == _outcome(q)
    if name not in BYTES_DIFFER or repair != ["-r", "all"]:
        assert mine.read_bytes() == theirs.read_bytes()
    if repair == ["-r", "all"] and q.returncode == 0:
        # repaired: qemu-img finds nothing and lists the same snapshots in both
        assert qemu_img("check", str(mine), check=False).returncode == 0
        listing = qemu_img("snapshot", "-l", str(mine)).stdout
        assert listing == qemu_img("snapshot", "-l", str(theirs)).stdout
        assert listing.count("\n") >= 3  # a title, a heading and snapshots


@pytest.mark.parametrize("repair", [[], ["-r", "all"]], ids=["check", "all"])
@pytest.mark.parametrize("name", ["count-one-more", "extra-too-large", "extra-zero",
                                  "l1-offset-past-eof", "offset-past-eof", "offset-unaligned",
                                  "id-past-eof"])  # fmt: skip
def test_json_figures_like_qemu(tmp_path: Path, bases: dict[str, bytes], name: str,
                                repair: list[str]) -> None:  # fmt: skip
    theirs, mine = _copies(tmp_path, _damaged(bases, name))
    q = qemu_img("check", "--output=json", *repair, str(theirs), check=False)
    o = ours("check", "--output=json", *repair, str(mine))
    assert (o.stderr, o.returncode) == (q.stderr, q.returncode)
    if not q.stdout:  # the check failed: no figures
        assert not o.stdout
        return
    figures: dict[str, Any] = json.loads(o.stdout)
    theirs_figures = json.loads(q.stdout)
    assert figures.pop("filename") == str(mine)
    assert theirs_figures.pop("filename") == str(theirs)
    assert figures == theirs_figures


@pytest.mark.parametrize("name", list(CASES))
def test_open_like_qemu(tmp_path: Path, bases: dict[str, bytes], name: str) -> None:
    """A normal open reads the table: a bad pointer or table refuses it with QEMU's message
    (and hint); what only check reports (v3 entries without the disk size, bad L1 tables)
    opens."""
    path = tmp_path / "d.qcow2"
    path.write_bytes(_damaged(bases, name))
    for command in (["info"], ["snapshot", "-l"]):
        q = qemu_img(*command, str(path), check=False)
        assert _outcome(ours(*command, str(path))) == _outcome(q), command


def test_open_errors_name_errno_and_file(tmp_path: Path, bases: dict[str, bytes]) -> None:
    from blockcore import graph
    from blockcore.errors import BlockError
    from blockcore.types import OpenFlags

    expect = {"offset-unaligned": (22, "Snapshot table offset invalid"),
              "count-over-limit": (27, "Snapshot table too large"),
              "extra-too-large": (27, "Too much extra metadata in snapshot table entry 1")}
    for name, (code, message) in expect.items():
        path = tmp_path / f"{name}.qcow2"
        path.write_bytes(_damaged(bases, name))
        with pytest.raises(BlockError) as exc:
            graph.bdrv_open(str(path), {"driver": "qcow2"}, OpenFlags.NONE)
        assert (exc.value.errno, exc.value.strerror) == (code, message)
        assert exc.value.filename == str(path)
        # check mode opens it: the check itself reports the table
        bs = graph.bdrv_open(str(path), {"driver": "qcow2"}, OpenFlags.CHECK)
        graph.bdrv_unref(bs)


def _too_big_table(tmp_path: Path) -> Path:
    """qemu-iotests 261's "snapshot table too big": entries of 1 KiB extra data and 64 KiB
    id and name (sparse) at 1 MiB, until the table passes QEMU's 64 MiB limit by one; the
    last one has an L1 table (two clusters before 1 MiB) with an L2 table after it."""
    path = create(tmp_path / "big.qcow2", "64M")
    img = bytearray(path.read_bytes())
    sn_size = 40 + 1024 + 65535 + 65535 + 2
    entry = bytearray(40)
    struct.pack_into(">HH", entry, 12, 0xFFFF, 0xFFFF)
    struct.pack_into(">I", entry, 36, 1024)
    offset, written, count = 1 << 20, 0, 0
    pieces = []
    while written <= 64 << 20:
        pieces.append(offset)
        offset += sn_size
        written += sn_size
        count += 1
    with path.open("r+b") as f:
        f.truncate(offset)
        for i, pos in enumerate(pieces):
            f.seek(pos)
            if i == count - 1:
                last = bytearray(entry)
                struct.pack_into(">QI", last, 0, (1 << 20) - 2 * 65536, 1)
                f.write(last)
            else:
                f.write(entry)
        f.seek((1 << 20) - 2 * 65536)
        f.write(struct.pack(">Q", 1 << 63 | (1 << 20) - 65536))
        # the table, the L1 and the L2 table counted in refcount block 0 (16-bit entries)
        reftable = struct.unpack_from(">Q", img, 48)[0]
        block = struct.unpack_from(">Q", img, reftable)[0]
        for cluster in range(((1 << 20) - 2 * 65536) >> 16, -(-offset // 65536)):
            f.seek(block + 2 * cluster)
            f.write(b"\0\1")
        f.seek(60)
        f.write(struct.pack(">IQ", count, 1 << 20))
    return path


def test_table_too_big_like_qemu(tmp_path: Path) -> None:
    path = _too_big_table(tmp_path)
    img = path.read_bytes()
    theirs, mine = _copies(tmp_path, img)
    q = qemu_img("info", str(mine), check=False)
    assert _outcome(ours("info", str(mine))) == _outcome(q)
    assert "Snapshot table is too big" in q.stderr
    for command in (["check"], ["check", "-r", "all"]):
        q = qemu_img(*command, str(theirs), check=False)
        o = ours(*command, str(mine))
        assert _outcome(o) == _outcome(q), command
    assert "Discarding 1 overhanging snapshots (snapshot table is too big)" in o.stderr
    assert o.returncode == 0
    assert mine.read_bytes() == theirs.read_bytes()
    count = struct.unpack_from(">I", mine.read_bytes(), 60)[0]
    assert count == struct.unpack_from(">I", img, 60)[0] - 1


async def _repair(mem: MemFile) -> BdrvCheckResult:
    result = BdrvCheckResult()
    img = await Qcow2Image.open(mem, read_only=False)
    try:
        await check_image(img, result, ALL)
        await img.close()
    except OSError:
        if mem.crash_after is None:
            raise  # only a crashed run may fail (its writes vanish)
    return result


def _qcheck(path: Path) -> dict[str, Any]:
    return json.loads(qemu_img("check", "--output=json", str(path), check=False).stdout)


@pytest.mark.parametrize("name", ["count-one-more", "extra-too-large", "extra-zero",
                                  "count-one-over-limit-v2", "name-size"])  # fmt: skip
def test_crash_during_repair(tmp_path: Path, bases: dict[str, bytes], name: str) -> None:
    """Drop every write after the N-th: the image is the damaged one (maybe with leaks and
    some refcounts already repaired) or the repaired one; never worse, and a second repair
    finishes it with the snapshots the uninterrupted repair keeps."""
    broken = _damaged(bases, name)
    full = MemFile(broken)
    asyncio.run(_repair(full))
    path = tmp_path / "crash.qcow2"
    full.save(path)
    assert _qcheck(path).get("corruptions", 0) == 0
    want = qemu_img("snapshot", "-l", str(path)).stdout
    total = full.writes
    assert total >= 1
    for n in range(total):
        mem = MemFile(broken)
        mem.crash_after = n
        asyncio.run(_repair(mem))
        again = MemFile(bytes(mem.buf))
        asyncio.run(_repair(again))
        again.save(path)
        res = _qcheck(path)
        assert res.get("corruptions", 0) == 0 and res["check-errors"] == 0, (n, total, res)
        assert qemu_img("snapshot", "-l", str(path)).stdout == want, (n, total)

"""Internal snapshots, both ways against qemu-img: its snapshots listed, applied and deleted
by us, ours by qemu-img (check clean, same listing modulo dates, data equal), and a crash at
every write of create/apply/delete leaving an image check finds without errors."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from blockcore_qcow2 import snapshot
from blockcore_qcow2.image import Qcow2Image

from .conftest import create, info, qemu_img, qemu_io, requires_qemu, to_raw
from .memfile import MemFile
from .test_engine_write import new_image

pytestmark = requires_qemu

MiB = 1 << 20


def ours(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "blockcore.img", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    if check and proc.returncode:
        raise AssertionError(f"blockcore-img {args}: {proc.stdout}{proc.stderr}")
    return proc


def check_clean(path: Path) -> dict[str, Any]:
    proc = qemu_img("check", "--output=json", str(path), check=False)
    res = json.loads(proc.stdout)
    assert proc.returncode == 0 and not res.get("leaks") and not res.get("corruptions"), \
        proc.stdout + proc.stderr  # fmt: skip
    return res  # type: ignore[no-any-return]


def listing(text: str) -> str:
    """``snapshot -l`` output without dates."""
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", text)


def snaps(path: Path) -> list[dict[str, Any]]:
    return info(path).get("snapshots", [])  # type: ignore[no-any-return]


def strip_dates(sn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if not k.startswith("date")} for s in sn]


OPTS = ["", "compat=0.10", "cluster_size=512", "cluster_size=4k,refcount_bits=64",
        "cluster_size=16k,extended_l2=on", "refcount_bits=2", "lazy_refcounts=on"]  # fmt: skip


def _fill(path: Path, rounds: list[list[str]]) -> None:
    for cmds in rounds:
        qemu_io(path, *cmds)


ROUND1 = ["write -P 0x11 0 192k", "write -P 0x12 1M 64k", "write -z 2M 128k",
          "write -c -P 0x13 3M 64k"]  # fmt: skip
ROUND2 = ["write -P 0x21 64k 64k", "write -P 0x22 1M 4k", "discard 2M 64k",
          "write -P 0x23 3584k 512k"]  # fmt: skip
ROUND3 = ["write -P 0x31 0 4k", "write -z -u 3584k 64k"]


@pytest.mark.parametrize("opts", OPTS)
def test_qemu_snapshots_through_blockcore(tmp_path: Path, opts: str) -> None:
    img = create(tmp_path / "q.qcow2", "4M", opts)
    raws = []
    for i, rnd in enumerate((ROUND1, ROUND2)):
        _fill(img, [rnd])
        raws.append(to_raw(img, tmp_path / "r.raw"))
        qemu_img("snapshot", "-c", f"snap{i}", str(img))
    _fill(img, [ROUND3])
    current = to_raw(img, tmp_path / "r.raw")
    # listing and info agree with qemu-img
    assert ours("snapshot", "-l", str(img)).stdout == qemu_img("snapshot", "-l", str(img)).stdout
    a = json.loads(ours("info", "--output=json", str(img)).stdout)
    assert a["snapshots"] == snaps(img)
    # apply the older one by name, check data and consistency
    ours("snapshot", "-a", "snap0", str(img))
    check_clean(img)
    assert to_raw(img, tmp_path / "r.raw") == raws[0]
    # apply by id
    ours("snapshot", "-a", "2", str(img))
    assert to_raw(img, tmp_path / "r.raw") == raws[1]
    check_clean(img)
    # delete one: the other still applies (by qemu-img) and the image stays clean
    ours("snapshot", "-d", "snap1", str(img))
    res = check_clean(img)
    assert [s["name"] for s in snaps(img)] == ["snap0"]
    qemu_img("snapshot", "-a", "snap0", str(img))
    assert to_raw(img, tmp_path / "r.raw") == raws[0]
    ours("snapshot", "-d", "snap0", str(img))
    assert snaps(img) == []
    after = check_clean(img)
    assert after["image-end-offset"] <= res["image-end-offset"]
    del current


# refcount_bits=2: qemu-img cannot apply a snapshot when three references exist (it counts
# the fourth before dropping one), so the reverse direction uses 8 bits.
@pytest.mark.parametrize("opts", [o.replace("refcount_bits=2", "refcount_bits=8") for o in OPTS])
def test_our_snapshots_through_qemu(tmp_path: Path, opts: str) -> None:
    q = create(tmp_path / "q.qcow2", "4M", opts)
    b = create(tmp_path / "b.qcow2", "4M", opts)
    raws = []
    for i, rnd in enumerate((ROUND1, ROUND2)):
        for path in (q, b):
            _fill(path, [rnd])
        raws.append(to_raw(q, tmp_path / "r.raw"))
        qemu_img("snapshot", "-c", f"snap{i}", str(q))
        ours("snapshot", "-c", f"snap{i}", str(b))
        check_clean(b)
    for path in (q, b):
        _fill(path, [ROUND3])
    assert listing(qemu_img("snapshot", "-l", str(b)).stdout) == \
        listing(qemu_img("snapshot", "-l", str(q)).stdout)  # fmt: skip
    assert strip_dates(snaps(b)) == strip_dates(snaps(q))
    assert to_raw(b, tmp_path / "r.raw") == to_raw(q, tmp_path / "r2.raw")
    for name, raw in (("snap0", raws[0]), ("snap1", raws[1])):
        qemu_img("snapshot", "-a", name, str(b))
        check_clean(b)
        assert to_raw(b, tmp_path / "r.raw") == raw
        qemu_io(b, "write -P 0x44 128k 64k")  # writes after apply COW away from the snapshot
    qemu_img("snapshot", "-d", "snap1", str(b))
    check_clean(b)
    qemu_img("snapshot", "-a", "snap0", str(b))
    assert to_raw(b, tmp_path / "r.raw") == raws[0]


def test_cli_output_matches_qemu_img(tmp_path: Path) -> None:
    seq = ["-c s1", "-c s1", "-c 2", "-l", "-a nope", "-d nope", "-d 1", "-a 1", "-d s1", "-l",
           "-c s9", "-l", "-c ", "-l", "-d ", "-l"]  # fmt: skip
    results = {}
    for tool in ("qemu-img", "ours"):
        path = create(tmp_path / f"{tool}.qcow2", "4M")
        qemu_io(path, "write -P 1 0 64k")
        log = []
        for action in seq:
            flag, _, name = action.partition(" ")
            args = ["snapshot", flag, *([] if flag == "-l" else [name]), str(path)]
            proc = qemu_img(*args, check=False) if tool == "qemu-img" else ours(*args, check=False)
            err = re.sub(r"^[\w-]+: ", "", proc.stderr, flags=re.MULTILINE)
            log.append((action, proc.returncode, listing(proc.stdout), err))
        results[tool] = log
    assert results["ours"] == results["qemu-img"]


def test_refcount_overflow_and_unsupported(tmp_path: Path) -> None:
    img = create(tmp_path / "r1.qcow2", "4M", "refcount_bits=1")
    other = create(tmp_path / "r1q.qcow2", "4M", "refcount_bits=1")
    for path in (img, other):
        qemu_io(path, "write 0 64k")
    proc = ours("snapshot", "-c", "s", str(img), check=False)
    ref = qemu_img("snapshot", "-c", "s", str(other), check=False)
    assert proc.returncode == ref.returncode == 1
    assert proc.stderr.split(": ", 1)[1] == ref.stderr.split(": ", 1)[1]
    assert "-22 (Invalid argument)" in proc.stderr
    check_clean(img)  # nothing was written
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(65536))
    # (-a differs: qemu-img reopens the raw node in its fallback and warns a second time)
    for args in (["-c", "s"], ["-d", "s"], ["-l"]):
        a = ours("snapshot", *args, str(raw), check=False)
        b = qemu_img("snapshot", *args, str(raw), check=False)
        strip = re.compile(r"^[\w-]+: ", re.MULTILINE)
        assert (a.returncode, a.stdout, strip.sub("", a.stderr)) == \
            (b.returncode, b.stdout, strip.sub("", b.stderr)), args  # fmt: skip


def test_apply_restores_the_disk_size(tmp_path: Path) -> None:
    img = create(tmp_path / "s.qcow2", "4M")
    qemu_io(img, "write -P 5 4032k 64k")
    ours("snapshot", "-c", "small", str(img))
    qemu_img("resize", str(img), "6M")
    qemu_io(img, "write -P 6 5M 64k")
    ours("snapshot", "-c", "big", str(img))
    ours("snapshot", "-a", "small", str(img))
    assert info(img)["virtual-size"] == 4 * MiB
    check_clean(img)
    qemu_io(img, "read -P 5 4032k 64k")
    qemu_img("snapshot", "-a", "big", str(img))
    assert info(img)["virtual-size"] == 6 * MiB
    qemu_io(img, "read -P 6 5M 64k")
    ours("snapshot", "-a", "small", str(img))
    qemu_img("snapshot", "-a", "big", str(img))
    check_clean(img)


def test_deleted_clusters_are_reused(tmp_path: Path) -> None:
    img = create(tmp_path / "s.qcow2", "4M")
    qemu_io(img, "write -P 1 0 1M")
    ours("snapshot", "-c", "s", str(img))
    qemu_io(img, "write -P 2 0 1M")  # COW: 1M more
    size_with = img.stat().st_size
    ours("snapshot", "-d", "s", str(img))
    res = check_clean(img)
    assert res["allocated-clusters"] == 16
    qemu_io(img, "write -P 3 1M 1M")  # fits into the freed clusters
    assert img.stat().st_size <= size_with
    check_clean(img)


def test_snapshot_with_backing_file_and_unknown_extra_data(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 7 0 4M")
    img = create(tmp_path / "top.qcow2", "4M", "", "-b", str(base), "-F", "qcow2")
    qemu_io(img, "write -P 8 1M 64k")
    qemu_img("snapshot", "-c", "a", str(img))
    # give the entry 8 bytes of extra data we do not know: they must survive our rewrite
    data = bytearray(img.read_bytes())
    nb, off = int.from_bytes(data[60:64], "big"), int.from_bytes(data[64:72], "big")
    assert nb == 1
    entry = bytearray(data[off : off + 40 + 24 + 1 + 1])
    entry[36:40] = (32).to_bytes(4, "big")
    new = entry[:64] + b"EXTRA!!!" + entry[64:]
    new += bytes(-len(new) % 8)
    data[off : off + len(new)] = new
    img.write_bytes(bytes(data))
    check_clean(img)
    ours("snapshot", "-c", "b", str(img))
    qemu_io(img, "write -P 9 0 64k")
    ours("snapshot", "-a", "a", str(img))
    check_clean(img)
    qemu_io(img, "read -P 7 0 64k", "read -P 8 1M 64k", "read -P 7 2M 64k")
    raw = img.read_bytes()
    nb, off = int.from_bytes(raw[60:64], "big"), int.from_bytes(raw[64:72], "big")
    assert nb == 2 and raw[off + 36 : off + 40] == (32).to_bytes(4, "big")
    assert raw[off + 64 : off + 72] == b"EXTRA!!!"


# ------------------------------------------------------------------ crash consistency


def _sn(name: str) -> dict[str, Any]:
    return {"id": "", "name": name, "vm-state-size": 0, "date-sec": 1, "date-nsec": 0,
            "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0}  # fmt: skip


async def _state(img: Qcow2Image) -> tuple[bytes, tuple[str, ...]]:
    buf = bytearray(img.header.size)
    await img.read(0, memoryview(buf))
    return bytes(buf), tuple(s.name for s in await snapshot.read_snapshots(img))


@pytest.mark.parametrize("kw", [{"cluster_bits": 12}, {"cluster_bits": 9, "refcount_order": 6},
                                {"cluster_bits": 14, "extended_l2": True}],
                         ids=["4k", "512-r64", "16k-extl2"])  # fmt: skip
def test_crash_during_create_apply_delete(tmp_path: Path, kw: dict[str, Any]) -> None:
    size = 1 * MiB
    base = new_image(size, **kw)
    pristine = bytes(base.buf)

    async def workload(img: Qcow2Image, states: list[Any] | None) -> None:
        cs = img.geo.cluster_size

        async def step(coro: Any) -> None:
            await coro
            if states is not None:
                states.append(await _state(img))

        await step(img.write(0, memoryview(b"a" * 3 * cs)))
        await step(snapshot.create(img, _sn("s1")))
        await step(img.write(cs, memoryview(b"b" * cs)))
        await step(img.write(200 * cs, memoryview(b"c" * 2 * cs)))
        await step(snapshot.create(img, _sn("s2")))
        await step(img.write(0, memoryview(b"d" * 100)))
        await step(snapshot.delete(img, None, "s1"))
        await step(snapshot.goto(img, "s2"))
        await step(snapshot.create(img, _sn("s3")))
        await step(snapshot.delete(img, "2", None))
        await step(img.write(2 * cs, memoryview(b"e" * cs)))

    def run(crash_after: int | None, states: list[Any] | None = None) -> MemFile:
        mem = MemFile(pristine)
        mem.crash_after = crash_after

        async def go() -> None:
            img = await Qcow2Image.open(mem, read_only=False)
            if states is not None:
                states.append(await _state(img))
            try:
                await workload(img, states)
                await img.close()
            except OSError:
                # after the crash point reads see what never reached the file
                if crash_after is None or mem.writes <= crash_after:
                    raise

        asyncio.run(go())
        return mem

    states: list[Any] = []
    total = run(None, states).writes
    assert total > 20
    path = tmp_path / "crash.qcow2"
    for n in range(total + 1):
        mem = run(n)
        mem.save(path)
        proc = qemu_img("check", "--output=json", str(path), check=False)
        assert proc.returncode in (0, 3), f"after {n} of {total} writes: {proc.stdout}{proc.stderr}"
        assert json.loads(proc.stdout).get("corruptions", 0) == 0

        async def read_back(data: bytes) -> Any:
            return await _state(await Qcow2Image.open(MemFile(data)))

        assert asyncio.run(read_back(bytes(mem.buf))) in states, f"after {n} of {total} writes"


def test_random_operations_against_a_model(tmp_path: Path) -> None:
    rnd = random.Random(11)
    mem = new_image(2 * MiB, cluster_bits=12)
    model = bytearray(2 * MiB)
    saved: dict[str, bytes] = {}

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        for i in range(60):
            op = rnd.choice("wwwwccad")
            if op == "w":
                off = rnd.randrange(0, 2 * MiB - 1)
                n = rnd.randrange(1, min(50000, 2 * MiB - off))
                pat = bytes([rnd.randrange(256)]) * n
                await img.write(off, memoryview(pat))
                model[off : off + n] = pat
            elif op == "c":
                name = f"n{i}"
                await snapshot.create(img, _sn(name))
                saved[name] = bytes(model)
            elif op == "a" and saved:
                name = rnd.choice(sorted(saved))
                await snapshot.goto(img, name)
                model[:] = saved[name]
            elif op == "d" and saved:
                name = rnd.choice(sorted(saved))
                await snapshot.delete(img, None, name)
                del saved[name]
            state = await _state(img)
            assert state[0] == bytes(model), (i, op)
        await img.close()

    asyncio.run(go())
    path = tmp_path / "rand.qcow2"
    mem.save(path)
    check_clean(path)
    assert [s["name"] for s in snaps(path)] == list(saved)
    for name, data in saved.items():
        qemu_img("snapshot", "-a", name, str(path))
        assert to_raw(path, tmp_path / "r.raw") == data
    check_clean(path)


def test_vmstate_is_saved_with_a_snapshot(tmp_path: Path) -> None:
    """VM state lives past the disk in the active L1: a snapshot keeps it, apply brings it
    back (ours and QEMU's, each read by the other)."""
    for maker in ("ours", "qemu"):
        img = create(tmp_path / f"{maker}.qcow2", "4M")
        io = ["-c", "write -b -P 0x11 0 64k", "-c", "write -P 0x22 0 64k"]
        if maker == "ours":
            subprocess.run([sys.executable, "-m", "blockcore.qemu_io", "-f", "qcow2", *io,
                            str(img)], check=True, capture_output=True)  # fmt: skip
            ours("snapshot", "-c", "s", str(img))
        else:
            qemu_io(img, *io[1::2])
            qemu_img("snapshot", "-c", "s", str(img))
        qemu_io(img, "write -b -P 0x33 0 64k", "write -P 0x44 0 64k")
        if maker == "ours":
            qemu_img("snapshot", "-a", "s", str(img))
        else:
            ours("snapshot", "-a", "s", str(img))
        check_clean(img)
        qemu_io(img, "read -b -P 0x11 0 64k", "read -P 0x22 0 64k")
        proc = subprocess.run([sys.executable, "-m", "blockcore.qemu_io", "-f", "qcow2", "-c",
                               "read -b -P 0x11 0 64k", str(img)], capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert "Pattern verification failed" not in proc.stdout + proc.stderr


@requires_qemu
def test_load_tmp_reads_the_snapshot_and_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    """bdrv_snapshot_load_tmp (convert/measure -l): the read-only node reads as the snapshot,
    byte for byte what qemu-img convert -l gives; QEMU's errors otherwise."""
    import errno

    from blockcore import BlockBackend, BlockError, NotSupportedError, OpenFlags
    from blockcore.manage import bdrv_snapshot_load_tmp, bdrv_snapshot_load_tmp_by_id_or_name

    img = create(tmp_path / "t.qcow2", "4M")
    qemu_io(img, "write -P 0x21 0 64k", "write -P 0x22 1M 64k")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 0x44 0 4k", "write -z 1M 64k")
    expected = tmp_path / "s1.raw"
    qemu_img("convert", "-l", "s1", "-O", "raw", str(img), str(expected))
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.NONE) as blk:
        with pytest.raises(BlockError) as info_:
            bdrv_snapshot_load_tmp(blk.bs, "9", None)
        assert (info_.value.errno, info_.value.strerror) == (errno.ENOENT, "Can't find snapshot")
        with pytest.raises(BlockError, match="both NULL"):
            bdrv_snapshot_load_tmp(blk.bs, None, None)
        bdrv_snapshot_load_tmp_by_id_or_name(blk.bs, "s1")  # not an id: found by name
        assert blk.pread(0, 4 * 1024 * 1024) == expected.read_bytes()
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        with pytest.raises(BlockError, match="Device is not readonly"):
            bdrv_snapshot_load_tmp(blk.bs, "1", None)
        assert blk.pread(0, 4096) == b"\x44" * 4096  # the active state, untouched
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    with BlockBackend.open(str(raw), {"driver": "raw"}, OpenFlags.NONE) as blk, \
            pytest.raises(NotSupportedError, match="does not support temporarily loading"):
        bdrv_snapshot_load_tmp(blk.bs, "1", None)

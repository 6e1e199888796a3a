"""Images written by the engine must pass qemu-img check and read back in qemu-io."""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from pathlib import Path

import pytest
from blockcore_qcow2.check import check_image
from blockcore_qcow2.format import empty_image
from blockcore_qcow2.image import Qcow2Image

from blockcore.types import BdrvCheckMode, BdrvCheckResult

from .conftest import create, qemu_img, requires_qemu, to_raw
from .memfile import MemFile, paused_at_data_write

pytestmark = requires_qemu

SIZE = 4 << 20


def new_image(size: int = SIZE, **kw: object) -> MemFile:
    mem = MemFile(empty_image(**kw))  # type: ignore[arg-type]

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        await img.truncate(size)
        await img.close()

    asyncio.run(go())
    return mem


def qcheck(path: Path) -> dict[str, object]:
    proc = qemu_img("check", "--output=json", str(path), check=False)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    return json.loads(proc.stdout)


OPS = [
    ("w", 0, 65536, 0x11), ("w", 100 * 1024, 3000, 0x22), ("z", 192 * 1024, 128 * 1024, 0),
    ("w", 1 << 20, 1536 * 1024, 0x33), ("d", 1100 * 1024, 64 * 1024, 0),
    ("w", 4095 * 1024, 1024, 0x44), ("w", 1100 * 1024 + 7, 100000, 0x55),
    ("zu", 2 << 20, 256 * 1024, 0), ("w", 70000, 512, 0x66),
]  # fmt: skip


async def apply_ops(img: Qcow2Image, model: bytearray, ops: list[tuple[str, int, int, int]]) -> None:
    cs = img.geo.cluster_size
    for op, off, n, pat in ops:
        if op == "w":
            await img.write(off, memoryview(bytes([pat]) * n))
            model[off : off + n] = bytes([pat]) * n
        elif op in ("z", "zu"):
            a = -(-off // img.geo.subcluster_size) * img.geo.subcluster_size
            b = (off + n) // img.geo.subcluster_size * img.geo.subcluster_size
            if a < b:
                try:
                    await img.write_zeroes(a, b - a, unmap=op == "zu")
                except OSError:
                    await img.write(a, memoryview(bytes(b - a)))
                model[a:b] = bytes(b - a)
        elif op == "d":
            await img.discard(off, n)
            a, b = -(-off // cs) * cs, (off + n) // cs * cs
            if a < b and img.header.version >= 3:
                model[a:b] = bytes(b - a)


CASES = [
    {}, {"version": 2}, {"cluster_bits": 9}, {"cluster_bits": 12}, {"cluster_bits": 21},
    {"refcount_order": 0}, {"refcount_order": 6}, {"refcount_order": 1, "cluster_bits": 9},
    {"extended_l2": True}, {"extended_l2": True, "cluster_bits": 14},
    {"compression_type": 1}, {"lazy_refcounts": True},
]  # fmt: skip


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_write_passes_qemu_check(tmp_path: Path, kw: dict[str, object]) -> None:
    mem = new_image(**kw)
    model = bytearray(SIZE)

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        await apply_ops(img, model, OPS)
        await img.close()

    asyncio.run(go())
    path = tmp_path / "ours.qcow2"
    mem.save(path)
    res = qcheck(path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res
    assert to_raw(path, tmp_path / "o.raw") == bytes(model)
    # our own check agrees
    result = BdrvCheckResult()

    async def chk() -> None:
        img = await Qcow2Image.open(MemFile.load(path))
        await check_image(img, result, BdrvCheckMode.NONE)

    asyncio.run(chk())
    assert (result.corruptions, result.leaks) == (0, 0), result.messages
    assert result.allocated_clusters == res.get("allocated-clusters", 0)
    assert result.image_end_offset == res["image-end-offset"]


def test_random_writes_over_qemu_image_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    rnd = random.Random(5)
    base_data = bytes(rnd.getrandbits(8) for _ in range(3 << 20))
    base.write_bytes(base_data)
    path = create(tmp_path / "top.qcow2", "4M", "cluster_size=4k", "-b", str(base), "-F", "raw")
    model = bytearray(base_data + bytes(SIZE - len(base_data)))
    mem = MemFile.load(path)
    bmem = MemFile.load(base)

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)

        async def rd(off: int, buf: memoryview) -> None:
            await bmem.pread(off, buf)

        img.backing = rd
        ops = []
        for _ in range(200):
            off = rnd.randrange(0, SIZE - 1)
            n = rnd.randrange(1, min(40000, SIZE - off))
            ops.append((rnd.choice("wwwzd"), off, n, rnd.randrange(256)))
        await apply_ops(img, model, ops)
        await img.close()

    asyncio.run(go())
    mem.save(path)
    res = qcheck(path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res
    assert to_raw(path, tmp_path / "o.raw") == bytes(model)


@pytest.mark.parametrize("ctype", [0, 1])
def test_compressed_write(tmp_path: Path, ctype: int) -> None:
    import zstandard

    mem = new_image(cluster_bits=12, compression_type=ctype)
    model = bytearray(SIZE)

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        for i in range(40):
            data = (f"cluster {i} " * 500).encode()[:4096]
            if ctype:
                comp = zstandard.ZstdCompressor().compress(data)
            else:
                c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
                comp = c.compress(data) + c.flush()
            await img.write_compressed(i * 4096 * 3, comp)
            model[i * 4096 * 3 : i * 4096 * 3 + 4096] = data
        await img.write(4096 * 3 + 100, memoryview(b"x" * 10))  # overwrite a compressed one
        model[4096 * 3 + 100 : 4096 * 3 + 110] = b"x" * 10
        await img.close()

    asyncio.run(go())
    path = tmp_path / "c.qcow2"
    mem.save(path)
    res = qcheck(path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res
    assert res["compressed-clusters"] == 39
    assert to_raw(path, tmp_path / "c.raw") == bytes(model)


def test_grow_refcount_table(tmp_path: Path) -> None:
    # 512-byte clusters with 64-bit refcounts: one table cluster covers 64 * 64 clusters
    size = 8 << 20
    mem = new_image(size, cluster_bits=9, refcount_order=6)

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        await img.write(0, memoryview(bytes([7]) * size))
        await img.close()

    asyncio.run(go())
    path = tmp_path / "g.qcow2"
    mem.save(path)
    res = qcheck(path)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res
    assert to_raw(path, tmp_path / "g.raw") == bytes([7]) * size


def test_check_finds_leaks_and_repairs(tmp_path: Path) -> None:
    path = create(tmp_path / "a.qcow2", "1M")
    raw = bytearray(path.read_bytes())
    # refcount block at 0x20000, 16-bit entries: mark cluster 7 used (a leak)
    raw[0x20000 + 14 : 0x20000 + 16] = b"\0\1"
    raw += bytes(0x80000 - len(raw))  # QEMU only compares clusters inside the file
    path.write_bytes(bytes(raw))
    q = qemu_img("check", str(path), check=False)
    assert q.returncode == 3
    mem = MemFile.load(path)
    result = BdrvCheckResult()

    async def go(fix: BdrvCheckMode, ro: bool) -> None:
        img = await Qcow2Image.open(mem, read_only=ro)
        await check_image(img, result, fix)
        await img.close()

    asyncio.run(go(BdrvCheckMode.NONE, True))
    assert result.leaks == 1 and "Leaked cluster 7 refcount=1 reference=0" in result.messages
    result = BdrvCheckResult()
    asyncio.run(go(BdrvCheckMode.FIX_LEAKS, False))
    assert result.leaks_fixed == 1
    mem.save(path)
    assert qemu_img("check", str(path), check=False).returncode == 0


def test_cancel_while_retaking_the_lock_after_data_io(tmp_path: Path) -> None:
    """An allocating write cancelled while it waits to take the image lock back after its
    data write still unwinds under the lock: its clusters are given back, the lock and the
    in-flight list are left clean, and later writes and qemu-img check are fine."""
    mem = new_image()
    gate, at_data = paused_at_data_write(mem)

    async def go() -> None:
        img = await Qcow2Image.open(mem, read_only=False)
        writer = asyncio.ensure_future(img.write(0, memoryview(b"\x11" * 65536)))
        await at_data.wait()  # the writer dropped the lock for its data write
        await img.lock.acquire()  # so it will have to wait to take it back
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        writer.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        img.lock.release()
        with pytest.raises(asyncio.CancelledError):
            await writer
        assert not img.lock.locked() and img.inflight == []
        await img.write(65536, memoryview(b"\x22" * 4096))
        await img.close()

    asyncio.run(go())
    mem.save(tmp_path / "c.qcow2")
    result = qcheck(tmp_path / "c.qcow2")
    assert result.get("corruptions", 0) == 0

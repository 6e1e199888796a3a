"""Crash consistency: drop every write after the N-th, for every N; qemu-img check must find
no corruption (leaks are allowed), as QEMU's ordering guarantees."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path

import pytest
from blockcore_qcow2.image import Qcow2Image

from .conftest import qemu_img, requires_qemu, to_raw
from .memfile import MemFile
from .test_engine_write import new_image

pytestmark = requires_qemu


async def workload(img: Qcow2Image) -> None:
    cs = img.geo.cluster_size
    await img.write(0, memoryview(b"a" * (3 * cs)))
    await img.write(cs // 2, memoryview(b"b" * cs))  # overwrite in place
    await img.write(10 * cs + 100, memoryview(b"c" * 200))  # partial, COW
    await img.write_zeroes(20 * cs, 4 * cs, unmap=False)
    await img.write(21 * cs, memoryview(b"d" * cs))  # allocate over a zero cluster
    await img.discard(0, 2 * cs)
    await img.write(0, memoryview(b"e" * cs))
    await img.flush_metadata()
    # enough clusters to need new L2 tables and refcount blocks
    await img.write(600 * cs, memoryview(b"f" * (40 * cs)))
    await img.truncate(img.header.size * 2)
    await img.write(img.header.size - cs, memoryview(b"g" * cs))


async def concurrent_workload(img: Qcow2Image) -> None:
    """Allocating writes in flight together (the image lock is dropped for their data
    I/O): overlapping ones wait for each other, the others interleave."""
    cs = img.geo.cluster_size

    def w(offset: int, pattern: bytes, length: int) -> Awaitable[None]:
        return img.write(offset, memoryview(pattern * length))

    await asyncio.gather(
        w(0, b"a", 3 * cs), w(cs // 2, b"b", cs), w(10 * cs + 100, b"c", 200),
        w(10 * cs + cs // 2, b"d", 100), w(600 * cs, b"f", 40 * cs), w(5 * cs, b"g", cs),
        img.write_zeroes(20 * cs, 4 * cs, unmap=False), w(21 * cs + 7, b"h", 9),
        w(1000 * cs, b"i", 3 * cs), w(1001 * cs, b"j", cs),
    )  # fmt: skip
    await img.flush_metadata()
    await asyncio.gather(img.discard(0, 2 * cs), w(cs, b"k", 2 * cs), w(4 * cs, b"l", 3 * cs),
                         w(601 * cs + 1, b"m", cs))  # fmt: skip


#: the concurrent workload's result (its overlapping requests run in a fixed order)
CONCURRENT_EXPECT = [(0, 1, 0), (1, 2, ord("k")), (3, 1, 0), (4, 3, ord("l")), (7, 3, 0),
                     (20, 1, 0), (22, 2, 0), (600, 1, ord("f")), (1000, 1, ord("i")),
                     (1001, 1, ord("j")), (1002, 1, ord("i"))]  # fmt: skip

WORKLOADS = {"serial": workload, "concurrent": concurrent_workload}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
@pytest.mark.parametrize("kw", [{"cluster_bits": 9, "refcount_order": 6},
                                {"cluster_bits": 12}, {"cluster_bits": 14, "extended_l2": True}],
                         ids=["512-r64", "4k", "16k-extl2"])  # fmt: skip
def test_crash_at_every_write(tmp_path: Path, kw: dict[str, object], name: str) -> None:
    base = new_image(1 << 20 if kw.get("cluster_bits") == 9 else 4 << 20, **kw)
    pristine = bytes(base.buf)

    def run(crash_after: int | None) -> MemFile:
        mem = MemFile(pristine)
        mem.crash_after = crash_after
        mem.yield_io = name == "concurrent"

        async def go() -> None:
            img = await Qcow2Image.open(mem, read_only=False)
            await WORKLOADS[name](img)
            await img.close()

        asyncio.run(go())
        return mem

    full = run(None)
    total = full.writes
    assert total > 10
    path = tmp_path / "crash.qcow2"
    if name == "concurrent":
        full.save(path)
        res = json.loads(qemu_img("check", "--output=json", str(path)).stdout)
        assert res.get("leaks", 0) == 0 and res.get("corruptions", 0) == 0, res
        cs = 1 << int(kw["cluster_bits"])  # type: ignore[call-overload]
        data = to_raw(path, tmp_path / "crash.raw")
        for first, count, byte in CONCURRENT_EXPECT:
            if (first + count) * cs > len(data):
                continue  # past the disk (the engine alone does not check)
            assert data[first * cs : (first + count) * cs] == bytes([byte]) * (count * cs), first
    for n in range(total + 1):
        run(n).save(path)
        proc = qemu_img("check", "--output=json", str(path), check=False)
        assert proc.returncode in (0, 3), f"after {n} of {total} writes: {proc.stdout}{proc.stderr}"
        res = json.loads(proc.stdout)
        assert res.get("corruptions", 0) == 0, (n, res)

"""Crash consistency: drop every write after the N-th, for every N; qemu-img check must find
no corruption (leaks are allowed), as QEMU's ordering guarantees."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from blockcore_qcow2.image import Qcow2Image

from .conftest import qemu_img, requires_qemu
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


@pytest.mark.parametrize("kw", [{"cluster_bits": 9, "refcount_order": 6},
                                {"cluster_bits": 12}, {"cluster_bits": 14, "extended_l2": True}],
                         ids=["512-r64", "4k", "16k-extl2"])  # fmt: skip
def test_crash_at_every_write(tmp_path: Path, kw: dict[str, object]) -> None:
    base = new_image(1 << 20 if kw.get("cluster_bits") == 9 else 4 << 20, **kw)
    pristine = bytes(base.buf)

    def run(crash_after: int | None) -> MemFile:
        mem = MemFile(pristine)
        mem.crash_after = crash_after

        async def go() -> None:
            img = await Qcow2Image.open(mem, read_only=False)
            await workload(img)
            await img.close()

        asyncio.run(go())
        return mem

    total = run(None).writes
    assert total > 10
    path = tmp_path / "crash.qcow2"
    for n in range(total + 1):
        run(n).save(path)
        proc = qemu_img("check", "--output=json", str(path), check=False)
        assert proc.returncode in (0, 3), f"after {n} of {total} writes: {proc.stdout}{proc.stderr}"
        res = json.loads(proc.stdout)
        assert res.get("corruptions", 0) == 0, (n, res)

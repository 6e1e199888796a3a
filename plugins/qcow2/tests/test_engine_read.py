"""Reading images written by qemu-img/qemu-io through the engine, byte for byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockcore_qcow2.image import Qcow2Image

from .conftest import create, qemu_img, qemu_io, requires_qemu, to_raw
from .memfile import MemFile

pytestmark = requires_qemu

WORKLOAD = (
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 3k",
    "write -z 200k 64k",
    "write -P 0x33 1M 1536k",
    "write -z -u 1100k 64k",
    "discard 1400k 128k",
    "write -P 0x44 4095k 1k",
)


def read_all(mem: MemFile, backing: MemFile | None = None, data_file: MemFile | None = None,
             chunk: int = 300 * 1024 + 512) -> bytes:
    async def go() -> bytes:
        img = await Qcow2Image.open(mem, data_file=data_file)
        if backing is not None:
            async def rd(off: int, buf: memoryview) -> None:
                await backing.pread(off, buf)
            img.backing = rd
        out = bytearray(img.header.size)
        view = memoryview(out)
        for off in range(0, len(out), chunk):
            await img.read(off, view[off : off + chunk])
        return bytes(out)
    return asyncio.run(go())


@pytest.mark.parametrize("opts", [
    "", "compat=0.10", "cluster_size=512", "cluster_size=4k", "cluster_size=2M",
    "refcount_bits=1", "refcount_bits=64", "extended_l2=on", "extended_l2=on,cluster_size=16k",
    "compression_type=zstd", "lazy_refcounts=on",
])  # fmt: skip
def test_read_matches_convert(tmp_path: Path, opts: str) -> None:
    img = create(tmp_path / "a.qcow2", "4M", opts)
    qemu_io(img, *WORKLOAD)
    assert read_all(MemFile.load(img)) == to_raw(img, tmp_path / "a.raw")


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", ["512", "4k", "64k"])
def test_read_compressed(tmp_path: Path, ctype: str, cs: str) -> None:
    src = tmp_path / "src.raw"
    data = bytearray()
    for i in range(2048):
        data += (f"block {i} " * 60).encode()[:1024]
    src.write_bytes(bytes(data) + bytes(1 << 20))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}",
             str(src), str(img))  # fmt: skip
    qemu_io(img, "write -P 7 8k 5k")
    assert read_all(MemFile.load(img)) == to_raw(img, tmp_path / "c.raw")


def test_read_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (3 << 12))  # 3M: shorter than the overlay
    img = create(tmp_path / "top.qcow2", "4M", "", "-b", str(base), "-F", "raw")
    qemu_io(img, *WORKLOAD)
    got = read_all(MemFile.load(img), backing=MemFile.load(base))
    assert got == to_raw(img, tmp_path / "top.raw")


def test_read_extended_l2_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (4 << 12))
    img = create(tmp_path / "top.qcow2", "4M", "extended_l2=on", "-b", str(base), "-F", "raw")
    qemu_io(img, "write -P 1 2k 4k", "write -z 16k 2k", "write -P 2 70k 1k", *WORKLOAD)
    got = read_all(MemFile.load(img), backing=MemFile.load(base))
    assert got == to_raw(img, tmp_path / "top.raw")


def test_read_data_file(tmp_path: Path) -> None:
    df = tmp_path / "d.raw"
    img = create(tmp_path / "d.qcow2", "4M", f"data_file={df}")
    qemu_io(img, *WORKLOAD)
    got = read_all(MemFile.load(img), data_file=MemFile.load(df))
    assert got == to_raw(img, tmp_path / "out.raw")

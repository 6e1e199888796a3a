"""qcow2 through the node graph: creation over any protocol, the core's conformance kit,
crash consistency at every write of a protocol driver below qcow2, damaged images."""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockcore
from blockcore import BdrvRequestFlags, BlockBackend, OpenFlags

from .conftest import create, qemu_img, qemu_io, requires_qemu
from .crashmem import CrashMem

MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[CrashMem]:
    drv = CrashMem()
    drv.register()
    yield drv
    drv.unregister()


def _on(mem: CrashMem, key: str, **extra: object) -> dict[str, object]:
    return {"driver": "qcow2", "file": {"driver": mem.name, "filename": key}, **extra}


@requires_qemu
@pytest.mark.parametrize("opts", [{}, {"cluster_size": "4k", "refcount_bits": 1},
                                  {"extended_l2": True, "preallocation": "metadata"},
                                  {"compat": "0.10", "preallocation": "full"}],
                         ids=["default", "4k-r1", "extl2-meta", "v2-full"])  # fmt: skip
def test_create_over_another_protocol(mem: CrashMem, tmp_path: Path,
                                      opts: dict[str, object]) -> None:  # fmt: skip
    """bdrv_co_create_opts reaches its file through the graph, so a protocol other than
    ``file`` holds the new image; qemu-img accepts what lands there."""
    blockcore.bdrv_create("qcow2", f"{mem.name}:disk", {"size": 4 * MiB, **opts})
    with BlockBackend.open(None, _on(mem, "disk"), OpenFlags.RDWR) as blk:
        assert blk.getlength() == 4 * MiB
        blk.pwrite(100_000, b"\x5a" * 300_000)
        blk.flush()
    path = tmp_path / "disk.qcow2"
    path.write_bytes(bytes(mem.images["disk"]))
    proc = qemu_img("check", str(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = qemu_io(path, "read -P 0 0 100000", "read -P 0x5a 100000 300000",
                  "read -P 0 400000 100000")  # fmt: skip
    assert "Pattern verification failed" not in out


# -------------------------------------------------------------------------------------------
# VM state
# -------------------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize(("size", "opts"), [("4M", ""), ("100k", "cluster_size=512"),
                                            ("1G", "compat=0.10,cluster_size=4k")],
                         ids=["64k", "512", "v2-4k"])  # fmt: skip
def test_vmstate_both_ways_with_qemu(tmp_path: Path, size: str, opts: str) -> None:
    """VM state lives past the disk at the L1 boundary QEMU uses: what qemu-io saves we
    load, what we save qemu-io loads, the disk is untouched and qemu-img check is clean."""
    from blockcore.special import bdrv_load_vmstate, bdrv_save_vmstate

    img = create(tmp_path / "v.qcow2", size, opts)
    qemu_io(img, "write -P 0x11 0 64k", "write -b -P 0x5a 0 64k", "write -b -P 0x6b 70144 5120")
    m = re.search(r"vm state offset: (.*)", qemu_io(img, "info"))
    assert m is not None
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:
        assert _human_size(blockcore.info.bdrv_get_info(blk.bs).vm_state_offset) == m.group(1)
        buf = bytearray(75264)
        bdrv_load_vmstate(blk.bs, buf, 0, len(buf))
        assert buf[:65536] == b"\x5a" * 65536 and buf[65536:70144] == bytes(4608)
        assert buf[70144:] == b"\x6b" * 5120
        bdrv_save_vmstate(blk.bs, b"\x7c" * 3000, 65000, 3000)  # unaligned, over both
        bdrv_save_vmstate(blk.bs, b"\x8d" * 200_000, 1 << 20, 200_000)  # new clusters
        assert blk.pread(0, 65536) == b"\x11" * 65536
    proc = qemu_img("check", str(img), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # qemu-io wants sector-aligned VM state requests
    out = qemu_io(img, "read -b -P 0x5a 0 64512", "read -b -P 0x7c 65024 2560",
                  "read -b -P 0 68096 2048", "read -b -P 0x6b 70144 5120",
                  f"read -b -P 0x8d {1 << 20} 199680", "read -P 0x11 0 64k",
                  "read -P 0 64k 36k")  # fmt: skip
    assert "Pattern verification failed" not in out
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    assert raw.stat().st_size == blockcore_size(size)


def blockcore_size(size: str) -> int:
    from blockcore.util import parse_size

    return parse_size(size)


def _human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def test_vmstate_events_and_read_only(mem: CrashMem) -> None:
    from blockcore.special import bdrv_load_vmstate, bdrv_save_vmstate

    blockcore.bdrv_create("qcow2", f"{mem.name}:vm", {"size": 1 * MiB})
    with BlockBackend.open(None, _on(mem, "vm"), OpenFlags.RDWR) as blk:
        mem.events.clear()
        bdrv_save_vmstate(blk.bs, b"abc" * 1000, 10, 3000)
        assert "vmstate_save" in mem.events and "vmstate_load" not in mem.events
        buf = bytearray(3010)
        bdrv_load_vmstate(blk.bs, buf, 0, 3010)
        assert "vmstate_load" in mem.events
        assert buf == bytes(10) + b"abc" * 1000
        assert blk.getlength() == 1 * MiB  # the disk does not grow
    with BlockBackend.open(None, _on(mem, "vm")) as blk, \
            pytest.raises(OSError, match="read-only"):  # fmt: skip
        bdrv_save_vmstate(blk.bs, b"x", 0, 1)


# -------------------------------------------------------------------------------------------
# The core's conformance kit
# -------------------------------------------------------------------------------------------

KIT_CASES = {
    "v3": ("", None),
    "v3-backing-qcow2": ("", "qcow2"),
    "v3-backing-raw-4k-r1": ("cluster_size=4k,refcount_bits=1", "raw"),
    "extl2-backing": ("extended_l2=on", "qcow2"),
    "v2": ("compat=0.10", None),
    "lazy-512": ("lazy_refcounts=on,cluster_size=512,refcount_bits=64", None),
    "zstd-prealloc": ("compression_type=zstd,preallocation=metadata", None),
}


@requires_qemu
@pytest.mark.parametrize("case", list(KIT_CASES))
def test_conformance_kit(tmp_path: Path, case: str) -> None:
    """blockcore.testing.check_driver over qcow2 on a file (discard on), with and without a
    backing file; afterwards qemu-img check is clean and the content equals ours."""
    from blockcore.testing import check_driver

    opts, backing_fmt = KIT_CASES[case]
    img = tmp_path / "kit.qcow2"
    extra: tuple[str, ...] = ()
    if backing_fmt is not None:
        base = tmp_path / f"base.{backing_fmt}"
        qemu_img("create", "-q", "-f", backing_fmt, str(base), "3M")
        qemu_io(base, "write -P 0xb5 0 1M", "write -P 0xc6 1536k 1M", fmt=backing_fmt)
        extra = ("-b", str(base), "-F", backing_fmt)
    create(img, "2M", opts, *extra)

    def open_backend() -> BlockBackend:
        return BlockBackend.open(str(img), {"discard": "unmap"}, OpenFlags.RDWR)

    check_driver(open_backend, seed=zlib.crc32(case.encode()), rounds=150)
    proc = qemu_img("check", str(img), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with BlockBackend.open(str(img)) as blk:
        ours = blk.pread(0, 2 * MiB)
    raw = tmp_path / "kit.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    assert raw.read_bytes() == ours


def test_conformance_kit_in_memory(mem: CrashMem) -> None:
    """The same kit with qcow2 over an in-process protocol driver, the image created by us."""
    from blockcore.testing import check_driver

    blockcore.bdrv_create("qcow2", f"{mem.name}:kit", {"size": 2 * MiB, "cluster_size": 16384})
    check_driver(lambda: BlockBackend.open(None, _on(mem, "kit", discard="unmap"),
                                           OpenFlags.RDWR), seed=7)  # fmt: skip


# -------------------------------------------------------------------------------------------
# Crash at every write, through the graph
# -------------------------------------------------------------------------------------------

CS = 4096


def _workload(blk: BlockBackend, marks: list[int], mem: CrashMem) -> None:
    """A small workload through a BlockBackend over qcow2 over CrashMem. ``marks`` gets the
    protocol write count after each flush: what was flushed by then must survive."""
    from blockcore.special import bdrv_save_vmstate

    blk.pwrite(0, b"A" * (3 * CS))  # allocation, L2 table
    blk.pwrite(CS // 2, b"B" * CS)  # in place
    blk.flush()
    marks.append(mem.writes)  # region [0, 3*CS) is durable from here
    blk.pwrite(10 * CS + 100, b"C" * 200)  # partial cluster: COW from zeros
    blk.pwrite_zeroes(20 * CS, 4 * CS)
    blk.pwrite(21 * CS, b"D" * CS)  # allocate over a zero cluster
    blk.pdiscard(10 * CS, 2 * CS)
    blk.pwrite(600 * CS, b"E" * (40 * CS))  # new L2 tables and refcount blocks
    blk.pwrite(40 * CS, b"F" * (4 * CS), BdrvRequestFlags.WRITE_COMPRESSED)
    bdrv_save_vmstate(blk.bs, b"G" * 5000, 100, 5000)
    blk.flush()
    marks.append(mem.writes)
    blk.truncate(8 * MiB)
    blk.pwrite(8 * MiB - CS, b"H" * CS)
    blk.pwrite(40 * CS + 10, b"I" * 10)  # COW out of a compressed cluster


@requires_qemu
@pytest.mark.parametrize("opts", [{}, {"refcount_bits": 1}, {"compat": "0.10"},
                                  {"lazy_refcounts": True}],
                         ids=["r16", "r1", "v2", "lazy"])  # fmt: skip
def test_crash_at_every_write_through_the_graph(mem: CrashMem, tmp_path: Path,
                                                 opts: dict[str, object]) -> None:  # fmt: skip
    """qcow2 over a protocol driver that loses every write after the N-th, for every N:
    qemu-img check finds no corruption (leaks allowed, and with lazy refcounts the dirty
    image is repaired), and data flushed before the crash reads back."""
    blockcore.bdrv_create("qcow2", f"{mem.name}:pristine",
                          {"size": 4 * MiB, "cluster_size": CS, **opts})  # fmt: skip
    pristine = bytes(mem.images["pristine"])

    def run(n: int | None) -> tuple[bytes, list[int]]:
        mem.images["crash"] = bytearray(pristine)
        mem.writes, mem.crash_after = 0, n
        marks: list[int] = []
        try:
            with BlockBackend.open(None, _on(mem, "crash", discard="unmap"),
                                   OpenFlags.RDWR) as blk:  # fmt: skip
                _workload(blk, marks, mem)
        except OSError:
            pass  # what the image does after the crash never reaches the disk
        finally:
            mem.crash_after = None
        return bytes(mem.images["crash"]), marks

    _, marks = run(None)
    total = mem.writes
    assert total > 30 and len(marks) == 2
    path = tmp_path / "crash.qcow2"
    for n in range(total + 1):
        data, _ = run(n)
        path.write_bytes(data)
        if opts.get("lazy_refcounts") and data[72 + 7] & 1:
            # dirty: stale refcounts are expected; QEMU repairs them (as we do on open)
            qemu_img("check", "-q", "-r", "all", str(path), check=False)
        proc = qemu_img("check", "--output=json", str(path), check=False)
        assert proc.returncode in (0, 3), f"after {n} of {total} writes: {proc.stdout}{proc.stderr}"
        assert '"corruptions"' not in proc.stdout, (n, proc.stdout)
        if n >= marks[0]:
            out = qemu_io(path, "read -P 0x41 0 2048", "read -P 0x42 2048 4096",
                          "read -P 0x41 6144 6144")  # fmt: skip
            assert "Pattern verification failed" not in out, (n, out)


# -------------------------------------------------------------------------------------------
# Damaged images through the graph
# -------------------------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _damaged_images(tmp_path: Path) -> dict[str, bytes]:
    """A small image (4 KiB clusters: data, a compressed and a zero cluster) and variants
    with truncations, fuzzed header fields, and L1/L2/refcount entries pointing outside the
    file, at metadata, at themselves, or carrying reserved bits."""
    base = create(tmp_path / "base.qcow2", "1M", "cluster_size=4k")
    qemu_io(base, "write -P 1 0 64k", "write -c -P 2 128k 4k", "write -z 256k 8k",
            "write -P 3 900k 8k")  # fmt: skip
    b = base.read_bytes()
    l1o, rto = struct.unpack_from(">Q", b, 40)[0], struct.unpack_from(">Q", b, 48)[0]
    l2 = struct.unpack_from(">Q", b, l1o)[0] & 0x00FFFFFFFFFFFE00
    rb = struct.unpack_from(">Q", b, rto)[0]
    e0 = struct.unpack_from(">Q", b, l2)[0]
    cp, cm = 1 << 63, 1 << 62  # COPIED, compressed

    def patch(fmt: str, off: int, val: int) -> bytes:
        out = bytearray(b)
        struct.pack_into(fmt, out, off, val)
        return bytes(out)

    cases = {f"truncated-{n}": b[:n] for n in (0, 3, 20, 71, 104, 4095, 4096, 8192, 12288,
                                               16384, 20480, len(b) // 2, len(b) - 1)}  # fmt: skip
    fields = {
        "l1-size-huge": (">I", 36, 0x7FFFFFFF), "l1-size-0": (">I", 36, 0),
        "l1-beyond-eof": (">Q", 40, 1 << 40), "l1-at-0": (">Q", 40, 0),
        "l1-unaligned": (">Q", 40, l1o + 8), "l1-at-reftable": (">Q", 40, rto),
        "reftable-beyond-eof": (">Q", 48, 1 << 40), "reftable-at-0": (">Q", 48, 0),
        "reftable-clusters-0": (">I", 56, 0), "reftable-clusters-huge": (">I", 56, 0xFFFFFFFF),
        "size-huge": (">Q", 24, 1 << 62), "size-0": (">Q", 24, 0), "size-1": (">Q", 24, 1),
        "cluster-bits-8": (">I", 20, 8), "cluster-bits-31": (">I", 20, 31),
        "version-4": (">I", 4, 4), "incompat-bit-5": (">Q", 72, 1 << 5),
        "incompat-corrupt": (">Q", 72, 2), "incompat-data-file": (">Q", 72, 4),
        "refcount-order-7": (">I", 96, 7), "refcount-order-0": (">I", 96, 0),
        "header-length-huge": (">I", 100, 0xFFFF), "backing-beyond-cluster": (">Q", 8, 1 << 40),
        "backing-name-huge": (">I", 16, 5000), "snapshots-huge": (">I", 60, 0xFFFFFFFF),
        "snapshot-beyond-eof": (">Q", 64, 1 << 40), "compression-type-7": (">B", 104, 7),
        "l1e-beyond-eof": (">Q", l1o, cp | 1 << 40), "l1e-unaligned": (">Q", l1o, cp | l2 + 512),
        "l1e-reserved": (">Q", l1o, cp | l2 | 1 << 60), "l1e-at-reftable": (">Q", l1o, cp | rto),
        "l1e-at-itself": (">Q", l1o, cp | l1o), "l2e-beyond-eof": (">Q", l2, cp | 1 << 40),
        "l2e-unaligned": (">Q", l2, e0 + 512), "l2e-reserved": (">Q", l2, e0 | 1 << 57),
        "l2e-at-reftable": (">Q", l2, cp | rto), "l2e-at-its-table": (">Q", l2, cp | l2),
        "l2e-compressed-huge": (">Q", l2, cm | 0xFF << 54 | 0x5000),
        "l2e-compressed-beyond-eof": (">Q", l2, cm | 1 << 50),
        "l2e-compressed-garbage": (">Q", l2, cm | rto), "reftable-entry-0": (">Q", rto, 0),
        "reftable-loop": (">Q", rto, rto), "reftable-entry-beyond-eof": (">Q", rto, 1 << 40),
        "reftable-entry-unaligned": (">Q", rto, rto + 8), "reftable-entry-at-l1": (">Q", rto, l1o),
    }  # fmt: skip
    cases.update({name: patch(*f) for name, f in fields.items()})
    cases["refblock-all-ones"] = b[:rb] + b"\xff" * 4096 + b[rb + 4096 :]
    cases["refblock-zeroed"] = b[:rb] + bytes(4096) + b[rb + 4096 :]
    cases["l2-all-ones"] = b[:l2] + b"\xff" * 4096 + b[l2 + 4096 :]
    return cases


@requires_qemu
def test_damaged_images_give_oserrors(tmp_path: Path) -> None:
    """Every damaged variant, opened through the graph read-only (read all, block status,
    check) and read-write (writes, zero write, discard, flush): each step succeeds or
    raises an OSError with a message; never another exception, a hang or a huge buffer."""
    import signal
    import tracemalloc
    from functools import partial

    from blockcore import special, status
    from blockcore.types import BdrvCheckMode

    def alarm(*_: object) -> None:
        raise _Hang

    cases = _damaged_images(tmp_path)
    path = tmp_path / "damaged.qcow2"
    errors: dict[str, list[str]] = {}
    old = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.start()
    try:
        for name, data in cases.items():
            path.write_bytes(data)
            errs = errors.setdefault(name, [])
            tracemalloc.reset_peak()
            signal.alarm(30)
            try:
                for flags in (OpenFlags.NONE, OpenFlags.RDWR):
                    try:
                        with BlockBackend.open(str(path), {"driver": "qcow2", "discard": "unmap"},
                                               flags) as blk:  # fmt: skip
                            n = min(blk.getlength(), 2 * MiB)
                            steps = [
                                partial(blk.pread, 0, n),
                                partial(status.bdrv_block_status, blk.bs, 0, n),
                                partial(special.bdrv_check, blk.bs, BdrvCheckMode.NONE),
                            ] if not flags else [
                                lambda: blk.pwrite(0, b"x" * 70000),
                                lambda: blk.pwrite(300 << 10, b"y" * 5000),
                                lambda: blk.pwrite_zeroes(128 << 10, 8192),
                                lambda: blk.pdiscard(900 << 10, 8192), blk.flush,
                            ]  # fmt: skip
                            for step in steps:
                                try:
                                    step()
                                except OSError as exc:
                                    errs.append(str(exc))
                    except OSError as exc:
                        errs.append(str(exc))
            except _Hang:
                pytest.fail(f"{name}: no answer within 30 s")
            finally:
                signal.alarm(0)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 64 * MiB, f"{name}: {peak} bytes allocated"
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    for name, errs in errors.items():
        for msg in errs:
            assert "damaged.qcow2" in msg or "request at" in msg, (name, msg)
    assert "unsupported qcow2 incompatible feature bit 5" in errors["incompat-bit-5"][0]
    assert "cannot be opened read/write" in errors["incompat-corrupt"][0]
    for name in ("l1e-at-reftable", "l1e-at-itself", "l2e-at-reftable", "l2e-at-its-table",
                 "reftable-loop", "refblock-zeroed", "l2e-reserved", "l2e-unaligned"):  # fmt: skip
        assert any("corrupt" in m for m in errors[name]), (name, errors[name])
    assert any("damaged" in m for m in errors["l2e-compressed-garbage"])
    assert any("too large" in m for m in errors["l1-size-huge"])


# -------------------------------------------------------------------------------------------
# Compressed writes: parallel compression, batched storage
# -------------------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_parallel_compressed_writes(tmp_path: Path, ctype: str) -> None:
    """Multi-cluster compressed writes, 6 in flight at once, with clusters that do not
    shrink among them and a partial last cluster: qemu-img reads back the same data, finds
    the compressed clusters, and check is clean."""
    import asyncio
    import os

    cs = 65536
    size = 40 * cs + 4096  # the last cluster is partial
    img = tmp_path / "c.qcow2"
    blockcore.bdrv_create("qcow2", str(img), {"size": size, "compression_type": ctype})
    table = bytes.maketrans(bytes(range(256)), b"abcdefgh" * 32)
    data = bytearray(os.urandom(size).translate(table))
    data[5 * cs : 7 * cs] = os.urandom(2 * cs)  # incompressible: written normally
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:

        async def go() -> None:
            async def one(start: int, n: int) -> None:
                end = min(size, start + n * cs)
                await blk.co_pwritev(start, end - start, memoryview(data)[start:end],
                                     BdrvRequestFlags.WRITE_COMPRESSED)  # fmt: skip

            await asyncio.gather(*(one(i * 8 * cs, 8) for i in range(5)), one(40 * cs, 1))

        blockcore.run(go())
        assert blk.pread(0, size) == bytes(data)
    proc = qemu_img("check", "--output=json", str(img), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"compressed-clusters": 39' in proc.stdout, proc.stdout
    raw = tmp_path / "c.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    assert raw.read_bytes() == bytes(data)


@requires_qemu
def test_preallocation_is_refused_when_shrinking(tmp_path: Path) -> None:
    """qcow2's own check and text (qcow2_co_truncate), before anything changes."""
    from blockcore.errors import BlockError
    from blockcore.types import PreallocMode

    img = create(tmp_path / "s.qcow2", "4M")
    with BlockBackend.open(str(img), {}, OpenFlags.RDWR) as blk:
        with pytest.raises(BlockError, match="preallocation can't be used for shrinking an "
                           "image") as exc:  # fmt: skip
            blk.truncate(2 * MiB, prealloc=PreallocMode.FULL)
        assert exc.value.errno == 22
        assert blk.getlength() == 4 * MiB

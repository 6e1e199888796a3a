"""Reopening a qcow2 node (QEMU's qcow2_reopen_prepare/commit/abort): read-only <->
read-write, runtime options changed by ``reopen -o`` with QEMU's messages, a failed reopen
leaving the node as it was, persistent bitmaps kept across read-write -> read-only ->
read-write. blockcore-io is compared with qemu-io on the same command lists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockcore import BlockBackend, OpenFlags, PermissionConflictError
from blockcore.errors import BlockError
from blockcore.graph import bdrv_reopen, bdrv_reopen_set_read_only

from .conftest import check_clean, create, qemu_img, qemu_io, requires_qemu
from .test_options import ERRORS

pytestmark = requires_qemu

KiB, MiB = 1 << 10, 1 << 20
_TIMING = re.compile(r"^\d.* ops; .*$", re.MULTILINE)
DIRTY_BIT = 1  # incompatible feature bit 0


def run_io(tool: str, path: Path, cmds: list[str], *args: str) -> tuple[str, str, int]:
    """qemu-io or blockcore-io on ``path``; stdout with timings dropped, stderr without the
    program name, exit status."""
    argv = ["qemu-io"] if tool == "qemu" else [sys.executable, "-m", "blockcore.qemu_io"]
    for c in cmds:
        argv += ["-c", c]
    proc = subprocess.run([*argv, *args, str(path)], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    err = re.sub(r"^(qemu-io|blockcore-io): ", "", proc.stderr, flags=re.MULTILINE)
    return _TIMING.sub("", proc.stdout), err, proc.returncode


def both(tmp_path: Path, image: Path, cmds: list[str], *args: str) -> dict[str, Any]:
    """Run ``cmds`` with both tools, each on its own copy of ``image``; assert the same
    output and exit status; return the copies."""
    out = {}
    copies = {}
    for tool in ("qemu", "ours"):
        copies[tool] = tmp_path / f"{tool}-{image.name}"
        shutil.copyfile(image, copies[tool])
        tool_cmds = [c.replace("IMG", str(copies[tool])) for c in cmds]
        got = run_io(tool, copies[tool], tool_cmds, *args)
        out[tool] = tuple(part.replace(str(copies[tool]), "IMG") if isinstance(part, str)
                          else part for part in got)  # fmt: skip
    assert out["ours"] == out["qemu"]
    return copies


def header_incompat(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[72:80], "big")


def info_u(path: Path) -> dict[str, Any]:
    """qemu-img info of an image we hold open (-U: no lock)."""
    return json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)


def bitmap_flags(path: Path) -> dict[str, list[str]]:
    data = info_u(path)["format-specific"]["data"]
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


# -------------------------------------------------------------------------------------------
# read-only <-> read-write
# -------------------------------------------------------------------------------------------


def test_read_only_to_read_write_through_the_api(tmp_path: Path) -> None:
    """The engine becomes writable: the data written reads back through qemu-io and
    qemu-img check is clean."""
    img = create(tmp_path / "a.qcow2", "4M")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.NONE) as blk:
        image = blk.bs.opaque.image
        assert image.read_only
        blk.reopen(read_only=False)
        assert not image.read_only
        blk.pwrite(64 * KiB, b"\x05" * (128 * KiB))
        blk.reopen(read_only=True)
        assert image.read_only
        with pytest.raises(OSError):
            blk.pwrite(0, b"x")
    qemu_io(img, "read -P 5 64k 128k", "read -P 0 0 64k")
    check_clean(img)


COMMANDS = {
    "ro-to-rw-write": (["reopen -w", "write -P 1 0 64k", "read -P 1 0 64k"], ["-r"]),
    "rw-to-ro-write-refused": (["write -P 2 0 4k", "reopen -r", "write 0 4k",
                                "read -P 2 0 4k"], []),
    "back-and-forth": (["reopen -r", "reopen -w", "write -P 3 1M 64k", "reopen -r",
                        "read -P 3 1M 64k"], []),
    "lazy-on-then-ro": (["reopen -o lazy-refcounts=on", "write -P 4 0 64k", "reopen -r",
                         "read -P 4 0 64k"], []),
    "lazy-off": (["reopen -o lazy-refcounts=on", "write 0 4k",
                  "reopen -o lazy-refcounts=off", "write 64k 4k"], []),
    "cache-options": (["reopen -o l2-cache-size=128k,refcount-cache-size=256k",
                       "write -P 6 0 64k", "reopen -o cache-size=1M", "read -P 6 0 64k",
                       "reopen -o overlap-check=all,cache-clean-interval=30",
                       "reopen -o pass-discard-request=on,pass-discard-other=on",
                       "discard 0 64k"], []),
    "unknown-option": (["reopen -o foo=bar", "write 0 4k"], []),
    "bad-option-keeps-read-only": (["reopen -w -o lazy-refcounts=foo", "write 0 4k",
                                    "reopen -w -o l2-cache-size=1M", "write -P 1 0 4k",
                                    "reopen -r -o overlap-check=x", "write -P 2 0 4k",
                                    "read -P 2 0 4k"], ["-r"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(COMMANDS))
def test_cli_as_qemu_io(tmp_path: Path, case: str) -> None:
    """The same command lists print the same lines from both tools; both images are clean
    and hold the same data."""
    cmds, args = COMMANDS[case]
    img = create(tmp_path / "c.qcow2", "4M")
    copies = both(tmp_path, img, cmds, *args)
    for path in copies.values():
        check_clean(path)
        assert not header_incompat(path) & DIRTY_BIT
    raw = {tool: tmp_path / f"{tool}.raw" for tool in copies}
    for tool, path in copies.items():
        qemu_img("convert", "-O", "raw", str(path), str(raw[tool]))
    assert raw["ours"].read_bytes() == raw["qemu"].read_bytes()


@pytest.mark.parametrize("opts", list(ERRORS))
def test_bad_options_as_qemu_io(tmp_path: Path, opts: str) -> None:
    """``reopen -o`` with a bad cache option: QEMU's message, and the node still works."""
    img = create(tmp_path / "e.qcow2", "64M")
    both(tmp_path, img, [f"reopen -o {opts}", "write -P 7 0 4k", "read -P 7 0 4k"])


OTHER_ERRORS = ["overlap-check=sometimes", "lazy-refcounts=maybe", "pass-discard-other=x",
                "pass-discard-request=2", "pass-discard-snapshot=", "foo=bar"]  # fmt: skip


@pytest.mark.parametrize("opts", OTHER_ERRORS)
def test_other_bad_options_as_qemu_io(tmp_path: Path, opts: str) -> None:
    """The same message at reopen and at open (the parsing is shared)."""
    img = create(tmp_path / "e.qcow2", "1M")
    both(tmp_path, img, [f"reopen -o {opts}", "write 0 4k", "close", f"open -o {opts} IMG"])
    _out, err, _rc = run_io("ours", img, [f"reopen -o {opts}"])
    assert err.startswith(("Parameter '", "Unsupported value 'sometimes'", "Cannot change"))


def test_lazy_refcounts_on_compat_0_10_as_qemu_io(tmp_path: Path) -> None:
    img = create(tmp_path / "v2.qcow2", "1M", "compat=0.10")
    both(tmp_path, img, ["reopen -o lazy-refcounts=on", "reopen -o lazy-refcounts=off",
                         "write 0 4k"])  # fmt: skip
    _out, err, _rc = run_io("ours", img, ["reopen -o lazy-refcounts=on"])
    assert err == ("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                   "compatibility level\n")  # fmt: skip


# -------------------------------------------------------------------------------------------
# Lazy refcounts and the dirty bit
# -------------------------------------------------------------------------------------------


def test_read_write_to_read_only_marks_clean(tmp_path: Path) -> None:
    """With lazy refcounts a write sets the dirty bit; reopening read-only stores the
    refcounts and clears it (qcow2_mark_clean), while the node stays open."""
    img = create(tmp_path / "l.qcow2", "4M", "lazy_refcounts=on")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"\x08" * (256 * KiB))
        assert header_incompat(img) & DIRTY_BIT
        assert info_u(img)["dirty-flag"] is True
        blk.reopen(read_only=True)
        assert not header_incompat(img) & DIRTY_BIT
        assert info_u(img)["dirty-flag"] is False
        check_clean(img)  # the refcounts are on disk while we still hold the image
        assert blk.pread(0, 4) == b"\x08" * 4
    qemu_io(img, "read -P 8 0 256k")


def test_lazy_refcounts_off_marks_a_dirty_image_clean(tmp_path: Path) -> None:
    img = create(tmp_path / "l.qcow2", "4M", "lazy_refcounts=on")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"\x09" * (64 * KiB))
        assert header_incompat(img) & DIRTY_BIT
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"lazy-refcounts": "off"})
        assert not header_incompat(img) & DIRTY_BIT
        assert not blk.bs.opaque.image.lazy_refcounts
        blk.pwrite(1 * MiB, b"\x0a" * (64 * KiB))  # refcounts written at once now
        assert not header_incompat(img) & DIRTY_BIT
        blk.flush()
        proc = qemu_img("check", "-U", str(img))
        assert "No errors were found" in proc.stdout
    assert info_u(img)["format-specific"]["data"]["lazy-refcounts"] is True  # header kept


def _dirty_image(tmp_path: Path) -> Path:
    """A lazy-refcounts image QEMU left dirty: 256 KiB written, refcounts never stored."""
    img = create(tmp_path / "d.qcow2", "4M", "lazy_refcounts=on")
    qemu_io(img, "write -P 1 0 256k", "abort", check=False)
    assert header_incompat(img) & DIRTY_BIT
    return img


def test_dirty_image_reopened_read_write_is_repaired(tmp_path: Path) -> None:
    """Opened read-only, a dirty image keeps its stale refcounts; reopened read-write it is
    repaired first, as open repairs it. (QEMU 7.2 does not repair on reopen: its new
    clusters then overlap the old ones and qemu-img check reports them referenced twice.)"""
    img = _dirty_image(tmp_path)
    out, _err, rc = run_io("ours", img, ["reopen -w", "write -P 2 1M 256k"], "-r")
    assert rc == 0 and "wrote 262144/262144 bytes at offset 1048576" in out
    check_clean(img)
    qemu_io(img, "read -P 1 0 256k", "read -P 2 1M 256k")
    assert not header_incompat(img) & DIRTY_BIT


def test_dirty_read_only_image_refuses_lazy_refcounts_off_as_qemu_io(tmp_path: Path) -> None:
    """Turning lazy refcounts off would mark the image clean, which a read-only node
    cannot write: QEMU's message; the image is left as it was."""
    img = _dirty_image(tmp_path)
    copies = both(tmp_path, img, ["reopen -o lazy-refcounts=off"], "-r")
    assert header_incompat(copies["ours"]) & DIRTY_BIT
    _out, err, _rc = run_io("ours", img, ["reopen -o lazy-refcounts=off"], "-r")
    assert err == "Failed to disable lazy refcounts: Operation not permitted\n"


def test_unknown_autoclear_bits_cleared_on_reopen_read_write(tmp_path: Path) -> None:
    """As at a read-write open: a bit we do not maintain is cleared before the first
    write (QEMU clears it only at open)."""
    img = create(tmp_path / "a.qcow2", "1M")
    data = bytearray(img.read_bytes())
    data[88:96] = (1 << 5).to_bytes(8, "big")  # autoclear_features
    img.write_bytes(data)
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.NONE) as blk:
        assert int.from_bytes(img.read_bytes()[88:96], "big") == 1 << 5
        blk.reopen(read_only=False)
        assert int.from_bytes(img.read_bytes()[88:96], "big") == 0
    check_clean(img)


# -------------------------------------------------------------------------------------------
# Options
# -------------------------------------------------------------------------------------------


def test_cache_sizes_change_and_persist(tmp_path: Path) -> None:
    """New cache sizes bound the caches at once (dirty tables are written first); options
    not given keep their values, a new cache-size replaces the partial sizes (as QEMU's
    qcow2_join_options)."""
    img = create(tmp_path / "c.qcow2", "64M", "cluster_size=4096")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        image = blk.bs.opaque.image
        l2, rc = image.l2_cache, image.refcounts.cache
        for i in range(32):
            blk.pwrite(i * 2 * MiB, bytes([i + 1]) * 4096)
        assert len(l2.tables) > 2 and l2.dirty
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"l2-cache-size": "8k"})
        assert l2.capacity == 2 and len(l2.tables) <= 2 and not l2.dirty
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"refcount-cache-size": "24k"})
        assert (l2.capacity, rc.capacity) == (2, 6)  # l2-cache-size kept
        assert blk.bs.options["l2-cache-size"] == "8k"
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"cache-size": "64k"})
        assert (l2.capacity, rc.capacity) == (12, 4)  # partial sizes dropped
        assert "l2-cache-size" not in blk.bs.options
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"l2-cache-size": "16k"})
        assert (l2.capacity, rc.capacity) == (4, 4)  # the old cache-size gave way
        for i in range(32):
            assert blk.pread(i * 2 * MiB, 4096) == bytes([i + 1]) * 4096
    check_clean(img)
    qemu_io(img, *[f"read -P {i + 1} {i * 2 * MiB} 4k" for i in range(32)])


def test_failing_option_leaves_the_node_unchanged(tmp_path: Path) -> None:
    img = create(tmp_path / "f.qcow2", "64M", "cluster_size=4096")
    with BlockBackend.open(str(img), {"driver": "qcow2", "l2-cache-size": "8k"},
                           OpenFlags.RDWR) as blk:  # fmt: skip
        image = blk.bs.opaque.image
        before = (image.l2_cache.capacity, image.lazy_refcounts, image.discard_other,
                  dict(blk.bs.options))  # fmt: skip
        for bad in ({"l2-cache-size": "32k", "overlap-check": "sometimes"},
                    {"lazy-refcounts": "on", "l2-cache-entry-size": "100"},
                    {"pass-discard-other": "on", "nonsense": "1"}):  # fmt: skip
            with pytest.raises(BlockError):
                bdrv_reopen(blk.bs, blk.bs.open_flags, bad)
            after = (image.l2_cache.capacity, image.lazy_refcounts, image.discard_other,
                     dict(blk.bs.options))  # fmt: skip
            assert after == before
        blk.pwrite(0, b"ok")
    check_clean(img)


# -------------------------------------------------------------------------------------------
# Persistent bitmaps
# -------------------------------------------------------------------------------------------


def test_bitmap_survives_read_write_read_only_read_write(tmp_path: Path) -> None:
    """Read-only, the bitmap is stored (not in-use on disk) and kept, read-only, in memory;
    read-write again it is in-use and tracks writes; after close QEMU reads both writes."""
    from .test_bitmap import qemu_dirty

    img = create(tmp_path / "b.qcow2", "4M")
    qemu_img("bitmap", "--add", "-g", "64k", str(img), "b0")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        (bm,) = blk.bs.dirty_bitmaps
        assert bitmap_flags(img) == {"b0": ["in-use", "auto"]}
        blk.pwrite(0, b"\x01" * (64 * KiB))
        blk.reopen(read_only=True)
        assert bm.readonly and bm in blk.bs.dirty_bitmaps
        assert bitmap_flags(img) == {"b0": ["auto"]}
        check_clean(img)
        blk.reopen(read_only=False)
        assert not bm.readonly
        assert bitmap_flags(img) == {"b0": ["in-use", "auto"]}
        blk.pwrite(1 * MiB, b"\x02" * (64 * KiB))
        assert list(bm.dirty_ranges()) == [(0, 64 * KiB), (MiB, 64 * KiB)]
    assert bitmap_flags(img) == {"b0": ["auto"]}
    check_clean(img)
    assert qemu_dirty(img, "b0") == [(0, 64 * KiB), (MiB, 64 * KiB)]


def test_failed_read_only_reopen_gives_the_bitmaps_back(tmp_path: Path) -> None:
    """qcow2 prepared (bitmaps stored, made read-only) but a writer holds the node: the
    abort makes them writable and in-use again; the node keeps tracking writes."""
    img = create(tmp_path / "b.qcow2", "4M")
    qemu_img("bitmap", "--add", str(img), "b0")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        (bm,) = blk.bs.dirty_bitmaps
        with pytest.raises(PermissionConflictError):
            bdrv_reopen_set_read_only(blk.bs, True)
        assert not bm.readonly and blk.bs.open_flags & OpenFlags.RDWR
        assert not blk.bs.opaque.image.read_only
        assert bitmap_flags(img) == {"b0": ["in-use", "auto"]}
        blk.pwrite(0, b"\x03" * 4096)
        assert list(bm.dirty_ranges()) == [(0, 64 * KiB)]
    assert bitmap_flags(img) == {"b0": ["auto"]}
    check_clean(img)


def test_bitmap_reopen_as_qemu_io(tmp_path: Path) -> None:
    img = create(tmp_path / "b.qcow2", "4M")
    qemu_img("bitmap", "--add", str(img), "b0")
    copies = both(tmp_path, img, ["write 0 64k", "reopen -r", "reopen -w", "write 1M 64k"])
    for path in copies.values():
        check_clean(path)
    assert bitmap_flags(copies["ours"]) == bitmap_flags(copies["qemu"]) == {"b0": ["auto"]}


GENERIC = ["driver=qcow2", "driver=raw", "discard=unmap", "discard=ignore", "file.driver=file",
           "file.driver=raw", "cache.direct=on", "cache.no-flush=on", "auto-read-only=on",
           "detect-zeroes=on", "detect-zeroes=bad", "node-name=other"]  # fmt: skip


@pytest.mark.parametrize("opts", GENERIC)
def test_block_layer_options_as_qemu_io(tmp_path: Path, opts: str) -> None:
    """The block layer's own options at reopen (bdrv_reopen_prepare): accepted when QEMU
    accepts them (the same driver, discard, cache flags, detect-zeroes, a child's options
    given as ``file.*``), refused with its words otherwise; the node works after either."""
    img = create(tmp_path / "g.qcow2", "1M")
    both(tmp_path, img, [f"reopen -o {opts}", "write -P 7 0 4k", "read -P 7 0 4k"])


def test_cache_direct_reaches_the_file_node(tmp_path: Path) -> None:
    """``cache.direct`` at reopen is a flag of the storage below too, as at open."""
    img = create(tmp_path / "d.qcow2", "1M")
    with BlockBackend.open(str(img), {"driver": "qcow2"}, OpenFlags.RDWR) as blk:
        file_bs = blk.bs.file.bs
        assert not file_bs.open_flags & OpenFlags.NOCACHE
        bdrv_reopen(blk.bs, blk.bs.open_flags, {"cache.direct": "on"})
        assert blk.bs.open_flags & OpenFlags.NOCACHE
        assert file_bs.open_flags & OpenFlags.NOCACHE
        blk.pwrite(0, b"\x42" * 4096)
    assert "verification" not in qemu_io(img, "read -P 0x42 0 4k")

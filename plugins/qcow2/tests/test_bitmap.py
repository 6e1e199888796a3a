"""Persistent dirty bitmaps, both ways against QEMU: bitmaps QEMU made and filled are loaded
by us with the same bits, ours are read by QEMU (qemu-nbd's dirty-bitmap export) with the
bits our core tracked; ``blockcore-img bitmap`` and ``info`` print what qemu-img prints;
an image left open read-write shows its bitmaps in-use to both."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blockcore import BlockBackend, OpenFlags

from .conftest import create, info, qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20


def ours(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", f"blockcore.{tool}", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    if check and proc.returncode:
        raise AssertionError(f"{tool} {args}: {proc.stdout}{proc.stderr}")
    return proc


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def qemu_dirty(path: Path, name: str) -> list[tuple[int, int]]:
    """Dirty ranges of bitmap ``name`` as QEMU reads them (qemu-nbd -B, NBD block status)."""
    sock = path.parent / f"nbd-{os.getpid()}.sock"
    if sock.exists():
        sock.unlink()
    server = subprocess.Popen(["qemu-nbd", "-r", "-k", str(sock), "-B", name, "-f", "qcow2",
                               str(path)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.02)
        assert sock.exists(), server.stderr.read() if server.stderr else "qemu-nbd failed"
        opts = (f"driver=nbd,server.type=unix,server.path={sock},"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{name}")  # fmt: skip
        out = qemu_img("map", "--output=json", "--image-opts", opts).stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    return merged([(e["start"], e["length"]) for e in json.loads(out) if not e["data"]])


def our_bitmaps(path: Path) -> dict[str, dict[str, Any]]:
    """Bitmaps as blockcore loads them (read-only open)."""
    blk = BlockBackend.open(str(path), {"driver": "qcow2"}, OpenFlags.NONE)
    try:
        return {b.name: {"granularity": b.granularity, "enabled": b.enabled,
                         "inconsistent": b.inconsistent, "readonly": b.readonly,
                         "ranges": merged(list(b.dirty_ranges()))}
                for b in blk.bs.dirty_bitmaps}  # fmt: skip
    finally:
        blk.close()


def check_clean(path: Path) -> None:
    proc = qemu_img("check", "--output=json", str(path), check=False)
    res = json.loads(proc.stdout)
    assert proc.returncode == 0 and not res.get("leaks") and not res.get("corruptions"), \
        proc.stdout + proc.stderr  # fmt: skip


def specific(data: str) -> Any:
    return json.loads(data)["format-specific"]


WORK = ["write 64k 8k", "write 1M 100", "write -z 2M 64k", "discard 3M 128k",
        "write 4190208 4096"]  # fmt: skip
#: what WORK dirties at 4 KiB and 64 KiB granularity
WANT = {4096: [(65536, 8192), (MiB, 4096), (2 * MiB, 65536), (3 * MiB, 131072),
               (4190208, 4096)],
        65536: [(65536, 65536), (MiB, 65536), (2 * MiB, 65536), (3 * MiB, 131072),
                (4 * MiB - 65536, 65536)]}  # fmt: skip


@pytest.mark.parametrize("opts", ["", "cluster_size=512", "cluster_size=2M", "refcount_bits=1",
                                  "lazy_refcounts=on", "extended_l2=on"])  # fmt: skip
def test_qemu_bitmaps_load_in_blockcore(tmp_path: Path, opts: str) -> None:
    img = create(tmp_path / "q.qcow2", "4M", opts)
    qemu_img("bitmap", "--add", "-g", "4k", str(img), "fine")
    qemu_img("bitmap", "--add", str(img), "coarse")
    qemu_img("bitmap", "--add", "--disable", str(img), "off")
    qemu_io(img, *WORK)
    assert qemu_dirty(img, "fine") == WANT[4096]
    got = our_bitmaps(img)
    assert got["fine"]["ranges"] == WANT[4096]
    coarse = 65536 if "512" not in opts else 4096
    assert got["coarse"]["granularity"] == coarse
    assert got["coarse"]["ranges"] == qemu_dirty(img, "coarse")
    assert got["off"]["ranges"] == [] and not got["off"]["enabled"]
    assert all(b["readonly"] and not b["inconsistent"] for b in got.values())
    assert specific(ours("img", "info", "--output=json", str(img)).stdout) == \
        specific(qemu_img("info", "--output=json", str(img)).stdout)  # fmt: skip
    # written by us on top: the bitmaps keep tracking and QEMU reads the result
    ours("qemu_io", "-f", "qcow2", "-c", "write 512k 4k", str(img))
    check_clean(img)
    fine = merged(sorted([*WANT[4096], (512 * 1024, 4096)]))
    assert qemu_dirty(img, "fine") == fine
    assert qemu_dirty(img, "off") == []


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,refcount_bits=64",
                                  "compression_type=zstd"])  # fmt: skip
def test_our_bitmaps_read_by_qemu(tmp_path: Path, opts: str) -> None:
    img = create(tmp_path / "b.qcow2", "4M", opts)
    ref = create(tmp_path / "q.qcow2", "4M", opts)
    for tool, path in ((ours, img), (None, ref)):
        args = [["bitmap", "--add", "-g", "4k", str(path), "fine"],
                ["bitmap", "--add", str(path), "coarse"],
                ["bitmap", "--add", "--disable", str(path), "off"]]  # fmt: skip
        for a in args:
            tool("img", *a) if tool else qemu_img(*a)
    ours("qemu_io", "-f", "qcow2", *[a for c in WORK for a in ("-c", c)], str(img))
    qemu_io(ref, *WORK)
    check_clean(img)
    assert specific(qemu_img("info", "--output=json", str(img)).stdout) == \
        specific(qemu_img("info", "--output=json", str(ref)).stdout)  # fmt: skip
    for name in ("fine", "coarse", "off"):
        assert qemu_dirty(img, name) == qemu_dirty(ref, name), name
    assert qemu_dirty(img, "fine") == WANT[4096]
    # QEMU writes on top of our bitmaps, we read the result
    qemu_io(img, "write 512k 4k")
    qemu_io(ref, "write 512k 4k")
    assert our_bitmaps(img)["fine"]["ranges"] == merged(sorted([*WANT[4096], (512 << 10, 4096)]))
    # and the operations QEMU offers on them agree
    ours("img", "bitmap", "--merge", "fine", str(img), "off")
    qemu_img("bitmap", "--merge", "fine", str(ref), "off")
    ours("img", "bitmap", "--clear", str(img), "fine")
    qemu_img("bitmap", "--clear", str(ref), "fine")
    assert qemu_dirty(img, "off") == qemu_dirty(ref, "off")
    assert qemu_dirty(img, "fine") == []
    ours("img", "bitmap", "--remove", str(img), "coarse")
    qemu_img("bitmap", "--remove", str(ref), "coarse")
    check_clean(img)
    assert specific(qemu_img("info", "--output=json", str(img)).stdout) == \
        specific(qemu_img("info", "--output=json", str(ref)).stdout)  # fmt: skip
    for name in ("fine", "off"):
        ours("img", "bitmap", "--remove", str(img), name)
    assert "bitmaps" not in specific(qemu_img("info", "--output=json", str(img)).stdout)["data"]
    check_clean(img)


SEQ = ["--add IMG b1", "--add IMG b1", "--add -g 1000 IMG b2", "--add -g 4G IMG b2",
       "--add -g 256 IMG b2", "--add --disable -g 4k IMG b2", "--remove IMG nope",
       "--merge b1 IMG b2", "--clear IMG nope", "--enable IMG b2", "--add IMG q --add",
       "--add OTHER x", "--merge x -b OTHER IMG b1", "--merge nope -b OTHER IMG b1",
       "--add IMG ''", "--remove IMG q", "--disable IMG b1", "--clear --add IMG b1",
       "--add -g 1024 --remove IMG z", "-g 4k --clear IMG b1", "-b OTHER --add IMG z",
       "-F qcow2 --merge x IMG b1", "IMG b1", "--add IMG", "--add -g 1G IMG big"]  # fmt: skip


def test_cli_matches_qemu_img(tmp_path: Path) -> None:
    logs = {}
    for tool in ("qemu-img", "ours"):
        img = create(tmp_path / f"{tool}.qcow2", "4M")
        other = create(tmp_path / f"{tool}-o.qcow2", "8M")
        v2 = create(tmp_path / f"{tool}-v2.qcow2", "4M", "compat=0.10")
        log = []
        for action in [*SEQ, "--add V2 a"]:
            argv = ["bitmap", *(a.replace("IMG", str(img)).replace("OTHER", str(other))
                                .replace("V2", str(v2)).replace("''", "")
                                for a in action.split(" "))]  # fmt: skip
            proc = qemu_img(*argv, check=False) if tool == "qemu-img" else \
                ours("img", *argv, check=False)  # fmt: skip
            err = re.sub(r"^[\w-]+: ", "", proc.stderr, flags=re.MULTILINE)
            err = re.sub(r"#block\d+", "#blockN", err)
            err = err.replace(str(tmp_path), "DIR").replace(tool, "TOOL")
            log.append((action, proc.returncode, proc.stdout, err))
        text = qemu_img("info", str(img)).stdout
        log.append(("info", 0, re.sub(r"disk size: .*", "", text).replace(tool, "T"), ""))
        check_clean(img)
        logs[tool] = log
    for a, b in zip(logs["ours"], logs["qemu-img"]):
        assert a == b


def _leave_open(path: Path, tool: str) -> None:
    """Open read-write, write, and die without closing (what a crash leaves)."""
    if tool == "qemu":
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "sigraise 9",
                        str(path)], capture_output=True, check=False)  # fmt: skip
        return
    code = (f"import os; from blockcore import BlockBackend, OpenFlags\n"
            f"b = BlockBackend.open({str(path)!r}, {{'driver': 'qcow2'}}, OpenFlags.RDWR)\n"
            f"b.pwrite(0, b'x' * 4096); b.flush(); os._exit(0)\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("tool", ["qemu", "ours"])
def test_in_use_after_a_crash(tmp_path: Path, tool: str) -> None:
    imgs = {}
    for who in ("qemu-img", "ours"):
        img = create(tmp_path / f"{who}.qcow2", "4M")
        qemu_img("bitmap", "--add", str(img), "a")
        qemu_img("bitmap", "--add", "--disable", str(img), "d")
        _leave_open(img, tool)
        imgs[who] = img
    want = [{"name": "a", "granularity": 65536, "flags": ["in-use", "auto"]},
            {"name": "d", "granularity": 65536, "flags": ["in-use"]}]
    for img in imgs.values():
        assert specific(qemu_img("info", "--output=json", str(img)).stdout)["data"]["bitmaps"] \
            == want  # fmt: skip
        assert specific(ours("img", "info", "--output=json", str(img)).stdout)["data"][
            "bitmaps"] == want
        check_clean(img)
    got = our_bitmaps(imgs["ours"])
    assert got["a"]["inconsistent"] and got["d"]["inconsistent"] and not got["d"]["enabled"]
    for args in (["--clear"], ["--enable"], ["--disable"], ["--merge", "d"], ["--add"]):
        a = ours("img", "bitmap", *args, str(imgs["ours"]), "a", check=False)
        b = qemu_img("bitmap", *args, str(imgs["qemu-img"]), "a", check=False)
        assert (a.returncode, a.stderr.split(": ", 1)[1]) == \
            (b.returncode, b.stderr.split(": ", 1)[1]), args  # fmt: skip
    # inconsistent bitmaps stay as they are when the image is written and closed again
    ours("qemu_io", "-f", "qcow2", "-c", "write 1M 4k", str(imgs["ours"]))
    assert specific(qemu_img("info", "--output=json", str(imgs["ours"])).stdout)["data"][
        "bitmaps"] == want
    ours("img", "bitmap", "--remove", str(imgs["ours"]), "a")
    qemu_img("bitmap", "--remove", str(imgs["ours"]), "d")
    assert "bitmaps" not in specific(qemu_img("info", "--output=json",
                                              str(imgs["ours"])).stdout)["data"]  # fmt: skip
    check_clean(imgs["ours"])


def test_measure_resize_and_snapshots_with_bitmaps(tmp_path: Path) -> None:
    img = create(tmp_path / "m.qcow2", "4M")
    ours("img", "bitmap", "--add", "-g", "512", str(img), "small")
    ours("img", "bitmap", "--add", str(img), "b")
    for args in (["-O", "qcow2"], ["-O", "qcow2", "-o", "compat=0.10"], ["-O", "raw"],
                 ["-O", "qcow2", "-o", "cluster_size=4k"]):  # fmt: skip
        assert ours("img", "measure", *args, str(img)).stdout == \
            qemu_img("measure", *args, str(img)).stdout, args  # fmt: skip
    ours("img", "resize", str(img), "6M")
    ours("qemu_io", "-f", "qcow2", "-c", "write 5M 4k", str(img))
    check_clean(img)
    assert info(img)["virtual-size"] == 6 * MiB
    assert qemu_dirty(img, "b") == [(5 * MiB, 65536)]
    assert qemu_dirty(img, "small") == [(5 * MiB, 4096)]
    # internal snapshots live beside bitmaps; applying one is refused while bitmaps exist
    ours("img", "snapshot", "-c", "s", str(img))
    check_clean(img)
    a = ours("img", "snapshot", "-a", "s", str(img), check=False)
    b = qemu_img("snapshot", "-a", "s", str(img), check=False)
    assert (a.returncode, a.stderr.split(": ", 1)[1]) == (b.returncode, b.stderr.split(": ", 1)[1])
    assert "Device has active dirty bitmaps" in a.stderr
    ours("img", "snapshot", "-d", "s", str(img))
    check_clean(img)
    assert qemu_dirty(img, "b") == [(5 * MiB, 65536)]


def test_stale_extension_is_dropped(tmp_path: Path) -> None:
    """A program without bitmap support cleared the autoclear bit: the bitmaps are ignored
    and the extension goes at the next read-write open, as QEMU does (leaks remain)."""
    img = create(tmp_path / "s.qcow2", "4M")
    qemu_img("bitmap", "--add", str(img), "a")
    data = bytearray(img.read_bytes())
    data[88:96] = bytes(8)  # autoclear features
    img.write_bytes(bytes(data))
    assert our_bitmaps(img) == {}
    ours("qemu_io", "-f", "qcow2", "-c", "write 0 4k", str(img))
    assert "bitmaps" not in specific(qemu_img("info", "--output=json", str(img)).stdout)["data"]
    proc = qemu_img("check", "--output=json", str(img), check=False)
    res = json.loads(proc.stdout)
    assert not res.get("corruptions") and res.get("leaks")


def test_commit_and_rebase_across_snapshots_and_bitmaps(tmp_path: Path) -> None:
    """A chain whose layers carry snapshots and bitmaps: commit and rebase (safe and unsafe)
    give what qemu-img gives, bitmaps of the base track the committed data."""
    for who in ("q", "b"):
        base = create(tmp_path / f"{who}base.qcow2", "4M")
        qemu_io(base, "write -P 1 0 1M")
        qemu_img("bitmap", "--add", str(base), "bb")
        qemu_img("snapshot", "-c", "sb", str(base))
        top = create(tmp_path / f"{who}top.qcow2", "4M", "", "-b", base.name, "-F", "qcow2")
        qemu_io(top, "write -P 2 512k 1M")
        qemu_img("bitmap", "--add", str(top), "tb")
        qemu_img("snapshot", "-c", "st", str(top))
    q = (tmp_path / "qbase.qcow2", tmp_path / "qtop.qcow2")
    b = (tmp_path / "bbase.qcow2", tmp_path / "btop.qcow2")
    qemu_img("commit", str(q[1]))
    ours("img", "commit", str(b[1]))
    for x, y in zip(q, b):
        check_clean(y)
        assert qemu_img("compare", str(x), str(y), check=False).returncode == 0
        assert specific(qemu_img("info", "--output=json", str(y)).stdout) == \
            specific(qemu_img("info", "--output=json", str(x)).stdout)  # fmt: skip
    assert qemu_dirty(b[0], "bb") == qemu_dirty(q[0], "bb") == [(512 << 10, MiB)]
    # the top was emptied (bdrv_make_empty), its snapshot kept
    assert [{k: v for k, v in e.items() if k != "offset"} for e in
            json.loads(qemu_img("map", "--output=json", str(b[1])).stdout)] == \
        [{k: v for k, v in e.items() if k != "offset"} for e in
         json.loads(qemu_img("map", "--output=json", str(q[1])).stdout)]  # fmt: skip
    assert [s["name"] for s in info(b[1])["snapshots"]] == ["st"]
    # safe rebase onto nothing (data copied into the top), then unsafe back
    qemu_img("rebase", "-b", "", str(q[1]))
    ours("img", "rebase", "-b", "", str(b[1]))
    check_clean(b[1])
    assert qemu_img("compare", str(q[1]), str(b[1]), check=False).returncode == 0
    assert qemu_dirty(b[1], "tb") == qemu_dirty(q[1], "tb")
    ours("img", "rebase", "-u", "-b", b[0].name, "-F", "qcow2", str(b[1]))
    assert info(b[1])["backing-filename"] == b[0].name
    assert [s["name"] for s in info(b[1])["snapshots"]] == ["st"]
    check_clean(b[1])

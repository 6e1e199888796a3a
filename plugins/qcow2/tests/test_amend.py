"""``amend`` against qemu-img: the same scenarios run with both tools give the same messages,
exit codes, images (map, info, check) and data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import qemu_img, qemu_io, requires_qemu, to_raw

pytestmark = requires_qemu


def _tool(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img"] if tool == "qemu" else [sys.executable, "-m", "blockcore.img"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


class Log:
    def __init__(self, tool: str, work: Path) -> None:
        self.tool, self.work, self.lines = tool, work, []  # type: ignore[var-annotated]

    def p(self, name: str) -> str:
        return str(self.work / name)

    def amend(self, opts: str, image: str, *, stderr: bool = True) -> None:
        proc = _tool(self.tool, "amend", "-o", opts, self.p(image))
        err = re.sub(r"^[\w-]+: ", "", proc.stderr, flags=re.MULTILINE) if stderr else ""
        self.lines.append(("amend", opts, image, proc.returncode, proc.stdout, err))

    def state(self, image: str) -> None:
        path = self.p(image)
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        info = {k: v for k, v in info.items() if k not in ("actual-size", "filename")}
        for s in info.get("snapshots", []):
            s.pop("date-sec"), s.pop("date-nsec")
        info.pop("backing-filename", None), info.pop("full-backing-filename", None)
        check = qemu_img("check", "--output=json", path, check=False)
        res = json.loads(check.stdout)
        res.pop("filename", None), res.pop("image-end-offset", None)
        res.pop("fragmented-clusters", None)
        mapping = [{k: v for k, v in e.items() if k != "offset"} for e in
                   json.loads(qemu_img("map", "--output=json", path).stdout)]  # fmt: skip
        self.lines.append(("state", image, info, check.returncode, res, mapping))


def scenario(log: Log) -> None:
    p = log.p
    qemu_img("create", "-q", "-f", "qcow2", p("a.qcow2"), "4M")
    qemu_io(p("a.qcow2"), "write -P 1 0 64k", "write -z 64k 64k", "write -z 1M 128k")
    for opts in ("compat=0.10", "compat=1.1", "refcount_bits=1", "refcount_bits=3",
                 "lazy_refcounts=on", "compat=0.10",
                 "refcount_bits=16,compat=0.10,lazy_refcounts=off", "compat=1.2",
                 "cluster_size=4k", "backing_file=/nonexistent,backing_fmt=qcow2",
                 "data_file=x", "data_file_raw=on", "lazy_refcounts=on", "size=8M",
                 "compat=v3,refcount_bits=64", "refcount_bits=8,size=6M",
                 "compat=v2"):  # fmt: skip
        log.amend(opts, "a.qcow2")
        log.state("a.qcow2")
    qemu_io(p("a.qcow2"), "read -P 1 0 64k", "read -P 0 64k 6080k")
    # a backing file: zero clusters become data clusters of zeros on downgrade
    qemu_img("create", "-q", "-f", "qcow2", p("base.qcow2"), "4M")
    qemu_io(p("base.qcow2"), "write -P 7 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("b.qcow2"), "4M")
    qemu_io(p("b.qcow2"), "write -z 0 64k", "write -P 1 64k 64k", "write -P 2 128k 64k",
            "write -z 128k 64k", "write -z -u 256k 64k")  # fmt: skip
    log.amend("compat=0.10,backing_file=other", "b.qcow2")
    log.amend("backing_file=base.qcow2,backing_fmt=qcow2", "b.qcow2")
    qemu_img("snapshot", "-c", "s", p("b.qcow2"))
    log.amend("compat=0.10", "b.qcow2")
    log.state("b.qcow2")
    qemu_io(p("b.qcow2"), "read -P 0 0 64k", "read -P 1 64k 64k", "read -P 0 128k 64k",
            "read -P 7 192k 64k", "read -P 0 256k 64k", "read -P 7 320k 64k")  # fmt: skip
    qemu_img("snapshot", "-a", "s", p("b.qcow2"))
    qemu_io(p("b.qcow2"), "read -P 0 0 64k", "read -P 0 128k 64k", "read -P 7 320k 64k")
    log.amend("size=8M", "b.qcow2")
    log.amend("size=8M,compat=1.1", "b.qcow2")
    log.state("b.qcow2")
    # what v2 cannot hold
    for name, opts in (("c1", ""), ("c2", "compression_type=zstd"), ("c3", "extended_l2=on")):
        args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
        qemu_img(*args, p(f"{name}.qcow2"), "4M")
    qemu_img("bitmap", "--add", p("c1.qcow2"), "b")
    for name in ("c1", "c2", "c3"):
        log.amend("compat=0.10", f"{name}.qcow2")
        log.state(f"{name}.qcow2") if name != "c1" else None
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p("c7.qcow2"), "4M")
    qemu_io(p("c7.qcow2"), "write -c -P 3 0 64k")
    log.amend("compat=0.10", "c7.qcow2")
    # refcount widths with snapshots: three references need 2 bits
    qemu_img("create", "-q", "-f", "qcow2", p("c4.qcow2"), "4M")
    qemu_io(p("c4.qcow2"), "write 0 64k")
    qemu_img("snapshot", "-c", "a", p("c4.qcow2"))
    qemu_img("snapshot", "-c", "b", p("c4.qcow2"))
    log.amend("refcount_bits=2", "c4.qcow2")
    log.amend("refcount_bits=1", "c4.qcow2")
    log.state("c4.qcow2")
    qemu_img("resize", "-q", p("c4.qcow2"), "8M")
    log.amend("refcount_bits=16,compat=0.10", "c4.qcow2")
    # v2 snapshots get v3 extra data on upgrade
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p("c5.qcow2"), "4M")
    qemu_io(p("c5.qcow2"), "write -P 5 0 64k")
    qemu_img("snapshot", "-c", "a", p("c5.qcow2"))
    log.amend("compat=1.1", "c5.qcow2")
    log.state("c5.qcow2")
    raw = Path(p("c5.qcow2")).read_bytes()
    nb, off = int.from_bytes(raw[60:64], "big"), int.from_bytes(raw[64:72], "big")
    log.lines.append(("c5 extra", nb, int.from_bytes(raw[off + 36 : off + 40], "big")))
    # a dirty lazy-refcounts image (QEMU prints its repair on open: stderr not compared)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p("c6.qcow2"), "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "sigraise 9",
                    p("c6.qcow2")], capture_output=True, check=False)  # fmt: skip
    log.amend("lazy_refcounts=off", "c6.qcow2", stderr=False)
    log.state("c6.qcow2")


def test_amend_matches_qemu_img(tmp_path: Path) -> None:
    logs: dict[str, list[Any]] = {}
    for tool in ("qemu", "ours"):
        work = tmp_path / tool
        work.mkdir()
        log = Log(tool, work)
        scenario(log)
        logs[tool] = log.lines
    assert len(logs["ours"]) == len(logs["qemu"])
    for a, b in zip(logs["ours"], logs["qemu"]):
        assert a == b


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_refcount_width_round_trip(tmp_path: Path, bits: int) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "8M")
    # 16 compressed clusters of one pattern share a host cluster: refcount 16 needs 5 bits
    qemu_io(img, "write -P 9 0 3M", "write -z 5M 1M", *(["write -c -P 8 4M 64k"] if bits >= 8
                                                        else []))  # fmt: skip
    ref = to_raw(img, tmp_path / "ref.raw")
    assert _tool("ours", "amend", "-o", f"refcount_bits={bits}", str(img)).returncode == 0
    assert json.loads(qemu_img("info", "--output=json", str(img)).stdout)[
        "format-specific"]["data"]["refcount-bits"] == bits
    assert qemu_img("check", str(img), check=False).returncode == 0
    qemu_io(img, "write -P 6 3M 512k")  # allocation with the new width, by QEMU
    assert _tool("ours", "amend", "-o", "refcount_bits=16", str(img)).returncode == 0
    assert qemu_img("check", str(img), check=False).returncode == 0
    out = to_raw(img, tmp_path / "out.raw")
    assert out[: 3 << 20] == ref[: 3 << 20] and out[(3 << 20) + (512 << 10) :] == \
        ref[(3 << 20) + (512 << 10) :]  # fmt: skip

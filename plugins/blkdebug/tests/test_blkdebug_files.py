"""blkdebug over real files (the ``file`` protocol of blockcore-raw): ``blkdebug:CONFIG:IMAGE``
filenames, behaviour compared with qemu-io 7.2 on the same config files, and the
request-path batch on a file."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from blkdebug_helpers import BASE, Env, requires_qemu, run_batch, wait_done
from blockcore_blkdebug import driver as bd

from blockcore import BdrvRequestFlags as F
from blockcore import BlockBackend, OpenFlags
from blockcore.errors import BlockError, NotSupportedError

pytest.importorskip("blockcore_raw", reason="needs blockcore-raw for the file protocol")

MiB = 1 << 20


def make_image(path: Path, size: int = MiB, pattern: int | None = None) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern is not None:
            f.write(bytes([pattern]) * size)
    return str(path)


def test_filename_syntax_over_a_file(tmp_path: Path, conf: Callable[[str], str]) -> None:
    img = make_image(tmp_path / "t.raw", pattern=0x5A)
    cfg = conf('[inject-error]\nevent = "none"\nerrno = "28"\nsector = "0"\n')
    with BlockBackend.open(f"blkdebug:{cfg}:{img}", {"driver": "raw"}, OpenFlags.RDWR) as blk:
        raw, node = blk.bs, blk.bs.file.bs  # type: ignore[union-attr]
        assert raw.drv.name == "raw" and node.drv.name == "blkdebug"  # type: ignore[union-attr]
        assert node.file.bs.drv.name == "file" and node.file.bs.filename == img  # type: ignore[union-attr]
        assert blk.getlength() == MiB
        with pytest.raises(BlockError) as info:
            blk.pread(0, 512)
        assert info.value.errno == errno.ENOSPC
        assert blk.pread(512, 512) == b"\x5a" * 512
    with BlockBackend.open(f"blkdebug::{img}", {"driver": "blkdebug"}) as blk:
        assert blk.pread(0, 16) == b"\x5a" * 16  # empty config: a pure pass-through


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    img = make_image(tmp_path / "t.raw")
    with pytest.raises(BlockError, match="could not read blkdebug config file") as info:
        BlockBackend.open(f"blkdebug:{tmp_path}/missing.conf:{img}", {"driver": "blkdebug"})
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == f"{tmp_path}/missing.conf"


def test_batch_on_a_file(env: Env, tmp_path: Path) -> None:
    img = make_image(tmp_path / "batch.raw")
    blk = env.track(BlockBackend.open(None, {"driver": "blkdebug", **BASE, "opt-write-zero":
                                             "16k", "image": {"driver": "file",
                                                              "filename": img}},
                                      OpenFlags.RDWR))  # fmt: skip
    done = run_batch(blk, random.Random(11), 300)
    assert done.get("truncate")
    size = blk.getlength()
    blk.close()
    assert os.path.getsize(img) == size


@requires_qemu
def test_data_written_through_blkdebug_reads_back_in_qemu(tmp_path: Path) -> None:
    img = make_image(tmp_path / "q.raw")
    with BlockBackend.open(f"blkdebug::{img}", {"driver": "blkdebug", "align": 4096},
                           OpenFlags.RDWR) as blk:  # fmt: skip
        blk.pwrite(1000, b"\x42" * 5000)
        blk.flush()
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x42 1000 5000", "-c",
                          "read -P 0 0 1000", "-c", "read -P 0 6000 4096", img],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout


# -------------------------------------------------------------------------------------------
# Same config, same commands: qemu-io 7.2 and blockcore agree
# -------------------------------------------------------------------------------------------

CASES = {
    "sector-enospc": ('[inject-error]\nevent = "none"\nerrno = "28"\nsector = "0"\n',
                      ["read 0 512", "read 512 512", "write 0 512", "write 1024 512",
                       "read 0 4k"]),
    "once": ('[inject-error]\nevent = "none"\nonce = "on"\n',
             ["read 0 512", "read 0 512", "write 0 512"]),
    "iotype-write": ('[inject-error]\nevent = "none"\niotype = "write"\nerrno = "30"\n',
                     ["read 0 512", "write 0 512", "write -z 0 4k", "discard 0 4k"]),
    "iotype-write-zeroes": ('[inject-error]\nevent = "none"\niotype = "write-zeroes"\n',
                            ["write 0 4k", "write -z 0 64k", "read 0 4k"]),
    "iotype-discard": ('[inject-error]\nevent = "none"\niotype = "discard"\n',
                       ["discard 0 64k", "write 0 4k"]),
    "state": ('[set-state]\nevent = "none"\nnew_state = "2"\n'
              '[inject-error]\nevent = "none"\nstate = "2"\nerrno = "1"\n'
              '[inject-error]\nevent = "none"\nstate = "1"\nerrno = "28"\n',
              ["read 0 512", "write 0 512"]),
    "pwritev-armed": ('[inject-error]\nevent = "pwritev"\nsector = "8"\n',
                      ["read 4096 512", "write 0 512", "write 4096 512", "read 4096 512",
                       "read 0 512"]),
    "priority": ('[inject-error]\nevent = "none"\nsector = "1"\nerrno = "28"\n'
                 '[inject-error]\nevent = "none"\nerrno = "5"\n',
                 ["read 512 512", "read 0 512", "read 1024 512"]),
    "errno-zero-shield": ('[inject-error]\nevent = "none"\nsector = "0"\nerrno = "0"\n'
                          '[inject-error]\nevent = "none"\nerrno = "5"\n',
                          ["read 0 512", "read 512 512"]),
}  # fmt: skip


def qemu_results(cfg: str, img: str, cmds: list[str]) -> list[str]:
    argv = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in cmds:
        argv += ["-c", c]
    out = subprocess.run([*argv, f"blkdebug:{cfg}:{img}"], capture_output=True, text=True,
                         timeout=60).stdout  # fmt: skip
    results = []
    for line in out.splitlines():
        if " failed: " in line:
            results.append(line.split(" failed: ", 1)[1])
        elif line.startswith(("read ", "wrote ", "discard ")) and " bytes at offset " in line:
            results.append("ok")
    return results


def our_results(cfg: str, img: str, cmds: list[str]) -> list[str]:
    results = []
    with BlockBackend.open(f"blkdebug:{cfg}:{img}", {"driver": "raw", "discard": "unmap"},
                           OpenFlags.RDWR) as blk:  # fmt: skip
        for cmd in cmds:
            words = cmd.split()
            off, n = (int(w.replace("k", "")) * (1024 if "k" in w else 1) for w in words[-2:])
            try:
                if words[0] == "read":
                    blk.pread(off, n)
                elif words[0] == "write" and "-z" in words:
                    blk.pwrite_zeroes(off, n)
                elif words[0] == "write":
                    blk.pwrite(off, b"\xcd" * n)
                else:
                    blk.pdiscard(off, n)
                results.append("ok")
            except BlockError as exc:
                results.append(os.strerror(exc.errno))  # qemu-io prints strerror
    return results


@requires_qemu
@pytest.mark.parametrize("case", list(CASES))
def test_same_results_as_qemu_io(tmp_path: Path, conf: Callable[[str], str], case: str) -> None:
    text, cmds = CASES[case]
    cfg = conf(text)
    theirs = qemu_results(cfg, make_image(tmp_path / "qemu.raw"), cmds)
    ours = our_results(cfg, make_image(tmp_path / "ours.raw"), cmds)
    assert len(theirs) == len(cmds), theirs
    assert ours == theirs


@requires_qemu
def test_breakpoint_race_matches_qemu_io(tmp_path: Path, messages: list[str]) -> None:
    """The B.7 example: a write parked at pwritev while another write completes."""
    theirs = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "break pwritev A", "-c", "aio_write -P 0x11 0 4k", "-c",
         "wait_break A", "-c", "aio_write -P 0x22 64k 4k", "-c", "resume A", "-c", "aio_flush",
         "-c", "read -P 0x11 0 4k", "-c", "read -P 0x22 64k 4k",
         f"blkdebug::{make_image(tmp_path / 'q.raw')}"],
        capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert theirs.startswith("blkdebug: Suspended request 'A'\nblkdebug: Resuming request 'A'\n")
    img = make_image(tmp_path / "o.raw")
    with BlockBackend.open(f"blkdebug::{img}", {"driver": "raw"}, OpenFlags.RDWR) as blk:
        bd.debug_breakpoint(blk.bs, "pwritev", "A")
        a = blk.aio_pwritev(0, b"\x11" * 4096)
        bd.wait_break(blk.bs, "A", timeout=5)
        b = blk.aio_pwritev(65536, b"\x22" * 4096)
        bd.debug_resume(blk.bs, "A")
        wait_done(a, b)
        assert blk.pread(0, 4096) == b"\x11" * 4096
        assert blk.pread(65536, 4096) == b"\x22" * 4096
    assert messages == ["blkdebug: Suspended request 'A'", "blkdebug: Resuming request 'A'"]


@pytest.mark.parametrize("form", ["file-prefix", "nested-blkdebug", "image-dict", "image-string"])
def test_image_names_open_a_protocol_node(tmp_path: Path, form: str) -> None:
    """The image below blkdebug is a protocol node, never a probed format (as QEMU)."""
    img = make_image(tmp_path / "p.raw", pattern=0x33)
    spec: tuple[str | None, dict[str, object]] = {
        "file-prefix": (f"blkdebug::file:{img}", {"driver": "blkdebug"}),
        "nested-blkdebug": (f"blkdebug::blkdebug::{img}", {"driver": "blkdebug"}),
        "image-dict": (None, {"driver": "blkdebug", "image": {"filename": img}}),
        "image-string": (None, {"driver": "blkdebug", "x-image": img}),
    }[form]
    with BlockBackend.open(spec[0], spec[1]) as blk:
        node = blk.bs
        while node.drv.name == "blkdebug":  # type: ignore[union-attr]
            node = node.file.bs  # type: ignore[union-attr]
        assert node.drv.name == "file" and node.filename == img  # type: ignore[union-attr]
        assert blk.pread(0, 4) == b"\x33" * 4


def test_injected_enotsup_with_no_fallback(tmp_path: Path) -> None:
    """Over a file (which honours NO_FALLBACK) the injected ENOTSUP reaches the caller."""
    img = make_image(tmp_path / "nf.raw", pattern=0x44)
    rule = {"event": "none", "errno": "ENOTSUP", "iotype": "write-zeroes"}
    with BlockBackend.open(None, {"driver": "blkdebug", "inject-error": [rule],
                                  "image": {"driver": "file", "filename": img}},
                           OpenFlags.RDWR) as blk:  # fmt: skip
        assert blk.bs.supported_zero_flags & F.NO_FALLBACK
        with pytest.raises(NotSupportedError, match="injected E[A-Z]*NOTSUPP? into bdrv_co_pw"):
            blk.pwrite_zeroes(0, 8192, F.NO_FALLBACK)
        assert blk.pread(0, 8192) == b"\x44" * 8192
        blk.pwrite_zeroes(0, 8192)  # with the fallback allowed: zero buffers
        assert blk.pread(0, 8192) == bytes(8192)

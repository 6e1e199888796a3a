"""Long blockcore-img operations: rate limits, Ctrl-C, progress, copy offload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcore.drivers import bdrv_find_format
from blockcore.img.convert_copy import RateLimit

HAVE_QEMU = shutil.which("qemu-img") is not None
MiB = 1 << 20


def _have(fmt: str) -> bool:
    try:
        bdrv_find_format(fmt)
    except OSError:
        return False
    return True


needs_qcow2 = pytest.mark.skipif(not _have("qcow2"), reason="qcow2 driver not installed")




def test_rate_limit_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    limit = RateLimit(10 * MiB)  # 1 MiB per 100 ms slice
    assert limit.delay(MiB) == 0.0  # fits the first slice
    assert limit.delay(1) == pytest.approx(0.1)  # overdraws it: wait for the next one
    assert limit.delay(2 * MiB) == pytest.approx(0.3)  # three slices' worth in all
    now[0] += 0.5  # a new slice starts from here
    assert limit.delay(MiB) == 0.0


def test_convert_rate_limit_takes_its_time(run_img, tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(os.urandom(4 * MiB))
    start = time.monotonic()
    assert run_img("convert", "-r", "8M", "-O", "raw", "src.raw", "dst.raw") == ("", "", 0)
    assert time.monotonic() - start >= 0.35  # 4 MiB at 8 MiB/s, less the first slice
    assert (tmp_path / "dst.raw").read_bytes() == (tmp_path / "src.raw").read_bytes()


@needs_qcow2
@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img judges the interrupted image")
def test_ctrl_c_stops_convert_and_leaves_a_consistent_image(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    src.write_bytes(os.urandom(32 * MiB))
    argv = [sys.executable, "-c", "import sys; from blockcore.img import main; sys.exit(main())",
            "convert", "-p", "-r", "4M", "-O", "qcow2", str(src), str(dst)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert proc.poll() is None, "convert ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "(100.00/100%)" not in out  # it stopped part way
    check = subprocess.run(["qemu-img", "check", str(dst)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found on the image." in check.stdout


@needs_qcow2
def test_commit_progress_only_with_p(run_img, tmp_path: Path) -> None:
    assert run_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M")[2] == 0
    assert run_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                   "top.qcow2")[2] == 0
    from blockcore.qemu_io import main as io_main

    assert io_main(["qemu-io", "-c", "write -P 0x61 0 4M", "-c", "write -P 0x62 6M 1M",
                    "top.qcow2"]) == 0
    out, err, rc = run_img("commit", "-p", "top.qcow2")
    assert (err, rc) == ("", 0)
    bars = [b for b in out.replace("\r", "\n").split("\n") if b.strip().startswith("(")]
    assert bars[0].strip() == "(0.00/100%)" and bars[-1].strip() == "(100.00/100%)"
    assert len(bars) >= 3
    values = [float(b.strip()[1:].split("/")[0]) for b in bars]
    assert values == sorted(values)
    assert out.rstrip().endswith("Image committed.")
    out, err, rc = run_img("commit", "top.qcow2")  # without -p: the one line only
    assert (out, err, rc) == ("Image committed.\n", "", 0)


def test_convert_copy_offload_uses_copy_file_range(run_img, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * MiB)
    with open(tmp_path / "src.raw", "wb") as f:
        f.write(data)
        f.truncate(8 * MiB)  # and a hole that block status skips
    calls: list[int] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, *args: object) -> int:
        calls.append(count)
        return real(src, dst, count, *args)

    monkeypatch.setattr(os, "copy_file_range", counting)
    assert run_img("convert", "-C", "-f", "raw", "-O", "raw", "src.raw", "dst.raw") == (
        "", "", 0)
    assert calls, "convert -C copied through Python buffers"
    assert sum(calls) <= 3 * MiB + MiB  # the data, not the hole
    assert (tmp_path / "dst.raw").read_bytes() == data + bytes(5 * MiB)


@needs_qcow2
def test_rebase_progress_only_with_p(run_img, tmp_path: Path) -> None:
    from blockcore.qemu_io import main as io_main

    for name in ("old", "new"):
        assert run_img("create", "-q", "-f", "qcow2", f"{name}.qcow2", "8M")[2] == 0
    assert io_main(["qemu-io", "-c", "write -P 0x61 0 2M", "old.qcow2"]) == 0
    assert run_img("create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2",
                   "top.qcow2")[2] == 0
    out, err, rc = run_img("rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2")
    assert (err, rc) == ("", 0)
    bars = [b.strip() for b in out.replace("\r", "\n").split("\n") if b.strip()]
    assert bars[0] == "(0.00/100%)" and bars[-1] == "(100.00/100%)"
    assert run_img("compare", "top.qcow2", "old.qcow2")[0] == "Images are identical.\n"
    out, err, rc = run_img("rebase", "-b", "old.qcow2", "-F", "qcow2", "top.qcow2")
    assert (out, err, rc) == ("", "", 0)  # quiet without -p

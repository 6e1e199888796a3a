"""The README's main job runs end to end and QEMU's qemu-img accepts what it wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the 'all' tox environment (the core-only one ignores tests/test_cli_*): it needs the
# raw and qcow2 plugins beside the core.


def test_main_job_script() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "main-job.sh")], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "main job done" in out.stdout
    assert out.stdout.count("No errors were found on the image.") >= 1
    assert "Images are identical." in out.stdout
    assert "Traceback" not in out.stderr
    if shutil.which("qemu-img"):
        assert out.stdout.count("No errors were found on the image.") == 2


def test_readme_shows_what_the_main_job_prints() -> None:
    """README.md's transcript is what the script prints now (timings and allocation aside)."""
    from cli_golden import normalise_disk_size, normalise_timing

    readme = (ROOT / "README.md").read_text()
    shown = readme.split("<!-- main-job:begin -->\n```text\n", 1)[1].split("```\n<!-- main-job:end", 1)[0]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "main-job.sh")], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    printed = out.stdout
    if not shutil.which("qemu-img"):  # the script skips QEMU's judgement: so does the check
        shown = shown.split("$ qemu-img check", 1)[0] + "main job done\n"
    assert normalise_disk_size(normalise_timing(printed)) == \
        normalise_disk_size(normalise_timing(shown))


def test_python_m_runs_the_tools(tmp_path: Path) -> None:
    """``python -m blockcore.img`` / ``python -m blockcore.io``, named as the console scripts."""
    img = subprocess.run([sys.executable, "-m", "blockcore.img", "create", "-f", "raw",
                          str(tmp_path / "m.raw"), "1M"], capture_output=True, text=True)
    assert (img.returncode, img.stderr) == (0, "")
    assert img.stdout.startswith("Formatting ")
    io = subprocess.run([sys.executable, "-m", "blockcore.io", "-f", "raw", "-c",
                         "read -P 0 0 512", str(tmp_path / "m.raw")], capture_output=True, text=True)
    assert (io.returncode, io.stderr) == (0, "")
    assert io.stdout.startswith("read 512/512 bytes at offset 0\n")
    bad = subprocess.run([sys.executable, "-m", "blockcore.io", "-f", "raw", "nonexist.raw"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr == ("blockcore-io: can't open device nonexist.raw: Could not open "
                          "'nonexist.raw': No such file or directory\n")

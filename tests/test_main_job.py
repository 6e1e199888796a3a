"""The README's main job runs end to end and QEMU's qemu-img accepts what it wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("blockcore-img", path=str(Path(sys.executable).parent)) is None
    and shutil.which("blockcore-img") is None,
    reason="needs the blockcore CLIs installed (the 'all' tox environment)",
)


def test_main_job_script() -> None:
    import importlib.util

    if importlib.util.find_spec("blockcore_qcow2") is None:
        pytest.skip("needs blockcore-qcow2 (runs in the 'all' tox environment)")
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

"""blockcore-img / blockcore-io against qemu-img / qemu-io 7.2, command by command.

Each golden file (tests/data/cli/*.golden) is replayed twice in fresh directories: once with
blockcore's tools first on PATH under the names ``qemu-img`` and ``qemu-io`` (they print their
name as invoked, so the lines read the same), and, when QEMU is installed, once with the real
tools to check the corpus still describes them. Setup lines always use the real tools, so both
runs see identical images. Outputs are compared after normalising timings (as iotests do) and
host-filesystem allocation (``disk size``, ``actual-size``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_golden import (
    Golden,
    Step,
    all_goldens,
    load_golden,
    normalise_disk_size,
    normalise_timing,
    replay,
    tool_dir,
)

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="setup steps need qemu-img/qemu-io")

GOLDENS = {p.stem: load_golden(p) for p in all_goldens()}

#: Known, accepted differences: (golden, command prefix) -> reason.
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    ("io-cmdline", "qemu-io -x"): "usage text names blockcore's options",
    ("io-cmdline", "qemu-io --bogus"): "usage text names blockcore's options",
    ("io-cmdline", "qemu-io -c length s.qcow2 r.raw"): "usage text names blockcore's options",
}


def _driver_available(name: str) -> bool:
    from blockcore.drivers import bdrv_find_format

    try:
        bdrv_find_format(name)
    except Exception:  # noqa: BLE001
        return False
    return True


def _own_needs(command: str) -> set[str]:
    needs = set()
    if "qcow2" in command:
        needs.add("qcow2")
    if "blkdebug" in command:
        needs.add("blkdebug")
    return needs


def _tokens(command: str) -> set[str]:
    try:
        return set(shlex.split(command))
    except ValueError:
        return set(command.split())


def _needs(step: Step, g: Golden) -> set[str]:
    """Drivers a step needs: named in it, or in an earlier step touching the same files."""
    needs = _own_needs(step.command)
    if step.command == "ls":
        for other in g.steps:
            needs |= _own_needs(other.command)
        return needs
    mine = {t for t in _tokens(step.command) if "." in t and not t.startswith("-")}
    for other in g.steps:
        if other is step:
            break
        theirs = _own_needs(other.command) | {n for s in other.setup for n in _own_needs(s)}
        if theirs and mine & _tokens(other.command):
            needs |= theirs
    return needs


def _run(g: Golden, real: bool) -> list[tuple[str, str, int]]:
    results: list[tuple[str, str, int]] = []
    with tempfile.TemporaryDirectory(prefix=f"cli-{g.name}-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        prefix = None
        if not real:
            bindir = Path(tmp) / "bin"
            bindir.mkdir()
            prefix = str(tool_dir(bindir))
        replay(g, work, prefix, lambda _step, res: results.append(res))
    return results


@pytest.fixture(scope="session")
def blockcore_runs() -> dict[str, list[tuple[str, str, int]]]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run, g, False) for name, g in GOLDENS.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="session")
def qemu_runs() -> dict[str, list[tuple[str, str, int]]]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run, g, True) for name, g in GOLDENS.items()}
        return {name: f.result() for name, f in futures.items()}


def _norm(text: str) -> str:
    return normalise_disk_size(normalise_timing(text))


CASES = [(name, i) for name, g in GOLDENS.items() for i in range(len(g.steps))]


def _id(case: tuple[str, int]) -> str:
    name, i = case
    return f"{name}:{i}:{GOLDENS[name].steps[i].command[:60]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_blockcore_matches_qemu(case: tuple[str, int],
                                blockcore_runs: dict[str, list[tuple[str, str, int]]]) -> None:
    name, i = case
    g = GOLDENS[name]
    step = g.steps[i]
    missing = sorted(d for d in _needs(step, g) if not _driver_available(d))
    if missing:
        pytest.skip(f"driver(s) not loadable: {', '.join(missing)}")
    for (gname, prefix), reason in KNOWN_DIFFERENCES.items():
        if gname == name and step.command.startswith(prefix):
            pytest.xfail(reason)
    stdout, stderr, status = blockcore_runs[name][i]
    assert (_norm(stdout), _norm(stderr), status) == (
        _norm(step.stdout), _norm(step.stderr), step.status), step.command


@pytest.mark.qemu
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_corpus_still_describes_qemu(case: tuple[str, int],
                                     qemu_runs: dict[str, list[tuple[str, str, int]]]) -> None:
    name, i = case
    step = GOLDENS[name].steps[i]
    stdout, stderr, status = qemu_runs[name][i]
    assert (_norm(stdout), _norm(stderr), status) == (
        _norm(step.stdout), _norm(step.stderr), step.status), step.command

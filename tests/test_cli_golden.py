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

#: Accepted differences: (golden, exact command) -> reason.
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    ("io-cmdline", "qemu-io -x s.qcow2"): "usage text ends with blockcore's line, not QEMU's bug links",
    ("io-cmdline", "qemu-io --bogus s.qcow2"): "usage text ends with blockcore's line",
    ("io-cmdline", "qemu-io -c length s.qcow2 r.raw"): "usage text ends with blockcore's line",
    ("io-cmdline", "qemu-io -c"): "usage text ends with blockcore's line",
}

_CHECK = ("blockcore-qcow2 check: the image end offset leaves out leaked clusters, repairs do "
          "not print the problem line first, -r all does not rebuild the refcount structure")
#: Differences that come from the drivers, not from the tools: (golden, exact command) ->
#: reason. Marked xfail (not strict), so a driver fix shows up as XPASS.
DRIVER_DIFFERENCES: dict[tuple[str, str], str] = {
    **{("img-check", c): _CHECK for c in (
        "qemu-img check leak.qcow2", "qemu-img check --output=json leak.qcow2",
        "qemu-img check -r leaks leak.qcow2", "qemu-img check --output=json -r all leak2.qcow2",
        "qemu-img check -q -r leaks leak3.qcow2", "qemu-img check -r leaks bad2.qcow2",
        "qemu-img check -r all bad.qcow2", "qemu-img check bad.qcow2",
        "qemu-img check --output=json -r all bad3.qcow2")},
    ("img-snapshot", "qemu-img check a.qcow2"):
        "blockcore-qcow2: image end offset after deleting snapshots",
    ("img-info", "qemu-img info -f qcow2 base.raw"):
        "blockcore-qcow2 adds the magic to 'Image is not in qcow2 format'",
    ("img-measure", "qemu-img measure --size 1G -O qcow2 -o cluster_size=3k"):
        "blockcore-qcow2 bdrv_measure does not validate cluster_size",
    ("io-blkdebug", "qemu-io -c 'break write_aio B' -c 'aio_write -P 0x22 64k 4k' "
                    "-c 'wait_break B' -c 'remove_break B' -c 'aio_flush' "
                    "-c 'read -P 0x22 64k 4k' blkdebug:empty.conf:bd.qcow2"):
        "blkdebug: QEMU 7.2 reports ENOENT from remove_break once the one-shot rule fired",
    ("img-rebase-commit", "qemu-img map --output=json t.qcow2"):
        "blockcore-img commit copies the top's zero clusters as data into the raw base "
        "(QEMU's commit writes zeroes, which the file driver punches)",
}


#: Steps that hang with blockcore (not run; their DRIVER_DIFFERENCES entry says why).
HANGS: set[tuple[str, str]] = set()


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
        hangs = {c for (name, c) in HANGS if name == g.name} if not real else set()
        replay(g, work, prefix, lambda _step, res: results.append(res),
               skip=lambda step: step.command in hangs)
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
def test_blockcore_matches_qemu(case: tuple[str, int], request: pytest.FixtureRequest,
                                blockcore_runs: dict[str, list[tuple[str, str, int]]]) -> None:
    name, i = case
    g = GOLDENS[name]
    step = g.steps[i]
    missing = sorted(d for d in _needs(step, g) if not _driver_available(d))
    if missing:
        pytest.skip(f"driver(s) not loadable: {', '.join(missing)}")
    if (name, step.command) in KNOWN_DIFFERENCES:
        pytest.xfail(KNOWN_DIFFERENCES[(name, step.command)])
    reason = DRIVER_DIFFERENCES.get((name, step.command))
    if reason:
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=False))
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

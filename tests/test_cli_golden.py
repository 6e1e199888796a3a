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
from dataclasses import dataclass
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
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="setup steps need qemu-img/qemu-io")

GOLDENS = {p.stem: load_golden(p) for p in all_goldens()}

@dataclass(frozen=True)
class Difference:
    """An expected mismatch at one step of a golden (keyed by golden name and step index, as
    in the test ids). ``command`` repeats the step's command so the listing reads on its own;
    :func:`test_differences_name_their_steps` checks it still matches. Strict: a step that
    starts matching QEMU fails as XPASS until its entry is removed."""

    command: str
    reason: str
    strict: bool = True


#: Accepted differences in the tools themselves.
KNOWN_DIFFERENCES: dict[tuple[str, int], Difference] = {
    ("io-cmdline", 6): Difference(
        "qemu-io -x s.qcow2", "usage text ends with blockcore's line, not QEMU's bug links"),
    ("io-cmdline", 7): Difference(
        "qemu-io --bogus s.qcow2", "usage text ends with blockcore's line"),
    ("io-cmdline", 8): Difference(
        "qemu-io -c length s.qcow2 r.raw", "usage text ends with blockcore's line"),
    ("io-cmdline", 13): Difference("qemu-io -c", "usage text ends with blockcore's line"),
}

#: Differences that come from the drivers, not from the tools.
DRIVER_DIFFERENCES: dict[tuple[str, int], Difference] = {
    ("img-snapshot", 16): Difference(
        "qemu-img check a.qcow2",
        "blockcore-qcow2's snapshot create/apply/delete switch to a new L1, refcount and "
        "snapshot table with one header write instead of updating in place as QEMU does, so "
        "the file (and the image end offset check reports) is laid out differently"),
}

#: Steps that hang with blockcore (not run, so they fail; their DRIVER_DIFFERENCES entry says
#: why).
HANGS: set[tuple[str, int]] = set()


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
        hangs = [g.steps[i] for (name, i) in HANGS if name == g.name and not real]
        replay(g, work, prefix, lambda _step, res: results.append(res),
               skip=lambda step: any(step is h for h in hangs))
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


@needs_qemu
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_blockcore_matches_qemu(case: tuple[str, int], request: pytest.FixtureRequest,
                                blockcore_runs: dict[str, list[tuple[str, str, int]]]) -> None:
    name, i = case
    g = GOLDENS[name]
    step = g.steps[i]
    missing = sorted(d for d in _needs(step, g) if not _driver_available(d))
    if missing:
        pytest.skip(f"driver(s) not loadable: {', '.join(missing)}")
    diff = KNOWN_DIFFERENCES.get(case) or DRIVER_DIFFERENCES.get(case)
    if diff:
        request.node.add_marker(pytest.mark.xfail(reason=diff.reason, strict=diff.strict))
    stdout, stderr, status = blockcore_runs[name][i]
    assert (_norm(stdout), _norm(stderr), status) == (
        _norm(step.stdout), _norm(step.stderr), step.status), step.command


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_corpus_still_describes_qemu(case: tuple[str, int],
                                     qemu_runs: dict[str, list[tuple[str, str, int]]]) -> None:
    name, i = case
    step = GOLDENS[name].steps[i]
    stdout, stderr, status = qemu_runs[name][i]
    assert (_norm(stdout), _norm(stderr), status) == (
        _norm(step.stdout), _norm(step.stderr), step.status), step.command


LISTED = [*KNOWN_DIFFERENCES.items(), *DRIVER_DIFFERENCES.items()]


@pytest.mark.parametrize(("key", "diff"), LISTED, ids=[f"{n}:{i}" for (n, i), _ in LISTED])
def test_differences_name_their_steps(key: tuple[str, int], diff: Difference) -> None:
    """A re-captured golden that moves its steps must not silently move an xfail."""
    name, i = key
    steps = GOLDENS[name].steps
    assert i < len(steps), f"{name} has {len(steps)} steps"
    assert steps[i].command == diff.command


def test_hangs_are_listed_differences() -> None:
    assert HANGS <= DRIVER_DIFFERENCES.keys()

"""Golden corpus of qemu-img / qemu-io 7.2 behaviour: file format, runner and normalisers.

A golden file (``tests/data/cli/*.golden``) is a script plus what the real tools printed::

    # comment lines (the first says how the file was made)
    % setup-command            run with the real qemu tools, output ignored
    & background-command       started with the real tools before the next line, killed at the end
    $ shell command            the command under test
    >stdout line               one per line, verbatim after '>'
    ~                          the preceding '>' line had no trailing newline
    !stderr line               verbatim after '!'
    =exit status

Every command runs with ``bash -c`` in one fresh directory per file (state carries over from one
command to the next), with ``LC_ALL=C``. To run the same script against blockcore, put a
directory first on ``PATH`` whose ``qemu-img`` and ``qemu-io`` start blockcore's tools (see
:func:`tool_dir`): the programs print their name as invoked, so their lines read the same.

Timings are normalised when a golden is captured and when outputs are compared (iotests'
``_filter_qemu_io`` regex, plus ``-C`` CSV lines and qemu-img bench's summary).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data" / "cli"

_TIMING = re.compile(
    r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)"
)
_CSV = re.compile(r"^(-?\d+),(\d+),[0-9:.]+,[-0-9.infa]+,[-0-9.infa]+$", re.MULTILINE)
_BENCH = re.compile(r"Run completed in [0-9.]+ seconds\.")


_SNAP_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_SNAP_JSON_DATE = re.compile(r'("date-n?sec": )\d+')


def normalise_timing(text: str) -> str:
    """Replace the parts of the output that depend on the clock: qemu-io's and qemu-img
    bench's timings, and the dates of internal snapshots."""
    text = _TIMING.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)
    text = _CSV.sub(r"\1,\2,X,X,X", text)
    text = _SNAP_DATE.sub("XXXX-XX-XX XX:XX:XX", text)
    text = _SNAP_JSON_DATE.sub(r"\g<1>X", text)
    return _BENCH.sub("Run completed in X seconds.", text)


_DISK_SIZE = re.compile(r"^(disk size: ).*$", re.MULTILINE)
_ACTUAL_SIZE = re.compile(r'("actual-size": )\d+')


def normalise_disk_size(text: str) -> str:
    """Hide host-filesystem allocation (``disk size``/``actual-size``), as iotests do."""
    return _ACTUAL_SIZE.sub(r"\g<1>X", _DISK_SIZE.sub(r"\g<1>X", text))


@dataclass
class Step:
    """One ``$`` command and what it printed."""

    command: str
    stdout: str = ""
    stderr: str = ""
    status: int = 0
    setup: list[str] = field(default_factory=list)
    """``%`` lines that came right before this command."""
    background: list[str] = field(default_factory=list)
    """``&`` lines that came right before this command."""


@dataclass
class Golden:
    name: str
    comments: list[str]
    steps: list[Step]
    trailing_setup: list[str] = field(default_factory=list)


def _encode_stream(prefix: str, text: str) -> list[str]:
    if not text:
        return []
    lines = text.split("\n")
    out = [prefix + line for line in lines[:-1]]
    if lines[-1]:
        out += [prefix + lines[-1], "~"]
    return out


def dump_golden(g: Golden) -> str:
    out = [f"# {c}" if c else "#" for c in g.comments]
    for step in g.steps:
        out += [f"% {s}" for s in step.setup]
        out += [f"& {s}" for s in step.background]
        out.append(f"$ {step.command}")
        out += _encode_stream(">", step.stdout)
        out += _encode_stream("!", step.stderr)
        out.append(f"={step.status}")
    out += [f"% {s}" for s in g.trailing_setup]
    return "\n".join(out) + "\n"


def load_golden(path: Path) -> Golden:
    comments: list[str] = []
    steps: list[Step] = []
    setup: list[str] = []
    background: list[str] = []
    cur: Step | None = None
    last_stream: str | None = None
    with path.open(newline="") as f:
        text = f.read()
    for raw in text.split("\n")[:-1]:
        kind, rest = raw[:1], raw[1:]
        if kind == "#":
            comments.append(rest.removeprefix(" "))
        elif kind == "%":
            setup.append(rest[1:])
        elif kind == "&":
            background.append(rest[1:])
        elif kind == "$":
            cur = Step(rest[1:], setup=setup, background=background)
            setup, background = [], []
            steps.append(cur)
        elif kind in "><":
            assert cur is not None, raw
            attr = "stdout" if kind == ">" else "stderr"
            setattr(cur, attr, getattr(cur, attr) + rest + "\n")
            last_stream = attr
        elif kind == "!":
            assert cur is not None, raw
            cur.stderr += rest + "\n"
            last_stream = "stderr"
        elif kind == "~":
            assert cur is not None and last_stream, raw
            setattr(cur, last_stream, getattr(cur, last_stream)[:-1])
        elif kind == "=":
            assert cur is not None, raw
            cur.status = int(rest)
        else:
            raise ValueError(f"{path}: bad line {raw!r}")
    return Golden(path.stem, comments, steps, setup)


def all_goldens() -> list[Path]:
    return sorted(DATA_DIR.glob("*.golden"))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

QEMU_ENV = {"LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


def _env(path_prefix: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QEMU_ENV)
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env.get("PATH", "")
    return env


def run_shell(cmd: str, cwd: Path, path_prefix: str | None = None, timeout: float = 30
              ) -> tuple[str, str, int]:
    """Run ``cmd``; a command still running after ``timeout`` is killed and reported as
    ``TIMEOUT`` with status -1 (the rest of the script still runs)."""
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=_env(path_prefix),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return out.decode(errors="replace"), f"TIMEOUT after {timeout} s\n", -1
    return out.decode(errors="replace"), err.decode(errors="replace"), proc.returncode


def replay(g: Golden, workdir: Path, path_prefix: str | None,
           on_step: Callable[[Step, tuple[str, str, int]], None],
           skip: Callable[[Step], bool] | None = None) -> None:
    """Run a golden's script in ``workdir``: setup with the real tools, ``$`` with ``path_prefix``."""
    bg: list[subprocess.Popen[bytes]] = []
    try:
        for step in g.steps:
            for s in step.setup:
                out, err, rc = run_shell(s, workdir)
                if rc:
                    raise RuntimeError(f"setup {s!r} failed ({rc}): {err}")
            for s in step.background:
                bg.append(subprocess.Popen(["bash", "-c", s], cwd=workdir, env=_env(None),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))
            if step.background:
                import time

                time.sleep(0.5)
            if skip is not None and skip(step):
                on_step(step, ("", "not run\n", -1))
            else:
                on_step(step, run_shell(step.command, workdir, path_prefix))
    finally:
        for p in bg:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def tool_dir(base: Path) -> Path:
    """Make ``base/qemu-img`` and ``base/qemu-io`` start blockcore's tools; returns ``base``."""
    repo = Path(__file__).resolve().parent.parent
    for name, module in (("qemu-img", "blockcore.img"), ("qemu-io", "blockcore.qemu_io")):
        script = base / name
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(repo)!r})\n"
            f"from {module} import main\n"
            "sys.exit(main())\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return base


def shell_join(args: Iterable[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def capture(name: str, script: list[tuple[str, str]], comments: list[str]) -> Golden:
    """Run ``script`` (pairs of kind and command) with the real tools and record a golden."""
    steps: list[Step] = []
    setup: list[str] = []
    background: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
        pending = Golden(name, comments, [])
        for kind, cmd in script:
            if kind == "%":
                setup.append(cmd)
            elif kind == "&":
                background.append(cmd)
            else:
                steps.append(Step(cmd, setup=setup, background=background))
                setup, background = [], []

        def record(step: Step, result: tuple[str, str, int]) -> None:
            step.stdout = normalise_timing(result[0])
            step.stderr = normalise_timing(result[1])
            step.status = result[2]

        pending.steps = steps
        replay(pending, Path(tmp), None, record)
        pending.trailing_setup = setup
    return pending

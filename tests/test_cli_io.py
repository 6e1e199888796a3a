"""blockcore-io run in-process: qemu-io's lines, errors and exit codes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from cli_golden import normalise_timing

from blockcore.cliutil import set_prog_name
from blockcore.qemu_io import main
from blockcore.qemu_io.commands import help_oneline
from blockcore.qemu_io.helptext import HELP
from blockcore.qemu_io.rw import create_iovec, parse_pattern
from blockcore.qemu_io.state import COMMANDS, find_command

TIMING = "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"


@pytest.fixture
def qio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.raw").write_bytes(bytes(1 << 20))
    set_prog_name("qemu-io")

    def go(*args: str, stdin: str | None = None) -> tuple[str, str, int]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        rc = main(["qemu-io", *args])
        out, err = capsys.readouterr()
        return normalise_timing(out), err, rc

    yield go
    set_prog_name(None)


def test_write_read_verify_dump(qio) -> None:
    out, err, rc = qio("-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k",
                       "-c", "read -v 0 20", "r.raw")
    assert (err, rc) == ("", 0)
    assert out == (
        "wrote 65536/65536 bytes at offset 0\n"
        f"64 KiB, {TIMING}\n"
        "read 65536/65536 bytes at offset 0\n"
        f"64 KiB, {TIMING}\n"
        "00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n"
        "00000010:  ab ab ab ab  ....\n"
        "read 20/20 bytes at offset 0\n"
        f"20 bytes, {TIMING}\n")


def test_pattern_failure_is_an_error(qio) -> None:
    out, _, rc = qio("-f", "raw", "-c", "read -P 1 0 512", "r.raw")
    assert out.startswith("Pattern verification failed at offset 0, 512 bytes\n")
    assert rc == 1
    out, _, rc = qio("-f", "raw", "-c", "write -P 0x41 100 3", "-c", "read -P 0x41 -s 100 -l 3 0 512",
                     "r.raw")
    assert rc == 0 and "Pattern verification" not in out


def test_alloc_map_length_info_raw(qio) -> None:
    out, _, rc = qio("-f", "raw", "-c", "alloc 0 1M", "-c", "map", "-c", "length", "-c", "info",
                     "r.raw")
    assert rc == 0
    assert out == ("1048576/1048576 bytes allocated at offset 0 bytes\n"
                   "1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)\n"
                   "1 MiB\n"
                   "format name: raw\ncluster size: 0 bytes\nvm state offset: 0 bytes\n")


@pytest.mark.parametrize(("cmd", "out", "err"), [
    ("read", "", "bad argument count 0 to read, expected at least 2 arguments\n"),
    ("read abc 1", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix "
                   "-- abc\n", ""),
    ("read 0 3G", "length cannot exceed 2147483136, given 3G\n", ""),
    ("foo", "", 'command "foo" not found\n'),
    ("write -P 300 0 1", "300 is not a valid pattern byte\n", ""),
    ("write -z -P 1 0 1", "Only one of -z, -P, and -s can be specified at the same time\n", ""),
    ("write -u 0 512", "-u requires -z to be specified\n", ""),
    ("write -c 1 512", "1 is not a sector-aligned value for 'offset'\n", ""),
    ("read -z 0 1", "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of "
                    "bytes at a specified offset\n", "read: invalid option -- 'z'\n"),
    ("read 1M 1", "read failed: Input/output error\n", ""),
    ("truncate -m bogus 1M", "", "qemu-io: Invalid preallocation mode 'bogus'\n"),
    ("sleep abc", "abc is not a valid number\n", ""),
    ("length 1", "", "bad argument count 1 to length, expected 0 arguments\n"),
    ("open r.raw", "", "qemu-io: file open already, try 'help close'\n"),
    ("break write_aio A", "Could not set breakpoint: Operation not supported\n", ""),
    ("help foo", "command foo not found\n", ""),
])  # fmt: skip
def test_command_errors(qio, cmd: str, out: str, err: str) -> None:
    assert qio("-f", "raw", "-c", cmd, "r.raw") == (out, err, 1)


def test_read_only_refuses_writes(qio) -> None:
    out, err, rc = qio("-f", "raw", "-r", "-c", "write 0 1", "-c", "discard 0 1", "-c", "flush",
                       "r.raw")
    assert (out, rc) == ("", 1)
    assert err == "qemu-io: Block node is read-only\n" * 2


def test_open_errors(qio) -> None:
    assert qio("-c", "read 0 1", "nonexist") == (
        "", "qemu-io: can't open device nonexist: Could not open 'nonexist': No such file or "
            "directory\n", 1)
    assert qio("-f", "bogus", "-c", "read 0 1", "r.raw") == (
        "", "qemu-io: can't open device r.raw: Unknown driver 'bogus'\n", 1)
    assert qio("-c", "read 0 1") == ("", "no file open, try 'help open'\n", 1)
    assert qio("--image-opts", "-f", "raw", "-c", "length", "driver=raw") == (
        "", "qemu-io: --image-opts and -f are mutually exclusive\n", 1)
    assert qio("-t", "bogus", "-c", "length", "r.raw") == (
        "", "qemu-io: Invalid cache option: bogus\n", 1)
    out, err, rc = qio("-f", "raw", "-U", "-c", "length", "r.raw")
    assert (out, rc) == ("", 1) and "force-share=on can only be used with read-only" in err


def test_image_opts_and_json(qio) -> None:
    assert qio("--image-opts", "-c", "length", "driver=raw,file.filename=r.raw") == (
        "1 MiB\n", "", 0)
    assert qio("-c", "length", 'json:{"driver": "raw", "file": {"driver": "file", '
                              '"filename": "r.raw"}}') == ("1 MiB\n", "", 0)
    out, err, rc = qio("-c", "length", "json:{bad")
    assert rc == 1 and "Could not parse the JSON options" in err


def test_interactive_prompt(qio) -> None:
    out, err, rc = qio("-f", "raw", "r.raw", stdin="length\nfoo\n\nquit\nlength\n")
    assert out == "qemu-io> 1 MiB\nqemu-io> qemu-io> qemu-io> "
    assert (err, rc) == ('command "foo" not found\n', 1)
    out, err, rc = qio(stdin="open -o driver=raw r.raw\nlength\nclose\n")
    assert (out, err, rc) == ("qemu-io> qemu-io> 1 MiB\nqemu-io> qemu-io> ", "", 0)


def test_aio_and_vectors(qio) -> None:
    out, err, rc = qio("-f", "raw", "-c", "aio_write -P 7 0 4k 4k", "-c", "aio_flush",
                       "-c", "aio_read -P 7 0 8k", "-c", "aio_flush",
                       "-c", "writev -P 5 64k 512 1k", "-c", "readv -P 5 64k 1536", "r.raw")
    assert (err, rc) == ("", 0)
    assert out == (f"wrote 8192/8192 bytes at offset 0\n8 KiB, {TIMING}\n"
                   f"read 8192/8192 bytes at offset 0\n8 KiB, {TIMING}\n"
                   f"wrote 1536/1536 bytes at offset 65536\n1.500 KiB, {TIMING}\n"
                   f"read 1536/1536 bytes at offset 65536\n1.500 KiB, {TIMING}\n")


def test_csv_and_quiet(qio) -> None:
    out, _, rc = qio("-f", "raw", "-c", "read -C 0 4k", "-c", "write -q 0 4k", "r.raw")
    assert (out, rc) == ("4096,1,X,X,X\n", 0)


def test_snapshot_mode_leaves_the_image(qio, tmp_path: Path) -> None:
    pytest.importorskip("blockcore_qcow2")
    out, err, rc = qio("-f", "raw", "-s", "-c", "write -P 9 0 512", "-c", "read -P 9 0 512",
                       "r.raw")
    assert (err, rc) == ("", 0), out
    assert (tmp_path / "r.raw").read_bytes()[:512] == bytes(512)


def test_reopen_cache_options_become_open_flags(qio, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    """``reopen -o cache.direct=...,cache.no-flush=...`` as QEMU's update_flags_from_options;
    the command lines themselves are in the io-rw golden."""
    from blockcore.qemu_io.commands import reopen_f
    from blockcore.qemu_io.state import Session
    from blockcore.types import OpenFlags

    s = Session()
    assert s.openfile("r.raw", OpenFlags.RDWR, True, False, {"driver": "raw"}) == 0
    try:
        assert reopen_f(s, ["reopen", "-o", "cache.direct=on,cache.no-flush=yes"]) == 0
        assert s.blk.bs.open_flags & OpenFlags.CACHE_MASK == OpenFlags.CACHE_MASK
        assert reopen_f(s, ["reopen", "-o", "cache.direct=off"]) == 0
        assert s.blk.bs.open_flags & OpenFlags.CACHE_MASK == OpenFlags.NO_FLUSH
        assert reopen_f(s, ["reopen", "-o", "cache.no-flush=maybe"]) < 0
        assert s.blk.bs.open_flags & OpenFlags.CACHE_MASK == OpenFlags.NO_FLUSH
    finally:
        s.close()
    assert capsys.readouterr().err == "qemu-io: Parameter 'cache.no-flush' expects 'on' or 'off'\n"


def test_help_texts() -> None:
    assert set(HELP) <= set(COMMANDS)
    assert find_command("r") is COMMANDS["read"]
    assert find_command("?") is COMMANDS["help"]
    assert find_command("m") is None
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        help_oneline("q", COMMANDS["quit"])
        help_oneline("map", COMMANDS["map"])
    assert buf.getvalue() == "q -- exit the program\nmap  -- prints the allocated areas of a file\n"


def test_pattern_and_iovec_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_pattern("0xab") == 0xAB
    assert parse_pattern("010") == 8
    assert parse_pattern("255") == 255
    assert parse_pattern("256") == -1
    assert parse_pattern("-1") == -1
    assert parse_pattern("1x") == -1
    assert create_iovec(["512", "1k"]) == [512, 1024]
    assert create_iovec(["3G"]) is None
    assert capsys.readouterr().out.endswith("300 is not a valid pattern byte\n") is False


def test_wait_break_and_resume_through_blkdebug(qio) -> None:
    """wait_break polls a global-state function between loop turns (it once ran it inside a
    coroutine, where the tier check refused it and the tool hung draining the parked write)."""
    pytest.importorskip("blockcore_blkdebug")
    out, err, rc = qio("-f", "raw", "-c", "break write_aio A", "-c", "aio_write -P 0x5a 0 4k",
                       "-c", "wait_break A", "-c", "read -P 0 4k 4k", "-c", "resume A",
                       "-c", "aio_flush", "-c", "read -P 0x5a 0 4k", "blkdebug::r.raw")
    assert (err, rc) == ("", 0)
    assert out == (
        "blkdebug: Suspended request 'A'\n"
        "read 4096/4096 bytes at offset 4096\n"
        f"4 KiB, {TIMING}\n"
        "blkdebug: Resuming request 'A'\n"
        "wrote 4096/4096 bytes at offset 0\n"
        f"4 KiB, {TIMING}\n"
        "read 4096/4096 bytes at offset 0\n"
        f"4 KiB, {TIMING}\n")

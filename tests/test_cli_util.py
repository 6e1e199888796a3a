"""blockcore.cliutil against QEMU 7.2's own behaviour (values taken from the golden corpus)."""

from __future__ import annotations

import io
import json

import pytest
from cli_golden import all_goldens, load_golden, normalise_timing

from blockcore import cliutil as cu
from blockcore.cliutil import qobject


# ---------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4M", 4 << 20), ("1.5k", 1536), ("0x10", 16), ("1b", 1), ("1000", 1000),
        ("1.k", 1024), ("1.", 1), (" 5", 5), ("300P", 300 << 50), ("64K", 65536),
        ("1.5E", 3 << 59), ("0", 0), ("1.5G", 3 << 29), ("2.5m", 5 << 19), ("0.5k", 512),
    ],
)  # fmt: skip
def test_strtosz_accepts(text: str, value: int) -> None:
    assert cu.qemu_strtosz(text)[0] == value


@pytest.mark.parametrize("text", ["1Q", "-5", "", "abc", "0x1k", "1.5", "1.5e3k", "0x1.5", "1k2"])
def test_strtosz_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cu.qemu_strtosz(text)


def test_strtosz_range() -> None:
    assert cu.qemu_strtosz("10E")[0] == 10 << 60  # fits 64 bits; qemu-img then says "between"
    with pytest.raises(OverflowError):
        cu.qemu_strtosz("16E")
    with pytest.raises(OverflowError):
        cu.cvtnum("8E")
    assert cu.cvtnum("7E") == 7 << 60


def test_strtosz_rounds_half_up() -> None:
    # 0.0005k = 0.512 bytes rounds to 1, as QEMU's 64.64 fixed point does
    assert cu.qemu_strtosz("0.0005k")[0] == 1
    assert cu.qemu_strtosz("0.0004k")[0] == 0


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"), (512, "512 B"), (4096, "4 KiB"), (200704, "196 KiB"),
        (2642944, "2.52 MiB"), (67108864, "64 MiB"), (1 << 30, "1 GiB"),
        (1022976, "999 KiB"), (1024000, "0.977 MiB"), (10485760, "10 MiB"),
    ],
)  # fmt: skip
def test_size_to_str(value: int, text: str) -> None:
    assert cu.size_to_str(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 bytes"), (512, "512 bytes"), (1536, "1.500 KiB"), (65536, "64 KiB"),
        (2.885442, "2.885442 bytes"), (4 << 20, "4 MiB"), (0x3F0000, "3.938 MiB"),
        (1 << 40, "1 TiB"), (3 << 60, "3 EiB"),
    ],
)  # fmt: skip
def test_cvtstr(value: float, text: str) -> None:
    assert cu.cvtstr(value) == text


def test_timestr() -> None:
    assert cu.timestr(0.0132) == "00.01 sec"
    assert cu.timestr(0.0) == "00.00 sec"
    assert cu.timestr(0.0, verbose=True) == "0:00:00.00"
    assert cu.timestr(939.98) == "0:15:39.98"
    assert cu.timestr(3725.5) == "1:02:05.50"


def test_io_report_lines() -> None:
    text = cu.io_report("wrote", 0.01, 0, 65536, 65536, 1)
    assert text == ("wrote 65536/65536 bytes at offset 0\n"
                    "64 KiB, 1 ops; 00.01 sec (6.250 MiB/sec and 100.0000 ops/sec)\n")
    assert normalise_timing(text).splitlines()[1] == (
        "64 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)")
    csv = cu.io_report("read", 0.5, 0, 4096, 4096, 1, csv=True)
    assert csv == "4096,1,0:00:00.50,8192.000,2.000\n"


def test_dump_buffer() -> None:
    assert cu.dump_buffer(b"\xab" * 20, 0) == (
        "00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n"
        "00000010:  ab ab ab ab  ....\n")
    assert cu.dump_buffer(b"AAA\x00", 100) == "00000064:  41 41 41 00  AAA.\n"


# ---------------------------------------------------------------------------- getopt
INFO_LONG = [cu.LongOpt("help", 0, "h"), cu.LongOpt("format", 1, "f"),
             cu.LongOpt("output", 1, "O"), cu.LongOpt("backing-chain", 0, "B"),
             cu.LongOpt("image-opts", 0, "I"), cu.LongOpt("force-share", 0, "U")]


def run_getopt(argv: list[str], optstring: str = ":f:hU",
               longopts: list[cu.LongOpt] = INFO_LONG) -> tuple[list[tuple[str, str | None]], str, list[str]]:
    g = cu.GetoptLong(argv, optstring, longopts)
    got = []
    for c, arg in g:
        got.append((c, arg))
        if c in "?:":
            return got, g.last_arg, g.argv[g.optind:]
    return got, "", g.argv[g.optind:]


def test_getopt_permutes() -> None:
    got, _, rest = run_getopt(["info", "a.qcow2", "-U", "--output=json", "-f", "qcow2"])
    assert got == [("U", None), ("O", "json"), ("f", "qcow2")]
    assert rest == ["a.qcow2"]


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["info", "-x", "a.qcow2"], "-x"),
        (["info", "a.qcow2", "-x"], "-x"),
        (["info", "-xq", "a.qcow2"], "info"),  # glibc has not moved past the cluster yet
        (["info", "a.qcow2", "-xq"], "a.qcow2"),
        (["info", "-Ux", "a.qcow2"], "-Ux"),
        (["info", "--bogus", "a.qcow2"], "--bogus"),
        (["info", "--f", "a.qcow2"], "--f"),  # ambiguous: --format / --force-share
    ],
)  # fmt: skip
def test_getopt_unrecognized_names_argv_optind_minus_one(argv: list[str], bad: str) -> None:
    got, last, _ = run_getopt(argv)
    assert got[-1][0] == "?"
    assert last == bad


def test_getopt_missing_argument() -> None:
    got, last, _ = run_getopt(["info", "--output"])
    assert got == [(":", None)] and last == "--output"
    got, last, _ = run_getopt(["info", "a.qcow2", "-f"])
    assert got == [(":", None)] and last == "-f"


def test_getopt_abbreviation_and_double_dash() -> None:
    got, _, rest = run_getopt(["info", "--out=json", "--back", "--", "-x"])
    assert got == [("O", "json"), ("B", None)]
    assert rest == ["-x"]


def test_getopt_require_order_and_messages() -> None:
    err = io.StringIO()
    g = cu.GetoptLong(["read", "-z", "0", "1"], "bCl:pP:qs:v", err=err)
    assert [c for c, _ in g] == ["?"]
    assert err.getvalue() == "read: invalid option -- 'z'\n"
    err = io.StringIO()
    g = cu.GetoptLong(["read", "-P"], "bCl:pP:qs:v", err=err)
    assert [c for c, _ in g] == ["?"]
    assert err.getvalue() == "read: option requires an argument -- 'P'\n"
    g = cu.GetoptLong(["qemu-img", "info", "-f", "x"], "+:hVT:")
    assert list(g) == [] and g.optind == 1
    err = io.StringIO()
    g = cu.GetoptLong(["qemu-io", "--bogus"], "hc:f:", [cu.LongOpt("cmd", 1, "c")], err=err)
    assert list(g) == [("?", None)]
    assert err.getvalue() == "qemu-io: unrecognized option '--bogus'\n"


def test_getopt_negative_numbers_are_options() -> None:
    err = io.StringIO()
    g = cu.GetoptLong(["read", "0", "-1"], "bCl:pP:qs:v", err=err)
    assert [c for c, _ in g] == ["?"]
    assert err.getvalue() == "read: invalid option -- '1'\n"


# ---------------------------------------------------------------------------- JSON
def _golden_json_outputs() -> list[str]:
    """Every pretty-printed JSON document qemu-img printed in the corpus."""
    docs = []
    for path in all_goldens():
        for step in load_golden(path).steps:
            out = step.stdout
            if (out.startswith(("{\n", "[\n")) and "|" not in step.command
                    and '": X' not in out):  # normalised dates are not JSON
                docs.append(out)
    return docs


def _qapi_order(value: object) -> object:
    """Re-insert keys in QAPI declaration order, as QEMU's visitors do."""
    order = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
             "encrypted", "compressed", "backing-filename", "full-backing-filename",
             "backing-filename-format", "snapshots", "backing-image", "format-specific",
             "check-errors", "image-end-offset", "corruptions", "leaks", "corruptions-fixed",
             "leaks-fixed", "total-clusters", "allocated-clusters", "fragmented-clusters",
             "compressed-clusters", "required", "fully-allocated", "bitmaps", "type", "data",
             "compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts", "corrupt",
             "refcount-bits", "encrypt", "compression-type"]  # fmt: skip
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: order.index(k) if k in order else len(order))
        return {k: _qapi_order(value[k]) for k in keys}
    if isinstance(value, list):
        return [_qapi_order(v) for v in value]
    return value


def test_json_writer_reproduces_every_golden_document() -> None:
    docs = _golden_json_outputs()
    assert len(docs) >= 15
    for doc in docs:
        value = _qapi_order(json.loads(doc))
        assert cu.to_json_pretty(value) + "\n" == doc


def test_json_writer_escapes_like_qemu() -> None:
    assert cu.to_json_pretty("a\"b\\c\n\x01é\U0001F600") == '"a\\"b\\\\c\\n\\u0001\\u00E9\\uD83D\\uDE00"'
    assert cu.to_json_pretty({}) == "{\n}"
    assert cu.to_json_pretty([]) == "[\n]"
    assert cu.to_json_pretty({"a": [1, True, None]}) == '{\n    "a": [\n        1,\n        true,\n        null\n    ]\n}'


def test_qdict_order_same_bucket_newest_first() -> None:
    # find two keys in one bucket, then check the later-inserted one comes first
    seen: dict[int, str] = {}
    for i in range(5000):
        k = f"k{i}"
        b = qobject._tdb_hash(k) % qobject.QDICT_BUCKET_MAX
        if b in seen:
            assert cu.qdict_order([seen[b], k]) == [k, seen[b]]
            return
        seen[b] = k
    pytest.fail("no collision found")


def test_dump_qobject_human() -> None:
    data = {"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
            "refcount-bits": 16, "corrupt": False, "extended-l2": False}
    assert cu.dump_qobject_human(data) == (
        "    compat: 1.1\n    compression type: zlib\n    lazy refcounts: false\n"
        "    refcount bits: 16\n    corrupt: false\n    extended l2: false\n")
    nested = {"bitmaps": [{"flags": ["auto"], "name": "b0", "granularity": 65536}]}
    assert cu.dump_qobject_human(nested) == (
        "    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n"
        "            name: b0\n            granularity: 65536\n")


# ---------------------------------------------------------------------------- image names
def test_parse_opts() -> None:
    assert cu.parse_opts("driver=qcow2,file.filename=a.qcow2") == {
        "driver": "qcow2", "file.filename": "a.qcow2"}
    assert cu.parse_opts("driver=raw,file.filename=r,,raw") == {
        "driver": "raw", "file.filename": "r,raw"}
    assert cu.parse_opts("a.qcow2,driver=qcow2", implied="file") == {
        "file": "a.qcow2", "driver": "qcow2"}
    assert cu.parse_opts("x=1,flag,nocache,x=2") == {"flag": "on", "cache": "off", "x": "2"}
    assert cu.parse_opts("") == {}


def test_option_list_checks() -> None:
    assert cu.is_valid_option_list("a=1")
    assert cu.is_valid_option_list("a=1,,")
    assert not cu.is_valid_option_list(",a")
    assert not cu.is_valid_option_list("a=1,")
    assert not cu.is_valid_option_list("")
    assert cu.has_help_option("cluster_size=4k,help")
    assert cu.has_help_option("?")
    assert not cu.has_help_option("cluster_size=4k")


def test_json_filename() -> None:
    opts = cu.parse_json_filename('json:{"driver": "qcow2", "file": {"driver": "file", "filename": "a"}}')
    assert opts == {"driver": "qcow2", "file.driver": "file", "file.filename": "a"}
    assert cu.crumple(opts) == {"driver": "qcow2", "file": {"driver": "file", "filename": "a"}}
    with pytest.raises(ValueError, match="JSON parse error, invalid keyword 'bad'"):
        cu.parse_json_filename("json:{bad")
    with pytest.raises(ValueError, match="Invalid JSON object given"):
        cu.parse_json_filename("json:[1]")


def test_flatten_crumple_roundtrip() -> None:
    nested = {"driver": "qcow2", "file": {"driver": "blkdebug", "image": {"filename": "x"}}}
    flat = cu.flatten(nested)
    assert flat == {"driver": "qcow2", "file.driver": "blkdebug", "file.image.filename": "x"}
    assert cu.crumple(flat) == nested
    with pytest.raises(ValueError):
        cu.crumple({"file": "x", "file.driver": "raw"})


# ---------------------------------------------------------------------------- errors, progress
def test_error_report_uses_program_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/qemu-img", "info"])
    cu.set_prog_name(None)
    err = io.StringIO()
    cu.error_report("Could not open 'x': Failed to get \"write\" lock",
                    hint="Is another process using the image [x]?\n", file=err)
    assert err.getvalue() == ("qemu-img: Could not open 'x': Failed to get \"write\" lock\n"
                              "Is another process using the image [x]?\n")
    monkeypatch.setattr("sys.argv", ["/x/blockcore/img/__main__.py"])
    assert cu.prog_name("blockcore-img") == "blockcore-img"


def test_strerror_is_glibc_text() -> None:
    assert cu.strerror(5) == "Input/output error"
    assert cu.strerror(-95) == "Operation not supported"
    assert cu.strerror(28) == "No space left on device"


def test_progress_matches_qemu_img_convert() -> None:
    # qemu-img convert -p of 32 MiB data in 2 MiB chunks (from img-convert.golden)
    out = io.StringIO()
    p = cu.Progress(True, 1.0, out)
    p.print(0, 100)
    done = 0
    for _ in range(16):
        done += 4096
        p.print(100.0 * done / 65536, 0)
    p.print(100, 0)
    p.end()
    golden = next(s for s in load_golden(next(p for p in all_goldens() if p.stem == "img-convert")).steps
                  if s.command.startswith("qemu-img convert -p -O raw big.qcow2"))
    assert out.getvalue() == golden.stdout


def test_run_tool_ends_every_way_with_one_line_and_a_status(
        capsys: pytest.CaptureFixture[str]) -> None:
    cu.set_prog_name("qemu-img")
    try:
        def fail(exc: BaseException) -> int:
            raise exc

        assert cu.run_tool(lambda: fail(cu.CliError("bad thing", 2))) == 2
        assert capsys.readouterr().err == "qemu-img: bad thing\n"
        assert cu.run_tool(lambda: fail(RuntimeError("boom"))) == 1
        assert capsys.readouterr().err == "qemu-img: RuntimeError: boom\n"
        assert cu.run_tool(lambda: fail(KeyboardInterrupt()), newline_on_interrupt=True) == 130
        assert capsys.readouterr().err == "\n"
        assert cu.run_tool(lambda: fail(KeyboardInterrupt())) == 130
        assert cu.run_tool(lambda: fail(BrokenPipeError())) == 1
        assert cu.run_tool(lambda: 7) == 7
        assert capsys.readouterr().err == ""
    finally:
        cu.set_prog_name(None)


def test_run_tool_reports_an_uncaught_oserror_without_its_class_name(capsys) -> None:
    """An OSError no command handled reads as QEMU's messages do (capitalised, or verbatim),
    never ``BlockError: [Errno 5] ...``."""
    from blockcore.cliutil import run_tool, set_prog_name
    from blockcore.errors import ImageCorruptError

    def body() -> int:
        raise ImageCorruptError("bitmap directory is truncated", "x.qcow2")

    set_prog_name("blockcore-img")
    try:
        assert run_tool(body) == 1
    finally:
        set_prog_name(None)
    assert capsys.readouterr().err == "blockcore-img: Bitmap directory is truncated\n"

"""blockcore-img: formatters against QEMU's own outputs, and subcommands run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_golden import DATA_DIR, load_golden, normalise_disk_size

from blockcore.img import output as fmt

GOLDEN = {p.stem: load_golden(p) for p in DATA_DIR.glob("img-*.golden")}


def _out(golden: str, command: str) -> str:
    for step in GOLDEN[golden].steps:
        if step.command == command:
            return step.stdout
    raise KeyError(command)


INFO_ORDER = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
              "encrypted", "compressed", "backing-filename", "full-backing-filename",
              "backing-filename-format", "snapshots", "backing-image", "format-specific"]


def _qapi(info: dict) -> dict:
    return {k: info[k] for k in INFO_ORDER if k in info}


# ---------------------------------------------------------------------------- pure formatters
@pytest.mark.parametrize("image", ["base.raw", "a.qcow2", "ov.qcow2", "v2.qcow2", "e.qcow2",
                                   "dirty.qcow2"])
def test_info_human_from_qemu_json(image: str) -> None:
    info = _qapi(json.loads(_out("img-info", f"qemu-img info --output=json {image}")))
    human = _out("img-info", f"qemu-img info {image}")
    assert fmt.image_info_human(info) == human
    assert fmt.image_info_json(info) == _out("img-info", f"qemu-img info --output=json {image}")


def test_info_chain_human_and_json() -> None:
    chain = [_qapi(i) for i in json.loads(
        _out("img-info", "qemu-img info --backing-chain --output=json top.qcow2"))]
    assert len(chain) == 3
    assert fmt.image_info_list_human(chain) == _out("img-info",
                                                    "qemu-img info --backing-chain top.qcow2")
    assert fmt.image_info_json(chain) == _out(
        "img-info", "qemu-img info --backing-chain --output=json top.qcow2")


def test_info_backing_path_variants() -> None:
    base = {"filename": "d/ov.qcow2", "format": "qcow2", "virtual-size": 1, "actual-size": 0,
            "backing-filename": "b.raw", "full-backing-filename": "d/b.raw"}
    assert "backing file: b.raw (actual path: d/b.raw)\n" in fmt.image_info_human(base)
    del base["full-backing-filename"]
    assert "backing file: b.raw (cannot determine actual path)\n" in fmt.image_info_human(base)
    del base["actual-size"]
    assert "disk size: unavailable\n" in fmt.image_info_human(base)


def test_full_backing_filename() -> None:
    from blockcore.img.info import full_backing_filename

    assert full_backing_filename("ov.qcow2", "base.raw") == "base.raw"
    assert full_backing_filename("d/ov.qcow2", "base.raw") == "d/base.raw"
    assert full_backing_filename("/d/ov.qcow2", "base.raw") == "/d/base.raw"
    assert full_backing_filename("/ov.qcow2", "base.raw") == "/base.raw"
    assert full_backing_filename("d/ov.qcow2", "/abs/b") == "/abs/b"
    assert full_backing_filename("json:{}", "b") is None
    assert full_backing_filename("d/ov.qcow2", "nbd:host:1") == "nbd:host:1"


CHECK_ORDER = list(fmt.CHECK_KEYS)


@pytest.mark.parametrize("image", ["d.qcow2", "leak.qcow2", "bad.qcow2", "a.qcow2"])
def test_check_human_from_qemu_json(image: str) -> None:
    check = json.loads(_out("img-check", f"qemu-img check --output=json {image}"))
    check = {k: check[k] for k in CHECK_ORDER if k in check}
    assert fmt.check_human(check) == _out("img-check", f"qemu-img check {image}")
    assert fmt.check_json(check) == _out("img-check", f"qemu-img check --output=json {image}")


def test_check_repair_banner() -> None:
    text = _out("img-check", "qemu-img check -r leaks leak.qcow2")
    assert text.startswith(fmt.check_repaired_human(1, 0))


def _map_entries(text: str) -> list[dict]:
    return json.loads(text)


@pytest.mark.parametrize(("image", "files"), [
    ("base.raw", {0: "base.raw"}),
    ("z.qcow2", {0: "z.qcow2"}),
    ("x.qcow2", {0: "x.qcow2"}),
])  # fmt: skip
def test_map_json_and_human_from_qemu_json(image: str, files: dict[int, str]) -> None:
    js = _out("img-map", f"qemu-img map --output=json {image}")
    entries = _map_entries(js)
    text = "[" + "".join(fmt.map_entry_json(e, i == len(entries) - 1)
                         for i, e in enumerate(entries)) + "]\n"
    assert text == js
    human = fmt.map_header_human()
    for i, e in enumerate(entries):
        if "offset" in e:
            e["filename"] = files[e["depth"]]
    for i, e in enumerate(entries):
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        human += fmt.map_entry_human(e)
        if nxt is not None and (not nxt["data"] or nxt["zero"]):
            nxt["data"], nxt["zero"] = False, True
    assert human == _out("img-map", f"qemu-img map {image}")


def test_map_entries_merge_rules() -> None:
    a = {"start": 0, "length": 4096, "data": True, "zero": False, "depth": 0, "present": True,
         "offset": 8192, "filename": "f"}
    b = dict(a, start=4096, offset=12288)
    assert fmt.map_entries_mergeable(a, b)
    assert not fmt.map_entries_mergeable(a, dict(b, offset=0))
    assert not fmt.map_entries_mergeable(a, dict(b, depth=1))
    assert not fmt.map_entries_mergeable(dict(a, length=0), b)


def test_measure_output() -> None:
    from blockcore.types import BlockMeasureInfo

    info = BlockMeasureInfo(required=655360, fully_allocated=4521984, bitmaps=0)
    assert fmt.measure_human(info) == _out("img-measure", "qemu-img measure -O qcow2 ov.qcow2")
    assert fmt.measure_json(info) == _out("img-measure",
                                          "qemu-img measure --output=json -O qcow2 ov.qcow2")
    info = BlockMeasureInfo(required=393216, fully_allocated=1074135040)
    assert fmt.measure_human(info) == _out("img-measure", "qemu-img measure --size 1G -O qcow2")


def test_snapshot_lines() -> None:
    assert fmt.snapshot_header() == ("ID        TAG               VM SIZE                DATE"
                                     "     VM CLOCK     ICOUNT")
    line = fmt.snapshot_line({"id": "1", "name": "s1", "vm-state-size": 0, "date-sec": 0,
                              "vm-clock-sec": 3723, "vm-clock-nsec": 5_000_000})
    assert line.startswith("1         s1                    0 B")
    assert line.endswith(" 01:02:03.005           ")


# ---------------------------------------------------------------------------- create options
def _have(driver: str) -> bool:
    from blockcore.drivers import bdrv_find_format

    try:
        bdrv_find_format(driver)
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.parametrize("command", [
    "qemu-img create -f raw base.raw 4M",
    "qemu-img create -f qcow2 a.qcow2 64M",
    "qemu-img create -f qcow2 -o preallocation=metadata pm.qcow2 1M",
    "qemu-img create -f qcow2 -o compat=0.10 v2.qcow2 1M",
    "qemu-img create -f qcow2 -o compat=v3,refcount_bits=8 r8.qcow2 1M",
    "qemu-img create -f qcow2 -o extended_l2=on,cluster_size=128k e.qcow2 1M",
    "qemu-img create -f qcow2 -o cluster_size=4k,lazy_refcounts=on c.qcow2 1G",
    "qemu-img create -f raw -o preallocation=full full.raw 1M",
])  # fmt: skip
def test_formatting_line(command: str) -> None:
    from blockcore.cliutil import qemu_strtosz
    from blockcore.img.createopts import CreateOpts

    words = command.split()
    fmt_name = words[words.index("-f") + 1]
    if not _have(fmt_name):
        pytest.skip(f"{fmt_name} driver not installed")
    opts = CreateOpts(fmt_name)
    if "-o" in words:
        opts.parse(words[words.index("-o") + 1])
    opts.set_number("size", qemu_strtosz(words[-1])[0])
    assert opts.formatting_line(words[-2]) == _out("img-create", command)


def test_formatting_line_escapes_commas() -> None:
    from blockcore.img.createopts import CreateOpts

    if not _have("qcow2"):
        pytest.skip("qcow2 driver not installed")
    opts = CreateOpts("qcow2")
    opts.parse("backing_file=a,,b,backing_fmt=raw")
    opts.set_number("size", 1024)
    assert "backing_file=a,,b backing_fmt=raw" in opts.formatting_line("x")


def test_option_help_layout() -> None:
    from blockcore.img.createopts import option_help

    text = option_help("raw", "x.raw")
    assert text.splitlines()[0] == "Supported options:"
    assert "  size=<size>            - Virtual disk size" in text.splitlines()


# ---------------------------------------------------------------------------- in-process runs


def test_create_info_map_convert_compare_raw(run_img) -> None:
    assert run_img("create", "-f", "raw", "a.raw", "1M") == (
        "Formatting 'a.raw', fmt=raw size=1048576\n", "", 0)
    out, err, rc = run_img("info", "--output=json", "a.raw")
    assert rc == 0 and json.loads(out)["virtual-size"] == 1048576
    assert list(json.loads(out)) == ["virtual-size", "filename", "format", "actual-size",
                                     "dirty-flag"]
    out, _, rc = run_img("map", "--output=json", "-f", "raw", "a.raw")
    assert rc == 0 and json.loads(out)[0]["start"] == 0
    assert run_img("convert", "-f", "raw", "-O", "raw", "a.raw", "b.raw") == ("", "", 0)
    assert run_img("compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw") == (
        "Images are identical.\n", "", 0)
    assert run_img("check", "-f", "raw", "a.raw") == (
        "", "qemu-img: This image format does not support checks\n", 63)
    assert run_img("resize", "-f", "raw", "a.raw", "2M") == ("Image resized.\n", "", 0)
    assert run_img("compare", "-f", "raw", "-F", "raw", "-s", "a.raw", "b.raw") == (
        "Strict mode: Image size mismatch!\n", "", 1)


@pytest.mark.parametrize(("args", "err", "rc"), [
    ((), "qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information\n", 1),
    (("bogus",), "qemu-img: Command not found: bogus\n"
                 "Try 'qemu-img --help' for more information\n", 1),
    (("info", "-xq", "a"), "qemu-img: unrecognized option 'info'\n"
                           "Try 'qemu-img --help' for more information\n", 1),
    (("info", "nonexist"), "qemu-img: Could not open 'nonexist': Could not open 'nonexist': "
                           "No such file or directory\n", 1),
    (("info", "-f", "bogus", "x"), "qemu-img: Could not open 'x': Unknown driver 'bogus'\n", 1),
    (("create", "-f", "raw", "x", "1Q"),
     "qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
     "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n", 1),
    (("create", "-f", "bogus", "x", "1M"), "qemu-img: x: Unknown file format 'bogus'\n", 1),
    (("compare", "nonexist", "nonexist"), "qemu-img: Could not open 'nonexist': Could not "
                                          "open 'nonexist': No such file or directory\n", 2),
    (("map", "--output=xml", "x"), "qemu-img: --output must be used with human or json as "
                                   "argument.\n", 1),
])  # fmt: skip
def test_bad_input_is_one_error_and_qemu_exit_code(run_img, args, err, rc) -> None:
    assert run_img(*args) == ("", err, rc)


def test_qcow2_session(run_img) -> None:
    if not _have("qcow2"):
        pytest.skip("qcow2 driver not installed")
    assert run_img("create", "-q", "-f", "raw", "base.raw", "1M")[2] == 0
    out, err, rc = run_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2")
    assert rc == 0, err
    assert "size=1048576 backing_file=base.raw backing_fmt=raw" in out
    out, _, rc = run_img("info", "ov.qcow2")
    assert rc == 0 and "backing file: base.raw\nbacking file format: raw\n" in out
    out, _, rc = run_img("check", "ov.qcow2")
    assert rc == 0 and out.startswith("No errors were found on the image.\n")
    out, _, rc = run_img("map", "--output=json", "ov.qcow2")
    assert rc == 0 and json.loads(out)[0]["depth"] == 1
    assert run_img("convert", "-O", "qcow2", "ov.qcow2", "flat.qcow2")[2] == 0
    assert run_img("compare", "ov.qcow2", "flat.qcow2")[0] == "Images are identical.\n"
    out, _, rc = run_img("measure", "--size", "1G", "-O", "qcow2")
    assert rc == 0 and out.startswith("required size: ")


def test_disk_size_normaliser_is_applied() -> None:
    assert normalise_disk_size("disk size: 196 KiB\n") == "disk size: X\n"


def test_missing_driver_names_its_package(run_img, tmp_path: Path) -> None:
    out, err, rc = run_img("create", "-f", "vmdk", "x.vmdk", "1M")
    assert (out, rc) == ("", 1)
    assert err == ("qemu-img: x.vmdk: Unknown file format 'vmdk'\n"
                   "The 'vmdk' format needs the blockcore-vmdk distribution, which is not "
                   "installed.\n")
    (tmp_path / "fake.vdi").write_bytes(b"\0" * 0x40 + b"\x7f\x10\xda\xbe" + bytes(4096))
    out, err, rc = run_img("info", "fake.vdi")
    assert rc == 0 and "file format: raw\n" in out
    assert "looks like a vdi image" in err and "blockcore-vdi" in err


def test_commit_writes_the_tops_zero_clusters_as_zeroes(run_img, tmp_path: Path) -> None:
    """QEMU's commit (a mirror job) zero-writes what the top holds as zeroes, so a raw base
    gets a hole there instead of 64 KiB of zero data (img-rebase-commit golden)."""
    if not _have("qcow2"):
        pytest.skip("qcow2 driver not installed")
    from blockcore import BlockBackend, OpenFlags

    k64 = 64 * 1024
    assert run_img("create", "-q", "-f", "raw", "b.raw", "1M")[2] == 0
    with BlockBackend.open("b.raw", {"driver": "raw"}, OpenFlags.RDWR) as blk:
        blk.pwrite(0, b"\1" * k64)
        blk.pwrite(2 * k64, b"\3" * k64)
    assert run_img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "t.qcow2")[2] == 0
    with BlockBackend.open("t.qcow2", None, OpenFlags.RDWR) as blk:
        blk.pwrite(k64, b"\2" * k64)
        blk.pwrite_zeroes(2 * k64, k64)  # a zero cluster over the base's data
    assert run_img("commit", "t.qcow2") == ("Image committed.\n", "", 0)

    base = (tmp_path / "b.raw").read_bytes()
    assert base[:3 * k64] == b"\1" * k64 + b"\2" * k64 + bytes(k64)
    out, _, rc = run_img("map", "--output=json", "-f", "raw", "b.raw")
    assert rc == 0
    assert [(e["start"], e["length"], e["data"]) for e in json.loads(out)] == [
        (0, 2 * k64, True), (2 * k64, (1 << 20) - 2 * k64, False)]
    assert (tmp_path / "b.raw").stat().st_blocks * 512 <= 2 * k64  # punched, not zero-filled

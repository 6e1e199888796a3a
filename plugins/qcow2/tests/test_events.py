"""Every debug event qcow2 sends down to its file child, shown through blkdebug: for each
event a workload that reaches it, proven twice: a ``set-state`` rule on the event changes
blkdebug's state while the workload succeeds, and an ``inject-error`` rule on it makes the
workload fail with EIO (the first request after the event fails) and leaves an image
``qemu-img check`` finds without corruption (leaks allowed, as iotest 026)."""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockcore import BdrvRequestFlags, BlockBackend, OpenFlags

from .conftest import create, qemu_img, qemu_io, requires_qemu

pytest.importorskip("blockcore_blkdebug", reason="needs the blkdebug driver")
pytestmark = [requires_qemu, pytest.mark.blkdebug]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SRC = Path(__file__).parents[1] / "src" / "blockcore_qcow2"

Workload = Callable[[BlockBackend], None]


def _write(off: int, n: int, pat: int = 0x11, flags: BdrvRequestFlags = BdrvRequestFlags.NONE
           ) -> Workload:  # fmt: skip
    return lambda blk: blk.pwrite(off, bytes([pat]) * n, flags)


def _read(off: int, n: int) -> Workload:
    return lambda blk: blk.pread(off, n) and None


def _vmstate_save(blk: BlockBackend) -> None:
    from blockcore.special import bdrv_save_vmstate

    bdrv_save_vmstate(blk.bs, b"\x42" * 4096, 0, 4096)


def _vmstate_load(blk: BlockBackend) -> None:
    from blockcore.special import bdrv_load_vmstate

    bdrv_load_vmstate(blk.bs, bytearray(4096), 0, 4096)


def _make_empty(blk: BlockBackend) -> None:
    from blockcore.manage import bdrv_make_empty

    bdrv_make_empty(blk.bs)


# (create options, size, qemu-io setup commands, needs a raw backing file, workload)
Case = tuple[str, str, tuple[str, ...], bool, Workload]
COMPRESSED = BdrvRequestFlags.WRITE_COMPRESSED
CASES: dict[str, Case] = {
    "l1_update": ("", "64M", (), False, _write(0, 4096)),
    "l1_grow_alloc_table": ("", "64M", (), False, lambda blk: blk.truncate(20 * GiB)),
    "l1_grow_write_table": ("", "64M", (), False, lambda blk: blk.truncate(20 * GiB)),
    "l1_grow_activate_table": ("", "64M", (), False, lambda blk: blk.truncate(20 * GiB)),
    "l1_shrink_write_table": ("", "2G", ("write -P 1 0 64k", "write -P 2 1500M 64k"), False,
                              lambda blk: blk.truncate(64 * MiB)),
    "l1_shrink_free_l2_clusters": ("", "2G", ("write -P 1 0 64k", "write -P 2 1500M 64k"),
                                   False, lambda blk: blk.truncate(64 * MiB)),
    "l2_load": ("", "64M", ("write -P 1 0 64k",), False, _read(0, 4096)),
    "l2_update": ("", "64M", ("write -P 1 0 64k",), False, _write(1 * MiB, 4096)),
    "l2_update_compressed": ("", "64M", (), False, _write(0, 64 * KiB, 0x61, COMPRESSED)),
    "l2_alloc_write": ("", "64M", (), False, _write(0, 4096)),
    "l2_alloc_cow_read": ("", "64M", ("write -P 1 0 64k", "SNAPSHOT"), False,
                          _write(1 * MiB, 4096)),
    "read_aio": ("", "64M", ("write -P 1 0 64k",), False, _read(0, 4096)),
    # the backing read does not pass blkdebug; the next request that does (a write) fails
    "read_backing_aio": ("", "64M", (), True, lambda blk: _read(0, 4096)(blk) or
                         _write(1 * MiB, 4096)(blk)),
    "read_compressed": ("", "64M", ("write -c -P 1 0 64k",), False, _read(0, 4096)),
    "write_aio": ("", "64M", (), False, _write(0, 4096)),
    "write_compressed": ("", "64M", (), False, _write(0, 64 * KiB, 0x61, COMPRESSED)),
    "vmstate_save": ("", "64M", (), False, _vmstate_save),
    "vmstate_load": ("", "64M", ("write -b -P 1 0 64k",), False, _vmstate_load),
    "cow_read": ("", "64M", (), True, _write(4096, 4096)),
    "cow_write": ("", "64M", (), True, _write(4096, 4096)),
    "reftable_load": ("", "64M", (), False, lambda blk: None),  # at open
    "reftable_grow": ("cluster_size=512,refcount_bits=64", "8M", (), False, _write(0, 3 * MiB)),
    "refblock_load": ("", "64M", ("write -P 1 0 64k",), False, _write(1 * MiB, 4096)),
    # written back after a refcount decrease (qcow2_cache_entry_flush)
    "refblock_update_part": ("", "64M", ("write -P 1 0 128k",), False,
                             lambda blk: blk.pdiscard(0, 128 * KiB)),
    "refblock_alloc": ("cluster_size=1k", "64M", (), False, _write(0, 1 * MiB)),
    "refblock_alloc_hookup": ("cluster_size=1k", "64M", (), False, _write(0, 1 * MiB)),
    "refblock_alloc_write": ("cluster_size=1k", "64M", (), False, _write(0, 1 * MiB)),
    "refblock_alloc_write_blocks": ("cluster_size=512,refcount_bits=64", "8M", (), False,
                                    _write(0, 3 * MiB)),
    "refblock_alloc_write_table": ("cluster_size=512,refcount_bits=64", "8M", (), False,
                                   _write(0, 3 * MiB)),
    "refblock_alloc_switch_table": ("cluster_size=512,refcount_bits=64", "8M", (), False,
                                    _write(0, 3 * MiB)),
    "cluster_alloc": ("", "64M", (), False, _write(0, 4096)),
    "cluster_alloc_bytes": ("", "64M", (), False, _write(0, 64 * KiB, 0x61, COMPRESSED)),
    # a partial-cluster write where the rest reads as zero: zeroed instead of COW
    "cluster_alloc_space": ("", "64M", (), False, _write(4096, 4096)),
    "cluster_free": ("", "64M", ("write -P 1 0 128k",), False,
                     lambda blk: blk.pdiscard(0, 128 * KiB)),
    "empty_image_prepare": ("", "64M", ("write -P 1 0 64k",), True, _make_empty),
    # make_completely_empty's switch to the new L1 and refcount tables
    "reftable_update": ("", "64M", ("write -P 1 0 64k",), True, _make_empty),
    "pwritev": ("", "64M", (), False, _write(0, 4096)),
    "pwritev_zero": ("", "64M", ("write -P 1 0 128k",), False,
                     lambda blk: blk.pwrite_zeroes(0, 128 * KiB)),
}  # fmt: skip
# More workloads for events in CASES: QEMU 7.2 sends them there too.
ALSO: dict[str, Case] = {
    # qcow2_cache_entry_flush sends refblock_update_part before writing any cached refcount
    # block back, also a fresh allocation's (7.2 never sends refblock_update)
    "refblock_update_part@writeback": ("", "64M", (), False, _write(0, 4096)),
    # past the end of the (2 MiB) raw backing file the COW regions read as zero
    "cluster_alloc_space@past-backing-end": ("", "64M", (), True, _write(3 * MiB, 4096)),
}
# Workloads where QEMU 7.2 does not send the event (checked with qemu-io and blkdebug).
NOT_SENT: dict[str, Case] = {
    # refcount table growth goes through qcow2_refcount_area, which writes a whole new table
    "reftable_update@reftable-growth": ("cluster_size=512,refcount_bits=64", "8M", (), False,
                                        _write(0, 3 * MiB)),
    # no COW regions: nothing to zero
    "cluster_alloc_space@whole-cluster": ("", "64M", (), False, _write(0, 64 * KiB)),
    # the COW regions come from a raw backing file: not known to be zero
    "cluster_alloc_space@backing-data": ("", "64M", (), True, _write(4096, 4096)),
}


def _claimed_events() -> set[str]:
    """Event names in the plugin's ``event(...)`` calls and its table caches."""
    text = "".join(p.read_text() for p in SRC.glob("*.py"))
    found: set[str] = set()
    for args in re.findall(r"\.event\(([^)]*)\)", text):
        found |= set(re.findall(r'"([a-z0-9_]+)"', args))
    for call in re.findall(r"TableCache\(([^)]*)\)", text):
        found |= set(re.findall(r'"([a-z0-9_]+)"', call)[1:])  # after the cache's name
    return found


def test_every_claimed_event_has_a_case() -> None:
    claimed = _claimed_events()
    assert {"l1_grow_alloc_table", "refblock_alloc_switch_table", "l2_load"} <= claimed
    assert claimed == set(CASES), claimed ^ set(CASES)


def _image(tmp_path: Path, case: Case) -> str:
    opts, size, setup, backing, _ = case
    extra: tuple[str, ...] = ()
    if backing:
        base = tmp_path / "base.raw"
        base.write_bytes(b"\x55" * (2 * MiB))
        extra = ("-b", str(base), "-F", "raw")
    img = create(tmp_path / "t.qcow2", size, opts, *extra)
    cmds = [c for c in setup if c != "SNAPSHOT"]
    if cmds:
        qemu_io(img, *cmds)
    if "SNAPSHOT" in setup:
        qemu_img("snapshot", "-c", "s1", str(img))
    return str(img)


def _open(img: str, **rules: Any) -> BlockBackend:
    return BlockBackend.open(None, {"driver": "qcow2", "discard": "unmap", "file": {
        "driver": "blkdebug", **rules, "image": {"driver": "file", "filename": img}}},
        OpenFlags.RDWR)  # fmt: skip


def _run(blk: BlockBackend, work: Workload) -> None:
    work(blk)
    blk.flush()


def _check(img: str) -> None:
    proc = qemu_img("check", "--output=json", img, check=False)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0, res


def _state_after(img: str, event: str, work: Workload) -> int:
    with _open(img, **{"set-state": [{"event": event, "new_state": 2}]}) as blk:
        _run(blk, work)
        return int(blk.bs.file.bs.opaque.engine.state)


@pytest.mark.parametrize("event", list(CASES))
def test_event_sets_state(tmp_path: Path, event: str) -> None:
    img = _image(tmp_path, CASES[event])
    assert _state_after(img, event, CASES[event][4]) == 2
    _check(img)


@pytest.mark.parametrize("event", list(CASES))
def test_error_injected_at_event_fails_the_workload(tmp_path: Path, event: str) -> None:
    img = _image(tmp_path, CASES[event])
    work = CASES[event][4]
    rule = {"event": event, "errno": errno.EIO, "once": True}
    failed: OSError | None = None
    try:
        with _open(img, **{"inject-error": [rule]}) as blk:
            try:
                _run(blk, work)
            except OSError as exc:
                failed = exc
    except OSError as exc:  # the event fires at open (reftable_load): the open fails
        failed = failed or exc
    assert failed is not None, f"no error: {event} never fired or nothing followed it"
    assert failed.errno == errno.EIO, failed
    _check(img)


@pytest.mark.parametrize("event", list(ALSO))
def test_event_sets_state_in_other_workloads(tmp_path: Path, event: str) -> None:
    img = _image(tmp_path, ALSO[event])
    assert _state_after(img, event.split("@")[0], ALSO[event][4]) == 2
    _check(img)


@pytest.mark.parametrize("event", list(NOT_SENT))
def test_event_not_sent_where_qemu_does_not_send_it(tmp_path: Path, event: str) -> None:
    img = _image(tmp_path, NOT_SENT[event])
    assert _state_after(img, event.split("@")[0], NOT_SENT[event][4]) == 1
    _check(img)

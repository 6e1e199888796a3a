"""The blkdebug node: ways to open it, every option, every rule kind on real requests, the
events the core raises, and the checks of the core's guarantees."""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Callable

import pytest
from blkdebug_helpers import Env
from blockcore_blkdebug import driver as bd
from blockcore_blkdebug.driver import BlkdebugState

import blockcore
from blockcore import BdrvRequestFlags as F
from blockcore import BlockBackend, OpenFlags, io
from blockcore.errors import BlockError, NoSpaceError, NotSupportedError, PermissionConflictError
from blockcore.graph import bdrv_filter_bs
from blockcore.status import bdrv_block_status
from blockcore.types import BLKDEBUG_EVENTS, BlockStatusFlags, ChildRole, Perm

SIZE = 1 << 20


def run(coro: object) -> object:
    return blockcore.run(coro)  # type: ignore[arg-type]


def calls_of(drv: object, hook: str) -> list[tuple[int, int]]:
    return [(o, n) for h, o, n, _f in drv.calls if h == hook]  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------
# Opening
# -------------------------------------------------------------------------------------------


def test_open_nested_options_makes_a_filter(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem)
    bs = blk.bs
    assert bs.drv.name == "blkdebug" and bs.drv.descriptor.is_filter  # type: ignore[union-attr]
    child = bs.file
    assert child is not None and child.name == "image" and child.bs.drv.name == mem.name  # type: ignore[union-attr]
    assert child.role == ChildRole.FILTERED | ChildRole.PRIMARY
    assert bdrv_filter_bs(bs) is child.bs
    assert isinstance(bs.opaque, BlkdebugState)
    assert blk.getlength() == SIZE
    blk.pwrite(0, b"hello")
    assert blk.pread(0, 5) == b"hello"
    assert bytes(child.bs.opaque[:5]) == b"hello"


def test_open_flat_dotted_options(env: Env) -> None:
    mem = env.mem()
    blk = env.track(BlockBackend.open(None, {
        "driver": "blkdebug", "image.driver": mem.name, "image.size": str(SIZE),
        "align": "4k", "inject-error.0.event": "none", "inject-error.0.errno": "28",
        "inject-error.0.iotype": "read",
    }, OpenFlags.RDWR))  # fmt: skip
    assert blk.bs.bl.request_alignment == 4096
    blk.pwrite(0, b"x" * 4096)
    with pytest.raises(NoSpaceError, match=r"injected ENOSPC into bdrv_co_preadv at 0x0 "
                                           r"\(rule 0\)"):  # fmt: skip
        blk.pread(0, 512)


def test_open_json_filename(env: Env) -> None:
    mem = env.mem()
    spec = {"driver": "blkdebug", "inject-error": [{"event": "none", "sector": 1}],
            "image": {"driver": mem.name, "size": SIZE}}  # fmt: skip
    blk = env.track(BlockBackend.open("json:" + json.dumps(spec), flags=OpenFlags.RDWR))
    assert blk.pread(0, 512) == bytes(512)
    with pytest.raises(BlockError, match="injected EIO into bdrv_co_preadv at 0x200"):
        blk.pread(512, 512)


@pytest.fixture
def saved_image(env: Env) -> tuple[str, bytes]:
    """A memory image with data, kept by its driver under a filename; returns the protocol
    filename ``<driver>:<key>`` and the data."""
    mem = env.mem()
    data = bytes(range(256)) * 16
    blk = BlockBackend.open(None, {"driver": mem.name, "filename": "disk", "size": SIZE},
                            OpenFlags.RDWR)  # fmt: skip
    blk.pwrite(0, data)
    blk.close()
    return f"{mem.name}:disk", data


def test_filename_syntax_with_empty_config(env: Env, saved_image: tuple[str, bytes]) -> None:
    image, data = saved_image
    blk = env.track(BlockBackend.open(f"blkdebug::{image}", {"driver": "blkdebug"},
                                      OpenFlags.RDWR))  # fmt: skip
    assert blk.bs.drv.name == "blkdebug"  # type: ignore[union-attr]
    assert blk.bs.file.bs.filename == "disk"  # type: ignore[union-attr]
    assert blk.pread(0, len(data)) == data
    assert blk.bs.opaque.config is None


def test_filename_syntax_probes_a_format_above(env: Env, saved_image: tuple[str, bytes]) -> None:
    """Without a driver, as in ``qemu-io blkdebug::img``, a format is probed over blkdebug."""
    pytest.importorskip("blockcore_raw")
    image, data = saved_image
    blk = env.track(BlockBackend.open(f"blkdebug::{image}", flags=OpenFlags.NONE))
    node = bd.find_debug_node(blk.bs)
    assert node is not None and node.drv.name == "blkdebug"  # type: ignore[union-attr]
    assert blk.bs.drv.name == "raw" and blk.bs.file.bs is node  # type: ignore[union-attr]
    assert blk.pread(0, len(data)) == data


def test_filename_syntax_with_config(env: Env, saved_image: tuple[str, bytes],
                                     conf: Callable[[str], str]) -> None:  # fmt: skip
    image, data = saved_image
    path = conf('[inject-error]\nevent = "none"\nsector = "4"\nerrno = "28"\n')
    blk = env.track(BlockBackend.open(f"blkdebug:{path}:{image}", {"driver": "blkdebug"},
                                      OpenFlags.RDWR))  # fmt: skip
    assert blk.pread(0, 2048) == data[:2048]
    with pytest.raises(NoSpaceError):
        blk.pread(2048, 512)


@pytest.mark.parametrize("form", ["filename-option", "x-image", "image-dict-without-driver"])
def test_other_ways_to_name_the_image(env: Env, saved_image: tuple[str, bytes],
                                      form: str) -> None:  # fmt: skip
    image, data = saved_image
    opts: dict[str, object] = {
        "filename-option": {"driver": "blkdebug", "filename": f"blkdebug::{image}"},
        "x-image": {"driver": "blkdebug", "x-image": image},
        "image-dict-without-driver": {"driver": "blkdebug", "image": {"filename": image}},
    }[form]
    blk = env.track(BlockBackend.open(None, opts, OpenFlags.RDWR))
    assert blk.pread(0, len(data)) == data


def test_image_given_as_node_name(env: Env) -> None:
    mem = env.mem()
    base = env.track(BlockBackend.open(None, {"driver": mem.name, "size": SIZE,
                                              "node-name": "bd-base"}, OpenFlags.RDWR))  # fmt: skip
    base.pwrite(0, b"shared")
    blk = env.track(BlockBackend.open(None, {"driver": "blkdebug", "image": "bd-base"},
                                      OpenFlags.RDWR))  # fmt: skip
    assert blk.bs.file.bs is base.bs  # type: ignore[union-attr]
    assert blk.pread(0, 6) == b"shared"


def test_parse_filename() -> None:
    assert bd.bdrv_parse_filename("blkdebug::img") == {"x-image": "img"}
    parsed = bd.bdrv_parse_filename("blkdebug:c.conf:file:a:b")
    assert parsed == {"config": "c.conf", "x-image": "file:a:b"}
    with pytest.raises(BlockError, match="requires both config file and image path"):
        bd.bdrv_parse_filename("blkdebug:onlyconfig")
    with pytest.raises(BlockError, match="must start with 'blkdebug:'"):
        bd.bdrv_parse_filename("raw:x")


def test_open_errors(env: Env, conf: Callable[[str], str]) -> None:
    with pytest.raises(BlockError, match="'image' child is required"):
        BlockBackend.open(None, {"driver": "blkdebug"})
    mem = env.mem()
    with pytest.raises(BlockError, match="does not support the option 'bogus'"):
        env.open(mem, bogus=1)
    with pytest.raises(BlockError, match="could not read blkdebug config file") as info:
        env.open(mem, config="/nonexistent/blkdebug.conf")
    assert info.value.errno == errno.ENOENT
    bad = conf('[inject-error]\nevent = "nope"\n')
    with pytest.raises(BlockError, match=f"{bad}:2: key 'event': unknown event 'nope'"):
        env.open(mem, config=bad)
    with pytest.raises(BlockError, match="option 'set-state.0.new_state'"):
        env.open(mem, **{"set-state": [{"event": "none", "new_state": "x"}]})


# -------------------------------------------------------------------------------------------
# Limit options
# -------------------------------------------------------------------------------------------


def test_align_and_max_transfer(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, align=4096, **{"max-transfer": "16k"})
    assert (blk.bs.bl.request_alignment, blk.bs.bl.max_transfer) == (4096, 16384)
    mem.calls.clear()
    blk.pwrite(100, b"a" * 50000)  # unaligned: read-modify-write at 4 KiB, pieces of 16 KiB
    assert calls_of(mem, "preadv") == [(0, 4096), (49152, 4096)]
    writes = calls_of(mem, "pwritev")
    assert all(o % 4096 == 0 and n <= 16384 for o, n in writes)
    assert sum(n for _o, n in writes) == 53248
    mem.calls.clear()
    assert blk.pread(100, 50000) == b"a" * 50000
    assert calls_of(mem, "preadv") == [(0, 16384), (16384, 16384), (32768, 16384),
                                       (49152, 4096)]  # fmt: skip


def test_write_zero_limits(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, align=4096, **{"opt-write-zero": "64k", "max-write-zero": "128k"})
    assert blk.bs.bl.pwrite_zeroes_alignment == 65536
    assert blk.bs.bl.max_pwrite_zeroes == 131072
    blk.pwrite(0, b"\xff" * SIZE)
    mem.calls.clear()
    blk.pwrite_zeroes(4096, 400 * 1024)  # [4K, 404K)
    # pieces below 64 KiB are refused by blkdebug (ENOTSUP) and written as zero buffers
    assert calls_of(mem, "pwrite_zeroes") == [(65536, 131072), (196608, 131072),
                                              (327680, 65536)]  # fmt: skip
    assert calls_of(mem, "pwritev") == [(4096, 61440), (393216, 20480)]
    assert blk.pread(0, SIZE) == b"\xff" * 4096 + bytes(400 * 1024) + b"\xff" * (
        SIZE - 404 * 1024)


def test_discard_limits(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, align=4096, discard="unmap",
                   **{"opt-discard": "64k", "max-discard": "128k"})  # fmt: skip
    assert (blk.bs.bl.pdiscard_alignment, blk.bs.bl.max_pdiscard) == (65536, 131072)
    blk.pwrite(0, b"\xff" * SIZE)
    mem.calls.clear()
    blk.pdiscard(1000, 400 * 1024)
    # sub-4K edges are dropped by blkdebug; the rest is passed in 64K-aligned pieces
    assert calls_of(mem, "pdiscard") == [(4096, 61440), (65536, 131072), (196608, 131072),
                                         (327680, 65536), (393216, 16384)]  # fmt: skip
    got = blk.pread(0, SIZE)
    assert got[:4096] == b"\xff" * 4096 and got[4096:409600] == bytes(409600 - 4096)
    assert got[409600:] == b"\xff" * (SIZE - 409600)


@pytest.mark.parametrize(("options", "needle"), [
    ({"align": 3}, "option 'align': 3 is not a power of two"),
    ({"align": "2G"}, "option 'align': 2147483648 out of range"),
    ({"align": "abc"}, "option 'align': invalid size 'abc'"),
    ({"align": 4096, "max-transfer": 6144}, "option 'max-transfer': 6144 is not a multiple of "
                                            "4096"),
    ({"max-transfer": 1000}, "'max-transfer': 1000 is not a multiple of 512"),
    ({"opt-write-zero": 1000}, "'opt-write-zero': 1000 is not a multiple of 512"),
    ({"opt-write-zero": 8192, "max-write-zero": 4096}, "'max-write-zero': 4096 is not a "
                                                       "multiple of 8192"),
    ({"opt-discard": 1000}, "'opt-discard': 1000 is not a multiple"),
    ({"opt-discard": 8192, "max-discard": 12288}, "'max-discard': 12288 is not a multiple"),
    ({"take-child-perms": ["graph-mod"]}, "unknown permission 'graph-mod'"),
])  # fmt: skip
def test_bad_limit_options(env: Env, options: dict[str, object], needle: str) -> None:
    mem = env.mem(request_alignment=512)
    with pytest.raises(BlockError, match=needle.replace("(", r"\(")) as info:
        env.open(mem, **options)
    assert info.value.errno == errno.EINVAL


def test_non_power_of_two_zero_and_discard_limits(env: Env) -> None:
    """As iotest 177: 15M preferred and maximum sizes are fine if aligned."""
    mem = env.mem()
    size = 112 << 20
    blk = env.open(mem, size, align=512, discard="unmap", **{
        "opt-write-zero": "15M", "max-write-zero": "15M", "opt-discard": "15M",
        "max-discard": "15M"})  # fmt: skip
    blk.pwrite((32 << 20) - 512, b"\x01" * 1024)
    blk.pwrite((64 << 20) - 512, b"\x01" * 1024)
    mem.calls.clear()
    blk.pwrite_zeroes(32 << 20, 32 << 20)
    blk.pdiscard(80000001 - 1, 30 << 20)
    assert blk.pread((32 << 20) - 512, 1024) == b"\x01" * 512 + bytes(512)
    assert blk.pread((64 << 20) - 512, 1024) == bytes(512) + b"\x01" * 512
    unit = 15 << 20
    zeroes = calls_of(mem, "pwrite_zeroes")
    discards = calls_of(mem, "pdiscard")
    assert zeroes and discards
    for off, n in zeroes + discards:
        assert n <= unit and (off % unit == 0 or (off + n) % unit == 0 or
                              off // unit == (off + n - 1) // unit)  # fmt: skip
    assert sum(n for _o, n in zeroes + calls_of(mem, "pwritev")) == 32 << 20


def test_child_limits_kept_when_not_overridden(env: Env) -> None:
    mem = env.mem(request_alignment=512, max_transfer=8192)
    blk = env.open(mem)
    assert blk.bs.bl.request_alignment == 1 and blk.bs.bl.max_transfer == 8192
    blk2 = env.open(env.mem(request_alignment=512, max_transfer=12288), align=8192)
    assert blk2.bs.bl.max_transfer == 8192  # rounded down to the imposed alignment


def test_child_perm_options(env: Env) -> None:
    blk = env.open(env.mem(), flags=OpenFlags.NONE, **{
        "take-child-perms": ["resize", "consistent-read"]})  # fmt: skip
    child = blk.bs.file
    assert child is not None and not child.bs.open_flags & OpenFlags.RDWR
    assert child.perm & (Perm.RESIZE | Perm.CONSISTENT_READ) == Perm.RESIZE | Perm.CONSISTENT_READ
    blk = env.open(env.mem(), **{"take-child-perms": "write",
                                 "unshare-child-perms": {"0": "write", "1": "resize"}})  # fmt: skip
    child = blk.bs.file
    assert child is not None
    assert child.perm & Perm.WRITE and not child.shared_perm & (Perm.WRITE | Perm.RESIZE)
    with pytest.raises(PermissionConflictError):  # another writer of the image conflicts
        BlockBackend.attach(child.bs)


def test_request_flags_follow_the_image(env: Env) -> None:
    fua = env.mem(fua=True)
    blk = env.open(fua)
    assert blk.bs.supported_write_flags & F.FUA
    fua.calls.clear()
    blk.pwrite(0, b"x" * 512, F.FUA)
    assert [(h, f) for h, _o, _n, f in fua.calls] == [("pwritev", int(F.FUA))]
    plain = env.mem()
    blk2 = env.open(plain)
    assert not blk2.bs.supported_write_flags & F.FUA
    assert blk2.bs.supported_write_flags & F.WRITE_UNCHANGED
    plain.calls.clear()
    blk2.pwrite(0, b"x" * 512, F.FUA)  # emulated with a flush below blkdebug
    assert [h for h, *_ in plain.calls] == ["pwritev", "flush_to_disk"]


def test_truncate_and_length_pass_through(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, align=4096)
    blk.pwrite(0, b"z" * 8192)
    blk.truncate(2 * SIZE)
    assert blk.getlength() == 2 * SIZE and len(blk.bs.file.bs.opaque) == 2 * SIZE  # type: ignore[union-attr]
    blk.truncate(4096)
    assert blk.getlength() == 4096
    blk.truncate(SIZE)
    assert blk.pread(0, 8192) == b"z" * 4096 + bytes(4096)


def test_block_status_is_raw_to_the_image(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, align=4096)
    st = bdrv_block_status(blk.bs, 4096, 8192)
    assert st.ret & BlockStatusFlags.ALLOCATED


# -------------------------------------------------------------------------------------------
# Rules on real requests
# -------------------------------------------------------------------------------------------


def test_event_none_arms_at_open_and_message_format(env: Env) -> None:
    blk = env.open(align=4096, **{"inject-error": [{"event": "none", "sector": 128}]})
    blk.pread(0, 4096)
    with pytest.raises(BlockError) as info:
        blk.pread(0x10000, 10)
    err = info.value
    assert type(err) is BlockError and err.errno == errno.EIO
    assert err.strerror == "injected EIO into bdrv_co_preadv at 0x10000 (rule 0)"
    assert err.filename == blk.bs.filename


def test_rule_numbers_follow_definition_order(env: Env, conf: Callable[[str], str]) -> None:
    path = conf('[set-state]\nevent = "l1_update"\nnew_state = "2"\n'
                '[inject-error]\nevent = "none"\nsector = "0"\nerrno = "5"\n')  # fmt: skip
    blk = env.open(config=path, **{"inject-error": [{"event": "none", "errno": "ENOSPC"}]})
    with pytest.raises(BlockError, match=r"\(rule 1\)"):
        blk.pread(0, 512)
    with pytest.raises(NoSpaceError, match=r"\(rule 2\)"):
        blk.pread(512, 512)


def test_errno_values(env: Env) -> None:
    blk = env.open(**{"inject-error": [{"event": "none", "errno": errno.EROFS, "sector": 0},
                                       {"event": "none", "errno": 0, "sector": 1},
                                       {"event": "none", "errno": "EPERM"}]})  # fmt: skip
    with pytest.raises(BlockError) as info:
        blk.pread(0, 512)
    assert info.value.errno == errno.EROFS and "EROFS" in info.value.strerror
    assert blk.pread(512, 512) == bytes(512)  # errno 0: the rule lets it through
    with pytest.raises(BlockError) as info:
        blk.pread(1024, 512)
    assert info.value.errno == errno.EPERM


def test_injected_enotsup_is_the_fallback_signal(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, **{"inject-error": [{"event": "none", "errno": "ENOTSUP",
                                             "iotype": "write-zeroes"}]})  # fmt: skip
    blk.pwrite(0, b"\xff" * 8192)
    mem.calls.clear()
    blk.pwrite_zeroes(0, 8192)  # the core falls back to writing zeros
    assert calls_of(mem, "pwritev") == [(0, 8192)]
    assert blk.pread(0, 8192) == bytes(8192)
    # the memory image has no NO_FALLBACK, so neither has blkdebug: the core refuses first
    assert not blk.bs.supported_zero_flags & F.NO_FALLBACK
    with pytest.raises(NotSupportedError):
        blk.pwrite_zeroes(0, 8192, F.NO_FALLBACK)


def test_once(env: Env) -> None:
    blk = env.open(**{"inject-error": [{"event": "none", "once": "on"}]})
    with pytest.raises(BlockError):
        blk.pread(0, 512)
    assert blk.pread(0, 512) == bytes(512)
    assert blk.pread(0, 512) == bytes(512)
    always = env.open(**{"inject-error": [{"event": "none", "once": "off"}]})
    for _ in range(3):
        with pytest.raises(BlockError):
            always.pread(0, 512)


@pytest.mark.parametrize("immediately", [True, False])
def test_immediately(env: Env, immediately: bool) -> None:
    blk = env.open(**{"inject-error": [{"event": "none", "immediately": immediately}]})
    order: list[str] = []

    async def failing() -> None:
        try:
            await blk.co_preadv(0, 512, bytearray(512))
        except BlockError:
            order.append("failed")

    async def other() -> None:
        order.append("other ran")

    async def main() -> None:
        await asyncio.gather(failing(), other())

    run(main())
    # without "immediately" the failing request yields once before completing
    assert order == (["failed", "other ran"] if immediately else ["other ran", "failed"])


def _fails(op: Callable[[], object]) -> bool:
    try:
        op()
    except BlockError as exc:
        assert "injected" in exc.strerror
        return True
    return False


IOTYPE_OPS: dict[str, Callable[[BlockBackend], object]] = {
    "read": lambda blk: blk.pread(0, 4096),
    "write": lambda blk: blk.pwrite(0, b"w" * 4096),
    "write-zeroes": lambda blk: blk.pwrite_zeroes(0, 4096),
    "discard": lambda blk: blk.pdiscard(0, 4096),
    "flush": lambda blk: blk.flush(),
    "block-status": lambda blk: bdrv_block_status(blk.bs, 0, 4096),
}


@pytest.mark.parametrize("iotype", [*IOTYPE_OPS, None])
def test_iotype(env: Env, iotype: str | None) -> None:
    rule: dict[str, object] = {"event": "pwritev_done"}  # armed by the first write
    if iotype is not None:
        rule["iotype"] = iotype
    blk = env.open(align=4096, discard="unmap", **{"inject-error": [rule]})
    blk.pwrite(0, b"a" * 4096)
    hit = {name: _fails(lambda op=op: op(blk)) for name, op in IOTYPE_OPS.items()}  # type: ignore[misc]
    if iotype is None:  # the default: everything but block status
        assert hit == {**{k: True for k in IOTYPE_OPS}, "block-status": False}
    else:
        assert hit == {k: k == iotype for k in IOTYPE_OPS}


def test_flush_rule_needs_something_to_flush(env: Env) -> None:
    """As QEMU: the flush rule is checked in flush_to_disk, which runs only after writes."""
    blk = env.open(**{"inject-error": [{"event": "none", "iotype": "flush"}]})
    blk.flush()
    blk.pwrite(0, b"x")
    with pytest.raises(BlockError, match="injected EIO into bdrv_co_flush at 0x0"):
        blk.flush()


def test_sector_matches_any_overlapping_request(env: Env) -> None:
    mem = env.mem()
    blk = env.open(mem, **{"inject-error": [{"event": "none", "sector": 10}]})
    assert blk.pread(0, 5120) == bytes(5120)
    assert blk.pread(5121, 1000) == bytes(1000)
    with pytest.raises(BlockError):
        blk.pread(5119, 2)
    with pytest.raises(BlockError):
        blk.pwrite(0, b"y" * 8192)
    assert bytes(blk.bs.file.bs.opaque[:8192]) == bytes(8192)  # the failed write did nothing  # type: ignore[union-attr]


def test_state_and_set_state(env: Env) -> None:
    blk = env.open(**{
        "inject-error": [{"event": "pwritev", "state": 2, "errno": 28, "iotype": "write"}],
        "set-state": [{"event": "pwritev_done", "state": 1, "new_state": 2},
                      {"event": "pwritev_zero", "new_state": 3},
                      {"event": "pwritev", "state": 3, "new_state": 1}],
    })  # fmt: skip
    st: BlkdebugState = blk.bs.opaque
    assert st.engine.state == 1
    blk.pwrite(0, b"1" * 512)  # pwritev in state 1: nothing armed; pwritev_done -> 2
    assert st.engine.state == 2
    with pytest.raises(NoSpaceError):
        blk.pwrite(0, b"2" * 512)  # pwritev in state 2 arms the error (for writes only)
    assert blk.pread(0, 512) == b"1" * 512
    blk.pwrite_zeroes(0, 512)  # a zero write is not a "write": pwritev_zero -> 3
    assert st.engine.state == 3
    with pytest.raises(NoSpaceError):
        blk.pwrite(0, b"3" * 512)  # still armed; pwritev in state 3 -> 1
    assert st.engine.state == 1
    # pwritev in state 1 matches no inject rule, so the armed rule stays armed (QEMU)
    with pytest.raises(NoSpaceError):
        blk.pwrite(0, b"4" * 512)
    assert blk.pread(0, 512) == bytes(512)


def test_set_state_from_config_file(env: Env, conf: Callable[[str], str]) -> None:
    path = conf('[set-state]\nevent = "none"\nnew_state = "5"\n'
                '[inject-error]\nevent = "flush_to_os"\nstate = "5"\niotype = "read"\n')
    blk = env.open(config=path)
    assert blk.bs.opaque.engine.state == 5
    run(io.bdrv_co_debug_event(blk.bs, "flush_to_os"))
    with pytest.raises(BlockError):
        blk.pread(0, 512)


@pytest.mark.parametrize("event", BLKDEBUG_EVENTS)
def test_every_event_arms_its_rules(env: Env, event: str) -> None:
    blk = env.open(**{"inject-error": [{"event": event, "errno": "EIO", "iotype": "read"}],
                      "set-state": [{"event": event, "new_state": 9}]})  # fmt: skip
    st: BlkdebugState = blk.bs.opaque
    if event == "none":  # fired by open itself
        assert st.engine.state == 9
    else:
        assert blk.pread(0, 512) == bytes(512)
        run(io.bdrv_co_debug_event(blk.bs, event))
        assert st.engine.state == 9
    with pytest.raises(BlockError):
        blk.pread(0, 512)


# -------------------------------------------------------------------------------------------
# Events the core raises on the blkdebug node
# -------------------------------------------------------------------------------------------

CORE_EVENTS: list[tuple[str, Callable[[BlockBackend], object]]] = [
    ("pwritev", lambda blk: blk.pwrite(0, b"a" * 4096)),
    ("pwritev_done", lambda blk: blk.pwrite(0, b"a" * 4096)),
    ("pwritev_zero", lambda blk: blk.pwrite_zeroes(0, 4096)),
    ("pwritev_rmw_head", lambda blk: blk.pwrite(100, b"a")),
    ("pwritev_rmw_after_head", lambda blk: blk.pwrite(100, b"a")),
    ("pwritev_rmw_tail", lambda blk: blk.pwrite(100, b"a" * 5000)),
    ("pwritev_rmw_after_tail", lambda blk: blk.pwrite(100, b"a" * 5000)),
    ("pwritev_rmw_tail", lambda blk: blk.pwrite(0, b"a" * 200000 + b"b")),  # large: edge path
]


@pytest.mark.parametrize(("event", "op"), CORE_EVENTS)
def test_request_path_events(env: Env, event: str, op: Callable[[BlockBackend], object]) -> None:
    blk = env.open(align=4096, **{"set-state": [{"event": event, "new_state": 7}]})
    assert blk.bs.opaque.engine.state == 1
    op(blk)
    assert blk.bs.opaque.engine.state == 7


def test_aligned_write_raises_no_rmw_events(env: Env) -> None:
    blk = env.open(align=4096, **{"set-state": [{"event": "pwritev_rmw_head", "new_state": 7}]})
    blk.pwrite(4096, b"a" * 8192)
    assert blk.bs.opaque.engine.state == 1


@pytest.mark.parametrize("event", ["flush_to_os", "flush_to_disk"])
def test_flush_events_from_the_node_above(env: Env, event: str) -> None:
    """A flush of the node above raises the flush events on its primary child: blkdebug."""
    mem = env.mem()
    inner = {"driver": "blkdebug", "node-name": "bd-inner", "image": {"driver": mem.name,
             "size": SIZE}, "set-state": [{"event": event, "new_state": 4}]}  # fmt: skip
    blk = env.track(BlockBackend.open(None, {"driver": "blkdebug", "image": inner},
                                      OpenFlags.RDWR))  # fmt: skip
    lower = blk.bs.file.bs  # type: ignore[union-attr]
    assert lower.node_name == "bd-inner"
    blk.pwrite(0, b"x")
    blk.flush()
    assert lower.opaque.engine.state == 4


def test_error_in_rmw_read_fails_the_write(env: Env) -> None:
    mem = env.mem()
    rule = {"event": "pwritev_rmw_head", "iotype": "read", "once": "on"}
    blk = env.open(mem, align=4096, **{"inject-error": [rule]})
    blk.pwrite(0, b"\x11" * 4096)
    with pytest.raises(BlockError, match="injected EIO into bdrv_co_preadv at 0x0"):
        blk.pwrite(10, b"\x22" * 10)
    assert blk.pread(0, 4096) == b"\x11" * 4096


# -------------------------------------------------------------------------------------------
# The checks of the core's guarantees fire when broken
# -------------------------------------------------------------------------------------------


def test_checks_fire_when_guarantees_are_broken(env: Env) -> None:
    blk = env.open(align=4096, discard="unmap", **{
        "max-transfer": "64k", "opt-write-zero": "16k", "max-write-zero": "32k",
        "opt-discard": "16k", "max-discard": "32k"})  # fmt: skip
    bs = blk.bs

    def buf(n: int) -> memoryview:
        return memoryview(bytearray(n))

    broken = [
        (bd.bdrv_co_preadv(bs, 512, 4096, buf(4096), F.NONE), "not aligned to request_alignment"),
        (bd.bdrv_co_preadv(bs, 0, 4000, buf(4000), F.NONE), "not aligned to request_alignment"),
        (bd.bdrv_co_preadv(bs, 0, 0, buf(0), F.NONE), "request at 0x0 of 0 bytes"),
        (bd.bdrv_co_preadv(bs, 0, 131072, buf(131072), F.NONE), "above max_transfer"),
        (bd.bdrv_co_preadv(bs, 0, 4096, buf(8192), F.NONE), "buffer of 8192 bytes for 4096"),
        (bd.bdrv_co_preadv(bs, 0, 4096, buf(4096), F.FUA), "flags"),
        (bd.bdrv_co_preadv(bs, SIZE, 4096, buf(4096), F.NONE), "passes the end"),
        (bd.bdrv_co_pwritev(bs, 0, 4096, buf(4096), F.MAY_UNMAP), "flags"),
        (bd.bdrv_co_pwritev(bs, 100, 4096, buf(4096), F.NONE), "not aligned"),
        (bd.bdrv_co_pwrite_zeroes(bs, 12288, 8192, F.NONE), "crosses a zero-write alignment"),
        (bd.bdrv_co_pwrite_zeroes(bs, 4096, 16384, F.NONE), "not aligned to the zero-write"),
        (bd.bdrv_co_pwrite_zeroes(bs, 0, 65536, F.NONE), "above max_pwrite_zeroes"),
        (bd.bdrv_co_pwrite_zeroes(bs, 0, 16384, F.SERIALISING), "not supported"),
        (bd.bdrv_co_pdiscard(bs, 4000, 200), "crosses a request_alignment boundary"),
        (bd.bdrv_co_pdiscard(bs, 4096, 16384), "not aligned to the discard alignment"),
        (bd.bdrv_co_pdiscard(bs, 12288, 8192), "crosses a discard alignment boundary"),
        (bd.bdrv_co_pdiscard(bs, 0, 65536), "above max_pdiscard"),
        (bd.bdrv_co_pdiscard(bs, 0, 0), "request at 0x0 of 0 bytes"),
        (bd.bdrv_co_block_status(bs, True, 100, 4096), "not aligned"),
        (bd.bdrv_co_truncate(bs, -1, True, blockcore.PreallocMode.OFF, F.NONE), "negative"),
        (bd.bdrv_co_truncate(bs, 0, True, blockcore.PreallocMode.OFF, F.FUA), "flags"),
        (bd.bdrv_co_debug_event(bs, "no_such_event"), "unknown debug event"),
    ]
    for coro, needle in broken:
        with pytest.raises(AssertionError, match="the core broke its promise") as info:
            run(coro)
        assert needle in str(info.value), str(info.value)
        assert repr(bs.node_name) in str(info.value)


def test_small_pieces_are_refused_as_not_supported(env: Env) -> None:
    blk = env.open(align=4096, discard="unmap", **{"opt-write-zero": "16k", "opt-discard": "16k"})
    bs = blk.bs
    with pytest.raises(NotSupportedError):
        run(bd.bdrv_co_pwrite_zeroes(bs, 4096, 4096, F.NONE))
    with pytest.raises(NotSupportedError):
        run(bd.bdrv_co_pdiscard(bs, 100, 200))

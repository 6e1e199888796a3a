"""Block status and allocation over a 3-deep backing chain with holes at every level:
bdrv_block_status(_above), bdrv_is_allocated(_above) with include_base, bdrv_co_is_zero_fast,
EOF handling with layers of different lengths, and filters in the chain."""

from __future__ import annotations

from typing import Any

import pytest
from iotest_drivers import Env, FilterDriver, build_chain, run_locked

from blockcore import status
from blockcore.graph import BlockDriverState
from blockcore.types import BlockStatusFlags as S

G = 512  # allocation grain of the CowDriver layers
N = 20  # grains per layer
SIZE = N * G

# What each layer holds, per grain: "d" data, "z" allocated zeros, "." unallocated.
# Every level has holes, and some grains are holes in all three levels.
LAYOUT = {
    "base": "..d...zdd.d.z..d..d.",
    "mid": ".d...z.dd.z...dd....",
    "top": "d...z..d...d.d......",
}


def ops(row: str) -> list[tuple[str, int, int]]:
    out = []
    for g, ch in enumerate(row):
        if ch == "d":
            out.append(("data", g * G, G))
        elif ch == "z":
            out.append(("zero", g * G, G))
    return out


def expected(g: int, layers: tuple[str, ...] = ("top", "mid", "base")) -> tuple[int, str]:
    """(depth, kind) of the first layer from the top that allocates grain ``g``."""
    for depth, name in enumerate(layers, 1):
        ch = LAYOUT[name][g]
        if ch != ".":
            return depth, ch
    return 0, "."


@pytest.fixture
def chain(env: Env) -> dict[str, BlockDriverState]:
    cow = env.cow(request_alignment=G)
    base, mid, top = build_chain(env, cow, SIZE,
                                 [ops(LAYOUT["base"]), ops(LAYOUT["mid"]), ops(LAYOUT["top"])])
    return {"base": base, "mid": mid, "top": top}


def walk(fn: Any, *args: Any, size: int = SIZE) -> list[tuple[int, Any]]:
    """Call ``fn(*args, offset, remaining)`` from 0 to ``size``; returns (offset, result)."""
    out = []
    offset = 0
    while offset < size:
        res = fn(*args, offset, size - offset)
        pnum = res.pnum if hasattr(res, "pnum") else res[1]
        assert pnum > 0, f"pnum 0 at {offset} before the end"
        out.append((offset, res))
        offset += pnum
    return out


def grains(offset: int, pnum: int) -> range:
    assert offset % G == 0 and pnum % G == 0
    return range(offset // G, (offset + pnum) // G)


# -------------------------------------------------------------------------------------------
# The chain is what the layout says
# -------------------------------------------------------------------------------------------


def test_chain_reads_topmost_allocated_layer(env: Env, chain: dict[str, BlockDriverState]) -> None:
    data = env.attach(chain["top"]).pread(0, SIZE)
    for g in range(N):
        depth, kind = expected(g)
        want = bytes([4 - depth]) * G if kind == "d" else bytes(G)
        assert data[g * G : (g + 1) * G] == want, f"grain {g}"


# -------------------------------------------------------------------------------------------
# bdrv_block_status_above over the whole chain
# -------------------------------------------------------------------------------------------


def test_status_above_whole_chain_allocated_ranges(chain: dict[str, BlockDriverState]) -> None:
    nodes = {1: chain["top"], 2: chain["mid"], 3: chain["base"]}
    for offset, st in walk(status.bdrv_block_status_above, chain["top"], None):
        for g in grains(offset, st.pnum):
            depth, kind = expected(g)
            assert bool(st.ret & S.ALLOCATED) == (depth > 0), f"grain {g}: {st}"
            if depth:
                assert st.depth == depth, f"grain {g}: {st}"
                assert bool(st.ret & S.DATA) == (kind == "d"), f"grain {g}: {st}"
                assert bool(st.ret & S.ZERO) == (kind == "z"), f"grain {g}: {st}"
            if kind == "d":
                assert st.ret & S.OFFSET_VALID
                assert st.file is nodes[depth]
                assert st.map == offset
        # pnum never spans grains whose answer differs
        answers = {expected(g) for g in grains(offset, st.pnum)}
        assert len(answers) == 1, f"pnum {st.pnum} at {offset} spans {answers}"
    last_offset, last = walk(status.bdrv_block_status_above, chain["top"], None)[-1]
    assert last.ret & S.EOF
    del last_offset


# Regression test (core bug found by this suite, fixed in aeb6657): a range unallocated in every
# layer down to a base without backing gets ret 0; QEMU returns the last layer's answer, which
# has ZERO (status._common_status_above uses the top layer's bits)
def test_status_above_hole_through_whole_chain_reads_as_zero(
    chain: dict[str, BlockDriverState],
) -> None:
    hole = [g for g in range(N) if expected(g)[0] == 0]
    assert hole
    for g in hole:
        st = status.bdrv_block_status_above(chain["top"], None, g * G, G)
        assert not st.ret & S.ALLOCATED
        assert st.ret & S.ZERO, f"grain {g}: {st}"


def test_status_above_stops_at_base(chain: dict[str, BlockDriverState]) -> None:
    # base=mid: only the top layer counts
    for offset, st in walk(status.bdrv_block_status_above, chain["top"], chain["mid"]):
        for g in grains(offset, st.pnum):
            depth, _kind = expected(g, ("top",))
            assert bool(st.ret & S.ALLOCATED) == (depth == 1), f"grain {g}: {st}"
    # base=top itself: nothing above it
    st = status.bdrv_block_status_above(chain["top"], chain["top"], 0, SIZE)
    assert st.ret == 0 and st.pnum == SIZE


def test_block_status_of_one_node(chain: dict[str, BlockDriverState]) -> None:
    for name in ("top", "mid", "base"):
        for offset, st in walk(status.bdrv_block_status, chain[name]):
            for g in grains(offset, st.pnum):
                kind = LAYOUT[name][g]
                assert bool(st.ret & S.ALLOCATED) == (kind != "."), f"{name} grain {g}: {st}"
                assert bool(st.ret & S.DATA) == (kind == "d"), f"{name} grain {g}: {st}"
                if name == "base" and kind == ".":
                    assert st.ret & S.ZERO  # no backing file: holes read as zeros
                elif kind == ".":
                    assert not st.ret & S.ZERO  # holes defer to the backing file
            assert st.depth == 1


def test_status_at_and_past_end(chain: dict[str, BlockDriverState]) -> None:
    st = status.bdrv_block_status_above(chain["top"], None, SIZE, 512)
    assert st.pnum == 0 and st.ret & S.EOF
    st = status.bdrv_block_status_above(chain["top"], None, SIZE - G, 10 * G)
    assert st.pnum == G and st.ret & S.EOF  # clamped at the end of the top node


# -------------------------------------------------------------------------------------------
# Allocation
# -------------------------------------------------------------------------------------------


def test_is_allocated_top_only(chain: dict[str, BlockDriverState]) -> None:
    for offset, (allocated, pnum) in walk(status.bdrv_is_allocated, chain["top"]):
        for g in grains(offset, pnum):
            assert allocated == (LAYOUT["top"][g] != "."), f"grain {g}"


def test_is_allocated_coroutine(chain: dict[str, BlockDriverState]) -> None:
    allocated, pnum = run_locked(status.bdrv_co_is_allocated, chain["top"], 0, SIZE)
    assert allocated and pnum == G
    allocated, pnum = run_locked(status.bdrv_co_is_allocated, chain["top"], G, SIZE - G)
    assert not allocated and pnum == 3 * G


@pytest.mark.parametrize(("base", "include_base", "layers"), [
    (None, False, ("top", "mid", "base")),
    ("base", True, ("top", "mid", "base")),
    ("base", False, ("top", "mid")),
    ("mid", True, ("top", "mid")),
    ("mid", False, ("top",)),
])  # fmt: skip
def test_is_allocated_above_depth(chain: dict[str, BlockDriverState], base: str | None,
                                  include_base: bool, layers: tuple[str, ...]) -> None:  # fmt: skip
    base_bs = chain[base] if base else None
    results = walk(status.bdrv_is_allocated_above, chain["top"], base_bs, include_base)
    for offset, (depth, pnum) in results:
        for g in grains(offset, pnum):
            assert depth == expected(g, layers)[0], f"grain {g} ({base}, {include_base})"
    # pnum is 0 only at the end
    assert status.bdrv_is_allocated_above(chain["top"], base_bs, include_base, SIZE, G)[1] == 0


def test_is_allocated_above_coroutine(chain: dict[str, BlockDriverState]) -> None:
    depth, pnum = run_locked(status.bdrv_co_is_allocated_above, chain["top"], None, False,
                             2 * G, G)  # fmt: skip
    assert (depth, pnum) == (3, G)


# -------------------------------------------------------------------------------------------
# bdrv_co_is_zero_fast
# -------------------------------------------------------------------------------------------


def zero_fast(bs: BlockDriverState, offset: int, length: int) -> bool:
    return bool(run_locked(status.bdrv_co_is_zero_fast, bs, offset, length))


def test_is_zero_fast_on_allocated_layers(chain: dict[str, BlockDriverState]) -> None:
    top = chain["top"]
    for g in range(N):
        depth, kind = expected(g)
        if depth:
            assert zero_fast(top, g * G, G) == (kind == "z"), f"grain {g}"
    assert zero_fast(top, 0, 0)
    assert not zero_fast(top, 0, SIZE)  # data somewhere: no proof of zeros


# Regression test (core bug found by this suite, fixed in aeb6657): bdrv_co_is_zero_fast is False
# for a range that is a hole in every layer of a chain whose base has no backing file (QEMU: 1;
# follows from the status._common_status_above ZERO bug)
def test_is_zero_fast_on_hole_through_whole_chain(chain: dict[str, BlockDriverState]) -> None:
    hole = [g for g in range(N) if expected(g)[0] == 0]
    for g in hole:
        assert zero_fast(chain["top"], g * G, G), f"grain {g}"


# -------------------------------------------------------------------------------------------
# Layers of different lengths: EOF and zeros past a short backing file
# -------------------------------------------------------------------------------------------


def test_short_backing_reads_as_allocated_zeros(env: Env) -> None:
    cow = env.cow(request_alignment=G)
    base, mid, top = build_chain(env, cow, [4096, 8192, 8192],
                                 [[("data", 0, 4096)], [("data", 6144, 2048)], []])
    st = status.bdrv_block_status_above(top, None, 4096, 2048)
    assert st.ret & (S.ALLOCATED | S.ZERO) == S.ALLOCATED | S.ZERO
    assert st.pnum == 2048 and st.depth == 3
    assert status.bdrv_is_allocated_above(top, None, False, 4096, 2048) == (3, 2048)
    assert env.attach(top).pread(4096, 4096) == bytes(2048) + b"\x02" * 2048
    del base, mid


# Regression test (core bug found by this suite, fixed in aeb6657): EOF is added when a lower
# layer's answer covers the narrowed range even though that range stops before the end of the top
# node (QEMU adds EOF only if offset + pnum reaches the top's end)
@pytest.mark.parametrize("base_kind", ["short", "allocated"])
def test_eof_only_when_range_reaches_top_end(env: Env, base_kind: str) -> None:
    cow = env.cow(request_alignment=G)
    if base_kind == "short":
        sizes, base_ops = [4096, 8192, 8192], []
    else:
        sizes, base_ops = [8192, 8192, 8192], [("data", 4096, 4096)]
    _base, _mid, top = build_chain(env, cow, sizes,
                                   [base_ops, [("data", 6144, 2048)], []])  # fmt: skip
    st = status.bdrv_block_status_above(top, None, 4096, 4096)
    assert st.pnum == 2048  # narrowed by the middle layer
    assert st.ret & S.ALLOCATED
    assert not st.ret & S.EOF  # 4096 + 2048 is not the end of the top node


def test_eof_set_when_range_reaches_top_end(env: Env) -> None:
    cow = env.cow(request_alignment=G)
    _base, _mid, top = build_chain(env, cow, [8192, 8192, 8192],
                                   [[("data", 4096, 4096)], [], []])  # fmt: skip
    st = status.bdrv_block_status_above(top, None, 4096, 4096)
    assert st.pnum == 4096 and st.depth == 3
    assert st.ret & S.EOF and st.ret & S.ALLOCATED


# -------------------------------------------------------------------------------------------
# Filters and protocol nodes
# -------------------------------------------------------------------------------------------


def test_filter_on_top_passes_status_through(env: Env, chain: dict[str, BlockDriverState]) -> None:
    filt = env.add(FilterDriver())
    env.give_away(chain["top"])  # the filter's edge takes our reference
    blk = env.open(filt, None, file=chain["top"])
    fbs = blk.bs
    for offset, st in walk(status.bdrv_block_status_above, fbs, None):
        for g in grains(offset, st.pnum):
            depth, kind = expected(g)
            assert bool(st.ret & S.ALLOCATED) == (depth > 0), f"grain {g}: {st}"
            if depth:
                assert bool(st.ret & S.DATA) == (kind == "d")
    for offset, (depth, pnum) in walk(status.bdrv_is_allocated_above, fbs, None, False):
        for g in grains(offset, pnum):
            want = expected(g)[0]
            assert depth in ((want, want + 1) if want else (0,)), f"grain {g}"


def test_protocol_node_status_maps_to_itself(env: Env) -> None:
    drv = env.mem()
    blk = env.open(drv, 65536)
    blk.pwrite(4096, b"\x01" * 4096)
    st = status.bdrv_block_status(blk.bs, 4096, 4096)
    assert st.ret & (S.DATA | S.OFFSET_VALID | S.ALLOCATED) == S.DATA | S.OFFSET_VALID | S.ALLOCATED
    assert st.file is blk.bs and st.map == 4096
    st = status.bdrv_block_status(blk.bs, 8192, 65536 - 8192)
    assert st.ret & S.ZERO and st.ret & S.EOF

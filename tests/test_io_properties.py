"""Property tests: random request sequences (read, write, zero, discard, truncate, flush at
random offsets, lengths and flags) on nodes with random limits, compared against a bytearray
model. One family runs on a protocol node (MemoryDriver), the other on a copy-on-write
overlay over a backing node (CowDriver), with and without copy-on-read.

``BLOCKCORE_PROPERTY_EXAMPLES`` raises the number of examples for a long run.
"""

from __future__ import annotations

import os
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iotest_drivers import CowDriver, Env

from blockcore import BdrvRequestFlags as F
from blockcore import info
from blockcore.errors import NotSupportedError
from blockcore.util import round_up

EXAMPLES = int(os.environ.get("BLOCKCORE_PROPERTY_EXAMPLES", "120"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mem_config(draw: Any) -> dict[str, Any]:
    align = draw(st.sampled_from([1, 512, 4096]))
    unit = max(align, 512)
    max_transfer = draw(st.sampled_from([0, 1, 2, 3, 8])) * unit
    if align == 1 and draw(st.booleans()):
        max_transfer = draw(st.integers(1, 5000))
    pwz = draw(st.sampled_from([0, 1, 16])) * unit
    pda = draw(st.sampled_from([0, 1, 8])) * unit
    return {
        "request_alignment": align,
        "max_transfer": max_transfer,
        "pwrite_zeroes_alignment": pwz,
        "max_pwrite_zeroes": draw(st.sampled_from([0, 2, 5])) * max(pwz, unit),
        "pdiscard_alignment": pda,
        "max_pdiscard": draw(st.sampled_from([0, 3])) * max(pda, unit),
        "zero_write": draw(st.booleans()),
        "discard": draw(st.booleans()),
        "fua": draw(st.booleans()),
    }


def draw_range(data: Any, size: int, align: int, max_len: int = 40_000) -> tuple[int, int]:
    """An offset and length inside ``[0, size)``, often aligned, sometimes not."""
    if data.draw(st.booleans(), label="aligned") and size >= align:
        off = data.draw(st.integers(0, size // align - 1), label="off_blocks") * align
        n = data.draw(st.integers(1, max(1, min(size - off, max_len) // align)),
                      label="len_blocks") * align  # fmt: skip
        return off, min(n, size - off)
    off = data.draw(st.integers(0, size - 1), label="off")
    n = data.draw(st.integers(1, min(size - off, max_len)), label="len")
    return off, n


OPS = ["read", "write", "write", "zero", "discard", "truncate", "flush"]


@SETTINGS
@given(cfg=mem_config(), unmap=st.booleans(), size=st.integers(1, 128) .map(lambda k: k * 512),
       data=st.data())  # fmt: skip
def test_memory_node_matches_model(cfg: dict[str, Any], unmap: bool, size: int,
                                   data: Any) -> None:  # fmt: skip
    env = Env()
    try:
        drv = env.mem(**cfg)
        blk = env.open(drv, size, discard=unmap)
        model = bytearray(size)
        rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
        align = max(cfg["request_alignment"], 512)
        discards = unmap and cfg["discard"]
        for _ in range(data.draw(st.integers(1, 25), label="n_ops")):
            op = data.draw(st.sampled_from(OPS), label="op")
            size = len(model)
            if op == "truncate":
                new = data.draw(st.integers(1, 160 * 512), label="new_size")
                blk.truncate(new)
                keep = min(len(model), new)
                model = model[:keep] + bytes(round_up(new, 512) - keep)
                assert blk.getlength() == len(model)
                continue
            if op == "flush":
                blk.flush()
                continue
            off, n = draw_range(data, size, align)
            if op == "read":
                assert blk.pread(off, n) == model[off : off + n], (off, n)
            elif op == "write":
                buf = rng.randbytes(n)
                flags = F.FUA if data.draw(st.booleans(), label="fua") else F.NONE
                blk.pwrite(off, buf, flags)
                model[off : off + n] = buf
            elif op == "zero":
                flags = data.draw(st.sampled_from([F.NONE, F.MAY_UNMAP, F.FUA]), label="zflags")
                blk.pwrite_zeroes(off, n, flags)
                model[off : off + n] = bytes(n)
            elif op == "discard":
                blk.pdiscard(off, n)
                if discards:  # MemoryDriver discards to zeros; otherwise a no-op
                    model[off : off + n] = bytes(n)
        assert blk.pread(0, len(model)) == bytes(model)
    finally:
        env.close()


@st.composite
def cow_config(draw: Any) -> dict[str, Any]:
    align = draw(st.sampled_from([512, 4096]))
    cluster = draw(st.sampled_from([1, 2, 4, 16])) * align
    max_transfer = draw(st.sampled_from([0, 1, 2, 3])) * align
    return {
        "request_alignment": align,
        "cluster_size": cluster,
        "max_transfer": max_transfer,
        "zero_write": draw(st.booleans()),
        "truncate_zero": draw(st.booleans()),
    }


@SETTINGS
@given(cfg=cow_config(), base_align=st.sampled_from([1, 512, 4096]),
       base_size=st.integers(1, 96).map(lambda k: k * 512), top_grains=st.integers(1, 64),
       cor=st.booleans(), data=st.data())  # fmt: skip
def test_cow_overlay_matches_model(cfg: dict[str, Any], base_align: int, base_size: int,
                                   top_grains: int, cor: bool, data: Any) -> None:  # fmt: skip
    env = Env()
    try:
        rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
        base_data = rng.randbytes(base_size)
        base = env.open(env.mem(request_alignment=base_align), base_size)
        base.pwrite(0, base_data)
        cow = env.cow(**cfg)
        # sizes are multiples of the CowDriver's allocation grain (request_alignment), not
        # necessarily of the cluster: copy-on-read then meets a partial last cluster
        grain = cfg["request_alignment"]
        size = top_grains * grain
        top = env.attach(env.node(cow, size, backing=base.bs))
        if cor:
            info.bdrv_enable_copy_on_read(top.bs)
        model = bytearray((base_data + bytes(max(0, size - base_size)))[:size])
        assert top.pread(0, size) == bytes(model)
        for _ in range(data.draw(st.integers(1, 20), label="n_ops")):
            op = data.draw(st.sampled_from(OPS), label="op")
            size = len(model)
            if op == "truncate":
                new = data.draw(st.integers(1, 64), label="new_grains") * grain
                try:
                    top.truncate(new)
                except NotSupportedError:
                    # QEMU's rule: growing over a longer backing file needs the driver's
                    # ZERO_WRITE truncate flag, else it is refused and nothing changes
                    assert new > size and base_size > size and not cfg["truncate_zero"]
                    assert top.getlength() == size
                    continue
                keep = min(len(model), new)
                model = model[:keep] + bytes(new - keep)
                assert top.getlength() == new
                continue
            if op == "flush":
                top.flush()
                continue
            off, n = draw_range(data, size, cfg["request_alignment"], 20_000)
            if op == "read":
                assert top.pread(off, n) == model[off : off + n], (off, n)
            elif op == "write":
                buf = rng.randbytes(n)
                top.pwrite(off, buf)
                model[off : off + n] = buf
            elif op == "zero":
                top.pwrite_zeroes(off, n)
                model[off : off + n] = bytes(n)
            elif op == "discard":
                top.pdiscard(off, n)  # CowDriver cannot discard: a no-op
        assert top.pread(0, len(model)) == bytes(model)
        if cor:
            info.bdrv_disable_copy_on_read(top.bs)
            base.pwrite(0, bytes(base_size))  # everything read was copied up
            for g, state in enumerate(CowDriver.allocation(top.bs)):
                if state:
                    lo = g * cfg["request_alignment"]
                    hi = min(lo + cfg["request_alignment"], len(model))
                    assert top.pread(lo, hi - lo) == model[lo:hi]
    finally:
        env.close()

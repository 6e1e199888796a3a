"""In-memory test drivers and helpers for the request-path tests (test_io_*, test_status,
test_drain, test_cor, test_special).

- :class:`CowDriver`: a copy-on-write *format* with a backing child, in memory. It tracks
  allocation per ``request_alignment`` unit (data, allocated zeros, unallocated), reads
  unallocated parts from ``bs.backing`` through :mod:`blockcore.io`, and reports block
  status per layer (unallocated ranges carry neither DATA nor ZERO).
- :class:`FilterDriver`: a pass-through filter over a ``file`` child.
- :class:`OffloadMemoryDriver`: :class:`~blockcore.testing.MemoryDriver` with copy offload.
- :class:`Env`: registers drivers under unique names and closes what a test opened.

Every test driver checks the core's guarantees (alignment, ``max_transfer``, non-empty
requests) on each request, so a broken guarantee fails the test that caused it.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
from typing import Any

import attrs

import blockcore
from blockcore import hookimpl, io
from blockcore.aio import bdrv_graph_co_rdlock
from blockcore.backend import BlockBackend
from blockcore.drivers import unregister_driver
from blockcore.errors import NotSupportedError
from blockcore.graph import BlockDriverState, bdrv_open, bdrv_open_child, bdrv_unref
from blockcore.testing import InProcessDriver, MemoryDriver
from blockcore.types import (
    BdrvRequestFlags,
    BlockDriverInfo,
    BlockLimits,
    BlockStatus,
    BlockStatusFlags,
    ChildRole,
    Concurrency,
    DriverDescriptor,
    OpenFlags,
    OptionSpec,
    PreallocMode,
)
from blockcore.util import parse_size, round_up

F = BdrvRequestFlags
S = BlockStatusFlags

_names = itertools.count(1)


def unique(prefix: str) -> str:
    """A driver name no other test uses."""
    return f"{prefix}{next(_names)}"


def address_of(buf: Any) -> int | None:
    """Address of a writable buffer's first byte, or None for read-only buffers."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return None


# -------------------------------------------------------------------------------------------
# Copy-on-write format
# -------------------------------------------------------------------------------------------

UNALLOC, DATA, ZERO = 0, 1, 2


@attrs.define(eq=False)
class CowState:
    size: int
    grain: int
    data: bytearray
    state: bytearray  # one entry per grain: UNALLOC, DATA or ZERO
    vmstate: bytearray = attrs.Factory(bytearray)

    def grains(self, size: int) -> int:
        return -(-size // self.grain)

    def resize(self, size: int, fill: int) -> None:
        n = self.grains(size)
        if n < len(self.state):
            del self.state[n:]
        else:
            self.state.extend(bytes([fill]) * (n - len(self.state)))
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        self.size = size


class CowDriver(InProcessDriver):
    """An in-memory copy-on-write format with a backing child, for tests.

    Open with ``{"driver": name, "size": N}`` (plus ``"backing": node`` for a chain).
    Allocation is tracked per ``request_alignment`` unit; ``cluster_size`` is what
    ``bdrv_get_info`` reports (copy-on-read widens to it).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        request_alignment: int = 512,
        max_transfer: int = 0,
        cluster_size: int = 0,
        zero_write: bool = True,
        truncate_zero: bool = True,
        vmstate: bool = False,
        events: bool = False,
        concurrency: Concurrency = Concurrency.PARALLEL,
    ) -> None:
        self.name = name or unique("iocow")
        self.limits = BlockLimits(request_alignment=request_alignment, max_transfer=max_transfer)
        self.cluster_size = cluster_size or request_alignment
        self.truncate_zero = truncate_zero
        self.concurrency = concurrency
        self.calls: list[tuple[str, int, int, int]] = []
        self.events: list[tuple[str, str]] = []
        self.flushes_to_os = 0
        self.flushes_to_disk = 0
        if not zero_write:
            self.bdrv_co_pwrite_zeroes = None  # type: ignore[assignment]
        if not vmstate:
            self.bdrv_co_readv_vmstate = None  # type: ignore[assignment]
            self.bdrv_co_writev_vmstate = None  # type: ignore[assignment]
        if not events:
            self.bdrv_co_debug_event = None  # type: ignore[assignment]

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        return DriverDescriptor(
            format_name=self.name,
            is_format=True,
            supports_backing=True,
            concurrency=self.concurrency,
            supported_zero_flags=F.MAY_UNMAP,
            supported_truncate_flags=F.ZERO_WRITE if self.truncate_zero else F.NONE,
            runtime_opts=(OptionSpec("size", "size", "length in bytes", 0),),
            has_zero_init=True,
        )

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
        size = parse_size(options.get("size", 0))
        grain = self.limits.request_alignment
        bs.opaque = CowState(size, grain, bytearray(size), bytearray(-(-size // grain)))
        bs.filename = f"{self.name}:{bs.node_name}"

    @hookimpl
    def bdrv_refresh_limits(self, bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
        return self.limits

    @hookimpl
    async def bdrv_co_getlength(self, bs: BlockDriverState) -> int:
        return int(bs.opaque.size)

    def _runs(self, st: CowState, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(state, start, end) runs covering [offset, offset+length)."""
        runs: list[tuple[int, int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            g = pos // st.grain
            kind = st.state[g] if g < len(st.state) else UNALLOC
            nxt = min((g + 1) * st.grain, end)
            if runs and runs[-1][0] == kind and runs[-1][2] == pos:
                runs[-1] = (kind, runs[-1][1], nxt)
            else:
                runs.append((kind, pos, nxt))
            pos = nxt
        return runs

    @hookimpl
    async def bdrv_co_preadv(self, bs: BlockDriverState, offset: int, length: int,
                             buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self._check(bs, "preadv", offset, length)
        if len(buf) != length:
            raise AssertionError(f"preadv: buffer {len(buf)} != length {length}")
        self.calls.append(("preadv", offset, length, int(flags)))
        st: CowState = bs.opaque
        for kind, start, end in self._runs(st, offset, length):
            part = buf[start - offset : end - offset]
            if kind == DATA:
                chunk = st.data[start:end]
                part[: len(chunk)] = chunk
                part[len(chunk) :] = bytes(len(part) - len(chunk))
            elif kind == UNALLOC and bs.backing is not None:
                await io.bdrv_co_preadv(bs.backing, start, end - start, part)
            else:
                part[:] = bytes(len(part))

    @hookimpl
    async def bdrv_co_pwritev(self, bs: BlockDriverState, offset: int, length: int,
                              buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self._check(bs, "pwritev", offset, length)
        self.calls.append(("pwritev", offset, length, int(flags)))
        st: CowState = bs.opaque
        if offset + length > st.size:
            st.resize(offset + length, UNALLOC)
        st.data[offset : offset + length] = buf
        for g in range(offset // st.grain, -(-(offset + length) // st.grain)):
            st.state[g] = DATA

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs: BlockDriverState, offset: int, length: int,
                                    flags: BdrvRequestFlags) -> None:  # fmt: skip
        self._check(bs, "pwrite_zeroes", offset, length, transfer=False)
        self.calls.append(("pwrite_zeroes", offset, length, int(flags)))
        st: CowState = bs.opaque
        if offset + length > st.size:
            st.resize(offset + length, UNALLOC)
        st.data[offset : offset + length] = bytes(length)
        for g in range(offset // st.grain, -(-(offset + length) // st.grain)):
            st.state[g] = ZERO

    @hookimpl
    async def bdrv_co_block_status(self, bs: BlockDriverState, want_zero: bool, offset: int,
                                   length: int) -> BlockStatus:  # fmt: skip
        self._check(bs, "block_status", offset, length, transfer=False)
        st: CowState = bs.opaque
        kind, start, end = self._runs(st, offset, length)[0]
        pnum = end - start
        if kind == DATA:
            return BlockStatus(S.DATA | S.OFFSET_VALID, pnum, offset, bs)
        if kind == ZERO:
            return BlockStatus(S.ZERO, pnum)
        return BlockStatus(S.NONE, pnum)

    @hookimpl
    async def bdrv_co_truncate(self, bs: BlockDriverState, offset: int, exact: bool,
                               prealloc: PreallocMode, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.calls.append(("truncate", offset, int(exact), int(flags)))
        if flags & ~self.bdrv_describe().supported_truncate_flags:
            raise AssertionError(f"truncate: unsupported flags {flags!r}")
        st: CowState = bs.opaque
        st.resize(offset, ZERO if flags & F.ZERO_WRITE else UNALLOC)

    @hookimpl
    async def bdrv_co_get_info(self, bs: BlockDriverState) -> BlockDriverInfo:
        return BlockDriverInfo(cluster_size=self.cluster_size)

    @hookimpl
    async def bdrv_co_flush_to_os(self, bs: BlockDriverState) -> None:
        self.flushes_to_os += 1

    @hookimpl
    async def bdrv_co_flush_to_disk(self, bs: BlockDriverState) -> None:
        self.flushes_to_disk += 1

    @hookimpl
    async def bdrv_co_readv_vmstate(self, bs: BlockDriverState, buf: memoryview, pos: int) -> None:
        vm: bytearray = bs.opaque.vmstate
        chunk = vm[pos : pos + len(buf)]
        buf[: len(chunk)] = chunk
        buf[len(chunk) :] = bytes(len(buf) - len(chunk))

    @hookimpl
    async def bdrv_co_writev_vmstate(self, bs: BlockDriverState, buf: memoryview,
                                     pos: int) -> None:  # fmt: skip
        vm: bytearray = bs.opaque.vmstate
        if pos + len(buf) > len(vm):
            vm.extend(bytes(pos + len(buf) - len(vm)))
        vm[pos : pos + len(buf)] = buf

    @hookimpl
    async def bdrv_co_debug_event(self, bs: BlockDriverState, event: str) -> None:
        self.events.append((bs.node_name, event))

    # -- test helpers ---------------------------------------------------------------------

    @staticmethod
    def allocation(bs: BlockDriverState) -> bytes:
        """Per-grain state of the node (UNALLOC, DATA, ZERO)."""
        return bytes(bs.opaque.state)


# -------------------------------------------------------------------------------------------
# Filter
# -------------------------------------------------------------------------------------------


class FilterDriver(InProcessDriver):
    """A pass-through filter over its ``file`` child (records what it forwards)."""

    def __init__(self, name: str | None = None, *, ioctl: bool = False,
                 medium: bool = False) -> None:  # fmt: skip
        self.name = name or unique("iofilt")
        self.calls: list[tuple[str, Any]] = []
        self.inserted = True
        if not ioctl:
            self.bdrv_co_ioctl = None  # type: ignore[assignment]
        if not medium:
            self.bdrv_co_eject = None  # type: ignore[assignment]
            self.bdrv_co_lock_medium = None  # type: ignore[assignment]
            self.bdrv_co_is_inserted = None  # type: ignore[assignment]

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        return DriverDescriptor(format_name=self.name, is_filter=True, child_names=("file",),
                                concurrency=Concurrency.PARALLEL)  # fmt: skip

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options: dict[str, Any], flags: OpenFlags) -> None:
        bdrv_open_child(bs, options, "file", ChildRole.FILTERED | ChildRole.PRIMARY)

    @hookimpl
    async def bdrv_co_preadv(self, bs: BlockDriverState, offset: int, length: int,
                             buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        await io.bdrv_co_preadv(bs.file, offset, length, buf, flags)

    @hookimpl
    async def bdrv_co_pwritev(self, bs: BlockDriverState, offset: int, length: int,
                              buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        await io.bdrv_co_pwritev(bs.file, offset, length, buf, flags)

    @hookimpl
    async def bdrv_co_ioctl(self, bs: BlockDriverState, req: int, buf: Any) -> int:
        self.calls.append(("ioctl", req))
        return 42

    @hookimpl
    async def bdrv_co_eject(self, bs: BlockDriverState, eject_flag: bool) -> None:
        self.calls.append(("eject", eject_flag))
        self.inserted = not eject_flag

    @hookimpl
    async def bdrv_co_lock_medium(self, bs: BlockDriverState, locked: bool) -> None:
        self.calls.append(("lock_medium", locked))

    @hookimpl
    async def bdrv_co_is_inserted(self, bs: BlockDriverState) -> bool:
        return self.inserted


# -------------------------------------------------------------------------------------------
# MemoryDriver variants
# -------------------------------------------------------------------------------------------


class ZeroUnsupportedMemoryDriver(MemoryDriver):
    """Has a zero-write hook that always says "not supported" (the fallback signal)."""

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs: BlockDriverState, offset: int, length: int,
                                    flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.calls.append(("pwrite_zeroes_refused", offset, length, int(flags)))
        raise NotSupportedError("no efficient zero write here", bs.node_name)


class BufferRecordingMemoryDriver(MemoryDriver):
    """Records the address of every buffer the core hands to preadv/pwritev."""

    def __init__(self, name: str, *, opt_mem_alignment: int = 4096, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.limits = attrs.evolve(self.limits, opt_mem_alignment=opt_mem_alignment)
        self.addresses: list[tuple[str, int | None]] = []

    @hookimpl
    async def bdrv_co_preadv(self, bs: BlockDriverState, offset: int, length: int,
                             buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.addresses.append(("preadv", address_of(buf)))
        await super().bdrv_co_preadv(bs, offset, length, buf, flags)

    @hookimpl
    async def bdrv_co_pwritev(self, bs: BlockDriverState, offset: int, length: int,
                              buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.addresses.append(("pwritev", address_of(buf)))
        await super().bdrv_co_pwritev(bs, offset, length, buf, flags)


class OffloadMemoryDriver(MemoryDriver):
    """MemoryDriver that can offload copies between its own nodes (copy_file_range-like)."""

    @hookimpl
    async def bdrv_co_copy_range_from(self, bs: BlockDriverState, src: Any, src_offset: int,
                                      dst: Any, dst_offset: int, length: int,
                                      read_flags: BdrvRequestFlags,
                                      write_flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.calls.append(("copy_range_from", src_offset, length, int(read_flags)))
        await io_special().bdrv_co_copy_range_to(src, src_offset, dst, dst_offset, length,
                                                 read_flags, write_flags)  # fmt: skip

    @hookimpl
    async def bdrv_co_copy_range_to(self, bs: BlockDriverState, src: Any, src_offset: int,
                                    dst: Any, dst_offset: int, length: int,
                                    read_flags: BdrvRequestFlags,
                                    write_flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.calls.append(("copy_range_to", dst_offset, length, int(write_flags)))
        sdata: bytearray = src.bs.opaque
        ddata: bytearray = bs.opaque
        chunk = bytes(sdata[src_offset : src_offset + length]).ljust(length, b"\0")
        if dst_offset + length > len(ddata):
            ddata.extend(bytes(dst_offset + length - len(ddata)))
        ddata[dst_offset : dst_offset + length] = chunk


def io_special() -> Any:
    from blockcore import special

    return special


# -------------------------------------------------------------------------------------------
# Environment: unique registration and cleanup
# -------------------------------------------------------------------------------------------


class Env:
    """Registers test drivers under unique names and closes everything a test opened."""

    def __init__(self) -> None:
        self.drivers: list[Any] = []
        self.backends: list[BlockBackend] = []
        self.nodes: list[BlockDriverState] = []

    def mem(self, **kw: Any) -> MemoryDriver:
        return self.add(MemoryDriver(unique("iomem"), **kw))

    def cow(self, **kw: Any) -> CowDriver:
        return self.add(CowDriver(**kw))

    def add(self, drv: Any) -> Any:
        drv.register()
        self.drivers.append(drv)
        return drv

    def open(self, drv: Any, size: int | None, flags: OpenFlags = OpenFlags.RDWR, *,
             discard: bool = False, **opts: Any) -> BlockBackend:  # fmt: skip
        """Open a backend on a new node of ``drv`` (``size`` None: no size option)."""
        options: dict[str, Any] = {"driver": drv.name, **opts}
        if size is not None:
            options["size"] = size
        if discard:
            options["discard"] = "unmap"
        blk = BlockBackend.open(None, options, flags)
        self.backends.append(blk)
        return blk

    def node(self, drv: Any, size: int, flags: OpenFlags = OpenFlags.RDWR,
             **opts: Any) -> BlockDriverState:  # fmt: skip
        """Open a node that the environment unrefs at the end (unless given away)."""
        bs = bdrv_open(None, {"driver": drv.name, "size": size, **opts}, flags)
        self.nodes.append(bs)
        return bs

    def attach(self, bs: BlockDriverState) -> BlockBackend:
        blk = BlockBackend.attach(bs)
        self.backends.append(blk)
        return blk

    def give_away(self, bs: BlockDriverState) -> None:
        """Our reference moved to someone else (an edge); do not unref it at the end."""
        self.nodes.remove(bs)

    def close(self) -> None:
        for blk in reversed(self.backends):
            blk.close()
        self.backends.clear()
        for bs in reversed(self.nodes):
            if bs.drv is not None and bs.refcnt > 0:
                bdrv_unref(bs)
        self.nodes.clear()
        for drv in reversed(self.drivers):
            unregister_driver(drv.name)
        self.drivers.clear()


def fill(blk: BlockBackend, layout: dict[int, bytes]) -> None:
    for offset, data in layout.items():
        blk.pwrite(offset, data)


def build_chain(env: Env, drv: CowDriver, size: int | list[int],
                layers: list[list[tuple[str, int, int]]]) -> list[BlockDriverState]:  # fmt: skip
    """Build base -> ... -> top with ``drv``; ``layers[0]`` is the base.

    Each layer is a list of ``("data"|"zero", offset, length)``; data bytes are
    ``layer index + 1`` repeated. Returns the nodes, base first. The environment keeps one
    reference, to the top node only.
    """
    sizes = size if isinstance(size, list) else [size] * len(layers)
    nodes: list[BlockDriverState] = []
    below: BlockDriverState | None = None
    for i, ops in enumerate(layers):
        opts: dict[str, Any] = {"driver": drv.name, "size": sizes[i]}
        if below is not None:
            opts["backing"] = below
        bs = bdrv_open(None, opts, OpenFlags.RDWR)
        if below is not None:
            bdrv_unref(below)  # the backing edge holds it now
        blk = BlockBackend.attach(bs)
        try:
            for kind, off, n in ops:
                if kind == "data":
                    blk.pwrite(off, bytes([i + 1]) * n)
                else:
                    blk.pwrite_zeroes(off, n)
        finally:
            blk.close()
        nodes.append(bs)
        below = bs
    env.nodes.append(nodes[-1])
    return nodes


def run_locked(coro_fn: Any, *args: Any, **kw: Any) -> Any:
    """Run an I/O coroutine function on the main context with the graph read lock."""

    async def main() -> Any:
        async with bdrv_graph_co_rdlock():
            return await coro_fn(*args, **kw)

    return blockcore.run(main())


def run(coro: Any) -> Any:
    return blockcore.run(coro)


def sleep(t: float) -> Any:
    return asyncio.sleep(t)


__all__ = [
    "DATA",
    "UNALLOC",
    "ZERO",
    "BufferRecordingMemoryDriver",
    "CowDriver",
    "Env",
    "FilterDriver",
    "OffloadMemoryDriver",
    "ZeroUnsupportedMemoryDriver",
    "address_of",
    "build_chain",
    "fill",
    "round_up",
    "run",
    "run_locked",
    "unique",
]

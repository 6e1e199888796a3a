"""Tools for driver authors and for blockcore's own tests.

- :class:`MemoryDriver`: an in-memory protocol driver with chosen limits and capabilities
  (alignment, max_transfer, with or without zero write and discard), registered in-process.
- :func:`check_driver`: the conformance kit. Any driver, ours or a third party's, runs it
  against a node it opens; it checks what the core and users rely on, against a bytearray
  model, and raises ``AssertionError`` naming the first broken promise.
- ``requires_*`` helpers tell why a test that needs root, a loop device or QEMU's tools
  cannot run here.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Callable
from typing import Any

from .backend import BlockBackend
from .drivers import hookimpl, register_driver, unregister_driver
from .errors import BlockError
from .graph import BlockDriverState
from .types import (
    BdrvRequestFlags,
    BlockLimits,
    BlockStatus,
    BlockStatusFlags,
    Concurrency,
    DriverDescriptor,
    OptionSpec,
    PreallocMode,
)

__all__ = ["InProcessDriver", "MemoryDriver", "check_driver", "requires_qemu", "requires_root"]


class InProcessDriver:
    """Base for in-process test drivers: registration by name and the core's guarantee
    checks (alignment, max_transfer, non-empty) that every I/O hook runs first."""

    name: str

    def register(self) -> InProcessDriver:
        """Register in-process (GS); returns self."""
        register_driver(self, self.name)
        return self

    def unregister(self) -> None:
        """Forget the driver (GS)."""
        unregister_driver(self.name)

    def _check(self, bs: BlockDriverState, hook: str, offset: int, length: int,
               transfer: bool = True) -> None:  # fmt: skip
        """Raise AssertionError if the core broke a guarantee (``transfer``: the request is
        bound by max_transfer, as reads and writes are)."""
        align = bs.bl.request_alignment
        if offset % align or length % align:
            raise AssertionError(f"{hook}: offset {offset} length {length} not aligned to {align}")
        if transfer and bs.bl.max_transfer and length > bs.bl.max_transfer:
            raise AssertionError(f"{hook}: length {length} > max_transfer {bs.bl.max_transfer}")
        if length <= 0:
            raise AssertionError(f"{hook}: empty request")


class MemoryDriver(InProcessDriver):
    """An in-memory protocol driver with configurable limits, for tests.

    Open with ``{"driver": name, "size": N}`` (add ``"filename": key`` to find the same data
    again after closing). Records every call in :attr:`calls` as
    ``(hook, offset, length, flags)`` so tests can check what the core sent down, and checks
    the core's alignment and max_transfer guarantees on every request.
    """

    def __init__(
        self,
        name: str = "memtest",
        *,
        request_alignment: int = 1,
        max_transfer: int = 0,
        pwrite_zeroes_alignment: int = 0,
        max_pwrite_zeroes: int = 0,
        pdiscard_alignment: int = 0,
        max_pdiscard: int = 0,
        zero_write: bool = True,
        discard: bool = True,
        fua: bool = False,
        concurrency: Concurrency = Concurrency.PARALLEL,
        cluster_size: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.limits = BlockLimits(
            request_alignment=request_alignment,
            max_transfer=max_transfer,
            pwrite_zeroes_alignment=pwrite_zeroes_alignment,
            max_pwrite_zeroes=max_pwrite_zeroes,
            pdiscard_alignment=pdiscard_alignment,
            max_pdiscard=max_pdiscard,
        )
        self.zero_write = zero_write
        self.discard = discard
        self.fua = fua
        self.concurrency = concurrency
        self.cluster_size = cluster_size
        self.delay = delay
        self.calls: list[tuple[str, int, int, int]] = []
        #: Images opened with a ``filename`` keep their data here across close and reopen.
        self.images: dict[str, bytearray] = {}
        self.flushes = 0
        if not zero_write:
            self.bdrv_co_pwrite_zeroes = None  # type: ignore[assignment]
        if not discard:
            self.bdrv_co_pdiscard = None  # type: ignore[assignment]
        if not cluster_size:
            self.bdrv_co_get_info = None  # type: ignore[assignment]

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        return DriverDescriptor(
            format_name=self.name,
            protocol_name=self.name,
            concurrency=self.concurrency,
            supported_write_flags=BdrvRequestFlags.FUA if self.fua else BdrvRequestFlags.NONE,
            supported_zero_flags=BdrvRequestFlags.MAY_UNMAP,
            supported_truncate_flags=BdrvRequestFlags.ZERO_WRITE,
            runtime_opts=(OptionSpec("size", "size", "length in bytes", 0),
                          OptionSpec("filename", "string")),  # fmt: skip
            has_zero_init=True,
        )

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options: dict[str, Any], flags: Any) -> None:
        from .util import parse_size

        name = options.get("filename")
        if name is not None and name in self.images:  # reopen: same data
            bs.opaque = self.images[name]
        else:
            bs.opaque = bytearray(parse_size(options.get("size", 0)))
            if name is not None:
                self.images[name] = bs.opaque
        bs.filename = str(name or f"{self.name}:{bs.node_name}")

    @hookimpl
    def bdrv_reopen_prepare(self, bs: BlockDriverState, options: dict[str, Any], flags: Any
                            ) -> None:  # fmt: skip
        """Nothing to change: the core refuses options that differ from the current ones."""

    @hookimpl
    def bdrv_refresh_limits(self, bs: BlockDriverState, limits: BlockLimits) -> BlockLimits:
        return self.limits

    @hookimpl
    async def bdrv_co_getlength(self, bs: BlockDriverState) -> int:
        return len(bs.opaque)

    async def _pause(self) -> None:
        if self.delay:
            import asyncio

            await asyncio.sleep(self.delay)

    @hookimpl
    async def bdrv_co_preadv(self, bs: BlockDriverState, offset: int, length: int,
                             buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self._check(bs, "preadv", offset, length)
        if len(buf) != length:
            raise AssertionError(f"preadv: buffer {len(buf)} != length {length}")
        self.calls.append(("preadv", offset, length, int(flags)))
        await self._pause()
        data: bytearray = bs.opaque
        chunk = data[offset : offset + length]
        buf[: len(chunk)] = chunk
        buf[len(chunk) :] = bytes(length - len(chunk))

    @hookimpl
    async def bdrv_co_pwritev(self, bs: BlockDriverState, offset: int, length: int,
                              buf: memoryview, flags: BdrvRequestFlags) -> None:  # fmt: skip
        self._check(bs, "pwritev", offset, length)
        self.calls.append(("pwritev", offset, length, int(flags)))
        data: bytearray = bs.opaque
        await self._pause()
        if offset + length > len(data):
            data.extend(bytes(offset + length - len(data)))
        data[offset : offset + length] = buf

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs: BlockDriverState, offset: int, length: int,
                                    flags: BdrvRequestFlags) -> None:  # fmt: skip
        self.calls.append(("pwrite_zeroes", offset, length, int(flags)))
        data: bytearray = bs.opaque
        if offset + length > len(data):
            data.extend(bytes(offset + length - len(data)))
        data[offset : offset + length] = bytes(length)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs: BlockDriverState, offset: int, length: int) -> None:
        self.calls.append(("pdiscard", offset, length, 0))
        data: bytearray = bs.opaque
        end = min(offset + length, len(data))
        if end > offset:
            data[offset:end] = bytes(end - offset)

    @hookimpl
    async def bdrv_co_flush_to_disk(self, bs: BlockDriverState) -> None:
        self.flushes += 1
        self.calls.append(("flush_to_disk", 0, 0, 0))

    @hookimpl
    async def bdrv_co_truncate(self, bs: BlockDriverState, offset: int, exact: bool,
                               prealloc: PreallocMode, flags: BdrvRequestFlags) -> None:  # fmt: skip
        data: bytearray = bs.opaque
        if offset < len(data):
            del data[offset:]
        else:
            data.extend(bytes(offset - len(data)))

    @hookimpl
    async def bdrv_co_block_status(self, bs: BlockDriverState, want_zero: bool, offset: int,
                                   length: int) -> BlockStatus:  # fmt: skip
        data: bytearray = bs.opaque
        end = min(offset + length, len(data))
        zero = data[offset:end] == bytes(end - offset)
        flags = BlockStatusFlags.DATA | BlockStatusFlags.OFFSET_VALID
        if zero and want_zero:
            flags |= BlockStatusFlags.ZERO
        return BlockStatus(flags, max(end - offset, bs.bl.request_alignment), offset, bs)

    @hookimpl
    async def bdrv_co_get_info(self, bs: BlockDriverState) -> Any:
        from .types import BlockDriverInfo

        return BlockDriverInfo(cluster_size=self.cluster_size)


# -------------------------------------------------------------------------------------------
# Conformance kit
# -------------------------------------------------------------------------------------------


def check_driver(open_backend: Callable[[], BlockBackend], *, seed: int = 0,
                 rounds: int = 200) -> None:  # fmt: skip
    """Run the conformance checks on a read-write backend opened by ``open_backend``.

    ``open_backend`` must return a fresh BlockBackend over an image of at least 1 MiB whose
    content the checks may destroy (it is called more than once). Checks: random reads and
    writes at unaligned offsets against a model; zero writes and discard read back as the
    model says; flush succeeds; reads past the end raise EIO at the backend; data survives
    close and reopen.
    """
    rng = random.Random(seed)
    blk = open_backend()
    try:
        size = blk.getlength()
        if size < 1 << 20:
            raise AssertionError(f"check_driver needs an image of at least 1 MiB, got {size}")
        model = bytearray(blk.pread(0, size))
        for i in range(rounds):
            op = rng.choice(("read", "write", "write", "zero", "discard"))
            offset = rng.randrange(0, size - 1)
            length = rng.randrange(1, min(size - offset, 200_000) + 1)
            if op == "read":
                got = blk.pread(offset, length)
                if got != model[offset : offset + length]:
                    raise AssertionError(f"round {i}: read {offset}+{length} differs from model")
            elif op == "write":
                data = rng.randbytes(length)
                blk.pwrite(offset, data)
                model[offset : offset + length] = data
            elif op == "zero":
                blk.pwrite_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                blk.pdiscard(offset, length)
                after = blk.pread(offset, length)
                # discard may keep data or zero it, byte by byte (drivers discard only whole
                # blocks); the model follows what was read back
                before = model[offset : offset + length]
                for j, (old, new) in enumerate(zip(before, after)):
                    if new != old and new != 0:
                        raise AssertionError(f"round {i}: discard made byte {offset + j} "
                                             f"{new:#x}, neither old data {old:#x} nor zero")  # fmt: skip
                model[offset : offset + length] = after
        blk.flush()
        try:
            blk.pread(size - 1, 2)
        except BlockError as exc:
            if exc.errno != errno.EIO:
                raise AssertionError(f"read past the end gave errno {exc.errno}, not EIO") from exc
        else:
            raise AssertionError("read past the end succeeded")
    finally:
        blk.close()
    blk = open_backend()
    try:
        if blk.pread(0, size) != bytes(model):
            raise AssertionError("data differs after close and reopen")
    finally:
        blk.close()


def requires_root() -> str | None:
    """Why a root-only test cannot run here, or None."""
    return None if os.geteuid() == 0 else "needs root (loop devices); runs in CI as root"


def requires_qemu() -> str | None:
    """Why a test needing qemu-img/qemu-io cannot run here, or None."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package qemu-utils; .ci/run installs it)"
    return None


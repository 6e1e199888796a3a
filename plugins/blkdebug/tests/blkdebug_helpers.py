"""Helpers shared by the blkdebug tests (a uniquely named module, so that the test suites of
several plugins can run in one pytest session): in-memory images, polling, the request batch."""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
import time
from typing import Any

import pytest

import blockcore
from blockcore import BdrvRequestFlags as F
from blockcore import BlockBackend, OpenFlags
from blockcore.aio import aio_wait_kick, aio_wait_while
from blockcore.special import BlockAIOCB
from blockcore.testing import MemoryDriver

_names = itertools.count()

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
requires_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-io")

SIZE = 1 << 20
#: The limits of issue 7: blkdebug imposing align=4096 and max-transfer=64K on the core.
BASE = {"align": 4096, "max-transfer": 65536, "discard": "unmap"}

class Env:
    """Registers memory drivers under unique names and closes what a test opened."""

    def __init__(self) -> None:
        self.drivers: list[MemoryDriver] = []
        self.backends: list[BlockBackend] = []

    def mem(self, **kwargs: Any) -> MemoryDriver:
        drv = MemoryDriver(f"bdmem{next(_names)}", **kwargs).register()
        self.drivers.append(drv)
        return drv

    def open(self, image: MemoryDriver | dict[str, Any] | None = None, size: int = 1 << 20,
             flags: OpenFlags = OpenFlags.RDWR, **options: Any) -> BlockBackend:  # fmt: skip
        """A backend over blkdebug (``options``) over an in-memory image."""
        if image is None:
            image = self.mem()
        if isinstance(image, MemoryDriver):
            image = {"driver": image.name, "size": size}
        opts = {"driver": "blkdebug", "image": image, **options}
        return self.track(BlockBackend.open(None, opts, flags))

    def track(self, blk: BlockBackend) -> BlockBackend:
        self.backends.append(blk)
        return blk

    def close(self) -> None:
        for blk in reversed(self.backends):
            blk.close()
        for drv in self.drivers:
            drv.unregister()



def settle(seconds: float = 0.02) -> None:
    """Let the main loop run queued requests until they block."""
    blockcore.run(asyncio.sleep(seconds))


def wait_done(*acbs: BlockAIOCB, timeout: float = 5.0) -> None:
    loop = acbs[0].bs.aio_context.loop
    deadline = time.monotonic() + timeout
    handle = loop.call_later(timeout, aio_wait_kick)
    try:
        aio_wait_while(acbs[0].bs.aio_context, lambda: not all(a.done for a in acbs)
                       and time.monotonic() < deadline)  # fmt: skip
    finally:
        handle.cancel()
    assert all(a.done for a in acbs), "requests did not complete"
    for a in acbs:
        if isinstance(a.result, BaseException):
            raise a.result


def run_batch(blk: BlockBackend, rng: random.Random, rounds: int,
              aligned_discards: bool = False, truncate: bool = True) -> dict[str, int]:  # fmt: skip
    size = blk.getlength()
    model = bytearray(blk.pread(0, size))
    done: dict[str, int] = {}
    for i in range(rounds):
        op = rng.choice(("read", "write", "write", "write-fua", "zero", "zero-unmap",
                         "discard", "flush", "truncate", "read-tail"))  # fmt: skip
        if op == "truncate" and not truncate:
            op = "read"
        offset = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(size - offset, 150_000) + 1)
        if rng.random() < 0.3:  # sometimes aligned, to take the fast paths too
            offset -= offset % 4096
            length = max(4096, length - length % 4096)
            length = min(length, size - offset)
        where = f"round {i} {op} {offset:#x}+{length:#x}"
        if op == "read":
            assert blk.pread(offset, length) == model[offset : offset + length], where
        elif op == "read-tail":  # the last bytes, whose alignment unit may pass the end
            n = rng.randrange(1, 9000)
            assert blk.pread(size - n, n) == model[size - n :], where
        elif op in ("write", "write-fua"):
            data = rng.randbytes(length)
            blk.pwrite(offset, data, F.FUA if op == "write-fua" else F.NONE)
            model[offset : offset + length] = data
        elif op in ("zero", "zero-unmap"):
            blk.pwrite_zeroes(offset, length, F.MAY_UNMAP if op == "zero-unmap" else F.NONE)
            model[offset : offset + length] = bytes(length)
        elif op == "discard":
            if aligned_discards:
                offset -= offset % 4096
                length = max(4096, length - length % 4096)
            blk.pdiscard(offset, length)
            after = blk.pread(offset, length)
            before = model[offset : offset + length]
            # discard is advisory: each byte is the old one or zero
            assert all(a == b or a == 0 for a, b in zip(after, before, strict=True)), where
            model[offset : offset + length] = after
        elif op == "flush":
            blk.flush()
        else:
            new = rng.randrange(SIZE // 2, SIZE * 3 // 2) // 512 * 512
            if rng.random() < 0.5:
                new += 512 * rng.randrange(1, 8)  # not a multiple of the 4 KiB alignment
            blk.truncate(new)
            if new < size:
                del model[new:]
            else:
                model.extend(bytes(new - size))
            size = new
            assert blk.getlength() == size, where
        done[op] = done.get(op, 0) + 1
    assert blk.pread(0, size) == bytes(model), "final content differs from the model"
    blk.flush()
    return done

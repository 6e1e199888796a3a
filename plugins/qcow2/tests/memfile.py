"""An in-memory ImageFile for engine tests, with write dropping for crash tests."""

from __future__ import annotations

import asyncio
from pathlib import Path


class CrashedError(OSError):
    pass


class MemFile:
    def __init__(self, data: bytes = b"", name: str = "mem") -> None:
        self.buf = bytearray(data)
        self.name = name
        self.events: list[str] = []
        self.writes = 0
        #: after this many writes (pwrite/zero/truncate/discard), every write is dropped
        self.crash_after: int | None = None
        #: let other coroutines run before each read and write (as real I/O would)
        self.yield_io = False

    @classmethod
    def load(cls, path: Path) -> MemFile:
        return cls(path.read_bytes(), str(path))

    def save(self, path: Path) -> None:
        path.write_bytes(bytes(self.buf))

    def _count(self) -> bool:
        self.writes += 1
        return self.crash_after is None or self.writes <= self.crash_after

    async def pread(self, offset: int, buf: memoryview) -> None:
        if self.yield_io:
            await asyncio.sleep(0)
        n = len(buf)
        chunk = self.buf[offset : offset + n]
        buf[: len(chunk)] = chunk
        if len(chunk) < n:
            buf[len(chunk) :] = bytes(n - len(chunk))

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.yield_io:
            await asyncio.sleep(0)
        if not self._count():
            return
        data = bytes(data)
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    async def pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False
                            ) -> None:  # fmt: skip
        await self.pwrite(offset, bytes(length))

    async def discard(self, offset: int, length: int) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def getlength(self) -> int:
        return len(self.buf)

    async def truncate(self, length: int, prealloc: str = "off") -> None:
        if not self._count():
            return
        if length < len(self.buf):
            del self.buf[length:]
        else:
            self.buf.extend(bytes(length - len(self.buf)))

    async def event(self, name: str) -> None:
        self.events.append(name)

    wants_events = True
    #: zero writes with no_fallback work, as fallocate on a regular file (handle_alloc_space
    #: zeroes new clusters instead of writing COW buffers of zeros)
    fast_zeroes = True


def paused_at_data_write(mem: MemFile) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the next guest data write of ``mem`` stop (lock dropped, allocation in flight)
    until the returned gate is set; the other event tells it got there."""
    gate, at_data = asyncio.Event(), asyncio.Event()
    real_event = mem.event

    async def event(name: str) -> None:
        await real_event(name)
        if name == "write_aio" and not gate.is_set():
            at_data.set()
            await gate.wait()

    mem.event = event  # type: ignore[method-assign]
    return gate, at_data

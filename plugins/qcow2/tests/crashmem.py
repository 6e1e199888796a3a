"""An in-process protocol driver for graph-level tests: MemoryDriver that can create images
and drop every write after the N-th (a crash that loses what was not yet written)."""

from __future__ import annotations

import itertools
from typing import Any

from blockcore import hookimpl
from blockcore.testing import MemoryDriver
from blockcore.types import BdrvRequestFlags, PreallocMode
from blockcore.util import parse_size

_names = itertools.count()


class CrashMem(MemoryDriver):
    """``MemoryDriver`` with ``bdrv_co_create_opts`` and write dropping.

    Every call that changes data (write, zero write, discard, truncate) counts as one write;
    with ``crash_after = N`` the first N happen and the rest are silently dropped, as if the
    host lost power after the N-th reached the disk.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(f"crashmem{next(_names)}", **kwargs)
        self.writes = 0
        self.crash_after: int | None = None
        #: debug events the format above sent to this node (blkdebug's view)
        self.events: list[str] = []

    def _lands(self) -> bool:
        self.writes += 1
        return self.crash_after is None or self.writes <= self.crash_after

    @hookimpl
    async def bdrv_co_debug_event(self, bs: Any, event: str) -> None:
        self.events.append(event)

    @hookimpl
    async def bdrv_co_create_opts(self, filename: str, options: dict[str, Any]) -> None:
        self.images[filename] = bytearray(parse_size(options.get("size") or 0))

    @hookimpl
    async def bdrv_co_pwritev(self, bs: Any, offset: int, length: int, buf: memoryview,
                              flags: BdrvRequestFlags) -> None:  # fmt: skip
        if self._lands():
            await MemoryDriver.bdrv_co_pwritev(self, bs, offset, length, buf, flags)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs: Any, offset: int, length: int,
                                    flags: BdrvRequestFlags) -> None:  # fmt: skip
        if self._lands():
            await MemoryDriver.bdrv_co_pwrite_zeroes(self, bs, offset, length, flags)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs: Any, offset: int, length: int) -> None:
        if self._lands():
            await MemoryDriver.bdrv_co_pdiscard(self, bs, offset, length)

    @hookimpl
    async def bdrv_co_truncate(self, bs: Any, offset: int, exact: bool, prealloc: PreallocMode,
                               flags: BdrvRequestFlags) -> None:  # fmt: skip
        if self._lands():
            await MemoryDriver.bdrv_co_truncate(self, bs, offset, exact, prealloc, flags)

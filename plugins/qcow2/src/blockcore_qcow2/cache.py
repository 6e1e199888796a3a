"""Bounded write-back cache of metadata tables (L2 tables, refcount blocks), with ordering.

Mirrors QEMU's qcow2-cache.c: a cache may *depend* on another one, meaning its dirty tables
must not reach the file before the other cache's dirty tables (an L2 entry must never point
at a cluster whose refcount is not yet on disk; a refcount decrease must not land before
the L2 entry that dropped the reference). Flushing a cache first flushes what it depends
on, then issues a flush barrier on the file, then writes its own tables in offset order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class ImageFile(Protocol):
    """What the qcow2 engine needs from a child node (the driver adapts blockcore.io)."""

    name: str

    async def pread(self, offset: int, buf: memoryview) -> None: ...
    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    async def pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False
                            ) -> None: ...  # fmt: skip
    async def discard(self, offset: int, length: int) -> None: ...
    async def flush(self) -> None: ...
    async def getlength(self) -> int: ...
    async def truncate(self, length: int, prealloc: str = "off") -> None: ...
    async def event(self, name: str) -> None: ...

    @property
    def wants_events(self) -> bool:
        """Whether :meth:`event` does anything (lets hot paths skip the call)."""

    @property
    def fast_zeroes(self) -> bool:
        """Whether zero writes with ``no_fallback`` can work at all (the node's
        supported_zero_flags has NO_FALLBACK); they may still fail "not supported"."""


class TableCache:
    """Up to ``capacity`` tables of ``table_size`` bytes, keyed by host offset."""

    def __init__(self, file: ImageFile, table_size: int, capacity: int, name: str,
                 load_event: str, update_event: str) -> None:  # fmt: skip
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.name = name
        self.load_event = load_event
        self.update_event = update_event
        self.tables: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.depends: TableCache | None = None
        #: Flush the file after writing our tables (set when a later write depends on it).
        self.depends_on_flush = False

    async def get(self, offset: int, *, load: bool = True) -> bytearray:
        """The table at ``offset``, read from the file on a miss (zeros with load=False)."""
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        await self._make_room()
        table = bytearray(self.table_size)
        if load:
            await self.file.event(self.load_event)
            await self.file.pread(offset, memoryview(table))
        self.tables[offset] = table
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    async def _make_room(self) -> None:
        if len(self.tables) < self.capacity:
            return
        for off in self.tables:
            if off not in self.dirty:
                del self.tables[off]
                return
        await self.flush()
        self.tables.popitem(last=False)

    async def set_dependency(self, other: TableCache) -> None:
        """Our dirty tables must be written after ``other``'s (qcow2_cache_set_dependency)."""
        if other.depends is self:
            await other.flush()
        if self.depends is not None and self.depends is not other:
            await self._flush_dependency()
        self.depends = other

    def set_depends_on_flush(self) -> None:
        self.depends_on_flush = True

    async def _flush_dependency(self) -> None:
        assert self.depends is not None
        await self.depends.flush()
        self.depends = None
        self.depends_on_flush = True

    async def flush(self) -> None:
        """Write every dirty table, after the tables this cache depends on."""
        if self.depends is not None:
            await self._flush_dependency()
        if self.depends_on_flush and self.dirty:
            await self.file.flush()
        self.depends_on_flush = False
        for off in sorted(self.dirty):
            await self.file.event(self.update_event)
            await self.file.pwrite(off, self.tables[off])
            self.dirty.discard(off)

    def resize(self, capacity: int) -> None:
        """Hold at most ``capacity`` tables from now on, dropping the least recently used
        clean ones; flush first, as a dirty table over the new capacity is kept."""
        self.capacity = max(2, capacity)
        for off in list(self.tables):
            if len(self.tables) <= self.capacity:
                break
            if off not in self.dirty:
                del self.tables[off]

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (without writing it)."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def invalidate(self) -> None:
        self.tables.clear()
        self.dirty.clear()
        self.depends = None

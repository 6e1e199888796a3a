"""Shared fixtures for the core tests: in-memory drivers registered per test."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blockcore.testing import MemoryDriver

_names = itertools.count()


@pytest.fixture
def memdrv() -> Iterator[Callable[..., MemoryDriver]]:
    """Factory: ``memdrv(request_alignment=512, ...)`` registers a fresh MemoryDriver."""
    made: list[MemoryDriver] = []

    def make(**kwargs: Any) -> MemoryDriver:
        drv = MemoryDriver(f"mem{next(_names)}", **kwargs).register()
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.unregister()

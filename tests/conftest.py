"""Shared fixtures for the request-path tests; the test drivers live in iotest_drivers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from iotest_drivers import Env


@pytest.fixture
def env() -> Iterator[Env]:
    """Registers test drivers under unique names; closes and unregisters at the end."""
    e = Env()
    try:
        yield e
    finally:
        e.close()


# -- used by the lead's core tests (test_tiers, test_graph, test_drivers, test_testing_kit) --
# Keep this fixture when editing this file.

import itertools as _itertools  # noqa: E402
from collections.abc import Callable as _Callable  # noqa: E402
from typing import Any as _Any  # noqa: E402

from blockcore.testing import MemoryDriver as _MemoryDriver  # noqa: E402

_memdrv_names = _itertools.count()


@pytest.fixture
def memdrv() -> Iterator[_Callable[..., _MemoryDriver]]:
    """Factory: ``memdrv(request_alignment=512, ...)`` registers a fresh MemoryDriver."""
    made: list[_MemoryDriver] = []

    def make(**kwargs: _Any) -> _MemoryDriver:
        drv = _MemoryDriver(f"mem{next(_memdrv_names)}", **kwargs).register()
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.unregister()

"""Shared fixtures for the request-path tests; the test drivers live in iotest_drivers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


# -- blockcore-img run in-process (test_cli_img, test_cli_long_ops) --


@pytest.fixture
def run_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``run_img(*args) -> (stdout, stderr, status)``: blockcore-img in-process, named qemu-img,
    in ``tmp_path``."""
    from blockcore.cliutil import set_prog_name
    from blockcore.img import main

    monkeypatch.chdir(tmp_path)
    set_prog_name("qemu-img")

    def go(*args: str) -> tuple[str, str, int]:
        rc = main(["qemu-img", *args])
        out, err = capsys.readouterr()
        return out, err, rc

    yield go
    set_prog_name(None)

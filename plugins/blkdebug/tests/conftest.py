"""Fixtures for the blkdebug tests: blkdebug backends over memory images, config files,
captured messages. Helpers live in :mod:`blkdebug_helpers`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blkdebug_helpers import Env
from blockcore_blkdebug import driver as bd


@pytest.fixture(autouse=True)
def messages() -> Iterator[list[str]]:
    """The "blkdebug: Suspended request" lines printed during the test (not on stdout)."""
    lines: list[str] = []
    old = bd.set_message_sink(lines.append)
    yield lines
    bd.set_message_sink(old)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


@pytest.fixture
def conf(tmp_path: Path) -> Callable[[str], str]:
    """Write a config file and return its path."""
    counter = itertools.count()

    def write(text: str) -> str:
        path = tmp_path / f"blkdebug{next(counter)}.conf"
        path.write_text(text)
        return str(path)

    return write

"""The conformance kit passes a correct driver and catches a broken one."""

from __future__ import annotations

import pytest

from blockcore import BlockBackend, OpenFlags, hookimpl
from blockcore.testing import MemoryDriver, check_driver


def _opener(name: str):  # noqa: ANN202
    def open_backend() -> BlockBackend:
        opts = {"driver": name, "size": 1 << 20, "filename": "kit"}
        return BlockBackend.open(None, opts, OpenFlags.RDWR)

    return open_backend


def test_check_driver_passes_memory_driver(memdrv) -> None:
    drv = memdrv(request_alignment=512, max_transfer=65536)
    check_driver(_opener(drv.name), rounds=100)
    assert any(op == "pwrite_zeroes" for op, *_ in drv.calls)
    assert any(op == "pwritev" and length <= 65536 for op, _o, length, _f in drv.calls)


class _LossyDriver(MemoryDriver):
    """Silently drops writes that touch the second 64 KiB block."""

    @hookimpl
    async def bdrv_co_pwritev(self, bs, offset, length, buf, flags):  # noqa: ANN001
        if offset < 131072 and offset + length > 65536:
            return
        await super().bdrv_co_pwritev(bs, offset, length, buf, flags)


def test_check_driver_catches_lost_writes() -> None:
    drv = _LossyDriver("lossy").register()
    try:
        with pytest.raises(AssertionError, match="differs"):
            check_driver(_opener("lossy"), rounds=300)
    finally:
        drv.unregister()

"""bdrv_round_to_clusters over qcow2 nodes: QEMU 7.2 widens a range to whole clusters from
bdrv_get_info's cluster_size (extended L2 images too: rounding to subclusters only came with
bdrv_round_to_subclusters in QEMU 8.1); the cluster size is the one ``qemu-io -c info``
reports for the same image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from blockcore import BlockBackend
from blockcore.info import bdrv_get_info, bdrv_round_to_clusters

from .conftest import create, qemu_io, requires_qemu

pytestmark = requires_qemu

CASES = {  # create options -> (cluster size, subcluster size)
    "64k": ("", 65536, 65536),
    "512": ("cluster_size=512", 512, 512),
    "extl2-64k": ("extended_l2=on", 65536, 2048),
    "extl2-16k": ("extended_l2=on,cluster_size=16k", 16384, 512),
    "2M": ("cluster_size=2M", 2 << 20, 2 << 20),
}
RANGES = [(0, 0), (0, 1), (1, 1), (511, 2), (512, 512), (2047, 1), (2048, 2048), (4095, 3),
          (65535, 1), (65536, 65536), (65537, 65535), (100_000, 300_000), (3 << 20, 1),
          ((3 << 20) - 1, 2)]  # fmt: skip


def _qemu_round(offset: int, length: int, c: int) -> tuple[int, int]:
    start = offset // c * c
    return start, -(-(offset - start + length) // c) * c


@pytest.mark.parametrize("case", list(CASES))
def test_round_to_clusters(tmp_path: Path, case: str) -> None:
    opts, cs, sub = CASES[case]
    img = create(tmp_path / "r.qcow2", "8M", opts)
    m = re.search(r"cluster size: (.*)", qemu_io(img, "info"))
    assert m is not None
    assert m.group(1) == {512: "512 bytes", 16384: "16 KiB", 65536: "64 KiB",
                          2 << 20: "2 MiB"}[cs]  # fmt: skip
    with BlockBackend.open(str(img)) as blk:
        bdi = bdrv_get_info(blk.bs)
        assert (bdi.cluster_size, bdi.subcluster_size) == (cs, sub)
        for offset, length in RANGES:
            got = bdrv_round_to_clusters(blk.bs, offset, length)
            assert got == _qemu_round(offset, length, cs), (offset, length, got)
            start, n = got
            assert start % cs == 0 and n % cs == 0
            assert start <= offset and offset + length <= start + n


def test_round_on_the_protocol_node_is_identity(tmp_path: Path) -> None:
    """The file node below qcow2 has no cluster size: the range comes back unchanged."""
    img = create(tmp_path / "r.qcow2", "8M")
    with BlockBackend.open(str(img)) as blk:
        file_bs = blk.bs.file.bs
        assert bdrv_round_to_clusters(file_bs, 1000, 3) == (1000, 3)

"""Pure cluster arithmetic and L2 entry decoding (standard and extended L2)."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from typing import Any

import attrs

from .format import (
    L2_BITMAP_ALL_ALLOC,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    QCowHeader,
)


class ClusterType(enum.Enum):
    """What a whole L2 entry describes (mirrors QEMU's QCow2ClusterType)."""

    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero_plain"
    ZERO_ALLOC = "zero_alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


class SubclusterType(enum.Enum):
    """What one subcluster reads as (mirrors QEMU's QCow2SubclusterType). Without extended
    L2 a cluster is one subcluster."""

    COMPRESSED = "compressed"
    NORMAL = "normal"
    ZERO_PLAIN = "zero_plain"
    ZERO_ALLOC = "zero_alloc"
    UNALLOCATED_PLAIN = "unallocated_plain"
    UNALLOCATED_ALLOC = "unallocated_alloc"
    INVALID = "invalid"


#: Types whose data comes from the backing file (or zeros without one).
UNALLOCATED_TYPES = frozenset({SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC})
ZERO_TYPES = frozenset({SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC})


@attrs.frozen
class Geometry:
    """Sizes derived from the header, with QEMU's offset helpers as methods."""

    cluster_bits: int
    extended_l2: bool = False
    has_data_file: bool = False
    version: int = 3

    @classmethod
    def from_header(cls, header: QCowHeader, has_data_file: bool = False) -> Geometry:
        return cls(header.cluster_bits, header.extended_l2, has_data_file, header.version)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_size(self) -> int:
        """Entries per L2 table."""
        return 1 << self.l2_bits

    @property
    def subclusters_per_cluster(self) -> int:
        return 32 if self.extended_l2 else 1

    @property
    def subcluster_bits(self) -> int:
        return self.cluster_bits - (5 if self.extended_l2 else 0)

    @property
    def subcluster_size(self) -> int:
        return 1 << self.subcluster_bits

    def offset_into_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def offset_into_subcluster(self, offset: int) -> int:
        return offset & (self.subcluster_size - 1)

    def start_of_cluster(self, offset: int) -> int:
        return offset & ~(self.cluster_size - 1)

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cluster_size - 1) >> self.cluster_bits

    def size_to_l1(self, size: int) -> int:
        """L1 entries needed to map ``size`` bytes of guest data."""
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift

    def offset_to_l1_index(self, offset: int) -> int:
        return offset >> (self.l2_bits + self.cluster_bits)

    def offset_to_l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_size - 1)

    def offset_to_sc_index(self, offset: int) -> int:
        return (offset >> self.subcluster_bits) & (self.subclusters_per_cluster - 1)

    def l1_entry_span(self) -> int:
        """Guest bytes covered by one L1 entry."""
        return 1 << (self.cluster_bits + self.l2_bits)

    def vm_state_offset(self, size: int) -> int:
        """Guest offset where VM state starts: the first L1 boundary at or above ``size``."""
        return self.size_to_l1(size) << (self.cluster_bits + self.l2_bits)


def cluster_type(entry: int, geo: Geometry) -> ClusterType:
    """Classify an L2 entry (mirrors qcow2_get_cluster_type)."""
    if entry & OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & OFLAG_ZERO and not geo.extended_l2:
        return ClusterType.ZERO_ALLOC if entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if not entry & L2E_OFFSET_MASK:
        # With an external data file offset 0 is a real cluster when COPIED is set.
        if geo.has_data_file and entry & OFLAG_COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


def subcluster_type(entry: int, bitmap: int, sc_index: int, geo: Geometry) -> SubclusterType:
    """Classify subcluster ``sc_index`` of an entry (mirrors qcow2_get_subcluster_type)."""
    ctype = cluster_type(entry, geo)
    if not geo.extended_l2:
        return _PLAIN_MAP[ctype]
    if ctype is ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
    alloc = bitmap & (1 << sc_index)
    zero = bitmap & (1 << (32 + sc_index))
    if ctype is ClusterType.NORMAL:
        if (bitmap >> 32) & bitmap & L2_BITMAP_ALL_ALLOC:
            return SubclusterType.INVALID
        if zero:
            return SubclusterType.ZERO_ALLOC
        if alloc:
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    # UNALLOCATED (ZERO_* cannot occur with extended L2)
    if bitmap & L2_BITMAP_ALL_ALLOC:
        return SubclusterType.INVALID
    if zero:
        return SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_PLAIN


_PLAIN_MAP = {
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
    ClusterType.COMPRESSED: SubclusterType.COMPRESSED,
}


def subcluster_run(
    entry: int, bitmap: int, sc_from: int, geo: Geometry
) -> tuple[SubclusterType, int]:
    """Type of subcluster ``sc_from`` and how many subclusters from it (to the end of the
    cluster) share that type. Without extended L2 the run is the whole cluster (1)."""
    stype = subcluster_type(entry, bitmap, sc_from, geo)
    n = geo.subclusters_per_cluster
    if n == 1 or stype in (SubclusterType.COMPRESSED, SubclusterType.INVALID):
        return stype, n - sc_from
    end = sc_from + 1
    while end < n and subcluster_type(entry, bitmap, end, geo) is stype:
        end += 1
    return stype, end - sc_from


def host_cluster_offset(entry: int) -> int:
    """Host offset of a standard (non-compressed) entry."""
    return entry & L2E_OFFSET_MASK


_serials = itertools.count()


class VersionedList(list):  # type: ignore[type-arg]
    """A table kept in memory (the L1 table, the refcount table) that counts its changes in
    ``version``, so an index built from it knows when to rebuild (see
    ``Qcow2Image.overlap``); ``serial`` tells a replaced table from the one before."""

    __slots__ = ("serial", "version")

    def __init__(self, items: Iterable[int] = ()) -> None:
        super().__init__(items)
        self.serial = next(_serials)
        self.version = 0

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(index, value)
        self.version += 1

    def append(self, value: int) -> None:
        super().append(value)
        self.version += 1

    def extend(self, values: Iterable[int]) -> None:
        super().extend(values)
        self.version += 1

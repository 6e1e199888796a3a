"""Value types, flags and constants of the block layer (QEMU's block-common.h and friends).

Flags are :class:`enum.IntFlag` with QEMU's values, so numbers printed by QEMU's tools and ours
mean the same. Values computed at open time (limits, descriptors) are frozen attrs classes with
validators; per-request values (:class:`BlockStatus`) carry types only.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .graph import BlockDriverState

# --------------------------------------------------------------------------------------------
# Constants (block/io.c, block_int-common.h)
# --------------------------------------------------------------------------------------------

BDRV_SECTOR_BITS = 9
BDRV_SECTOR_SIZE = 512
#: Largest byte count of one request: INT_MAX rounded down to a sector.
BDRV_REQUEST_MAX_BYTES = (2**31 - 1) >> BDRV_SECTOR_BITS << BDRV_SECTOR_BITS
#: Largest request alignment a driver may ask for.
BDRV_MAX_ALIGNMENT = 1 << 30
#: Largest length of a node: INT64_MAX rounded down to 1 GiB.
BDRV_MAX_LENGTH = (2**63 - 1) // BDRV_MAX_ALIGNMENT * BDRV_MAX_ALIGNMENT
#: Bounce buffers for zero-write fallback and copy-on-read never exceed this (16 MiB).
MAX_BOUNCE_BUFFER = 32768 << BDRV_SECTOR_BITS
#: Bytes given to ``bdrv_probe`` (QEMU 8.x reads 512; we give a little more for formats
#: whose magic lies further in, the score rule is unchanged).
BLOCK_PROBE_BUF_SIZE = 2048


class BdrvRequestFlags(enum.IntFlag):
    """Per-request flags (``BDRV_REQ_*``), QEMU 8.x values.

    ``REGISTERED_BUF`` (DMA-registered guest memory) has no meaning in Python: it is accepted
    and ignored. ``NO_SERIALISING`` no longer exists in QEMU (0x8 was reused); copy_range's
    read flags accept it as a no-op for callers written against the old text.
    """

    NONE = 0
    COPY_ON_READ = 0x1
    ZERO_WRITE = 0x2
    MAY_UNMAP = 0x4
    REGISTERED_BUF = 0x8
    FUA = 0x10
    WRITE_COMPRESSED = 0x20
    WRITE_UNCHANGED = 0x40
    SERIALISING = 0x80
    NO_FALLBACK = 0x100
    PREFETCH = 0x200
    NO_WAIT = 0x400
    MASK = 0x7FF
    NO_SERIALISING = REGISTERED_BUF


class OpenFlags(enum.IntFlag):
    """Open flags (``BDRV_O_*``), as returned by :func:`blockcore.io.bdrv_get_flags`."""

    NONE = 0
    NO_SHARE = 0x0001
    RDWR = 0x0002
    RESIZE = 0x0004
    SNAPSHOT = 0x0008
    TEMPORARY = 0x0010
    NOCACHE = 0x0020
    NATIVE_AIO = 0x0080
    NO_BACKING = 0x0100
    NO_FLUSH = 0x0200
    COPY_ON_READ = 0x0400
    INACTIVE = 0x0800
    CHECK = 0x1000
    ALLOW_RDWR = 0x2000
    UNMAP = 0x4000
    PROTOCOL = 0x8000
    NO_IO = 0x10000
    AUTO_RDONLY = 0x20000
    IO_URING = 0x40000
    CACHE_MASK = NOCACHE | NO_FLUSH


class Perm(enum.IntFlag):
    """Node permissions (``BLK_PERM_*``). 0x10 was GRAPH_MOD and stays unused (file locks)."""

    NONE = 0
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08
    ALL = 0x0F

    @property
    def qemu_names(self) -> list[str]:
        """Names as QEMU prints them ("consistent read", "write", ...)."""
        names = {1: "consistent read", 2: "write", 4: "write unchanged", 8: "resize"}
        return [names[bit] for bit in (1, 2, 4, 8) if self & bit]


DEFAULT_PERM_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
DEFAULT_PERM_UNCHANGED = Perm.ALL & ~DEFAULT_PERM_PASSTHROUGH


class ChildRole(enum.IntFlag):
    """Roles of a child edge (``BDRV_CHILD_*``)."""

    NONE = 0
    DATA = 1
    METADATA = 2
    FILTERED = 4
    COW = 8
    PRIMARY = 16
    IMAGE = DATA | METADATA | PRIMARY


class BlockStatusFlags(enum.IntFlag):
    """Block status bits (``BDRV_BLOCK_*``)."""

    NONE = 0
    DATA = 0x01
    ZERO = 0x02
    OFFSET_VALID = 0x04
    RAW = 0x08
    ALLOCATED = 0x10
    EOF = 0x20
    RECURSE = 0x40
    COMPRESSED = 0x80


class PreallocMode(enum.Enum):
    """Preallocation for create and truncate (QAPI ``PreallocMode``)."""

    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"

    @classmethod
    def from_name(cls, name: str) -> PreallocMode:
        """Parse ``off``/``metadata``/``falloc``/``full``; a wrong name is ``EINVAL``."""
        import errno

        from .errors import BlockError

        try:
            return cls(name)
        except ValueError:
            err = BlockError(errno.EINVAL, f"invalid parameter value: {name}")
            err.verbatim = True  # type: ignore[attr-defined]  # QEMU's text, lowercase kept
            raise err from None


class BdrvCheckMode(enum.IntFlag):
    """What ``bdrv_check`` may repair."""

    NONE = 0
    FIX_LEAKS = 1
    FIX_ERRORS = 2


class Concurrency(enum.Enum):
    """How many requests the core lets into one driver at a time (nbdkit's thread model).

    ``SERIALIZE_ALL``: one request in the whole driver (all its nodes) at a time.
    ``SERIALIZE_REQUESTS``: one request per node at a time (the default).
    ``PARALLEL``: no limit; the driver does its own locking.
    """

    SERIALIZE_ALL = "serialize_all"
    SERIALIZE_REQUESTS = "serialize_requests"
    PARALLEL = "parallel"


# --------------------------------------------------------------------------------------------
# Frozen values
# --------------------------------------------------------------------------------------------


def _power_of_two(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1 or value & (value - 1) or value > BDRV_MAX_ALIGNMENT:
        raise ValueError(f"{attribute.name} {value} must be a power of two up to 1 GiB")


def _zero_or_multiple_of_alignment(inst: BlockLimits, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0 or (value and value % inst.request_alignment):
        raise ValueError(
            f"{attribute.name} {value} must be 0 or a multiple of request_alignment "
            f"{inst.request_alignment}"
        )


@attrs.frozen
class BlockLimits:
    """I/O limits of a node (QEMU's ``BlockLimits``). Sizes in bytes; 0 means "no limit"."""

    request_alignment: int = attrs.field(default=1, validator=_power_of_two)
    """Alignment of offset and length of every request the driver receives (power of two)."""
    max_transfer: int = attrs.field(default=0, validator=_zero_or_multiple_of_alignment)
    """Largest read or write the driver receives; 0 = no limit below 2 GiB."""
    opt_transfer: int = 0
    """Preferred transfer size; 0 = no preference."""
    max_pdiscard: int = 0
    """Largest discard; 0 = no limit."""
    pdiscard_alignment: int = 0
    """Preferred discard alignment; 0 = request_alignment."""
    max_pwrite_zeroes: int = 0
    """Largest zero write; 0 = no limit."""
    pwrite_zeroes_alignment: int = 0
    """Preferred zero-write alignment; 0 = request_alignment."""
    min_mem_alignment: int = 1
    """Buffer address alignment needed to avoid a bounce buffer (O_DIRECT)."""
    opt_mem_alignment: int = 4096
    """Buffer address alignment preferred for new buffers."""
    max_iov: int = 1024
    """Most buffers in one vectored request."""
    has_variable_length: bool = False
    """Length may change behind our back (CD-ROM): re-query it on every length request."""


@attrs.frozen
class BlockDriverInfo:
    """Format facts reported by ``bdrv_get_info`` (QEMU's ``BlockDriverInfo``)."""

    cluster_size: int = 0
    """Allocation unit in bytes; 0 when the format has none."""
    subcluster_size: int = 0
    """Sub-allocation unit; the core sets it to cluster_size when the driver leaves 0."""
    vm_state_offset: int = 0
    """Where VM state starts in the image's address space; 0 = no VM state support."""
    is_dirty: bool = False
    """The image was not closed cleanly (qcow2 dirty bit)."""
    needs_compressed_writes: bool = False
    """Every write must be compressed (VMDK streamOptimized)."""


@attrs.frozen
class BlockStatus:
    """Answer of a block-status query for the range ``[offset, offset + pnum)``.

    ``ret`` holds :class:`BlockStatusFlags`; ``map`` is a host offset in ``file`` when
    ``OFFSET_VALID`` is set; ``depth`` is filled by the chain walk (1 = top layer).
    """

    ret: BlockStatusFlags
    pnum: int
    map: int = 0
    file: BlockDriverState | None = None
    depth: int = 0


@attrs.frozen
class OptionSpec:
    """One option a driver accepts at create or open time (QEMU's ``QemuOptDesc``)."""

    name: str
    type: str
    """``string``, ``bool``, ``number`` or ``size``."""
    help: str = ""
    default: Any = None


@attrs.frozen
class DriverDescriptor:
    """Static facts about a driver, returned by its ``bdrv_describe`` hook."""

    format_name: str
    """Name used in ``driver=`` and printed by ``info`` (``raw``, ``qcow2``, ``file``)."""
    protocol_name: str | None = None
    """Filename prefix handled by this protocol driver (``file`` for ``file:path``)."""
    is_filter: bool = False
    """Presents exactly its one filtered child's data (blkdebug)."""
    is_format: bool = False
    """An image format (takes part in probing)."""
    supports_backing: bool = False
    """Has a copy-on-write backing child; unallocated ranges read from it."""
    supported_write_flags: BdrvRequestFlags = BdrvRequestFlags.NONE
    """Flags the driver's write honours natively (FUA); others are emulated or stripped."""
    supported_zero_flags: BdrvRequestFlags = BdrvRequestFlags.NONE
    """Flags the driver's zero write honours (FUA, MAY_UNMAP, NO_FALLBACK)."""
    supported_truncate_flags: BdrvRequestFlags = BdrvRequestFlags.NONE
    """Flags the driver's truncate honours (ZERO_WRITE)."""
    concurrency: Concurrency = Concurrency.SERIALIZE_REQUESTS
    """How many requests the core lets into the driver at once."""
    create_opts: tuple[OptionSpec, ...] = ()
    """Options of ``blockcore-img create -o``."""
    runtime_opts: tuple[OptionSpec, ...] = ()
    """Options ``bdrv_open`` reads; any other key is refused by the core."""
    child_names: tuple[str, ...] = ()
    """Child option keys the driver opens (``file``, ``backing``, ``image``, ``data-file``)."""
    needs_filename: bool = False
    """Protocol drivers that must be given a filename."""
    has_zero_init: bool = False
    """A newly created image reads as zeros."""


@attrs.define
class BdrvCheckResult:
    """Figures of a consistency check (QEMU's ``BdrvCheckResult``), filled by the driver."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = attrs.Factory(list)
    """Lines the check printed (QEMU prints them to stderr), in order; a
    :class:`CheckErrorLine` goes out after the program's name, as error_report prints."""


class CheckErrorLine(str):
    """A check message QEMU prints with error_report (``prog: message``) rather than with a
    bare fprintf; plain ``str`` lines in :attr:`BdrvCheckResult.messages` are printed as
    they are."""


@attrs.frozen
class BlockMeasureInfo:
    """Space needed for a new image (QEMU's ``BlockMeasureInfo``)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None


# Debug events (BlkdebugEvent), in QEMU's enum order.
BLKDEBUG_EVENTS: tuple[str, ...] = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)  # fmt: skip

BlkdebugEvent = enum.Enum(  # type: ignore[misc]
    "BlkdebugEvent", [(name.upper(), name) for name in BLKDEBUG_EVENTS]
)
BlkdebugEvent.__doc__ = "Debug events (``BLKDBG_*``); the value is QEMU's event name."

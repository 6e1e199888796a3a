"""``amend``: change creation options of an existing image (qcow2_amend_options); and
``make_empty`` for commit.

What can change, in QEMU's order: upgrade to compat 1.1 (snapshot table rewritten with
full extra data), refcount_bits (the refcount structure rebuilt at the new width through
:func:`.snapshot.commit`, refused when a refcount does not fit), data_file_raw (cleared
only), data_file (renamed only), lazy_refcounts (on: v3 only; off: the image is made
clean first), size (exact resize), downgrade to compat 0.10 (zero clusters expanded,
refused for what v2 cannot hold). A different backing file or format is refused, as 7.2
does ("use qemu-img rebase"); everything else is a creation-only option the caller refuses.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

import attrs

from blockcore.errors import BlockError, NotSupportedError
from blockcore.util import parse_bool

from . import snapshot
from .cluster import ClusterType as CT
from .cluster import cluster_type
from .format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    V2_HEADER_LENGTH,
    Autoclear,
    Compat,
    CompressionType,
    ExtType,
    Incompat,
)
from .snaptable import read_image_table

if TYPE_CHECKING:
    from .image import Qcow2Image

_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def _err(msg: str, hint: str | None = None, code: int = errno.EINVAL) -> BlockError:
    """QEMU's message, printed as it is (``verbatim``: the CLI keeps a lowercase start)."""
    exc = BlockError(code, msg)
    exc.verbatim = True  # type: ignore[attr-defined]
    if hint:
        exc.hint = hint  # type: ignore[attr-defined]
    return exc


async def amend(img: Qcow2Image, options: dict[str, Any], has_backing: bool) -> int | None:
    """Apply ``options`` (only those given); returns the new virtual size, if it changed."""
    h = img.header
    old_version = new_version = h.version
    if "compat" in options and options["compat"] is not None:
        compat = str(options["compat"])
        if compat not in _VERSIONS:
            raise _err(f"Unknown compatibility level {compat}")
        new_version = _VERSIONS[compat]
    new_size = int(options.get("size") or 0)
    lazy = img.lazy_refcounts
    if "lazy_refcounts" in options:
        lazy = parse_bool(options["lazy_refcounts"], "lazy_refcounts")
    refcount_bits = h.refcount_bits
    if "refcount_bits" in options:
        refcount_bits = int(options["refcount_bits"])
        if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
            raise _err("Refcount width must be a power of two and may not exceed 64 bits")
    data_file = options.get("data_file")
    if data_file is not None and not img.has_data_file:
        raise _err("data-file can only be set for images that use an external data file")
    raw = bool(h.autoclear_features & Autoclear.DATA_FILE_RAW)
    if "data_file_raw" in options:
        want_raw = parse_bool(options["data_file_raw"], "data_file_raw")
        if want_raw and not raw:
            raise _err("data-file-raw cannot be set on existing images")
        raw = want_raw
    for key, current in (("backing_file", h.backing_file), ("backing_fmt", h.backing_format)):
        if key in options and (options[key] or None) != (current or None):
            raise _err("Cannot amend the backing file",
                       "You can use 'qemu-img rebase' instead.\n")  # fmt: skip

    async with img.lock:
        await img.ensure_writable()
        await img.flush_metadata()
        await img.refcounts.flush()
        if new_version > old_version:
            await _rebuild(img, version=new_version)
        if refcount_bits != img.header.refcount_bits:
            if new_version < 3 and refcount_bits != 16:
                raise _err("Refcount widths other than 16 bits require compatibility level 1.1 "
                           "or above (use compat=1.1 or greater)")  # fmt: skip
            await _rebuild(img, refcount_order=refcount_bits.bit_length() - 1)
        h = img.header
        autoclear = h.autoclear_features & ~Autoclear.DATA_FILE_RAW
        h = attrs.evolve(h, autoclear_features=autoclear | (Autoclear.DATA_FILE_RAW if raw
                                                             else 0))  # fmt: skip
        if data_file is not None:
            h = h.with_standard_extensions(h.backing_format, data_file or None)
        await img.write_header(h)
        if lazy != img.lazy_refcounts:
            if lazy:
                if new_version < 3:
                    raise _err("Lazy refcounts only supported with compatibility level 1.1 and "
                               "above (use compat=1.1 or greater)")  # fmt: skip
                await img.write_header(attrs.evolve(img.header, compatible_features=img.header
                                                    .compatible_features | Compat.LAZY_REFCOUNTS))
                img.lazy_refcounts = True
            else:
                await _mark_clean(img)
                img.lazy_refcounts = False
                compat = img.header.compatible_features & ~int(Compat.LAZY_REFCOUNTS)
                await img.write_header(attrs.evolve(img.header, compatible_features=compat))
    if new_size:
        if img.header.version < 3 and img.header.nb_snapshots:
            raise NotSupportedError("Can't resize a v2 image which has snapshots", img.file.name)
        await img.truncate(new_size)
    if new_version < old_version:
        async with img.lock:
            await _downgrade(img, has_backing)
    return new_size or None


async def _rebuild(img: Qcow2Image, **kw: Any) -> None:
    """Rewrite the state as it is through the snapshot commit (new refcount structure and
    snapshot table), with a new header version or refcount width."""
    snapshots = await snapshot.read_snapshots(img)
    active = [e & L1E_OFFSET_MASK for e in img.l1]
    await snapshot.commit(img, active, snapshots, img.header.size, **kw)


async def _mark_clean(img: Qcow2Image) -> None:
    """Write every deferred refcount and clear the dirty bit (qcow2_mark_clean)."""
    await img.l2_cache.flush()
    await img.refcounts.flush()
    await img.file.flush()
    if img.dirty:
        await img.set_incompat(Incompat.DIRTY, False)
        img.dirty = False


async def _downgrade(img: Qcow2Image, has_backing: bool) -> None:
    """To compat 0.10 (qcow2_downgrade): refuse what v2 cannot express, turn zero clusters
    into unallocated (no backing file) or zeroed data clusters, write a v2 header."""
    h = img.header
    if h.refcount_order != 4:
        raise _err("compat=0.10 requires refcount_bits=16", code=errno.ENOTSUP)
    if img.has_data_file:
        raise NotSupportedError("Cannot downgrade an image with a data file", img.file.name)
    for sn in await snapshot.read_snapshots(img):
        if sn.vm_state_size > 0xFFFFFFFF or sn.disk_size != h.size:
            raise NotSupportedError("Internal snapshots prevent downgrade of image",
                                    img.file.name)  # fmt: skip
    if img.dirty:
        await _mark_clean(img)
        img.lazy_refcounts = False
    h = img.header
    incompat = h.incompatible_features
    if h.compression_type != CompressionType.ZLIB:
        if await _has_compressed_clusters(img):
            raise NotSupportedError("Cannot downgrade an image with zstd compression type and "
                                    "existing compressed clusters", img.file.name)  # fmt: skip
        incompat &= ~Incompat.COMPRESSION
    if incompat:
        raise NotSupportedError(f"Cannot downgrade an image with incompatible features "
                                f"{incompat:#x} set", img.file.name)  # fmt: skip
    await _expand_zero_clusters(img, has_backing)
    img.lazy_refcounts = False
    v2 = attrs.evolve(h, version=2, header_length=V2_HEADER_LENGTH, incompatible_features=0,
                      compatible_features=0, autoclear_features=0, compression_type=0,
                      extra_fields=b"")  # fmt: skip
    await img.write_header(v2.with_standard_extensions(h.backing_format, None))


async def _all_l2_tables(img: Qcow2Image) -> list[int]:
    """Every L2 table of the active L1 and the snapshots, once each."""
    tables: dict[int, None] = {}
    l1s = [img.l1]
    for sn in await snapshot.read_snapshots(img):
        buf = bytearray(sn.l1_size * 8)
        if buf:
            await img.file.pread(sn.l1_table_offset, memoryview(buf))
        l1s.append(list(struct.unpack(f">{sn.l1_size}Q", buf)))
    for l1 in l1s:
        for e in l1:
            if e & L1E_OFFSET_MASK:
                tables[e & L1E_OFFSET_MASK] = None
    return list(tables)


async def _has_compressed_clusters(img: Qcow2Image) -> bool:
    step = img.geo.l2_entry_size // 8
    for off in await _all_l2_tables(img):
        table = await img.l2_cache.get(off)
        entries = struct.unpack(f">{len(table) // 8}Q", table)[::step]
        if any(e & OFLAG_COMPRESSED for e in entries):
            return True
    return False


async def _expand_zero_clusters(img: Qcow2Image, has_backing: bool) -> None:
    """v2 has no zero flag: without a backing file a zero cluster becomes unallocated,
    with one it becomes a data cluster of zeros (qcow2_expand_zero_clusters)."""
    geo, rc = img.geo, img.refcounts
    cs = geo.cluster_size
    for off in await _all_l2_tables(img):
        table = await img.l2_cache.get(off)
        l2_refcount = await rc.get(off >> geo.cluster_bits)
        changed = False
        for i in range(geo.l2_size):
            entry = struct.unpack_from(">Q", table, i * 8)[0]
            ctype = cluster_type(entry, geo)
            if ctype is CT.ZERO_PLAIN and not has_backing:
                new = 0
            elif ctype in (CT.ZERO_PLAIN, CT.ZERO_ALLOC):
                host = entry & L2E_OFFSET_MASK
                if not host:
                    host = await rc.alloc_clusters(1)
                    if l2_refcount > 1:
                        await rc.update(host, cs, l2_refcount - 1)
                await img.file.pwrite_zeroes(host, cs)
                shared = await rc.get(host >> geo.cluster_bits) > 1
                new = host if shared else host | OFLAG_COPIED
            else:
                continue
            struct.pack_into(">Q", table, i * 8, new)
            changed = True
        if changed:
            # zeros and refcounts are on disk before the entries that point at them
            await rc.flush()
            await img.file.flush()
            img.l2_cache.mark_dirty(off)
            await img.l2_cache.flush()
    await img.file.flush()


async def make_empty(img: Qcow2Image) -> None:
    """Drop every cluster of the disk so it reads from the backing file again, after a
    commit (qcow2_make_empty). The active L1 entries covering the disk become empty through
    :func:`.snapshot.commit`, so snapshots, bitmaps and the VM state keep theirs and a crash
    leaves the old or the new image."""
    async with img.lock:
        await img.ensure_writable()
        await img.flush_metadata()
        await img.refcounts.flush()
        disk = img.geo.size_to_l1(img.header.size)
        active = [0 if i < disk else e & L1E_OFFSET_MASK for i, e in enumerate(img.l1)]
        table = await read_image_table(img)
        snapshots, table_size = table.snapshots, table.size
        l1_clusters = -(-len(img.l1) * 8 // img.geo.cluster_size)
        completely = img.header.version >= 3 and not snapshots and not img.has_data_file \
            and img.header.extension(ExtType.BITMAPS) is None \
            and 3 + l1_clusters <= img.refcounts.entries_per_block  # fmt: skip
        if completely:
            # where qcow2_make_empty takes its make_completely_empty path, whose events
            # frame the L1 table emptied, then the new L1 and refcount tables switched in
            await img.file.event("l1_update")
            await img.file.event("empty_image_prepare")

        async def switch_events() -> None:
            await img.file.event("l1_update")
            await img.file.event("reftable_update")

        await snapshot.commit(img, active, snapshots, img.header.size, keep_table=table_size,
                              before_switch=switch_events if completely else None)  # fmt: skip

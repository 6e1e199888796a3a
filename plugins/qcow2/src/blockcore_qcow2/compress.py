"""Compressed clusters: decompression on read, parallel compression and storage on write.

Mirrors qcow2_co_pwritev_compressed/qcow2_co_compress (qcow2.c, qcow2-threads.c) and
qcow2_co_decompress. zlib and zstandard release the GIL, so clusters are compressed in a
small thread pool, several at once; each pool thread keeps its own zstd compressor (one
``ZstdCompressor`` shared by threads crashes the process).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import zstandard

from blockcore.errors import BlockError, NotSupportedError

from . import alloc
from .format import (
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    CompressionType,
    decode_compressed,
    encode_compressed,
)

if TYPE_CHECKING:
    from .image import Qcow2Image

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
#: Compression threads: one per core (QEMU uses up to 4 for qcow2).
WORKERS = max(2, os.cpu_count() or 2)


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="qcow2-compress")
    return _pool


def compress_cluster(data: bytes | memoryview, ctype: int) -> bytes | None:
    """Compress one cluster; None when it does not fit in ``len(data) - 1`` bytes (QEMU
    then writes it uncompressed). Thread-safe: zstd compressors are per thread."""
    if ctype == CompressionType.ZSTD:
        c = getattr(_local, "zstd", None)
        if c is None:
            c = _local.zstd = zstandard.ZstdCompressor()  # level 3, QEMU's default
        out = c.compress(data)
    else:
        # raw deflate, 4 KiB window, memLevel 9: qcow2_zlib_compress's parameters
        z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = z.compress(data) + z.flush()
    return out if len(out) < len(data) else None


def _compress_many(chunks: list[memoryview], ctype: int) -> list[bytes | None]:
    return [compress_cluster(c, ctype) for c in chunks]


async def write_clusters(img: Qcow2Image, offset: int, length: int, buf: memoryview) -> None:
    """``bdrv_co_pwritev_compressed``: whole clusters from a cluster boundary (the last one
    may end at the end of the disk). Clusters are compressed in parallel, then stored in
    order; one that does not shrink is written normally."""
    cs = img.geo.cluster_size
    if offset % cs:
        raise BlockError(errno.EINVAL, f"compressed write offset {offset} not cluster aligned",
                         img.file.name)  # fmt: skip
    if length % cs and offset + length < img.header.size:
        raise BlockError(errno.EINVAL, "compressed writes must be whole clusters",
                         img.file.name)  # fmt: skip
    if img.has_data_file:
        raise NotSupportedError("compressed writes are not supported with a data file",
                                img.file.name)  # fmt: skip
    chunks = [buf[pos : pos + cs] for pos in range(0, length, cs)]
    if len(chunks[-1]) < cs:  # the disk's last, partial cluster: compress it zero-padded
        chunks[-1] = memoryview(bytes(chunks[-1]) + bytes(cs - len(chunks[-1])))
    ctype = img.header.compression_type
    loop = asyncio.get_running_loop()
    pool = _executor()
    njobs = min(len(chunks), WORKERS)
    per = -(-len(chunks) // njobs)
    jobs = [loop.run_in_executor(pool, _compress_many, chunks[i : i + per], ctype)
            for i in range(0, len(chunks), per)]  # fmt: skip
    results = [c for part in await asyncio.gather(*jobs) for c in part]
    i = 0
    while i < len(results):
        pos = i * cs
        if results[i] is None:  # did not shrink: a normal write, as QEMU does
            await img.write(offset + pos, buf[pos : min(length, pos + cs)])
            i += 1
            continue
        j = i + 1
        while j < len(results) and results[j] is not None:
            j += 1
        await store(img, offset + pos, results[i:j])  # type: ignore[arg-type]
        i = j


async def store(img: Qcow2Image, offset: int, streams: list[bytes]) -> None:
    """Store compressed streams as the clusters from ``offset`` on (qcow2_alloc_compressed_
    cluster_offset + the L2 updates). The byte allocator packs consecutive streams, so they
    usually reach the file in one write.

    Compression never overwrites: from the first cluster that already has a host offset on,
    nothing is stored and the write fails with EIO, as in QEMU (the clusters before it are
    stored, as QEMU's per-cluster tasks would)."""
    geo = img.geo
    cs = geo.cluster_size
    async with img.lock:
        await img.ensure_writable()
        await alloc.wait_dependencies(img, offset, offset + len(streams) * cs)
        if img.has_data_file:
            raise NotSupportedError("compressed writes are not supported with a data file",
                                    img.file.name)  # fmt: skip
        for k in range(len(streams)):
            _, l2 = await img._l2_for_write(geo.offset_to_l1_index(offset + k * cs))
            if img._entry(l2, geo.offset_to_l2_index(offset + k * cs))[0] & L2E_OFFSET_MASK:
                if k:
                    await _store_locked(img, offset, streams[:k])
                raise BlockError(errno.EIO, f"compressed write to guest offset "
                                 f"{offset + k * cs:#x}: the cluster is already allocated "
                                 "(compression cannot overwrite)", img.file.name)  # fmt: skip
        await _store_locked(img, offset, streams)


async def _store_locked(img: Qcow2Image, offset: int, streams: list[bytes]) -> None:
    """Allocate, write and link compressed clusters. Called with the lock held; it is
    dropped for the data writes while the guest clusters sit in ``img.inflight``."""
    geo = img.geo
    cs = geo.cluster_size
    hosts = [await img.refcounts.alloc_bytes(len(data)) for data in streams]
    groups = []  # one write per contiguous group
    k = 0
    while k < len(streams):
        m, end = k + 1, hosts[k] + len(streams[k])
        while m < len(streams) and hosts[m] == end:
            end += len(streams[m])
            m += 1
        await img.check_overlap(hosts[k], end - hosts[k])
        groups.append((hosts[k], streams[k] if m == k + 1 else b"".join(streams[k:m])))
        k = m
    owned = alloc.InFlight(offset, offset + len(streams) * cs)
    img.inflight.append(owned)
    try:
        async with img.unlocked():  # a failure leaks the bytes (check -r leaks repairs)
            for host, data in groups:
                await img.file.event("write_compressed")
                await img.file.pwrite(host, data)
        await img._link_dependency()
        for k, data in enumerate(streams):
            l2off, l2 = await img._l2_for_write(geo.offset_to_l1_index(offset + k * cs))
            idx = geo.offset_to_l2_index(offset + k * cs)
            old, old_bitmap = img._entry(l2, idx)
            await img.file.event("l2_update_compressed")
            img._set_entry(l2, idx, encode_compressed(hosts[k], len(data), geo.cluster_bits), 0)
            img.l2_cache.mark_dirty(l2off)
            await img._free_entry(old, old_bitmap)
    finally:
        img.inflight.remove(owned)
        owned.done.set()


async def read_cluster(img: Qcow2Image, entry: int) -> bytes:
    """Decompress the cluster an L2 entry describes (qcow2_co_decompress)."""
    cs = img.geo.cluster_size
    coff, csize = decode_compressed(entry & L2E_COMPRESSED_OFFSET_SIZE_MASK,
                                    img.geo.cluster_bits)  # fmt: skip
    flen = await img.file.getlength()
    csize = min(csize, max(0, flen - coff))
    if csize <= 0:
        raise await img.mark_corrupt(f"compressed cluster at {coff:#x} beyond end of file")
    raw = bytearray(csize)
    await img.file.pread(coff, memoryview(raw))
    try:
        if img.header.compression_type == CompressionType.ZSTD:
            if img._zstd_d is None:
                img._zstd_d = zstandard.ZstdDecompressor()
            out = bytearray()
            obj = img._zstd_d.decompressobj()
            data = bytes(raw)
            # a stream may hold several frames; stop once the cluster is full
            while len(out) < cs and data:
                out += obj.decompress(data)
                data = obj.unused_data
                if len(out) < cs and data:
                    obj = img._zstd_d.decompressobj()
        else:
            d = zlib.decompressobj(-12)
            out = bytearray(d.decompress(bytes(raw), cs))
    except (zlib.error, zstandard.ZstdError) as exc:
        raise BlockError(errno.EIO, f"compressed cluster at {coff:#x} is damaged: {exc}",
                         img.file.name) from None  # fmt: skip
    if len(out) < cs:
        raise BlockError(errno.EIO, f"compressed cluster at {coff:#x} decompressed to "
                         f"{len(out)} of {cs} bytes", img.file.name)  # fmt: skip
    return bytes(out[:cs])

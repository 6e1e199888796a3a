"""Opening and reopening nodes: blockdev options, protocol and format probing, children,
backing files, and transactional reopen (QEMU's bdrv_open_inherit and bdrv_reopen_multiple).

Everything here is global state (GS): main thread, outside any coroutine.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .aio import AioContext
from .drivers import BlockDriver, bdrv_find_format, bdrv_find_protocol, bdrv_probe_all
from .errors import BlockError
from .graph import (
    BdrvChild,
    BlockDriverState,
    _all_nodes,
    _close_node,
    _refresh_perms,
    bdrv_attach_child,
    bdrv_refresh_limits,
    bdrv_root_attach_child,
    bdrv_root_unref_child,
    bdrv_unref,
)
from .tiers import Tier, api, global_state_code
from .types import BLOCK_PROBE_BUF_SIZE, ChildRole, OpenFlags, Perm
from .util import parse_bool, parse_json_filename, round_up, unflatten_options

__all__ = [
    "bdrv_open",
    "bdrv_open_child",
    "bdrv_refresh_total_bytes",
    "bdrv_reopen",
    "bdrv_reopen_set_read_only",
]

# Open
# -------------------------------------------------------------------------------------------

_GENERIC_KEYS = ("driver", "node-name", "read-only", "auto-read-only", "cache", "discard",
                 "detect-zeroes", "force-share", "filename")  # fmt: skip


def _apply_generic(options: dict[str, Any], flags: OpenFlags) -> tuple[OpenFlags, dict[str, Any]]:
    """Fold the generic options into ``flags``; return the flags and the generic values."""
    generic: dict[str, Any] = {}
    if "read-only" in options:
        if parse_bool(options.pop("read-only"), "read-only"):
            flags &= ~OpenFlags.RDWR
        else:
            flags |= OpenFlags.RDWR
    if "auto-read-only" in options and parse_bool(options.pop("auto-read-only"), "auto-read-only"):
        flags |= OpenFlags.AUTO_RDONLY
    cache = options.pop("cache", {}) or {}
    if not isinstance(cache, dict):
        raise BlockError(errno.EINVAL, f"invalid cache options {cache!r}")
    for key, bit in (("direct", OpenFlags.NOCACHE), ("no-flush", OpenFlags.NO_FLUSH)):
        if key in cache:
            flags = flags | bit if parse_bool(cache.pop(key), f"cache.{key}") else flags & ~bit
    cache.pop("writeback", None)
    if cache:
        raise BlockError(errno.EINVAL, f"unknown cache option {next(iter(cache))!r}")
    if "discard" in options:
        mode = str(options.pop("discard"))
        if mode in ("unmap", "on"):
            flags |= OpenFlags.UNMAP
        elif mode in ("ignore", "off"):
            flags &= ~OpenFlags.UNMAP
        else:
            raise BlockError(errno.EINVAL, f"invalid discard option {mode!r}")
    for key in ("node-name", "detect-zeroes", "force-share"):
        if key in options:
            generic[key] = options.pop(key)
    if str(generic.get("detect-zeroes", "off")) not in ("off", "on", "unmap"):
        exc = BlockError(errno.EINVAL, f"invalid parameter value: {generic['detect-zeroes']}")
        exc.verbatim = True  # type: ignore[attr-defined]  # QEMU's lowercase start
        raise exc
    return flags, generic


def _child_flags(parent_flags: OpenFlags, role: ChildRole, parent_is_format: bool) -> OpenFlags:
    """Flags a child inherits (QEMU's bdrv_inherited_options)."""
    keep = (OpenFlags.CACHE_MASK | OpenFlags.RDWR | OpenFlags.AUTO_RDONLY | OpenFlags.NO_IO
            | OpenFlags.NATIVE_AIO | OpenFlags.IO_URING)  # the protocol node's aio default
    flags = parent_flags & keep
    if role & ChildRole.COW:
        flags &= ~(OpenFlags.RDWR | OpenFlags.AUTO_RDONLY)
        return flags
    flags |= OpenFlags.UNMAP  # lower layers follow the unmap policy of the node above
    # a format's or a filter's own children are protocol nodes: no probing below them
    flags |= OpenFlags.PROTOCOL
    if parent_flags & OpenFlags.INACTIVE:
        flags |= OpenFlags.INACTIVE
    return flags


@api(Tier.GS)
def bdrv_open(
    filename: str | None = None,
    options: dict[str, Any] | None = None,
    flags: OpenFlags = OpenFlags.NONE,
) -> BlockDriverState:
    """Open a node (and its children) from a filename and/or blockdev options. Tier: GS.

    ``filename`` may be a path, ``proto:...`` or ``json:{...}``. ``options`` use QEMU's
    blockdev keys, flat (``file.filename``) or nested. Without ``driver`` the format is
    probed. Returns a node holding one reference (drop it with :func:`bdrv_unref`).
    """
    global_state_code("bdrv_open")
    opts = unflatten_options(dict(options or {}))
    if filename is not None and filename.startswith("json:"):
        merged = parse_json_filename(filename)
        merged.update(opts)
        opts, filename = merged, None
    return _open_node(filename, opts, flags, parent_is_format=False)


def _open_node(
    filename: str | None, options: dict[str, Any], flags: OpenFlags, *, parent_is_format: bool
) -> BlockDriverState:
    drv_name = options.pop("driver", None)
    if filename is None and isinstance(options.get("filename"), str) and drv_name is None:
        filename = options.pop("filename")
    if drv_name is not None:
        drv = bdrv_find_format(str(drv_name))
        probed = False
    elif flags & OpenFlags.PROTOCOL:
        if filename is None:
            raise BlockError(errno.EINVAL, "a 'driver' or a 'filename' is required")
        drv = bdrv_find_protocol(filename) or bdrv_find_format("file")
        probed = False
    else:
        if filename is None and "file" not in options:
            raise BlockError(errno.EINVAL, "a 'driver' or a 'filename' is required")
        file_ref = options.pop("file", None)
        if isinstance(file_ref, dict):
            proto = _open_node(filename, file_ref, _child_flags(flags, ChildRole.IMAGE, True),
                               parent_is_format=True)  # fmt: skip
        elif isinstance(file_ref, BlockDriverState):
            proto = file_ref
        else:
            proto = _open_node(file_ref or filename, {}, _child_flags(flags, ChildRole.IMAGE, True),
                               parent_is_format=True)  # fmt: skip
        try:
            drv = _probe_format(proto)
        except BaseException:
            bdrv_unref(proto)
            raise
        options["file"] = proto
        filename, probed = None, True
    desc = drv.descriptor
    if filename is not None:
        if desc.protocol_name is not None or desc.needs_filename:
            if drv.bdrv_parse_filename is not None and filename.startswith(  # type: ignore[attr-defined]
                f"{desc.protocol_name}:"
            ):
                for key, value in drv.bdrv_parse_filename(filename).items():  # type: ignore[attr-defined]
                    options.setdefault(key, value)
            else:
                prefix = f"{desc.protocol_name}:"
                plain = filename[len(prefix) :] if filename.startswith(prefix) else filename
                options.setdefault("filename", plain)
        else:
            options.setdefault("file", filename)
    flags, generic = _apply_generic(options, flags)
    allowed = {o.name for o in desc.runtime_opts} | set(desc.child_names)
    if desc.protocol_name is not None or desc.needs_filename:
        allowed.add("filename")
    if desc.supports_backing:
        allowed.add("backing")
    for key in options:
        if key not in allowed:
            raise BlockError(
                errno.EINVAL,
                f"block {'format' if desc.is_format else 'driver'} {drv.name!r} does not "
                f"support the option {key!r}",
                str(options.get("filename") or filename or ""),
            )
    bs = BlockDriverState(drv, generic.get("node-name"), flags)
    bs.probed_format = probed
    bs.force_share = parse_bool(generic.get("force-share", False), "force-share")
    bs.detect_zeroes = str(generic.get("detect-zeroes", "off"))
    bs.options = dict(options)
    if isinstance(options.get("filename"), str):
        bs.filename = options["filename"]
    try:
        if flags & OpenFlags.COPY_ON_READ:  # as bdrv_open_common, before the driver opens
            if not flags & OpenFlags.RDWR:
                raise BlockError(errno.EINVAL, "Can't use copy-on-read on read-only device",
                                 bs.filename or bs.node_name)  # fmt: skip
            bs.copy_on_read += 1
        backing_ref = options.pop("backing", "") if desc.supports_backing else ""
        if drv.bdrv_open is not None:  # type: ignore[attr-defined]
            try:
                drv.bdrv_open(bs, options, flags)  # type: ignore[attr-defined]
            except BaseException:
                bs.drv_opened = False  # a failed open is not closed by the driver
                raise
        if not bs.filename and bs.file is not None:
            bs.filename = bs.file.bs.filename
        if desc.supports_backing and not flags & OpenFlags.NO_BACKING and bs.backing is None:
            _open_backing(bs, backing_ref)
        bdrv_refresh_limits(bs)
        bdrv_refresh_total_bytes(bs)
    except BaseException:
        _close_node(bs)
        raise
    return bs


def _probe_format(proto: BlockDriverState) -> BlockDriver:
    from .io import bdrv_pread
    from .resize import bdrv_getlength

    length = bdrv_getlength(proto)
    buf = bytearray(min(length, BLOCK_PROBE_BUF_SIZE))
    if buf:
        c = bdrv_root_attach_child(proto, "probe", ChildRole.IMAGE, Perm.CONSISTENT_READ, Perm.ALL,
                                   _ProbeParent(proto))  # fmt: skip
        proto.refcnt += 1
        try:
            bdrv_pread(c, 0, len(buf), buf)
        finally:
            bdrv_root_unref_child(c)
    drv = bdrv_probe_all(bytes(buf), proto.filename or None)
    if drv is None:
        raise BlockError(errno.EINVAL, "could not determine image format", proto.filename)
    return drv


class _ProbeParent:
    """A short-lived parent that reads the first bytes of a node to probe its format."""

    parent_is_bds = False

    def __init__(self, bs: BlockDriverState) -> None:
        self.bs = bs

    def parent_desc(self) -> str:
        return "format probing"

    def parent_aio_context(self) -> AioContext:
        return self.bs.aio_context

    def parent_drained_begin(self) -> None:
        pass

    def parent_drained_end(self) -> None:
        pass

    def parent_drained_poll(self) -> bool:
        return False

    def parent_resize(self) -> None:
        pass


def _open_backing(bs: BlockDriverState, ref: Any) -> None:
    if ref is None:  # "backing": null means no backing file
        return
    if isinstance(ref, str) and ref == "":
        if not bs.backing_file:
            return
        ref = _backing_path(bs)
        opts: dict[str, Any] = {"driver": bs.backing_format} if bs.backing_format else {}
    elif isinstance(ref, dict):
        opts = dict(ref)
        ref = opts.pop("filename", None) if "file" in opts or "driver" in opts else None
    else:
        opts = {}
    child_flags = _child_flags(bs.open_flags, ChildRole.COW, True)
    if isinstance(ref, BlockDriverState):
        backing = ref
        backing.refcnt += 1
    elif isinstance(ref, str) and not opts and ref in _all_nodes:
        backing = _all_nodes[ref]
        backing.refcnt += 1
    else:
        try:
            backing = _open_node(ref, opts, child_flags, parent_is_format=False)
        except OSError as exc:
            raise BlockError(
                exc.errno or errno.EIO,
                f"could not open backing file: {exc.strerror or exc}",
                bs.backing_file or bs.filename,
            ) from exc
    try:
        bdrv_attach_child(bs, backing, "backing", ChildRole.COW)
    except BaseException:
        bdrv_unref(backing)
        raise


def _backing_path(bs: BlockDriverState) -> str:
    """A relative backing file name is relative to the directory of the image naming it."""
    name = bs.backing_file
    if name.startswith(("/", "json:")) or ":" in name.split("/")[0] or not bs.filename:
        return name
    return os.path.join(os.path.dirname(bs.filename), name)


@api(Tier.GS)
def bdrv_open_child(
    bs: BlockDriverState,
    options: dict[str, Any],
    name: str,
    role: ChildRole,
    *,
    allow_none: bool = False,
) -> BdrvChild | None:
    """Open child ``name`` of ``bs`` from ``options[name]`` and attach it. Tier: GS.

    Call it from a driver's ``bdrv_open``. ``options[name]`` may be a filename, a nested
    options dict, a node name or an open node; it is removed from ``options``. The child
    inherits cache and read-only flags from ``bs``; a format's non-backing children are
    opened as protocols (no format probing below a format).
    """
    global_state_code("bdrv_open_child")
    ref = options.pop(name, None)
    if ref is None:
        if allow_none:
            return None
        raise BlockError(errno.EINVAL, f"a {name!r} child is required", bs.node_name)
    is_format = bool(bs.drv and bs.drv.descriptor.is_format)
    flags = _child_flags(bs.open_flags, role, is_format)
    if isinstance(ref, BlockDriverState):
        child_bs = ref
    elif isinstance(ref, str) and ref in _all_nodes:
        child_bs = _all_nodes[ref]
        child_bs.refcnt += 1
    elif isinstance(ref, str):
        child_bs = _open_node(ref, {}, flags, parent_is_format=is_format)
    elif isinstance(ref, dict):
        child_bs = _open_node(None, dict(ref), flags, parent_is_format=is_format)
    else:
        raise BlockError(errno.EINVAL, f"invalid reference for child {name!r}: {ref!r}")
    try:
        return bdrv_attach_child(bs, child_bs, name, role)
    except BaseException:
        bdrv_unref(child_bs)
        raise


@api(Tier.GS)
def bdrv_refresh_total_bytes(bs: BlockDriverState) -> None:
    """Read the node's length from its driver (rounded up to 512). Tier: GS."""
    global_state_code("bdrv_refresh_total_bytes")
    from .resize import bdrv_getlength_uncached

    bs.total_bytes = round_up(bdrv_getlength_uncached(bs), 512)


# -------------------------------------------------------------------------------------------
# Reopen
# -------------------------------------------------------------------------------------------


def _runtime_names(node: BlockDriverState) -> set[str]:
    return {o.name for o in node.drv.descriptor.runtime_opts} if node.drv is not None else set()


def _reopen_options(node: BlockDriverState, new: dict[str, Any]) -> dict[str, Any]:
    """The options a driver with reopen hooks prepares with: ``new`` over the node's current
    runtime options, joined by the driver's ``bdrv_join_options`` if it has one (QEMU's
    bdrv_reopen_queue_child keeps the old options; an option not given keeps its value)."""
    drv = node.drv
    if drv is None or drv.bdrv_reopen_prepare is None:  # type: ignore[attr-defined]
        return dict(new)
    names = _runtime_names(node)
    old = {k: v for k, v in node.options.items() if k in names}
    if drv.bdrv_join_options is not None:  # type: ignore[attr-defined]
        return dict(drv.bdrv_join_options(dict(new), old))  # type: ignore[attr-defined]
    return {**old, **new}


def _pop_child_options(opts: dict[str, Any], child: str) -> dict[str, Any]:
    """Take the ``child.``-prefixed options out of ``opts``, for that child's reopen."""
    prefix = child + "."
    return {k[len(prefix):]: opts.pop(k) for k in list(opts) if k.startswith(prefix)}


def _reopen_generic(node: BlockDriverState, opts: dict[str, Any], flags: OpenFlags,
                    detect_zeroes: dict[BlockDriverState, str]) -> OpenFlags:  # fmt: skip
    """Take the block layer's own options out of a reopen's ``opts`` (QEMU's
    bdrv_reopen_prepare): ``read-only``, ``auto-read-only``, ``cache.*`` and ``discard``
    become flags, ``detect-zeroes`` is applied at commit, ``driver`` may only name the
    driver the node has; return the flags."""
    drv = node.drv
    if "driver" in opts and (drv is None or opts.pop("driver") != drv.name):
        raise BlockError(errno.EINVAL, "Cannot change the option 'driver'", node.filename)
    cache = _pop_child_options(opts, "cache")
    if cache:
        opts["cache"] = cache
    flags, generic = _apply_generic(opts, flags)
    if "detect-zeroes" in generic:
        detect_zeroes[node] = str(generic.pop("detect-zeroes"))
    for key, value in generic.items():  # node-name, force-share: fixed at open
        if key not in node.options or node.options[key] != value:
            raise BlockError(errno.EINVAL, f"Cannot change the option '{key}'", node.filename)
    return flags


def _check_unhandled(node: BlockDriverState, left: dict[str, Any]) -> None:
    """Options the driver's prepare left in place may not differ from the current ones."""
    for key, value in left.items():
        if key not in node.options or node.options[key] != value:
            raise BlockError(errno.EINVAL, f"Cannot change the option '{key}'", node.filename)


@api(Tier.GS)
def bdrv_reopen(bs: BlockDriverState, flags: OpenFlags, options: dict[str, Any] | None = None
                ) -> None:  # fmt: skip
    """Switch ``bs`` (and the storage children below it) to ``flags``, e.g. read-only <->
    read-write, and its runtime ``options``, transactionally: every driver prepares,
    permissions are checked, then all commit; on any failure all abort and nothing
    changes. Tier: GS.

    Options not given keep their current values (the node's ``options``); a driver's
    prepare removes the options it handles, and the ones left must equal the current
    ones. After the commits, ``bdrv_reopen_commit_post`` runs on every node.
    Formats and filters without reopen hooks accept a change of flags and no options;
    protocol drivers without them (they hold the storage open) refuse any change, as QEMU.
    """
    global_state_code("bdrv_reopen")
    from .drain import bdrv_drained_begin, bdrv_drained_end

    queue: list[tuple[BlockDriverState, OpenFlags, dict[str, Any]]] = []
    detect_zeroes: dict[BlockDriverState, str] = {}
    inherited = OpenFlags.RDWR | OpenFlags.CACHE_MASK  # what storage children follow

    def collect(node: BlockDriverState, nflags: OpenFlags, opts: dict[str, Any]) -> None:
        nflags = _reopen_generic(node, opts, nflags, detect_zeroes)
        below = {c.name: _pop_child_options(opts, c.name) for c in node.children}
        queue.append((node, nflags, _reopen_options(node, opts)))
        for c in node.children:
            if not c.role & ChildRole.COW:
                child_flags = (c.bs.open_flags & ~inherited) | (nflags & inherited)
                collect(c.bs, child_flags, below[c.name])

    collect(bs, flags, dict(options or {}))
    bdrv_drained_begin(bs)
    try:
        prepared: list[tuple[BlockDriverState, Any, OpenFlags, dict[str, Any]]] = []
        try:
            for node, nflags, opts in queue:
                drv = node.drv
                if drv is None:
                    raise BlockError(errno.ENOMEDIUM, "no medium", node.node_name)
                left = dict(opts)
                if drv.bdrv_reopen_prepare is not None:  # type: ignore[attr-defined]
                    state = drv.bdrv_reopen_prepare(node, left, nflags)  # type: ignore[attr-defined]
                elif opts:
                    state = None
                elif nflags != node.open_flags and drv.descriptor.protocol_name is not None:
                    # a protocol driver holds the storage open with the old access mode
                    raise BlockError(errno.ENOTSUP, f"block driver {drv.name!r} used by node "
                                     f"{node.node_name!r} does not support reopening files",
                                     node.filename)  # fmt: skip
                else:
                    state = None
                prepared.append((node, state, node.open_flags, opts))
                _check_unhandled(node, left)
                node.open_flags = nflags
            _refresh_perms(bs)
        except BaseException:
            for node, state, old, _opts in reversed(prepared):
                node.open_flags = old
                if node.drv.bdrv_reopen_abort is not None:  # type: ignore[union-attr]
                    node.drv.bdrv_reopen_abort(node, state)  # type: ignore[union-attr]
            raise
        for node, state, _old, opts in prepared:
            if node.drv.bdrv_reopen_commit is not None:  # type: ignore[union-attr]
                node.drv.bdrv_reopen_commit(node, state)  # type: ignore[union-attr]
            names = _runtime_names(node)
            node.options = {**{k: v for k, v in node.options.items() if k not in names}, **opts}
            if node in detect_zeroes:
                node.detect_zeroes = detect_zeroes[node]
        # limits may change with the new flags (cache.direct brings O_DIRECT alignment);
        # children first, so parents merge the new values
        for node, _state, _old, _opts in reversed(prepared):
            bdrv_refresh_limits(node)
        for node, state, _old, _opts in prepared:
            if node.drv.bdrv_reopen_commit_post is not None:  # type: ignore[union-attr]
                node.drv.bdrv_reopen_commit_post(node, state)  # type: ignore[union-attr]
    finally:
        bdrv_drained_end(bs)


@api(Tier.GS)
def bdrv_reopen_set_read_only(bs: BlockDriverState, read_only: bool) -> None:
    """Reopen ``bs`` read-only or read-write (QEMU's bdrv_reopen_set_read_only). Tier: GS.

    :raises PermissionConflictError: making it read-only while a user holds write access.
    """
    global_state_code("bdrv_reopen_set_read_only")
    flags = bs.open_flags & ~OpenFlags.RDWR if read_only else bs.open_flags | OpenFlags.RDWR
    bdrv_reopen(bs, flags)

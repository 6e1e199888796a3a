"""qcow2 runtime options, parsed the same way at open and at reopen (QEMU's
read_cache_sizes and qcow2_update_options_prepare), and merged with the node's current
options at reopen (qcow2_join_options)."""

from __future__ import annotations

import errno
from typing import Any

import attrs

from blockcore.errors import BlockError
from blockcore.types import OpenFlags, OptionSpec
from blockcore.util import parse_size

from .format import Compat, QCowHeader

RUNTIME_OPTS = (
    OptionSpec("lazy-refcounts", "bool", "postpone refcount updates (header default)"),
    OptionSpec("pass-discard-request", "bool", "pass guest discards to the file",),
    OptionSpec("pass-discard-snapshot", "bool", "punch clusters snapshot operations free", True),
    OptionSpec("pass-discard-other", "bool", "discard other freed clusters in the file", False),
    OptionSpec("l2-cache-size", "size", "bytes of L2 tables cached", 1 << 20),
    OptionSpec("refcount-cache-size", "size", "bytes of refcount blocks cached", 256 << 10),
    OptionSpec("cache-size", "size", "L2 plus refcount cache bytes"),
    OptionSpec("l2-cache-entry-size", "size", "validated; whole L2 tables are cached"),
    OptionSpec("overlap-check", "string", "none, constant, cached or all; validated only"),
    OptionSpec("cache-clean-interval", "number", "validated; caches are never cleaned", 0),
)
RUNTIME_NAMES = frozenset(o.name for o in RUNTIME_OPTS)
OVERLAP_MODES = ("none", "constant", "cached", "all")
_CACHE_KEYS = ("cache-size", "l2-cache-size", "refcount-cache-size")
_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.")  # fmt: skip


@attrs.frozen
class RuntimeOptions:
    """What the runtime options decide for an open image."""

    l2_tables: int
    refcount_tables: int
    lazy_refcounts: bool
    discard_request: bool
    discard_snapshot: bool
    discard_other: bool
    cache_clean_interval: int
    overlap_check: str


def pop_runtime_options(options: dict[str, Any]) -> dict[str, Any]:
    """Remove the qcow2 runtime options from ``options`` and return them."""
    return {key: options.pop(key) for key in list(options) if key in RUNTIME_NAMES}


def _verbatim(msg: str, name: str) -> BlockError:
    exc = BlockError(errno.EINVAL, msg, name)
    exc.verbatim = True  # type: ignore[attr-defined]  # QEMU's lowercase start
    return exc


def _bool(opt: dict[str, Any], key: str, default: bool, name: str) -> bool:
    """QAPI's booleans (on/yes/true/y, off/no/false/n) and QEMU's message for others."""
    value = opt.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value)
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise BlockError(errno.EINVAL, f"Parameter '{key}' expects 'on' or 'off'", name)


def _size(opt: dict[str, Any], key: str, name: str) -> int:
    try:
        return parse_size(opt[key])
    except (BlockError, ValueError):
        exc = BlockError(errno.EINVAL, f"Parameter '{key}' expects a non-negative number "
                         "below 2^64", name)  # fmt: skip
        exc.hint = _SIZE_HINT  # type: ignore[attr-defined]
        raise exc from None


def cache_sizes(opt: dict[str, Any], header: QCowHeader, name: str) -> tuple[int, int]:
    """L2 and refcount cache bytes from the options, with QEMU's rules and messages.

    Tier: common. Unlike QEMU (32 MiB at most, 4 refcount blocks), the defaults stay 1 MiB
    of L2 tables and a quarter of that for refcount blocks; ``l2-cache-entry-size`` is
    validated only, as whole tables are cached.
    """
    cs = header.cluster_size
    entry_bytes = 16 if header.extended_l2 else 8
    max_l2 = -(-(-(-header.size // cs) * entry_bytes) // cs) * cs  # every L2 table
    given = {key: _size(opt, key, name) for key in _CACHE_KEYS if key in opt}
    l2 = min(max_l2, given["l2-cache-size"]) if "l2-cache-size" in given else 1 << 20
    rc = given.get("refcount-cache-size", max(4 * cs, l2 // 4))
    if "cache-size" in given:
        total = given["cache-size"]
        if "l2-cache-size" in given and "refcount-cache-size" in given:
            raise _verbatim("cache-size, l2-cache-size and refcount-cache-size may not be set "
                            "at the same time", name)  # fmt: skip
        if given.get("l2-cache-size", 0) > total:
            raise _verbatim("l2-cache-size may not exceed cache-size", name)
        if given.get("refcount-cache-size", 0) > total:
            raise _verbatim("refcount-cache-size may not exceed cache-size", name)
        if "l2-cache-size" in given:
            rc = total - l2
        elif "refcount-cache-size" in given:
            l2 = total - rc
        elif total >= max_l2 + 4 * cs:
            l2, rc = max_l2, total - max_l2  # as much as possible to the L2 cache
        else:
            rc = min(total, 4 * cs)
            l2 = total - rc
    entry = _size(opt, "l2-cache-entry-size", name) if "l2-cache-entry-size" in opt else cs
    if entry < 512 or entry > cs or entry & (entry - 1):
        raise BlockError(errno.EINVAL, "L2 cache entry size must be a power of two between "
                         f"512 and the cluster size ({cs})", name)  # fmt: skip
    return l2, rc


def _clean_interval(opt: dict[str, Any], name: str) -> int:
    if "cache-clean-interval" not in opt:
        return 0
    try:
        text = str(opt["cache-clean-interval"]).strip()
        # strtoull base 0: 0x.. hex, 0.. octal, else decimal
        octal = len(text) > 1 and text[0] == "0" and text[1] not in "xX"
        interval = int(text, 8) if octal else int(text, 0)
    except ValueError:
        raise BlockError(errno.EINVAL, "Parameter 'cache-clean-interval' expects a number",
                         name) from None  # fmt: skip
    if not 0 <= interval <= 0xFFFFFFFF:  # QEMU parses it unsigned: -1 is too big
        raise BlockError(errno.EINVAL, "Cache clean interval too big", name)
    return interval


def parse_runtime_options(opt: dict[str, Any], header: QCowHeader, flags: OpenFlags,
                          name: str) -> RuntimeOptions:  # fmt: skip
    """Validate the runtime options ``opt`` for an image with ``header`` opened (or
    reopened) with ``flags``; options not given take their defaults. Tier: common.

    :raises BlockError: EINVAL with QEMU's message, in QEMU's order of checks.
    """
    for key in ("lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
                "pass-discard-other"):  # fmt: skip
        if key in opt:
            _bool(opt, key, False, name)  # types first, as qemu_opts_absorb_qdict
    l2_bytes, rc_bytes = cache_sizes(opt, header, name)
    cs = header.cluster_size
    interval = _clean_interval(opt, name)
    header_lazy = bool(header.compatible_features & Compat.LAZY_REFCOUNTS)
    lazy = _bool(opt, "lazy-refcounts", header_lazy, name)
    if lazy and header.version < 3:
        raise BlockError(errno.EINVAL, "Lazy refcounts require a qcow2 image with at least "
                         "qemu 1.1 compatibility level", name)  # fmt: skip
    overlap = str(opt.get("overlap-check", "cached"))
    if overlap not in OVERLAP_MODES:
        raise BlockError(errno.EINVAL, f"Unsupported value '{overlap}' for qcow2 option "
                         "'overlap-check'. Allowed are any of the following: "
                         f"{', '.join(OVERLAP_MODES)}", name)  # fmt: skip
    return RuntimeOptions(
        l2_tables=max(2, l2_bytes // cs), refcount_tables=max(4, rc_bytes // cs),
        lazy_refcounts=lazy,
        discard_request=_bool(opt, "pass-discard-request", bool(flags & OpenFlags.UNMAP), name),
        discard_snapshot=_bool(opt, "pass-discard-snapshot", True, name),
        discard_other=_bool(opt, "pass-discard-other", False, name),
        cache_clean_interval=interval, overlap_check=overlap,
    )  # fmt: skip


def join_options(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The options a reopen applies: ``new`` over the node's ``old`` ones, where a new
    ``overlap-check`` or ``cache-size`` replaces the old settings it sums up, and an old
    ``cache-size`` gives way to a new partial size (qcow2_join_options). Tier: common."""
    old = dict(old)
    if "overlap-check" in new:
        for key in [k for k in old if k == "overlap-check" or k.startswith("overlap-check.")]:
            del old[key]
    if "cache-size" in new:
        old.pop("l2-cache-size", None)
        old.pop("refcount-cache-size", None)
    joined = {**old, **new}
    if "cache-size" not in new and any(key in joined for key in _CACHE_KEYS):
        joined.pop("cache-size", None)
    return joined

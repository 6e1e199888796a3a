"""qemu-img's text and JSON outputs, as pure functions of QAPI-shaped dicts.

The dicts use QAPI's key names in QAPI's declaration order (``ImageInfo``, ``ImageCheck``,
``BlockMeasureInfo``, ``MapEntry``); :func:`blockcore.cliutil.to_json_pretty` then prints them
in QDict order, exactly as ``qobject_to_json_pretty`` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..cliutil import dump_qobject_human, size_to_str, to_json_pretty

__all__ = [
    "check_human",
    "check_json",
    "image_info_human",
    "image_info_json",
    "map_entry_human",
    "map_entry_json",
    "map_header_human",
    "measure_human",
    "measure_json",
    "snapshot_header",
    "snapshot_line",
]


# ---------------------------------------------------------------------------- info
def snapshot_header() -> str:
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def snapshot_line(sn: dict[str, Any]) -> str:
    """``bdrv_snapshot_dump`` of one SnapshotInfo (dates in local time, as QEMU)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.get("date-sec", 0)))
    clock_ns = sn.get("vm-clock-sec", 0) * 1_000_000_000 + sn.get("vm-clock-nsec", 0)
    secs = clock_ns // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                     clock_ns // 1_000_000 % 1000)
    icount = str(sn["icount"]) if sn.get("icount") is not None else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (sn.get("id", ""), sn.get("name", ""),
                                          size_to_str(sn.get("vm-state-size", 0)), date, clock,
                                          icount)


def image_info_human(info: dict[str, Any]) -> str:
    """``bdrv_image_info_dump``."""
    lines = []
    disk = size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    lines.append(f"image: {info['filename']}\n")
    lines.append(f"file format: {info['format']}\n")
    lines.append(f"virtual size: {size_to_str(info['virtual-size'])} "
                 f"({info['virtual-size']} bytes)\n")
    lines.append(f"disk size: {disk}\n")
    if info.get("encrypted"):
        lines.append("encrypted: yes\n")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if "full-backing-filename" not in info:
            line += " (cannot determine actual path)"
        elif info["backing-filename"] != info["full-backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line + "\n")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        lines.append("Snapshot list:\n")
        lines.append(snapshot_header() + "\n")
        for sn in info["snapshots"]:
            lines.append(snapshot_line(sn) + "\n")
    if "format-specific" in info:
        lines.append("Format specific information:\n")
        lines.append(dump_qobject_human(info["format-specific"]["data"], 1))
    return "".join(lines)


def image_info_list_human(infos: Sequence[dict[str, Any]]) -> str:
    return "\n".join(image_info_human(i) for i in infos)


def image_info_json(info: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    return to_json_pretty(info if isinstance(info, dict) else list(info)) + "\n"


# ---------------------------------------------------------------------------- check
CHECK_KEYS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
              "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
              "fragmented-clusters", "compressed-clusters")  # fmt: skip


def image_check(filename: str, fmt: str, result: Any) -> dict[str, Any]:
    """An ``ImageCheck`` from a :class:`~blockcore.types.BdrvCheckResult` (zero counts omitted,
    except ``check-errors``)."""
    values = {
        "filename": filename,
        "format": fmt,
        "check-errors": result.check_errors,
        "image-end-offset": result.image_end_offset,
        "corruptions": result.corruptions,
        "leaks": result.leaks,
        "corruptions-fixed": result.corruptions_fixed,
        "leaks-fixed": result.leaks_fixed,
        "total-clusters": result.total_clusters,
        "allocated-clusters": result.allocated_clusters,
        "fragmented-clusters": result.fragmented_clusters,
        "compressed-clusters": result.compressed_clusters,
    }
    return {k: v for k, v in values.items() if k in ("filename", "format", "check-errors") or v}


def check_human(check: dict[str, Any]) -> str:
    """``dump_human_image_check``."""
    out = []
    corruptions = check.get("corruptions", 0)
    leaks = check.get("leaks", 0)
    errors = check.get("check-errors", 0)
    if not (corruptions or leaks or errors):
        out.append("No errors were found on the image.\n")
    else:
        if corruptions:
            out.append(f"\n{corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if leaks:
            out.append(f"\n{leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if errors:
            out.append(f"\n{errors} internal errors have occurred during the check.\n")
    total = check.get("total-clusters", 0)
    allocated = check.get("allocated-clusters", 0)
    if total and allocated:
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n"
                   % (allocated, total, allocated * 100.0 / total,
                      check.get("fragmented-clusters", 0) * 100.0 / allocated,
                      check.get("compressed-clusters", 0) * 100.0 / allocated))
    if check.get("image-end-offset"):
        out.append(f"Image end offset: {check['image-end-offset']}\n")
    return "".join(out)


def check_repaired_human(leaks_fixed: int, corruptions_fixed: int) -> str:
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {leaks_fixed} leaked clusters\n"
            f"    {corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")


def check_json(check: dict[str, Any]) -> str:
    return to_json_pretty({k: check[k] for k in CHECK_KEYS if k in check}) + "\n"


# ---------------------------------------------------------------------------- map
def map_header_human() -> str:
    return "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")


def _hex16(value: int) -> str:
    """C's ``%#-16x``: 0x prefix except for zero, left-aligned in 16 columns."""
    return ("%#x" % value if value else "0").ljust(16)


def map_entry_human(e: dict[str, Any]) -> str:
    """One line of the human map (only data that is not zero); ``e`` is a MapEntry."""
    if e["data"] and not e["zero"]:
        return "%s%s%s%s\n" % (_hex16(e["start"]), _hex16(e["length"]),
                               _hex16(e.get("offset", 0) or 0), e.get("filename") or "")
    return ""


def map_entry_json(e: dict[str, Any], last: bool) -> str:
    text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
            % (e["start"], e["length"], e["depth"], _b(e["present"]), _b(e["zero"]),
               _b(e["data"])))
    if "offset" in e:
        text += ', "offset": %d' % e["offset"]
    text += "}"
    return text + ("" if last else ",\n")


def _b(v: bool) -> str:
    return "true" if v else "false"


def map_entries_mergeable(curr: dict[str, Any], nxt: dict[str, Any]) -> bool:
    """``entry_mergeable``."""
    if curr["length"] == 0:
        return False
    for key in ("zero", "data", "depth", "present"):
        if curr[key] != nxt[key]:
            return False
    if ("filename" in curr) != ("filename" in nxt) or ("offset" in curr) != ("offset" in nxt):
        return False
    if "filename" in curr and curr["filename"] != nxt["filename"]:
        return False
    if "offset" in curr and curr["offset"] + curr["length"] != nxt["offset"]:
        return False
    return True


# ---------------------------------------------------------------------------- measure
def measure_human(info: Any) -> str:
    text = f"required size: {info.required}\nfully allocated size: {info.fully_allocated}\n"
    if info.bitmaps is not None:
        text += f"bitmaps size: {info.bitmaps}\n"
    return text


def measure_json(info: Any) -> str:
    value: dict[str, Any] = {"required": info.required, "fully-allocated": info.fully_allocated}
    if info.bitmaps is not None:
        value["bitmaps"] = info.bitmaps
    return to_json_pretty(value) + "\n"

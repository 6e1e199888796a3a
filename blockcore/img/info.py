"""``blockcore-img info``: ImageInfo of an image (and its backing chain)."""

from __future__ import annotations

from typing import Any

from ..cliutil import CliError
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    LongOpt,
    error_exit,
    img_open,
    out,
    parse_args,
    parse_output,
)
from .output import image_info_json, image_info_list_human

__all__ = ["collect_image_info", "full_backing_filename", "img_info"]


def full_backing_filename(image_filename: str, backing: str) -> str | None:
    """``bdrv_get_full_backing_filename_from_filename``: a relative backing name is relative
    to the directory of the image naming it; None when that cannot be determined."""
    if not backing:
        return None
    if backing.startswith(("/", "json:")) or _has_protocol(backing):
        return backing
    if image_filename.startswith("json:") or _has_protocol(image_filename):
        return None
    head = image_filename.rpartition("/")[0]
    return f"{head}/{backing}" if head or image_filename.startswith("/") else backing


def _has_protocol(name: str) -> bool:
    head, sep, _ = name.partition(":")
    return bool(sep) and "/" not in head and bool(head)


def collect_image_info(bs: Any, filename: str | None = None) -> dict[str, Any]:
    """``bdrv_query_image_info``: an ImageInfo dict, keys in QAPI order."""
    from ..errors import NotSupportedError
    from ..info import bdrv_get_allocated_file_size, bdrv_get_info, bdrv_get_specific_info
    from ..io import bdrv_getlength

    size = bdrv_getlength(bs)
    info: dict[str, Any] = {
        "filename": bs.filename or filename or "",
        "format": bs.drv.name if bs.drv else "",
    }
    bdi = None
    try:
        bdi = bdrv_get_info(bs)
    except NotSupportedError:
        if bs.drv is not None and bs.drv.name in ("raw", "file", "host_device", "host_cdrom"):
            from ..types import BlockDriverInfo

            bdi = BlockDriverInfo()
    except OSError:
        bdi = None
    if bdi is not None:
        info["dirty-flag"] = bool(bdi.is_dirty)
    try:
        actual = bdrv_get_allocated_file_size(bs)
    except OSError:
        actual = -1
    if actual is not None and actual >= 0:
        info["actual-size"] = actual
    info["virtual-size"] = size
    if bdi is not None and bdi.cluster_size:
        info["cluster-size"] = bdi.cluster_size
    if getattr(bs, "encrypted", False):
        info["encrypted"] = True
    backing = getattr(bs, "backing_file", "") or ""
    if backing:
        info["backing-filename"] = backing
        full = full_backing_filename(info["filename"], backing)
        if full is not None:
            info["full-backing-filename"] = full
        if getattr(bs, "backing_format", ""):
            info["backing-filename-format"] = bs.backing_format
    snapshots = _snapshots(bs)
    if snapshots:
        info["snapshots"] = snapshots
    specific = bdrv_get_specific_info(bs)
    if specific:
        info["format-specific"] = specific
    return info


def _snapshots(bs: Any) -> list[dict[str, Any]]:
    """Internal snapshots (``bdrv_snapshot_list``, falling back to the primary child)."""
    from .snapshot import snapshot_list

    try:
        return snapshot_list(bs)
    except OSError:
        return []


def collect_image_info_list(filename: str, fmt: str | None, chain: bool, *,
                            image_opts: bool, force_share: bool) -> list[dict[str, Any]]:
    infos: list[dict[str, Any]] = []
    seen: set[str] = set()
    name: str | None = filename
    while name:
        if name in seen:
            raise CliError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        blk = img_open(name, fmt, OpenFlags.NO_BACKING | OpenFlags.NO_IO,
                       image_opts=image_opts, force_share=force_share)
        try:
            info = collect_image_info(blk.bs, name)
        finally:
            blk.close()
        infos.append(info)
        name, fmt, image_opts = None, None, False
        if chain:
            if "full-backing-filename" in info:
                name = info["full-backing-filename"]
            elif "backing-filename" in info:
                raise CliError("Could not determine absolute backing filename, but backing "
                               f"filename '{info['backing-filename']}' present")
            fmt = info.get("backing-filename-format")
    return infos


def img_info(argv: list[str]) -> int:
    longopts = [HELP, LongOpt("format", 1, "f"), OUTPUT,
                LongOpt("backing-chain", 0, "\x02backing-chain"), OBJECT, IMAGE_OPTS,
                FORCE_SHARE]  # fmt: skip
    a = parse_args(argv, ":f:hU", longopts, {"\x02backing-chain": "chain"}, chain=False)
    if len(a.operands) != 1:
        raise error_exit("Expecting one image file name")
    filename, chain = a.operands[0], a.chain
    output_format = parse_output(a.output)
    infos = collect_image_info_list(filename, a.fmt, chain, image_opts=a.image_opts,
                                    force_share=a.force_share)
    if output_format == "human":
        out(image_info_list_human(infos))
    else:
        out(image_info_json(infos if chain else infos[0]))
    return 0


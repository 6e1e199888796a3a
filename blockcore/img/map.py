"""``blockcore-img map``: where the data of an image lives, layer by layer."""

from __future__ import annotations

import sys
from typing import Any

from ..cliutil import CliError, error_report, strerror
from ..types import BlockStatusFlags as S
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    ImgArgs,
    LongOpt,
    cvtnum,
    error_exit,
    img_open,
    out,
    parse_args,
    parse_output,
)
from .output import map_entries_mergeable, map_entry_human, map_entry_json, map_header_human

__all__ = ["get_block_status", "img_map"]


def get_block_status(bs: Any, offset: int, length: int) -> dict[str, Any]:
    """qemu-img's ``get_block_status``: one MapEntry, resolved down the backing chain."""
    from ..graph import bdrv_cow_bs, bdrv_skip_filters
    from ..status import bdrv_block_status

    depth = 0
    while True:
        bs = bdrv_skip_filters(bs)
        st = bdrv_block_status(bs, offset, length)
        ret, pnum, file = st.ret, st.pnum, st.file
        assert pnum > 0
        length = pnum
        if ret & (S.ZERO | S.DATA):
            break
        nxt = bdrv_cow_bs(bs)
        if nxt is None:
            ret = S.NONE
            break
        bs = nxt
        depth += 1
    entry: dict[str, Any] = {
        "start": offset,
        "length": length,
        "data": bool(ret & S.DATA),
        "zero": bool(ret & S.ZERO),
        "depth": depth,
        "present": bool(ret & S.ALLOCATED),
    }
    if ret & S.OFFSET_VALID:
        entry["offset"] = st.map
        if file is not None:
            entry["filename"] = file.filename
    return entry


def img_map(argv: list[str]) -> int:
    def start_offset(a: ImgArgs, arg: str | None) -> None:
        a.start_offset = cvtnum("start offset", arg or "")

    def max_length(a: ImgArgs, arg: str | None) -> None:
        a.max_length = cvtnum("max length", arg or "")

    longopts = [HELP, LongOpt("format", 1, "f"), OUTPUT, OBJECT, IMAGE_OPTS, FORCE_SHARE,
                LongOpt("start-offset", 1, "s"), LongOpt("max-length", 1, "l")]  # fmt: skip
    a = parse_args(argv, ":f:s:l:hU", longopts, {"s": start_offset, "l": max_length},
                   start_offset=0, max_length=-1)
    if len(a.operands) != 1:
        raise error_exit("Expecting one image file name")
    filename = a.operands[0]
    output_format = parse_output(a.output)
    blk = img_open(filename, a.fmt, OpenFlags.NONE, image_opts=a.image_opts,
                   force_share=a.force_share)
    try:
        return _map(blk, filename, output_format, a.start_offset, a.max_length)
    finally:
        blk.close()


def _dump(output_format: str, e: dict[str, Any], nxt: dict[str, Any] | None) -> None:
    if output_format == "human":
        if e["data"] and "offset" not in e:
            sys.stdout.flush()
            raise CliError("File contains external, encrypted or compressed clusters.")
        out(map_entry_human(e))
        if nxt is not None and (not nxt["data"] or nxt["zero"]):
            nxt["data"] = False
            nxt["zero"] = True
    else:
        out(map_entry_json(e, last=nxt is None))


def _map(blk: Any, filename: str, output_format: str, start_offset: int, max_length: int) -> int:
    from ..io import bdrv_getlength

    if output_format == "human":
        out(map_header_human())
    else:
        out("[")
    try:
        length = bdrv_getlength(blk.bs)
    except OSError:
        raise CliError(f"Failed to get size for '{filename}'") from None
    if max_length != -1:
        length = min(start_offset + max_length, length)
    curr: dict[str, Any] = {"start": start_offset, "length": 0, "data": False, "zero": False,
                            "depth": 0, "present": False}  # fmt: skip
    while curr["start"] + curr["length"] < length:
        offset = curr["start"] + curr["length"]
        try:
            nxt = get_block_status(blk.bs, offset, length - offset)
        except OSError as exc:
            sys.stdout.flush()
            error_report(f"Could not read file metadata: {strerror(exc.errno or 5)}")
            return 1
        if map_entries_mergeable(curr, nxt):
            curr["length"] += nxt["length"]
            continue
        if curr["length"] > 0:
            _dump(output_format, curr, nxt)
        curr = nxt
    _dump(output_format, curr, None)
    if output_format == "json":
        out("]\n")
    return 0

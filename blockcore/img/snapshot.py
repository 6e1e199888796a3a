"""``blockcore-img snapshot``: internal snapshots through the driver's snapshot hooks."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import manage
from ..cliutil import CliError, error_report, parse_opts, strerror
from ..types import OpenFlags
from .common import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    ImgArgs,
    describe_error,
    error_exit,
    img_open,
    out,
    parse_args,
)

__all__ = ["SnapshotRef", "img_snapshot", "load_snapshot_tmp", "snapshot_list"]

def snapshot_list(bs: Any) -> list[dict[str, Any]]:
    from ..manage import bdrv_snapshot_list

    return bdrv_snapshot_list(bs)


def img_snapshot(argv: list[str]) -> int:
    def action(letter: str) -> Callable[[ImgArgs, str | None], None]:
        def take(a: ImgArgs, arg: str | None) -> None:
            if a.action:
                raise error_exit("Cannot mix '-l', '-a', '-c', '-d'")
            a.action, a.name = letter, arg

        return take

    a = parse_args(argv, ":la:c:d:hqU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE],
                   {c: action(c) for c in "lacd"}, action=None, name=None)
    if len(a.operands) != 1:
        raise error_exit("Expecting one image file name")
    flags = OpenFlags.NONE if a.action == "l" else OpenFlags.RDWR
    blk = img_open(a.operands[0], None, flags, image_opts=a.image_opts,
                   force_share=a.force_share)
    try:
        _snapshot(blk.bs, a.action, a.name or "")
    finally:
        blk.close()
    return 0


def _snapshot(bs: Any, action: str | None, name: str) -> None:
    import time

    if action == "l":
        snaps = snapshot_list(bs)
        if snaps:
            from .output import snapshot_header, snapshot_line

            out("Snapshot list:\n" + snapshot_header() + "\n")
            for sn in snaps:
                out(snapshot_line(sn) + "\n")
    elif action == "c":
        now = time.time_ns()
        sn = {"id": "", "name": name, "vm-state-size": 0, "date-sec": now // 1_000_000_000,
              "date-nsec": now // 1000 % 1_000_000 * 1000, "vm-clock-sec": 0,
              "vm-clock-nsec": 0, "icount": 0}
        try:
            manage.bdrv_snapshot_create(bs, sn)
            return
        except OSError as exc:
            err = exc.errno or errno.EIO
        raise CliError(f"Could not create snapshot '{name}': -{err} ({strerror(err)})")
    elif action == "a":
        if bs.dirty_bitmaps:  # bdrv_snapshot_goto refuses before anything else
            raise CliError(f"Could not apply snapshot '{name}': Device has active dirty "
                           "bitmaps")
        if manage.bdrv_find_hook_node(bs, "bdrv_snapshot_goto") is None:
            from ..graph import bdrv_primary_child
            from .common import warn_probed_raw

            if bdrv_primary_child(bs) is not None:
                # QEMU closes and reopens the format around its fallback: raw warns again
                warn_probed_raw(bs, OpenFlags.RDWR)
            raise CliError(f"Could not apply snapshot '{name}': Block driver does not support "
                           "snapshots")
        try:
            manage.bdrv_snapshot_goto(bs, name)
        except OSError as exc:
            raise CliError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                           f"{strerror(exc.errno or 5)}") from None
    elif action == "d":
        found = next((sn for sn in snapshot_list(bs) if sn.get("name") == name), None)
        if found is None or manage.bdrv_find_hook_node(bs, "bdrv_snapshot_delete") is None:
            raise CliError(f"Could not delete snapshot '{name}': snapshot not found")
        try:
            manage.bdrv_snapshot_delete(bs, found.get("id"), name)
        except OSError as exc:
            msg, hint = describe_error(exc)
            raise CliError(f"Could not delete snapshot '{name}': {msg}", hint=hint) from None


# ---------------------------------------------------------------------------- -l of measure
@dataclass(frozen=True)
class SnapshotRef:
    """``-l``: an internal snapshot by ``id`` and/or ``name`` (``snapshot.id=...,
    snapshot.name=...``), or by either (a bare ``-l NAME``: ``id_or_name``)."""

    id: str | None = None
    name: str | None = None
    id_or_name: str | None = None

    @classmethod
    def parse(cls, arg: str) -> SnapshotRef:
        """qemu-img's ``-l`` argument, with its two error lines for an unknown key."""
        if not arg.startswith("snapshot."):
            return cls(id_or_name=arg)
        try:
            opts = parse_opts(arg, warn=True)
        except ValueError:
            opts = {"": ""}
        for key in opts:
            if key not in ("snapshot.id", "snapshot.name"):
                error_report(f"Invalid parameter '{key}'")
                raise CliError(f"Failed in parsing snapshot param '{arg}'")
        return cls(id=opts.get("snapshot.id"), name=opts.get("snapshot.name"))

    def matches(self, sn: dict[str, Any]) -> bool:
        if self.id_or_name is not None:
            return self.id_or_name in (sn.get("id"), sn.get("name"))
        return ((self.id is None or sn.get("id") == self.id)
                and (self.name is None or sn.get("name") == self.name))


def load_snapshot_tmp(bs: Any, ref: SnapshotRef) -> None:
    """``bdrv_snapshot_load_tmp`` (``-l``) or its by-id-or-name form, with qemu-img's
    "Failed to load snapshot: " prefix on errors."""
    try:
        if ref.id_or_name is not None:
            manage.bdrv_snapshot_load_tmp_by_id_or_name(bs, ref.id_or_name)
        else:
            manage.bdrv_snapshot_load_tmp(bs, ref.id, ref.name)
    except OSError as exc:
        raise CliError(f"Failed to load snapshot: {exc.strerror}") from None
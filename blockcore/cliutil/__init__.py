"""Shared pieces of ``blockcore-img`` and ``blockcore-io``: QEMU's command-line conventions.

Everything here is pure (no I/O on images), so it is unit-tested against QEMU 7.2's outputs.
One module per convention, all re-exported here:

- :mod:`.report`: the program's name as invoked, :func:`error_report` (the ``prog: message``
  line), :class:`CliError` (a message and qemu-img's exit status) and :func:`strerror`;
- :mod:`.getopt_long`: :class:`GetoptLong` is glibc's ``getopt_long`` (argument permutation,
  clustered short options, abbreviated long options, the exact ``optind`` movements QEMU's
  messages depend on);
- :mod:`.numbers`: :func:`qemu_strtosz` / :func:`cvtnum` parse sizes as ``qemu_strtosz`` does
  (``1.5k``, ``0x10``, ``4M``), :func:`qemu_strtol` integers;
- :mod:`.units`: :func:`size_to_str` prints sizes as QEMU (``196 KiB``), :func:`cvtstr` as
  qemu-io (``1.996 MiB``, ``512 bytes``); :func:`timestr`, :func:`io_report` and
  :func:`dump_buffer` are qemu-io's timing and dump lines;
- :mod:`.qobject`: :func:`to_json_pretty` prints a value as QEMU's QObject JSON writer, keys in
  QDict's hash order (:func:`qdict_order`), so ``--output=json`` is byte-identical;
- :mod:`.imagename`: :func:`parse_json_filename`, :func:`parse_opts` (``key=value,,escaped``
  with dotted keys) and :func:`flatten`/:func:`crumple` handle QEMU's ways of naming an image;
- :mod:`.progress`: :class:`Progress` is qemu-img's ``    (12.34/100%)`` progress bar, and
  :func:`check_interrupted` stops long operations between requests on Ctrl-C.
"""

from __future__ import annotations

from .getopt_long import GetoptLong, LongOpt
from .imagename import (
    crumple,
    flatten,
    has_help_option,
    is_valid_option_list,
    parse_json_filename,
    parse_opts,
)
from .numbers import c_strtol_prefix, cvtnum, qemu_strtol, qemu_strtosz
from .progress import Progress, check_interrupted, install_sigint_handler
from .qobject import dump_qobject_human, qdict_order, to_json_pretty
from .report import (
    CliError,
    describe_error,
    error_report,
    print_check_messages,
    prog_name,
    run_tool,
    set_prog_name,
    strerror,
    warn_report,
)
from .units import cvtstr, dump_buffer, io_report, size_to_str, timestr

__all__ = [
    "CliError",
    "GetoptLong",
    "LongOpt",
    "Progress",
    "c_strtol_prefix",
    "check_interrupted",
    "crumple",
    "cvtnum",
    "cvtstr",
    "dump_buffer",
    "dump_qobject_human",
    "describe_error",
    "error_report",
    "flatten",
    "has_help_option",
    "install_sigint_handler",
    "io_report",
    "is_valid_option_list",
    "parse_json_filename",
    "parse_opts",
    "print_check_messages",
    "prog_name",
    "qdict_order",
    "qemu_strtol",
    "qemu_strtosz",
    "run_tool",
    "set_prog_name",
    "size_to_str",
    "strerror",
    "timestr",
    "to_json_pretty",
    "warn_report",
]

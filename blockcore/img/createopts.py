"""Creation options (``-o``) as QEMU's QemuOpts handle them for ``create``, ``convert`` and
``measure``: validation by type, the ``Formatting '...'`` line, and ``-o help``."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..cliutil import CliError, parse_opts, qemu_strtosz

__all__ = ["CreateOpts", "amend_option_help", "option_help"]

#: QEMU's declaration order of create options and the defaults it prints
#: (``def_value_str``), per format; ``qemu_opts_print`` walks this list.
QEMU_ORDER: dict[str, list[tuple[str, str | None]]] = {
    "qcow2": [
        ("encryption", None), ("encrypt.format", None), ("cluster_size", "65536"),
        ("extended_l2", "off"), ("preallocation", None), ("compression_type", "zlib"),
        ("size", None), ("compat", None), ("backing_file", None), ("backing_fmt", None),
        ("data_file", None), ("data_file_raw", None), ("encrypt.key-secret", None),
        ("encrypt.cipher-alg", None), ("encrypt.cipher-mode", None),
        ("encrypt.ivgen-alg", None), ("encrypt.ivgen-hash-alg", None),
        ("encrypt.hash-alg", None), ("encrypt.iter-time", None),
        ("lazy_refcounts", "off"), ("refcount_bits", "16"),
    ],
    "raw": [("size", None)],
}  # fmt: skip
#: The file protocol's create options (file-posix), appended after the format's.
FILE_ORDER: list[tuple[str, str | None]] = [
    ("size", None), ("nocow", None), ("preallocation", None), ("extent_size_hint", None)]
FILE_TYPES = {"size": "size", "nocow": "bool", "preallocation": "string",
              "extent_size_hint": "size"}  # fmt: skip
FILE_HELP = {
    "size": "Virtual disk size",
    "nocow": "Turn off copy-on-write (valid only on btrfs)",
    "preallocation": "Preallocation mode (allowed values: off, falloc, full)",
    "extent_size_hint": "Extent size hint for the image file, 0 to disable",
}

#: QEMU's help texts for the options it knows (qemu-img create -o help).
QEMU_HELP = {
    "backing_file": "File name of a base image",
    "backing_fmt": "Image format of the base image",
    "cluster_size": "qcow2 cluster size",
    "compat": "Compatibility level (v2 [0.10] or v3 [1.1])",
    "compression_type": "Compression method used for image cluster compression",
    "data_file": "File name of an external data file",
    "data_file_raw": "The external data file must stay valid as a raw image",
    "encrypt.cipher-alg": "Name of encryption cipher algorithm",
    "encrypt.cipher-mode": "Name of encryption cipher mode",
    "encrypt.format": "Encrypt the image, format choices: 'aes', 'luks'",
    "encrypt.hash-alg": "Name of encryption hash algorithm",
    "encrypt.iter-time": "Time to spend in PBKDF in milliseconds",
    "encrypt.ivgen-alg": "Name of IV generator algorithm",
    "encrypt.ivgen-hash-alg": "Name of IV generator hash algorithm",
    "encrypt.key-secret": "ID of secret providing qcow AES key or LUKS passphrase",
    "encryption": "Encrypt the image with format 'aes'. (Deprecated in favor of "
                  "encrypt.format=aes)",
    "extended_l2": "Extended L2 tables",
    "lazy_refcounts": "Postpone refcount updates",
    "refcount_bits": "Width of a reference count entry in bits",
    "size": "Virtual disk size",
}
QEMU_HELP_BY_FORMAT = {
    ("qcow2", "preallocation"): "Preallocation mode (allowed values: off, metadata, falloc, "
                                "full)",
    ("raw", "preallocation"): "Preallocation mode (allowed values: off, falloc, full)",
    ("file", "preallocation"): "Preallocation mode (allowed values: off, falloc, full)",
}

_TYPE_NAMES = {"string": "str", "bool": "bool (on/off)", "number": "num", "size": "size"}


@dataclass
class _Desc:
    name: str
    type: str
    help: str
    default: str | None
    driver_knows: bool
    protocol_help: str | None = None
    """The help text of a protocol other than ``file`` that declares this option (it wins)."""


def _protocol_opts(filename: str | None
                   ) -> tuple[list[tuple[str, str | None]], dict[str, str], dict[str, str]]:
    """Order, types and help of the create options of the protocol ``filename`` names, which
    QEMU lists after the format's: ``file``'s unless another protocol (a device) has some."""
    if filename is not None:
        from ..drivers import bdrv_find_protocol

        try:
            drv = bdrv_find_protocol(filename)
        except (OSError, ValueError):
            drv = None
        specs = drv.descriptor.create_opts if drv is not None and drv.name != "file" else ()
        if specs:
            return ([(o.name, None) for o in specs], {o.name: o.type for o in specs},
                    {o.name: o.help[:1].upper() + o.help[1:] for o in specs})  # fmt: skip
    return FILE_ORDER, FILE_TYPES, FILE_HELP


class CreateOpts:
    """A QemuOpts over the union of a format's and its protocol's create options (the
    protocol ``filename`` names; ``file`` without one)."""

    def __init__(self, fmt: str, with_protocol: bool = True, filename: str | None = None
                 ) -> None:  # fmt: skip
        from ..drivers import bdrv_find_format

        drv = bdrv_find_format(fmt)
        self.fmt = fmt
        specs = {o.name: o for o in drv.descriptor.create_opts}
        self.driver_opts = set(specs)
        self.can_create = drv.bdrv_co_create_opts is not None  # type: ignore[attr-defined]
        order = list(QEMU_ORDER.get(fmt, [(o.name, None) for o in drv.descriptor.create_opts]))
        proto_order, proto_types, proto_help = _protocol_opts(filename)
        if with_protocol:
            order += proto_order
        own_help = proto_help is not FILE_HELP
        qemu_names = {n for n, _ in QEMU_ORDER.get(fmt, [])}
        descs: list[_Desc] = []
        seen: set[str] = set()
        for name, default in order:
            if name in seen:
                continue
            spec = specs.get(name)
            # the format's own option keeps its text (QEMU appends only new protocol names)
            override = proto_help.get(name) if own_help and with_protocol and \
                name not in qemu_names else None  # fmt: skip
            if spec is not None:
                descs.append(_Desc(name, spec.type, spec.help, default, True, override))
            elif name == "size" or (with_protocol and name in proto_types):
                descs.append(_Desc(name, proto_types.get(name, "size"),
                                   proto_help.get(name, FILE_HELP.get(name, "")), default, False,
                                   override))  # fmt: skip
            else:
                continue  # the driver does not implement it: do not offer it
            seen.add(name)
        for name, spec in specs.items():
            if name not in seen:
                descs.append(_Desc(name, spec.type, spec.help, None, True))
        self.descs = descs
        self.values: dict[str, str] = {}
        self.parsed: dict[str, Any] = {}

    def _desc(self, name: str) -> _Desc | None:
        return next((d for d in self.descs if d.name == name), None)

    def has(self, name: str) -> bool:
        return self._desc(name) is not None

    def get(self, name: str) -> Any:
        return self.parsed.get(name)

    def set(self, name: str, value: str) -> None:
        """``qemu_opt_set``: validates like QEMU; ``CliError`` with its message."""
        desc = self._desc(name)
        if desc is None:
            raise CliError(f"Invalid parameter '{name}'")
        self.parsed[name] = _parse_value(desc, value)
        self.values.pop(name, None)
        self.values[name] = value

    def set_number(self, name: str, value: int) -> None:
        self.values.pop(name, None)
        self.values[name] = str(value)
        self.parsed[name] = value

    def parse(self, text: str) -> None:
        """``qemu_opts_do_parse`` of a ``-o`` list (no implied name)."""
        for name, value in parse_opts(text).items():
            self.set(name, value)

    def formatting_line(self, filename: str) -> str:
        """``Formatting '<file>', fmt=<fmt> k=v ...`` (``qemu_opts_print``)."""
        parts = []
        for d in self.descs:
            if d.name in self.values:
                value = self.values[d.name]
                if d.type == "string":
                    parts.append(f"{d.name}={value.replace(',', ',,')}")
                elif d.type in ("size", "number"):
                    parts.append(f"{d.name}={self.parsed[d.name]}")
                else:
                    parts.append(f"{d.name}={value}")
            elif d.default is not None:
                parts.append(f"{d.name}={d.default}")
        return f"Formatting '{filename}', fmt={self.fmt} " + " ".join(parts) + "\n"

    def driver_options(self) -> dict[str, Any]:
        """The set options the driver's ``bdrv_co_create_opts`` knows (typed values)."""
        return {k: self.parsed[k] for k in self.values if k in self.driver_opts}


def _parse_value(desc: _Desc, value: str) -> Any:
    if desc.type == "size":
        try:
            return qemu_strtosz(value)[0]
        except (ValueError, OverflowError):
            raise CliError(
                f"Parameter '{desc.name}' expects a non-negative number below 2^64",
                hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                     "peta-\nand exabytes, respectively.\n") from None
    if desc.type == "number":
        try:
            return int(value, 0)
        except ValueError:
            raise CliError(f"Parameter '{desc.name}' expects a number") from None
    if desc.type == "bool":
        if value in ("on", "yes", "true"):
            return True
        if value in ("off", "no", "false"):
            return False
        raise CliError(f"Parameter '{desc.name}' expects 'on' or 'off'")
    return value


def _help_line(fmt: str, d: Any) -> str:
    """One option as ``qemu_opts_print_help`` prints it."""
    text = f"  {d.name}=<{_TYPE_NAMES.get(d.type, d.type)}>"
    help_text = (getattr(d, "protocol_help", None) or QEMU_HELP_BY_FORMAT.get((fmt, d.name)) or QEMU_HELP.get(d.name)
                 or FILE_HELP.get(d.name) or d.help)
    return text.ljust(24) + f" - {help_text}" if help_text else text


def amend_option_help(fmt: str, names: Collection[str]) -> str:
    """``print_amend_option_help``: the creation options of ``fmt`` named in ``names`` (those
    amend can change), sorted, in ``option_help``'s layout."""
    opts = CreateOpts(fmt, with_protocol=False)
    lines = [f"Amend options for '{fmt}':"]
    lines += [_help_line(fmt, d) for d in sorted(opts.descs, key=lambda d: d.name)
              if d.name in names]
    return "\n".join(lines) + "\n"


def option_help(fmt: str, filename: str | None) -> str:
    """``print_block_option_help``: the options, sorted, QEMU's column layout."""
    opts = CreateOpts(fmt, with_protocol=filename is not None, filename=filename)
    lines = ["Supported options:" if filename else f"Supported {fmt} options:"]
    lines += [_help_line(fmt, d) for d in sorted(opts.descs, key=lambda d: d.name)]
    text = "\n".join(lines) + "\n"
    if not filename:
        text += ("\nThe protocol level may support further options.\n"
                 "Specify the target filename to include those options.\n")
    return text

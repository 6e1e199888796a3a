"""Driver contract and discovery: validation at registration, stevedore lookup, third-party
packages installed with their own entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import blockcore
from blockcore import DriverContractError, DriverDescriptor, DriverNotFoundError, hookimpl
from blockcore.drivers import bdrv_find_format


def _module(name: str, body: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(textwrap.dedent(body), mod.__dict__)  # noqa: S102 (test drivers)
    return mod


HEAD = """
from blockcore import hookimpl, DriverDescriptor
@hookimpl
def bdrv_describe():
    return DriverDescriptor(format_name="{name}", protocol_name="{name}")
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("@hookimpl\nasync def bdrv_co_readv(bs, offset, length, buf, flags): pass",
         r"hook 'bdrv_co_readv' is not in the driver contract.*did you mean 'bdrv_co_preadv'"),
        ("@hookimpl\nasync def bdrv_co_preadv(bs, off, length, buf, flags): pass",
         r"takes \(bs, off, length, buf, flags\).*exactly the spec's parameters"),
        ("@hookimpl\ndef bdrv_co_preadv(bs, offset, length, buf, flags): pass",
         r"'bdrv_co_preadv' is a plain function.*async def"),
        ("@hookimpl\nasync def bdrv_close(bs): pass",
         r"'bdrv_close' is a coroutine function.*def \(not async\)"),
        ("def bdrv_close(bs): pass", r"'bdrv_close' is not marked.*@hookimpl"),
    ],
)
def test_contract_violations_refused(body: str, message: str) -> None:
    mod = _module("bad_driver", HEAD.format(name="bad") + body)
    with pytest.raises(DriverContractError, match="(?s)" + message) as info:
        blockcore.register_driver(mod)
    assert "driver 'bad'" in str(info.value)


def test_missing_describe_refused() -> None:
    mod = _module("nodesc", "from blockcore import hookimpl\n@hookimpl\ndef bdrv_close(bs): pass")
    with pytest.raises(DriverContractError, match="'bdrv_describe' is missing"):
        blockcore.register_driver(mod)


def test_unknown_driver_lists_installed_and_package_hint(monkeypatch) -> None:
    from blockcore import drivers

    with pytest.raises(DriverNotFoundError, match=r"unknown driver 'nosuch' \(installed drivers"):
        bdrv_find_format("nosuch")
    monkeypatch.setitem(drivers.KNOWN_DISTRIBUTIONS, "vmdk", "blockcore-vmdk")
    with pytest.raises(DriverNotFoundError, match="install the blockcore-vmdk package") as info:
        bdrv_find_format("vmdk")
    assert info.value.errno == 2


THIRD_PARTY_DRIVER = '''
"""A third-party driver: a constant-pattern read-only disk."""
from blockcore import hookimpl, DriverDescriptor, OptionSpec

@hookimpl
def bdrv_describe():
    return DriverDescriptor(format_name="pattern", protocol_name="pattern",
                            runtime_opts=(OptionSpec("size", "size"), OptionSpec("byte", "number")))

@hookimpl
def bdrv_open(bs, options, flags):
    bs.opaque = (int(options.get("size", 1 << 20)), int(options.get("byte", 0xAB)))

@hookimpl
async def bdrv_co_getlength(bs):
    return bs.opaque[0]

@hookimpl
async def bdrv_co_preadv(bs, offset, length, buf, flags):
    buf[:] = bytes([bs.opaque[1]]) * length
'''

BROKEN_DRIVER = "raise ImportError('this driver needs libfoo')\n"


def test_third_party_package_installed_and_used(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bc_pattern").mkdir(parents=True)
    (src / "bc_pattern" / "__init__.py").write_text(THIRD_PARTY_DRIVER)
    (src / "bc_pattern" / "broken.py").write_text(BROKEN_DRIVER)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "bc-pattern"
        version = "1.0"
        [project.entry-points."blockcore.drivers"]
        pattern = "bc_pattern"
        broken = "bc_pattern.broken"
        """))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(src)],
                   check=True, capture_output=True)  # fmt: skip
    script = textwrap.dedent("""
        import blockcore
        from blockcore import BlockBackend
        from blockcore.drivers import bdrv_list_drivers
        with BlockBackend.open("pattern:x", {"size": 4096, "byte": 7}, blockcore.OpenFlags.PROTOCOL) as blk:
            assert blk.pread(10, 3) == bytes([7, 7, 7])
            print("length", blk.getlength(), blk.bs.drv.distribution)
        listing = bdrv_list_drivers()
        print("broken", listing["broken"])
        """)
    env = dict(os.environ, PYTHONPATH=str(target), XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "length 4096 bc-pattern" in out.stdout
    assert "broken failed: bc-pattern: ImportError: this driver needs libfoo" in out.stdout


def test_probe_picks_highest_score(memdrv) -> None:
    hi = _module("probe_hi", HEAD.format(name="probehi").replace(
        'protocol_name="probehi"', 'is_format=True') + "\n@hookimpl\ndef bdrv_probe(buf, filename):\n"
        "    return 50 if buf.startswith(b'HI') else 0\n")  # fmt: skip
    blockcore.register_driver(hi)
    try:
        from blockcore.drivers import bdrv_probe_all

        assert bdrv_probe_all(b"HI there", None).name == "probehi"
        assert bdrv_probe_all(b"nothing", None) is None or \
            bdrv_probe_all(b"nothing", None).name != "probehi"  # fmt: skip
    finally:
        blockcore.unregister_driver("probehi")

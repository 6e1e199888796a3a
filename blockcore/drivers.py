"""Finding, validating and calling drivers.

stevedore finds drivers in the entry-point group ``blockcore.drivers`` (the entry-point name is
the driver name, its value the module or object holding the hook implementations) and imports
only the one asked for; probing imports every installed driver. pluggy validates each driver
against :mod:`blockcore.hookspecs` and runs the 1:N hooks. Per-node calls go through a
:class:`BlockDriver` call table built once per driver: one attribute per hook, ``None`` where
the driver leaves it out, so the hot path pays a direct call and a ``None`` test.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
from typing import Any

import pluggy
import stevedore

from . import hookspecs
from .errors import DriverContractError, DriverNotFoundError
from .tiers import Tier, api, global_state_code
from .types import DriverDescriptor

__all__ = [
    "ENTRY_POINT_GROUP",
    "BlockDriver",
    "bdrv_find_format",
    "bdrv_find_protocol",
    "bdrv_list_drivers",
    "bdrv_probe_all",
    "hookimpl",
    "register_driver",
    "unregister_driver",
]

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker("blockcore")
ENTRY_POINT_GROUP = "blockcore.drivers"

#: Where our own drivers live, to name the package to install when one is missing.
KNOWN_DISTRIBUTIONS = {
    "file": "blockcore-raw",
    "raw": "blockcore-raw",
    "qcow2": "blockcore-qcow2",
    "blkdebug": "blockcore-blkdebug",
    "host_device": "blockcore-host-device",
    "host_cdrom": "blockcore-host-device",
}

HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, fn in vars(hookspecs).items() if name.startswith("bdrv_") and callable(fn)
)
_SPEC_SIGNATURES = {name: inspect.signature(getattr(hookspecs, name)) for name in HOOK_NAMES}
_SPEC_IS_ASYNC = {name: inspect.iscoroutinefunction(getattr(hookspecs, name)) for name in HOOK_NAMES}


class BlockDriver:
    """A driver's call table: ``name``, ``descriptor``, ``plugin`` and one attribute per hook
    of :mod:`blockcore.hookspecs` holding the implementation or ``None``."""

    __slots__ = ("name", "descriptor", "plugin", "distribution", *HOOK_NAMES)

    name: str
    descriptor: DriverDescriptor
    plugin: object
    distribution: str | None

    def __init__(self, name: str, plugin: object, distribution: str | None) -> None:
        self.name = name
        self.plugin = plugin
        self.distribution = distribution
        for hook in HOOK_NAMES:
            setattr(self, hook, None)
        for impl_name, fn in _hookimpls(plugin):
            setattr(self, impl_name, fn)
        self.descriptor = self.bdrv_describe()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:  # only reached for names outside the contract
        raise AttributeError(f"the driver contract has no hook {name!r}")

    def __repr__(self) -> str:
        return f"<BlockDriver {self.name!r} from {self.distribution or 'in-process'}>"


def _hookimpls(plugin: object) -> list[tuple[str, Any]]:
    found = []
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        if callable(fn) and hasattr(fn, "blockcore_impl"):
            found.append((attr, fn))
    return found


def _contract_error(plugin_name: str, plugin: object, hook: str, problem: str, fix: str) -> None:
    raise DriverContractError(
        plugin,
        f"driver {plugin_name!r} ({getattr(plugin, '__name__', type(plugin).__name__)}): "
        f"hook {hook!r} {problem}\n  fix: {fix}",
    )


def _validate(name: str, plugin: object) -> None:
    """Check a driver against the contract; raise DriverContractError naming the fix."""
    impls = dict(_hookimpls(plugin))
    if "bdrv_describe" not in impls:
        _contract_error(
            name, plugin, "bdrv_describe", "is missing",
            "add `@hookimpl def bdrv_describe() -> DriverDescriptor` returning the static facts",
        )  # fmt: skip
    module_name = getattr(plugin, "__name__", None)
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        if (
            attr in _SPEC_SIGNATURES
            and attr not in impls
            and callable(fn)
            and getattr(fn, "__module__", None) == module_name
        ):
            _contract_error(name, plugin, attr, "is not marked", "decorate it with @hookimpl")
    for hook, fn in impls.items():
        if hook not in _SPEC_SIGNATURES:
            close = difflib.get_close_matches(hook, HOOK_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see blockcore.hookspecs"
            _contract_error(name, plugin, hook, "is not in the driver contract", hint)
        spec_params = list(_SPEC_SIGNATURES[hook].parameters)
        impl_params = list(inspect.signature(fn).parameters)
        if impl_params != spec_params:
            _contract_error(
                name, plugin, hook, f"takes ({', '.join(impl_params)})",
                f"use exactly the spec's parameters ({', '.join(spec_params)})",
            )  # fmt: skip
        is_async = inspect.iscoroutinefunction(fn)
        if is_async != _SPEC_IS_ASYNC[hook]:
            want = "async def" if _SPEC_IS_ASYNC[hook] else "def (not async)"
            got = "a coroutine function" if is_async else "a plain function"
            _contract_error(name, plugin, hook, f"is {got}", f"declare it with {want}")


class _Registry:
    """Installed and registered drivers, loaded lazily."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("blockcore")
        self.pm.add_hookspecs(hookspecs)
        self.drivers: dict[str, BlockDriver] = {}
        self.failures: dict[str, str] = {}
        self._all_loaded = False

    def entry_points(self) -> dict[str, Any]:
        """Entry points of the group, by name, without importing anything."""
        mgr = stevedore.NamedExtensionManager(ENTRY_POINT_GROUP, names=[], invoke_on_load=False)
        return {ep.name: ep for ep in mgr.list_entry_points()}

    def _on_failure(self, _mgr: object, ep: Any, exc: BaseException) -> None:
        dist = _distribution_of(ep) or "unknown distribution"
        self.failures[ep.name] = f"{dist}: {type(exc).__name__}: {exc}"
        log.error("blockcore driver %r (%s) failed to load: %s", ep.name, dist, exc)

    def _load(self, names: list[str]) -> None:
        mgr = stevedore.NamedExtensionManager(
            ENTRY_POINT_GROUP,
            names=names,
            invoke_on_load=False,
            on_load_failure_callback=self._on_failure,
            on_missing_entrypoints_callback=lambda _names: None,
        )
        for ext in mgr:
            if ext.name in self.drivers:
                continue
            dist = _distribution_of(ext.entry_point)
            try:
                self.add(ext.name, ext.plugin, dist)
            except DriverContractError as exc:
                self.failures[ext.name] = f"{dist}: {exc}"
                log.error("%s", exc)

    def add(self, name: str, plugin: object, distribution: str | None) -> BlockDriver:
        _validate(name, plugin)
        drv = BlockDriver(name, plugin, distribution)
        if drv.descriptor.format_name != name:
            raise DriverContractError(
                plugin,
                f"driver {name!r}: bdrv_describe() says format_name "
                f"{drv.descriptor.format_name!r}\n  fix: register it under that name",
            )
        self.pm.register(plugin, name=name)
        self.drivers[name] = drv
        return drv

    def get(self, name: str) -> BlockDriver:
        drv = self.drivers.get(name)
        if drv is not None:
            return drv
        self._load([name])
        drv = self.drivers.get(name)
        if drv is not None:
            return drv
        if name in self.failures:
            raise DriverNotFoundError(f"driver {name!r} failed to load ({self.failures[name]})")
        installed = sorted(set(self.entry_points()) | set(self.drivers))
        hint = ""
        if name in KNOWN_DISTRIBUTIONS:
            hint = f"; install the {KNOWN_DISTRIBUTIONS[name]} package for it"
        raise DriverNotFoundError(
            f"unknown driver {name!r}{hint} (installed drivers: {', '.join(installed) or 'none'})"
        )

    def load_all(self) -> list[BlockDriver]:
        if not self._all_loaded:
            self._load(list(self.entry_points()))
            self._all_loaded = True
        return list(self.drivers.values())


def _distribution_of(ep: Any) -> str | None:
    """Name of the distribution that declares entry point ``ep``."""
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return str(dist.name)
    for candidate in importlib.metadata.distributions():
        for other in candidate.entry_points:
            if other.group == ENTRY_POINT_GROUP and other.name == ep.name and \
                    other.value == ep.value:  # fmt: skip
                return str(candidate.metadata["Name"])
    return None


_registry = _Registry()


@api(Tier.GS)
def register_driver(plugin: object, name: str | None = None) -> BlockDriver:
    """Register an in-process driver (tests, embedded drivers) without an entry point. Tier: GS.

    ``name`` defaults to the descriptor's ``format_name``.
    """
    global_state_code("register_driver")
    if name is None:
        describe = dict(_hookimpls(plugin)).get("bdrv_describe")
        name = describe().format_name if describe is not None else repr(plugin)
    if name in _registry.drivers:
        raise DriverContractError(plugin, f"driver {name!r} is already registered")
    return _registry.add(name, plugin, None)


@api(Tier.GS)
def unregister_driver(name: str) -> None:
    """Forget a driver registered with :func:`register_driver`. Tier: GS."""
    global_state_code("unregister_driver")
    drv = _registry.drivers.pop(name)
    _registry.pm.unregister(drv.plugin, name=name)


@api(Tier.GS)
def bdrv_find_format(name: str) -> BlockDriver:
    """Return the driver called ``name``, importing only it. Tier: GS.

    :raises DriverNotFoundError: listing the installed drivers and the package to install.
    """
    global_state_code("bdrv_find_format")
    return _registry.get(name)


@api(Tier.GS)
def bdrv_find_protocol(filename: str) -> BlockDriver | None:
    """Return the protocol driver for ``filename``. Tier: GS.

    ``proto:rest`` selects the driver whose ``protocol_name`` is ``proto``; otherwise the
    best ``bdrv_probe_device`` score wins, and ``None`` means "use ``file``".
    """
    global_state_code("bdrv_find_protocol")
    prefix, sep, _rest = filename.partition(":")
    drivers = _registry.load_all()
    if sep and "/" not in prefix:
        for drv in drivers:
            if drv.descriptor.protocol_name == prefix:
                return drv
    best, best_score = None, 0
    for drv in sorted(drivers, key=lambda d: d.name):
        if drv.bdrv_probe_device is not None:  # type: ignore[attr-defined]
            score = drv.bdrv_probe_device(filename)  # type: ignore[attr-defined]
            if score > best_score:
                best, best_score = drv, score
    return best


@api(Tier.GS)
def bdrv_probe_all(buf: bytes, filename: str | None) -> BlockDriver | None:
    """Ask every installed format driver to score ``buf``; return the best or None. Tier: GS."""
    global_state_code("bdrv_probe_all")
    best, best_score = None, 0
    for drv in sorted(_registry.load_all(), key=lambda d: d.name):
        if drv.descriptor.is_format and drv.bdrv_probe is not None:  # type: ignore[attr-defined]
            score = drv.bdrv_probe(buf, filename)  # type: ignore[attr-defined]
            if score > best_score:
                best, best_score = drv, score
    return best


@api(Tier.GS)
def bdrv_list_drivers() -> dict[str, str | None]:
    """Installed and registered drivers by name, with their distribution (None: in-process),
    and the load error of those that failed. Imports every driver. Tier: GS."""
    global_state_code("bdrv_list_drivers")
    _registry.load_all()
    listing: dict[str, str | None] = {n: d.distribution for n, d in _registry.drivers.items()}
    for name, error in _registry.failures.items():
        listing[name] = f"failed: {error}"
    return dict(sorted(listing.items()))

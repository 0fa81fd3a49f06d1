"""The plugin manager: loads the ``tensorweave`` entry points, collects what they register, lists them; and the
factories that look a plugin up by name (``tw.devices`` and ``tw.communicator``), so that the contracts in
``device.py`` and ``communicator.py`` stay free of the plugin manager.

Rules (documented for users in plugins.md):
- every entry point of group ``tensorweave`` is a plugin; the built-ins (this package's own entry points) always load;
- ``TENSORWEAVE_PLUGINS``, when set, is a comma list of the third-party plugins to load (empty: built-ins only);
  the others are *blocked* and listed as such;
- a plugin that fails to import, implements an unknown hook, or registers something invalid produces a
  warning naming it and is dropped; the others keep working.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ..errors import BackendUnavailableError, CollectiveError, DeviceSpecError, PluginError
from . import hookspecs
from .communicator import Communicator
from .device import MIXED, Backend, Device, DeviceSpec
from .model import Loader, ModelFamily

ENV_SELECT = "TENSORWEAVE_PLUGINS"


@dataclass
class PluginInfo:
    """One discovered entry point and what became of it."""

    name: str
    module: str
    distribution: str
    version: str
    builtin: bool
    status: str = "loaded"  # loaded | blocked | failed
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    communicators: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    loaders: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Registry:
    """Backends, communicators, model families and loaders contributed by the loaded plugins."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.backends: dict[str, Backend] = {}
        self.communicators: dict[str, type[Communicator]] = {}
        self.models: dict[str, ModelFamily] = {}
        self.loaders: dict[str, Loader] = {}

    def load_entry_points(self, group: str = hookspecs.PROJECT) -> None:
        selected = _selected_plugins()
        eps = sorted(md.entry_points(group=group), key=lambda ep: (not _is_builtin(ep), ep.name))
        if not any(_is_builtin(ep) for ep in eps):
            raise PluginError(
                "tensorweave's own entry points were not found: the package is not installed "
                "(run `pip install -e .` in the source tree)"
            )
        for ep in eps:
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.name if dist else "?",
                version=dist.version if dist else "?",
                builtin=_is_builtin(ep),
            )
            self.plugins.append(info)
            if not info.builtin and selected is not None and ep.name not in selected:
                info.status = "blocked"
                self.pm.set_blocked(ep.name)
                continue
            try:
                self._register(info, ep.load())
            except Exception as e:  # a broken plugin must not take the others down
                info.status, info.error = "failed", f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"tensorweave plugin {ep.name!r} ({info.module}) failed to load: {info.error}",
                    stacklevel=2,
                )
        if selected:
            for missing in sorted(selected - {p.name for p in self.plugins}):
                warnings.warn(f"{ENV_SELECT} names plugin {missing!r}, which is not installed", stacklevel=2)

    def _register(self, info: PluginInfo, module: object) -> None:
        self.pm.register(module, name=info.name)
        try:
            self.pm.check_pending()
            info.hooks = sorted(c.name for c in self.pm.get_hookcallers(module) or [])
            # Call this plugin's own implementations (not the whole hook) so that everything registered is
            # attributed to the plugin that registered it, and one plugin's failure is contained to it.
            adders: dict[str, Callable[[PluginInfo, Any], None]] = {
                "tensorweave_register_backends": self._add_backend,
                "tensorweave_register_communicators": self._add_communicator,
                "tensorweave_register_models": self._add_model,
                "tensorweave_register_loaders": self._add_loader,
            }
            for hook, add in adders.items():
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin is module:
                        impl.function(register=functools.partial(add, info))
        except BaseException:
            self.pm.unregister(module)
            for table, names in self._contributions(info):
                for n in names:
                    table.pop(n, None)
                names.clear()
            raise

    def _add_backend(self, info: PluginInfo, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise PluginError(f"register() expects a Backend instance, got {backend!r}")
        _claim(self.backends, backend.name, backend, info, "backend")
        info.backends.append(backend.name)

    def _add_communicator(self, info: PluginInfo, cls: type[Communicator]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Communicator)):
            raise PluginError(f"register() expects a Communicator subclass, got {cls!r}")
        _claim(self.communicators, cls.name, cls, info, "communicator")
        info.communicators.append(cls.name)

    def _add_model(self, info: PluginInfo, family: ModelFamily) -> None:
        if not isinstance(family, ModelFamily):
            raise PluginError(f"register() expects a ModelFamily instance, got {family!r}")
        _claim(self.models, family.name, family, info, "model family")
        info.models.append(family.name)

    def _add_loader(self, info: PluginInfo, loader: Loader) -> None:
        if not isinstance(loader, Loader):
            raise PluginError(f"register() expects a Loader instance, got {loader!r}")
        _claim(self.loaders, loader.name, loader, info, "loader")
        info.loaders.append(loader.name)

    def _contributions(self, info: PluginInfo) -> list[tuple[dict[str, Any], list[str]]]:
        return [
            (self.backends, info.backends),
            (self.communicators, info.communicators),
            (self.models, info.models),
            (self.loaders, info.loaders),
        ]

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise PluginError(
                f"unknown backend {name!r}; registered: {', '.join(sorted(self.backends)) or 'none'}"
            ) from None

    def communicator(self, name: str) -> type[Communicator]:
        try:
            return self.communicators[name]
        except KeyError:
            raise PluginError(
                f"unknown communicator {name!r}; registered: {', '.join(sorted(self.communicators)) or 'none'}"
            ) from None


def _claim(table: dict[str, Any], name: str, value: Any, info: PluginInfo, kind: str) -> None:
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {info.name!r} registered a {kind} without a name")
    if name in table:
        raise PluginError(f"plugin {info.name!r} registered {kind} {name!r}, which another plugin already provides")
    table[name] = value


def _is_builtin(ep: md.EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name.lower() == hookspecs.PROJECT


def _selected_plugins() -> set[str] | None:
    raw = os.environ.get(ENV_SELECT)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


_registry: Registry | None = None
_lock = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    with _lock:
        if _registry is None:
            reg = Registry()
            reg.load_entry_points()
            _registry = reg
        return _registry


def reset() -> None:
    """Forget the loaded plugins so the next registry() call rediscovers them (tests, notebooks)."""
    global _registry
    with _lock:
        _registry = None


def open_devices(spec: str) -> list[Device]:
    """``tw.devices(spec)``: look the backend up among the plugins and let it create the devices.

    ``A+B`` opens a mixed-backend group: each part is one backend's spec, and the group's ranks follow the
    spec's order. Devices of different backends have no peer access to each other, so copies between them go
    through host memory (``tw.communicator`` picks ``peer`` for such groups). Each backend appears once: its
    devices are one group (``cpu-sim:2``, not ``cpu-sim:1+cpu-sim:1``) so they share topology and accounting.
    """
    if isinstance(spec, str) and MIXED in spec:
        parts = [p.strip() for p in spec.split(MIXED)]
        if not all(parts):
            raise DeviceSpecError(
                f"empty part in device spec {spec!r}; join backends' specs with {MIXED!r}, "
                "e.g. cpu-sim:1+array-api-strict:1"
            )
        names = [DeviceSpec.parse(p).backend for p in parts]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DeviceSpecError(
                f"device spec {spec!r} names backend {twice[0]!r} more than once; give it one count (e.g. {twice[0]}:2)"
            )
        return [d for p in parts for d in open_devices(p)]
    parsed = DeviceSpec.parse(spec)
    backend = registry().backend(parsed.backend)
    if not backend.available():
        raise BackendUnavailableError(f"backend {backend.name!r} is not available on this machine")
    return backend.devices(parsed)


def open_communicator(devices: Sequence[Device], name: str | None = None, **options: Any) -> Communicator:
    """``tw.communicator(devices, name=None, **options)``.

    Without a name: the backend's ``default_communicator`` when all devices share a backend, else ``peer`` (the
    vendor-agnostic one), so mixed-backend groups work out of the box.
    """
    devices = list(devices)
    if not devices:
        raise CollectiveError("tw.communicator() needs at least one device")
    if name is None:
        backends = {d.backend.name for d in devices}
        name = devices[0].backend.default_communicator if len(backends) == 1 else "peer"
    return registry().communicator(name)(devices, **options)

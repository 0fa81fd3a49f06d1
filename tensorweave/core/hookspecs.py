"""The plugin hooks. Each hook receives a ``register`` callback; call it once per thing you provide.

Plugins are found through the ``tensorweave`` entry-point group (the built-ins use it too). Every hook here is
documented, with an example, in plugins.md; a test fails when one is missing there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .communicator import Communicator
    from .device import Backend
    from .model import Loader, ModelFamily

PROJECT = "tensorweave"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tensorweave_register_backends(register: Callable[[Backend], None]) -> None:
    """Register device backends.

    ``register(backend)`` takes a Backend *instance*; its ``name`` is the prefix of device specs
    (``tw.devices("NAME:...")``). Constructing it must be cheap and must not touch hardware: probing belongs in
    ``Backend.available()``.
    """


@hookspec
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    """Register communicators.

    ``register(cls)`` takes a Communicator *subclass*; ``cls.name`` is what ``tw.communicator(devs, name=...)``
    selects and ``cls.capabilities`` describes what it can do. tensorweave instantiates it per device group as
    ``cls(devices, **options)``.
    """


@hookspec
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    """Register model architecture families.

    ``register(family)`` takes a ModelFamily *instance*; checkpoints whose config.json ``model_type`` is in
    ``family.hf_model_types`` (or whose GGUF ``general.architecture`` is in ``family.gguf_architectures``) load
    with it. ``family.name`` must be unique.
    """


@hookspec
def tensorweave_register_loaders(register: Callable[[Loader], None]) -> None:
    """Register model file formats.

    ``register(loader)`` takes a Loader *instance*; ``tw.load(path)`` opens ``path`` with the first loader whose
    ``probe(path)`` is true, asking third-party loaders before the built-ins (``hf``, ``gguf``).
    """

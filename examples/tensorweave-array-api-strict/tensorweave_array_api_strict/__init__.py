"""tensorweave-array-api-strict: a tensorweave backend whose devices hold ``array_api_strict`` arrays.

The package is a plugin like any third party would write: it reaches tensorweave only through the public contracts
(``Backend``/``Device``, the op registry's kernel signature, ``tensorweave.errors``) and registers through the
``tensorweave`` entry-point group (see pyproject.toml). ``array_api_strict`` is the array API standard and nothing
more, so running tensorweave's models on it proves the core needs nothing numpy-specific from a backend.

    pip install examples/tensorweave-array-api-strict
    tensorweave plugins                         # lists array-api-strict
    tensorweave devices array-api-strict:2
    python -c "import tensorweave as tw; print(tw.load('tests/fixtures/models/qwen3/hf', devices='array-api-strict:2'))"
"""

from __future__ import annotations

from collections.abc import Callable

import tensorweave as tw
from tensorweave.core.device import Backend

from .backend import StrictArray, StrictBackend, StrictDevice

__all__ = ["StrictArray", "StrictBackend", "StrictDevice"]


@tw.hookimpl
def tensorweave_register_backends(register: Callable[[Backend], None]) -> None:
    register(StrictBackend())

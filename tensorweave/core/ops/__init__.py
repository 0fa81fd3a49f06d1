"""The ops a graph is built from, one module per op family, and the registry they register into.

Each op is a shape/dtype rule, a reference kernel, a sharding rule and its declared attributes (``registry``):
``elementwise`` (element-wise math, softmax, norms, and the helpers the families share), ``linalg`` (matmul,
embedding), ``rope``, ``attention`` (with its KV and ring caches), ``moe`` (routing, expert FFNs) and ``shape``
(views, concat, cast, copy, planner-inserted collectives). A new family (recurrent ops) is a new module imported
below.

Kernels are written against an array namespace ``xp`` (numpy on cpu-sim, cupy on GPUs) with numpy's API, and
write their result into a preallocated ``out`` so the executor's static buffer plan holds. The math helpers
(``sigmoid``, ``softmax``, ``ACTIVATIONS``) and the element-wise, softmax and norm kernels use only the array API
standard, so backends over a strict array-API namespace reuse them and override the rest through
``Backend.kernels`` (see examples/tensorweave-array-api-strict). 16-bit floats compute
in float32 and round once into ``out``; float64 stays float64, which makes the float64 runs the reference for
equivalence tests. View ops (reshape, transpose, slice, shard) return a view of their input instead.

A sharding rule gets the split states of the inputs (see ``sharding``) and returns the states it needs them in
(the planner inserts the conversions: allreduce, allgather or a local slice) and the state of the output.
Ops whose attributes depend on the device's part (reshape targets, slice bounds, vocabulary offsets) give a
``localize`` function. Third parties add ops with ``register(OpDef(...))``, declaring the op's attributes
(``attrs={"eps": REQUIRED, "plus_one": False}``); an op without a rule makes the planner refuse the graph.
"""

from __future__ import annotations

from . import attention, elementwise, linalg, moe, rope, shape  # noqa: F401  (importing a family registers its ops)
from .attention import attention_inputs
from .elementwise import ACTIVATIONS, sigmoid, softmax
from .registry import OPS, REQUIRED, Infer, Localize, Meta, OpDef, Rule, Shape, infer, lookup, register
from .rope import ROPE_SCALING_KEYS, rope_inv_freq

# isort: split
from . import recurrent  # noqa: F401  (Gated DeltaNet: causal conv, gated delta rule, l2 and gated norms)

__all__ = [
    "ACTIVATIONS",
    "OPS",
    "REQUIRED",
    "ROPE_SCALING_KEYS",
    "Infer",
    "Localize",
    "Meta",
    "OpDef",
    "Rule",
    "Shape",
    "attention_inputs",
    "infer",
    "lookup",
    "register",
    "rope_inv_freq",
    "sigmoid",
    "softmax",
]

"""Conformance, weight formats: matmul, embedding and moe_ffn reading weights held as float32, float16, bfloat16 or
GGUF quantization blocks, on the backend against core's reference kernels on the same weights converted to float32.
A format the backend's ``Capabilities.weight_formats`` leaves out is NOT_SUPPORTED (the runtime converts such
weights at load instead)."""

from __future__ import annotations

import numpy as np
import pytest

from ..core import dtypes
from ..core.executor import Executor
from .cases import HELD_OPS, WEIGHT_FORMATS, as_float32, compare, weight_case
from .plugin import Kit, RecordProperty, param_ids

ROWS = [{"op": op, "format": fmt} for op in HELD_OPS for fmt in WEIGHT_FORMATS]


@pytest.mark.parametrize(("op", "fmt"), [(r["op"], r["format"]) for r in ROWS], ids=param_ids(ROWS, lead="op"))
def test_held(kit: Kit, op: str, fmt: str, record_property: RecordProperty) -> None:
    caps, name = kit.backend.capabilities, kit.backend.name
    if fmt not in caps.weight_formats:
        kit.not_supported(f"backend {name} holds no {fmt} weights (Capabilities.weight_formats)")
    g, feeds, held = weight_case(op, fmt, np.random.default_rng(WEIGHT_FORMATS.index(fmt)))
    want = g.evaluate(feeds, {n: as_float32(fmt, a) for n, a in held.items()})["y"]
    ex = Executor(kit.group()[:1], "local")
    ex.load_weights(g, held, formats=dict.fromkeys(held, dtypes.FORMATS[fmt]))
    # a lookup copies values: exact but for the rounding of a scale times a quant; products sum like a matmul
    threshold = kit.threshold("matmul") if op != "embedding" else 1e-12
    value, problem = compare(ex.run(g, feeds)["y"], want, threshold)
    record_property("nmse", value)
    record_property("threshold", threshold)
    if problem:
        raise AssertionError(f"{op} with {fmt} weights: {problem}")

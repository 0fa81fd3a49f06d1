"""Conformance, ops: every registered op x float32/float16/bfloat16 on the backend against the numpy reference
kernels cpu-sim runs, by NMSE per op with NaN/inf positions matched; inputs drawn by hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ..core import dtypes
from ..core.executor import Executor
from ..core.graph import Graph
from ..core.ops import OPS
from ..core.plugins import registry
from .cases import OP_CASES, PLANNER_ONLY, SPECIALS, Dims, compare, random_feeds
from .plugin import Kit, RecordProperty, param_ids

FLOATS = ["float32", "float16", "bfloat16"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    registry()  # plugins may register ops of their own
    rows = [{"op": op, "dtype": dt} for op in sorted(set(OPS) - PLANNER_ONLY) for dt in FLOATS]
    metafunc.parametrize(("op", "dtype"), [(r["op"], r["dtype"]) for r in rows], ids=param_ids(rows, lead="op"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs make NaNs on purpose
def test_op(kit: Kit, op: str, dtype: str, record_property: RecordProperty) -> None:
    caps, name = kit.backend.capabilities, kit.backend.name
    if dtype not in caps.dtypes:
        kit.not_supported(f"backend {name} does not support dtype {dtype}")
    if not caps.supports(op, dtype):
        kit.not_supported(f"backend {name} does not support op {op}")
    if op not in OP_CASES:
        pytest.skip(f"the kit has no case for op {op!r} (registered by a plugin)")
    dev, threshold, worst = kit.group()[0], kit.threshold(op), 0.0

    @kit.settings()
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        nonlocal worst
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        g = Graph(dtype, name=f"op-{op}")
        out, ints = OP_CASES[op](g, Dims(lambda label, options: data.draw(st.sampled_from(options), label=label)), rng)
        g.output("y", out)
        assume(all(caps.supports(n.op, dtypes.name(n.out.dtype)) for n in g.nodes))  # e.g. a cast into bf16
        specials = SPECIALS.get(op, ()) if data.draw(st.booleans(), label="nan/inf inputs") else ()
        scale = data.draw(st.sampled_from([1.0, 0.25, 2.0]), label="scale")
        feeds, weights = random_feeds(g, ints, rng, scale, specials)
        want = g.evaluate(feeds, weights)["y"]
        ex = Executor([dev], "local")
        ex.load_weights(g, weights)
        value, problem = compare(ex.run(g, feeds)["y"], want, threshold)
        worst = max(worst, value)
        if problem:
            raise AssertionError(f"op {op} in {dtype}: {problem}")

    try:
        check()
    finally:
        record_property("nmse", worst)
        record_property("threshold", threshold)

"""A Gated DeltaNet layer's ops (core/ops/recurrent.py; their kernels are checked in test_ops.py) split over devices
by key-head groups, zero-size shards included: a prefill and the steps after it, carrying the conv and SSM states,
equal the same tokens one at a time on one device, with one allreduce."""

from __future__ import annotations

import numpy as np
import pytest

from tensorweave.core.executor import Executor
from tensorweave.core.graph import Graph
from tensorweave.core.sharding import Role


def _delta_layer(tokens: int, nk: int = 3, r: int = 2, dk: int = 4, dv: int = 3, H: int = 12, K: int = 3) -> Graph:
    """A linear-attention core: column-parallel q/k/v/a/b by key-head groups, the conv, the scan, a row-parallel out."""
    g = Graph("float32", name=f"delta-{tokens}")
    x = g.input("x", (tokens, H), "float32")
    nv = nk * r

    def col(name: str, rows: int) -> object:
        return g.linear(x, g.weight(name, (rows, H), Role.COLUMN, groups=nk))

    conv_w = g.weight("conv", (nk * dk, K), Role.COLUMN, groups=nk)
    conv_s = g.cache("conv_state", (K - 1, nk * dk), "state", axis=1, groups=nk)
    q = g.reshape(g.conv1d_causal(col("wq", nk * dk), conv_w, conv_s), shape=(tokens, nk, dk))  # type: ignore[arg-type]
    k = g.reshape(col("wk", nk * dk), shape=(tokens, nk, dk))  # type: ignore[arg-type]
    v = g.reshape(col("wv", nv * dv), shape=(tokens, nv, dv))  # type: ignore[arg-type]
    decay = g.scale(g.softplus(col("wa", nv)), scale=-1.0)  # type: ignore[arg-type]
    beta = g.sigmoid(col("wb", nv))  # type: ignore[arg-type]
    state = g.cache("ssm_state", (nv, dk, dv), "state", axis=0, groups=nk)
    y = g.gated_delta_rule(g.l2_norm(q), g.l2_norm(k), v, decay, beta, state, scale=dk**-0.5)
    g.output("y", g.linear(g.reshape(y, shape=(tokens, nv * dv)), g.weight("wo", (H, nv * dv), Role.ROW, groups=nk)))
    return g


@pytest.mark.parametrize("split", [[1], [2, 1], [2, 1, 1], [1, 1, 1, 1, 1]])
def test_split_by_key_heads_equals_one_device_and_prefill_equals_steps(split: list[int]) -> None:
    """3 key heads over up to 5 devices (two hold none); 5 tokens at once, then 1 and 2, equal 8 one at a time."""
    rng = np.random.default_rng(3)
    whole = _delta_layer(5)
    weights = {n: rng.standard_normal(t.shape).astype(np.float32) * 0.5 for n, t in whole.weights.items()}
    xs = rng.standard_normal((8, 12)).astype(np.float32)
    caches: dict[str, np.ndarray] = {}
    want = np.concatenate([_delta_layer(1).evaluate({"x": xs[i : i + 1]}, weights, caches)["y"] for i in range(8)])
    ex = Executor(f"cpu-sim:{len(split)}", tensor_split=split)
    ex.load_weights(whole, weights)
    got = [ex.run(_delta_layer(n), {"x": xs[a : a + n]})["y"] for a, n in ((0, 5), (5, 1), (6, 2))]
    np.testing.assert_allclose(np.concatenate(got), want, rtol=2e-4, atol=2e-5)
    plan = ex.plan(_delta_layer(1))
    assert plan.count("allreduce") == (len(split) > 1) and plan.count("allgather") == 0

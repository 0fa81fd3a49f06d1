"""The Gated DeltaNet ops (core/ops/recurrent.py) against numpy float64 written from the definitions, one token and
one head at a time; split over devices by key-head groups (zero-size shards included), a prefill equals the same
tokens one by one, and the states carry across steps."""

from __future__ import annotations

import numpy as np
import pytest

from tensorweave.core.executor import Executor
from tensorweave.core.graph import Graph
from tensorweave.core.sharding import Role


def conv_reference(x: np.ndarray, w: np.ndarray, state: np.ndarray, silu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per channel c: y[t] = sum_j w[c, j] * u[t + j] over u = the previous kernel - 1 inputs, then x."""
    u = np.concatenate([state, x]).astype(np.float64)
    kernel = w.shape[1]
    y = np.zeros(x.shape)
    for c in range(x.shape[1]):
        for t in range(x.shape[0]):
            y[t, c] = sum(w[c, j] * u[t + j, c] for j in range(kernel))
    if silu:
        y = y / (1 + np.exp(-y))
    return y, u[x.shape[0] :]


def gdr_reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, s0: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The gated delta rule of Qwen3-Next one value head at a time; value head h reads key head h // (nv / nk)."""
    nk, nv = q.shape[1], v.shape[1]
    s = s0.astype(np.float64).copy()
    out = np.zeros(v.shape)
    for h in range(nv):
        kh = h // (nv // nk)
        for t in range(q.shape[0]):
            s[h] *= np.exp(g[t, h])
            kt = k[t, kh].astype(np.float64)
            err = v[t, h] - kt @ s[h]  # what the memory predicts for this key, vs the value
            s[h] += np.outer(kt, beta[t, h] * err)
            out[t, h] = (scale * q[t, kh]) @ s[h]
    return out, s


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + 1e-6)


def test_conv1d_causal_matches_the_definition_and_carries_its_state() -> None:
    rng = np.random.default_rng(0)
    C, K, steps = 5, 4, (6, 1, 2)
    g = Graph("float64")
    state = g.cache("s", (K - 1, C), "state", axis=1)
    w = g.input("w", (C, K), "float64")
    xs = [g.input(f"x{i}", (t, C), "float64") for i, t in enumerate(steps)]
    for i, x in enumerate(xs):
        g.output(f"y{i}", g.conv1d_causal(x, w, state))
    feeds = {"w": rng.standard_normal((C, K)), **{f"x{i}": rng.standard_normal((t, C)) for i, t in enumerate(steps)}}
    caches: dict[str, np.ndarray] = {}
    got = g.evaluate(feeds, {}, caches)
    s = np.zeros((K - 1, C))
    for i in range(len(steps)):
        want, s = conv_reference(feeds[f"x{i}"], feeds["w"], s, silu=True)
        np.testing.assert_allclose(got[f"y{i}"], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(caches["s"], s, rtol=1e-12)


def test_gated_delta_rule_matches_the_definition_per_head() -> None:
    rng = np.random.default_rng(1)
    T, nk, r, dk, dv = 5, 2, 3, 4, 3
    nv = nk * r
    g = Graph("float64")
    state = g.cache("s", (nv, dk, dv), "state", axis=0, groups=nk)
    ins = {
        n: g.input(n, shape, "float64")
        for n, shape in (("q", (T, nk, dk)), ("k", (T, nk, dk)), ("v", (T, nv, dv)), ("g", (T, nv)), ("b", (T, nv)))
    }
    g.output(
        "y",
        g.gated_delta_rule(g.l2_norm(ins["q"]), g.l2_norm(ins["k"]), ins["v"], ins["g"], ins["b"], state, scale=0.5),
    )
    feeds = {n: rng.standard_normal(t.shape) for n, t in ins.items()}
    feeds["g"] = -np.abs(feeds["g"])
    feeds["b"] = 1 / (1 + np.exp(-feeds["b"]))
    s0 = rng.standard_normal((nv, dk, dv))
    caches = {"s": s0.copy()}
    got = g.evaluate(feeds, {}, caches)["y"]
    want, s = gdr_reference(l2(feeds["q"]), l2(feeds["k"]), feeds["v"], feeds["g"], feeds["b"], s0, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(caches["s"], s, rtol=1e-10, atol=1e-12)


def test_rms_norm_gated_is_norm_times_weight_times_silu_gate() -> None:
    rng = np.random.default_rng(2)
    g = Graph("float64")
    x, z, w = g.input("x", (3, 2, 8), "float64"), g.input("z", (3, 2, 8), "float64"), g.input("w", (8,), "float64")
    g.output("y", g.rms_norm_gated(x, z, w, eps=1e-6))
    f = {"x": rng.standard_normal((3, 2, 8)), "z": rng.standard_normal((3, 2, 8)), "w": rng.standard_normal(8)}
    want = f["x"] / np.sqrt((f["x"] ** 2).mean(-1, keepdims=True) + 1e-6) * f["w"] * f["z"] / (1 + np.exp(-f["z"]))
    np.testing.assert_allclose(g.evaluate(f, {})["y"], want, rtol=1e-12)


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

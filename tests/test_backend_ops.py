"""Every op through the executor on each backend against Graph.evaluate (numpy), and the synthetic transformer
split over several logical devices of one backend. cpu-sim always runs; the CUDA cases are marked `gpu` and skip
cleanly without a GPU (run them with `python -m pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.core.executor import Executor
from tensorweave.core.graph import Graph, GraphCache, Tensor
from tensorweave.core.ops import OPS
from tensorweave.core.plugins import registry
from tensorweave.core.sharding import Role
from tensorweave.models.synthetic import Config, build, random_weights

CUDA = registry().backend("cuda").available()
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU (and CuPy) on this machine")]
ONE_DEVICE = ["cpu-sim:1", pytest.param("cuda:0", marks=on_gpu)]
GROUPS = [("cpu-sim:3", None), pytest.param("cuda:0,0,0", "peer", marks=on_gpu)]

F = "float32"
Case = Callable[[Graph], Tensor]


def x(g: Graph, name: str, *shape: int) -> Tensor:
    return g.input(name, shape, F)


def routed(g: Graph) -> Tensor:
    h = x(g, "h", 3, 8)
    route = g.topk_route(x(g, "logits", 3, 4), k=2)
    gate, up, down = x(g, "gate", 4, 5, 8), x(g, "up", 4, 5, 8), x(g, "down", 4, 8, 5)
    return g.moe_ffn(h, route, gate, up, down, act="gelu")


def cached_attention(g: Graph) -> Tensor:
    pos = g.input("pos", (3,), "int32")
    cache = (g.cache("kc", (8, 2, 8), groups=2), g.cache("vc", (8, 2, 8), groups=2))
    sinks = g.weight("sinks", (4,), Role.COLUMN, groups=2)
    q, k, v = x(g, "q", 3, 4, 8), x(g, "k", 3, 2, 8), x(g, "v", 3, 2, 8)
    return g.attention(q, k, v, pos, scale=0.3, cache=cache, sinks=sinks, window=2, softcap=5.0)


CASES: dict[str, Case] = {
    "add": lambda g: x(g, "a", 3, 8) + x(g, "b", 8),
    "mul": lambda g: x(g, "a", 3, 8) * x(g, "b", 3, 1),
    "scale": lambda g: g.scale(x(g, "a", 3, 8), scale=0.5),
    "silu": lambda g: g.silu(x(g, "a", 3, 8)),
    "gelu": lambda g: g.gelu(x(g, "a", 3, 8)),
    "sigmoid": lambda g: g.sigmoid(x(g, "a", 3, 8)),
    "softplus": lambda g: g.softplus(x(g, "a", 3, 8)),
    "tanh_softcap": lambda g: g.tanh_softcap(x(g, "a", 3, 8), cap=1.5),
    "softmax": lambda g: g.softmax(x(g, "a", 3, 8), axis=0),
    "swiglu": lambda g: g.swiglu(x(g, "a", 3, 8), x(g, "b", 3, 8)),
    "geglu": lambda g: g.geglu(x(g, "a", 3, 8), x(g, "b", 3, 8)),
    "cast": lambda g: g.cast(x(g, "a", 3, 8), dtype="float16"),
    "copy": lambda g: g.copy(g.transpose(x(g, "a", 3, 8), perm=(1, 0))),
    "matmul": lambda g: g.matmul(x(g, "a", 3, 8), x(g, "w", 5, 8)),
    "embedding": lambda g: g.embedding(g.input("ids", (4,), "int32"), x(g, "table", 10, 8)),
    "rms_norm": lambda g: g.rms_norm(x(g, "a", 3, 8), x(g, "w", 8), eps=1e-5, plus_one=True),
    "layer_norm": lambda g: g.layer_norm(x(g, "a", 3, 8), x(g, "w", 8), x(g, "b", 8), eps=1e-5),
    "rope": lambda g: g.rope(x(g, "a", 3, 2, 8), g.input("pos", (3,), "int32"), theta=100.0, neox=False, n_rot=4),
    "attention": cached_attention,
    "topk_route": lambda g: g.topk_route(x(g, "logits", 3, 6), k=2, norm=False, gating="sigmoid"),
    "moe_ffn": routed,
    "reshape": lambda g: g.reshape(x(g, "a", 3, 8), shape=(6, 4)),
    "transpose": lambda g: g.transpose(x(g, "a", 3, 2, 4), perm=(2, 0, 1)),
    "slice": lambda g: g.slice(x(g, "a", 3, 8), axis=1, start=2, stop=7),
    "concat": lambda g: g.concat(x(g, "a", 3, 2), x(g, "b", 3, 5), axis=1),
}
PLANNER_ONLY = {"allreduce", "allgather", "shard"}  # inserted by the planner; run by every sharded case below


def test_every_op_has_a_backend_case() -> None:
    assert set(OPS) - PLANNER_ONLY == set(CASES)


def feeds_for(g: Graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, t in g.inputs.items():
        if t.dtype == np.dtype(np.int32):
            out[name] = np.arange(t.shape[0], dtype=np.int32) % 3 if name == "ids" else np.arange(t.shape[0]) + 2
        else:
            out[name] = rng.standard_normal(t.shape).astype(t.dtype)
    return out


@pytest.mark.parametrize("spec", ONE_DEVICE)
@pytest.mark.parametrize("op", sorted(CASES))
def test_op_on_the_backend_matches_numpy(spec: str, op: str) -> None:
    g = Graph(F, name=op)
    g.output("y", CASES[op](g))
    rng = np.random.default_rng(0)
    feeds = feeds_for(g, rng)
    weights = {n: rng.standard_normal(t.shape).astype(t.dtype) for n, t in g.weights.items()}
    want = g.evaluate(feeds, weights)["y"]
    ex = Executor(spec)
    ex.load_weights(g, weights)
    got = ex.run(g, feeds)["y"]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(("spec", "communicator"), GROUPS)
def test_synthetic_transformer_split_over_logical_devices(spec: str, communicator: str | None) -> None:
    cfg = Config(n_layer=2, n_head=6, n_kv=3, head_dim=8, n_expert=4, dense_layers=(0,), sinks=True, window=4)
    graphs = GraphCache(lambda tokens: build(cfg, tokens))
    weights = random_weights(graphs(tokens=4), 0)
    devs = tw.devices(spec)
    ex = Executor(devs, communicator, tensor_split=[2, 1, 1])
    ex.load_weights(graphs(tokens=4), weights)
    caches: dict[str, np.ndarray] = {}
    for start, n in ((0, 4), (4, 1), (5, 1)):
        feeds = {"tokens": np.arange(start, start + n) % cfg.vocab, "positions": np.arange(start, start + n)}
        want = graphs(tokens=n).evaluate(feeds, weights, caches)["logits"].astype(np.float64)
        got = ex.run(graphs(tokens=n), feeds)["logits"].astype(np.float64)
        assert ((got - want) ** 2).sum() / (want**2).sum() <= 1e-6

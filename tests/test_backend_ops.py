"""Every op through the executor on each backend against Graph.evaluate (numpy), with the conformance kit's op
cases at fixed sizes (the kit draws them with hypothesis), and the synthetic transformer split over several logical
devices of one backend. cpu-sim always runs; the CUDA cases are marked `gpu` and skip
cleanly without a GPU (run them with `python -m pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.conformance.cases import OP_CASES, PLANNER_ONLY, Dims, nmse, random_feeds
from tensorweave.core.executor import Executor
from tensorweave.core.graph import Graph, GraphCache
from tensorweave.core.ops import OPS
from tensorweave.core.plugins import registry
from tensorweave.models.synthetic import Config, build, random_weights

CUDA = registry().backend("cuda").available()
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU (and CuPy) on this machine")]
ONE_DEVICE = ["cpu-sim:1", pytest.param("cuda:0", marks=on_gpu)]
GROUPS = [("cpu-sim:3", None), pytest.param("cuda:0,0,0", "peer", marks=on_gpu)]

F = "float32"


def test_every_op_has_a_backend_case() -> None:
    assert set(OPS) - PLANNER_ONLY == set(OP_CASES)


@pytest.mark.parametrize("spec", ONE_DEVICE)
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_op_on_the_backend_matches_numpy(spec: str, op: str) -> None:
    g = Graph(F, name=op)
    rng = np.random.default_rng(0)
    out, ints = OP_CASES[op](g, Dims(), rng)  # the kit's case at its largest sizes, every switch on
    g.output("y", out)
    feeds, weights = random_feeds(g, ints, rng)
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
        assert nmse(got, want) <= 1e-6


def test_sync_free_device_paths_match_the_host_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels read no device array from the host on GPUs (ops.elementwise.on_host): attention over the whole
    cache with the tail masked, the ring index from an array, the vocabulary-split lookup by where(). Forced here on
    numpy, the synthetic model (rings that wrap, sinks, MoE, split vocabulary) still equals the host paths' result."""
    from tensorweave.core.ops import attention, linalg

    cfg = Config(
        n_layer=2, n_head=6, n_kv=3, head_dim=8, n_expert=4, dense_layers=(0,), sinks=True, window=4, window_layers=(1,)
    )
    graphs = GraphCache(lambda tokens: build(cfg, tokens))
    weights = random_weights(graphs(tokens=4), 0)
    steps = ((0, 4), (4, 1), (5, 3), (8, 1))
    caches: dict[str, np.ndarray] = {}
    want = []
    for start, n in steps:
        feeds = {"tokens": np.arange(start, start + n) % cfg.vocab, "positions": np.arange(start, start + n)}
        want.append(graphs(tokens=n).evaluate(feeds, weights, caches)["logits"].astype(np.float64))
    asked: list[str] = []
    for module in (attention, linalg):
        monkeypatch.setattr(module, "on_host", lambda a, m=module.__name__: asked.append(m) is not None)
    ex = Executor("cpu-sim:3", tensor_split=[2, 1, 1])
    ex.load_weights(graphs(tokens=4), weights)
    for (start, n), w in zip(steps, want, strict=True):
        feeds = {"tokens": np.arange(start, start + n) % cfg.vocab, "positions": np.arange(start, start + n)}
        assert nmse(ex.run(graphs(tokens=n), feeds)["logits"].astype(np.float64), w) <= 1e-6
    assert {attention.__name__, linalg.__name__} <= set(asked)

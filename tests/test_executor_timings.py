"""``Executor.timings``: every run and every collective is counted, and the seconds add up sensibly."""

from __future__ import annotations

import numpy as np
import pytest

from tensorweave.core.executor import Executor
from tensorweave.core.graph import GraphCache
from tensorweave.models.synthetic import Config, build, random_weights

CFG = Config(vocab=40, hidden=16, n_layer=2, n_head=4, n_kv=2, head_dim=4, ffn=12, n_expert=3, dense_layers=(0,))


@pytest.mark.parametrize(("spec", "split"), [("cpu-sim:1", None), ("cpu-sim:3", [2, 1, 1])])
def test_timings_count_each_run_and_its_plans_collectives(spec: str, split: list[float] | None) -> None:
    graphs = GraphCache(lambda tokens: build(CFG, tokens))
    ex = Executor(spec, tensor_split=split)
    ex.load_weights(graphs(tokens=3), random_weights(graphs(tokens=3), seed=0))
    steps = [3, 1, 1]
    start = 0
    for n in steps:
        ex.run(graphs(tokens=n), {"tokens": np.arange(n) % CFG.vocab, "positions": np.arange(start, start + n)})
        start += n
    t = ex.timings
    per_run = [len(ex.plan(graphs(tokens=n)).collectives) for n in steps]
    assert t.runs == len(steps)
    assert t.collectives == sum(per_run)
    assert (per_run[0] > 0) == (spec != "cpu-sim:1")  # a split run has collectives, one device has none
    assert 0.0 <= t.collective_seconds <= t.run_seconds
    assert t.run_seconds > 0.0
    t.reset()
    assert (t.runs, t.run_seconds, t.collectives, t.collective_seconds) == (0, 0.0, 0, 0.0)

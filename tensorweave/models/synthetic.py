"""A synthetic transformer: every knob the planner must handle, with random weights, no files.

Not a published architecture: it throws head counts, KV-head counts, head dims, dense and MoE blocks, sliding
windows, softcaps, sinks and biases (all switches of ``blocks.Config``) at the planner and executor (property
tests), measures the executor (benchmarks/executor.py), and shows a tensor-parallel run without downloading
anything (``tensorweave demo``).
"""

from __future__ import annotations

import numpy as np

from tensorweave.core.graph import Graph
from tensorweave.models.blocks import Config
from tensorweave.models.llama import build

__all__ = ["Config", "build", "random_weights"]


def random_weights(g: Graph, seed: int) -> dict[str, np.ndarray]:
    """Weights of a well-conditioned random model: norm weights near 1, projections scaled by fan-in."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in g.weights.items():
        if t.ndim == 1 and "norm" in name:
            a = 1.0 + 0.1 * rng.standard_normal(t.shape)
        elif t.ndim == 1:
            a = 0.1 * rng.standard_normal(t.shape)
        else:
            a = rng.standard_normal(t.shape) / np.sqrt(t.shape[-1])
        out[name] = a.astype(t.dtype)
    return out

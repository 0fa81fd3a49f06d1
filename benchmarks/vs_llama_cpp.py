"""tensorweave against llama.cpp (llama-cpp-python) on the same GGUF files and threads: pp and tg by weight format.

    pip install 'tensorweave[bench]'   # llama-cpp-python (builds llama.cpp; not part of the test extra)
    python benchmarks/vs_llama_cpp.py [--prompt 64] [--gen 32] [--runs 5] [--threads 2]
                                      [--formats F32 F16 Q8_0 Q4_K_M] [--dir /tmp/tw-weights-bench] [--json]

The files are ``benchmarks/weights.py``'s (its ``write_files``: the 125M llama-like model, random weights, as F32,
F16, Q8_0 and a Q4_K_M-like GGUF, written once and reused). Those files carry no vocabulary, and llama.cpp refuses
a model without ``tokenizer.ggml.*``; so each is copied once to ``<dir>/with-vocab/`` with a placeholder
SentencePiece vocabulary of the model's 32000 tokens added (tensor data and every other key copied unchanged), and
both engines load that copy. Per format, with --threads for both (llama.cpp's ``n_threads`` and
``n_threads_batch``; tensorweave's ``cpu-sim:1,threads=N``), a round measures llama-bench's pp (a --prompt token
prompt in one eval, last logits only) and tg (--gen tokens one eval each from an empty context) in each engine:
tensorweave through ``runtime.bench.bench(model, prompt, gen, repetitions=1, seed=round)``, llama.cpp through
``llama_cpp.Llama.eval``/``reset`` mirroring it (the same random token ids, each test after the same one-run
warm-up). Engines and formats alternate within a round (the engine order flips every round) so that drift from
other jobs on the machine hits both alike; a warm-up round comes first; the table has the medians over --runs
rounds and the ratio tensorweave / llama.cpp.

llama.cpp runs in a process of its own (spawned, talking over a pipe): both engines use OpenMP through the same
libgomp, which reads OMP_WAIT_POLICY once. tensorweave's kernels set PASSIVE (spinning OpenMP threads starve its
BLAS and device threads), which costs llama.cpp's decode ~30% here (Q8_0 tg 140-150 -> 80-110 t/s); in its own
process llama.cpp runs with the user's setting, as llama-bench would. The engines pause --pause seconds between
tests so neither is timed while the other's thread pools still spin.

Agreement: the last-position logits of a short random prompt (8 tokens) from both engines, per format (max
|difference|, and relative to the largest |logit|), as benchmarked (llama.cpp's default float16 KV cache). F32 is
the check, also against a llama.cpp context with a float32 KV cache, where both run the same float32 math on the
same file (a relative difference above 1e-4 is reported on stderr); with F16 and Q8_0 weights llama.cpp also rounds
the activations to F16 / Q8_0 for its dot products, so those differ more. The Q4_K_M-like file has random block
bytes: right for speed, meaningless as a model.

Measured on the 2-core development machine (AMD EPYC Zen 3, AVX2 + F16C), llama-cpp-python 0.3.36 (vendored
llama.cpp: ggml 0.25.3, commit 0c1e570; OpenMP, REPACK), numba 0.68 on TBB, default arguments (--threads 2),
--runs 5, on a quiet moment, with tensorweave's quantized kernels taking offsets from the activations' group sums,
decoding K-quant scales in vector lanes and cutting nibbles after widening (the runs before are kept below):

    file    llama.cpp pp64  tensorweave pp64  pp64 x  llama.cpp tg32  tensorweave tg32  tg32 x  max |dlogit|  rel
    F32     691.1           668.7             0.97    75.4            67.8              0.90    3.4e-03       8.7e-04
    F16     802.0           595.0             0.74    124.4           95.0              0.76    5.4e-03       1.4e-03
    Q8_0    680.4           551.7             0.81    194.6           119.2             0.61    1.4e-01       3.5e-02
    Q4_K_M  796.6           500.9             0.63    246.4           111.6             0.45    9.1e-02       1.2e-02

--threads 1 --runs 3: tg32 x 0.91 / 0.88 / 0.77 / 0.52, pp64 x 1.16 / 0.87 / 1.06 / 0.79 (llama.cpp tg 47 / 75 /
117 / 151 t/s). llama.cpp's own ratios between formats bound what float32 activations can reach here: its F16
decode is 1.65x its F32 (2 threads), its prompts 1.16x (F16), 0.98x (Q8_0) and 1.15x (Q4_K_M) its F32.
Before that kernel work (TBB, --runs 3): tg32 x 0.82 / 0.72 / 0.60 / 0.35, pp64 x 0.81 / 0.78 / 0.71 / 0.64.
With the IR kernels scaling every value, on OpenMP: tg32 x 0.83 / 0.74 / 0.56 / 0.30, pp64 x 0.99 / 0.63 / 0.80 / 0.76.
Before the IR kernels (--runs 5): tg32 x 0.78 / 0.58 / 0.35 / 0.15 and pp64 x 0.91 / 0.69 / 0.61 / 0.55. The aim of
issue 14, >= 0.5x llama.cpp at F32, F16 and Q8_0, holds for prompts and decode; Q4_K_M decode is at 0.45x (0.52x on one
thread). llama.cpp quantizes the activations and uses integer dot products (and repacks the Q4_K matrices as q4_K_8x8;
Q8_0 is used as stored), while tensorweave keeps activations float32 and converts every weight to float32 in registers.
F32 logits agree to 8.7e-4 of the largest logit with llama.cpp's float16 KV cache and to 7.3e-6 absolute with a float32
one: both engines read the file alike (Q/K row order, rope, norms). Q8_0's 3.5e-2 is llama.cpp's Q8_0 rounding of the
activations, of the size of the weights' own rounding (Q8_0 against F32: 4.2e-2 in tensorweave, 5.6e-2 in llama.cpp).

On a loaded machine (other jobs taking a core) both engines' two-thread runs collapse at random moments (llama.cpp
tg 3-40 t/s in single rounds, tensorweave's F32 pp through OpenBLAS 55 t/s), so medians of few rounds there are
noise: prefer a quiet machine, more --runs, or --threads 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# benchmarks/ is no package: run as a script, its folder is on sys.path and the sibling imports as `weights`.
from weights import CONFIG, write_files

import tensorweave as tw
from tensorweave.format import table
from tensorweave.loaders.tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    write_gguf_vocab,
)
from tensorweave.runtime.bench import bench

FORMATS = ("F32", "F16", "Q8_0", "Q4_K_M")
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # before tensorweave's kernels set theirs
INSTALL = "vs_llama_cpp.py needs llama-cpp-python: pip install 'tensorweave[bench]'"
CHECK_TOLERANCE = 1e-4  # F32, float32 KV: max |difference| / max |logit| above this is reported as a disagreement


# --- the files -----------------------------------------------------------------------------------------------


def placeholder_vocab(n: int) -> dict[str, Any]:
    """A SentencePiece-style vocabulary of ``n`` tokens llama.cpp accepts (unk, bos, eos, the 256 byte tokens,
    then distinct placeholder pieces). The benchmark feeds token ids; nothing is tokenized."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    pieces = [f"\u2581w{i}" for i in range(n - len(tokens))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens + pieces,
        "tokenizer.ggml.scores": [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types + [TOKEN_NORMAL] * len(pieces),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }


def with_vocab(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` with ``placeholder_vocab`` added (written once; reused while newer than ``src``)."""
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    print(f"writing {dst}", file=sys.stderr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst) + ".part", reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":  # the writer adds these itself
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    write_gguf_vocab(writer, placeholder_vocab(CONFIG["vocab_size"]))
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(dst) + ".part", dst)
    return dst


# --- llama.cpp, in a process of its own ----------------------------------------------------------------------


def llama_worker(
    conn: Connection, paths: dict[str, str], threads: int, n_ctx: int, n_batch: int, omp_wait_policy: str | None
) -> None:
    """Serve ("pp" | "tg" | "logits" | "logits_f32_kv", format, token ids) requests on ``conn`` with one
    ``llama_cpp.Llama`` per file until None arrives. pp and tg mirror ``runtime.bench``: one untimed warm-up (the
    whole prompt; one token), then the timed run from an empty context; the answer is seconds. "logits": the last
    position's logits ("logits_f32_kv": from a context with a float32 KV cache)."""
    if omp_wait_policy is None:  # libgomp reads it when llama_cpp loads it: the user's, not tensorweave's
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
    try:
        import llama_cpp
    except ImportError as e:
        conn.send(("error", f"{INSTALL} ({e})"))
        return
    try:
        import ctypes

        from llama_cpp import _ggml

        commit = _ggml.libggml.ggml_commit
        commit.restype = ctypes.c_char_p
        ggml = commit().decode()
    except Exception:  # an older build without ggml_commit
        ggml = "?"
    llms = {
        label: llama_cpp.Llama(
            path,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            verbose=False,
        )
        for label, path in paths.items()
    }
    info = {
        "llama_cpp_python": llama_cpp.__version__,
        "ggml_commit": ggml,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    conn.send(("ready", info))

    def run(llm: Any, kind: str, ids: list[int]) -> float:
        llm.reset()
        t0 = time.perf_counter()
        if kind == "pp":
            llm.eval(ids)
        else:
            for t in ids:
                llm.eval([t])
        llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - t0

    while (msg := conn.recv()) is not None:
        kind, label, ids = msg
        llm = llms[label]
        if kind == "logits_f32_kv":  # a second context of the file with the KV cache in float32, as tensorweave's
            kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
            llm = llama_cpp.Llama(paths[label], n_threads=threads, n_ctx=n_ctx, verbose=False, **kv)
        if kind.startswith("logits"):
            llm.reset()
            llm.eval(ids)
            row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            conn.send(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy())
        else:
            run(llm, kind, ids if kind == "pp" else ids[:1])  # warm-up, as runtime.bench
            conn.send(run(llm, kind, ids))


class LlamaCpp:
    """The parent's handle on ``llama_worker``."""

    def __init__(self, paths: dict[str, Path], threads: int, n_ctx: int, n_batch: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, {k: str(p) for k, p in paths.items()}, threads, n_ctx, n_batch, USER_OMP_WAIT_POLICY)
        self.proc = ctx.Process(target=llama_worker, args=args, daemon=True)
        self.proc.start()
        child.close()

    def ready(self) -> dict[str, Any]:
        try:
            status, info = self.conn.recv()
        except EOFError:
            sys.exit("llama.cpp's worker process died while loading the models")
        if status == "error":
            sys.exit(info)
        return dict(info)

    def seconds(self, kind: str, label: str, ids: np.ndarray) -> float:
        self.conn.send((kind, label, ids.tolist()))
        return float(self.conn.recv())

    def logits(self, label: str, ids: np.ndarray, f32_kv: bool = False) -> np.ndarray:
        self.conn.send(("logits_f32_kv" if f32_kv else "logits", label, ids.tolist()))
        return np.asarray(self.conn.recv())

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


# --- the benchmark -------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of each engine (the same for both)")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tw-weights-bench"))
    ap.add_argument("--pause", type=float, default=0.25, help="seconds between tests (thread pools go idle)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.prompt < 1 or args.gen < 1 or args.runs < 1 or args.threads < 1:
        ap.error("--prompt, --gen, --runs and --threads must be at least 1")
    # Only looked up here: importing llama_cpp would load libgomp in this process with the wrong OMP_WAIT_POLICY
    # for tensorweave's kernels (llama_worker imports it, and says so if that fails).
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit(INSTALL)

    written = write_files(args.dir)
    paths = {k: with_vocab(written[k], args.dir / "with-vocab" / written[k].name) for k in args.formats}
    ctx = max(args.prompt, args.gen)
    llama = LlamaCpp(paths, args.threads, ctx, max(args.prompt, 512))  # the prompt in one batch, as llama-bench
    models = {k: tw.load(p, f"cpu-sim:1,threads={args.threads}", ctx=ctx, progress=False) for k, p in paths.items()}
    info = llama.ready()

    # Agreement on the model: the last position's logits of a short prompt, same ids, per format.
    check_ids = np.random.default_rng(1234).integers(0, CONFIG["vocab_size"], 8)
    # F32 is the check, also against llama.cpp with a float32 KV cache (its default float16 one rounds K and V).
    agree: dict[str, tuple[float, float]] = {}
    checks = [(k, k, False) for k in models] + ([("F32 f32 KV", "F32", True)] if "F32" in models else [])
    for k, label, f32_kv in checks:
        ours = models[label].logits(check_ids)[-1]
        theirs = llama.logits(label, check_ids, f32_kv=f32_kv)
        diff = float(np.max(np.abs(ours - theirs)))
        agree[k] = (diff, diff / float(np.max(np.abs(theirs))))

    n = {"pp": args.prompt, "tg": args.gen}
    tps: dict[str, dict[str, dict[str, list[float]]]] = {
        k: {e: {"pp": [], "tg": []} for e in ("llama.cpp", "tensorweave")} for k in models
    }
    for r in range(-1, args.runs):  # round -1 is the warm-up: traces, plans, compiles and pages in, not recorded
        seed = max(r, 0)
        for k, m in models.items():
            engines = ["tensorweave", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "tensorweave"]
            for e in engines:
                time.sleep(args.pause)
                if e == "tensorweave":
                    res = bench(m, args.prompt, args.gen, repetitions=1, seed=seed)
                    got = {"pp": res.tests[0].tps_mean, "tg": res.tests[1].tps_mean}
                else:  # the ids runtime.bench draws with this seed: the prompt, then the decode tokens
                    rng = np.random.default_rng(seed)
                    ids = {"pp": rng.integers(0, m.vocab, args.prompt), "tg": rng.integers(0, m.vocab, args.gen)}
                    got = {t: n[t] / llama.seconds(t, k, ids[t]) for t in ("pp", "tg")}
                if r >= 0:
                    for t in ("pp", "tg"):
                        tps[k][e][t].append(got[t])
        print("warm-up done" if r < 0 else f"round {r + 1}/{args.runs} done", file=sys.stderr)
    llama.close()

    med = {k: {e: {t: statistics.median(v) for t, v in d.items()} for e, d in per.items()} for k, per in tps.items()}
    load = os.getloadavg()
    meta = {
        "threads": args.threads,
        "prompt": args.prompt,
        "gen": args.gen,
        "runs": args.runs,
        "load_average": load,
        "llama.cpp": info,
        "tensorweave_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if args.json:
        out = {
            k: {
                "tps": tps[k],
                "median": med[k],
                "pp_ratio": med[k]["tensorweave"]["pp"] / med[k]["llama.cpp"]["pp"],
                "tg_ratio": med[k]["tensorweave"]["tg"] / med[k]["llama.cpp"]["tg"],
                "logits_max_abs_diff": agree[k][0],
                "logits_rel_diff": agree[k][1],
            }
            for k in models
        }
        check = {k: {"max_abs_diff": d, "rel_diff": rel} for k, (d, rel) in agree.items()}
        print(json.dumps({"meta": meta, "formats": out, "logits": check}, indent=2))
    else:
        pp, tg = f"pp{args.prompt}", f"tg{args.gen}"
        headers = [
            "file",
            f"llama.cpp {pp}",
            f"tensorweave {pp}",
            f"{pp} x",
            f"llama.cpp {tg}",
            f"tensorweave {tg}",
            f"{tg} x",
            "max |dlogit|",
            "rel",
        ]
        rows = []
        for k in models:
            lc, ours = med[k]["llama.cpp"], med[k]["tensorweave"]
            rows.append(
                [
                    k,
                    f"{lc['pp']:.1f}",
                    f"{ours['pp']:.1f}",
                    f"{ours['pp'] / lc['pp']:.2f}",
                    f"{lc['tg']:.1f}",
                    f"{ours['tg']:.1f}",
                    f"{ours['tg'] / lc['tg']:.2f}",
                    f"{agree[k][0]:.1e}",
                    f"{agree[k][1]:.1e}",
                ]
            )
        print(
            f"llama-cpp-python {info['llama_cpp_python']} (ggml {info['ggml_commit']}), {args.threads} threads each, "
            f"t/s medians of {args.runs} rounds, x = tensorweave / llama.cpp; load average {load[0]:.2f} at the end"
        )
        print(table(headers, rows))
        if "F32 f32 KV" in agree:
            d, rel = agree["F32 f32 KV"]
            print(f"F32 logits against llama.cpp with a float32 KV cache: max |dlogit| {d:.1e} (rel {rel:.1e})")
    if "F32 f32 KV" in agree and agree["F32 f32 KV"][1] > CHECK_TOLERANCE:
        d, rel = agree["F32 f32 KV"]
        print(f"F32 logits disagree: max |difference| {d:.3g} ({rel:.2g} of the largest logit)", file=sys.stderr)


if __name__ == "__main__":
    main()

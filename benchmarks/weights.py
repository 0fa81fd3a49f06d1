"""Weights as stored: decode and prefill speed by weight format, and device memory against file size.

    python benchmarks/weights.py [--prompt 64] [--gen 32] [--runs 5] [--dir /tmp/tw-weights-bench] [--json]

The llama-like model of ../shared/REFERENCES.md (hidden 768, 12 layers, 12 heads / 4 KV heads, ffn 2048, vocab
32000, untied, 124.7M parameters, random weights) is written once per format: F32, F16 and Q8_0 GGUF (quantized by
``gguf.quants``), a BF16 Hugging Face checkpoint (most published checkpoints), and a Q4_K_M-like GGUF: Q4_K
matrices with Q6_K for attn_v, ffn_down and the LM head, as llama.cpp's Q4_K_M mix does (random blocks with sane
scales, as ``gguf`` cannot quantize K-quants: right for speed and memory, meaningless as a model). Each file loads
on one cpu-sim device as stored (activations float32); a round runs llama-bench's pp (a --prompt token prompt,
last logits only) and tg (--gen tokens one per step from an empty context) on every format in turn, so drift
from other jobs on the machine hits all formats alike; the table has the medians over --runs rounds after a
warm-up, and ratios against F32 measured in the same rounds. Memory: the bytes the devices hold after loading
(``memory_info().used``, summed over devices) over the file's size, at TP 1 and at TP 3 split 3,2,1.

Measured on the 2-core development machine (AMD EPYC, Zen 3, AVX2 + F16C), quiet, numba 0.68 on TBB, ratios from
the same rounds. --threads 2 --runs 5:

    file    held as        pp64 t/s  tg32 t/s  pp x F32  tg x F32  MiB held
    ------  -------------  --------  --------  --------  --------  --------
    F32     f32            663.7     56.8      1.00      1.00      476
    F16     f16+f32        615.1     90.9      0.93      1.60      238
    BF16    bf16+f32       577.0     86.2      0.87      1.52      238
    Q8_0    q8_0+f32       604.0     122.0     0.91      2.15      126
    Q4_K_M  q4_k+q6_k+f32  541.5     110.9     0.82      1.95      78

--threads 1 --runs 3: F32 409.4 / 40.7 t/s; pp x 0.94 / 0.97 / 1.02 / 0.96 and tg x 1.70 / 1.81 / 2.41 / 1.95 for
F16 / BF16 / Q8_0 / Q4_K_M. One core streams about 16 GB/s here, float32 BLAS and the 16-bit kernels alike, and a
decode step spends 1-2 ms outside its matmuls, so F16 cannot reach 2x F32 (at most ~1.85x; llama.cpp's own F16
decode is 1.65x its F32 here); Q8_0's kernel is bound by converting int8 to float32 in registers (~14 G values/s
per core), not by memory. Before the kernels took offsets from group sums, decoded K-quant scales in vector
lanes, nibbles cut after widening): Q4_K_M tg x 1.39 at 2 threads, 1.35 at 1.

    held / file size: 1.00 for every file, and 1.00 for Q4_K_M split 3,2,1 over three devices (78.4 / 78.2 MiB).

On a loaded machine two-thread runs are mostly noise (OpenBLAS's spinning pool collapses); use --threads 1 there.
Decode keeps activations float32 (no 8-bit rounding of activations, unlike llama.cpp): the quantized formats'
kernels are row dot products in LLVM vector IR, the 16-bit ones numba loops (F16C's vcvtph2ps). Prompts convert a
chunk of rows at a time (compiled for every format) and multiply with BLAS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

import tensorweave as tw
from tensorweave.core.plugins import registry
from tensorweave.format import table
from tensorweave.loaders.safetensors_io import save_pretrained
from tensorweave.models.synthetic import random_weights
from tensorweave.runtime.bench import bench

CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "intermediate_size": 2048,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
}
Q6_K_IN_Q4_K_M = ("attn_v", "ffn_down", "output")  # llama.cpp's Q4_K_M keeps these (or half of them) in Q6_K


def random_k_blocks(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K rows with float16 scales set so the values come out ~N(0, 1/fan_in)-sized."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(3e-4 if qtype == Q.Q4_K else 5e-5).tobytes(), np.uint8)
    for at in (0, 2) if qtype == Q.Q4_K else (size - 2,):
        raw[:, at : at + 2] = scale
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def write_gguf(path: Path, weights: dict[str, np.ndarray], kind: str) -> None:
    """The model as a GGUF of ``kind``: "f32", "f16", "q8_0" or "q4_k_m" (1-D tensors F32, as llama.cpp)."""
    cfg = CONFIG
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [
        (w.add_block_count, cfg["num_hidden_layers"]),
        (w.add_embedding_length, cfg["hidden_size"]),
        (w.add_head_count, cfg["num_attention_heads"]),
        (w.add_head_count_kv, cfg["num_key_value_heads"]),
        (w.add_feed_forward_length, cfg["intermediate_size"]),
        (w.add_context_length, cfg["max_position_embeddings"]),
        (w.add_vocab_size, cfg["vocab_size"]),
    ]:
        add(v)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rng = np.random.default_rng(1)
    for name, a in weights.items():
        if a.ndim == 1 or kind == "f32":
            w.add_tensor(name + ".weight", a.astype(np.float32))
        elif kind == "f16":
            w.add_tensor(name + ".weight", a.astype(np.float16))
        elif kind == "q8_0":
            w.add_tensor(name + ".weight", gguf.quants.quantize(a.astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            qtype = Q.Q6_K if name.split(".")[-1] in Q6_K_IN_Q4_K_M else Q.Q4_K
            w.add_tensor(name + ".weight", random_k_blocks(a.shape, qtype, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_files(d: Path) -> dict[str, Path]:
    """Every format's file under ``d`` (written once; reused when present)."""
    paths = {
        "F32": d / "model-f32.gguf",
        "F16": d / "model-f16.gguf",
        "BF16": d / "hf-bf16",
        "Q8_0": d / "model-q8_0.gguf",
        "Q4_K_M": d / "model-q4_k_m.gguf",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    fam = registry().models["llama"]
    weights = random_weights(fam.build(fam.config_from_hf(CONFIG), 1), seed=0)
    for label, kind in (("F32", "f32"), ("F16", "f16"), ("Q8_0", "q8_0"), ("Q4_K_M", "q4_k_m")):
        print(f"writing {paths[label].name}", file=sys.stderr)
        write_gguf(paths[label], weights, kind)
    bf16 = {n: a.astype(tw.core.dtypes.bfloat16) for n, a in weights.items()}
    save_pretrained(paths["BF16"], {**CONFIG, "torch_dtype": "bfloat16"}, bf16)
    return paths


def file_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


def held_bytes(model: tw.Model) -> int:
    """Bytes the model's devices hold after loading (weights; caches come with the first run)."""
    return sum(d.memory_info().used for d in model.executor.devices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tw-weights-bench"))
    ap.add_argument("--threads", type=int, default=0, help="BLAS and kernel threads (0: every core)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = write_files(args.dir)
    ctx = max(args.prompt, args.gen)
    spec = f"cpu-sim:1,threads={args.threads}" if args.threads else "cpu-sim"
    models = {label: tw.load(p, spec, ctx=ctx, progress=False) for label, p in paths.items()}
    memory = {label: [held_bytes(m), file_bytes(paths[label])] for label, m in models.items()}
    split = tw.load(paths["Q4_K_M"], "cpu-sim:3", tensor_split=[3, 2, 1], ctx=ctx, progress=False)
    memory["Q4_K_M TP3 3,2,1"] = [held_bytes(split), file_bytes(paths["Q4_K_M"])]
    del split
    pp: dict[str, list[float]] = {k: [] for k in models}
    tg: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up: traces, plans, compiles the kernels
        bench(m, args.prompt, args.gen, repetitions=1)
    for r in range(args.runs):
        for label, m in models.items():
            res = bench(m, args.prompt, args.gen, repetitions=1, seed=r)
            pp[label].append(res.tests[0].tps_mean)
            tg[label].append(res.tests[1].tps_mean)
        print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
    med = {k: (statistics.median(pp[k]), statistics.median(tg[k])) for k in models}
    base_pp, base_tg = med["F32"]
    rows, out = [], {}
    for label, m in models.items():
        p, t = med[label]
        fmt = "+".join(sorted({f.name for f in m.formats.values()}, key=lambda f: f == "f32"))
        rows.append(
            [
                label,
                fmt,
                f"{p:.1f}",
                f"{t:.1f}",
                f"{p / base_pp:.2f}",
                f"{t / base_tg:.2f}",
                f"{memory[label][0] / 2**20:.0f}",
            ]
        )
        out[label] = {
            "formats": fmt,
            "pp_tps": pp[label],
            "tg_tps": tg[label],
            "pp_x_f32": p / base_pp,
            "tg_x_f32": t / base_tg,
        }
    mem_rows = [[k, f"{h / 2**20:.1f}", f"{f / 2**20:.1f}", f"{h / f:.2f}"] for k, (h, f) in memory.items()]
    if args.json:
        print(json.dumps({"speed": out, "memory": memory}, indent=2))
        return
    print(
        table(
            ["file", "held as", f"pp{args.prompt} t/s", f"tg{args.gen} t/s", "pp x F32", "tg x F32", "MiB held"], rows
        )
    )
    print()
    print(table(["file", "MiB held on devices", "MiB file", "held / file"], mem_rows))


if __name__ == "__main__":
    main()

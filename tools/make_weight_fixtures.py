"""Make the fixtures of weights held as stored (tests/test_weight_formats.py), beside the model fixtures.

For each fixture model named (default ``llama`` and ``qwen3``, made by tools/make_fixtures.py first)::

    tests/fixtures/models/<name>/weights/
        model-mixed.gguf   model-q8_0.gguf's tensors with attention and the LM head re-stored as F16 (what Q8_0
                           dequantizes to, rounded): a file mixing Q8_0, F16 and F32 (norms) tensors
        hf-bf16/, hf-f16/  config.json + model.safetensors: the hf/ checkpoint with every tensor rounded to bfloat16
                           / float16, the way most published checkpoints are stored
        expected.npz       tokens, and transformers' float32 logits (eager attention, no cache) on exactly the weights
                           each file holds: logits_mixed, logits_bf16, logits_f16

So a test of a held format sees only tensorweave's error, not the rounding's. Needs the ``fixtures`` extra (torch,
transformers); reuses make_fixtures.py's converters. Rerun after regenerating the model fixtures::

    python tools/make_weight_fixtures.py [--only llama]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from safetensors.numpy import load_file
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import make_fixtures as mf

F16_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "output.weight")


def write_mixed(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """``src`` (a Q8_0 GGUF) re-written with F16_TENSORS as F16; returns every tensor as the new file holds it."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    held: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        if t.name.endswith(F16_TENSORS):
            writer.add_tensor(t.name, values.astype(np.float16))
            held[t.name] = values.astype(np.float16).astype(np.float32)
        elif t.tensor_type == GGMLQuantizationType.Q8_0:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=GGMLQuantizationType.Q8_0)
            held[t.name] = values
        else:
            writer.add_tensor(t.name, values)
            held[t.name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kinds = {t.tensor_type.name for t in GGUFReader(dst).tensors}
    if kinds != {"F32", "F16", "Q8_0"}:
        raise RuntimeError(f"{dst}: tensor types {kinds}, want F32, F16 and Q8_0")
    return held


def logits_of(
    tensors: dict[str, np.ndarray], config: Path, tokens: np.ndarray, directory: Path, dtype: str
) -> np.ndarray:
    """Save ``tensors`` (HF names) in ``dtype`` with ``config`` into ``directory``; transformers' float32 logits."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(config.read_text())
    cfg["dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(
        {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in tensors.items()}, directory / "model.safetensors"
    )
    return mf.forward_logits(mf.load_hf(directory), tokens)


def make(name: str, root: Path) -> None:
    base, out = root / name, root / name / "weights"
    out.mkdir(exist_ok=True)
    hp = mf.HParams(json.loads((base / "hf" / "config.json").read_text()))
    fx = next(mf.iter_fixtures(name))
    tokens = np.load(base / "expected.npz")["tokens"]
    held = write_mixed(base / "model-q8_0.gguf", out / "model-mixed.gguf")
    results = {"tokens": tokens}
    scratch = out / ".scratch"
    results["logits_mixed"] = logits_of(
        mf.gguf_to_hf_tensors(held, hp, fx.gguf_arch), base / "hf" / "config.json", tokens, scratch, "float32"
    )
    hf = load_file(base / "hf" / "model.safetensors")
    for dtype in ("bfloat16", "float16"):
        d = out / f"hf-{'bf16' if dtype == 'bfloat16' else 'f16'}"
        rounded = {k: torch.from_numpy(v).to(getattr(torch, dtype)).float().numpy() for k, v in hf.items()}
        results[f"logits_{d.name[3:]}"] = logits_of(rounded, base / "hf" / "config.json", tokens, d, dtype)
    for p in scratch.iterdir():
        p.unlink()
    scratch.rmdir()
    mf.save_npz(
        out / "expected.npz", {k: v.astype(np.int32 if k == "tokens" else np.float32) for k, v in results.items()}
    )
    spread = {
        k: float(np.abs(v - np.load(base / "expected.npz")["logits"]).max())
        for k, v in results.items()
        if k != "tokens"
    }
    print(f"{name}: max |logits - f32 logits| {spread}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=mf.DEFAULT_OUT, help="fixture root (default: %(default)s)")
    parser.add_argument("--only", default="llama,qwen3", help="comma-separated fixture names")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.only.split(","):
        make(name, args.out)


if __name__ == "__main__":
    main()

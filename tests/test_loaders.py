"""Loaders against real files written here: safetensors (by hand, no ``safetensors`` package) and GGUF (``gguf``).

Every layout is checked end to end: the weights come from ``random_weights`` on the family's graph, are written in
the format under test (Hugging Face names, shards, tied heads, fused experts, llama.cpp's permuted Q/K rows,
quantized blocks), loaded with ``tw.load`` on one device and on three uneven ones, and the logits are compared with
``Graph.evaluate`` (the numpy reference) on the same weights. Corrupt files must fail with one ``TensorweaveError``
naming the file (and tensor); a big model must load on four devices without any whole tensor in one array.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

import tensorweave as tw
from tensorweave.core import dtypes
from tensorweave.core.plugins import registry
from tensorweave.errors import ModelFormatError, TensorweaveError, UnsupportedError
from tensorweave.loaders.gguf import GGUFCheckpoint
from tensorweave.loaders.hf import HFCheckpoint
from tensorweave.models.synthetic import random_weights

Q = gguf.GGMLQuantizationType
TOL = 1e-4
IDS = np.array([3, 17, 0, 42, 9, 9, 31, 5, 48, 1, 22, 7], np.int32)  # positions 0..11: rope matters
SPLITS = [pytest.param(("cpu-sim", None), id="tp1"), pytest.param(("cpu-sim:3", [2, 1, 1]), id="tp3-211")]

# --- Hugging Face config.json dicts ------------------------------------------------------------------------------

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 50,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# llama3 scaling that changes this model: head_dim 8, theta 1e4 -> wavelengths 6, 63, 628, 6283 vs 64 / 4 = 16 and 64
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
QWEN3 = {
    **LLAMA,
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "head_dim": 16,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
QWEN3_MOE = {
    **QWEN3,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_hidden_layers": 3,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "mlp_only_layers": [1],  # layer 1 dense, layers 0 and 2 sparse
    "decoder_sparse_step": 1,
}
MIXTRAL = {
    **LLAMA,
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "intermediate_size": 32,
}


def family_of(cfg_json: dict[str, Any]) -> Any:
    return registry().models[cfg_json["model_type"]]


def config_and_weights(cfg_json: dict[str, Any], seed: int = 0) -> tuple[Any, Any, dict[str, np.ndarray]]:
    fam = family_of(cfg_json)
    config = fam.config_from_hf(cfg_json)
    return fam, config, random_weights(fam.build(config, 1), seed)


def reference(fam: Any, config: Any, weights: dict[str, np.ndarray], ids: np.ndarray = IDS) -> np.ndarray:
    """Logits of ``ids`` from a fresh context by the unsharded numpy reference, in float32."""
    g = fam.build(replace(config, dtype="float32"), len(ids))
    w = {n: np.asarray(a, np.float32) for n, a in weights.items()}
    feeds = {"tokens": np.asarray(ids, np.int32), "positions": np.arange(len(ids), dtype=np.int32)}
    caches = {n: np.zeros(t.shape, t.dtype) for n, t in g.caches.items()}
    return g.evaluate(feeds, w, caches)["logits"]


def check_logits(path: Path, want: np.ndarray, split: tuple[str, list[int] | None], **kw: Any) -> tw.Model:
    devices, tensor_split = split
    model = tw.load(path, devices=devices, tensor_split=tensor_split, **kw)
    got = model.logits(IDS)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err < TOL, f"{path.name} on {devices}: max abs error {err} vs the reference"
    return model


# --- safetensors, written by hand ----------------------------------------------------------------------------------

ST_NAMES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    dtypes.bfloat16: "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int32): "I32",
}


@dataclass
class Streamed:
    """A tensor written chunk by chunk (so the test never holds a big one whole)."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]


def write_safetensors(path: Path, tensors: dict[str, Any], header_extra: dict[str, Any] | None = None) -> Path:
    """8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw little-endian data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in tensors.items():
        dt, shape = (a.dtype, a.shape) if isinstance(a, Streamed) else (ST_NAMES[a.dtype], a.shape)
        n = math.prod(shape) * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4}[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header.update(header_extra or {})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            for chunk in a.chunks() if isinstance(a, Streamed) else [a]:
                np.ascontiguousarray(chunk).tofile(f)
    return path


# graph name -> Hugging Face name (written out here, not derived from the loader's own table)
HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "ffn_gate_inp": "mlp.gate.weight",
}
HF_GLOBAL = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight", "output": "lm_head.weight"}


def to_hf(weights: dict[str, np.ndarray], experts: str = "per-expert") -> dict[str, np.ndarray]:
    """Graph-named weights -> Hugging Face-named tensors; MoE experts one tensor per expert or fused."""
    out: dict[str, np.ndarray] = {}
    for name, a in weights.items():
        if name in HF_GLOBAL:
            out[HF_GLOBAL[name]] = a
            continue
        _, il, short = name.split(".", 2)
        p = f"model.layers.{il}."
        if short.endswith("_exps"):
            which = short.removeprefix("ffn_").removesuffix("_exps")
            if experts == "per-expert":
                for e in range(a.shape[0]):
                    out[f"{p}mlp.experts.{e}.{which}_proj.weight"] = a[e]
            elif which == "gate":
                out[f"{p}mlp.experts.gate_up_proj"] = np.concatenate([a, weights[f"blk.{il}.ffn_up_exps"]], axis=1)
            elif which == "down":
                out[f"{p}mlp.experts.down_proj"] = a
            continue
        out[p + HF_LAYER[short]] = a
    return out


def write_hf(
    d: Path,
    cfg_json: dict[str, Any],
    tensors: dict[str, np.ndarray],
    shards: int = 1,
    index_extra: dict[str, str] | None = None,
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg_json))
    if shards == 1:
        write_safetensors(d / "model.safetensors", tensors)
        return d
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        write_safetensors(d / file, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, file))
    weight_map.update(index_extra or {})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


# --- GGUF -----------------------------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (works on quantized byte rows as well)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    arch: str,
    config: Any,
    weights: dict[str, np.ndarray],
    qtype: Q = Q.F32,
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip_meta: tuple[str, ...] = (),
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``weights`` (graph names) as a GGUF of ``arch``; matrices in ``qtype``, 1-D tensors F32. Returns the
    weights as the file holds them (dequantized / rounded), for the reference."""
    w = gguf.GGUFWriter(str(path), arch)
    meta: dict[str, Callable[[], None]] = {
        "block_count": lambda: w.add_block_count(config.n_layer),
        "embedding_length": lambda: w.add_embedding_length(config.hidden),
        "attention.head_count": lambda: w.add_head_count(config.n_head),
        "attention.head_count_kv": lambda: w.add_head_count_kv(config.n_kv),
        "attention.key_length": lambda: w.add_key_length(config.head_dim),
        "attention.value_length": lambda: w.add_value_length(config.head_dim),
        "feed_forward_length": lambda: w.add_feed_forward_length(config.ffn),
        "context_length": lambda: w.add_context_length(config.ctx),
        "rope.freq_base": lambda: w.add_rope_freq_base(config.rope_theta),
        "attention.layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(config.norm_eps),
        "vocab_size": lambda: w.add_vocab_size(config.vocab),
    }
    if config.n_expert:
        meta["expert_count"] = lambda: w.add_expert_count(config.n_expert)
        meta["expert_used_count"] = lambda: w.add_expert_used_count(config.top_k)
        meta["expert_feed_forward_length"] = lambda: w.add_expert_feed_forward_length(config.expert_ffn)
    for key, add in meta.items():
        if key not in skip_meta:
            add()
    for key, v in (extra_meta or {}).items():  # "{arch}." is prefixed; bool before int: a bool is an int
        kind = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(v)]
        kind(f"{arch}.{key}", v)
    held = {}
    for name, a in {**weights, **(extra_tensors or {})}.items():
        if a.ndim == 1 or qtype == Q.F32:
            data, kind, held[name] = a.astype(np.float32), Q.F32, a.astype(np.float32)
        elif qtype == Q.F16:
            data, kind, held[name] = a.astype(np.float16), Q.F16, a.astype(np.float16)
        elif qtype in (Q.Q4_K, Q.Q6_K):  # gguf cannot quantize K-quants: random blocks with sane scales stand in
            data, kind = random_k_blocks(a.shape, qtype), qtype
            held[name] = dequantize(data, qtype)
        else:
            data, kind = quantize(a.astype(np.float32), qtype), qtype
            held[name] = dequantize(data, qtype)
        if arch == "llama" and name.endswith((".attn_q", ".attn_k")):
            data = permute_qk(data, config.n_head if name.endswith("attn_q") else config.n_kv)
        w.add_tensor(name + ".weight", data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {n: a for n, a in held.items() if n in weights}


def random_k_blocks(shape: tuple[int, ...], qtype: Q, seed: int = 0) -> np.ndarray:
    """Random Q4_K / Q6_K rows whose f16 scales are set so the weights come out ~N(0, 1/fan_in)-sized."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (math.prod(shape) // block, size), dtype=np.uint8)
    scale = np.array([3e-4 if qtype == Q.Q4_K else 5e-5], np.float16).view(np.uint8)
    for at in (0, 2) if qtype == Q.Q4_K else (size - 2,):  # Q4_K: d, dmin lead a block; Q6_K: d ends it
        raw[:, at : at + 2] = scale
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def gguf_model(tmp_path: Path, cfg_json: dict[str, Any], arch: str, qtype: Q = Q.F32, **kw: Any) -> tuple[Path, Any]:
    fam, config, weights = config_and_weights(cfg_json, seed=3)
    path = tmp_path / f"{arch}-{qtype.name}.gguf"
    held = write_gguf(path, arch, config, weights, qtype, **kw)
    return path, reference(fam, config, held)


# === 1. layouts =====================================================================================================


@pytest.mark.parametrize("split", SPLITS)
def test_hf_single_file(tmp_path: Path, split: Any) -> None:
    fam, config, weights = config_and_weights(LLAMA)
    d = write_hf(tmp_path / "m", LLAMA, to_hf(weights))
    model = check_logits(d, reference(fam, config, weights), split)
    assert model.family.name == "llama" and model.config.dtype == "float32"
    assert model.executor.world_size == (1 if split[1] is None else 3)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("shards", [2, 3])
def test_hf_sharded_with_index(tmp_path: Path, split: Any, shards: int) -> None:
    fam, config, weights = config_and_weights(QWEN3, seed=1)
    # a stray safetensors file the index does not list must not be read
    d = write_hf(tmp_path / "m", QWEN3, to_hf(weights), shards=shards)
    write_safetensors(d / "stray.safetensors", {"model.layers.9.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})
    assert len(list(d.glob("model-*.safetensors"))) == shards
    check_logits(d, reference(fam, config, weights), split)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("redundant_head", [False, True], ids=["no-lm_head", "with-lm_head"])
def test_hf_tied_embeddings(tmp_path: Path, split: Any, redundant_head: bool) -> None:
    cfg_json = {**LLAMA, "tie_word_embeddings": True}
    fam, config, weights = config_and_weights(cfg_json, seed=2)
    assert config.tied and "output" not in weights
    tensors = to_hf(weights)
    if redundant_head:  # transformers overwrites a tied head with the embedding: a different one must be ignored
        tensors["lm_head.weight"] = -weights["token_embd"]
    d = write_hf(tmp_path / "m", cfg_json, tensors)
    check_logits(d, reference(fam, config, weights), split)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("style", ["rope_scaling", "rope_parameters"])
def test_hf_config_styles(tmp_path: Path, split: Any, style: str) -> None:
    classic = {**LLAMA, "rope_scaling": LLAMA3_ROPE}
    v5 = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    v5["rope_parameters"] = {**LLAMA3_ROPE, "rope_theta": LLAMA["rope_theta"]}
    cfg_json = classic if style == "rope_scaling" else v5
    fam, config, weights = config_and_weights(classic, seed=4)
    assert fam.config_from_hf(v5) == config
    assert dict(config.rope_scaling)["rope_type"] == "llama3" and config.rope_theta == 10000.0
    want = reference(fam, config, weights)
    unscaled = reference(fam, replace(config, rope_scaling=()), weights)
    assert np.abs(want - unscaled).max() > 100 * TOL  # the scaling changes these logits: ignoring it would fail
    d = write_hf(tmp_path / "m", cfg_json, to_hf(weights))
    model = check_logits(d, want, split)
    assert model.config.rope_scaling == config.rope_scaling


@pytest.mark.parametrize("where", ["top-level", "rope_parameters"])
def test_hf_partial_rotary_factor(tmp_path: Path, where: str) -> None:
    """partial_rotary_factor rotates only the first dims of each head, wherever config.json puts it (Qwen3.5 writes
    it inside rope_parameters); dropping it would silently rotate them all."""
    v5 = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    cfg_json = (
        {**LLAMA, "partial_rotary_factor": 0.5}
        if where == "top-level"
        else {**v5, "rope_parameters": {**rope, "partial_rotary_factor": 0.5}}
    )
    fam, config, weights = config_and_weights(cfg_json, seed=13)
    assert (config.head_dim, config.n_rot, config.rope_scaling) == (8, 4, ())
    assert fam.config_from_hf({**v5, "rope_parameters": {**rope, "partial_rotary_factor": 1.0}}).n_rot is None
    want = reference(fam, config, weights)
    assert np.abs(want - reference(fam, replace(config, n_rot=None), weights)).max() > 100 * TOL
    model = check_logits(write_hf(tmp_path / "m", cfg_json, to_hf(weights)), want, ("cpu-sim:3", [2, 1, 1]))
    assert model.config.n_rot == 4


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("experts", ["per-expert", "fused"])
def test_hf_moe_experts(tmp_path: Path, split: Any, experts: str) -> None:
    fam, config, weights = config_and_weights(QWEN3_MOE, seed=5)
    assert config.n_expert == 4 and config.dense_layers == (1,) and config.norm_topk
    assert "blk.1.ffn_up" in weights and "blk.0.ffn_up_exps" in weights and "blk.2.ffn_down_exps" in weights
    tensors = to_hf(weights, experts)
    assert ("model.layers.0.mlp.experts.gate_up_proj" in tensors) == (experts == "fused")
    assert ("model.layers.2.mlp.experts.3.up_proj.weight" in tensors) == (experts == "per-expert")
    d = write_hf(tmp_path / "m", QWEN3_MOE, tensors, shards=2)
    check_logits(d, reference(fam, config, weights), split)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_hf_half_precision(tmp_path: Path, split: Any, half: str) -> None:
    fam, config, weights = config_and_weights(LLAMA, seed=6)
    rounded = {n: a.astype(dtypes.to_dtype(half)) for n, a in weights.items()}
    d = write_hf(tmp_path / "m", LLAMA, to_hf(rounded))
    want = reference(fam, config, rounded)
    up = check_logits(d, want, split, dtype="float32")  # upcast: exactly the rounded weights in float32
    assert up.config.dtype == "float32"
    native = tw.load(d, devices=split[0], tensor_split=split[1])  # dtype=None holds the weights as stored
    assert native.config.dtype == "float32"  # ... and computes in float32
    assert native.executor.weights["blk.0.attn_q"][0].dtype == dtypes.to_dtype(half)
    err = float(np.abs(native.logits(IDS) - want).max())
    assert err < 1e-4, err  # the rounded weights exactly, computed in float32


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("cfg_json", "arch"), [(LLAMA, "llama"), (QWEN3, "qwen3"), (QWEN3_MOE, "qwen3moe")], ids=["llama", "qwen3", "moe"]
)
def test_gguf_f32(tmp_path: Path, split: Any, cfg_json: dict[str, Any], arch: str) -> None:
    path, want = gguf_model(tmp_path, cfg_json, arch)
    model = check_logits(path, want, split)
    assert model.family.name == cfg_json["model_type"] and model.config.dtype == "float32"


@pytest.mark.parametrize("split", SPLITS)
def test_gguf_mixtral_with_one_tensor_per_expert(tmp_path: Path, split: Any) -> None:
    """Older llama.cpp files store Mixtral's experts one tensor each (blk.N.ffn_gate.E): Mixtral's GGUF naming
    stacks them, and the file (arch llama with llama.expert_count) goes to Mixtral, not Llama."""
    fam, config, weights = config_and_weights(MIXTRAL, seed=12)
    per_expert = {n: a for n, a in weights.items() if not n.endswith("_exps")}
    for n, a in weights.items():
        if n.endswith("_exps"):
            per_expert.update({f"{n.removesuffix('_exps')}.{e}": expert for e, expert in enumerate(a)})
    path = tmp_path / "mixtral.gguf"
    write_gguf(path, "llama", config, per_expert)
    assert "blk.1.ffn_down.3" in per_expert and "blk.1.ffn_down_exps" not in per_expert
    model = check_logits(path, reference(fam, config, weights), split)
    assert model.family.name == "mixtral" and model.config.n_expert == 4


def test_gguf_llama_permutation_matters(tmp_path: Path) -> None:
    """llama.cpp's Q/K row permutation changes these logits, so the llama GGUF tests above (files written permuted)
    would fail if the loader did not undo it."""
    fam, config, weights = config_and_weights(LLAMA, seed=3)
    permuted = dict(weights)
    for name in weights:
        if name.endswith((".attn_q", ".attn_k")):
            permuted[name] = permute_qk(weights[name], config.n_head if name.endswith("attn_q") else config.n_kv)
    assert np.abs(reference(fam, config, weights) - reference(fam, config, permuted)).max() > 100 * TOL


@pytest.mark.parametrize("split", SPLITS)
def test_gguf_f16(tmp_path: Path, split: Any) -> None:
    path, want = gguf_model(tmp_path, LLAMA, "llama", Q.F16)
    check_logits(path, want, split, dtype="float32")
    native = check_logits(path, want, split)  # held as float16, computed in float32: the same logits
    assert native.config.dtype == "float32" and native.executor.formats["blk.0.ffn_up"].name == "f16"


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=["q8_0", "q4_0"])
@pytest.mark.parametrize(("cfg_json", "arch"), [(LLAMA, "llama"), (QWEN3_MOE, "qwen3moe")], ids=["llama", "moe"])
def test_gguf_quantized(tmp_path: Path, split: Any, qtype: Q, cfg_json: dict[str, Any], arch: str) -> None:
    path, want = gguf_model(tmp_path, cfg_json, arch, qtype)
    model = check_logits(path, want, split)
    assert model.config.dtype == "float32"  # quantized weights dequantize to float32


K_QUANT_LLAMA = {**LLAMA, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
K_QUANT_LLAMA.update(intermediate_size=256, num_hidden_layers=1)  # K-quant rows are whole 256-element blocks


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_bf16_and_k_quants(tmp_path: Path, split: Any, qtype: Q) -> None:
    path, want = gguf_model(tmp_path, K_QUANT_LLAMA, "llama", qtype)
    check_logits(path, want, split, dtype="float32")
    own = tw.load(path)  # dtype=None: every format stays as stored, computed in float32
    assert own.config.dtype == "float32" and own.executor.formats["blk.0.ffn_up"].name == qtype.name.lower()


@pytest.mark.parametrize("split", SPLITS)
def test_gguf_moe_and_rope_keys_are_honoured(tmp_path: Path, split: Any) -> None:
    """Keys that change semantics when present: sigmoid gating, routing-weight scale, linear rope scaling."""
    fam, config, weights = config_and_weights(QWEN3_MOE, seed=5)
    keys = {"expert_gating_func": 2, "expert_weights_scale": 2.5, "rope.scaling.type": "linear"}
    path = tmp_path / "keys.gguf"
    write_gguf(path, "qwen3moe", config, weights, extra_meta={**keys, "rope.scaling.factor": 4.0})
    meant = replace(
        config, route_gating="sigmoid", route_scale=2.5, rope_scaling=(("factor", 4.0), ("rope_type", "linear"))
    )
    want = reference(fam, meant, weights)
    assert np.abs(want - reference(fam, config, weights)).max() > 100 * TOL
    check_logits(path, want, split)


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"expert_shared_count": 1}, "shared experts"),
        ({"rope.scaling.type": "yarn"}, "rope scaling 'yarn'"),
        ({"expert_gating_func": 7}, "expert_gating_func 7"),
    ],
)
def test_gguf_keys_we_cannot_honour_are_refused(tmp_path: Path, meta: dict[str, Any], words: str) -> None:
    _, config, weights = config_and_weights(QWEN3_MOE, seed=5)
    path = tmp_path / "refuse.gguf"
    write_gguf(path, "qwen3moe", config, weights, extra_meta=meta)
    kind = ModelFormatError if "gating" in words else UnsupportedError
    expect_error(path, words, kind=kind)


@pytest.mark.parametrize("split", SPLITS)
def test_gguf_rope_freqs(tmp_path: Path, split: Any) -> None:
    fam, config, weights = config_and_weights(LLAMA, seed=7)
    factors = np.array([1.0, 1.5, 4.0, 8.0], np.float32)  # one divisor per rotated pair (head_dim 8)
    path = tmp_path / "rope.gguf"
    write_gguf(path, "llama", config, weights, extra_tensors={"rope_freqs": factors})
    scaled = replace(config, rope_scaling=(("factors", tuple(float(f) for f in factors)), ("rope_type", "factors")))
    want = reference(fam, scaled, weights)
    assert np.abs(want - reference(fam, config, weights)).max() > 100 * TOL
    model = check_logits(path, want, split)
    assert dict(model.config.rope_scaling)["factors"] == tuple(factors.tolist())


# === 2. bad input ===================================================================================================


def expect_error(path: Path, *words: str, kind: type[TensorweaveError] = ModelFormatError) -> str:
    """tw.load(path) raises exactly one ``kind`` whose message names the file and ``words`` (e.g. the tensor)."""
    with pytest.raises(TensorweaveError) as info:
        tw.load(path, devices="cpu-sim:2")
    e = info.value
    assert type(e) is kind, f"{type(e).__name__}: {e}"
    msg = str(e)
    print(f"\n{type(e).__name__}: {msg}")
    # no chained numpy/json/struct error in the traceback either
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), repr(e.__context__)
    for w in (str(path), *words):
        assert w in msg, f"{w!r} not in {msg!r}"
    assert "Traceback" not in msg
    return msg


@pytest.fixture
def hf_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A valid small llama directory; tests break one thing in it."""
    _, _, weights = config_and_weights(LLAMA, seed=8)
    tensors = to_hf(weights)
    return write_hf(tmp_path / "m", LLAMA, tensors), tensors


def test_hf_dir_fixture_is_valid(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    tw.load(hf_dir[0]).logits([1, 2])  # the bad-input tests below each break exactly one thing in this


def test_bad_safetensors_truncated_in_data(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, tensors = hf_dir
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    last = list(tensors)[-1]
    expect_error(d, str(f), repr(last), "truncated")


def test_bad_safetensors_truncated_in_header(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, _ = hf_dir
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    expect_error(d, str(f), "header")
    f.write_bytes(b"\x10\x00")  # not even the 8-byte length
    expect_error(d, str(f), "too short")


def test_bad_safetensors_header_length_beyond_file(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, _ = hf_dir
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes((len(raw) * 4).to_bytes(8, "little") + raw[8:])
    expect_error(d, str(f), "header length")
    f.write_bytes((2**63).to_bytes(8, "little") + raw[8:])
    expect_error(d, str(f), "header length")


def test_bad_safetensors_garbage_header(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, _ = hf_dir
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    f.write_bytes(raw[:8] + b"{not json" + b"\xff" * (n - 9) + raw[8 + n :])
    expect_error(d, str(f), "JSON")
    f.write_bytes(raw[:8] + b"[1, 2]".ljust(n) + raw[8 + n :])
    expect_error(d, str(f), "JSON object")


def rewrite_header(f: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the JSON header of a safetensors file in place, keeping the data bytes."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def test_bad_safetensors_offsets_do_not_match_shape(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, _ = hf_dir
    f = d / "model.safetensors"
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(h: dict[str, Any]) -> None:
        h[name]["shape"] = [h[name]["shape"][0] - 1, h[name]["shape"][1]]

    rewrite_header(f, edit)
    expect_error(d, str(f), repr(name), "offsets")


def test_bad_safetensors_unknown_dtype(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, _ = hf_dir
    f = d / "model.safetensors"
    name = "model.norm.weight"
    rewrite_header(f, lambda h: h[name].update(dtype="F8_E9M9"))
    expect_error(d, str(f), repr(name), "F8_E9M9")


def test_bad_safetensors_integer_weight(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, tensors = hf_dir
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = {**tensors, name: np.zeros(tensors[name].shape, np.int32)}
    write_safetensors(d / "model.safetensors", tensors)
    expect_error(d, str(d / "model.safetensors"), repr(name), "int32")


def test_bad_safetensors_integer_expert(tmp_path: Path) -> None:
    _, _, weights = config_and_weights(QWEN3_MOE)
    tensors = to_hf(weights)
    name = "model.layers.2.mlp.experts.1.up_proj.weight"  # one of the tensors stacked into blk.2.ffn_up_exps
    tensors[name] = np.zeros(tensors[name].shape, np.int32)
    expect_error(write_hf(tmp_path / "m", QWEN3_MOE, tensors), repr(name), "int32")


def test_bad_safetensors_wrong_shape(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, tensors = hf_dir
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors = {**tensors, name: np.zeros((24, 64), np.float32)}  # 3 KV heads of 8 where the config says 4
    write_hf(d, LLAMA, tensors, shards=2)
    (d / "model.safetensors").unlink()
    shard = "model-00002-of-00002.safetensors" if list(tensors).index(name) % 2 else "model-00001-of-00002.safetensors"
    expect_error(d, str(d / shard), repr(name), "(24, 64)", "(32, 64)")


def test_bad_safetensors_missing_tensor(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, tensors = hf_dir
    name = "model.layers.0.post_attention_layernorm.weight"
    write_safetensors(d / "model.safetensors", {n: a for n, a in tensors.items() if n != name})
    msg = expect_error(d, "missing")
    assert name in msg or "blk.0.ffn_norm" in msg


@pytest.mark.parametrize(
    "entry",
    [
        "F32",
        {"dtype": "F32"},
        {"dtype": "F32", "shape": 64, "data_offsets": [0, 256]},
        {"dtype": "F32", "shape": [-64], "data_offsets": [0, 256]},
        {"dtype": "F32", "shape": [64.0], "data_offsets": [0, 256]},
        {"dtype": ["F32"], "shape": [64], "data_offsets": [0, 256]},
        {"dtype": "F32", "shape": [64], "data_offsets": [0]},
        {"dtype": "F32", "shape": [64], "data_offsets": [0, "256"]},
        {"dtype": "F32", "shape": [64], "data_offsets": None},
        {"dtype": "F32", "shape": [64], "data_offsets": [256, 0]},
        {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 256]},
    ],
)
def test_bad_safetensors_malformed_entry(hf_dir: tuple[Path, dict[str, np.ndarray]], entry: Any) -> None:
    d, _ = hf_dir
    rewrite_header(d / "model.safetensors", lambda h: h.__setitem__("model.norm.weight", entry))
    expect_error(d, str(d / "model.safetensors"), "'model.norm.weight'")


def test_bad_safetensors_tensor_in_two_shards(tmp_path: Path) -> None:
    _, _, weights = config_and_weights(LLAMA)
    tensors = to_hf(weights)
    d = write_hf(tmp_path / "m", LLAMA, tensors, shards=2)
    write_safetensors(d / "model-00002-of-00002.safetensors", tensors)
    expect_error(d, "'model.embed_tokens.weight'", "model-00001-of-00002.safetensors", "model-00002-of-00002")


def test_bad_safetensors_missing_expert(tmp_path: Path) -> None:
    _, _, weights = config_and_weights(QWEN3_MOE)
    tensors = to_hf(weights)
    del tensors["model.layers.2.mlp.experts.1.down_proj.weight"]
    expect_error(write_hf(tmp_path / "m", QWEN3_MOE, tensors), "model.layers.2.mlp.experts.1.down_proj.weight")


def test_bad_safetensors_extra_tensor(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, tensors = hf_dir
    f = d / "model.safetensors"
    write_safetensors(f, {**tensors, "model.layers.0.mlp.frobnicator.weight": np.zeros(4, np.float32)})
    expect_error(d, str(f), "'model.layers.0.mlp.frobnicator.weight'")
    # a known name with no place in this config: a third layer in a two-layer model
    write_safetensors(f, {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.0.mlp.up_proj.weight"]})
    expect_error(d, "blk.2.ffn_up", "no place")


def test_bad_index_lists_missing_shard(tmp_path: Path) -> None:
    _, _, weights = config_and_weights(LLAMA)
    d = write_hf(tmp_path / "m", LLAMA, to_hf(weights), shards=2, index_extra={"model.norm.weight": "gone.safetensors"})
    expect_error(d, "model.safetensors.index.json", "gone.safetensors")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    expect_error(d, "model.safetensors.index.json")


def test_bad_config(hf_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    d, _ = hf_dir
    cfg = d / "config.json"
    cfg.write_text(json.dumps({**LLAMA, "model_type": "gpt_bigfoot"}))
    expect_error(d, str(cfg), "gpt_bigfoot", kind=UnsupportedError)
    cfg.write_text("{")
    expect_error(d, str(cfg), "JSON")
    cfg.write_text(json.dumps({k: v for k, v in LLAMA.items() if k != "hidden_size"}))
    expect_error(d, str(cfg), "hidden_size")
    cfg.write_text(json.dumps({**LLAMA, "num_attention_heads": 0}))
    expect_error(d, str(cfg), "division")
    cfg.write_text(json.dumps({**LLAMA, "mlp_bias": True}))
    expect_error(d, str(cfg), "mlp_bias", kind=UnsupportedError)
    cfg.write_text(json.dumps({**LLAMA, "num_key_value_heads": 3}))  # 8 heads in 3 KV groups: no valid model
    expect_error(d, "3 whole groups")
    cfg.write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    expect_error(d, "'yarn'", kind=UnsupportedError)
    cfg.write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 4.0}}))
    expect_error(d, "low_freq_factor", kind=UnsupportedError)
    cfg.unlink()
    expect_error(d, "no config.json")


def test_bad_directory_without_weights(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    expect_error(d, "safetensors")
    expect_error(tmp_path / "nowhere", "no such file")


@pytest.fixture
def gguf_file(tmp_path: Path) -> tuple[Path, Any, dict[str, np.ndarray]]:
    _, config, weights = config_and_weights(LLAMA, seed=9)
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", config, weights)
    return path, config, weights


def test_gguf_fixture_is_valid(gguf_file: tuple[Path, Any, dict[str, np.ndarray]]) -> None:
    tw.load(gguf_file[0]).logits([1, 2])


def test_bad_gguf_magic(gguf_file: tuple[Path, Any, dict[str, np.ndarray]]) -> None:
    path = gguf_file[0]
    path.write_bytes(b"GGML" + path.read_bytes()[4:])
    expect_error(path, "magic")
    path.write_bytes(b"GG")
    expect_error(path, "GGUF")


def test_bad_gguf_truncated_in_data(gguf_file: tuple[Path, Any, dict[str, np.ndarray]]) -> None:
    path = gguf_file[0]
    last = list(gguf_file[2])[-1]  # the writer keeps the order tensors were added in
    path.write_bytes(path.read_bytes()[:-1000])
    expect_error(path, f"'{last}.weight'", "truncated")


def test_bad_gguf_truncated_in_header(gguf_file: tuple[Path, Any, dict[str, np.ndarray]]) -> None:
    path = gguf_file[0]
    raw = path.read_bytes()
    for cut in (10, 30, raw.index(b"attention.head_count") + 5, raw.index(b"blk.0.attn_q.weight") + 3):
        path.write_bytes(raw[:cut])
        expect_error(path, "truncated")


def tensor_offset_field(raw: bytes, name: str) -> int:
    """Byte position of tensor ``name``'s data-offset field in a GGUF header (u64 name length, name, u32 n_dims,
    u64 dims, u32 type, u64 offset)."""
    pos = raw.index(len(name).to_bytes(8, "little") + name.encode()) + 8 + len(name)
    n_dims = int.from_bytes(raw[pos : pos + 4], "little")
    return pos + 4 + 8 * n_dims + 4


def test_bad_gguf_tensor_offset_beyond_file(gguf_file: tuple[Path, Any, dict[str, np.ndarray]]) -> None:
    path = gguf_file[0]
    raw = bytearray(path.read_bytes())
    name = "blk.1.ffn_gate.weight"
    at = tensor_offset_field(bytes(raw), name)
    assert gguf.GGUFReader(path).get_tensor(0).data_offset > 0  # the file as written reads fine
    raw[at : at + 8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    expect_error(path, f"'{name}'")


def test_bad_gguf_metadata(tmp_path: Path) -> None:
    _, config, weights = config_and_weights(LLAMA, seed=9)
    path = tmp_path / "arch.gguf"
    write_gguf(path, "gpt_bigfoot", config, weights)
    expect_error(path, "gpt_bigfoot", kind=UnsupportedError)
    path = tmp_path / "heads.gguf"
    write_gguf(path, "llama", config, weights, skip_meta=("attention.head_count",))
    expect_error(path, "llama.attention.head_count")
    _, moe, moe_weights = config_and_weights(QWEN3_MOE)
    path = tmp_path / "moe.gguf"
    write_gguf(path, "qwen3moe", moe, moe_weights, skip_meta=("expert_count",))
    expect_error(path, "qwen3moe.expert_count")


def test_bad_gguf_tensors_do_not_fit_the_config(tmp_path: Path) -> None:
    _, config, weights = config_and_weights(LLAMA, seed=9)
    path = tmp_path / "missing.gguf"
    write_gguf(path, "llama", config, {n: a for n, a in weights.items() if n != "blk.1.ffn_up"})
    expect_error(path, "'blk.1.ffn_up'", "missing")
    path = tmp_path / "extra.gguf"
    write_gguf(path, "llama", config, {**weights, "blk.2.ffn_up": weights["blk.0.ffn_up"]})
    expect_error(path, "'blk.2.ffn_up'", "no place")
    path = tmp_path / "shape.gguf"
    write_gguf(path, "llama", config, {**weights, "blk.0.ffn_up": weights["blk.0.ffn_up"][:64]})
    expect_error(path, "'blk.0.ffn_up'", "(64, 64)", "(96, 64)")
    _, qwen, qwen_weights = config_and_weights(QWEN3)
    path = tmp_path / "heads0.gguf"
    write_gguf(path, "qwen3", replace(qwen, n_head=0), qwen_weights)
    expect_error(path, "division")
    path = tmp_path / "kv3.gguf"
    write_gguf(path, "qwen3", replace(qwen, n_kv=3), qwen_weights)
    expect_error(path, "3 whole groups")


def test_bad_gguf_header_fields(gguf_file: tuple[Path, Any, dict[str, np.ndarray]]) -> None:
    path = gguf_file[0]
    raw = path.read_bytes()
    name = "blk.0.attn_k.weight"
    at = tensor_offset_field(raw, name)
    edits = [
        (at - 4, 999, 4, ["'blk.0.attn_k.weight'", "unknown type 999"]),  # the tensor's type
        (at - 12, 1 << 40, 8, ["'blk.0.attn_k.weight'", "truncated"]),  # its second dimension
        (8, 1 << 50, 8, ["corrupt"]),  # tensor count
        (16, 1 << 50, 8, ["corrupt"]),  # metadata count
        (raw.index(name.encode()) + len(name), 1 << 30, 4, ["corrupt"]),  # its number of dimensions
    ]
    for pos, value, width, words in edits:
        bad = bytearray(raw)
        bad[pos : pos + width] = value.to_bytes(width, "little")
        path.write_bytes(bytes(bad))
        expect_error(path, *words)


def test_bad_gguf_integer_tensor(gguf_file: tuple[Path, Any, dict[str, np.ndarray]], tmp_path: Path) -> None:
    _, config, weights = gguf_file
    path = tmp_path / "int.gguf"
    bad = {**weights, "blk.0.attn_v": np.zeros_like(weights["blk.0.attn_v"], dtype=np.int32)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.n_layer)
    for name, a in bad.items():
        w.add_tensor(name + ".weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_error(path, "'blk.0.attn_v.weight'", "I32")


# === 3. memory ======================================================================================================

BIG = {
    **LLAMA,
    "vocab_size": 65536,
    "hidden_size": 1024,
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 16,
}
ROWS = 4096  # rows of the embedding written (and generated) at a time


def big_weights(cfg_json: dict[str, Any]) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """Everything but the embedding, which ``embedding_chunks`` generates piecewise."""
    fam = family_of(cfg_json)
    config = fam.config_from_hf(cfg_json)
    small = random_weights(fam.build(replace(config, vocab=8), 1), seed=11)
    del small["token_embd"]
    return fam, config, small


def embedding_chunks(vocab: int, hidden: int) -> Iterator[np.ndarray]:
    for lo in range(0, vocab, ROWS):
        rng = np.random.default_rng(lo)
        yield rng.standard_normal((min(ROWS, vocab - lo), hidden), dtype=np.float32) / np.float32(math.sqrt(hidden))


def held_bytes(a: np.ndarray) -> int:
    """Memory an array keeps alive: a view of a memory map holds only its own pages (counted as its size), a view
    of an ordinary array keeps that whole array."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return a.nbytes if isinstance(root, np.memmap) or root.base is not None else root.nbytes


class LargestRead:
    """Wraps a checkpoint class's ``read`` (the real one still runs) to record the largest array it returned,
    counting what a returned view keeps alive."""

    def __init__(self, cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
        self.largest = 0
        real = cls.read

        def read(ck: Any, name: str, index: tuple[slice, ...]) -> np.ndarray:
            out = real(ck, name, index)
            self.largest = max(self.largest, held_bytes(np.asarray(out)))
            return out

        monkeypatch.setattr(cls, "read", read)


def measure_load(path: Path) -> tuple[tw.Model, int, int]:
    """Load on four simulated devices under tracemalloc: (model, bytes still held, peak - held)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        model = tw.load(path, devices="cpu-sim:4", progress=False)
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return model, now - base, peak - now


def test_memory_hf_tp4_never_holds_a_whole_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fam, config, small = big_weights(BIG)
    V, H = config.vocab, config.hidden
    embd_bytes = V * H * 4
    tensors: dict[str, Any] = {"model.embed_tokens.weight": Streamed("F32", (V, H), lambda: embedding_chunks(V, H))}
    tensors.update(to_hf(small))
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(BIG))
    f = write_safetensors(d / "model.safetensors", tensors)
    size = f.stat().st_size
    assert size > 260 << 20
    reads = LargestRead(HFCheckpoint, monkeypatch)
    model, held, transient = measure_load(d)
    print(
        f"\nHF F32 {f.name}: file {size / 2**20:.1f} MiB, embedding {embd_bytes / 2**20:.1f} MiB, "
        f"held after load {held / 2**20:.1f} MiB, peak transient {transient / 2**20:.2f} MiB, "
        f"largest read {reads.largest / 2**20:.2f} MiB"
    )
    assert held > 0.95 * embd_bytes  # tracemalloc sees the device shards, so it would see a whole tensor too
    assert transient < embd_bytes / 2
    assert reads.largest <= embd_bytes / 4 + H * 4  # a quarter of the vocabulary rows (plus rounding)
    ids = np.array([5, 60000, 12345], np.int32)
    embd = np.memmap(f, np.float32, "r", offset=HFCheckpoint(d, registry().models).files["model.safetensors"].start)
    want = reference(fam, config, {**small, "token_embd": embd[: V * H].reshape(V, H)}, ids)
    assert float(np.abs(model.logits(ids) - want).max()) < TOL
    model.close()
    del embd
    f.unlink()


def test_memory_gguf_q8_0_tp4_dequantizes_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fam, config, small = big_weights({**BIG, "vocab_size": 32768})
    V, H = config.vocab, config.hidden
    embd_bytes = V * H * 4  # float32, what it dequantizes to
    q = np.empty((V, H // 32 * 34), np.uint8)  # Q8_0: 32 values in 34 bytes
    for lo, chunk in zip(range(0, V, ROWS), embedding_chunks(V, H), strict=True):
        q[lo : lo + len(chunk)] = quantize(chunk, Q.Q8_0)
    path = tmp_path / "big-q8_0.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [
        (w.add_block_count, config.n_layer),
        (w.add_embedding_length, H),
        (w.add_head_count, config.n_head),
        (w.add_head_count_kv, config.n_kv),
        (w.add_feed_forward_length, config.ffn),
        (w.add_context_length, config.ctx),
        (w.add_vocab_size, V),
    ]:
        add(v)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_tensor("token_embd.weight", q, raw_dtype=Q.Q8_0)
    for name, a in small.items():
        if name.endswith((".attn_q", ".attn_k")):
            a = permute_qk(a, config.n_head if name.endswith("attn_q") else config.n_kv)
        w.add_tensor(name + ".weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = path.stat().st_size
    reads = LargestRead(GGUFCheckpoint, monkeypatch)
    model, held, transient = measure_load(path)
    print(
        f"\nGGUF Q8_0 {path.name}: file {size / 2**20:.1f} MiB, embedding {embd_bytes / 2**20:.1f} MiB as float32, "
        f"held after load {held / 2**20:.1f} MiB, peak transient {transient / 2**20:.2f} MiB, "
        f"largest read {reads.largest / 2**20:.2f} MiB"
    )
    assert 0.95 * size < held < 1.05 * size  # the blocks as stored (a quarter of the float32 embedding)
    assert transient < embd_bytes / 2
    assert reads.largest <= embd_bytes / 4 + H * 4
    ids = np.array([5, 30000, 12345], np.int32)
    want = reference(fam, config, {**small, "token_embd": dequantize(q, Q.Q8_0)}, ids)
    assert float(np.abs(model.logits(ids) - want).max()) < TOL
    model.close()
    path.unlink()

"""Llama 2/3 and Mistral-style models: GQA, rope (with llama3 or linear scaling), optional sliding window, tied or
untied head. ``build`` composes the blocks into the pre-norm decoder the llama-like families here share (qwen2,
qwen3, qwen3_moe, mixtral reuse it with other switches); ``hf_config``/``gguf_config`` map the config keys they share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tensorweave.core.graph import Graph, Tensor
from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.errors import ModelFormatError, UnsupportedError
from tensorweave.models import blocks
from tensorweave.models.blocks import Config, Layer

# (graph, config, layer, normed input, positions) -> the token mixer's contribution (attention, a recurrent layer)
Mixer = Callable[[Graph, Any, Layer, Tensor, Tensor], Tensor]


def build(cfg: Config, tokens: int, n_logits: int | None = None, mixer: Mixer = blocks.attention) -> Graph:
    """The graph of one step over ``tokens`` new tokens at ``positions`` (reading and extending the KV caches):
    embedding, then per layer x + mixer(norm(x)) (attention unless a hybrid family gives its own) and
    x + ffn(norm(x)), then the head (for the last ``n_logits`` tokens; None: all)."""
    g, x, pos = blocks.embed(cfg, tokens)
    for il in range(cfg.n_layer):
        layer = cfg.layer(il)
        x = x + mixer(g, cfg, layer, blocks.norm(g, cfg, x, layer, "attn_norm"), pos)
        h = blocks.norm(g, cfg, x, layer, "ffn_norm")
        y = blocks.moe(g, cfg, layer, h) if layer.moe else blocks.gated_ffn(g, layer, h, cfg.ffn)
        if layer.moe and cfg.shared_ffn:
            y = y + blocks.shared_expert(g, cfg, layer, h)
        x = x + y
    blocks.head(g, cfg, x, n_logits)
    return g


class Llama(ModelFamily):
    name = "llama"
    hf_model_types: tuple[str, ...] = ("llama", "mistral")
    gguf_architectures: tuple[str, ...] = ("llama",)
    gguf_permuted_qk = True  # llama.cpp's converter interleaves Q/K rows for its "normal" rope; the loader undoes it

    def config_from_hf(self, config: dict[str, Any]) -> Config:
        if config.get("mlp_bias"):
            raise UnsupportedError("llama with mlp_bias=true is not supported")
        return Config(**hf_config(config))

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Config:
        return gguf_common(meta, shapes, meta["general.architecture"])

    def build(self, config: Config, tokens: int, n_logits: int | None = None) -> Graph:
        return build(config, tokens, n_logits)


def gguf_common(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], arch: str, **extra: Any) -> Config:
    """What every llama-like GGUF shares: the metadata keys plus facts only the tensor list tells (tied head,
    biases, q/k norms, rope frequency factors)."""
    kw = gguf_config(meta, arch)
    kw["tied"] = "output" not in shapes
    kw["qkv_bias"] = "blk.0.attn_q.bias" in shapes
    kw["o_bias"] = "blk.0.attn_output.bias" in shapes
    kw["qk_norm"] = "blk.0.attn_q_norm" in shapes
    if not kw["ffn"]:
        kw["ffn"] = next((s[0] for n, s in shapes.items() if n.endswith(".ffn_up")), 0)
    cfg = Config(**kw, **extra)
    factors = meta.get("rope_freqs")  # the loader puts the rope_freqs.weight tensor (llama3 scaling) here
    if factors is not None:
        cfg = replace(cfg, rope_scaling=(("factors", tuple(float(f) for f in factors)), ("rope_type", "factors")))
    return cfg


def gguf_moe(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], arch: str) -> Config:
    """A llama-like MoE GGUF (qwen3moe; llama for Mixtral): ``gguf_common`` plus the expert keys, which llama.cpp
    honours when present (a file that sets them means them), and dense layers told by their tensors."""
    n_layer = int(meta[f"{arch}.block_count"])
    # GGUF has no per-layer dense flag: a layer is dense when it carries ffn_up instead of expert tensors.
    dense = tuple(il for il in range(n_layer) if f"blk.{il}.ffn_up_exps" not in shapes)
    sparse = [il for il in range(n_layer) if il not in dense]
    if not sparse:
        raise ModelFormatError(f"{arch} GGUF has no expert tensors (blk.N.ffn_up_exps) in any layer")
    gating = {1: "softmax", 2: "sigmoid"}.get(int(meta.get(f"{arch}.expert_gating_func", 1)))
    if gating is None:
        raise ModelFormatError(f"{arch}: unknown expert_gating_func {meta[f'{arch}.expert_gating_func']}")
    if int(meta.get(f"{arch}.expert_shared_count", 0)):
        raise UnsupportedError(f"{arch}: shared experts (expert_shared_count) are not part of this family")
    return gguf_common(
        meta,
        shapes,
        arch,
        n_expert=int(meta[f"{arch}.expert_count"]),
        top_k=int(meta[f"{arch}.expert_used_count"]),
        # llama.cpp renormalizes the top-k weights of these architectures unless the file says otherwise
        norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", True)),
        route_gating=gating,
        route_scale=float(meta.get(f"{arch}.expert_weights_scale", 1.0)),
        expert_ffn=int(meta.get(f"{arch}.expert_feed_forward_length") or shapes[f"blk.{sparse[0]}.ffn_up_exps"][1]),
        dense_layers=dense,
    )


def hf_config(c: dict[str, Any]) -> dict[str, Any]:
    """Config fields common to llama-like Hugging Face config.json files (both the transformers 5 style with a
    ``rope_parameters`` dict and the published top-level ``rope_theta``/``rope_scaling`` style)."""
    nh = int(c["num_attention_heads"])
    rope = dict(c.get("rope_parameters") or {})
    rope.update(c.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
    # transformers 5 (and Qwen3.5's config.json) put partial_rotary_factor inside rope_parameters; older ones at the top
    partial = float(rope.pop("partial_rotary_factor", None) or c.get("partial_rotary_factor") or 1.0)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    head_dim = int(c.get("head_dim") or c["hidden_size"] // nh)
    window = c.get("sliding_window")
    return {
        "vocab": int(c["vocab_size"]),
        "hidden": int(c["hidden_size"]),
        "n_layer": int(c["num_hidden_layers"]),
        "n_head": nh,
        "n_kv": int(c.get("num_key_value_heads") or nh),
        "head_dim": head_dim,
        "ffn": int(c["intermediate_size"]),
        "qkv_bias": bool(c.get("attention_bias", False)),
        "o_bias": bool(c.get("attention_bias", False)),
        "rope_theta": theta,
        "rope_scaling": tuple(sorted(rope.items())),
        "n_rot": int(head_dim * partial) if partial != 1.0 else None,
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "tied": bool(c.get("tie_word_embeddings", False)),
        "window": int(window) if window else None,
        "ctx": int(c.get("max_position_embeddings", 4096)),
    }


def gguf_config(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """Config fields from llama.cpp's GGUF metadata keys (``{arch}.embedding_length`` ...)."""

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelFormatError(f"GGUF metadata has no {arch}.{key}")
        return v

    nh = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // nh))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    window = meta.get(f"{arch}.attention.sliding_window")
    scaling: tuple[tuple[str, Any], ...] = ()
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear"))
    elif kind != "none":
        raise UnsupportedError(f"GGUF rope scaling {kind!r} is not supported (known: none, linear, rope_freqs)")
    return {
        "vocab": int(vocab),
        "hidden": hidden,
        "n_layer": int(get("block_count")),
        "n_head": nh,
        "n_kv": int(get("attention.head_count_kv", nh)),
        "head_dim": head_dim,
        "ffn": int(get("feed_forward_length", 0)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "n_rot": None if int(get("rope.dimension_count", head_dim)) == head_dim else int(get("rope.dimension_count")),
        "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "window": int(window) if window else None,
        "ctx": int(get("context_length", 4096)),
    }


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Llama())

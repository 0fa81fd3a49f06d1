"""Gemma 3 (text): a pre- and post-normed decoder. Per layer x + post_norm(attention(norm(x))), then
x + post_ffw_norm(geglu_ffn(ffn_norm(x))); RMSNorms multiply by ``1 + w``; the embedding is scaled by sqrt(hidden)
(rounded to the model dtype, as transformers does); q/k are RMS-normed per head; attention scales by
``query_pre_attn_scalar ** -0.5``; layers are sliding-window or full (``layer_types``, or every
``sliding_window_pattern``-th full), each type with its own rope (local theta unscaled; global theta with the
checkpoint's scaling); the head is tied; an optional final logit softcap.

Checkpoints: HF ``gemma3_text`` and the language model of ``gemma3`` (vision tower and projector ignored); GGUF
``gemma3``, whose converter stored every norm weight as ``1 + w`` (the naming takes the 1 back off, so both formats
run the same float32 ``1 + w`` as transformers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorweave.core import dtypes
from tensorweave.core.graph import Graph
from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import LLAMA_HF_NAMES, ModelFamily, Naming, Target
from tensorweave.errors import UnsupportedError
from tensorweave.models import blocks
from tensorweave.models.blocks import Config, Layer, Rope
from tensorweave.models.llama import gguf_config

# transformers' Gemma3TextConfig defaults: published gemma3 (multimodal) config.json files leave most of them out
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "hidden_activation": "gelu_pytorch_tanh",
}


@dataclass(frozen=True)
class Gemma3Config(Config):
    sliding: tuple[bool, ...] = ()  # per layer: sliding-window attention (else full)
    local_theta: float = 10_000.0  # rope theta of the sliding layers (unscaled); full layers: rope_theta/scaling
    attn_scale: float = 1.0  # query_pre_attn_scalar ** -0.5
    final_softcap: float | None = None

    def layer(self, il: int) -> Layer:
        local = self.sliding[il]
        rope = Rope(self.local_theta) if local else Rope(self.rope_theta, scaling=self.rope_scaling)
        window = self.window if local else None
        return Layer(il, self.n_head, self.n_kv, self.head_dim, rope, window, False, self.attn_scale)


def build(cfg: Gemma3Config, tokens: int, n_logits: int | None = None) -> Graph:
    g, x, pos = blocks.embed(cfg, tokens)
    x = g.scale(x, scale=embed_scale(cfg.hidden, cfg.dtype))
    for il in range(cfg.n_layer):
        layer = cfg.layer(il)
        a = blocks.attention(g, cfg, layer, blocks.norm(g, cfg, x, layer, "attn_norm"), pos)
        x = x + blocks.norm(g, cfg, a, layer, "post_attention_norm")
        y = blocks.gated_ffn(g, layer, blocks.norm(g, cfg, x, layer, "ffn_norm"), cfg.ffn, glu="geglu")
        x = x + blocks.norm(g, cfg, y, layer, "post_ffw_norm")
    blocks.head(g, cfg, x, n_logits, softcap=cfg.final_softcap)
    return g


def embed_scale(hidden: int, dtype: str) -> float:
    """sqrt(hidden) as transformers multiplies by it: a tensor cast to the model's dtype."""
    return float(np.asarray(hidden**0.5, dtype=dtypes.to_dtype(dtype)))


def _rope_split(c: dict[str, Any]) -> tuple[float, float, tuple[tuple[str, Any], ...]]:
    """(local theta, global theta, global scaling) from either config.json style: transformers 5's
    ``rope_parameters`` per layer type, or the published ``rope_theta``/``rope_local_base_freq``/``rope_scaling``."""
    params = c.get("rope_parameters") or {}
    local = dict(params.get("sliding_attention") or {})
    full = dict(params.get("full_attention") or {})
    full.update(c.get("rope_scaling") or {})
    local_theta = float(local.pop("rope_theta", c.get("rope_local_base_freq", HF_DEFAULTS["rope_local_base_freq"])))
    theta = float(full.pop("rope_theta", c.get("rope_theta", HF_DEFAULTS["rope_theta"])))
    if local.get("rope_type", "default") != "default":
        raise UnsupportedError(f"gemma3: scaled rope on sliding layers ({local}) is not supported")
    if full.get("rope_type", full.get("type", "default")) == "default":
        full = {}
    return local_theta, theta, tuple(sorted(full.items()))


def sliding_layers(n_layer: int, types: Any, pattern: int) -> tuple[bool, ...]:
    if types is None:  # every pattern-th layer is full (transformers' and llama.cpp's rule)
        return tuple(bool((il + 1) % pattern) for il in range(n_layer))
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if len(types) != n_layer or unknown:
        raise UnsupportedError(f"gemma3: layer_types {types} are not {n_layer} of sliding/full_attention")
    return tuple(t == "sliding_attention" for t in types)


# llama's names, but the norm after attention is a post-norm and the FFN has its own pre- and post-norms
GEMMA_HF_NAMES: dict[str, Target] = {
    **LLAMA_HF_NAMES,
    "model.layers.{L}.post_attention_layernorm.weight": "blk.{L}.post_attention_norm",
    "model.layers.{L}.pre_feedforward_layernorm.weight": "blk.{L}.ffn_norm",
    "model.layers.{L}.post_feedforward_layernorm.weight": "blk.{L}.post_ffw_norm",
}


# Gemma's turn format, for files without a template: BOS, then <start_of_turn>ROLE ... <end_of_turn> per message
# (the assistant's role is "model"; a system message opens the first user turn, as Gemma has no system role).
GEMMA_TURNS = (
    "{{- bos_token -}}"
    "{%- set system = messages[0]['content'] | trim + '\n\n' if messages and messages[0]['role'] == 'system' "
    "else '' -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' -}}"
    "{{- (system if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


class Gemma3(ModelFamily):
    name = "gemma3"
    hf_model_types: tuple[str, ...] = ("gemma3_text", "gemma3")
    gguf_architectures: tuple[str, ...] = ("gemma3",)
    chat_template = GEMMA_TURNS
    end_of_turn = ("<end_of_turn>",)
    hf_naming = Naming(
        GEMMA_HF_NAMES,
        # transformers 5 keeps the language model under model.language_model.; published gemma3 checkpoints under
        # language_model.model. (and its head under language_model.lm_head.)
        prefixes={"model.language_model.": "model.", "language_model.model.": "model.", "language_model.": ""},
        ignore=(r"(model\.)?vision_tower\..*", r"(model\.)?multi_modal_projector\..*", r".*rotary_emb\.inv_freq"),
    )
    gguf_naming = Naming(passthrough=True, norm_shift=-1.0)  # stored 1 + w; the graph computes 1 + w in float32

    def config_from_hf(self, config: dict[str, Any]) -> Gemma3Config:
        c = {**HF_DEFAULTS, **config.get("text_config", config)}
        if c.get("use_bidirectional_attention"):
            raise UnsupportedError("gemma3 with use_bidirectional_attention (an encoder) is not supported")
        if c.get("hidden_activation", c.get("hidden_act")) != "gelu_pytorch_tanh":
            raise UnsupportedError(f"gemma3: activation {c.get('hidden_activation')!r} (known: gelu_pytorch_tanh)")
        n_layer = int(c["num_hidden_layers"])
        local_theta, theta, scaling = _rope_split(c)
        return Gemma3Config(
            vocab=int(c["vocab_size"]),
            hidden=int(c["hidden_size"]),
            n_layer=n_layer,
            n_head=int(c["num_attention_heads"]),
            n_kv=int(c["num_key_value_heads"]),
            head_dim=int(c["head_dim"]),
            ffn=int(c["intermediate_size"]),
            qk_norm=True,
            window=int(c["sliding_window"]),  # attn_logit_softcapping is Gemma 2's: transformers' Gemma 3 ignores it
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(c["rms_norm_eps"]),
            norm_plus_one=True,
            tied=bool(config.get("tie_word_embeddings", c["tie_word_embeddings"])),
            ctx=int(c["max_position_embeddings"]),
            sliding=sliding_layers(n_layer, c.get("layer_types"), int(c["sliding_window_pattern"])),
            local_theta=local_theta,
            attn_scale=float(c["query_pre_attn_scalar"]) ** -0.5,
            final_softcap=float(c["final_logit_softcapping"]) if c.get("final_logit_softcapping") else None,
        )

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Gemma3Config:
        kw = gguf_config(meta, "gemma3")
        hidden, n_head, n_layer = kw["hidden"], kw["n_head"], kw["n_layer"]
        # llama.cpp's rule: Gemma 3 27B (62 layers) scales by hidden / heads, the others by head_dim (what each
        # checkpoint's query_pre_attn_scalar says; GGUF has no key for it)
        scalar = hidden // n_head if n_layer == 62 else kw["head_dim"]
        softcap = meta.get("gemma3.final_logit_softcapping")
        return Gemma3Config(
            **{**kw, "n_rot": None},
            qk_norm=True,
            norm_plus_one=True,
            tied="output" not in shapes,
            sliding=sliding_layers(n_layer, None, int(meta.get("gemma3.attention.sliding_window_pattern", 6))),
            local_theta=float(meta.get("gemma3.rope.freq_base_swa", 10_000.0)),
            attn_scale=float(scalar) ** -0.5,
            final_softcap=float(softcap) if softcap else None,
        )

    def build(self, config: Gemma3Config, tokens: int, n_logits: int | None = None) -> Graph:
        return build(config, tokens, n_logits)


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Gemma3())

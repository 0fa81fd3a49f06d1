"""Qwen3-Next: a Gated DeltaNet hybrid (``models/hybrid.py``): three linear-attention layers to one full-attention
layer (``layer_types``), full layers with a sigmoid output gate, q/k norms and partial rotary; (1 + w) RMSNorms;
an MoE of softmax top-k experts (renormalized when ``norm_topk_prob``) beside a sigmoid-gated shared expert.
Its in_proj_qkvz / in_proj_ba group [q k v z] / [b a] per key head (GGUF arch ``qwen3next``: ssm_in, ssm_ba);
thinks in <think> ... </think>."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorweave.core.graph import Graph
from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.errors import UnsupportedError
from tensorweave.models import hybrid
from tensorweave.models.hybrid import HybridConfig


class Qwen3Next(ModelFamily):
    name = "qwen3_next"
    hf_model_types: tuple[str, ...] = ("qwen3_next",)
    gguf_architectures: tuple[str, ...] = ("qwen3next",)
    hf_naming = hybrid.HF_NAMING
    gguf_naming = hybrid.GGUF_NAMING
    reasoning_tags = ("<think>", "</think>")

    def config_from_hf(self, config: dict[str, Any]) -> HybridConfig:
        return HybridConfig(**hybrid.hf_hybrid(config))

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> HybridConfig:
        cfg = hybrid.gguf_hybrid(meta, shapes, "qwen3next")
        if not cfg.grouped_in:  # refused rather than read in a value-head order we cannot tell from the file
            raise UnsupportedError(
                "qwen3next GGUF with split linear-attention projections (attn_qkv, ...) instead of ssm_in/ssm_ba "
                "is not supported: converters differ in their value-head order there"
            )
        return cfg

    def build(self, config: HybridConfig, tokens: int, n_logits: int | None = None) -> Graph:
        return hybrid.build(config, tokens, n_logits)


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen3Next())

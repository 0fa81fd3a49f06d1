"""Qwen3.5-MoE (language model): Qwen3-Next's layer design (``models/hybrid.py``) with the linear-attention
projections apart (in_proj_qkv holding q|k|v as blocks, in_proj_z, in_proj_b, in_proj_a), a router that always
renormalizes its top-k, and mrope, which with text-only positions (all three sections alike) is plain partial
rotary. A multimodal checkpoint's vision tower and ``mtp.*`` tensors are ignored. GGUF arch ``qwen35moe``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.models import hybrid
from tensorweave.models.hybrid import HybridConfig
from tensorweave.models.qwen3_next import Qwen3Next


class Qwen35Moe(Qwen3Next):
    name = "qwen3_5_moe"
    hf_model_types: tuple[str, ...] = ("qwen3_5_moe", "qwen3_5_moe_text")
    gguf_architectures: tuple[str, ...] = ("qwen35moe",)
    gguf_naming = hybrid.GGUF_TILED_NAMING  # llama.cpp tiles the value heads of qwen35moe

    def config_from_hf(self, config: dict[str, Any]) -> HybridConfig:
        return HybridConfig(**hybrid.hf_hybrid(config, norm_topk=True), grouped_in=False)

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> HybridConfig:
        return replace(hybrid.gguf_hybrid(meta, shapes, meta["general.architecture"]), grouped_in=False)


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen35Moe())

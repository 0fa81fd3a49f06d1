"""Qwen3.5 (dense, language model): Qwen3.5-MoE's layers (``models/hybrid.py``: Gated DeltaNet with q|k|v, z, b, a
projected apart, gated full attention, partial rotary) with a dense SwiGLU FFN in every layer. GGUF arch ``qwen35``
(value heads tiled by llama.cpp's converter, regrouped at load); vision and ``mtp.*`` tensors ignored."""

from __future__ import annotations

from collections.abc import Callable

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.models.qwen3_5_moe import Qwen35Moe


class Qwen35(Qwen35Moe):
    name = "qwen3_5"
    hf_model_types: tuple[str, ...] = ("qwen3_5", "qwen3_5_text")
    gguf_architectures: tuple[str, ...] = ("qwen35",)


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen35())

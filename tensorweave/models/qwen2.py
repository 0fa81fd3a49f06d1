"""Qwen2 / Qwen2.5 (dense): llama with biases on q, k and v (none on o), NEOX rope without llama.cpp's Q/K row
interleave in GGUF (arch ``qwen2``), and Qwen's sliding-window switches (``use_sliding_window``, ``layer_types`` or
``max_window_layers``), which the later Qwen families keep."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.models.blocks import Config
from tensorweave.models.llama import Llama, gguf_common, hf_config


def hf_qwen(config: dict[str, Any]) -> dict[str, Any]:
    """Config fields of a Qwen config.json: llama's, with the window only where ``use_sliding_window`` puts it."""
    kw = hf_config(config)
    if not config.get("use_sliding_window"):
        kw["window"] = None
    elif config.get("layer_types"):
        kw["window_layers"] = tuple(i for i, t in enumerate(config["layer_types"]) if t == "sliding_attention")
    else:
        first = int(config.get("max_window_layers", 0))
        kw["window_layers"] = tuple(range(first, kw["n_layer"]))
    return kw


class Qwen2(Llama):
    name = "qwen2"
    hf_model_types: tuple[str, ...] = ("qwen2",)
    gguf_architectures: tuple[str, ...] = ("qwen2",)
    gguf_permuted_qk = False

    def config_from_hf(self, config: dict[str, Any]) -> Config:
        return Config(**{**hf_qwen(config), "qkv_bias": True, "o_bias": False})

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Config:
        return gguf_common(meta, shapes, "qwen2")


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen2())

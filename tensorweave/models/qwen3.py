"""Qwen3 (dense): llama with an RMSNorm over every q and k head before rope and a head_dim chosen independently
of hidden_size / heads; optional sliding window on layers past ``max_window_layers``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.models.blocks import Config
from tensorweave.models.llama import Llama, gguf_common, hf_config


def hf_qwen3(config: dict[str, Any]) -> dict[str, Any]:
    """Config fields of a Qwen3 config.json (shared with Qwen3-MoE)."""
    kw = hf_config(config)
    kw["qk_norm"] = True
    if not config.get("use_sliding_window"):
        kw["window"] = None
    elif config.get("layer_types"):
        kw["window_layers"] = tuple(i for i, t in enumerate(config["layer_types"]) if t == "sliding_attention")
    else:
        first = int(config.get("max_window_layers", 0))
        kw["window_layers"] = tuple(range(first, kw["n_layer"]))
    return kw


class Qwen3(Llama):
    name = "qwen3"
    hf_model_types: tuple[str, ...] = ("qwen3",)
    gguf_architectures: tuple[str, ...] = ("qwen3",)
    gguf_permuted_qk = False
    reasoning_tags = ("<think>", "</think>")

    def config_from_hf(self, config: dict[str, Any]) -> Config:
        return Config(**hf_qwen3(config))

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Config:
        return gguf_common(meta, shapes, "qwen3")


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen3())

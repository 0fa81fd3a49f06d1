"""Qwen3 (dense): llama with an RMSNorm over every q and k head before rope and a head_dim chosen independently
of hidden_size / heads; Qwen's sliding-window switches (qwen2.hf_qwen); thinks in <think> ... </think>."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.models.blocks import Config
from tensorweave.models.llama import Llama, gguf_common
from tensorweave.models.qwen2 import hf_qwen


def hf_qwen3(config: dict[str, Any]) -> dict[str, Any]:
    """Config fields of a Qwen3 config.json (shared with Qwen3-MoE)."""
    return {**hf_qwen(config), "qk_norm": True}


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

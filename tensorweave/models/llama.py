"""Llama 2/3 and Mistral-style models: GQA, rope (with llama3 or linear scaling), optional sliding window, tied or
untied head. The graph is ``transformer.build`` with these switches; this file maps the checkpoint configs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tensorweave.core.graph import Graph
from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.errors import UnsupportedError
from tensorweave.models import transformer
from tensorweave.models.transformer import Config


class Llama(ModelFamily):
    name = "llama"
    hf_model_types: tuple[str, ...] = ("llama", "mistral")
    gguf_architectures: tuple[str, ...] = ("llama",)
    gguf_permuted_qk = True  # llama.cpp's converter interleaves Q/K rows for its "normal" rope; the loader undoes it

    def config_from_hf(self, config: dict[str, Any]) -> Config:
        if config.get("mlp_bias"):
            raise UnsupportedError("llama with mlp_bias=true is not supported")
        return Config(**transformer.hf_config(config))

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Config:
        return gguf_common(meta, shapes, meta["general.architecture"])

    def build(self, config: Config, tokens: int) -> Graph:
        return transformer.build(config, tokens)


def gguf_common(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], arch: str, **extra: Any) -> Config:
    """What every llama-like GGUF shares: the metadata keys plus facts only the tensor list tells (tied head,
    biases, q/k norms, rope frequency factors)."""
    kw = transformer.gguf_config(meta, arch)
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


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Llama())

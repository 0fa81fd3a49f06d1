"""Qwen3-MoE: Qwen3 attention, and on sparse layers a softmax router over all experts, top-k, the k weights
renormalized only when ``norm_topk_prob``; layers in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid
keep a dense SwiGLU FFN. Experts are sliced along their FFN axis on every device (no expert parallelism) and the
reduce happens once per block, after the routing-weighted sum (``moe_ffn``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.models.blocks import Config
from tensorweave.models.llama import gguf_moe
from tensorweave.models.qwen3 import Qwen3, hf_qwen3


class Qwen3Moe(Qwen3):
    name = "qwen3_moe"
    hf_model_types: tuple[str, ...] = ("qwen3_moe",)
    gguf_architectures: tuple[str, ...] = ("qwen3moe",)

    def config_from_hf(self, config: dict[str, Any]) -> Config:
        kw = hf_qwen3(config)
        n_expert = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        step = int(config.get("decoder_sparse_step", 1) or 1)
        only_mlp = set(config.get("mlp_only_layers") or ())
        dense = tuple(il for il in range(kw["n_layer"]) if il in only_mlp or (il + 1) % step != 0)
        return Config(
            **kw,
            n_expert=n_expert,
            top_k=int(config["num_experts_per_tok"]),
            norm_topk=bool(config.get("norm_topk_prob", False)),
            expert_ffn=int(config["moe_intermediate_size"]),
            dense_layers=dense,
        )

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Config:
        return gguf_moe(meta, shapes, "qwen3moe")


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen3Moe())

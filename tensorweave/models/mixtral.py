"""Mixtral: Mistral attention with a mixture of experts in every layer (softmax router over all experts, top-k,
weights renormalized). Hugging Face checkpoints name the block ``block_sparse_moe`` with experts ``w1`` (gate),
``w3`` (up), ``w2`` (down), one tensor per expert; transformers' in-memory names (``mlp.experts.gate_up_proj``) are
llama's and read too. llama.cpp stores Mixtral as GGUF arch ``llama`` with stacked ``ffn_*_exps`` (older files: one
``ffn_gate.E`` per expert): this family claims the llama files that carry ``llama.expert_count``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import GGUF_NAMES, LLAMA_HF, ModelFamily
from tensorweave.models.blocks import Config
from tensorweave.models.llama import Llama, gguf_moe, hf_config

EXPERTS = {"w1": "gate", "w3": "up", "w2": "down"}


class Mixtral(Llama):
    name = "mixtral"
    hf_model_types: tuple[str, ...] = ("mixtral",)
    gguf_requires = ("{arch}.expert_count",)
    hf_naming = replace(
        LLAMA_HF,
        names={
            **LLAMA_HF.names,
            "model.layers.{L}.block_sparse_moe.gate.weight": "blk.{L}.ffn_gate_inp",
            **{
                f"model.layers.{{L}}.block_sparse_moe.experts.{{E}}.{w}.weight": f"blk.{{L}}.ffn_{x}_exps"
                for w, x in EXPERTS.items()
            },
        },
    )
    gguf_naming = replace(
        GGUF_NAMES, names={f"blk.{{L}}.ffn_{x}.{{E}}": f"blk.{{L}}.ffn_{x}_exps" for x in EXPERTS.values()}
    )

    def config_from_hf(self, config: dict[str, Any]) -> Config:
        return Config(
            **hf_config(config),
            n_expert=int(config["num_local_experts"]),
            top_k=int(config["num_experts_per_tok"]),
            norm_topk=True,
            expert_ffn=int(config["intermediate_size"]),
        )

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Config:
        return gguf_moe(meta, shapes, meta["general.architecture"])


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Mixtral())

"""Qwen3-MoE: Qwen3 attention, and on sparse layers a softmax router over all experts, top-k, the k weights
renormalized only when ``norm_topk_prob``; layers in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid
keep a dense SwiGLU FFN. Experts are sliced along their FFN axis on every device (no expert parallelism) and the
reduce happens once per block, after the routing-weighted sum (``moe_ffn``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import ModelFamily
from tensorweave.errors import ModelFormatError, UnsupportedError
from tensorweave.models.blocks import Config
from tensorweave.models.llama import gguf_common
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
        arch = "qwen3moe"
        n_layer = int(meta[f"{arch}.block_count"])
        # GGUF has no per-layer dense flag: a layer is dense when it carries ffn_up instead of expert tensors.
        dense = tuple(il for il in range(n_layer) if f"blk.{il}.ffn_up_exps" not in shapes)
        sparse = [il for il in range(n_layer) if il not in dense]
        if not sparse:
            raise ModelFormatError(f"{arch} GGUF has no expert tensors (blk.N.ffn_up_exps) in any layer")
        # MoE keys llama.cpp honours when present; a file that sets them means them
        gating = {1: "softmax", 2: "sigmoid"}.get(int(meta.get(f"{arch}.expert_gating_func", 1)))
        if gating is None:
            raise ModelFormatError(f"{arch}: unknown expert_gating_func {meta[f'{arch}.expert_gating_func']}")
        if int(meta.get(f"{arch}.expert_shared_count", 0)):
            raise UnsupportedError(f"{arch}: shared experts (expert_shared_count) are not part of this family")
        return gguf_common(
            meta,
            shapes,
            arch,
            n_expert=int(meta[f"{arch}.expert_count"]),
            top_k=int(meta[f"{arch}.expert_used_count"]),
            # llama.cpp's qwen3moe always renormalizes unless the file says otherwise
            norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", True)),
            route_gating=gating,
            route_scale=float(meta.get(f"{arch}.expert_weights_scale", 1.0)),
            expert_ffn=int(meta.get(f"{arch}.expert_feed_forward_length") or shapes[f"blk.{sparse[0]}.ffn_up_exps"][1]),
            dense_layers=dense,
        )


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Qwen3Moe())

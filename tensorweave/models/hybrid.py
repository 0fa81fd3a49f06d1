"""Blocks of the Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5-MoE): ``HybridConfig``, the full-attention layer with a
sigmoid output gate (``gated_attention``), the linear-attention layer (``gated_deltanet``) and ``build``, which
interleaves them by ``layer_types`` before the llama-like FFN/MoE blocks of ``blocks``.

Splitting (llama.cpp's tensor mode after b8738): a linear-attention layer splits by key-head groups, each device
keeping the value heads that read its key heads, so its q/k/v/z/a/b projections, conv channels, ``dt_bias``,
``A`` and both recurrent states split alike and its output projection is row-parallel: one allreduce per layer. A
device with no key head holds zero-size shards. The full-attention layer splits by KV head; its q_proj rows hold
``[query | gate]`` per head, so a KV-head group of rows carries its gates along.

Norms are (1 + w) in the checkpoints; the families' namings shift them at load (``Naming.norm_shift``) so the
graph multiplies by its weights as they are; the gated norm of a linear layer is plain ``w`` and is named so the
shift misses it (``ssm_norm_gated``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorweave.core import dtypes
from tensorweave.core.graph import Graph, Tensor
from tensorweave.core.model import LLAMA_HF_NAMES, Derived, Naming, Target, piece
from tensorweave.core.sharding import Role
from tensorweave.errors import ModelFormatError, UnsupportedError
from tensorweave.models import blocks
from tensorweave.models.blocks import Config, Layer
from tensorweave.models.llama import build as llama_build
from tensorweave.models.llama import gguf_config, hf_config

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class HybridConfig(Config):
    layer_types: tuple[str, ...] = ()  # per layer: "linear_attention" (Gated DeltaNet) or "full_attention"
    lin_k_heads: int = 2
    lin_v_heads: int = 4
    lin_k_dim: int = 8
    lin_v_dim: int = 8
    conv_kernel: int = 4
    # Qwen3-Next fuses q, k, v, z per key head in one projection (ssm_in) and b, a in another (ssm_ba); Qwen3.5
    # projects q|k|v as blocks (cut into ssm_in_q/k/v at load), z (attn_gate), b (ssm_beta), a (ssm_alpha) apart
    grouped_in: bool = True


def _lin(g: Graph, cfg: HybridConfig, il: int, name: str, shape: tuple[int, ...], role: Role = Role.COLUMN) -> Tensor:
    """A linear-attention weight, split in whole key-head groups (rows of column-parallel ones, columns of ssm_out)."""
    return g.weight(f"blk.{il}.{name}", shape, role, groups=cfg.lin_k_heads, layer=_turn(cfg, il))


def _turn(cfg: HybridConfig, il: int) -> int:
    """Where uneven shards' remainders go in linear-attention layer ``il``: rotated among the layers of its kind
    (its index among them), as llama.cpp does, so they spread evenly whatever the layer pattern."""
    return cfg.layer_types[:il].count(LINEAR)


def gated_deltanet(g: Graph, cfg: HybridConfig, il: int, h: Tensor) -> Tensor:
    """Gated DeltaNet: q, k, v through a causal conv (SiLU), q and k L2-normed, the gated delta rule over the tokens
    with decay g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), an RMSNorm gated by silu(z), and the
    row-parallel output projection. Conv states (q, k, v apart) and the SSM state are caches of kind "state"."""
    T, H = h.shape
    nk, nv, dk, dv, K = cfg.lin_k_heads, cfg.lin_v_heads, cfg.lin_k_dim, cfg.lin_v_dim, cfg.conv_kernel
    r, turn = nv // nk, _turn(cfg, il)
    if cfg.grouped_in:  # [q k v z] and [b a] per key head
        per = 2 * dk + 2 * r * dv
        qkvz = g.reshape(g.linear(h, _lin(g, cfg, il, "ssm_in", (nk * per, H))), shape=(T, nk, per))
        ba = g.reshape(g.linear(h, _lin(g, cfg, il, "ssm_ba", (nk * 2 * r, H))), shape=(T, nk, 2 * r))
        cuts = {"q": (0, dk), "k": (dk, 2 * dk), "v": (2 * dk, 2 * dk + r * dv), "z": (2 * dk + r * dv, per)}
        qkvz_parts = {n: g.slice(qkvz, axis=2, start=a, stop=b) for n, (a, b) in cuts.items()}
        mixed = {n: g.reshape(p, shape=(T, p.shape[1] * p.shape[2])) for n, p in qkvz_parts.items()}
        b = g.reshape(g.slice(ba, axis=2, start=0, stop=r), shape=(T, nv))
        a = g.reshape(g.slice(ba, axis=2, start=r, stop=2 * r), shape=(T, nv))
    else:
        rows = {"q": nk * dk, "k": nk * dk, "v": nv * dv}
        mixed = {n: g.linear(h, _lin(g, cfg, il, f"ssm_in_{n}", (w, H))) for n, w in rows.items()}
        mixed["z"] = g.linear(h, _lin(g, cfg, il, "attn_gate", (nv * dv, H)))
        b = g.linear(h, _lin(g, cfg, il, "ssm_beta", (nv, H)))
        a = g.linear(h, _lin(g, cfg, il, "ssm_alpha", (nv, H)))
    conv = {}
    for n in "qkv":
        C = mixed[n].shape[1]
        state = g.cache(f"blk.{il}.conv_{n}", (K - 1, C), "state", axis=1, groups=nk, layer=turn)
        conv[n] = g.conv1d_causal(mixed[n], _lin(g, cfg, il, f"ssm_conv1d_{n}", (C, K)), state)
    q = g.l2_norm(g.reshape(conv["q"], shape=(T, nk, dk)), eps=1e-6)
    k = g.l2_norm(g.reshape(conv["k"], shape=(T, nk, dk)), eps=1e-6)
    v = g.reshape(conv["v"], shape=(T, nv, dv))
    decay = g.mul(g.softplus(g.add(a, _lin(g, cfg, il, "ssm_dt.bias", (nv,)))), _lin(g, cfg, il, "ssm_a", (nv,)))
    # the SSM state sums over every token so far: float32 even when activations are 16-bit (float64 stays float64)
    sdt = dtypes.float64 if g.dtype == dtypes.float64 else dtypes.float32
    state = g.cache(f"blk.{il}.ssm_state", (nv, dk, dv), "state", axis=0, groups=nk, layer=turn, dtype=sdt)
    y = g.gated_delta_rule(q, k, v, decay, g.sigmoid(b), state, scale=dk**-0.5)
    z = g.reshape(mixed["z"], shape=(T, nv, dv))
    y = g.rms_norm_gated(y, z, g.weight(f"blk.{il}.ssm_norm_gated", (dv,)), eps=cfg.norm_eps)
    return g.linear(g.reshape(y, shape=(T, nv * dv)), _lin(g, cfg, il, "ssm_out", (H, nv * dv), Role.ROW))


def gated_attention(g: Graph, cfg: HybridConfig, layer: Layer, h: Tensor, pos: Tensor) -> Tensor:
    """Full attention whose output is scaled by sigmoid(gate) per head before o_proj; q_proj rows interleave
    [query | gate] per head; q/k RMSNorm per head; rope over the first ``n_rot`` dims (partial rotary)."""
    T, H, hd, nh, nkv = h.shape[0], cfg.hidden, layer.head_dim, layer.n_head, layer.n_kv
    qg = g.reshape(g.linear(h, blocks.weight(g, layer, "attn_q", (nh * 2 * hd, H), Role.COLUMN)), shape=(T, nh, 2 * hd))
    q, gate = g.slice(qg, axis=2, start=0, stop=hd), g.slice(qg, axis=2, start=hd, stop=2 * hd)
    k, v = (
        g.reshape(g.linear(h, blocks.weight(g, layer, f"attn_{n}", (nkv * hd, H), Role.COLUMN)), shape=(T, nkv, hd))
        for n in "kv"
    )
    q, k = blocks.norm(g, cfg, q, layer, "attn_q_norm"), blocks.norm(g, cfg, k, layer, "attn_k_norm")
    r = layer.rope
    rope = {"theta": r.theta, "neox": r.neox, "n_rot": r.n_rot, "scaling": dict(r.scaling) or None}
    q, k = g.rope(q, pos, **rope), g.rope(k, pos, **rope)
    a = g.attention(q, k, v, pos, scale=hd**-0.5, cache=blocks.kv_cache(g, cfg, layer))
    a = g.mul(a, g.sigmoid(gate))
    return g.linear(g.reshape(a, shape=(T, nh * hd)), blocks.weight(g, layer, "attn_output", (H, nh * hd), Role.ROW))


def mixer(g: Graph, cfg: HybridConfig, layer: Layer, h: Tensor, pos: Tensor) -> Tensor:
    """The layer's token mixer by ``layer_types``: Gated DeltaNet or gated attention."""
    if cfg.layer_types[layer.index] == LINEAR:
        return gated_deltanet(g, cfg, layer.index, h)
    return gated_attention(g, cfg, layer, h, pos)


def build(cfg: HybridConfig, tokens: int, n_logits: int | None = None) -> Graph:
    """llama's step (``llama.build``) with the hybrid's mixers; its FFN blocks are the routed experts plus a
    sigmoid-gated shared expert, or a dense gated FFN on the dense layers."""
    return llama_build(cfg, tokens, n_logits, mixer)


# --- configs -------------------------------------------------------------------------------------------------------


def hf_hybrid(c: dict[str, Any], norm_topk: bool | None = None) -> dict[str, Any]:
    """HybridConfig fields of a Qwen3-Next / Qwen3.5(-MoE) config.json (a multimodal one: its ``text_config``).
    ``norm_topk``: the family's fixed rule for renormalizing the top-k weights (None: ``norm_topk_prob``)."""
    if isinstance(c.get("text_config"), dict):
        c = {"tie_word_embeddings": c.get("tie_word_embeddings", False), **c["text_config"]}
    kw = hf_config({"intermediate_size": 0, **c})
    n = kw["n_layer"]
    interval = int(c.get("full_attention_interval") or 4)
    types = tuple(c.get("layer_types") or (LINEAR if (i + 1) % interval else FULL for i in range(n)))
    if len(types) != n or set(types) - {LINEAR, FULL}:
        raise UnsupportedError(f"layer_types must be {n} of {LINEAR!r}/{FULL!r}, got {list(types)}")
    n_expert = int(c.get("num_experts") or 0)
    step = int(c.get("decoder_sparse_step", 1) or 1)
    only = set(c.get("mlp_only_layers") or ())
    nk, nv = int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
    if nv % nk:
        raise UnsupportedError(f"linear_num_value_heads {nv} is not a multiple of linear_num_key_heads {nk}")
    return {
        **kw,
        "qk_norm": True,
        "n_expert": n_expert,
        "top_k": int(c.get("num_experts_per_tok") or 1),
        "norm_topk": bool(c.get("norm_topk_prob", True)) if norm_topk is None else norm_topk,
        "expert_ffn": int(c.get("moe_intermediate_size") or 0),
        "shared_ffn": int(c.get("shared_expert_intermediate_size") or 0),
        "dense_layers": tuple(il for il in range(n) if not n_expert or il in only or (il + 1) % step),
        "layer_types": types,
        "lin_k_heads": nk,
        "lin_v_heads": nv,
        "lin_k_dim": int(c["linear_key_head_dim"]),
        "lin_v_dim": int(c["linear_value_head_dim"]),
        "conv_kernel": int(c["linear_conv_kernel_dim"]),
    }


def gguf_hybrid(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], arch: str) -> HybridConfig:
    """A qwen3next / qwen35moe GGUF as llama.cpp's converter writes it: the llama-like keys, the ``ssm.*`` keys of
    the linear-attention layers (which are told by their ``ssm_out`` tensors) and the MoE keys."""

    def get(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ModelFormatError(f"GGUF metadata has no {arch}.{key}")
        return meta[f"{arch}.{key}"]

    kw = gguf_config(meta, arch)
    kw["tied"] = "output" not in shapes
    kw["qk_norm"] = True
    n = kw["n_layer"]
    types = tuple(LINEAR if f"blk.{il}.ssm_out" in shapes else FULL for il in range(n))
    nv = int(get("ssm.time_step_rank"))
    n_expert = int(meta.get(f"{arch}.expert_count", 0))
    dense = tuple(il for il in range(n) if f"blk.{il}.ffn_up_exps" not in shapes)
    # FFN widths from the tensors themselves: the files leave out the keys they do not need
    moe = next((il for il in range(n) if il not in dense), None)
    kw["ffn"] = kw["ffn"] or next((shapes[f"blk.{il}.ffn_up"][0] for il in dense if f"blk.{il}.ffn_up" in shapes), 0)
    return HybridConfig(
        **kw,
        n_expert=n_expert,
        top_k=int(meta.get(f"{arch}.expert_used_count", 1)),
        norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", True)),
        expert_ffn=shapes[f"blk.{moe}.ffn_up_exps"][1] if moe is not None else 0,
        shared_ffn=shapes[f"blk.{moe}.ffn_up_shexp"][0] if f"blk.{moe}.ffn_up_shexp" in shapes else 0,
        dense_layers=dense if n_expert else tuple(range(n)),
        layer_types=types,
        lin_k_heads=int(get("ssm.group_count")),
        lin_v_heads=nv,
        lin_k_dim=int(get("ssm.state_size")),
        lin_v_dim=int(get("ssm.inner_size")) // nv,
        conv_kernel=int(get("ssm.conv_kernel")),
        grouped_in=f"blk.{types.index(LINEAR)}.ssm_in" in shapes if LINEAR in types else True,
    )


# --- checkpoint names ----------------------------------------------------------------------------------------------


def untile(n_k: int, width: int) -> Callable[[int], np.ndarray]:
    """``Derived.order`` from llama.cpp's tiled value heads (k0v0 k1v0 k0v1 k1v1: ggml broadcasts key heads that
    way) to the graph's grouped ones (k0v0 k0v1 k1v0 k1v1), ``width`` entries per head."""

    def order(length: int) -> np.ndarray:
        tiled = np.arange(length).reshape(length // (n_k * width), n_k, width)  # [v per k, k, width]
        return tiled.transpose(1, 0, 2).reshape(-1)

    return order


def qkv_blocks(
    *fused: tuple[str, str, int | None], out: str, tiled: tuple[str, ...] = ()
) -> Callable[[Mapping[str, tuple[int, ...]], Mapping[str, Any]], dict[str, Target]]:
    """``Naming.shaped`` for tensors that hold q|k|v as blocks [key_dim | key_dim | value_dim] along axis 0 (the
    conv1d of both families, Qwen3.5's in_proj_qkv): each ``(stored pattern, graph pattern with {part}, squeezed
    axis)`` is cut into its three parts, key_dim = (rows - value_dim) / 2 with value_dim the width of the layer's
    output projection ``out``. ``tiled``: a GGUF whose value heads llama.cpp tiled (qwen35moe): the v parts and
    these per-value-head tensors of the layer (ssm_out along its columns) come back grouped."""

    def shaped(stored: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any]) -> dict[str, Target]:
        found: dict[str, Target] = {}
        nk = nv = 0
        if tiled:
            arch = meta.get("general.architecture")
            nk, nv = int(meta.get(f"{arch}.ssm.group_count", 0)), int(meta.get(f"{arch}.ssm.time_step_rank", 0))
            if not nk or not nv:
                raise ModelFormatError(f"{arch}: GGUF metadata has no ssm.group_count / ssm.time_step_rank")
        head, tail = out.split("{L}")
        for out_name, width in stored.items():
            layer = out_name[len(head) : len(out_name) - len(tail)]
            if not (out_name.startswith(head) and out_name.endswith(tail) and layer.isdigit()):
                continue
            vd = width[-1]
            for pattern, graph, squeeze in fused:
                name = pattern.format(L=layer)
                shape = stored.get(name)
                if shape is None:
                    continue
                if (shape[0] - vd) % 2 or shape[0] < vd:
                    raise ModelFormatError(f"{name} {shape}: no q|k|v blocks beside {out_name} {width}")
                kd = (shape[0] - vd) // 2
                cuts = {"q": (0, kd), "k": (kd, 2 * kd), "v": (2 * kd, shape[0])}
                found[name] = tuple(
                    Derived(
                        graph.format(L=layer, part=p),
                        rows=_fixed(*c),
                        squeeze=squeeze,
                        order=untile(nk, vd // nv) if tiled and p == "v" else None,
                    )
                    for p, c in cuts.items()
                )
            for t in tiled:  # per value head: dv rows (z), one entry (a, b, A, dt_bias), dv columns (ssm_out)
                name = f"blk.{layer}.{t}"
                if name in stored:
                    axis = 1 if t == "ssm_out" else 0
                    found[name] = Derived(name, axis=axis, order=untile(nk, stored[name][axis] // nv))
        return found

    return shaped


def _fixed(lo: int, hi: int) -> Callable[[int], tuple[int, int]]:
    return lambda length: (lo, hi)


def _neg_exp(a: np.ndarray) -> np.ndarray:
    return -np.exp(a.astype(np.float64)).astype(a.dtype)  # A = -exp(A_log), as llama.cpp stores ssm_a


_HF_LINEAR = {
    "linear_attn.in_proj_qkvz.weight": "ssm_in",
    "linear_attn.in_proj_ba.weight": "ssm_ba",
    "linear_attn.in_proj_z.weight": "attn_gate",
    "linear_attn.in_proj_b.weight": "ssm_beta",
    "linear_attn.in_proj_a.weight": "ssm_alpha",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.norm.weight": "ssm_norm_gated",
    "linear_attn.out_proj.weight": "ssm_out",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp",
    **{f"mlp.shared_expert.{x}_proj.weight": f"ffn_{x}_shexp" for x in ("gate", "up", "down")},
}
HF_NAMING = Naming(
    {
        **LLAMA_HF_NAMES,
        **{f"model.layers.{{L}}.{hf}": f"blk.{{L}}.{graph}" for hf, graph in _HF_LINEAR.items()},
        "model.layers.{L}.linear_attn.A_log": Derived("blk.{L}.ssm_a", transform=_neg_exp),
    },
    prefixes={"model.language_model.": "model."},
    ignore=(r"(.*\.)?rotary_emb\.inv_freq", r"mtp\..*", r"model\.visual\..*"),  # language model only
    norm_shift=1.0,  # every RMSNorm but the gated one is (1 + w)
    shaped=qkv_blocks(
        ("model.layers.{L}.linear_attn.conv1d.weight", "blk.{L}.ssm_conv1d_{part}", 1),
        ("model.layers.{L}.linear_attn.in_proj_qkv.weight", "blk.{L}.ssm_in_{part}", None),
        out="model.layers.{L}.linear_attn.out_proj.weight",
    ),
)
_GGUF_NAMES: dict[str, Target] = {
    "blk.{L}.post_attention_norm": "blk.{L}.ffn_norm",
    "blk.{L}.ssm_norm": "blk.{L}.ssm_norm_gated",
    # newer converters fuse the experts' gate and up projections, gate rows first (as transformers' gate_up_proj)
    "blk.{L}.ffn_gate_up_exps": (
        Derived("blk.{L}.ffn_gate_exps", axis=1, rows=piece(0, 2)),
        Derived("blk.{L}.ffn_up_exps", axis=1, rows=piece(1, 2)),
    ),
}
_GGUF_QKV = (
    ("blk.{L}.ssm_conv1d", "blk.{L}.ssm_conv1d_{part}", None),
    ("blk.{L}.attn_qkv", "blk.{L}.ssm_in_{part}", None),
)
# llama.cpp's converter adds the 1 to the (1 + w) norms itself, squeezes the conv and stores A = -exp(A_log); for
# qwen35moe it also tiles the value heads
GGUF_NAMING = Naming(_GGUF_NAMES, passthrough=True, shaped=qkv_blocks(*_GGUF_QKV, out="blk.{L}.ssm_out"))
GGUF_TILED_NAMING = Naming(
    _GGUF_NAMES,
    passthrough=True,
    shaped=qkv_blocks(
        *_GGUF_QKV,
        out="blk.{L}.ssm_out",
        tiled=("attn_gate", "ssm_beta", "ssm_alpha", "ssm_a", "ssm_dt.bias", "ssm_out"),
    ),
)

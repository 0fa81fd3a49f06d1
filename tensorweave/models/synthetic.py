"""A synthetic transformer: every knob the planner must handle, with random weights, no files.

Not a published architecture: it exists to throw head counts, KV-head counts, head dims, dense and MoE blocks,
sliding windows, softcaps, sinks and biases at the planner and executor (property tests), to measure the executor
(benchmarks/executor.py), and to show a tensor-parallel run without downloading anything (``tensorweave demo``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensorweave.core.graph import Graph, Tensor
from tensorweave.core.sharding import Role


@dataclass(frozen=True)
class Config:
    vocab: int = 50
    hidden: int = 16
    n_layer: int = 2
    n_head: int = 4
    n_kv: int = 2
    head_dim: int = 8
    ffn: int = 24
    n_expert: int = 0  # 0: dense FFN in every layer
    top_k: int = 2
    norm_topk: bool = True
    dense_layers: tuple[int, ...] = ()  # layers that stay dense in an MoE model
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False
    neox: bool = True
    n_rot: int | None = None
    tied: bool = False  # one vocab-split matrix for the embedding and the LM head
    ctx: int = 32
    dtype: str = "float32"


def build(cfg: Config, tokens: int) -> Graph:
    g = Graph(cfg.dtype, name=f"tiny-{tokens}")
    g.tokens = tokens
    H = cfg.hidden
    ids = g.input("tokens", (tokens,))
    pos = g.input("positions", (tokens,))
    embd = g.weight("tok_embd", (cfg.vocab, H), Role.VOCAB if cfg.tied else Role.REPLICATED)
    x = g.embedding(ids, embd)
    for il in range(cfg.n_layer):
        x = block(g, cfg, x, pos, il)
    h = g.rms_norm(x, g.weight("output_norm", (H,)), eps=1e-5)
    head = embd if cfg.tied else g.weight("output", (cfg.vocab, H), Role.VOCAB)
    g.output("logits", g.linear(h, head))
    return g


def block(g: Graph, cfg: Config, x: Tensor, pos: Tensor, il: int) -> Tensor:
    tokens, H, hd, nh, nkv = x.shape[0], cfg.hidden, cfg.head_dim, cfg.n_head, cfg.n_kv
    p = f"blk.{il}."

    def w(name: str, shape: tuple[int, ...], role: Role = Role.REPLICATED, groups: int | None = None) -> Tensor:
        return g.weight(p + name, shape, role, groups=groups, layer=il)

    h = g.rms_norm(x, w("attn_norm", (H,)), eps=1e-5)
    heads = {}
    for name, n in (("q", nh), ("k", nkv), ("v", nkv)):
        bias = w(f"attn_{name}.bias", (n * hd,), Role.COLUMN, nkv) if cfg.qkv_bias else None
        y = g.linear(h, w(f"attn_{name}", (n * hd, H), Role.COLUMN, nkv), bias)
        heads[name] = g.reshape(y, shape=(tokens, n, hd))
    q, k, v = heads["q"], heads["k"], heads["v"]
    if cfg.qk_norm:
        q = g.rms_norm(q, w("attn_q_norm", (hd,)), eps=1e-6)
        k = g.rms_norm(k, w("attn_k_norm", (hd,)), eps=1e-6)
    q = g.rope(q, pos, theta=10000.0, neox=cfg.neox, n_rot=cfg.n_rot)
    k = g.rope(k, pos, theta=10000.0, neox=cfg.neox, n_rot=cfg.n_rot)
    cache = (
        g.cache(p + "k_cache", (cfg.ctx, nkv, hd), groups=nkv, layer=il),
        g.cache(p + "v_cache", (cfg.ctx, nkv, hd), groups=nkv, layer=il),
    )
    sinks = w("attn_sinks", (nh,), Role.COLUMN, nkv) if cfg.sinks else None
    a = g.attention(q, k, v, pos, scale=hd**-0.5, cache=cache, sinks=sinks, window=cfg.window, softcap=cfg.softcap)
    a = g.reshape(a, shape=(tokens, nh * hd))
    o_bias = w("attn_output.bias", (H,)) if cfg.o_bias else None
    x = x + g.linear(a, w("attn_output", (H, nh * hd), Role.ROW, nkv), o_bias)
    h = g.rms_norm(x, w("ffn_norm", (H,)), eps=1e-5)
    if cfg.n_expert and il not in cfg.dense_layers:
        E, F = cfg.n_expert, cfg.ffn
        route = g.topk_route(g.linear(h, w("ffn_gate_inp", (E, H))), k=cfg.top_k, norm=cfg.norm_topk)
        y = g.moe_ffn(
            h,
            route,
            w("ffn_gate_exps", (E, F, H), Role.EXPERT_COLUMN),
            w("ffn_up_exps", (E, F, H), Role.EXPERT_COLUMN),
            w("ffn_down_exps", (E, H, F), Role.EXPERT_ROW),
        )
    else:
        gate = g.linear(h, w("ffn_gate", (cfg.ffn, H), Role.COLUMN))
        up = g.linear(h, w("ffn_up", (cfg.ffn, H), Role.COLUMN))
        y = g.linear(g.swiglu(gate, up), w("ffn_down", (H, cfg.ffn), Role.ROW))
    return x + y


def random_weights(g: Graph, seed: int) -> dict[str, np.ndarray]:
    """Weights of a well-conditioned random model: norm weights near 1, projections scaled by fan-in."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in g.weights.items():
        if t.ndim == 1 and "norm" in name:
            a = 1.0 + 0.1 * rng.standard_normal(t.shape)
        elif t.ndim == 1:
            a = 0.1 * rng.standard_normal(t.shape)
        else:
            a = rng.standard_normal(t.shape) / np.sqrt(t.shape[-1])
        out[name] = a.astype(t.dtype)
    return out

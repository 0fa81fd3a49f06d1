"""The decoder-only transformer every family here is a configuration of: embedding, N x (attention + FFN), head.

llama, qwen3 and qwen3_moe differ only in switches (q/k RMSNorm, MoE FFN on some layers, tied head, rope scaling,
sliding window), as transformers' modular files and llama.cpp's shared graph builders also show, so the graph code
lives once, here, and each family file holds its config mapping. Weight names are llama.cpp's GGUF names without the
``.weight`` suffix (``blk.3.attn_q``); a bias is ``blk.3.attn_q.bias``. Roles say how a weight splits over devices:
q/k/v and gate/up are column-parallel, o and down row-parallel, all in whole KV-head groups, experts along their
FFN axis, the embedding and the LM head (tied or not) by vocabulary rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tensorweave.core.graph import Graph, Tensor
from tensorweave.core.sharding import Role
from tensorweave.errors import ModelFormatError, UnsupportedError


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
    norm_topk: bool = True  # renormalize the top-k routing weights to sum to 1
    expert_ffn: int = 0  # FFN width of one expert (0: same as ffn)
    route_gating: str = "softmax"  # router probabilities: "softmax" over all experts or per-expert "sigmoid"
    route_scale: float = 1.0  # multiplies the routing weights after top-k (and renormalization)
    dense_layers: tuple[int, ...] = ()  # layers that stay dense in an MoE model
    qk_norm: bool = False  # RMSNorm over each q/k head before rope (qwen3)
    qkv_bias: bool = False
    o_bias: bool = False
    window: int | None = None  # sliding-window attention ...
    window_layers: tuple[int, ...] | None = None  # ... on these layers (None: all)
    softcap: float | None = None
    sinks: bool = False
    neox: bool = True  # rope pairs (i, i + d/2) as HF's rotate_half; False: (2i, 2i + 1)
    n_rot: int | None = None  # rotated dims per head (None: all)
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # HF rope_scaling items, e.g. (("rope_type", "llama3"), ...)
    norm_eps: float = 1e-5
    tied: bool = False  # one matrix for the embedding and the LM head
    ctx: int = 32  # KV-cache length in tokens
    dtype: str = "float32"

    def is_moe(self, il: int) -> bool:
        return self.n_expert > 0 and il not in self.dense_layers

    def window_of(self, il: int) -> int | None:
        return self.window if self.window_layers is None or il in self.window_layers else None


def build(cfg: Config, tokens: int) -> Graph:
    """The graph of one step over ``tokens`` new tokens at ``positions`` (reading and extending the KV cache)."""
    g = Graph(cfg.dtype, name=f"decoder-{tokens}")
    g.tokens = tokens
    ids = g.input("tokens", (tokens,))
    pos = g.input("positions", (tokens,))
    # Split by vocabulary rows (as vLLM's VocabParallelEmbedding): a device holds 1/N of the table and one small
    # allreduce per step joins the lookups; replicated, a 150k x 4096 table would cost every device ~1 GiB.
    embd = g.weight("token_embd", (cfg.vocab, cfg.hidden), Role.VOCAB)
    x = g.embedding(ids, embd)
    for il in range(cfg.n_layer):
        x = block(g, cfg, x, pos, il)
    h = g.rms_norm(x, g.weight("output_norm", (cfg.hidden,)), eps=cfg.norm_eps)
    head = embd if cfg.tied else g.weight("output", (cfg.vocab, cfg.hidden), Role.VOCAB)
    g.output("logits", g.linear(h, head))
    return g


def block(g: Graph, cfg: Config, x: Tensor, pos: Tensor, il: int) -> Tensor:
    """x + attention(norm(x)), then + ffn(norm(x)): one pre-norm decoder layer."""
    tokens, H, hd, nh, nkv = x.shape[0], cfg.hidden, cfg.head_dim, cfg.n_head, cfg.n_kv
    p = f"blk.{il}."

    def w(name: str, shape: tuple[int, ...], role: Role = Role.REPLICATED, groups: int | None = None) -> Tensor:
        return g.weight(p + name, shape, role, groups=groups, layer=il)

    h = g.rms_norm(x, w("attn_norm", (H,)), eps=cfg.norm_eps)
    heads = {}
    for name, n in (("q", nh), ("k", nkv), ("v", nkv)):
        bias = w(f"attn_{name}.bias", (n * hd,), Role.COLUMN, nkv) if cfg.qkv_bias else None
        y = g.linear(h, w(f"attn_{name}", (n * hd, H), Role.COLUMN, nkv), bias)
        heads[name] = g.reshape(y, shape=(tokens, n, hd))
    q, k, v = heads["q"], heads["k"], heads["v"]
    if cfg.qk_norm:
        q = g.rms_norm(q, w("attn_q_norm", (hd,)), eps=cfg.norm_eps)
        k = g.rms_norm(k, w("attn_k_norm", (hd,)), eps=cfg.norm_eps)
    rope = {"theta": cfg.rope_theta, "neox": cfg.neox, "n_rot": cfg.n_rot, "scaling": dict(cfg.rope_scaling) or None}
    q, k = g.rope(q, pos, **rope), g.rope(k, pos, **rope)
    window = cfg.window_of(il)
    slots = min(cfg.ctx, window) if window else cfg.ctx  # a sliding-window layer keeps a ring of `window` slots
    cache = (
        g.cache(p + "k_cache", (slots, nkv, hd), groups=nkv, layer=il),
        g.cache(p + "v_cache", (slots, nkv, hd), groups=nkv, layer=il),
    )
    sinks = w("attn_sinks", (nh,), Role.COLUMN, nkv) if cfg.sinks else None
    a = g.attention(q, k, v, pos, scale=hd**-0.5, cache=cache, sinks=sinks, window=window, softcap=cfg.softcap)
    a = g.reshape(a, shape=(tokens, nh * hd))
    o_bias = w("attn_output.bias", (H,)) if cfg.o_bias else None
    x = x + g.linear(a, w("attn_output", (H, nh * hd), Role.ROW, nkv), o_bias)
    h = g.rms_norm(x, w("ffn_norm", (H,)), eps=cfg.norm_eps)
    if cfg.is_moe(il):
        E, F = cfg.n_expert, cfg.expert_ffn or cfg.ffn
        logits = g.linear(h, w("ffn_gate_inp", (E, H)))
        route = g.topk_route(logits, k=cfg.top_k, norm=cfg.norm_topk, gating=cfg.route_gating, scale=cfg.route_scale)
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


# --- config mapping shared by the llama-like families ------------------------------------------------------------


def hf_config(c: dict[str, Any]) -> dict[str, Any]:
    """Config fields common to llama-like Hugging Face config.json files (both the transformers 5 style with a
    ``rope_parameters`` dict and the published top-level ``rope_theta``/``rope_scaling`` style)."""
    nh = int(c["num_attention_heads"])
    rope = dict(c.get("rope_parameters") or {})
    rope.update(c.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
    rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    head_dim = int(c.get("head_dim") or c["hidden_size"] // nh)
    window = c.get("sliding_window")
    return {
        "vocab": int(c["vocab_size"]),
        "hidden": int(c["hidden_size"]),
        "n_layer": int(c["num_hidden_layers"]),
        "n_head": nh,
        "n_kv": int(c.get("num_key_value_heads") or nh),
        "head_dim": head_dim,
        "ffn": int(c["intermediate_size"]),
        "qkv_bias": bool(c.get("attention_bias", False)),
        "o_bias": bool(c.get("attention_bias", False)),
        "rope_theta": theta,
        "rope_scaling": tuple(sorted(rope.items())),
        "n_rot": int(head_dim * c["partial_rotary_factor"]) if c.get("partial_rotary_factor") else None,
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "tied": bool(c.get("tie_word_embeddings", False)),
        "window": int(window) if window else None,
        "ctx": int(c.get("max_position_embeddings", 4096)),
    }


def gguf_config(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """Config fields from llama.cpp's GGUF metadata keys (``{arch}.embedding_length`` ...)."""

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelFormatError(f"GGUF metadata has no {arch}.{key}")
        return v

    nh = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // nh))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    window = meta.get(f"{arch}.attention.sliding_window")
    scaling: tuple[tuple[str, Any], ...] = ()
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear"))
    elif kind != "none":
        raise UnsupportedError(f"GGUF rope scaling {kind!r} is not supported (known: none, linear, rope_freqs)")
    return {
        "vocab": int(vocab),
        "hidden": hidden,
        "n_layer": int(get("block_count")),
        "n_head": nh,
        "n_kv": int(get("attention.head_count_kv", nh)),
        "head_dim": head_dim,
        "ffn": int(get("feed_forward_length", 0)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "n_rot": None if int(get("rope.dimension_count", head_dim)) == head_dim else int(get("rope.dimension_count")),
        "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "window": int(window) if window else None,
        "ctx": int(get("context_length", 4096)),
    }

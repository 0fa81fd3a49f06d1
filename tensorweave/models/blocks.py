"""Blocks of decoder-only transformers, which each family's ``build`` composes: embedding, attention (with its KV
cache), gated FFN, MoE, shared expert, head; plus ``Config``, the switches of the llama-like families, and ``Layer``,
what one layer's blocks read (head_dim, KV heads, rope and window may differ by layer).

Weight names are llama.cpp's GGUF names without the ``.weight`` suffix (``blk.3.attn_q``); a bias is
``blk.3.attn_q.bias``. Roles say how a weight splits over devices: q/k/v and gate/up are column-parallel, o and down
row-parallel, all in whole KV-head groups, experts along their FFN axis, the embedding and the LM head (tied or not)
by vocabulary rows. A block returns its contribution; the caller adds the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tensorweave.core.graph import Graph, Tensor
from tensorweave.core.sharding import Role


@dataclass(frozen=True)
class Rope:
    theta: float = 10000.0
    neox: bool = True  # rope pairs (i, i + d/2) as HF's rotate_half; False: (2i, 2i + 1)
    n_rot: int | None = None  # rotated dims per head (None: all)
    scaling: tuple[tuple[str, Any], ...] = ()  # HF rope_scaling items, e.g. (("rope_type", "llama3"), ...)


@dataclass(frozen=True)
class Layer:
    """One layer's shape: what its attention and FFN blocks read."""

    index: int
    n_head: int
    n_kv: int
    head_dim: int
    rope: Rope
    window: int | None  # sliding-window attention over this many keys (None: full)
    moe: bool  # a routed-experts FFN (else a dense gated FFN)
    scale: float | None = None  # attention logit scale (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar, 1.0)


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
    shared_ffn: int = 0  # FFN width of a shared expert beside the routed ones, gated by a sigmoid (0: none)
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
    neox: bool = True  # see Rope
    n_rot: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    norm_eps: float = 1e-5
    # RMSNorm by (1 + w) (Gemma 3): computed in float32 as transformers does, rather than a loader adding 1 to the
    # stored weights, which would round 1 + w to bfloat16 in a bfloat16 checkpoint
    norm_plus_one: bool = False
    tied: bool = False  # one matrix for the embedding and the LM head
    ctx: int = 32  # KV-cache length in tokens
    dtype: str = "float32"

    def layer(self, il: int) -> Layer:
        """Layer ``il``'s shape (a family whose layers differ in more than window and MoE overrides this)."""
        window = self.window if self.window_layers is None or il in self.window_layers else None
        rope = Rope(self.rope_theta, self.neox, self.n_rot, self.rope_scaling)
        moe = self.n_expert > 0 and il not in self.dense_layers
        return Layer(il, self.n_head, self.n_kv, self.head_dim, rope, window, moe)


def weight(g: Graph, layer: Layer, name: str, shape: tuple[int, ...], role: Role = Role.REPLICATED) -> Tensor:
    """Layer weight ``blk.{index}.{name}``; split weights go in whole KV-head groups (q/k/v/o, sinks)."""
    groups = layer.n_kv if name.startswith("attn_") and role is not Role.REPLICATED else None
    return g.weight(f"blk.{layer.index}.{name}", shape, role, groups=groups, layer=layer.index)


def embed(cfg: Config, tokens: int) -> tuple[Graph, Tensor, Tensor]:
    """A step's graph with inputs ``tokens`` and ``positions``: (graph, token embeddings, positions)."""
    g = Graph(cfg.dtype, name=f"decoder-{tokens}")
    g.tokens = tokens
    ids = g.input("tokens", (tokens,))
    pos = g.input("positions", (tokens,))
    # Split by vocabulary rows (as vLLM's VocabParallelEmbedding): a device holds 1/N of the table and one small
    # allreduce per step joins the lookups; replicated, a 150k x 4096 table would cost every device ~1 GiB.
    return g, g.embedding(ids, g.weight("token_embd", (cfg.vocab, cfg.hidden), Role.VOCAB)), pos


def norm(g: Graph, cfg: Config, x: Tensor, layer: Layer, name: str) -> Tensor:
    return g.rms_norm(x, weight(g, layer, name, (x.shape[-1],)), eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)


def kv_cache(g: Graph, cfg: Config, layer: Layer) -> tuple[Tensor, Tensor]:
    """Layer's K and V caches [slots, kv heads, head_dim], split by KV head; a sliding-window layer keeps a ring of
    ``window`` slots (when the window is shorter than the context)."""
    ring = layer.window if layer.window and layer.window < cfg.ctx else None
    shape, p = (ring or cfg.ctx, layer.n_kv, layer.head_dim), f"blk.{layer.index}."
    kind = "ring" if ring else "kv"
    return (
        g.cache(p + "k_cache", shape, kind, axis=1, groups=layer.n_kv, layer=layer.index, window=ring),
        g.cache(p + "v_cache", shape, kind, axis=1, groups=layer.n_kv, layer=layer.index, window=ring),
    )


def attention(g: Graph, cfg: Config, layer: Layer, h: Tensor, pos: Tensor) -> Tensor:
    """Grouped-query self-attention of normed ``h`` (optional q/k/v biases, q/k norms, sinks, softcap, window)."""
    tokens, H, hd, nh, nkv = h.shape[0], cfg.hidden, layer.head_dim, layer.n_head, layer.n_kv
    heads = {}
    for name, n in (("q", nh), ("k", nkv), ("v", nkv)):
        bias = weight(g, layer, f"attn_{name}.bias", (n * hd,), Role.COLUMN) if cfg.qkv_bias else None
        y = g.linear(h, weight(g, layer, f"attn_{name}", (n * hd, H), Role.COLUMN), bias)
        heads[name] = g.reshape(y, shape=(tokens, n, hd))
    q, k, v = heads["q"], heads["k"], heads["v"]
    if cfg.qk_norm:
        q, k = norm(g, cfg, q, layer, "attn_q_norm"), norm(g, cfg, k, layer, "attn_k_norm")
    r = layer.rope
    rope = {"theta": r.theta, "neox": r.neox, "n_rot": r.n_rot, "scaling": dict(r.scaling) or None}
    q, k = g.rope(q, pos, **rope), g.rope(k, pos, **rope)
    sinks = weight(g, layer, "attn_sinks", (nh,), Role.COLUMN) if cfg.sinks else None
    a = g.attention(
        q,
        k,
        v,
        pos,
        scale=hd**-0.5 if layer.scale is None else layer.scale,
        cache=kv_cache(g, cfg, layer),
        sinks=sinks,
        window=layer.window,
        softcap=cfg.softcap,
    )
    o_bias = weight(g, layer, "attn_output.bias", (H,)) if cfg.o_bias else None  # added after the reduce
    return g.linear(
        g.reshape(a, shape=(tokens, nh * hd)), weight(g, layer, "attn_output", (H, nh * hd), Role.ROW), o_bias
    )


def gated_ffn(g: Graph, layer: Layer, h: Tensor, ffn: int, kind: str = "", glu: str = "swiglu") -> Tensor:
    """down(silu(gate(h)) * up(h)), split along the FFN axis (``kind``: a name suffix such as ``_shexp``; ``glu``:
    the gated activation op, ``geglu`` for Gemma's tanh gelu)."""
    H = h.shape[-1]
    gate = g.linear(h, weight(g, layer, f"ffn_gate{kind}", (ffn, H), Role.COLUMN))
    up = g.linear(h, weight(g, layer, f"ffn_up{kind}", (ffn, H), Role.COLUMN))
    return g.linear(g.op(glu, gate, up), weight(g, layer, f"ffn_down{kind}", (H, ffn), Role.ROW))


def moe(g: Graph, cfg: Config, layer: Layer, h: Tensor) -> Tensor:
    """Routed experts: router -> top-k weights -> the weighted sum of the chosen experts' gated FFNs. Experts are
    sliced along their FFN axis on every device and reduced once, after the weighted sum."""
    E, F, H = cfg.n_expert, cfg.expert_ffn or cfg.ffn, h.shape[-1]
    logits = g.linear(h, weight(g, layer, "ffn_gate_inp", (E, H)))
    route = g.topk_route(logits, k=cfg.top_k, norm=cfg.norm_topk, gating=cfg.route_gating, scale=cfg.route_scale)
    return g.moe_ffn(
        h,
        route,
        weight(g, layer, "ffn_gate_exps", (E, F, H), Role.EXPERT_COLUMN),
        weight(g, layer, "ffn_up_exps", (E, F, H), Role.EXPERT_COLUMN),
        weight(g, layer, "ffn_down_exps", (E, H, F), Role.EXPERT_ROW),
    )


def shared_expert(g: Graph, cfg: Config, layer: Layer, h: Tensor) -> Tensor:
    """An expert every token uses, scaled by sigmoid(h @ gate^T): split like a dense FFN, so its partial sums join
    the routed experts' in the block's one reduce."""
    y = gated_ffn(g, layer, h, cfg.shared_ffn, "_shexp")
    return g.mul(y, g.sigmoid(g.linear(h, weight(g, layer, "ffn_gate_inp_shexp", (1, h.shape[-1])))))


def head(g: Graph, cfg: Config, x: Tensor, n_logits: int | None = None, softcap: float | None = None) -> Tensor:
    """Final norm and LM head (vocab-split; the tied head is the embedding) -> output ``logits``, for the last
    ``n_logits`` rows of ``x`` only (None: all): generation samples from a prompt's last row, not [tokens, vocab].
    ``softcap``: the logits become ``softcap * tanh(logits / softcap)`` (Gemma's final logit softcap)."""
    if n_logits is not None:  # a slice is a view: the norm and the head run on those rows alone
        x = g.slice(x, axis=0, start=x.shape[0] - n_logits, stop=x.shape[0])
    h = g.rms_norm(x, g.weight("output_norm", (cfg.hidden,)), eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)
    w = g.weight("token_embd" if cfg.tied else "output", (cfg.vocab, cfg.hidden), Role.VOCAB)
    logits = g.linear(h, w)
    return g.output("logits", g.tanh_softcap(logits, cap=softcap) if softcap else logits)

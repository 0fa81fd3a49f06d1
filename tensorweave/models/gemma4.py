"""Gemma 4 (text): Gemma 3's pre/post-normed decoder with plain ``w`` RMSNorms, plus

- per-layer attention shapes: sliding layers ``head_dim`` and ``num_key_value_heads``, full layers
  ``global_head_dim`` and (with ``attention_k_eq_v``) ``num_global_key_value_heads``; attention scale 1.0 after
  q/k norms and a weightless v norm; ``attention_k_eq_v`` full layers have no v projection (v is the k projection
  before k_norm and rope);
- proportional rope on full layers: ``partial_rotary_factor`` of the pairs rotate with frequencies over the whole
  head dim, the rest not at all (per-pair factors, infinite for the still pairs), sliding layers a plain rope;
- KV sharing: the last ``num_kv_shared_layers`` layers have no k/v weights and attend over the cache of the last
  non-shared layer of their type (its keys of this step included). Their q/o weights are split with that layer's
  boundaries, so the shared cache is read where it lies, with no collective; the cache op runs with
  ``write=False``, which also reads a ring another attention already advanced this step;
- per-layer embeddings (PLE): a vocabulary-split packed table [vocab, layers * d] scaled by sqrt(d), plus a
  projection of the embedding scaled by hidden**-0.5 and RMS-normed per layer, summed times 1/sqrt(2); each layer
  gates it (gelu(x W_gate) * ple), projects it back, norms and adds it; then the layer's output is scaled by
  ``layer_scalar``;
- an MoE block beside the dense MLP (``enable_moe_block``): router = weightless RMSNorm of the residual * scale *
  hidden**-0.5, softmax, top-k renormalised, times ``per_expert_scale``; fused gate_up experts with gelu; each branch
  post-normed, both reduced by one allreduce (the two partial sums travel concatenated);
- a final logit softcap.

Checkpoints: HF ``gemma4_text`` and the language model of ``gemma4``. Graph names follow llama.cpp's gemma4 names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from tensorweave.core.graph import Graph, Tensor
from tensorweave.core.hookspecs import hookimpl
from tensorweave.core.model import LLAMA_HF_NAMES, ModelFamily, Naming, Target
from tensorweave.core.sharding import Role
from tensorweave.errors import UnsupportedError
from tensorweave.models import blocks
from tensorweave.models.blocks import Config, Layer, Rope
from tensorweave.models.gemma3 import GEMMA_HF_NAMES, embed_scale, sliding_layers
from tensorweave.models.llama import gguf_config

STILL = float("inf")  # a rope pair factor that stops the pair rotating (its frequency becomes 0)


@dataclass(frozen=True)
class Gemma4Config(Config):
    sliding: tuple[bool, ...] = ()  # per layer: sliding-window attention (else full)
    local_theta: float = 10_000.0
    head_dims: tuple[int, ...] = ()  # per layer (HF per_layer_config, or head_dim / global_head_dim by type)
    kv_heads: tuple[int, ...] = ()  # per layer (num_key_value_heads, or num_global_key_value_heads on full layers)
    global_rope: tuple[tuple[str, Any], ...] = ()  # full layers' rope scaling (proportional: per-pair factors)
    k_eq_v: bool = False  # full layers: v is the raw k projection
    n_kv_shared: int = 0  # the last this many layers reuse an earlier layer's cache
    double_wide: bool = False  # KV-shared layers' dense MLP is 2 * ffn wide
    ple_dim: int = 0  # per-layer embedding width (0: no PLE)
    ple_vocab: int = 0
    moe_block: bool = False  # an MoE block beside the dense MLP in every layer
    final_softcap: float | None = None

    def layer(self, il: int) -> Layer:
        local = self.sliding[il]
        rope = Rope(self.local_theta) if local else Rope(self.rope_theta, scaling=self.global_rope)
        window = self.window if local else None
        return Layer(il, self.n_head, self.kv_heads[il], self.head_dims[il], rope, window, False, 1.0)

    def source(self, il: int) -> int:
        """The layer whose KV cache layer ``il`` attends over: itself, or for a KV-shared layer the last non-shared
        layer of its type."""
        first = self.n_layer - self.n_kv_shared
        if il < first:
            return il
        return max(j for j in range(first) if self.sliding[j] == self.sliding[il])


def attention(
    g: Graph, cfg: Gemma4Config, layer: Layer, h: Tensor, pos: Tensor, kv: dict[int, tuple[Tensor, Tensor]]
) -> Tensor:
    """Attention of normed ``h``. A layer with its own cache stores its step's (k, v) in ``kv`` for the KV-shared
    layers after it; those split their q/o like their source layer (same KV heads, same boundaries)."""
    src = cfg.layer(cfg.source(layer.index))
    tokens, H, hd, nh, nkv = h.shape[0], cfg.hidden, layer.head_dim, layer.n_head, layer.n_kv

    def w(name: str, shape: tuple[int, ...], role: Role) -> Tensor:  # split in the source layer's KV-head groups
        groups = nkv if role is not Role.REPLICATED else None
        return g.weight(f"blk.{layer.index}.{name}", shape, role, groups=groups, layer=src.index)

    def heads(x: Tensor, n: int) -> Tensor:
        return g.reshape(x, shape=(tokens, n, hd))

    def norm(x: Tensor, name: str | None) -> Tensor:
        weight = w(name, (hd,), Role.REPLICATED) if name else None
        return g.rms_norm(x, weight, eps=cfg.norm_eps)

    r = layer.rope
    rope = {"theta": r.theta, "neox": True, "scaling": dict(r.scaling) or None}
    q = g.rope(norm(heads(g.linear(h, w("attn_q", (nh * hd, H), Role.COLUMN)), nh), "attn_q_norm"), pos, **rope)
    shared = src.index != layer.index
    if shared:
        k, v = kv[src.index]
    else:
        raw_k = heads(g.linear(h, w("attn_k", (nkv * hd, H), Role.COLUMN)), nkv)
        k_eq_v = cfg.k_eq_v and layer.window is None
        raw_v = raw_k if k_eq_v else heads(g.linear(h, w("attn_v", (nkv * hd, H), Role.COLUMN)), nkv)
        k, v = g.rope(norm(raw_k, "attn_k_norm"), pos, **rope), norm(raw_v, None)
        kv[layer.index] = (k, v)
    cache = blocks.kv_cache(g, cfg, src)
    a = g.attention(q, k, v, pos, scale=1.0, cache=cache, window=layer.window, write=not shared)
    return g.linear(g.reshape(a, shape=(tokens, nh * hd)), w("attn_output", (H, nh * hd), Role.ROW))


def ple_inputs(g: Graph, cfg: Gemma4Config, ids: Tensor, x: Tensor) -> Tensor:
    """[tokens, layers, d]: (norm(x W_proj * H^-0.5) + table[ids] * sqrt(d)) / sqrt(2), ``x`` the scaled embedding."""
    tokens, L, d = x.shape[0], cfg.n_layer, cfg.ple_dim
    table = g.weight("per_layer_token_embd", (cfg.ple_vocab, L * d), Role.VOCAB)
    tok = g.reshape(g.scale(g.embedding(ids, table), scale=embed_scale(d, cfg.dtype)), shape=(tokens, L, d))
    proj = g.scale(g.linear(x, g.weight("per_layer_model_proj", (L * d, cfg.hidden))), scale=cfg.hidden**-0.5)
    proj = g.rms_norm(g.reshape(proj, shape=(tokens, L, d)), g.weight("per_layer_proj_norm", (d,)), eps=cfg.norm_eps)
    return g.scale(proj + tok, scale=2.0**-0.5)


def moe_block(g: Graph, cfg: Gemma4Config, layer: Layer, x: Tensor) -> Tensor:
    """The routed experts' partial sum for residual ``x`` (the router reads ``x`` itself, the experts its norm)."""
    E, F, H = cfg.n_expert, cfg.expert_ffn, cfg.hidden
    r = g.mul(g.rms_norm(x, eps=cfg.norm_eps), blocks.weight(g, layer, "ffn_gate_inp.scale", (H,)))
    logits = g.linear(g.scale(r, scale=H**-0.5), blocks.weight(g, layer, "ffn_gate_inp", (E, H)))
    route = g.topk_route(logits, k=cfg.top_k, norm=True)
    route = g.mul(route, blocks.weight(g, layer, "ffn_down_exps.scale", (E,)))  # per_expert_scale
    return g.moe_ffn(
        blocks.norm(g, cfg, x, layer, "pre_ffw_norm_2"),
        route,
        blocks.weight(g, layer, "ffn_gate_exps", (E, F, H), Role.EXPERT_COLUMN),
        blocks.weight(g, layer, "ffn_up_exps", (E, F, H), Role.EXPERT_COLUMN),
        blocks.weight(g, layer, "ffn_down_exps", (E, H, F), Role.EXPERT_ROW),
        act="gelu",
    )


def post_normed_sum(g: Graph, cfg: Gemma4Config, layer: Layer, a: Tensor, b: Tensor, names: tuple[str, str]) -> Tensor:
    """norm_a(a) + norm_b(b) for two partial sums, with one allreduce: they are normed side by side as [T, 2, H]."""
    T, H = a.shape
    both = g.rms_norm(g.reshape(g.concat(a, b, axis=-1), shape=(T, 2, H)), eps=cfg.norm_eps)
    w = g.reshape(g.concat(*(blocks.weight(g, layer, n, (H,)) for n in names), axis=0), shape=(2, H))
    y = g.mul(both, w)
    return g.reshape(g.slice(y, axis=1, start=0, stop=1) + g.slice(y, axis=1, start=1, stop=2), shape=(T, H))


def build(cfg: Gemma4Config, tokens: int, n_logits: int | None = None) -> Graph:
    g, x, pos = blocks.embed(cfg, tokens)
    x = g.scale(x, scale=embed_scale(cfg.hidden, cfg.dtype))
    kv: dict[int, tuple[Tensor, Tensor]] = {}
    ple: Tensor | None = None
    for il in range(cfg.n_layer):
        layer = cfg.layer(il)
        h = blocks.norm(g, cfg, x, layer, "attn_norm")
        if il == 0 and cfg.ple_dim:  # traced after the first norm, which reduced x: the projection reads it whole
            ple = ple_inputs(g, cfg, g.inputs["tokens"], x)
        a = attention(g, cfg, layer, h, pos, kv)
        x = x + blocks.norm(g, cfg, a, layer, "post_attention_norm")
        ffn = cfg.ffn * (2 if cfg.double_wide and cfg.source(il) != il else 1)
        y = blocks.gated_ffn(g, layer, blocks.norm(g, cfg, x, layer, "ffn_norm"), ffn, glu="geglu")
        if cfg.moe_block:
            y = post_normed_sum(g, cfg, layer, y, moe_block(g, cfg, layer, x), ("post_ffw_norm_1", "post_ffw_norm_2"))
        x = x + blocks.norm(g, cfg, y, layer, "post_ffw_norm")
        if ple is not None:
            d = cfg.ple_dim
            gate = g.gelu(g.linear(x, blocks.weight(g, layer, "inp_gate", (d, cfg.hidden))))
            p = g.reshape(g.slice(ple, axis=1, start=il, stop=il + 1), shape=(tokens, d))
            y = g.linear(g.mul(gate, p), blocks.weight(g, layer, "proj", (cfg.hidden, d)))
            x = x + blocks.norm(g, cfg, y, layer, "post_norm")
        x = g.mul(x, blocks.weight(g, layer, "layer_output_scale", (1,)))
    blocks.head(g, cfg, x, n_logits, softcap=cfg.final_softcap)
    return g


def _proportional(params: dict[str, Any], head_dim: int) -> tuple[tuple[str, Any], ...]:
    """Full layers' rope scaling: proportional rope as per-pair factors over ``head_dim`` (rotating pairs divided by
    ``factor``, the others still), default rope as none, anything else refused."""
    kind = params.get("rope_type", "default")
    if kind == "default":
        return ()
    if kind != "proportional":
        raise UnsupportedError(f"gemma4: rope_type {kind!r} on full layers (known: default, proportional)")
    rotating = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    factor = float(params.get("factor", 1.0))
    factors = (factor,) * rotating + (STILL,) * (head_dim // 2 - rotating)
    return (("factors", factors), ("rope_type", "factors"))


# Gemma 3's names plus Gemma 4's own: PLE, the MoE block beside the MLP (fused gate_up experts), layer_scalar
HF_NAMES: dict[str, Target] = {
    **GEMMA_HF_NAMES,
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd",
    "model.per_layer_model_projection.weight": "per_layer_model_proj",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm",
    **{
        f"model.layers.{{L}}.{hf}": f"blk.{{L}}.{graph}"
        for hf, graph in {
            "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2",
            "post_feedforward_layernorm_1.weight": "post_ffw_norm_1",
            "post_feedforward_layernorm_2.weight": "post_ffw_norm_2",
            "router.proj.weight": "ffn_gate_inp",
            "router.scale": "ffn_gate_inp.scale",
            "router.per_expert_scale": "ffn_down_exps.scale",
            "experts.down_proj": "ffn_down_exps",
            "per_layer_input_gate.weight": "inp_gate",
            "per_layer_projection.weight": "proj",
            "post_per_layer_input_norm.weight": "post_norm",
            "layer_scalar": "layer_output_scale",
        }.items()
    },
    "model.layers.{L}.experts.gate_up_proj": LLAMA_HF_NAMES["model.layers.{L}.mlp.experts.gate_up_proj"],  # fused
}


class Gemma4(ModelFamily):
    name = "gemma4"
    hf_model_types: tuple[str, ...] = ("gemma4_text", "gemma4")
    gguf_architectures: tuple[str, ...] = ("gemma4",)
    hf_naming = Naming(
        HF_NAMES,
        prefixes={"model.language_model.": "model."},
        ignore=(
            r"model\.(vision_tower|audio_tower|embed_vision|embed_audio)\..*",
            r".*rotary_emb\..*",
        ),
    )
    reasoning_tags = ("<|channel>thought", "<channel|>")

    def config_from_hf(self, config: dict[str, Any]) -> Gemma4Config:
        c = config.get("text_config", config)
        if c.get("use_bidirectional_attention") == "all":
            raise UnsupportedError("gemma4 with use_bidirectional_attention='all' (an encoder) is not supported")
        if c.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UnsupportedError(f"gemma4: activation {c.get('hidden_activation')!r} (known: gelu_pytorch_tanh)")
        n_layer = int(c["num_hidden_layers"])
        types = list(c.get("layer_types") or [])
        if types:
            types[-1] = "full_attention"  # transformers forces the last layer full
        sliding = sliding_layers(n_layer, types or None, 6)
        rope = c.get("rope_parameters") or {}
        local = dict(rope.get("sliding_attention") or {"rope_theta": 10_000.0})
        full = dict(rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedError(f"gemma4: rope {local} on sliding layers (known: default)")
        n_kv, head_dim = int(c.get("num_key_value_heads", 4)), int(c.get("head_dim", 256))
        k_eq_v = bool(c.get("attention_k_eq_v", False))
        per_layer = {int(k): v for k, v in (c.get("per_layer_config") or {}).items()}
        if not per_layer:  # published configs: the full layers' overrides as transformers derives them
            full_layer = {"head_dim": c.get("global_head_dim", 512)}
            if k_eq_v and c.get("num_global_key_value_heads"):
                full_layer["num_key_value_heads"] = c["num_global_key_value_heads"]
            per_layer = {il: full_layer for il in range(n_layer) if not sliding[il]}
        head_dims = tuple(int(per_layer.get(il, {}).get("head_dim", head_dim)) for il in range(n_layer))
        kv_heads = tuple(int(per_layer.get(il, {}).get("num_key_value_heads", n_kv)) for il in range(n_layer))
        global_hd = next((head_dims[il] for il in range(n_layer) if not sliding[il]), head_dim)
        moe = bool(c.get("enable_moe_block", False))
        softcap = c.get("final_logit_softcapping")
        shared = int(c.get("num_kv_shared_layers", 0))
        if shared and set(sliding[n_layer - shared :]) - set(sliding[: n_layer - shared]):
            raise UnsupportedError(f"gemma4: the last {shared} layers share caches no earlier layer of their type has")
        return Gemma4Config(
            vocab=int(c.get("vocab_size", 262_144)),
            hidden=int(c["hidden_size"]),
            n_layer=n_layer,
            n_head=int(c["num_attention_heads"]),
            n_kv=n_kv,
            head_dim=head_dim,
            ffn=int(c["intermediate_size"]),
            n_expert=int(c.get("num_experts") or 0) if moe else 0,
            top_k=int(c.get("top_k_experts") or 1),
            expert_ffn=int(c.get("moe_intermediate_size") or 0),
            qk_norm=True,
            window=int(c.get("sliding_window", 512)),
            rope_theta=float(full.get("rope_theta", 1_000_000.0)),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tied=bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", True))),
            ctx=int(c.get("max_position_embeddings", 131_072)),
            sliding=sliding,
            local_theta=float(local.get("rope_theta", 10_000.0)),
            head_dims=head_dims,
            kv_heads=kv_heads,
            global_rope=_proportional(full, global_hd),
            k_eq_v=k_eq_v,
            n_kv_shared=shared,
            double_wide=bool(c.get("use_double_wide_mlp", False)),
            ple_dim=int(c.get("hidden_size_per_layer_input") or 0),
            ple_vocab=int(c.get("vocab_size_per_layer_input", 262_144)),
            moe_block=moe,
            final_softcap=float(softcap) if softcap else None,
        )

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Gemma4Config:
        """llama.cpp's ``gemma4`` keys; per-layer head_dim, KV heads, MLP width and k_eq_v are read off the tensor
        shapes (a KV-shared layer has no k/v tensors and takes its source layer's); proportional rope is the file's
        ``rope_freqs`` (1 for rotating pairs, 1e30 for still ones) on the full layers."""
        # per-layer arrays (KV heads, MLP widths) are read off the tensors below; the shared reader wants numbers
        lists = ("attention.head_count_kv", "feed_forward_length")
        kw = gguf_config(
            {**meta, **{f"gemma4.{k}": 0 for k in lists if isinstance(meta.get(f"gemma4.{k}"), list)}}, "gemma4"
        )
        n_layer, n_head = kw["n_layer"], kw["n_head"]
        if meta.get("gemma4.expert_count"):
            raise UnsupportedError("gemma4 GGUF with experts is not supported yet (its router scales' layout)")
        pattern = meta.get("gemma4.attention.sliding_window_pattern", 6)
        sliding = (
            tuple(bool(x) for x in pattern)
            if isinstance(pattern, list)
            else sliding_layers(n_layer, None, int(pattern))
        )
        shared = int(meta.get("gemma4.attention.shared_kv_layers", 0))
        cfg = Gemma4Config(sliding=sliding, n_kv_shared=shared, n_layer=n_layer, n_head=n_head)
        head_dims = tuple(shapes[f"blk.{il}.attn_q"][0] // n_head for il in range(n_layer))
        kv_heads = tuple(shapes[f"blk.{cfg.source(il)}.attn_k"][0] // head_dims[il] for il in range(n_layer))
        ffn = [shapes[f"blk.{il}.ffn_up"][0] for il in range(n_layer)]
        factors = meta.get("rope_freqs")
        softcap = meta.get("gemma4.final_logit_softcapping")
        return replace(
            cfg,
            **{k: v for k, v in kw.items() if k not in ("n_kv", "head_dim", "ffn", "rope_scaling", "n_rot")},
            n_kv=kv_heads[sliding.index(True)] if True in sliding else kv_heads[0],
            head_dim=head_dims[sliding.index(True)] if True in sliding else head_dims[0],
            head_dims=head_dims,
            kv_heads=kv_heads,
            ffn=ffn[0],
            double_wide=shared > 0 and ffn[-1] == 2 * ffn[0],
            qk_norm=True,
            tied="output" not in shapes,
            local_theta=float(meta.get("gemma4.rope.freq_base_swa", 10_000.0)),
            global_rope=(("factors", tuple(float(f) for f in factors)), ("rope_type", "factors")) if factors else (),
            k_eq_v=any(
                not sliding[il] and f"blk.{il}.attn_k" in shapes and f"blk.{il}.attn_v" not in shapes
                for il in range(n_layer)
            ),
            ple_dim=int(meta.get("gemma4.embedding_length_per_layer_input", 0)),
            ple_vocab=shapes["per_layer_token_embd"][0] if "per_layer_token_embd" in shapes else 0,
            final_softcap=float(softcap) if softcap else None,
        )

    def build(self, config: Gemma4Config, tokens: int, n_logits: int | None = None) -> Graph:
        return build(config, tokens, n_logits)


@hookimpl
def tensorweave_register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Gemma4())

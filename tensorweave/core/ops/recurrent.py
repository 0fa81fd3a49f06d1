"""Recurrent ops of Gated DeltaNet ("linear attention") layers: ``conv1d_causal`` (a depthwise causal convolution
that carries its last ``kernel - 1`` inputs as a state), ``gated_delta_rule`` (the gated delta-rule scan over tokens
with a state ``[v_heads, k_dim, v_dim]``), ``l2_norm`` and ``rms_norm_gated`` (RMSNorm times a SiLU gate).

Conventions are transformers' torch fallbacks (qwen3_next / qwen3_5_moe ``torch_recurrent_gated_delta_rule``,
``causal_conv1d_update``): value head ``h`` reads key head ``h // (v_heads / k_heads)``, so a device holding key
heads [a, b) holds value heads [a r, b r) with them. States are caches of kind "state" that every step rewrites
whole (``CacheSpec``); a step of T tokens equals T steps of one token. A device may hold zero heads.
"""

from __future__ import annotations

from typing import Any

from ..sharding import REPLICATED, Split, State
from .elementwise import _acc, _keep_axes, _silu
from .registry import REQUIRED, Meta, OpDef, Shape, _need, register

# --- causal depthwise conv1d -------------------------------------------------------------------------------------


def _infer_conv(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (ws, _), (ss, _) = metas
    _need(
        len(xs) == 2 and len(ws) == 2,
        f"conv1d_causal: x must be [tokens, channels] and w [channels, kernel], got {xs}, {ws}",
    )
    _need(ws[0] == xs[1] and ws[1] >= 1, f"conv1d_causal: w {ws} must be [{xs[1]}, kernel >= 1]")
    _need(
        ss == (ws[1] - 1, xs[1]),
        f"conv1d_causal: the state must be [kernel - 1, channels] = {(ws[1] - 1, xs[1])}, got {ss}",
    )
    _need(attrs.get("act") in (None, "silu"), f"conv1d_causal: act must be None or 'silu', got {attrs.get('act')!r}")
    return xs, xd


def _k_conv(xp: Any, out: Any, x: Any, w: Any, state: Any, *, act: str | None = "silu") -> None:
    """out[t, c] = sum_j w[c, j] * xs[t + j, c] over xs = [state; x] (the previous kernel - 1 inputs, then this
    step's); the state keeps the last kernel - 1 rows of xs."""
    n_tok, kernel = x.shape[0], w.shape[1]
    xs = _concat(xp)([_acc(state), _acc(x)], axis=0)
    wa = _acc(w)
    y = xs[0:n_tok, ...] * wa[:, 0]
    for j in range(1, kernel):
        y = y + xs[j : j + n_tok, ...] * wa[:, j]
    state[...] = xs[n_tok:, ...]
    out[...] = _silu(xp, y) if act == "silu" else y


def _concat(xp: Any) -> Any:
    """The namespace's concatenate (the array API standard calls it ``concat``)."""
    return getattr(xp, "concat", None) or xp.concatenate


def _rule_conv(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    s = ins[2]
    if isinstance(s, Split) and s.axis == 1:  # channels travel with their state
        return [Split(1, s.sizes), Split(0, s.sizes), s], Split(1, s.sizes)
    return [REPLICATED] * 3, REPLICATED


# --- gated delta rule --------------------------------------------------------------------------------------------


def _infer_gdr(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (qs, qd), (ks, _), (vs, _), (gs, _), (bs, _), (ss, _) = metas
    _need(len(qs) == 3 and qs == ks, f"gated_delta_rule: q {qs} and k {ks} must be [tokens, k_heads, k_dim]")
    _need(len(vs) == 3 and vs[0] == qs[0], f"gated_delta_rule: v must be [{qs[0]}, v_heads, v_dim], got {vs}")
    nk, nv = qs[1], vs[1]
    _need(nv % nk == 0 if nk else nv == 0, f"gated_delta_rule: {nv} value heads are not a multiple of {nk} key heads")
    _need(gs == bs == vs[:2], f"gated_delta_rule: g {gs} and beta {bs} must be [tokens, v_heads] = {vs[:2]}")
    _need(
        ss == (nv, qs[2], vs[2]),
        f"gated_delta_rule: the state must be [v_heads, k_dim, v_dim] = {(nv, qs[2], vs[2])}, got {ss}",
    )
    return vs, qd


def _k_gdr(
    xp: Any, out: Any, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any, *, scale: float, chunk: int = 0
) -> None:
    """Per token t and value head h (reading key head h // r):  S = exp(g_t) S;  S += k (beta_t (v_t - S^T k))^T;
    out_t = S^T (scale q_t). S is [k_dim, v_dim] per value head; q and k come L2-normed. With ``chunk`` > 0 a step
    of several tokens goes ``chunk`` tokens at a time (``_chunk``: the same sums as matrix products); the default
    is token by token, which measured faster on numpy (2 CPU threads, 32 heads of 128 x 128: 256 tokens in 366 ms
    against 1048 ms in chunks of 64)."""
    n_tok, nk = q.shape[0], q.shape[1]
    nv = v.shape[1]
    if nv == 0:  # a device holding no key head
        return
    r = nv // nk
    qa = xp.repeat(_acc(q), r, axis=1) * scale  # [T, nv, dk]
    ka = xp.repeat(_acc(k), r, axis=1)
    va, ga, ba = _acc(v), _acc(g), _acc(beta)
    s = _acc(state)  # rebound below, never written in place: the state changes only at the end
    if chunk and n_tok > 1:
        perm = getattr(xp, "permute_dims", None) or xp.transpose
        dense = getattr(xp, "ascontiguousarray", None) or (lambda x: x)  # batched BLAS wants whole matrices
        qh, kh, vh = (dense(perm(x, (1, 0, 2))) for x in (qa, ka, va))  # [heads, T, d]
        gh, bh = (dense(perm(x, (1, 0))) for x in (ga, ba))
        for a in range(0, n_tok, chunk):
            b = min(a + chunk, n_tok)
            qc, kc, vc, gc, bc = (dense(x[:, a:b, ...]) for x in (qh, kh, vh, gh, bh))
            o, s = _chunk(xp, qc, kc, vc, gc, bc, s)
            out[a:b, ...] = perm(o, (1, 0, 2))
        state[...] = s
        return
    decay = xp.exp(ga)
    for t in range(n_tok):
        s = s * decay[t, :, None, None]
        kt = ka[t, ...]
        mem = xp.matmul(kt[:, None, :], s)[:, 0, :]  # [nv, dv] = S^T k
        delta = (va[t, ...] - mem) * ba[t, :, None]
        s = s + kt[:, :, None] * delta[:, None, :]
        out[t, ...] = xp.matmul(qa[t, :, None, :], s)[:, 0, :]
    state[...] = s


def _chunk(xp: Any, q: Any, k: Any, v: Any, g: Any, beta: Any, s0: Any) -> tuple[Any, Any]:
    """n tokens of the rule at once, per head (q, k, v [heads, n, d]; g, beta [heads, n]). With G the running sum
    of g over the chunk, the scan's state is S_i = e^{G_i} S_0 + sum_{j<=i} e^{G_i - G_j} k_j u_j^T, where the
    updates u solve the unit lower-triangular (I + A) U = beta (V - e^G K S_0), A_ij = beta_i e^{G_i - G_j} k_i.k_j
    (j < i); then O = e^G Q S_0 + (Q K^T * e^{G_i - G_j}, j <= i) U and S_n = e^{G_n} S_0 + (e^{G_n - G} K)^T U.
    Returns (outputs [heads, n, dv], S_n). Only differences G_i - G_j with j <= i are exponentiated: no overflow."""
    perm = getattr(xp, "permute_dims", None) or xp.transpose
    cumsum = getattr(xp, "cumulative_sum", None) or xp.cumsum
    dense = getattr(xp, "ascontiguousarray", None) or (lambda x: x)
    n = q.shape[1]
    big_g = cumsum(g, axis=1)
    rows, cols = xp.arange(n)[:, None], xp.arange(n)[None, :]
    diff = big_g[:, :, None] - big_g[:, None, :]
    decay = xp.where(rows >= cols, xp.exp(xp.where(rows >= cols, diff, 0.0)), 0.0)  # [heads, n, n]
    kt = dense(perm(k, (0, 2, 1)))
    a = xp.where(rows > cols, beta[:, :, None] * decay * xp.matmul(k, kt), 0.0)
    eye = xp.astype(rows == cols, a.dtype) if hasattr(xp, "astype") else (rows == cols).astype(a.dtype)
    e_g = xp.exp(big_g)[:, :, None]
    u = xp.linalg.solve(eye + a, beta[:, :, None] * (v - e_g * xp.matmul(k, s0)))
    o = e_g * xp.matmul(q, s0) + xp.matmul(xp.matmul(q, kt) * decay, u)
    tail = xp.exp(big_g[:, -1:] - big_g)[:, :, None]  # e^{G_n - G_j}
    s_n = xp.exp(big_g[:, -1])[:, None, None] * s0 + xp.matmul(dense(perm(tail * k, (0, 2, 1))), u)
    return o, s_n


def _rule_gdr(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    s = ins[5]
    nk, nv = shapes[0][1], shapes[2][1]
    if isinstance(s, Split) and s.axis == 0 and nk:  # value heads travel with their key heads
        r = nv // nk
        heads, vheads = Split(1, tuple(n // r for n in s.sizes)), Split(1, s.sizes)
        return [heads, heads, vheads, vheads, vheads, s], vheads
    return [REPLICATED] * 6, REPLICATED


# --- norms ---------------------------------------------------------------------------------------------------------


def _infer_l2(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    return metas[0]


def _k_l2(xp: Any, out: Any, x: Any, *, eps: float = 1e-6) -> None:
    xa = _acc(x)
    out[...] = xa / xp.sqrt(xp.sum(xa * xa, axis=-1, keepdims=True) + eps)


def _infer_gated_norm(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (zs, _), (ws, _) = metas
    _need(zs == xs and ws == xs[-1:], f"rms_norm_gated: z {zs} must be x's shape {xs} and w {ws} its last axis")
    return xs, xd


def _k_gated_norm(xp: Any, out: Any, x: Any, z: Any, w: Any, *, eps: float) -> None:
    xa = _acc(x)
    out[...] = xa / xp.sqrt(xp.mean(xa * xa, axis=-1, keepdims=True) + eps) * _acc(w) * _silu(xp, _acc(z))


def _rule_gated_norm(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    x = ins[0]
    if isinstance(x, Split) and x.axis != len(out) - 1:  # rows or heads: each device normalises its own
        return [x, x, REPLICATED], x
    return [REPLICATED] * 3, REPLICATED


for _op in [
    OpDef(
        "conv1d_causal",
        _infer_conv,
        _k_conv,
        _rule_conv,
        arity=(3, 3),
        doc="depthwise causal conv over tokens with a carried [kernel - 1, channels] state",
        attrs={"act": "silu"},
    ),
    OpDef(
        "gated_delta_rule",
        _infer_gdr,
        _k_gdr,
        _rule_gdr,
        arity=(6, 6),
        doc="gated delta-rule scan: q, k, v, g (log decay), beta, state [v_heads, k_dim, v_dim]",
        attrs={"scale": REQUIRED, "chunk": 0},  # tokens per chunk of a multi-token step (0: token by token)
    ),
    OpDef(
        "l2_norm",
        _infer_l2,
        _k_l2,
        _keep_axes(-1),
        doc="x / sqrt(sum(x^2) + eps) over the last axis",
        attrs={"eps": 1e-6},
    ),
    OpDef(
        "rms_norm_gated",
        _infer_gated_norm,
        _k_gated_norm,
        _rule_gated_norm,
        arity=(3, 3),
        doc="x / rms(x) * w * silu(z)",
        attrs={"eps": REQUIRED},
    ),
]:
    register(_op)

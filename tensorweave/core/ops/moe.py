"""Mixture of experts: ``topk_route`` (router logits -> dense top-k weights) and ``moe_ffn`` (the routed sum of
gated expert FFNs, split along the experts' hidden size into partial sums that are reduced once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import dtypes
from ..sharding import PARTIAL, REPLICATED, Split, State
from .elementwise import ACTIVATIONS, _acc, _replicated, sigmoid, softmax
from .registry import REQUIRED, Meta, OpDef, Shape, _need, register
from .weights import matmul_t


def _infer_topk(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (ls, ld) = metas[0]
    _need(len(ls) == 2, f"topk_route: router logits must be [tokens, experts], got {ls}")
    _need(0 < attrs["k"] <= ls[1], f"topk_route: k={attrs['k']} must be in 1..{ls[1]} experts")
    _need(attrs.get("gating", "softmax") in ("softmax", "sigmoid"), "topk_route: gating must be softmax or sigmoid")
    return ls, ld


def _k_topk(
    xp: Any, out: Any, logits: Any, *, k: int, gating: str = "softmax", norm: bool = True, scale: float = 1.0
) -> None:
    la = _acc(logits)
    probs = softmax(xp, la) if gating == "softmax" else sigmoid(xp, la)
    # ties: the lower expert index wins (a stable sort; cupy's argsort always is, and accepts no other kind)
    idx = (xp.argsort(-probs, axis=-1, kind="stable") if xp is np else xp.argsort(-probs, axis=-1))[:, :k]
    w = xp.take_along_axis(probs, idx, axis=-1)
    if norm:
        w = w / xp.sum(w, axis=-1, keepdims=True)
    out[...] = 0
    out[xp.arange(out.shape[0])[:, None], idx] = w * scale


def _infer_moe(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (rs, _), (gs, _), (us, _), (ds, _) = metas
    ranks = [len(xs), len(rs), len(gs), len(us), len(ds)]
    _need(ranks == [2, 2, 3, 3, 3], f"moe_ffn: x, route, gate, up, down must have 2, 2, 3, 3, 3 axes, got {ranks}")
    n_tok, hidden = xs
    n_exp, n_ff = gs[0], gs[1]
    _need(rs == (n_tok, n_exp), f"moe_ffn: routing weights must be [{n_tok}, {n_exp}], got {rs}")
    _need(gs == us == (n_exp, n_ff, hidden), f"moe_ffn: gate {gs} and up {us} must be [experts, ff, {hidden}]")
    _need(ds == (n_exp, hidden, n_ff), f"moe_ffn: down must be [{n_exp}, {hidden}, {n_ff}], got {ds}")
    _need(attrs.get("act", "silu") in ACTIVATIONS, f"moe_ffn: act must be one of {sorted(ACTIVATIONS)}")
    return xs, xd


def moe_kernel(mm: Callable[[Any, Any, Any], Any]) -> Callable[..., None]:
    """The moe_ffn kernel over ``mm(xp, x, w) -> x @ W^T`` (float32), which takes a weight as held: a backend with a
    faster matmul for 16-bit or quantized weights builds its moe_ffn from it."""

    def kernel(xp: Any, out: Any, x: Any, route: Any, gate: Any, up: Any, down: Any, *, act: str = "silu") -> None:
        """sum over experts e of route[:, e] * down_e(act(gate_e x) * up_e x), only for the tokens routed to e."""
        fn = ACTIVATIONS[act]
        acc = xp.zeros(out.shape, dtypes.accumulator(out.dtype))
        xa = _acc(x)
        for e in range(route.shape[1]):
            rows = xp.nonzero(route[:, e])[0]
            if rows.shape[0] == 0:
                continue
            xe = xa[rows]
            h = fn(xp, mm(xp, xe, gate[e])) * mm(xp, xe, up[e])
            acc[rows] += _acc(route[rows, e])[:, None] * mm(xp, h, down[e])
        out[...] = acc

    return kernel


_k_moe = moe_kernel(matmul_t)


def _rule_moe(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    gate = ins[2]
    if isinstance(gate, Split) and gate.axis == 1:  # experts sliced along n_ff: partial sums, reduced once, later
        return [REPLICATED, REPLICATED, gate, Split(1, gate.sizes), Split(2, gate.sizes)], PARTIAL
    return [REPLICATED] * 5, REPLICATED


register(
    OpDef(
        "topk_route",
        _infer_topk,
        _k_topk,
        _replicated,
        doc="router logits -> dense [T, E] top-k weights",
        attrs={"k": REQUIRED, "gating": "softmax", "norm": True, "scale": 1.0},
    )
)
register(
    OpDef(
        "moe_ffn",
        _infer_moe,
        _k_moe,
        _rule_moe,
        arity=(5, 5),
        doc="routed sum of expert FFNs",
        attrs={"act": "silu"},
        held=(2, 3, 4),
    )
)

"""The planner: collectives where they belong (2 per dense or MoE layer + the logits gather), bytes in the Plan,
clear errors for graphs that cannot be split."""

from __future__ import annotations

import numpy as np
import pytest

from tensorweave.core import ops
from tensorweave.core.graph import Graph
from tensorweave.core.planner import plan
from tensorweave.core.sharding import PARTIAL, REPLICATED, Role, Split
from tensorweave.errors import PlanError, SplitError
from tensorweave.models.synthetic import Config, build


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "cfg",
    [
        Config(n_layer=3),
        Config(n_layer=2, n_expert=4, top_k=2),
        Config(n_layer=2, n_expert=4, top_k=2, shared_ffn=6),  # the shared expert joins the routed ones' reduce
        Config(n_layer=3, n_expert=3, top_k=1, dense_layers=(1,), qkv_bias=True, o_bias=True, sinks=True),
        Config(n_layer=2, n_head=6, n_kv=1, qk_norm=True, window=3, softcap=30.0),  # MQA: one KV head
    ],
    ids=["dense", "moe", "moe-shared", "mixed", "mqa"],
)
def test_two_allreduces_per_layer_and_one_logits_gather(cfg: Config, world: int) -> None:
    tokens = 5
    p = plan(build(cfg, tokens), world, [world - r for r in range(world)])
    assert p.count("allreduce") == 2 * cfg.n_layer + 1  # + the vocab-split embedding lookup
    assert p.count("allgather") == 1
    item = np.dtype(cfg.dtype).itemsize
    for c in p.collectives:
        if c.kind == "allreduce":  # embedding, attention output and FFN/MoE output: hidden x tokens each
            assert c.shape == (tokens, cfg.hidden) and c.nbytes == tokens * cfg.hidden * item
        else:
            assert c.shape == (tokens, cfg.vocab) and c.nbytes == tokens * cfg.vocab * item
    expected = ((2 * cfg.n_layer + 1) * cfg.hidden + cfg.vocab) * tokens * item
    assert p.comm_bytes == expected and p.comm_bytes_per_token == expected / tokens
    assert p.to_dict()["bytes_per_token"] == expected / tokens
    text = p.summary()
    assert f"{2 * cfg.n_layer + 1} x allreduce" in text and "1 x allgather" in text


def test_moe_reduces_once_after_the_expert_sum() -> None:
    """The MoE block's partial sums (experts sliced along n_ff) flow through moe_ffn and reach one allreduce."""
    p = plan(build(Config(n_layer=1, n_expert=4), 3), 2)
    moe = next(s for s in p.steps if s.op == "moe_ffn")
    assert p.values[moe.out].state == PARTIAL
    after = p.steps[p.steps.index(moe) + 1 :]
    # one allreduce, of the residual sum: x (partial too, from the vocab-split embedding) + the MoE's partials
    (reduce,) = [s for s in after if s.op == "allreduce"]
    assert p.values[reduce.out].state == REPLICATED


def test_one_device_needs_no_collectives() -> None:
    p = plan(build(Config(n_expert=2), 4), 1)
    assert p.collectives == [] and p.comm_bytes == 0
    assert all(v.state == REPLICATED for v in p.values)


def test_plan_reports_weight_and_cache_bytes_per_device() -> None:
    cfg = Config(n_layer=2, n_head=4, n_kv=2, head_dim=8, ctx=16)
    g = build(cfg, 2)
    p = plan(g, 2, [1, 1])
    item = 4
    # KV cache: k and v, [ctx, n_kv, hd] per layer, split by KV head: one of two heads each
    assert p.cache_bytes == [2 * cfg.n_layer * cfg.ctx * 1 * cfg.head_dim * item] * 2
    total = sum(np.prod(t.shape) * item for t in g.weights.values())
    replicated = sum(np.prod(t.shape) * item for t in g.weights.values() if t.role is Role.REPLICATED)
    assert sum(p.weight_bytes) == total + replicated  # split weights once, replicated ones on both devices
    q = p.weight_slice("blk.0.attn_q", 1)
    assert q == (slice(16, 32), slice(None))  # rank 1 holds the second KV group's 2 query heads x 8


def test_uneven_split_with_zero_size_shards_plans() -> None:
    p = plan(build(Config(n_kv=2, n_head=4), 3), 8, [1, 0, 2, 1, 1, 0, 3, 1])
    q = next(v for v in p.values if v.name == "blk.0.attn_q")
    assert isinstance(q.state, Split) and sum(q.state.sizes) == 32 and 0 in q.state.sizes
    assert p.count("allreduce") == 5  # 2 per layer + the embedding


def test_op_without_a_sharding_rule_is_a_plan_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "test_planner_norule"  # registered for this test only: the op registry is process-wide
    monkeypatch.setitem(ops.OPS, name, ops.OpDef(name, lambda metas, attrs: metas[0], lambda xp, out, x: None, None))
    g = Graph()
    x = g.input("x", (2, 4), "float32")
    g.output("y", g.op(name, x))
    with pytest.raises(PlanError, match=f"op '{name}'.*no sharding rule"):
        plan(g, 2)
    assert plan(g, 1).collectives == []  # one device needs no rule


def test_a_weight_used_against_its_role_is_a_plan_error() -> None:
    g = Graph()
    x = g.input("x", (3, 8), "float32")
    norm = g.weight("norm", (8,), Role.COLUMN)  # a norm weight must be whole on every device
    g.output("y", g.rms_norm(x, norm, eps=1e-5))
    with pytest.raises(PlanError, match=r"weight 'norm' \(role column\).*never gathered"):
        plan(g, 2)


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_split_embedding_costs_one_allreduce_per_step(tied: bool) -> None:
    """The embedding (tied to the LM head or not) split by vocabulary: each device looks up its rows (partial
    sums), reduced once before the first layer; the head stays split and the logits are gathered."""
    cfg = Config(n_layer=2, tied=tied)
    p = plan(build(cfg, 3), 3)
    assert p.count("allreduce") == 2 * cfg.n_layer + 1 and p.count("allgather") == 1
    embd = next(v for v in p.values if v.name == "token_embd")
    assert isinstance(embd.state, Split) and embd.state.axis == 0
    assert ("output" in p.graph.weights) != tied


def test_malformed_tensor_split_is_a_clear_error() -> None:
    g = build(Config(), 2)
    with pytest.raises(SplitError, match="3 entries"):
        plan(g, 2, [1, 1, 1])
    with pytest.raises(SplitError, match=">= 0"):
        plan(g, 2, [1, -2])
    assert plan(g, 2, [0, 0]).ratios == (1.0, 1.0)


def test_programs_hold_local_shapes() -> None:
    p = plan(build(Config(n_head=4, n_kv=2, head_dim=8), 3), 2, [3, 1])
    att = [i for i in p.programs[0].instrs if i.op == "attention"]
    assert att and all(i.shape[1] in (2, 4) for i in att)
    for prog in p.programs:
        for i in prog.instrs:
            if i.op == "reshape":
                assert i.attrs["shape"] == i.shape
            assert i.shape == prog.shapes[i.out]

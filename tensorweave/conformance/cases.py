"""What the kit feeds and how it judges, shared with the project's own tests (tests/test_backend_ops.py,
tests/test_collectives.py): one traced case per registered op, random feeds, NMSE thresholds and the comparison,
inputs and error bounds for collectives, and the models of the end-to-end section.

Op cases take their sizes and switches from a ``Dims``: hypothesis picks them in the kit, the project's tests use
the default (the last option of every choice, which is the largest size and the richest variant). No pytest or
hypothesis import here, so tests and tools can use it without the ``conformance`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.graph import Graph, GraphCache, Tensor
from ..core.sharding import Role
from ..models.synthetic import Config, build, random_weights

Pick = Callable[[str, Sequence[Any]], Any]  # (label, options) -> one of the options


class Dims:
    """Sizes and switches of an op case: ``pick(label, options)`` chooses; without one, the last option wins."""

    def __init__(self, pick: Pick | None = None) -> None:
        self._pick: Pick = pick or (lambda label, options: options[-1])

    def size(self, label: str, lo: int, hi: int) -> int:
        return int(self._pick(label, range(lo, hi + 1)))

    def pick(self, label: str, options: Sequence[Any]) -> Any:
        return self._pick(label, options)


# A case traces one op (plus any producer it needs) into ``g`` and returns the result and its integer feeds.
Built = tuple[Tensor, dict[str, np.ndarray]]
Case = Callable[[Graph, Dims, np.random.Generator], Built]

PLANNER_ONLY = frozenset({"allreduce", "allgather", "shard"})  # inserted by the planner; run by every sharded model


def _f(g: Graph, name: str, *shape: int) -> Tensor:
    return g.input(name, shape, g.dtype)


def _rows(d: Dims) -> tuple[int, ...]:
    t, h = d.size("tokens", 1, 4), d.size("hidden", 1, 8)
    shape: tuple[int, ...] = d.pick("shape", [(t, h), (2, t, h)])
    return shape


def _unary(op: str, **choices: Sequence[Any]) -> Case:
    def case(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
        attrs = {k: d.pick(k, v) for k, v in choices.items()}
        return g.op(op, _f(g, "x", *_rows(d)), **attrs), {}

    return case


def _binary(op: str) -> Case:
    def case(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
        t, h = d.size("tokens", 1, 4), d.size("hidden", 1, 8)
        return g.op(op, _f(g, "a", t, h), _f(g, "b", *d.pick("b", [(h,), (t, 1), (1, h), (t, h)]))), {}

    return case


def _positions(g: Graph, d: Dims, tokens: int, ctx: int) -> tuple[Tensor, np.ndarray]:
    start = d.size("start", 0, ctx - tokens)
    return g.input("pos", (tokens,), "int32"), np.arange(start, start + tokens, dtype=np.int32)


def _matmul(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    t, k, n = d.size("tokens", 1, 4), d.size("k", 1, 16), d.size("n", 1, 8)
    lead = d.pick("lead", [(t,), (2, t)])
    return g.matmul(_f(g, "x", *lead, k), _f(g, "w", n, k)), {}


def _embedding(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    t, vocab, h = d.size("tokens", 1, 5), d.size("vocab", 1, 12), d.size("hidden", 1, 8)
    ids = g.input("ids", (t,), "int32")
    return g.embedding(ids, _f(g, "table", vocab, h)), {"ids": rng.integers(0, vocab, t).astype(np.int32)}


def _norm(op: str, forms: Sequence[str]) -> Case:
    def case(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
        shape = _rows(d)
        form = d.pick("form", forms)
        params = [_f(g, n, shape[-1]) for n in ("w", "b")[: {"none": 0, "wb": 2}.get(form, 1)]]
        attrs: dict[str, Any] = {"eps": d.pick("eps", [1e-6, 1e-5])}
        if op == "rms_norm":
            attrs["plus_one"] = form == "plus_one"
        return g.op(op, _f(g, "x", *shape), *params, **attrs), {}

    return case


def _rope(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    t, heads, hd = d.size("tokens", 1, 4), d.size("heads", 1, 3), d.pick("head_dim", [2, 4, 8])
    pos, feed = _positions(g, d, t, t + 40)
    attrs = {"theta": d.pick("theta", [100.0, 10000.0]), "neox": d.pick("neox", [True, False])}
    y = g.rope(_f(g, "x", t, heads, hd), pos, n_rot=d.pick("n_rot", [None, 2]), **attrs)
    return y, {"pos": feed}


def _attention(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    t, n_kv, group, hd = d.size("tokens", 1, 4), d.size("kv_heads", 1, 2), d.size("group", 1, 3), d.pick("hd", [2, 8])
    cached = d.pick("cache", [False, True])
    ctx = t + d.size("past", 0, 4) if cached else t  # with a cache, queries also see the (zero) slots before them
    pos, feed = _positions(g, d, t, ctx)
    cache, window = None, d.pick("window", [None, 1, 3])
    if cached:
        # a sliding-window layer's ring: `window` slots, positions past it wrap around (slot = position % window)
        ring = bool(window) and d.pick("ring", [False, True])
        slots, kind = (window, "ring") if ring else (ctx, "kv")
        kc, vc = (
            g.cache(n, (slots, n_kv, hd), kind, axis=1, groups=n_kv, window=window if ring else None)
            for n in ("kc", "vc")
        )
        cache = (kc, vc)
    sinks = g.weight("sinks", (n_kv * group,), Role.COLUMN, groups=n_kv) if d.pick("sinks", [False, True]) else None
    q, k, v = _f(g, "q", t, n_kv * group, hd), _f(g, "k", t, n_kv, hd), _f(g, "v", t, n_kv, hd)
    y = g.attention(
        q,
        k,
        v,
        pos,
        scale=d.pick("scale", [1.0, hd**-0.5]),
        cache=cache,
        sinks=sinks,
        window=window,
        softcap=d.pick("softcap", [None, 5.0]),
    )
    return y, {"pos": feed}


def _route(g: Graph, d: Dims, t: int) -> Tensor:
    experts = d.size("experts", 1, 6)
    attrs = {
        "k": d.size("k", 1, experts),
        "norm": d.pick("norm", [False, True]),
        "gating": d.pick("gating", ["sigmoid", "softmax"]),
        "scale": d.pick("route_scale", [1.0, 2.5]),
    }
    return g.topk_route(_f(g, "logits", t, experts), **attrs)


def _moe(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    t, h, ff = d.size("tokens", 0, 4), d.size("hidden", 1, 8), d.size("ffn", 0, 5)
    route = _route(g, d, t)
    e = route.shape[1]
    gate, up, down = _f(g, "gate", e, ff, h), _f(g, "up", e, ff, h), _f(g, "down", e, h, ff)
    return g.moe_ffn(_f(g, "x", t, h), route, gate, up, down, act=d.pick("act", ["gelu", "silu"])), {}


def _three(d: Dims) -> tuple[int, int, int]:
    return d.size("a", 1, 3), d.size("b", 1, 4), d.size("c", 1, 5)


def _reshape(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    a, b, c = _three(d)
    return g.reshape(_f(g, "x", a, b, c), shape=d.pick("to", [(a * b * c,), (a, b * c), (a * b, c)])), {}


def _transpose(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    perm = d.pick("perm", [(0, 2, 1), (1, 0, 2), (2, 0, 1), (2, 1, 0)])
    return g.transpose(_f(g, "x", *_three(d)), perm=perm), {}


def _slice(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    shape = _three(d)
    axis = d.pick("axis", [0, 1, -1])
    start = d.size("start", 0, shape[axis])
    return g.slice(_f(g, "x", *shape), axis=axis, start=start, stop=d.size("stop", start, shape[axis])), {}


def _concat(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    axis = d.pick("axis", [0, -1, 1])
    widths = [d.size(f"part{i}", 0, 4) for i in range(d.size("parts", 1, 3))]
    parts = [_f(g, f"x{i}", *((w, 3) if axis == 0 else (3, w))) for i, w in enumerate(widths)]
    return g.concat(*parts, axis=axis), {}


def _copy(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    return g.copy(g.transpose(_f(g, "x", *_rows(d)[-2:]), perm=(1, 0))), {}


# --- recurrent ops: two steps over one state, so the second reads what the first carried ----------------------


def _conv1d_causal(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    channels, kernel = d.size("channels", 0, 6), d.size("kernel", 1, 4)
    steps = [d.size("tokens", 1, 4), d.size("next_tokens", 1, 2)]
    state = g.cache("conv_state", (kernel - 1, channels), "state", axis=1)
    w, act = _f(g, "w", channels, kernel), d.pick("act", [None, "silu"])
    ys = [g.conv1d_causal(_f(g, f"x{i}", t, channels), w, state, act=act) for i, t in enumerate(steps)]
    return g.concat(*ys, axis=0), {}


def _gated_delta_rule(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    nk, ratio, dk, dv = d.size("k_heads", 1, 2), d.size("ratio", 1, 3), d.pick("dk", [2, 4]), d.pick("dv", [3, 4])
    nv = nk * ratio
    state = g.cache("ssm_state", (nv, dk, dv), "state", axis=0, groups=nk)
    ys, chunk = [], d.pick("chunk", [0, 3])  # token by token, or chunks of 3 (a partial one at 4 tokens)
    for i, t in enumerate([d.size("tokens", 1, 4), d.size("next_tokens", 1, 2)]):
        q, k = (g.l2_norm(_f(g, f"{n}{i}", t, nk, dk)) for n in "qk")
        # g = log decay <= 0 and beta in (0, 1), as the layers make them (softplus, sigmoid)
        decay = g.scale(g.softplus(_f(g, f"a{i}", t, nv)), scale=-1.0)
        ys.append(
            g.gated_delta_rule(
                q,
                k,
                _f(g, f"v{i}", t, nv, dv),
                decay,
                g.sigmoid(_f(g, f"b{i}", t, nv)),
                state,
                scale=dk**-0.5,
                chunk=chunk,
            )
        )
    return g.concat(*ys, axis=0), {}


def _rms_norm_gated(g: Graph, d: Dims, rng: np.random.Generator) -> Built:
    shape = _rows(d)
    return g.rms_norm_gated(
        _f(g, "x", *shape), _f(g, "z", *shape), _f(g, "w", shape[-1]), eps=d.pick("eps", [1e-6, 1e-5])
    ), {}


OP_CASES: dict[str, Case] = {
    "add": _binary("add"),
    "mul": _binary("mul"),
    "swiglu": _binary("swiglu"),
    "geglu": _binary("geglu"),
    "scale": _unary("scale", scale=[0.5, -0.37, 3.0]),
    "silu": _unary("silu"),
    "gelu": _unary("gelu"),
    "sigmoid": _unary("sigmoid"),
    "softplus": _unary("softplus"),
    "tanh_softcap": _unary("tanh_softcap", cap=[30.0, 1.5]),
    "softmax": _unary("softmax", axis=[-1, 0]),
    "cast": _unary("cast", dtype=["float32", "float16", "bfloat16"]),
    "copy": _copy,
    "matmul": _matmul,
    "embedding": _embedding,
    "rms_norm": _norm("rms_norm", ["none", "w", "plus_one"]),
    "layer_norm": _norm("layer_norm", ["none", "w", "wb"]),
    "rope": _rope,
    "attention": _attention,
    "topk_route": lambda g, d, rng: (_route(g, d, d.size("tokens", 1, 4)), {}),
    "moe_ffn": _moe,
    "reshape": _reshape,
    "transpose": _transpose,
    "slice": _slice,
    "concat": _concat,
    # Gated DeltaNet ops
    "conv1d_causal": _conv1d_causal,
    "gated_delta_rule": _gated_delta_rule,
    "l2_norm": _unary("l2_norm", eps=[1e-6, 1e-5]),
    "rms_norm_gated": _rms_norm_gated,
}

# Special values an op's inputs may carry in the kit: where IEEE semantics alone fix the result. Element-wise ops
# and copies get all of them; softmax gets -inf (attention masks); reductions over a NaN/inf are left alone.
COPIES = ("copy", "cast", "embedding", "reshape", "transpose", "slice", "concat")
ELEMENTWISE = ("add", "mul", "swiglu", "geglu", "scale", "silu", "gelu", "sigmoid", "softplus", "tanh_softcap")
SPECIALS: dict[str, tuple[float, ...]] = {
    **dict.fromkeys([*ELEMENTWISE, *COPIES], (math.nan, math.inf, -math.inf)),
    "softmax": (-math.inf,),
}


def random_feeds(
    g: Graph,
    ints: dict[str, np.ndarray],
    rng: np.random.Generator,
    scale: float = 1.0,
    specials: Sequence[float] = (),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds, weights) for a traced case: normal floats times ``scale``; up to 3 entries of every float input
    replaced by ``specials``; integer inputs from ``ints``."""
    feeds: dict[str, np.ndarray] = dict(ints)
    weights: dict[str, np.ndarray] = {}
    for table, tensors in ((feeds, g.inputs), (weights, g.weights)):
        for name, t in tensors.items():
            if name in ints:
                continue
            a = rng.standard_normal(t.shape) * scale
            if specials and a.size and table is feeds:
                where = rng.integers(0, a.size, rng.integers(0, 4))
                a.reshape(-1)[where] = rng.choice(np.asarray(specials), where.size)
            table[name] = a.astype(t.dtype)
    return feeds, weights


# --- judging -------------------------------------------------------------------------------------------------

DEFAULT_NMSE = 1e-7
# llama.cpp test-backend-ops' bounds: mul_mat (and mul_mat_id: our moe_ffn) and flash-attn 5e-4, soft_max 1e-6,
# copies 0, everything else 1e-7.
NMSE: dict[str, float] = {
    "matmul": 5e-4,
    "attention": 5e-4,
    "moe_ffn": 5e-4,
    "softmax": 1e-6,
    **dict.fromkeys(COPIES, 0.0),
}
MODEL_NMSE = 1e-4  # end-to-end logits, llama.cpp's test-llama-archs bound


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """sum((a - b)^2) / sum(b^2), b the reference (the plain squared error when b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.sum(b * b))
    num = float(np.sum((a - b) ** 2))
    return num if den == 0.0 else num / den


def compare(got: np.ndarray, want: np.ndarray, threshold: float) -> tuple[float, str | None]:
    """(NMSE over the entries finite in both, the first disagreement in words or None).

    Shapes and dtypes must agree, NaN and +/-inf must sit at the same positions, and the finite entries must be
    within ``threshold`` NMSE of the reference ``want``.
    """
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf, f"result is {got.shape} {got.dtype.name}, the reference {want.shape} {want.dtype.name}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    value = nmse(g[finite], w[finite])
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        differ = test(g) != test(w)
        if differ.any():
            at = tuple(int(i) for i in np.argwhere(differ)[0])
            return value, (
                f"{what} positions differ from the reference at {int(differ.sum())} of {g.size} entries "
                f"(first at {at}: got {g[at]:.6g}, reference {w[at]:.6g})"
            )
    if value > threshold:
        err = np.abs(np.where(finite, g, 0.0) - np.where(finite, w, 0.0))
        worst = np.unravel_index(int(np.argmax(err)), g.shape)
        at = tuple(int(i) for i in worst)
        return (
            value,
            f"NMSE {value:.2e} > threshold {threshold:.0e} (largest error at {at}: {g[at]:.6g} vs {w[at]:.6g})",
        )
    return value, None


# --- collectives -----------------------------------------------------------------------------------------------


def make_inputs(world: int, length: int, dtype: str, seed: int, trailing: tuple[int, ...] = ()) -> list[np.ndarray]:
    """One host buffer per rank: integers in [-1000, 1000) or normal floats times 4."""
    rng = np.random.default_rng(seed)
    dt = dtypes.to_dtype(dtype)
    shape = (length, *trailing)
    if dt == dtypes.int32:
        return [rng.integers(-1000, 1000, shape).astype(dt) for _ in range(world)]
    return [(rng.standard_normal(shape) * 4).astype(dt) for _ in range(world)]


def reference(parts: list[np.ndarray], op: str) -> np.ndarray:
    """float64 reduction of the inputs exactly as given (no intermediate rounding)."""
    stack = np.stack([p.astype(np.float64) for p in parts])
    reduced: np.ndarray = {"sum": stack.sum(0), "max": stack.max(0), "min": stack.min(0)}[op]
    return reduced


def assert_reduced(result: np.ndarray, parts: list[np.ndarray], op: str) -> None:
    """max/min and integers exactly; float sums within the final rounding plus float32 accumulation error."""
    dt = parts[0].dtype
    ref = reference(parts, op)
    assert result.dtype == dt and result.shape == ref.shape, f"got {result.shape} {result.dtype}, want {ref.shape}"
    got = result.astype(np.float64)
    if op != "sum" or dt == dtypes.int32:
        wrong = got != ref
        assert not wrong.any(), f"{int(wrong.sum())} of {ref.size} entries differ, first at {int(np.argmax(wrong))}"
        return
    acc_eps = float(dtypes.finfo(dtypes.accumulator(dt)).eps)
    out_eps = float(dtypes.finfo(dt).eps)
    magnitude = np.sum([np.abs(p.astype(np.float64)) for p in parts], axis=0)
    bound = out_eps * np.abs(ref) + len(parts) * acc_eps * magnitude + float(dtypes.finfo(dt).tiny)
    excess = np.abs(got - ref) - bound
    at = int(np.argmax(excess)) if excess.size else 0
    assert excess.max(initial=0.0) <= 0, (
        f"sum error exceeds the bound at {at}: got {got.flat[at]:.9g}, float64 reference {ref.flat[at]:.9g}"
    )


# --- end to end ------------------------------------------------------------------------------------------------

SYNTHETIC_MODELS: dict[str, Config] = {
    "synthetic-dense": Config(  # layer 0 slides a window of 3: its ring cache wraps during the 5-token prompt
        vocab=64,
        hidden=32,
        n_layer=2,
        n_head=4,
        n_kv=2,
        head_dim=8,
        ffn=48,
        qk_norm=True,
        ctx=16,
        window=3,
        window_layers=(0,),
    ),
    "synthetic-moe": Config(
        vocab=64,
        hidden=32,
        n_layer=2,
        n_head=6,
        n_kv=3,
        head_dim=8,
        ffn=40,
        n_expert=4,
        top_k=2,
        dense_layers=(0,),
        qk_norm=True,
        ctx=16,
    ),
}
PROMPT_LEN, DECODE = 5, (5, 11)  # a prompt, then two single-token steps with fixed ids (no argmax dependence)


def split_for(tp: int) -> list[float]:
    """An uneven split for ``tp`` devices (2:1:...:1): remainders and zero-size shards get exercised."""
    return [2.0] + [1.0] * (tp - 1)


@dataclass(frozen=True)
class ModelCase:
    """A model the end-to-end section runs: a synthetic config, or a Hugging Face directory."""

    name: str
    config: Config | None = None
    path: Path | None = None

    def logits(
        self, devices: Any, communicator: Any = None, tensor_split: Sequence[float] | None = None
    ) -> list[np.ndarray]:
        """float32 logits of every step: the prompt, then the decode steps. ``communicator``: a name, or an open
        (multi-process) communicator, whose devices are then the ones used."""
        if self.config is not None:
            return self._synthetic(devices, communicator, tensor_split)
        from ..runtime.model import load

        assert self.path is not None
        with load(self.path, devices, tensor_split, communicator=communicator, ctx=16, progress=False) as model:
            prompt = [(7 * i + 3) % model.vocab for i in range(PROMPT_LEN)]
            s = model.session()
            return [s.eval(ids) for ids in (prompt, *([t % model.vocab] for t in DECODE))]

    def _synthetic(self, devices: Any, communicator: Any, tensor_split: Sequence[float] | None) -> list[np.ndarray]:
        from ..core.executor import Executor

        assert self.config is not None
        cfg = self.config
        graphs = GraphCache(lambda tokens: build(cfg, tokens))
        ex = Executor(devices, communicator, tensor_split)
        ex.load_weights(graphs(tokens=PROMPT_LEN), random_weights(graphs(tokens=PROMPT_LEN), seed=0))
        prompt = [(7 * i + 3) % cfg.vocab for i in range(PROMPT_LEN)]
        out, past = [], 0
        for ids in (prompt, *([t % cfg.vocab] for t in DECODE)):
            feeds = {"tokens": np.array(ids), "positions": np.arange(past, past + len(ids))}
            out.append(ex.run(graphs(tokens=len(ids)), feeds)["logits"])
            past += len(ids)
        return out


def model_cases(models: Path | None) -> list[ModelCase]:
    """The synthetic models, then ``models``: one model (a Hugging Face directory, ``NAME/hf``, or a .gguf file),
    or every Hugging Face directory (``DIR/NAME/hf`` or ``DIR/NAME``) under it."""
    cases = [ModelCase(name, config=cfg) for name, cfg in SYNTHETIC_MODELS.items()]
    if models is None:
        return cases
    one = _model_path(models)
    if one is not None:
        name = models.stem if models.is_file() else (models.parent if models.name == "hf" else models).name
        return [*cases, ModelCase(name, path=one)]
    for d in sorted(p for p in models.iterdir() if p.is_dir()):
        hf = _model_path(d)
        if hf is not None and hf.is_dir():
            cases.append(ModelCase(d.name, path=hf))
    return cases


def _model_path(p: Path) -> Path | None:
    """``p`` as one model: a .gguf file, a Hugging Face directory, or a directory with one in ``hf``."""
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    for d in (p, p / "hf"):
        if (d / "config.json").exists():
            return d
    return None


# --- weight formats ------------------------------------------------------------------------------------------

HELD_OPS = ("matmul", "embedding", "moe_ffn")  # the ops that take weights as held (OpDef.held)
WEIGHT_FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
_SCALES = {"q8_0": 5e-4, "q4_0": 8e-3, "q4_1": 8e-3, "q5_0": 4e-3, "q5_1": 4e-3, "q4_k": 3e-4, "q5_k": 2e-4}


def random_held(fmt: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A weight of logical ``shape`` as held in ``fmt``: floats ~N(0, 1/fan_in) in that dtype, or random blocks
    whose float16 scales (and mins) keep the values that size (every bit pattern of the quants is exercised)."""
    f = dtypes.FORMATS[fmt]
    if not f.quantized:
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(f.dtype)
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // f.block, f.block_bytes), dtype=np.uint8)

    def half(v: float) -> np.ndarray:
        return np.frombuffer(np.float16(v).tobytes(), np.uint8)

    if fmt == "q6_k":
        blocks[..., 208:210] = half(5e-5)
    else:
        blocks[..., 0:2] = half(_SCALES[fmt])
        if fmt in ("q4_1", "q5_1", "q4_k", "q5_k"):
            blocks[..., 2:4] = half(-0.06 if fmt.endswith("_1") else _SCALES[fmt])
    return blocks.reshape(f.held_shape(shape))


def weight_case(op: str, fmt: str, rng: np.random.Generator) -> tuple[Graph, dict[str, np.ndarray], dict[str, Any]]:
    """Op ``op`` reading weights held in ``fmt`` (inner dimension two blocks): (graph with output "y", feeds, held
    weights by name). The reference is the graph evaluated on those weights converted to float32."""
    k = 2 * dtypes.FORMATS[fmt].block
    g = Graph("float32", name=f"{op}-{fmt}")
    shapes: dict[str, tuple[int, ...]]
    if op == "matmul":
        shapes = {"w": (5, k)}
        y = g.matmul(g.input("x", (3, k), "float32"), g.weight("w", shapes["w"]))
        feeds = {"x": rng.standard_normal((3, k)).astype(np.float32)}
    elif op == "embedding":
        shapes = {"table": (7, k)}
        y = g.embedding(g.input("ids", (4,), "int32"), g.weight("table", shapes["table"]))
        feeds = {"ids": np.array([6, 0, 3, 6], np.int32)}
    else:
        h, ff, e = k, k, 3
        shapes = {"gate": (e, ff, h), "up": (e, ff, h), "down": (e, h, ff)}
        x = g.input("x", (4, h), "float32")
        route = g.topk_route(g.input("logits", (4, e), "float32"), k=2)
        y = g.moe_ffn(x, route, *(g.weight(n, s) for n, s in shapes.items()))
        feeds = {
            "x": rng.standard_normal((4, h)).astype(np.float32),
            "logits": rng.standard_normal((4, e)).astype(np.float32),
        }
    g.output("y", y)
    return g, feeds, {n: random_held(fmt, s, rng) for n, s in shapes.items()}


def as_float32(fmt: str, held: np.ndarray) -> np.ndarray:
    """A held weight converted to float32 by core's reference (the truth the backend is held to)."""
    from ..core.ops.weights import dequantize

    f = dtypes.FORMATS[fmt]
    return dequantize(np, held, f) if f.quantized else held.astype(np.float32)

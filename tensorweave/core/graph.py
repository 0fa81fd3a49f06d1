"""The graph IR and the tracing builder that model code calls.

Model code never mentions devices: it declares inputs, weights (with a sharding ``Role``) and persistent caches,
then chains ops on a ``Graph``; every op is checked by its shape/dtype rule as it is traced::

    g = Graph("float32")
    ids = g.input("tokens", (n_tokens,), "int32")
    x = g.embedding(ids, g.weight("tok_embd", (vocab, hidden)))
    q = g.linear(x, g.weight("blk.0.attn_q", (n_head * hd, hidden), Role.COLUMN, groups=n_kv, layer=0))

A cache declares its kind (``CacheSpec``): position-indexed KV, a sliding-window ring, or a recurrent state
rewritten whole every step, and the axis it is split along over devices. The runtime rewinds, snapshots and saves
each cache by its kind.

``GraphCache`` keeps traced graphs by input-shape signature, so decode steps (one token each) reuse one graph and
with it the executor's plan and buffers. ``Graph.evaluate`` runs a graph unsharded on numpy: the reference.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ShapeError
from . import dtypes
from .ops import OPS, Shape, infer
from .sharding import Role, State, split_state

CACHE_KINDS = ("kv", "ring", "state")


@dataclass(frozen=True)
class CacheSpec:
    """How a persistent cache holds a context, and which axis of it is split over devices (None: replicated).

    - ``kv``: row p holds position p (rows = the context length); it goes back to any earlier position in place,
      since attention reads only up to the newest position and later rows are rewritten before they are read.
    - ``ring``: a sliding window of ``window`` positions in ``rows`` slots, position p in slot p % rows; once it
      has wrapped, the positions an earlier point needs are overwritten.
    - ``state``: one whole value that every step rewrites (a recurrent or convolution state): it holds the newest
      position only and can go back only from a snapshot.
    """

    kind: str
    axis: int | None
    window: int | None = None  # ring: positions attention reads (default: every slot)

    def positions(self, rows: int, n_past: int) -> range | None:
        """The positions a kv/ring cache of ``rows`` rows holds after ``n_past`` tokens, oldest first (row of
        position p: p % rows); None for a state, which holds a whole value rather than positions."""
        if self.kind == "state":
            return None
        return range(max(0, n_past - rows) if self.kind == "ring" else 0, n_past)

    def can_rewind(self, rows: int, n_past: int, n: int) -> bool:
        """Whether the cache can go back from ``n_past`` to ``n`` tokens in place (without a snapshot)."""
        if n >= n_past or self.kind == "kv":
            return True
        if self.kind == "ring":  # positions [n - window, n) must still be in the ring
            return max(0, n - (self.window or rows)) >= max(0, n_past - rows)
        return False


@dataclass(eq=False)
class Tensor:
    """A value in a graph: an input, a weight, a persistent cache, or the output of a node."""

    graph: Graph = field(repr=False)
    id: int
    name: str
    shape: Shape
    dtype: np.dtype[Any]
    kind: str  # "input" | "weight" | "cache" | "node"
    role: Role = Role.REPLICATED
    groups: int | None = None  # indivisible units along the role's split axis (None: every entry)
    layer: int = 0  # rotates where shard remainders land, as llama.cpp does
    cache: CacheSpec | None = None  # caches only: kind and split axis

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def spec(self) -> tuple[Any, ...]:
        """What must agree between two declarations of one weight or cache: shape, dtype, role, groups, layer,
        cache kind and split axis."""
        return (self.shape, self.dtype, self.role, self.groups, self.layer, self.cache)

    @property
    def split_axis(self) -> int | None:
        """The axis a weight or cache is split along over devices (None: replicated)."""
        if self.cache is not None:
            return self.cache.axis
        return self.role.axis(len(self.shape)) if self.shape else None

    def placement(self, ratios: Any) -> State:
        """This weight's or cache's split state over devices with ``ratios``."""
        return split_state(self.split_axis, self.shape, self.groups, ratios, self.layer)

    def __add__(self, other: Tensor) -> Tensor:
        return self.graph.op("add", self, other)

    def __mul__(self, other: Tensor) -> Tensor:
        return self.graph.op("mul", self, other)


@dataclass(eq=False)
class Node:
    op: str
    inputs: tuple[Tensor, ...]
    attrs: dict[str, Any]
    out: Tensor


class Graph:
    """One traced computation. Tensors and nodes are kept in trace order, which is a valid execution order."""

    def __init__(self, dtype: Any = "float32", name: str = "graph") -> None:
        self.dtype = dtypes.to_dtype(dtype)  # the compute dtype: default for weights and caches
        self.name = name
        self.tensors: list[Tensor] = []
        self.nodes: list[Node] = []
        self.inputs: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        self.caches: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.tokens: int | None = None  # tokens per step, for per-token statistics in the Plan

    # --- declarations ---------------------------------------------------------------------------------------

    def _tensor(self, name: str, shape: Any, dtype: Any, kind: str, **extra: Any) -> Tensor:
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"{self.name}: {kind} {name!r} has a negative dimension in {shape}")
        t = Tensor(self, len(self.tensors), name, shape, dtypes.to_dtype(dtype), kind, **extra)
        self.tensors.append(t)
        return t

    def input(self, name: str, shape: Any, dtype: Any = "int32") -> Tensor:
        """A value fed on every run (token ids, positions): replicated on every device."""
        if name in self.inputs:
            raise ShapeError(f"{self.name}: input {name!r} declared twice")
        self.inputs[name] = t = self._tensor(name, shape, dtype, "input")
        return t

    def weight(
        self,
        name: str,
        shape: Any,
        role: Role = Role.REPLICATED,
        *,
        groups: int | None = None,
        layer: int = 0,
        dtype: Any = None,
    ) -> Tensor:
        """A weight, laid out over devices by ``role`` in ``groups`` indivisible units. Declaring the same name
        again with the same spec returns the same tensor (tied embeddings)."""
        return self._persistent(self.weights, "weight", name, shape, role, groups, layer, dtype, None)

    def cache(
        self,
        name: str,
        shape: Any,
        kind: str,
        *,
        axis: int | None,
        groups: int | None = None,
        layer: int = 0,
        dtype: Any = None,
        window: int | None = None,
    ) -> Tensor:
        """Persistent per-device state that ops read and write, kept across runs: a ``kind`` of ``CACHE_KINDS``
        (see ``CacheSpec``) split along ``axis`` (None: replicated) in ``groups`` units. A kv or ring cache is
        [rows, ...] indexed by position along axis 0, which is never the split axis (a KV cache [ctx, kv_heads,
        head_dim] splits along axis 1); a ring reads the last ``window`` positions (default: all its rows)."""
        shape = tuple(int(s) for s in shape)
        if kind not in CACHE_KINDS:
            raise ShapeError(f"{self.name}: cache {name!r} has kind {kind!r}; kinds: {', '.join(CACHE_KINDS)}")
        if axis is not None and not -len(shape) <= axis < len(shape):
            raise ShapeError(f"{self.name}: cache {name!r} {shape} has no axis {axis} to split along")
        axis = None if axis is None else axis % len(shape)
        if kind != "state" and (not shape or axis == 0):
            raise ShapeError(
                f"{self.name}: {kind} cache {name!r} {shape} is indexed by position along axis 0, "
                "which cannot also be its split axis"
            )
        if window is not None and (kind != "ring" or not 0 < window <= shape[0]):
            raise ShapeError(
                f"{self.name}: cache {name!r}: a window ({window}) is for a ring of at least that many "
                f"slots, not a {kind} cache {shape}"
            )
        spec = CacheSpec(kind, axis, window)
        return self._persistent(self.caches, "cache", name, shape, Role.REPLICATED, groups, layer, dtype, spec)

    def _persistent(
        self,
        table: dict[str, Tensor],
        kind: str,
        name: str,
        shape: Any,
        role: Role,
        groups: int | None,
        layer: int,
        dtype: Any,
        cache: CacheSpec | None,
    ) -> Tensor:
        dtype = self.dtype if dtype is None else dtype
        t = self._tensor(name, shape, dtype, kind, role=role, groups=groups, layer=layer, cache=cache)
        old = table.get(name)
        if old is not None:
            self.tensors.pop()
            if old.spec != t.spec:
                raise ShapeError(f"{self.name}: {kind} {name!r} declared twice with a different shape/dtype/split")
            return old
        axis = t.split_axis
        if axis is not None and groups is not None and (groups <= 0 or t.shape[axis] % groups):
            raise ShapeError(
                f"{self.name}: {kind} {name!r} {t.shape}: axis {axis} of length {t.shape[axis]} is not {groups} "
                f"whole groups"
            )
        table[name] = t
        return t

    def output(self, name: str, t: Tensor) -> Tensor:
        """Mark ``t`` as a result of the graph; results come back whole (replicated) on the host."""
        self.outputs[name] = t
        return t

    # --- ops ------------------------------------------------------------------------------------------------

    def op(self, name: str, *inputs: Tensor, **attrs: Any) -> Tensor:
        """Append a node running registered op ``name``; its shape rule checks the inputs now."""
        for t in inputs:
            if not isinstance(t, Tensor) or t.graph is not self:
                raise ShapeError(f"{self.name}: {name} got {t!r}, not a tensor of this graph")
        shape, dtype = infer(name, [(t.shape, t.dtype) for t in inputs], attrs)
        out = self._tensor(f"{name}.{len(self.nodes)}", shape, dtype, "node")
        self.nodes.append(Node(name, tuple(inputs), dict(attrs), out))
        return out

    def __getattr__(self, name: str) -> Callable[..., Tensor]:
        if name in OPS:  # g.silu(x), g.matmul(x, w), g.reshape(x, shape=...) ...
            return functools.partial(self.op, name)
        raise AttributeError(f"{type(self).__name__} has no attribute or op {name!r}")

    def linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        """x @ W^T (+ bias). The bias is a separate add so a row-parallel layer adds it after the reduce."""
        y = self.op("matmul", x, w)
        return y if bias is None else self.op("add", y, bias)

    def rms_norm(self, x: Tensor, w: Tensor | None = None, *, eps: float, plus_one: bool = False) -> Tensor:
        return self.op("rms_norm", x, *([w] if w is not None else []), eps=eps, plus_one=plus_one)

    def layer_norm(self, x: Tensor, w: Tensor | None = None, b: Tensor | None = None, *, eps: float) -> Tensor:
        if b is not None and w is None:
            raise ShapeError("layer_norm: a bias needs a weight (pass w)")
        return self.op("layer_norm", x, *[t for t in (w, b) if t is not None], eps=eps)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: Tensor,
        *,
        scale: float,
        cache: tuple[Tensor, Tensor] | None = None,
        sinks: Tensor | None = None,
        causal: bool = True,
        window: int | None = None,
        softcap: float | None = None,
        write: bool = True,
    ) -> Tensor:
        """softmax(q k^T * scale) v over [tokens, heads, head_dim], GQA by head groups.

        With ``cache=(k_cache, v_cache)`` the new keys/values are written at ``positions`` and the queries attend
        over the cache. Key j is visible from the query at position p iff j <= p (causal) and p - window < j.
        With a ``window`` the cache may be a ring shorter than the context (position j in slot j % len): a
        session's consecutive positions then need only ``window`` slots however long the context grows.
        ``write=False``: the cache is another attention's of this step, which already wrote the same ``k``/``v``
        (a KV-shared layer reading its source layer's cache).
        """
        for c in cache or ():
            spec = c.cache
            if spec is not None and (spec.kind == "state" or (spec.kind == "ring" and window != spec.window)):
                raise ShapeError(
                    f"{self.name}: attention with window={window} cannot use {spec.kind} cache {c.name!r} "
                    f"(window {spec.window}): keys/values go in a kv cache, or a ring of the attention's window"
                )
        extra = [*(cache or ()), *([sinks] if sinks is not None else [])]
        return self.op(
            "attention",
            q,
            k,
            v,
            positions,
            *extra,
            scale=scale,
            causal=causal,
            window=window,
            softcap=softcap,
            cache=cache is not None,
            sinks=sinks is not None,
            **({} if write else {"write": False}),
        )

    # --- reference evaluation -------------------------------------------------------------------------------

    def evaluate(
        self,
        feeds: Mapping[str, Any],
        weights: Mapping[str, Any],
        caches: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the graph unsharded with the numpy reference kernels. ``caches`` (name -> array) is updated in
        place and created (zeros) where missing, so consecutive calls continue a context."""
        caches = {} if caches is None else caches
        env: dict[int, Any] = {}
        for name, t in self.inputs.items():
            env[t.id] = _host_value(feeds, name, t, "feed")
        for name, t in self.weights.items():
            env[t.id] = _host_value(weights, name, t, "weight")
        for name, t in self.caches.items():
            if name not in caches:
                caches[name] = np.zeros(t.shape, t.dtype)
            env[t.id] = caches[name]
        for node in self.nodes:
            op = OPS[node.op]
            args = [env[t.id] for t in node.inputs]
            if op.view:
                env[node.out.id] = op.kernel(np, *args, **node.attrs)
            else:
                env[node.out.id] = out = np.empty(node.out.shape, node.out.dtype)
                op.kernel(np, out, *args, **node.attrs)
        return {name: np.array(env[t.id]) for name, t in self.outputs.items()}

    def __repr__(self) -> str:
        return (
            f"<Graph {self.name!r} {self.dtype.name}: {len(self.nodes)} nodes, {len(self.weights)} weights, "
            f"{len(self.caches)} caches, inputs {[(n, t.shape) for n, t in self.inputs.items()]}>"
        )


def _host_value(values: Mapping[str, Any], name: str, t: Tensor, what: str) -> np.ndarray:
    if name not in values:
        raise ShapeError(f"missing {what} {name!r} ({t.shape} {t.dtype.name})")
    a = np.asarray(values[name])
    if a.shape != t.shape:
        raise ShapeError(f"{what} {name!r} has shape {a.shape}, the graph expects {t.shape}")
    if a.dtype != t.dtype and (t.dtype == dtypes.int32) != (a.dtype.kind in "iu"):
        raise ShapeError(f"{what} {name!r} has dtype {a.dtype.name}, the graph expects {t.dtype.name}")
    return a.astype(t.dtype, copy=False)


class GraphCache:
    """Traced graphs by signature: ``cache(tokens=1)`` traces ``build(tokens=1)`` once and then returns that graph.

    Decode steps share one signature and so one graph, one plan and one set of executor buffers. Least recently
    used graphs beyond ``maxsize`` are dropped (and with them, once unreferenced, their buffers).
    """

    def __init__(self, build: Callable[..., Graph], maxsize: int = 16) -> None:
        self.build = build
        self.maxsize = maxsize
        self._graphs: OrderedDict[tuple[tuple[str, Any], ...], Graph] = OrderedDict()

    def __call__(self, **signature: Any) -> Graph:
        key = tuple(sorted(signature.items()))
        g = self._graphs.pop(key, None)
        if g is None:
            g = self.build(**signature)
        self._graphs[key] = g
        while len(self._graphs) > self.maxsize:
            self._graphs.popitem(last=False)
        return g

    def __len__(self) -> int:
        return len(self._graphs)

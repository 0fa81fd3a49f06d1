"""Split states and tensor_split ratios -> per-device shard sizes.

A value distributed over N devices is in one of three states:
- ``REPLICATED``: every device holds the whole value;
- ``Split(axis, sizes)``: device j holds ``sizes[j]`` consecutive entries along ``axis`` (rank order; a size may be 0);
- ``PARTIAL``: every device holds a value of the whole shape, and the true value is their sum.

Model code gives each weight a ``Role`` (a cache names its split axis) and a number of ``groups`` (the indivisible
units along the split axis: KV-head groups with their query heads, quantization blocks). ``shard_sizes`` turns
the ratios into whole groups per device the way llama.cpp does: boundaries are the prefix sums of the ratios scaled
to the group count and rounded down, with the prefix sum started at device ``layer % N`` so the rounding
remainders land on a different device each layer. Tensors that must agree (q/k/v/o of a layer, gate/up/down) share
boundaries because they are computed from the same (groups, ratios, layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

from ..errors import SplitError


@dataclass(frozen=True)
class Replicated:
    def __repr__(self) -> str:
        return "REPLICATED"


@dataclass(frozen=True)
class Partial:
    def __repr__(self) -> str:
        return "PARTIAL"


@dataclass(frozen=True)
class Split:
    axis: int  # non-negative
    sizes: tuple[int, ...]  # one per device, rank order

    def __repr__(self) -> str:
        return f"SPLIT(axis={self.axis}, sizes={list(self.sizes)})"


State = Replicated | Partial | Split
REPLICATED = Replicated()
PARTIAL = Partial()


class Role(Enum):
    """How a weight (or a persistent cache) is laid out over devices. Weights are [out, in] (y = x @ W^T)."""

    REPLICATED = "replicated"  # embeddings, norms, MoE router: every device holds it all
    COLUMN = "column"  # split output features (axis 0): q/k/v, gate/up; also column biases and per-head vectors
    ROW = "row"  # split input features (last axis): attention output, FFN down -> PARTIAL results
    VOCAB = "vocab"  # the LM head, column-parallel over the vocabulary (logits gathered); or a tied embedding
    EXPERT_COLUMN = "expert_column"  # stacked experts [E, out, in], split out (axis 1)
    EXPERT_ROW = "expert_row"  # stacked experts [E, out, in], split in (axis 2)

    def axis(self, ndim: int) -> int | None:
        """The axis this role splits in a tensor of ``ndim`` dimensions (None: not split)."""
        offset = {"column": 0, "vocab": 0, "row": -1, "expert_column": -2, "expert_row": -1}
        a = offset.get(self.value)
        return None if a is None else a % ndim


def normalize_split(tensor_split: Sequence[float] | None, world: int) -> tuple[float, ...]:
    """Validate ``tensor_split`` ratios for ``world`` devices. None or all zeros = even split (as llama.cpp)."""
    if world < 1:
        raise SplitError(f"tensor_split needs at least one device, got world size {world}")
    if tensor_split is None:
        return (1.0,) * world
    if isinstance(tensor_split, (str, bytes)):
        raise SplitError(f"tensor_split must be a list of numbers like [3, 1], got the string {tensor_split!r}")
    try:
        ratios = tuple(float(r) for r in tensor_split)
    except (TypeError, ValueError):
        raise SplitError(f"tensor_split must be a list of numbers like [3, 1], got {tensor_split!r}") from None
    if len(ratios) != world:
        raise SplitError(
            f"tensor_split has {len(ratios)} entries {list(ratios)} but there are {world} devices; give one ratio "
            "per device"
        )
    bad = [r for r in ratios if not math.isfinite(r) or r < 0]
    if bad:
        raise SplitError(f"tensor_split entries must be finite and >= 0, got {bad[0]} in {list(ratios)}")
    return (1.0,) * world if not any(ratios) else ratios


def shard_sizes(groups: int, ratios: Sequence[float], layer: int = 0) -> tuple[int, ...]:
    """Whole groups per device (rank order) for ``groups`` indivisible units split by ``ratios``.

    Exact arithmetic (no float rounding surprises); a device with ratio 0 gets 0; the sizes sum to ``groups``.
    """
    n = len(ratios)
    fr = [Fraction(r) for r in ratios]
    total = sum(fr)
    start = layer % n
    sizes = [0] * n
    prefix, prev = Fraction(0), 0
    for k in range(n):
        j = (start + k) % n
        prefix += fr[j]
        boundary = groups if k == n - 1 else math.floor(groups * prefix / total)
        sizes[j] = boundary - prev
        prev = boundary
    return tuple(sizes)


def weight_state(role: Role, shape: Sequence[int], groups: int | None, ratios: Sequence[float], layer: int) -> State:
    """The split state of a weight with this role, shape and group count under ``ratios``."""
    return split_state(role.axis(len(shape)) if shape else None, shape, groups, ratios, layer)


def split_state(
    axis: int | None, shape: Sequence[int], groups: int | None, ratios: Sequence[float], layer: int
) -> State:
    """The split state of a tensor split along ``axis`` (None: replicated) in ``groups`` units under ``ratios``."""
    if axis is None or len(ratios) == 1:
        return REPLICATED
    dim = shape[axis]
    groups = dim if groups is None else groups
    if dim == 0:
        return Split(axis, (0,) * len(ratios))
    if groups <= 0 or dim % groups:
        raise SplitError(f"a tensor of shape {tuple(shape)} split along axis {axis} ({dim}) is not {groups} groups")
    per = dim // groups
    return Split(axis, tuple(s * per for s in shard_sizes(groups, ratios, layer)))


def local_shape(shape: Sequence[int], state: State, rank: int) -> tuple[int, ...]:
    """The shape device ``rank`` holds of a value of ``shape`` in ``state``."""
    out = list(shape)
    if isinstance(state, Split):
        out[state.axis] = state.sizes[rank]
    return tuple(out)


def local_slice(shape: Sequence[int], state: State, rank: int) -> tuple[slice, ...]:
    """The index of device ``rank``'s part in the whole value (whole axes for REPLICATED/PARTIAL)."""
    index = [slice(None)] * len(shape)
    if isinstance(state, Split):
        start = sum(state.sizes[:rank])
        index[state.axis] = slice(start, start + state.sizes[rank])
    return tuple(index)

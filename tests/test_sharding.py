"""tensor_split ratios -> shard sizes: exact, proportional, rotated by layer, zero-size shards, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorweave.core.sharding import (
    REPLICATED,
    Role,
    Split,
    local_slice,
    normalize_split,
    shard_sizes,
    split_state,
    weight_state,
)
from tensorweave.errors import SplitError

ratios_st = st.lists(st.integers(0, 5), min_size=1, max_size=8).filter(any)


@given(groups=st.integers(0, 300), ratios=ratios_st, layer=st.integers(0, 100))
def test_shard_sizes_are_whole_groups_proportional_to_the_ratios(groups: int, ratios: list[int], layer: int) -> None:
    sizes = shard_sizes(groups, ratios, layer)
    assert len(sizes) == len(ratios) and sum(sizes) == groups and min(sizes) >= 0
    total = sum(ratios)
    for s, r in zip(sizes, ratios, strict=True):
        assert abs(s - groups * r / total) < 1  # rounding moves at most one group
        if r == 0:
            assert s == 0


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("groups", [1, 2, 5, 7, 13, 32])
def test_remainders_rotate_over_layers(n: int, groups: int) -> None:
    """Even ratios: over n consecutive layers every device holds the same number of groups in total."""
    totals = [sum(col) for col in zip(*(shard_sizes(groups, [1] * n, layer) for layer in range(n)), strict=True)]
    assert len(set(totals)) == 1, totals


def test_more_devices_than_groups_gives_zero_size_shards() -> None:
    sizes = shard_sizes(2, [1] * 8, 0)
    assert sorted(sizes) == [0] * 6 + [1, 1]


def test_exact_arithmetic_for_awkward_ratios() -> None:
    assert shard_sizes(3, [0.1, 0.2, 0.7], 0) == (0, 0, 3)
    assert shard_sizes(10, [1 / 3, 1 / 3, 1 / 3], 0) == (3, 3, 4)
    assert shard_sizes(100, [3, 1], 0) == (75, 25)


def test_normalize_split() -> None:
    assert normalize_split(None, 3) == (1.0, 1.0, 1.0)
    assert normalize_split([0, 0], 2) == (1.0, 1.0)  # all zeros: even, as llama.cpp
    assert normalize_split([3, 1], 2) == (3.0, 1.0)
    assert normalize_split((0, 2), 2) == (0.0, 2.0)


@pytest.mark.parametrize(
    ("ratios", "match"),
    [
        ([1, -1], r"finite and >= 0, got -1"),
        ([1, float("nan")], "finite"),
        ([1, float("inf")], "finite"),
        ([1, 1, 1], "3 entries .* 2 devices"),
        ([1], "1 entries .* 2 devices"),
        ("3,1", "string"),
        ([1, "x"], "list of numbers"),
    ],
)
def test_malformed_ratios_are_clear_errors(ratios: object, match: str) -> None:
    with pytest.raises(SplitError, match=match):
        normalize_split(ratios, 2)  # type: ignore[arg-type]


def test_weight_state_by_role() -> None:
    r = (3.0, 1.0)
    assert weight_state(Role.REPLICATED, (8, 4), None, r, 0) == REPLICATED
    assert weight_state(Role.COLUMN, (8, 4), None, r, 0) == Split(0, (6, 2))
    assert weight_state(Role.ROW, (4, 8), None, r, 0) == Split(1, (6, 2))
    assert weight_state(Role.COLUMN, (8,), 2, r, 0) == Split(0, (4, 4))  # two groups of 4: one each
    assert weight_state(Role.EXPERT_COLUMN, (3, 8, 4), None, r, 0) == Split(1, (6, 2))
    assert weight_state(Role.EXPERT_ROW, (3, 4, 8), None, r, 0) == Split(2, (6, 2))
    assert split_state(1, (16, 4, 2), 4, r, 0) == Split(1, (3, 1))  # a KV cache, split by KV head
    assert split_state(None, (16, 4, 2), None, r, 0) == REPLICATED
    assert weight_state(Role.COLUMN, (8, 4), None, (1.0,), 0) == REPLICATED  # one device: nothing to split
    with pytest.raises(SplitError, match="not 3 groups"):
        weight_state(Role.COLUMN, (8, 4), 3, r, 0)


@given(dim=st.integers(0, 40), ratios=ratios_st, layer=st.integers(0, 9))
def test_local_slices_tile_the_axis(dim: int, ratios: list[int], layer: int) -> None:
    state = weight_state(Role.COLUMN, (dim, 3), None, [float(r) for r in ratios], layer)
    covered = []
    for rank in range(len(ratios)):
        sl = local_slice((dim, 3), state, rank)
        covered += list(range(dim))[sl[0]]
        assert sl[1] == slice(None)
    assert covered == list(range(dim))

"""dtype names, aliases and accumulators."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tensorweave.core import dtypes
from tensorweave.errors import UnsupportedError


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("bf16", ml_dtypes.bfloat16),
        ("BFloat16", ml_dtypes.bfloat16),
        ("f32", np.float32),
        ("half", np.float16),
        ("i32", np.int32),
        (np.float64, np.float64),
        (np.dtype(ml_dtypes.bfloat16), ml_dtypes.bfloat16),
    ],
)
def test_aliases(alias: object, expected: type) -> None:
    assert dtypes.to_dtype(alias) == np.dtype(expected)


def test_names_and_accumulators() -> None:
    assert dtypes.name(ml_dtypes.bfloat16) == "bfloat16" and dtypes.short_name("float16") == "f16"
    assert dtypes.accumulator("bf16") == dtypes.float32 == dtypes.accumulator("f16")
    assert dtypes.accumulator("f64") == dtypes.float64 and dtypes.accumulator("i32") == dtypes.int32
    assert float(dtypes.finfo("bf16").eps) == 2.0**-7


@pytest.mark.parametrize("bad", ["float8", np.int8, np.complex64, "object"])
def test_unknown_dtypes_are_refused(bad: object) -> None:
    with pytest.raises(UnsupportedError, match="unsupported dtype"):
        dtypes.to_dtype(bad)

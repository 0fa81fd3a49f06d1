"""Op registry kernels against independent float64 references.

Every registered op's reference kernel (``OPS[name].kernel``, the numpy path ``Graph.evaluate`` runs) is compared
with an implementation written here the obvious way: Python loops over tokens, heads, keys and experts, ``math``
functions, complex-number rotation for rope, exact ``Fraction`` rounding for casts. Nothing here calls a helper of
``tensorweave.core.ops``, so a kernel bug cannot hide behind shared code. ``test_every_registered_op_is_tested``
fails when an op is registered without a test in this file.
"""

from __future__ import annotations

import cmath
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays, mutually_broadcastable_shapes
from numpy.typing import NDArray

from tensorweave.conformance.cases import nmse  # the metric only; every reference here is independent
from tensorweave.core import dtypes, ops
from tensorweave.core.graph import Graph
from tensorweave.core.ops import OPS
from tensorweave.errors import OpAttributeError, ShapeError, UnsupportedError

Array = NDArray[Any]
F = TypeVar("F", bound=Callable[..., Any])

F64, F32, F16, BF16, I32 = dtypes.float64, dtypes.float32, dtypes.float16, dtypes.bfloat16, dtypes.int32
LOW_PRECISION = [F32, F16, BF16]
ALL_FLOATS = [F64, F32, F16, BF16]

# --- bookkeeping: which ops this file tests ------------------------------------------------------------------

COVERED: set[str] = set()


def covers(*names: str) -> Callable[[F], F]:
    """Mark a test as checking the kernels of ``names`` (see test_every_registered_op_is_tested)."""
    COVERED.update(names)
    return lambda fn: fn


# --- running kernels ------------------------------------------------------------------------------------------


def run(name: str, *inputs: Array, **attrs: Any) -> Array:
    """Run op ``name`` through its kernel: view ops return their view, others fill a NaN-poisoned ``out``."""
    shape, dtype = ops.infer(name, [(a.shape, a.dtype) for a in inputs], attrs)
    op = OPS[name]
    if op.view:
        return np.asarray(op.kernel(np, *inputs, **attrs))
    out = np.empty(shape, dtype)
    out[...] = np.nan if dtypes.is_float(dtype) else -7  # a kernel that forgets an element shows up
    op.kernel(np, out, *inputs, **attrs)
    return out


def f64(a: Any) -> Array:
    return np.asarray(a).astype(np.float64)


def tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol) for results of ``dtype`` against the float64 reference (computed on the rounded inputs)."""
    name = dtypes.name(dtype)
    if name == "float64":
        return 1e-12, 1e-13
    if name == "float32":
        return 1e-5, 1e-6
    return dtypes.TOLERANCES[name]


def assert_close(got: Array, ref: Array, *, atol: float | None = None) -> None:
    rtol, default_atol = tolerance(got.dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    g = f64(got)
    assert not np.isnan(g).any(), "kernel produced NaN"
    np.testing.assert_allclose(g, ref, rtol=rtol, atol=default_atol if atol is None else atol)


def randn(rng: np.random.Generator, shape: Sequence[int], dtype: Any = F64, scale: float = 1.0) -> Array:
    return (rng.standard_normal(tuple(shape)) * scale).astype(dtype)


seeds = st.integers(0, 2**32 - 1)
finite = st.floats(-40.0, 40.0, allow_nan=False, allow_subnormal=False)


# --- scalar references ----------------------------------------------------------------------------------------


def ref_sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def ref_silu(v: float) -> float:
    return v * ref_sigmoid(v)


GELU_C = math.sqrt(2.0 / math.pi)


def ref_gelu(v: float) -> float:
    """0.5 v (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3), written as v * sigmoid(2u) (the same function,
    without the cancellation of 1 + tanh(u) for very negative u); checked against the textbook form below."""
    return v * ref_sigmoid(2.0 * GELU_C * (v + 0.044715 * v**3))


def ref_softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def elementwise(fn: Callable[[float], float], x: Array) -> Array:
    flat = [fn(float(v)) for v in f64(x).ravel()]
    return np.array(flat, dtype=np.float64).reshape(x.shape)


def broadcast_index(index: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element of an input of ``shape`` that numpy broadcasting pairs with output ``index``."""
    tail = index[len(index) - len(shape) :]
    return tuple(i if n != 1 else 0 for i, n in zip(tail, shape, strict=True))


def ref_binary(fn: Callable[[float, float], float], a: Array, b: Array, out_shape: tuple[int, ...]) -> Array:
    out = np.zeros(out_shape)
    fa, fb = f64(a), f64(b)
    for index in np.ndindex(*out_shape):
        out[index] = fn(float(fa[broadcast_index(index, a.shape)]), float(fb[broadcast_index(index, b.shape)]))
    return out


def test_reference_gelu_is_the_tanh_approximation() -> None:
    for v in np.linspace(-6.0, 6.0, 97):
        textbook = 0.5 * v * (1.0 + math.tanh(GELU_C * (v + 0.044715 * v**3)))
        assert math.isclose(ref_gelu(float(v)), textbook, rel_tol=1e-9, abs_tol=1e-14)
    assert math.isclose(ref_gelu(1.0), 0.8411919906082768, rel_tol=1e-15)  # torch gelu(1, approximate="tanh")


# --- element-wise ops -----------------------------------------------------------------------------------------

UNARY: dict[str, tuple[Callable[[float], float], dict[str, Any]]] = {
    "silu": (ref_silu, {}),
    "gelu": (ref_gelu, {}),
    "sigmoid": (ref_sigmoid, {}),
    "softplus": (ref_softplus, {}),
    "tanh_softcap": (lambda v: 7.5 * math.tanh(v / 7.5), {"cap": 7.5}),
    "scale": (lambda v: v * -0.37, {"scale": -0.37}),
}


@covers(*UNARY)
@pytest.mark.parametrize("name", sorted(UNARY))
@given(x=arrays(np.float64, st.tuples(st.integers(0, 3), st.integers(1, 5)), elements=finite))
def test_unary_float64(name: str, x: Array) -> None:
    fn, attrs = UNARY[name]
    got = run(name, x, **attrs)
    assert got.dtype == F64
    np.testing.assert_allclose(got, elementwise(fn, x), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtypes.short_name)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_low_precision(name: str, dtype: np.dtype[Any]) -> None:
    fn, attrs = UNARY[name]
    x = (np.linspace(-8.0, 8.0, 61).reshape(61, 1) * np.array([1.0, 0.3])).astype(dtype)
    got = run(name, x, **attrs)
    assert got.dtype == dtype
    assert_close(got, elementwise(fn, x))


@covers("sigmoid", "silu", "softplus", "tanh_softcap", "gelu")
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
def test_saturating_ops_at_large_magnitudes_do_not_overflow(dtype: np.dtype[Any]) -> None:
    big = np.array([-1e4, -800.0, -745.0, -100.0, -40.0, -20.0, -0.0, 20.0, 40.0, 100.0, 800.0, 1e4])
    if dtype == F16:
        big = big[np.abs(big) < 6e4]
    x = big.astype(dtype)
    checks: list[tuple[str, Callable[[float], float], dict[str, Any]]] = [
        ("sigmoid", ref_sigmoid, {}),
        ("silu", ref_silu, {}),
        ("softplus", ref_softplus, {}),
        ("tanh_softcap", lambda v: 30.0 * math.tanh(v / 30.0), {"cap": 30.0}),
    ]
    rtol, _ = tolerance(dtype)
    tiny = float(dtypes.finfo(dtype).tiny)  # results below the normal range carry no relative precision
    moderate = np.array([-30.0, -10.0, 0.0, 10.0, 30.0]).astype(dtype)  # gelu's v^3 must stay finite
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        for name, fn, attrs in checks:
            got = run(name, x, **attrs)
            np.testing.assert_allclose(f64(got), elementwise(fn, x), rtol=rtol, atol=tiny, err_msg=name)
        got = run("gelu", moderate)
        np.testing.assert_allclose(f64(got), elementwise(ref_gelu, moderate), rtol=rtol, atol=tiny, err_msg="gelu")
        inf = np.array([-np.inf, np.inf]).astype(dtype)
        np.testing.assert_array_equal(f64(run("sigmoid", inf)), [0.0, 1.0])
        np.testing.assert_array_equal(f64(run("tanh_softcap", inf, cap=5.0)), [-5.0, 5.0])


@covers("add", "mul")
@pytest.mark.parametrize(("name", "fn"), [("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)])
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3), seed=seeds)
def test_add_mul_broadcast_float64(name: str, fn: Callable[[float, float], float], shapes: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = randn(rng, shapes.input_shapes[0]), randn(rng, shapes.input_shapes[1])
    got = run(name, a, b)
    assert got.shape == shapes.result_shape
    np.testing.assert_array_equal(got, ref_binary(fn, a, b, shapes.result_shape))  # one IEEE op: exact


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtypes.short_name)
@pytest.mark.parametrize(("name", "fn"), [("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)])
def test_add_mul_low_precision(name: str, fn: Callable[[float, float], float], dtype: np.dtype[Any]) -> None:
    rng = np.random.default_rng(1)
    a, b = randn(rng, (4, 1, 3), dtype), randn(rng, (5, 1), dtype)
    got = run(name, a, b)
    assert got.dtype == dtype
    assert_close(got, ref_binary(fn, a, b, (4, 5, 3)))


GLU: dict[str, Callable[[float], float]] = {"swiglu": ref_silu, "geglu": ref_gelu}


@covers("swiglu", "geglu")
@pytest.mark.parametrize("name", sorted(GLU))
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3), seed=seeds)
def test_gated_units(name: str, shapes: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gate, up = randn(rng, shapes.input_shapes[0], scale=3.0), randn(rng, shapes.input_shapes[1])
    act = GLU[name]
    got = run(name, gate, up)
    np.testing.assert_allclose(got, ref_binary(lambda g, u: act(g) * u, gate, up, shapes.result_shape), rtol=1e-12)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtypes.short_name)
@pytest.mark.parametrize("name", sorted(GLU))
def test_gated_units_low_precision(name: str, dtype: np.dtype[Any]) -> None:
    rng = np.random.default_rng(2)
    gate, up = randn(rng, (6, 8), dtype, 3.0), randn(rng, (6, 8), dtype)
    act = GLU[name]
    assert_close(run(name, gate, up), ref_binary(lambda g, u: act(g) * u, gate, up, (6, 8)))


def ref_softmax(x: Array, axis: int) -> Array:
    moved = np.moveaxis(f64(x), axis, -1)
    out = np.zeros(moved.shape)
    for index in np.ndindex(*moved.shape[:-1]):
        row = [float(v) for v in moved[index]]
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = math.fsum(e)
        out[index] = [v / s for v in e]
    return np.moveaxis(out, -1, axis)


@covers("softmax")
@given(
    data=st.data(),
    x=arrays(np.float64, st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), elements=finite),
)
def test_softmax_any_axis(data: st.DataObject, x: Array) -> None:
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    got = run("softmax", x, axis=axis)
    np.testing.assert_allclose(got, ref_softmax(x, axis), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
def test_softmax_masked_and_large_logits(dtype: np.dtype[Any]) -> None:
    x = np.array([[0.0, -np.inf, 1.0, -np.inf], [1000.0, 999.0, -1000.0, 998.0], [-5.0, -5.0, -5.0, -5.0]])
    if dtype == F16:
        x = np.where(np.isfinite(x), x / 100.0, x)
    x = x.astype(dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = run("softmax", x)
    assert_close(got, ref_softmax(x, -1))
    assert f64(got)[0, 1] == 0.0 == f64(got)[0, 3]
    assert run("softmax", x, axis=0).shape == x.shape


# --- casts and copies -----------------------------------------------------------------------------------------

# precision (significant bits incl. the implicit one), smallest normal exponent, largest exponent
FORMATS: dict[str, tuple[int, int, int]] = {
    "float32": (24, -126, 127),
    "float16": (11, -14, 15),
    "bfloat16": (8, -126, 127),
}


def ref_round(v: float, dtype: Any) -> float:
    """``v`` rounded once, to nearest with ties to even, into ``dtype`` (subnormals and overflow included)."""
    precision, emin, emax = FORMATS[dtypes.name(dtype)]
    if v == 0.0 or not math.isfinite(v):
        return v
    _, e = math.frexp(v)  # |v| = m * 2**e with 0.5 <= m < 1: the leading bit has exponent e - 1
    ulp = Fraction(2) ** (max(e - 1, emin) - precision + 1)
    r = abs(round(Fraction(v) / ulp) * ulp)  # Fraction.__round__ rounds half to even, exactly
    biggest = (2 - Fraction(2) ** (1 - precision)) * Fraction(2) ** emax
    return math.copysign(math.inf if r > biggest else float(r), v)


@st.composite
def near_ties(draw: st.DrawFn, precision: int) -> float:
    """Values at or just beside the midpoint of two neighbours with ``precision`` bits: where double rounding
    (float64 -> float32 -> 16-bit) goes wrong."""
    mant = draw(st.integers(2 ** (precision - 1), 2**precision - 1))
    nudge = draw(st.sampled_from([0.0, 1.0, -1.0])) * 2.0 ** -draw(st.integers(10, 40))
    sign = draw(st.sampled_from([1.0, -1.0]))
    return sign * math.ldexp(mant + 0.5 + nudge, draw(st.integers(-30, 30)) - precision)


def cast_values(dtype: np.dtype[Any]) -> st.SearchStrategy[float]:
    precision, _, _ = FORMATS[dtypes.name(dtype)]
    limit = 6e4 if dtype == F16 else 1e30
    return st.one_of(st.floats(-limit, limit, allow_nan=False), near_ties(precision))


def check_cast(values: list[float], dtype: np.dtype[Any]) -> None:
    x = np.array(values, dtype=np.float64)
    with np.errstate(over="ignore"):  # rounding past the largest finite value gives inf, as checked below
        got = run("cast", x, dtype=dtypes.name(dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(f64(got), [ref_round(v, dtype) for v in values])


@covers("cast")
@given(values=st.lists(cast_values(BF16), min_size=1, max_size=8))
def test_cast_float64_to_bfloat16_rounds_once(values: list[float]) -> None:
    check_cast(values, BF16)


@given(values=st.lists(cast_values(F16), min_size=1, max_size=8))
def test_cast_float64_to_float16_rounds_once(values: list[float]) -> None:
    check_cast(values, F16)


@given(values=st.lists(cast_values(F32), min_size=1, max_size=8))
def test_cast_float64_to_float32_rounds_once(values: list[float]) -> None:
    check_cast(values, F32)


def test_cast_double_rounding_cases() -> None:
    # 1 + 2^-8 + 2^-32 is just above the midpoint of 1 and the next bfloat16 (1 + 2^-7): rounded once it goes up;
    # rounded to float32 first it lands exactly on the midpoint and ties to even go down to 1.
    check_cast([1 + 2**-8 + 2**-32, -(1 + 2**-8 + 2**-32), 3 * (1 + 2**-8 - 2**-40), 1 + 2**-8], BF16)
    check_cast([1 + 2**-11 + 2**-40, 1 + 2**-11, 1 + 3 * 2**-11, 65520.0, 65519.99, 2.0**-25, 2.0**-24 * 1.5], F16)
    check_cast([1e300, -1e300, math.inf, -math.inf, 3.3961e38, 3.3962e38, 1e-300], BF16)


@pytest.mark.parametrize(("src", "dst"), [(F32, BF16), (BF16, F16), (F16, BF16), (BF16, F32), (F16, F64), (F32, F16)])
def test_cast_between_low_precision_types(src: np.dtype[Any], dst: np.dtype[Any]) -> None:
    rng = np.random.default_rng(3)
    x = randn(rng, (5, 7), src, 40.0)
    got = run("cast", x, dtype=dtypes.short_name(dst))
    ref = [v if dst == F64 else ref_round(v, dst) for v in f64(x).ravel()]
    np.testing.assert_array_equal(f64(got).ravel(), ref)


@covers("copy", "allreduce", "allgather")
@pytest.mark.parametrize("name", ["copy", "allreduce", "allgather"])
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
def test_identities_on_one_device(name: str, dtype: np.dtype[Any]) -> None:
    x = randn(np.random.default_rng(4), (3, 4), dtype)[:, ::2]  # a strided view
    got = run(name, x)
    assert got.dtype == dtype and got.shape == (3, 2) and not np.shares_memory(got, x)
    for index in np.ndindex(*x.shape):
        assert f64(got[index]) == f64(x[index])


# --- matmul, embedding, norms ---------------------------------------------------------------------------------


def ref_matmul(x: Array, w: Array) -> Array:
    xf, wf = f64(x), f64(w)
    n_out, k = wf.shape
    out = np.zeros((*xf.shape[:-1], n_out))
    for index in np.ndindex(*xf.shape[:-1]):
        for o in range(n_out):
            out[(*index, o)] = math.fsum(float(xf[(*index, i)]) * float(wf[o, i]) for i in range(k))
    return out


@covers("matmul")
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    k=st.integers(0, 6),
    n_out=st.integers(1, 4),
    seed=seeds,
)
def test_matmul_x_at_w_transposed(dtype: np.dtype[Any], batch: list[int], k: int, n_out: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, w = randn(rng, (*batch, k), dtype), randn(rng, (n_out, k), dtype)
    got = run("matmul", x, w)
    assert got.dtype == dtype and got.shape == (*batch, n_out)
    ref = ref_matmul(x, w)
    assert_close(got, ref)
    if dtype == F64:
        assert nmse(got, ref) <= 1e-24
    if k == 0:
        np.testing.assert_array_equal(f64(got), np.zeros(ref.shape))


def test_matmul_mixed_input_dtypes_compute_in_the_wider_one() -> None:
    rng = np.random.default_rng(5)
    x, w = randn(rng, (2, 3, 16), F32), randn(rng, (5, 16), BF16)
    got = run("matmul", x, w)
    assert got.dtype == F32
    assert_close(got, ref_matmul(x, w))
    x64 = randn(rng, (4, 16), F64)
    got64 = run("matmul", x64, w)
    np.testing.assert_allclose(got64, ref_matmul(x64, w), rtol=1e-12, atol=1e-13)


@covers("embedding")
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
@pytest.mark.parametrize("ids_shape", [(5,), (2, 3), (0,)])
def test_embedding_rows(dtype: np.dtype[Any], ids_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(6)
    table = randn(rng, (11, 4), dtype)
    ids = rng.integers(0, 11, ids_shape).astype(np.int32)
    got = run("embedding", ids, table)
    assert got.dtype == dtype and got.shape == (*ids_shape, 4)
    for index in np.ndindex(*ids_shape):
        for j in range(4):
            assert f64(got[(*index, j)]) == f64(table[int(ids[index]), j])


@covers("embedding")
def test_embedding_over_vocabulary_parts_sums_to_the_lookup() -> None:
    """A device holding rows [offset, offset + n) looks up only those ids and writes zeros for the others."""
    rng = np.random.default_rng(7)
    table = randn(rng, (11, 4), np.dtype(np.float64))
    ids = np.array([0, 10, 3, 7, 7, 5], np.int32)
    parts = [run("embedding", ids, table[a:b], offset=a, vocab=11) for a, b in ((0, 4), (4, 4), (4, 9), (9, 11))]
    for part, (a, b) in zip(parts, ((0, 4), (4, 4), (4, 9), (9, 11)), strict=True):
        for t, i in enumerate(ids):
            expected = table[i] if a <= i < b else np.zeros(4)
            assert part[t].tolist() == expected.tolist()
    with pytest.raises(ShapeError, match=r"token ids must be in 0\.\.10"):
        run("embedding", np.array([11], np.int32), table[:4], offset=0, vocab=11)


def ref_rms_norm(x: Array, w: Array | None, eps: float, plus_one: bool) -> Array:
    xf = f64(x)
    out = np.zeros(xf.shape)
    for index in np.ndindex(*xf.shape[:-1]):
        row = [float(v) for v in xf[index]]
        inv = 1.0 / math.sqrt(math.fsum(v * v for v in row) / len(row) + eps)
        for j, v in enumerate(row):
            gain = 1.0 if w is None else (1.0 + float(w[j]) if plus_one else float(w[j]))
            out[(*index, j)] = v * inv * gain
    return out


def ref_layer_norm(x: Array, w: Array | None, b: Array | None, eps: float) -> Array:
    xf = f64(x)
    out = np.zeros(xf.shape)
    for index in np.ndindex(*xf.shape[:-1]):
        row = [float(v) for v in xf[index]]
        mean = math.fsum(row) / len(row)
        var = math.fsum((v - mean) ** 2 for v in row) / len(row)
        for j, v in enumerate(row):
            y = (v - mean) / math.sqrt(var + eps)
            y = y * (1.0 if w is None else float(w[j])) + (0.0 if b is None else float(b[j]))
            out[(*index, j)] = y
    return out


@covers("rms_norm")
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    hidden=st.integers(1, 6),
    form=st.sampled_from(["none", "w", "plus_one"]),
    eps=st.sampled_from([1e-6, 1e-5, 0.25]),
    seed=seeds,
)
def test_rms_norm(dtype: np.dtype[Any], lead: list[int], hidden: int, form: str, eps: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = randn(rng, (*lead, hidden), dtype, 2.0)
    w = randn(rng, (hidden,), dtype) if form != "none" else None
    g = Graph(dtype)
    xt = g.input("x", x.shape, dtype)
    wt = g.weight("w", (hidden,)) if w is not None else None
    g.output("y", g.rms_norm(xt, wt, eps=eps, plus_one=form == "plus_one"))
    got = g.evaluate({"x": x}, {"w": w})["y"]
    assert got.dtype == dtype
    assert_close(got, ref_rms_norm(x, None if w is None else f64(w), eps, form == "plus_one"))


@covers("layer_norm")
@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=dtypes.short_name)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    hidden=st.integers(1, 6),
    form=st.sampled_from(["none", "w", "wb"]),
    seed=seeds,
)
def test_layer_norm(dtype: np.dtype[Any], lead: list[int], hidden: int, form: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = randn(rng, (*lead, hidden), dtype, 2.0) + np.asarray(3.0, dtype)
    w = randn(rng, (hidden,), dtype) if form != "none" else None
    b = randn(rng, (hidden,), dtype) if form == "wb" else None
    inputs = [a for a in (w, b) if a is not None]
    got = run("layer_norm", x, *inputs, eps=1e-5)
    assert got.dtype == dtype
    ref = ref_layer_norm(x, None if w is None else f64(w), None if b is None else f64(b), 1e-5)
    assert_close(got, ref, atol=tolerance(dtype)[1] * 10)


# --- rope -----------------------------------------------------------------------------------------------------


def ref_inv_freq(i: int, n_rot: int, theta: float, scaling: dict[str, Any] | None) -> float:
    """Inverse frequency of rotated pair ``i``; llama3 written from HF's ``_compute_llama3_parameters``."""
    inv = 1.0 / math.pow(theta, 2 * i / n_rot)
    kind = (scaling or {}).get("type", "default")
    if kind == "default":
        return inv
    assert scaling is not None
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    assert kind == "llama3"
    old = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    low_freq_wavelen, high_freq_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    if wavelen < high_freq_wavelen:  # high frequency: unchanged
        return inv
    if wavelen > low_freq_wavelen:  # low frequency: interpolated by the factor
        return inv / factor
    smooth = (old / wavelen - low) / (high - low)
    return (1 - smooth) * inv / factor + smooth * inv


def ref_rope(
    x: Array, positions: Array, *, theta: float, neox: bool, n_rot: int, scaling: dict[str, Any] | None = None
) -> Array:
    """Rotate each pair (neox: i, i + n_rot/2; normal: 2i, 2i + 1) as a complex number by position * inv_freq."""
    xf = f64(x)
    out = xf.copy()  # dims past n_rot pass through
    half = n_rot // 2
    for t in range(xf.shape[0]):
        for h in range(xf.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                z = complex(xf[t, h, a], xf[t, h, b]) * cmath.exp(
                    1j * int(positions[t]) * ref_inv_freq(i, n_rot, theta, scaling)
                )
                out[t, h, a], out[t, h, b] = z.real, z.imag
    return out


LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
scalings = st.one_of(
    st.none(),
    st.builds(lambda f: {"type": "linear", "factor": f}, st.sampled_from([2.0, 4.0, 0.5])),
    st.builds(
        lambda old, f, hi: {**LLAMA3, "factor": f, "high_freq_factor": hi, "original_max_position_embeddings": old},
        st.sampled_from([64, 512, 8192]),
        st.sampled_from([8.0, 32.0]),
        st.sampled_from([4.0, 2.5]),
    ),
)


@covers("rope")
@given(
    tokens=st.integers(1, 4),
    heads=st.integers(1, 3),
    half_dim=st.integers(1, 4),
    rot_pairs=st.integers(0, 4),
    theta=st.sampled_from([10000.0, 500000.0, 1e6, 100.0]),
    neox=st.booleans(),
    scaling=scalings,
    seed=seeds,
)
def test_rope_float64(
    tokens: int,
    heads: int,
    half_dim: int,
    rot_pairs: int,
    theta: float,
    neox: bool,
    scaling: dict[str, Any] | None,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    head_dim = 2 * half_dim
    n_rot = 2 * min(rot_pairs, half_dim) or head_dim  # 0: the whole head rotates
    x = randn(rng, (tokens, heads, head_dim))
    positions = rng.integers(0, 20000, tokens).astype(np.int32)
    attrs: dict[str, Any] = {"theta": theta, "neox": neox, "n_rot": n_rot if n_rot < head_dim else None}
    if scaling is not None:
        attrs["scaling"] = scaling
    got = run("rope", x, positions, **attrs)
    ref = ref_rope(x, positions, theta=theta, neox=neox, n_rot=n_rot, scaling=scaling)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])  # partial rotary: the tail is untouched


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtypes.short_name)
@pytest.mark.parametrize("neox", [True, False])
def test_rope_low_precision(dtype: np.dtype[Any], neox: bool) -> None:
    rng = np.random.default_rng(7)
    x = randn(rng, (5, 2, 8), dtype)
    positions = np.array([0, 1, 2, 100, 4000], dtype=np.int32)
    got = run("rope", x, positions, theta=10000.0, neox=neox, n_rot=6)
    assert got.dtype == dtype
    assert_close(got, ref_rope(x, positions, theta=10000.0, neox=neox, n_rot=6))
    assert np.array_equal(f64(got[..., 6:]), f64(x[..., 6:]))


def test_rope_llama3_scaling_covers_all_three_bands() -> None:
    # head_dim 8, theta 500000, original context 8192, low 1, high 4: pair wavelengths ~6, ~167 (kept), ~4443
    # (smoothed, between 2048 and 8192) and ~118000 (divided by the factor).
    scaling = {**LLAMA3, "original_max_position_embeddings": 8192}
    wavelengths = [2 * math.pi * 500000.0 ** (2 * i / 8) for i in range(4)]
    assert wavelengths[1] < 2048 < wavelengths[2] < 8192 < wavelengths[3]
    x = randn(np.random.default_rng(8), (3, 1, 8))
    positions = np.array([1, 777, 31000], dtype=np.int32)
    got = run("rope", x, positions, theta=500000.0, neox=True, scaling=scaling)
    np.testing.assert_allclose(got, ref_rope(x, positions, theta=500000.0, neox=True, n_rot=8, scaling=scaling))
    plain = run("rope", x, positions, theta=500000.0, neox=True)
    assert not np.allclose(got, plain)  # the scaling is applied, not ignored


@given(
    half_rot=st.integers(1, 4),
    extra=st.integers(0, 3),
    heads=st.integers(1, 3),
    hidden=st.integers(1, 5),
    seed=seeds,
)
def test_rope_pairings_are_the_gguf_qk_permutation(
    half_rot: int, extra: int, heads: int, hidden: int, seed: int
) -> None:
    """llama.cpp's converter permutes HF's Q/K rows so row 2i (2i+1) of a head is HF row i (i + half). The
    normal-pairing rope of the permuted projection equals the permuted neox rope of the HF projection."""
    rng = np.random.default_rng(seed)
    n_rot, head_dim = 2 * half_rot, 2 * half_rot + extra
    w_hf = randn(rng, (heads * head_dim, hidden))
    w_gguf = w_hf.copy()  # the rotated dims of each head interleaved, the tail kept
    for h in range(heads):
        for i in range(half_rot):
            w_gguf[h * head_dim + 2 * i] = w_hf[h * head_dim + i]
            w_gguf[h * head_dim + 2 * i + 1] = w_hf[h * head_dim + half_rot + i]
    tokens = 3
    g = Graph("float64")
    x = g.input("x", (tokens, hidden), "float64")
    pos = g.input("pos", (tokens,), "int32")
    for name, neox in (("hf", True), ("gguf", False)):
        q = g.reshape(g.matmul(x, g.weight(name, (heads * head_dim, hidden))), shape=(tokens, heads, head_dim))
        g.output(name, g.rope(q, pos, theta=10000.0, neox=neox, n_rot=n_rot))
    feeds = {"x": randn(rng, (tokens, hidden)), "pos": np.array([0, 5, 123], dtype=np.int32)}
    out = g.evaluate(feeds, {"hf": w_hf, "gguf": w_gguf})
    perm = [2 * i for i in range(half_rot)] + [2 * i + 1 for i in range(half_rot)] + list(range(n_rot, head_dim))
    np.testing.assert_allclose(out["gguf"][..., perm], out["hf"], rtol=1e-12, atol=1e-14)
    # and so attention scores (q . k within a head) do not depend on the layout
    np.testing.assert_allclose(
        np.einsum("thd,shd->hts", out["gguf"], out["gguf"]), np.einsum("thd,shd->hts", out["hf"], out["hf"]), atol=1e-12
    )


def test_rope_unknown_scaling_is_refused_at_trace_time() -> None:
    g = Graph("float32")
    x = g.input("x", (2, 1, 4), "float32")
    pos = g.input("pos", (2,), "int32")
    with pytest.raises(UnsupportedError, match="yarn"):
        g.rope(x, pos, scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedError, match="yarn"):
        g.rope(x, pos, scaling={"rope_type": "yarn", "factor": 4.0})  # transformers' key
    with pytest.raises(UnsupportedError, match="needs low_freq_factor, high_freq_factor"):
        g.rope(x, pos, scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64})
    assert g.nodes == []


def test_rope_scaling_reads_transformers_rope_type_key() -> None:
    """A Hugging Face rope_scaling dict ("rope_type") scales exactly like the older "type" spelling."""
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2, 16))
    pos = np.arange(5, dtype=np.int32) * 7
    outs = []
    for scaling in ({"rope_type": "llama3", **llama3}, {"type": "llama3", **llama3}, None):
        g = Graph("float64")
        xt, pt = g.input("x", x.shape, "float64"), g.input("pos", pos.shape, "int32")
        g.output("y", g.rope(xt, pt, theta=500.0, scaling=scaling))
        outs.append(g.evaluate({"x": x, "pos": pos}, {})["y"])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])  # the scaling took effect


# --- attention ------------------------------------------------------------------------------------------------


def ref_attention(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Sequence[int] | Array,
    k_pos: Sequence[int] | Array,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
) -> Array:
    """Per query token and head: softmax over the visible keys (plus the head's sink logit in the denominator)."""
    qf, kf, vf = f64(q), f64(k), f64(v)
    n_tok, n_head, head_dim = qf.shape
    n_kv = kf.shape[1]
    out = np.zeros((n_tok, n_head, head_dim))
    for t in range(n_tok):
        p = int(q_pos[t])
        for h in range(n_head):
            kv = h // (n_head // n_kv)  # GQA: query heads share KV heads in consecutive groups
            logits, rows = [], []
            for s in range(kf.shape[0]):
                j = int(k_pos[s])
                if (causal and j > p) or (window and not p - window < j):
                    continue
                score = scale * math.fsum(float(qf[t, h, d]) * float(kf[s, kv, d]) for d in range(head_dim))
                if softcap:
                    score = softcap * math.tanh(score / softcap)
                logits.append(score)
                rows.append(vf[s, kv])
            sink = [] if sinks is None else [float(sinks[h])]
            if not logits:
                continue
            m = max(logits + sink)
            weights = [math.exp(a - m) for a in logits]
            denom = math.fsum(weights + [math.exp(a - m) for a in sink])
            for wgt, row in zip(weights, rows, strict=True):
                out[t, h] += wgt / denom * row
    return out


attention_options = st.fixed_dictionaries(
    {
        "causal": st.booleans(),
        "window": st.sampled_from([None, 1, 2, 3]),
        "softcap": st.sampled_from([None, 2.0, 30.0]),
    }
)


@covers("attention")
@given(
    tokens=st.integers(1, 5),
    n_kv=st.integers(1, 2),
    group=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    options=attention_options,
    with_sinks=st.booleans(),
    shuffled=st.booleans(),
    seed=seeds,
)
def test_attention_float64(
    tokens: int,
    n_kv: int,
    group: int,
    head_dim: int,
    options: dict[str, Any],
    with_sinks: bool,
    shuffled: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    n_head = n_kv * group
    q = randn(rng, (tokens, n_head, head_dim), scale=2.0)
    k, v = randn(rng, (tokens, n_kv, head_dim)), randn(rng, (tokens, n_kv, head_dim))
    positions = np.arange(tokens, dtype=np.int32) + 7
    if shuffled:  # visibility follows positions, not the order of the rows
        positions = rng.permutation(positions).astype(np.int32)
    sinks = randn(rng, (n_head,)) if with_sinks else None
    scale = float(rng.uniform(0.2, 1.5))
    extra = [sinks] if sinks is not None else []
    got = run("attention", q, k, v, positions, *extra, scale=scale, sinks=with_sinks, **options)
    ref = ref_attention(q, k, v, positions, positions, scale=scale, sinks=sinks, **options)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtypes.short_name)
def test_attention_low_precision(dtype: np.dtype[Any]) -> None:
    rng = np.random.default_rng(9)
    q, k, v = randn(rng, (6, 4, 8), dtype), randn(rng, (6, 2, 8), dtype), randn(rng, (6, 2, 8), dtype)
    sinks = randn(rng, (4,), dtype)
    positions = np.arange(6, dtype=np.int32)
    got = run("attention", q, k, v, positions, sinks, scale=0.35, window=4, softcap=20.0, sinks=True)
    assert got.dtype == dtype
    assert_close(got, ref_attention(q, k, v, positions, positions, scale=0.35, window=4, softcap=20.0, sinks=sinks))


def attention_graph(tokens: int, n_head: int, n_kv: int, head_dim: int, ctx: int, **attrs: Any) -> Graph:
    """q/k/v/positions fed, optional sinks weight, optional KV cache of ``ctx`` positions (0: none)."""
    g = Graph("float64")
    q = g.input("q", (tokens, n_head, head_dim), "float64")
    k = g.input("k", (tokens, n_kv, head_dim), "float64")
    v = g.input("v", (tokens, n_kv, head_dim), "float64")
    pos = g.input("pos", (tokens,), "int32")
    kv = (ctx, n_kv, head_dim)
    cache = (g.cache("k_cache", kv, "kv", axis=1), g.cache("v_cache", kv, "kv", axis=1)) if ctx else None
    sinks = g.weight("sinks", (n_head,)) if attrs.pop("with_sinks", False) else None
    g.output("y", g.attention(q, k, v, pos, cache=cache, sinks=sinks, **attrs))
    return g


CACHE_CASES: dict[str, dict[str, Any]] = {
    "mha": {"n_head": 2, "n_kv": 2, "scale": 0.5},
    "gqa_window": {"n_head": 6, "n_kv": 2, "scale": 0.4, "window": 3},
    "gqa_sinks_softcap": {"n_head": 4, "n_kv": 2, "scale": 0.7, "softcap": 3.0, "with_sinks": True},
    "mqa_window_sinks": {"n_head": 3, "n_kv": 1, "scale": 1.0, "window": 2, "with_sinks": True},
}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_attention_kv_cache_prompt_vs_token_by_token(case: str) -> None:
    cfg = dict(CACHE_CASES[case])
    n_head, n_kv = cfg.pop("n_head"), cfg.pop("n_kv")
    head_dim, total, ctx = 3, 7, 10
    rng = np.random.default_rng(10)
    q = randn(rng, (total, n_head, head_dim))
    k, v = randn(rng, (total, n_kv, head_dim)), randn(rng, (total, n_kv, head_dim))
    weights = {"sinks": randn(rng, (n_head,))}
    positions = np.arange(total, dtype=np.int32)

    def feeds(lo: int, hi: int) -> dict[str, Array]:
        return {"q": q[lo:hi], "k": k[lo:hi], "v": v[lo:hi], "pos": positions[lo:hi]}

    full = attention_graph(total, n_head, n_kv, head_dim, 0, **cfg).evaluate(feeds(0, total), weights)["y"]
    ref = ref_attention(
        q,
        k,
        v,
        positions,
        positions,
        scale=cfg["scale"],
        window=cfg.get("window"),
        softcap=cfg.get("softcap"),
        sinks=weights["sinks"] if cfg.get("with_sinks") else None,
    )
    np.testing.assert_allclose(full, ref, rtol=1e-12, atol=1e-13)

    for chunks in ([total], [1] * total, [3, 1, 2, 1]):
        caches: dict[str, Array] = {}
        outs, lo = [], 0
        for n in chunks:
            g = attention_graph(n, n_head, n_kv, head_dim, ctx, **cfg)
            outs.append(g.evaluate(feeds(lo, lo + n), weights, caches)["y"])
            lo += n
        np.testing.assert_allclose(np.concatenate(outs), full, rtol=1e-12, atol=1e-13, err_msg=str(chunks))
        np.testing.assert_array_equal(caches["k_cache"][:total], k)  # the cache holds k/v at their positions
        np.testing.assert_array_equal(caches["v_cache"][:total], v)
        assert not caches["k_cache"][total:].any() and not caches["v_cache"][total:].any()


@pytest.mark.parametrize("window", [1, 3, 4])
@pytest.mark.parametrize("chunks", [[1] * 11, [5, 1, 3, 2], [11], [2, 7, 1, 1]])
def test_attention_ring_cache_of_window_slots_serves_any_context(window: int, chunks: list[int]) -> None:
    """A sliding-window layer's cache holds only ``window`` slots (position p in slot p % window); prefilling and
    decoding past the ring's length in any chunking equals attention over the whole history."""
    n_head, n_kv, head_dim, total = 4, 2, 3, sum(chunks)
    rng = np.random.default_rng(12)
    q = randn(rng, (total, n_head, head_dim))
    k, v = randn(rng, (total, n_kv, head_dim)), randn(rng, (total, n_kv, head_dim))
    positions = np.arange(total, dtype=np.int32)
    ref = ref_attention(q, k, v, positions, positions, scale=0.6, window=window)
    caches: dict[str, Array] = {}
    outs, lo = [], 0
    for n in chunks:
        g = attention_graph(n, n_head, n_kv, head_dim, window, scale=0.6, window=window)
        feeds = {"q": q[lo : lo + n], "k": k[lo : lo + n], "v": v[lo : lo + n], "pos": positions[lo : lo + n]}
        outs.append(g.evaluate(feeds, {}, caches)["y"])
        lo += n
    np.testing.assert_allclose(np.concatenate(outs), ref, rtol=1e-12, atol=1e-13)
    last = np.arange(total - window, total)  # the ring holds the last `window` positions, each in its slot
    np.testing.assert_array_equal(caches["k_cache"][last % window], k[last])
    np.testing.assert_array_equal(caches["v_cache"][last % window], v[last])


def test_attention_cache_writes_at_the_given_positions() -> None:
    rng = np.random.default_rng(11)
    q, k, v = randn(rng, (2, 2, 4)), randn(rng, (2, 1, 4)), randn(rng, (2, 1, 4))
    ck, cv = np.zeros((8, 1, 4)), np.zeros((8, 1, 4))
    positions = np.array([3, 5], dtype=np.int32)
    got = run("attention", q, k, v, positions, ck, cv, scale=0.5, cache=True, causal=False)
    np.testing.assert_array_equal(ck[[3, 5]], k)
    np.testing.assert_array_equal(cv[[3, 5]], v)
    assert not np.delete(ck, [3, 5], axis=0).any()
    # the queries attend over cache slots 0..5 (the last position); unwritten slots hold zeros
    ref = ref_attention(q, ck[:6], cv[:6], positions, list(range(6)), scale=0.5, causal=False)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


def test_attention_with_zero_heads() -> None:
    q = k = v = np.zeros((3, 0, 4))
    positions = np.arange(3, dtype=np.int32)
    assert run("attention", q, k, v, positions, scale=0.5).shape == (3, 0, 4)
    cache = np.zeros((5, 0, 4))
    got = run("attention", q, k, v, positions, cache, cache.copy(), np.zeros(0), scale=0.5, cache=True, sinks=True)
    assert got.shape == (3, 0, 4)


# --- MoE ------------------------------------------------------------------------------------------------------


def ref_topk(logits: Array, k: int, gating: str, norm: bool, scale: float) -> Array:
    lf = f64(logits)
    out = np.zeros(lf.shape)
    for t in range(lf.shape[0]):
        row = [float(a) for a in lf[t]]
        if gating == "softmax":
            m = max(row)
            e = [math.exp(a - m) for a in row]
            probs = [a / math.fsum(e) for a in e]
        else:
            probs = [ref_sigmoid(a) for a in row]
        chosen = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]  # ties: the lower expert index
        total = math.fsum(probs[i] for i in chosen) if norm else 1.0
        for i in chosen:
            out[t, i] = probs[i] / total * scale
    return out


@covers("topk_route")
@given(
    data=st.data(),
    tokens=st.integers(1, 4),
    experts=st.integers(1, 6),
    gating=st.sampled_from(["softmax", "sigmoid"]),
    norm=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
)
def test_topk_route(data: st.DataObject, tokens: int, experts: int, gating: str, norm: bool, scale: float) -> None:
    k = data.draw(st.integers(1, experts), label="k")
    grid = st.integers(-12, 12).map(lambda i: i / 4)  # coarse values: ties happen, distinct ones stay distinct
    logits = np.array(
        data.draw(st.lists(st.lists(grid, min_size=experts, max_size=experts), min_size=tokens, max_size=tokens))
    )
    got = run("topk_route", logits, k=k, gating=gating, norm=norm, scale=scale)
    ref = ref_topk(logits, k, gating, norm, scale)
    np.testing.assert_array_equal(got != 0, ref != 0)
    assert ((got != 0).sum(axis=1) == k).all()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_topk_route_ties_and_qwen3_moe_semantics() -> None:
    logits = np.array([[1.0, 2.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    top1 = run("topk_route", logits, k=1, norm=True)
    np.testing.assert_array_equal(top1, [[0, 1, 0, 0], [1, 0, 0, 0]])
    top2 = run("topk_route", logits, k=2, norm=False)  # Qwen3-MoE norm_topk_prob=False: raw softmax weights
    e = np.exp(logits[0] - 2.0)
    np.testing.assert_allclose(top2[0], [0, e[1] / e.sum(), e[2] / e.sum(), 0], rtol=1e-15)
    np.testing.assert_allclose(top2[1], [0.25, 0.25, 0, 0], rtol=1e-15)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtypes.short_name)
def test_topk_route_low_precision(dtype: np.dtype[Any]) -> None:
    logits = np.array([[0.25 * ((3 * t + 5 * e) % 11) - 1 for e in range(8)] for t in range(5)]).astype(dtype)
    got = run("topk_route", logits, k=3, gating="sigmoid", norm=True, scale=1.5)
    assert got.dtype == dtype
    assert_close(got, ref_topk(logits, 3, "sigmoid", True, 1.5))


ACTS: dict[str, Callable[[float], float]] = {"silu": ref_silu, "gelu": ref_gelu}


def ref_moe(x: Array, route: Array, gate: Array, up: Array, down: Array, act: str) -> Array:
    xf, rf, gf, uf, df = (f64(a) for a in (x, route, gate, up, down))
    n_tok, hidden = xf.shape
    n_exp, n_ff, _ = gf.shape
    out = np.zeros((n_tok, hidden))
    for t in range(n_tok):
        for e in range(n_exp):
            r = float(rf[t, e])
            if r == 0.0:
                continue
            h = []
            for f in range(n_ff):
                g = math.fsum(float(gf[e, f, i]) * float(xf[t, i]) for i in range(hidden))
                u = math.fsum(float(uf[e, f, i]) * float(xf[t, i]) for i in range(hidden))
                h.append(ACTS[act](g) * u)
            for o in range(hidden):
                out[t, o] += r * math.fsum(float(df[e, o, f]) * h[f] for f in range(n_ff))
    return out


@covers("moe_ffn")
@given(
    tokens=st.integers(0, 4),
    experts=st.integers(1, 4),
    hidden=st.integers(1, 4),
    n_ff=st.integers(0, 4),
    act=st.sampled_from(sorted(ACTS)),
    seed=seeds,
)
def test_moe_ffn(tokens: int, experts: int, hidden: int, n_ff: int, act: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = randn(rng, (tokens, hidden))
    route = rng.uniform(0.1, 1.0, (tokens, experts)) * (rng.random((tokens, experts)) < 0.6)
    gate, up = randn(rng, (experts, n_ff, hidden)), randn(rng, (experts, n_ff, hidden))
    down = randn(rng, (experts, hidden, n_ff))
    got = run("moe_ffn", x, route, gate, up, down, act=act)
    ref = ref_moe(x, route, gate, up, down, act)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert nmse(got, ref) <= 1e-24


@pytest.mark.parametrize("dtype", [F64, *LOW_PRECISION], ids=dtypes.short_name)
def test_router_and_experts_in_a_graph(dtype: np.dtype[Any]) -> None:
    """The Qwen3-MoE block as model code traces it: router matmul -> topk_route -> moe_ffn."""
    tokens, hidden, experts, n_ff = 5, 6, 4, 3
    rng = np.random.default_rng(12)
    w = {
        "router": randn(rng, (experts, hidden), dtype),
        "gate": randn(rng, (experts, n_ff, hidden), dtype, 0.5),
        "up": randn(rng, (experts, n_ff, hidden), dtype, 0.5),
        "down": randn(rng, (experts, hidden, n_ff), dtype, 0.5),
    }
    g = Graph(dtype)
    x = g.input("x", (tokens, hidden), dtype)
    route = g.topk_route(g.matmul(x, g.weight("router", (experts, hidden))), k=2, norm=False)
    experts_t = [g.weight(n, w[n].shape) for n in ("gate", "up", "down")]
    g.output("y", g.moe_ffn(x, route, *experts_t, act="silu"))
    g.output("route", route)
    xv = randn(rng, (tokens, hidden), dtype)
    out = g.evaluate({"x": xv}, w)
    ref_route = ref_topk(ref_matmul(xv, w["router"]), 2, "softmax", False, 1.0)
    assert_close(out["route"], ref_route)
    assert_close(out["y"], ref_moe(xv, out["route"], w["gate"], w["up"], w["down"], "silu"))


# --- shape ops ------------------------------------------------------------------------------------------------


@covers("reshape")
@pytest.mark.parametrize(
    ("src", "dst"), [((2, 3, 4), (6, 4)), ((6, 4), (2, 3, 2, 2)), ((0, 3), (3, 0)), ((5,), (5, 1))]
)
def test_reshape_view(src: tuple[int, ...], dst: tuple[int, ...]) -> None:
    x = np.arange(math.prod(src), dtype=np.float64).reshape(src)
    got = run("reshape", x, shape=dst)
    assert got.shape == dst and (x.size == 0 or np.shares_memory(got, x))
    assert [float(a) for a in got.ravel()] == [float(a) for a in range(x.size)]  # C order kept


@covers("transpose")
@pytest.mark.parametrize("perm", [(1, 0, 2), (2, 0, 1), (0, 1, 2), (2, 1, 0)])
def test_transpose_view(perm: tuple[int, ...]) -> None:
    x = randn(np.random.default_rng(13), (2, 3, 4))
    got = run("transpose", x, perm=perm)
    assert got.shape == tuple(x.shape[p] for p in perm) and np.shares_memory(got, x)
    for index in np.ndindex(*x.shape):
        assert got[tuple(index[p] for p in perm)] == x[index]


@covers("slice", "shard")
@pytest.mark.parametrize("name", ["slice", "shard"])
@pytest.mark.parametrize(
    ("axis", "start", "stop"), [(0, 1, 3), (1, 0, 2), (-1, 2, 4), (2, 3, 99), (1, 2, 2), (0, -2, 4), (-2, 0, 3)]
)
def test_slice_view(name: str, axis: int, start: int, stop: int) -> None:
    x = randn(np.random.default_rng(14), (4, 3, 5))
    got = run(name, x, axis=axis, start=start, stop=stop)
    a = axis % 3
    kept = list(range(x.shape[a]))[start:stop]
    assert got.shape == tuple(len(kept) if i == a else n for i, n in enumerate(x.shape))
    assert got.size == 0 or np.shares_memory(got, x)
    for index in np.ndindex(*got.shape):
        src = list(index)
        src[a] = kept[index[a]]
        assert got[index] == x[tuple(src)]


@covers("concat")
@given(
    parts=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    axis=st.integers(-2, 1),
    dtype=st.sampled_from(ALL_FLOATS),
    seed=seeds,
)
def test_concat(parts: list[int], axis: int, dtype: np.dtype[Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = axis % 2
    xs = [randn(rng, (n, 3) if a == 0 else (3, n), dtype) for n in parts]
    got = run("concat", *xs, axis=axis)
    rows: list[list[float]] = []
    if a == 0:
        for x in xs:
            rows += [[float(e) for e in f64(r)] for r in x]
    else:
        rows = [[float(e) for x in xs for e in f64(x[i])] for i in range(3)]
    assert got.dtype == dtype
    np.testing.assert_array_equal(f64(got).reshape(-1), np.array(rows, dtype=np.float64).reshape(-1))
    assert got.shape == ((sum(parts), 3) if a == 0 else (3, sum(parts)))


# --- shape errors -----------------------------------------------------------------------------------------------

D = F32
BAD_SHAPES: list[tuple[str, list[tuple[tuple[int, ...], np.dtype[Any]]], dict[str, Any], str]] = [
    ("matmul", [((2, 3), D), ((4, 5), D)], {}, "features"),
    ("matmul", [((2, 3), D), ((4, 3, 1), D)], {}, "W"),
    ("add", [((2, 3), D), ((4,), D)], {}, "broadcast"),
    ("mul", [((2, 3), D), ((2, 3), F16)], {}, "dtypes"),
    ("attention", [((2, 3, 4), D), ((2, 2, 4), D), ((2, 2, 4), D), ((2,), I32)], {"scale": 1.0}, "multiple"),
    ("attention", [((2, 2, 4), D), ((2, 0, 4), D), ((2, 0, 4), D), ((2,), I32)], {"scale": 1.0}, "multiple"),
    ("attention", [((2, 2, 4), D), ((2, 1, 4), D), ((2, 1, 3), D), ((2,), I32)], {"scale": 1.0}, "same shape"),
    ("attention", [((2, 2, 4), D), ((2, 1, 4), D), ((2, 1, 4), D), ((2,), D)], {"scale": 1.0}, "positions"),
    ("moe_ffn", [((2, 4), D), ((2, 3), D), ((3, 5, 4), D), ((3, 5, 4), D), ((3, 4, 6), D)], {}, "down"),
    ("moe_ffn", [((2, 4), D), ((2, 2), D), ((3, 5, 4), D), ((3, 5, 4), D), ((3, 4, 5), D)], {}, "routing"),
    ("moe_ffn", [((2, 4), D), ((2, 3), D), ((3, 5, 4), D), ((3, 6, 4), D), ((3, 4, 5), D)], {}, "gate"),
    ("moe_ffn", [((1, 2, 4), D), ((2, 3), D), ((3, 5, 4), D), ((3, 5, 4), D), ((3, 4, 5), D)], {}, "axes"),
    ("embedding", [((3,), D), ((10, 4), D)], {}, "int32"),
    ("embedding", [((3,), np.dtype(np.int64)), ((10, 4), D)], {}, "int32"),
    ("rms_norm", [((2, 4), D), ((3,), D)], {"eps": 1e-6}, "weight"),
    ("layer_norm", [((2, 4), D), ((4,), D), ((2, 4), D)], {"eps": 1e-6}, "bias"),
    ("rope", [((2, 1, 4), D), ((2,), I32)], {"n_rot": 3}, "n_rot"),
    ("rope", [((2, 1, 4), D), ((3,), I32)], {}, "positions"),
    ("topk_route", [((2, 4), D)], {"k": 5}, "k=5"),
    ("reshape", [((2, 3), D)], {"shape": (4, 2)}, "reshape"),
    ("transpose", [((2, 3), D)], {"perm": (0, 0)}, "permutation"),
    ("concat", [((2, 3), D), ((2, 4), D)], {"axis": 0}, "differ"),
    ("silu", [((2,), D), ((2,), D)], {}, "inputs"),
]


@pytest.mark.parametrize(("name", "metas", "attrs", "match"), BAD_SHAPES, ids=[f"{c[0]}-{c[3]}" for c in BAD_SHAPES])
def test_infer_rejects_bad_shapes(
    name: str, metas: list[tuple[tuple[int, ...], np.dtype[Any]]], attrs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ShapeError, match=match):
        ops.infer(name, metas, attrs)


def test_graph_tracing_checks_shapes() -> None:
    g = Graph("float32")
    x = g.input("x", (2, 3), "float32")
    with pytest.raises(ShapeError, match="features"):
        g.matmul(x, g.weight("w", (4, 5)))
    with pytest.raises(UnsupportedError, match="unknown op"):
        ops.infer("no_such_op", [((2,), D)], {})


def test_tracing_refuses_a_misspelled_attribute() -> None:
    g = Graph("float32")
    x = g.input("x", (2, 4), "float32")
    with pytest.raises(OpAttributeError, match=r"^rms_norm: unknown attribute 'esp' \(did you mean 'eps'\?\); "):
        g.op("rms_norm", x, esp=1e-6)
    with pytest.raises(OpAttributeError, match=r"^softmax: unknown attribute 'axes' \(did you mean 'axis'\?\)"):
        g.softmax(x, axes=0)
    with pytest.raises(OpAttributeError, match=r"^silu: unknown attribute 'alpha'; silu takes no attributes$"):
        g.silu(x, alpha=1.0)
    with pytest.raises(OpAttributeError, match=r"rope: unknown attribute 'neo_x'.*takes theta=10000\.0, neox=True"):
        g.rope(g.input("q", (2, 1, 4), "float32"), g.input("pos", (2,), "int32"), neo_x=False)
    assert not g.nodes  # refused while tracing: nothing was appended


def test_tracing_refuses_a_missing_required_attribute() -> None:
    g = Graph("float32")
    x = g.input("x", (2, 4), "float32")
    with pytest.raises(OpAttributeError, match=r"^rms_norm: missing required attribute 'eps'; rms_norm takes eps, "):
        g.op("rms_norm", x)
    with pytest.raises(OpAttributeError, match="reshape: missing required attribute 'shape'"):
        g.reshape(x)
    with pytest.raises(OpAttributeError, match="slice: missing required attribute 'stop'"):
        g.slice(x, axis=0, start=0)
    with pytest.raises(OpAttributeError, match="topk_route: missing required attribute 'k'"):
        ops.infer("topk_route", [((2, 4), D)], {"gating": "sigmoid"})
    assert not g.nodes
    assert g.op("rms_norm", x, eps=1e-6).shape == (2, 4)  # optional attributes may be left out


@pytest.mark.parametrize("name", sorted(OPS))
def test_declared_attributes_are_the_kernels_keywords(name: str) -> None:
    """What an op declares is what its reference kernel takes: the same names, and the kernel's defaults (an
    attribute the shape rule needs may be required even where the kernel has a placeholder default)."""
    op = OPS[name]
    params = inspect.signature(op.kernel).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):  # copy, allreduce, allgather: identities taking anything
        return
    keywords = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    assert set(op.attrs) == set(keywords), f"{name}: declares {sorted(op.attrs)}, kernel takes {sorted(keywords)}"
    for attr, default in op.attrs.items():
        if default is ops.REQUIRED:
            continue
        assert keywords[attr] is not inspect.Parameter.empty, f"{name}: {attr} has a default but the kernel needs it"
        assert keywords[attr] == default, (
            f"{name}: declares {attr}={default!r}, the kernel's default is {keywords[attr]!r}"
        )


# --- Gated DeltaNet ops (core/ops/recurrent.py): against numpy float64 from the definitions, per token and head ---


def conv_reference(x: np.ndarray, w: np.ndarray, state: np.ndarray, silu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per channel c: y[t] = sum_j w[c, j] * u[t + j] over u = the previous kernel - 1 inputs, then x."""
    u = np.concatenate([state, x]).astype(np.float64)
    kernel = w.shape[1]
    y = np.zeros(x.shape)
    for c in range(x.shape[1]):
        for t in range(x.shape[0]):
            y[t, c] = sum(w[c, j] * u[t + j, c] for j in range(kernel))
    if silu:
        y = y / (1 + np.exp(-y))
    return y, u[x.shape[0] :]


def gdr_reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, s0: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The gated delta rule of Qwen3-Next one value head at a time; value head h reads key head h // (nv / nk)."""
    nk, nv = q.shape[1], v.shape[1]
    s = s0.astype(np.float64).copy()
    out = np.zeros(v.shape)
    for h in range(nv):
        kh = h // (nv // nk)
        for t in range(q.shape[0]):
            s[h] *= np.exp(g[t, h])
            kt = k[t, kh].astype(np.float64)
            err = v[t, h] - kt @ s[h]  # what the memory predicts for this key, vs the value
            s[h] += np.outer(kt, beta[t, h] * err)
            out[t, h] = (scale * q[t, kh]) @ s[h]
    return out, s


def l2_reference(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + 1e-6)


@covers("conv1d_causal")
def test_conv1d_causal_matches_the_definition_and_carries_its_state() -> None:
    rng = np.random.default_rng(0)
    C, K, steps = 5, 4, (6, 1, 2)
    g = Graph("float64")
    state = g.cache("s", (K - 1, C), "state", axis=1)
    w = g.input("w", (C, K), "float64")
    xs = [g.input(f"x{i}", (t, C), "float64") for i, t in enumerate(steps)]
    for i, x in enumerate(xs):
        g.output(f"y{i}", g.conv1d_causal(x, w, state))
    feeds = {"w": rng.standard_normal((C, K)), **{f"x{i}": rng.standard_normal((t, C)) for i, t in enumerate(steps)}}
    caches: dict[str, np.ndarray] = {}
    got = g.evaluate(feeds, {}, caches)
    s = np.zeros((K - 1, C))
    for i in range(len(steps)):
        want, s = conv_reference(feeds[f"x{i}"], feeds["w"], s, silu=True)
        np.testing.assert_allclose(got[f"y{i}"], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(caches["s"], s, rtol=1e-12)


@covers("gated_delta_rule", "l2_norm")
def test_gated_delta_rule_matches_the_definition_per_head() -> None:
    rng = np.random.default_rng(1)
    T, nk, r, dk, dv = 5, 2, 3, 4, 3
    nv = nk * r
    g = Graph("float64")
    state = g.cache("s", (nv, dk, dv), "state", axis=0, groups=nk)
    ins = {
        n: g.input(n, shape, "float64")
        for n, shape in (("q", (T, nk, dk)), ("k", (T, nk, dk)), ("v", (T, nv, dv)), ("g", (T, nv)), ("b", (T, nv)))
    }
    g.output(
        "y",
        g.gated_delta_rule(g.l2_norm(ins["q"]), g.l2_norm(ins["k"]), ins["v"], ins["g"], ins["b"], state, scale=0.5),
    )
    feeds = {n: rng.standard_normal(t.shape) for n, t in ins.items()}
    feeds["g"] = -np.abs(feeds["g"])
    feeds["b"] = 1 / (1 + np.exp(-feeds["b"]))
    s0 = rng.standard_normal((nv, dk, dv))
    caches = {"s": s0.copy()}
    got = g.evaluate(feeds, {}, caches)["y"]
    want, s = gdr_reference(
        l2_reference(feeds["q"]), l2_reference(feeds["k"]), feeds["v"], feeds["g"], feeds["b"], s0, 0.5
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(caches["s"], s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("tokens", "chunk"), [(11, 4), (3, 8), (2, 1)])
def test_gated_delta_rule_in_chunks_equals_the_scan(tokens: int, chunk: int) -> None:
    """The chunked form (a triangular solve per chunk) gives the token-by-token outputs and state, partial last
    chunk included."""
    rng = np.random.default_rng(tokens)
    nk, nv, dk, dv = 2, 4, 3, 5
    q, k = (l2_reference(rng.standard_normal((tokens, nk, dk))) for _ in range(2))
    v, s0 = rng.standard_normal((tokens, nv, dv)), rng.standard_normal((nv, dk, dv))
    g, beta = -rng.random((tokens, nv)) * 2, rng.random((tokens, nv))
    results = []
    for c in (0, chunk):
        state, out = s0.copy(), np.empty((tokens, nv, dv))
        OPS["gated_delta_rule"].kernel(np, out, q, k, v, g, beta, state, scale=0.4, chunk=c)
        results.append((out, state))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-11, atol=1e-12)


@covers("rms_norm_gated")
def test_rms_norm_gated_is_norm_times_weight_times_silu_gate() -> None:
    rng = np.random.default_rng(2)
    g = Graph("float64")
    x, z, w = g.input("x", (3, 2, 8), "float64"), g.input("z", (3, 2, 8), "float64"), g.input("w", (8,), "float64")
    g.output("y", g.rms_norm_gated(x, z, w, eps=1e-6))
    f = {"x": rng.standard_normal((3, 2, 8)), "z": rng.standard_normal((3, 2, 8)), "w": rng.standard_normal(8)}
    want = f["x"] / np.sqrt((f["x"] ** 2).mean(-1, keepdims=True) + 1e-6) * f["w"] * f["z"] / (1 + np.exp(-f["z"]))
    np.testing.assert_allclose(g.evaluate(f, {})["y"], want, rtol=1e-12)


# --- coverage -------------------------------------------------------------------------------------------------


def test_every_registered_op_is_tested() -> None:
    assert set(OPS) >= COVERED, f"tests claim ops that are not registered: {sorted(COVERED - set(OPS))}"
    missing = sorted(set(OPS) - COVERED)
    assert not missing, f"registered ops without a kernel test in tests/test_ops.py: {missing}"

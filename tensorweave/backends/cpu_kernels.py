"""cpu-sim's fast kernels for weights held narrow (float16, bfloat16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants
llama.cpp's mixes are made of), compiled with numba.

Decode multiplies a few activation rows by a whole weight: memory-bound, so the win is reading 2 (16-bit) or 1.06
(Q8_0) bytes per weight instead of float32's 4. numba compiles loops that convert in registers and accumulate in
float32, over rows in parallel (``prange``), so no float copy of the weight is ever written. Prompts (many rows)
are compute-bound instead: a cache-sized block of weight rows is converted to float32 and multiplied by BLAS.
numba has no float16 type on CPU, so two tiny LLVM intrinsics convert 16-bit bits to float32 (fpext from half,
which LLVM vectorizes to F16C's vcvtph2ps; bfloat16 is a shift). Measured on one core of this machine (EPYC, AVX2,
a [8192, 2048] weight times one row, medians): float32 BLAS 3.6 ms, float16 2.5 ms, bfloat16 2.3 ms, Q8_0 3.2 ms,
against the reference's numpy conversions at 10-25x that; numba's float16 by bit tricks was 8 ms, a lookup table
7 ms.

Every format has both: a fused decode kernel and a conversion of rows for prompts. For the quantized formats both
are written in portable LLVM vector IR from one ``_unpack_*`` per format (a block's values as <8 x float>) by
``_row_ir`` (``_dot`` and ``_vals`` switch on the format in the IR): its dot products keep <8 x float> sums in
registers across a whole row and scale a group's partial sum once, where numba's loops reduced every block
horizontally or kept block-scaled sums in memory; its conversions store the values (Q8_0 rows 3x faster than
numba's loop). One token's matmuls of the 125M benchmark model on one core (loaded machine,
medians), before -> after: Q8_0 19 -> 12 ms, Q4_0 59 -> 14, Q5_1 81 -> 20, Q4_K 40 -> 16, Q5_K 74 -> 22,
Q6_K 53 -> 21, with float32 BLAS at 14-17 ms and float16 at 17-20. Everything is checked against core's reference
(``ops.weights``) in tests/test_weight_formats.py. Without numba installed the backend runs the reference kernels
alone.
"""

from __future__ import annotations

import ctypes
import math
import os
import site
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.ops import OPS
from ..core.ops.attention import as_float32, attention_inputs, attention_kernel
from ..core.ops.moe import moe_kernel
from ..core.ops.rope import _cached_inv_freq
from ..core.ops.weights import CHUNK_BYTES, Packed, is_narrow, linear

FEW_ROWS = 8  # activation rows up to which the fused (weight-streaming) kernels beat convert-then-BLAS
PARALLEL_MIN = 1 << 18  # weight values from which a fused kernel splits its rows over threads

numba: Any
try:
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import cgutils, errors, types
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; a trimmed install still runs the reference
    numba = None

intrinsic: Any = _intrinsic if numba is not None else None  # typed loosely: the decorated are called from numba


def _load_tbb() -> None:
    """Make the ``tbb`` wheel's library (a dependency on Linux x86_64) loadable for numba's TBB layer.

    TBB suits decode better than OpenMP: its callers start on the work at once and steal what sleeping workers have
    not begun, so a kernel never waits for a thread to wake, and idle workers yield before they sleep. 125M model,
    2 threads, decode t/s, OpenMP passive / TBB / OpenMP spinning: quiet F16 94 / 102 / 108, Q8_0 120 / 132 / 136;
    beside one busy process F16 59 / 62 / 28, Q8_0 69 / 64 / 36. The wheel puts libtbb.so.12 in the environment's
    lib/, which the loader does not search, so it is loaded here by path (numba then finds it by name); without it,
    numba falls back to OpenMP."""
    if sys.platform != "linux":
        return
    for prefix in (sys.prefix, site.getuserbase()):  # `pip install` / `pip install --user`
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:  # a broken or foreign build: OpenMP it is
                pass


if numba is not None:
    # cpu-sim's devices call kernels from a thread each: only a thread-safe layer (OpenMP, TBB) may run them; the
    # default picks workqueue when those are missing, which aborts on concurrent calls
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "threadsafe"  # TBB where it loads, else OpenMP
        _load_tbb()
    # OpenMP threads that spin after a parallel region starve BLAS's and the other devices' threads: on a loaded
    # 2-core machine a tiny model decoded at 8 tok/s spinning and 134 passive (190 on one thread). Passive waiting
    # costs a wake-up per kernel instead. Read when numba first loads its OpenMP layer; the user's setting wins.
    # On a dedicated machine a bounded spin pays (GOMP_SPINCOUNT=100000, 125M model, 2 threads: Q8_0 decode
    # 103 -> 122 t/s, F16 79 -> 91); with one other busy process it cost 3x (Q8_0 63 -> 24), so it is opt-in.
    # TBB, where installed, needs neither: see _load_tbb.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Compiled kernels cache in the user's cache directory, not beside the installed source: numba's files in
    # site-packages outlive `pip uninstall`, and the leftover tensorweave/ folder (no __init__.py) then shadows an
    # editable install as an empty namespace package (`pip install .` + `tensorweave demo`, then `pip install -e .`:
    # every subprocess found no tensorweave.load). The user's NUMBA_CACHE_DIR wins.
    if not numba.config.CACHE_DIR:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        numba.config.CACHE_DIR = os.path.join(home, "tensorweave", "numba")

    @intrinsic  # type: ignore[untyped-decorator]
    def _f16(typingctx: Any, bits: Any) -> Any:
        """float16 bits (uint16) -> float32, as the CPU converts (F16C's vcvtph2ps where it has it)."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    @intrinsic  # type: ignore[untyped-decorator]
    def _bf16(typingctx: Any, bits: Any) -> Any:
        """bfloat16 bits (uint16) -> float32: the upper half of a float32."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(types.uint16), codegen

    @njit(parallel=True, cache=True, nogil=True)
    def _HALF_ROWS(w: Any, bf16: bool, out: Any) -> None:  # w [N, K] 16-bit bits -> out [N, K] f32
        for n in prange(w.shape[0]):
            if bf16:
                for k in range(w.shape[1]):
                    out[n, k] = _bf16(w[n, k])
            else:
                for k in range(w.shape[1]):
                    out[n, k] = _f16(w[n, k])

    # Formats of 32-value blocks dot a row in portable LLVM vector IR: four <8 x float> sums stay in registers across
    # the whole row (ymm on AVX2, register pairs on NEON). numba's loops either reduce every block horizontally or keep
    # a block-scaled running sum in memory, a store-to-load chain per block: 1.5x slower on Q8_0 here.
    _V8F = ir.VectorType(ir.FloatType(), 8)
    _I64 = ir.IntType(64)

    def _ir_load(builder: Any, base: Any, offset: Any, ty: Any, align: int) -> Any:
        return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=align)

    def _ir_splat(builder: Any, v: Any, ty: Any) -> Any:
        vec = builder.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), ty.count), [0] * ty.count)
        return builder.shuffle_vector(vec, ir.Constant(ty, ir.Undefined), mask)

    def _ir_pick(builder: Any, v: Any, idx: Any) -> Any:  # lanes idx of vector v, as a vector of len(idx)
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), len(idx)), list(idx)))

    def _ir_lanes(builder: Any, v: Any, n: int) -> list[Any]:  # lanes 0..n-1 of vector v, each splat to 8 lanes
        return [_ir_pick(builder, v, [j] * 8) for j in range(n)]

    def _ir_widen(builder: Any, rp: Any, off: Any) -> Any:
        """The 8 bytes at ``off`` as <8 x i32>. Nibbles are cut after widening: one widening (straight from memory)
        serves 16 values, where masking bytes first needs a shuffle per 8 (one core, [2048, 768] x one row: Q4_K
        175 -> 124 us)."""
        return builder.zext(
            _ir_load(builder, rp, off, ir.VectorType(ir.IntType(8), 8), 1), ir.VectorType(ir.IntType(32), 8)
        )

    def _ir_eights(builder: Any, v: Any) -> list[Any]:  # vector v in runs of 8 lanes
        return [_ir_pick(builder, v, range(k, k + 8)) for k in range(0, v.type.count, 8)]

    def _ir_f16(builder: Any, rp: Any, off: Any) -> Any:  # the little-endian float16 at byte ``off``, as float
        bits = _ir_load(builder, rp, off, ir.IntType(16), 1)
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    def _ir_at(builder: Any, off: Any, k: int) -> Any:
        return builder.add(off, ir.Constant(_I64, k))

    # An unpacked block: (q, scales, mins): its values as <8 x float> vectors in order, unscaled, and per group (an
    # equal run of vectors sharing a scale) a scale, value = scale * q + min. A scale is a float or already an
    # <8 x float> splat; mins are None (no offsets), a float per group, or one vector with a lane per group (the
    # K-quants decode their eight sub-block scales and mins in vector lanes, not one byte at a time). Dot products
    # scale a group's partial sum once instead of every value, and take the offsets from the activations' sums
    # over 32 values (``_sums32``, once per call, not once per weight row). One core, a [2048, 768] weight times one
    # row: 156 -> 135 us for Q8_0, 291 -> 242 Q5_0, 294 -> 263 Q6_K by group scaling; then 236 -> 173 Q4_K, 207 ->
    # 167 Q4_1, 281 -> 237 Q5_K by the offsets' sums and vector scales; then 246 -> 200 Q6_K, 237 -> 188 Q5_K by
    # doing the K-quants' bit work on 32 bytes at once; then 4-bit nibbles cut after widening (``_ir_widen``): Q4_K
    # 175 -> 124, Q4_0 178 -> 128, Q4_1 166 -> 122, Q5_0 237 -> 185, Q5_1 230 -> 193 (F16 86, float32 BLAS 80-145).
    # (Q6_K and Q5_K widened the same way measured slower: 199 -> 232, 188 -> 205.)
    Unpacked = tuple[list[Any], list[Any], Any]

    def _unpack_q8_0(builder: Any, rp: Any, off: Any) -> Unpacked:
        """A Q8_0 block at byte ``off``: d (float16), 32 int8."""
        groups = [
            _ir_load(builder, rp, _ir_at(builder, off, 2 + 8 * g), ir.VectorType(ir.IntType(8), 8), 1) for g in range(4)
        ]
        return [builder.sitofp(q, _V8F) for q in groups], [_ir_f16(builder, rp, off)], None

    def _unpack_q45(five: bool, with_min: bool) -> Callable[..., Unpacked]:
        """Q4_0/Q4_1/Q5_0/Q5_1: d [, m] [, qh u32], 16 bytes of nibbles (value l < 16 the low nibble of byte l, value
        l + 16 its high nibble); Q5 adds bit l of qh as the fifth bit; _0 formats are offset by 8 (16 for Q5)."""
        i32x8 = ir.VectorType(ir.IntType(32), 8)
        qs_at, qh_at = (4 if with_min else 2) + (4 if five else 0), 4 if with_min else 2

        def unpack(builder: Any, rp: Any, off: Any) -> Unpacked:
            wide = [_ir_widen(builder, rp, _ir_at(builder, off, qs_at + 8 * h)) for h in range(2)]  # bytes 0-7, 8-15
            if five:
                qh = _ir_splat(builder, _ir_load(builder, rp, _ir_at(builder, off, qh_at), ir.IntType(32), 1), i32x8)
            d = _ir_f16(builder, rp, off)
            values = []
            for g in range(4):  # values 8g..: the low (g < 2) or high nibbles of bytes 8 (g % 2)..
                q = _ir_vbits(builder, wide[g % 2], 4 * (g // 2), 15)
                if five:
                    bit = builder.and_(
                        builder.lshr(qh, ir.Constant(i32x8, list(range(8 * g, 8 * g + 8)))), ir.Constant(i32x8, [1] * 8)
                    )
                    q = builder.or_(q, builder.shl(bit, ir.Constant(i32x8, [4] * 8)))
                if not with_min:
                    q = builder.sub(q, ir.Constant(i32x8, [16 if five else 8] * 8))
                values.append(builder.sitofp(q, _V8F))
            return values, [d], [_ir_f16(builder, rp, _ir_at(builder, off, 2))] if with_min else None

        return unpack

    def _ir_vbits(builder: Any, v: Any, shift: int, mask: int) -> Any:  # (v >> shift) & mask, lane-wise
        n = v.type.count
        return builder.and_(builder.lshr(v, ir.Constant(v.type, [shift] * n)), ir.Constant(v.type, [mask] * n))

    def _unpack_qk(five: bool) -> Callable[..., Unpacked]:
        """Q4_K (144 bytes) / Q5_K (176): d, dmin, 12 bytes of six-bit scales and mins, [qh 32 bytes,] 128 bytes
        of nibbles; sub-blocks 2i and 2i + 1 are the low and high nibbles of qs bytes 32i.., d * sc * q - dmin * m."""
        i8x8, i8x32, qs_at = ir.VectorType(ir.IntType(8), 8), ir.VectorType(ir.IntType(8), 32), 48 if five else 16

        def unpack(builder: Any, rp: Any, off: Any) -> Unpacked:
            d, dmin = _ir_f16(builder, rp, off), _ir_f16(builder, rp, _ir_at(builder, off, 2))
            s = _ir_load(builder, rp, _ir_at(builder, off, 4), ir.VectorType(ir.IntType(8), 16), 1)  # 12 used

            def pick(*idx: int) -> Any:  # lane j: byte idx[j] of the scales
                return _ir_pick(builder, s, idx)

            # ggml's get_scale_min_k4 for the 8 sub-blocks at once: j < 4 six bits of bytes j (scale) and j + 4
            # (min); j >= 4 the nibbles of byte j + 4 under the top two bits of bytes j - 4 (scale) and j (min)
            first = ir.Constant(ir.VectorType(ir.IntType(1), 8), [1, 1, 1, 1, 0, 0, 0, 0])
            a, b = pick(0, 1, 2, 3, 8, 9, 10, 11), pick(4, 5, 6, 7, 8, 9, 10, 11)
            top_a, top_b = (
                builder.shl(_ir_vbits(builder, t, 6, 3), ir.Constant(i8x8, [4] * 8))
                for t in (pick(0, 1, 2, 3, 0, 1, 2, 3), pick(4, 5, 6, 7, 4, 5, 6, 7))
            )
            sc = builder.select(first, _ir_vbits(builder, a, 0, 63), builder.or_(_ir_vbits(builder, a, 0, 15), top_a))
            m = builder.select(first, _ir_vbits(builder, b, 0, 63), builder.or_(_ir_vbits(builder, b, 4, 15), top_b))
            scales = _ir_lanes(builder, builder.fmul(builder.uitofp(sc, _V8F), _ir_splat(builder, d, _V8F)), 8)
            mins = builder.fneg(builder.fmul(builder.uitofp(m, _V8F), _ir_splat(builder, dmin, _V8F)))
            values: list[Any] = []
            if not five:
                for i in range(4):
                    wide = [
                        _ir_widen(builder, rp, _ir_at(builder, off, qs_at + 32 * i + 8 * lane)) for lane in range(4)
                    ]
                    values += [
                        builder.uitofp(_ir_vbits(builder, w, 4 * part, 15), _V8F) for part in (0, 1) for w in wide
                    ]
                return values, scales, mins
            qh = _ir_load(builder, rp, _ir_at(builder, off, 16), i8x32, 1)
            for i in range(4):  # bit work on 32 bytes at once (a ymm), then 8 values at a time to float
                v = _ir_load(builder, rp, _ir_at(builder, off, qs_at + 32 * i), i8x32, 1)
                for part in range(2):  # low nibbles: sub-block 2i, high: 2i + 1
                    q = _ir_vbits(builder, v, 4 * part, 15)
                    q = builder.or_(
                        q, builder.shl(_ir_vbits(builder, qh, 2 * i + part, 1), ir.Constant(i8x32, [4] * 32))
                    )
                    values += [builder.uitofp(part8, _V8F) for part8 in _ir_eights(builder, q)]
            return values, scales, mins

        return unpack

    def _unpack_q6_k(builder: Any, rp: Any, off: Any) -> Unpacked:
        """Q6_K (210 bytes): ql 128, qh 64, 16 int8 scales, d; value 128h + 32g + l is d * sc[8h + 2g + l // 16] *
        (q - 32), q the nibble g // 2 of ql[64h + 32 (g % 2) + l] with bits 2g.. of qh[32h + l] above it."""
        i8x32 = ir.VectorType(ir.IntType(8), 32)
        d = _ir_f16(builder, rp, _ir_at(builder, off, 208))
        values: list[Any] = [None] * 32
        for h in range(2):  # bit work on 32 bytes at once (a ymm), then 8 values at a time to float
            qh = _ir_load(builder, rp, _ir_at(builder, off, 128 + 32 * h), i8x32, 1)
            ql = [_ir_load(builder, rp, _ir_at(builder, off, 64 * h + 32 * p), i8x32, 1) for p in range(2)]
            for g in range(4):
                q = builder.or_(
                    _ir_vbits(builder, ql[g % 2], 4 * (g // 2), 15),
                    builder.shl(_ir_vbits(builder, qh, 2 * g, 3), ir.Constant(i8x32, [4] * 32)),
                )
                q = builder.sub(q, ir.Constant(i8x32, [32] * 32))
                for lane, part8 in enumerate(_ir_eights(builder, q)):  # l = 8 lane ..
                    values[16 * h + 4 * g + lane] = builder.sitofp(part8, _V8F)
        # vector i = 16h + 4g + lane is in group i // 2 = 8h + 2g + lane // 2: scale byte 192 + i // 2
        sc = _ir_load(builder, rp, _ir_at(builder, off, 192), ir.VectorType(ir.IntType(8), 16), 1)
        v16 = ir.VectorType(ir.FloatType(), 16)
        return values, _ir_lanes(builder, builder.fmul(builder.sitofp(sc, v16), _ir_splat(builder, d, v16)), 16), None

    def _row_ir(builder: Any, fp: Any, rp: Any, gp: Any, nbytes: Any, block_bytes: int, unpack: Any) -> Any:
        """One row of one format: with group sums ``gp`` (dot products), the float32 row at ``fp`` dotted with the row
        of blocks at ``rp`` (``nbytes`` long); with ``gp`` None, the row's values written to ``fp`` (then 0)."""
        dot = gp is not None
        blocks = builder.udiv(nbytes, ir.Constant(_I64, block_bytes))
        zero = ir.Constant(_V8F, [0.0] * 8)
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(3)]  # type: ignore[no-untyped-call]
        offsets = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))  # type: ignore[no-untyped-call]

        def fast(op: str, a: Any, b: Any) -> Any:
            return getattr(builder, op)(a, b, flags=("fast",))

        def add_to(acc: Any, v: Any) -> None:
            builder.store(fast("fadd", builder.load(acc), v), acc)

        def splat(v: Any) -> Any:
            return v if isinstance(v.type, ir.VectorType) else _ir_splat(builder, v, _V8F)

        with cgutils.for_range(builder, blocks) as loop:  # mem2reg turns the sums into registers
            q, scales, mins = unpack(builder, rp, builder.mul(loop.index, ir.Constant(_I64, block_bytes)))
            first, size = builder.mul(loop.index, ir.Constant(_I64, 8 * len(q))), len(q) // len(scales)
            at = [
                builder.bitcast(builder.gep(fp, [_ir_at(builder, first, 8 * k)]), _V8F.as_pointer())
                for k in range(len(q))
            ]
            if not dot:
                lanes = _ir_lanes(builder, mins, len(scales)) if isinstance(mins, ir.Value) else mins
                for j, scale in enumerate(scales):
                    sc, mn = splat(scale), splat(lanes[j]) if lanes else None
                    for k in range(j * size, (j + 1) * size):
                        v = fast("fmul", q[k], sc)
                        builder.store(fast("fadd", v, mn) if mn else v, at[k], align=4)
            else:
                for j, scale in enumerate(scales):
                    group = range(j * size, (j + 1) * size)
                    xs = [builder.load(at[k], align=4) for k in group]
                    part = fast("fmul", xs[0], q[group[0]])
                    for x, k in zip(xs[1:], group[1:], strict=True):
                        part = fast("fadd", part, fast("fmul", x, q[k]))
                    add_to(sums[j % 2], fast("fmul", part, splat(scale)))
                # sum(x (scale q + min)) = scale sum(x q) + min sum(x): the caller sums x once per 32 values (a
                # group with an offset is 32 values) for all the weight's rows; unpacking the groups' x again cost
                # a quarter of Q4_K's time
                g0 = builder.mul(loop.index, ir.Constant(_I64, len(scales)))
                if isinstance(mins, ir.Value):  # one lane per group
                    add_to(sums[2], fast("fmul", mins, _ir_load(builder, gp, g0, mins.type, 4)))
                for j, m in enumerate(mins if isinstance(mins, list) else []):
                    add_to(offsets, fast("fmul", m, _ir_load(builder, gp, _ir_at(builder, g0, j), ir.FloatType(), 4)))
        if not dot:
            return ir.Constant(ir.FloatType(), 0.0)
        total = fast("fadd", fast("fadd", builder.load(sums[0]), builder.load(sums[1])), builder.load(sums[2]))
        out = builder.load(offsets)
        for i in range(8):
            out = fast("fadd", out, builder.extract_element(total, ir.Constant(ir.IntType(32), i)))
        return out

    _UNPACKS = [  # by _BLOCKS's number of the format: (block bytes, unpack)
        (34, _unpack_q8_0),
        (18, _unpack_q45(False, False)),
        (20, _unpack_q45(False, True)),
        (22, _unpack_q45(True, False)),
        (24, _unpack_q45(True, True)),
        (144, _unpack_qk(False)),
        (176, _unpack_qk(True)),
        (210, _unpack_q6_k),
    ]

    def _row_codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        """``_row_ir`` for the format numbered ``args[0]``: a switch in the IR, each case one format's loop."""
        f, row, *xsums = (
            context.make_array(t)(context, builder, v) for t, v in zip(sig.args[1:], args[1:], strict=True)
        )
        fp = builder.bitcast(f.data, ir.FloatType().as_pointer())
        rp = builder.bitcast(row.data, ir.IntType(8).as_pointer())
        gp = builder.bitcast(xsums[0].data, ir.FloatType().as_pointer()) if xsums else None
        nbytes = builder.extract_value(row.shape, 0)
        result = cgutils.alloca_once(builder, ir.FloatType())  # type: ignore[no-untyped-call]
        cases = [builder.append_basic_block(f"format{k}") for k in range(len(_UNPACKS))]
        merge = builder.append_basic_block("formats_done")
        switch = builder.switch(context.cast(builder, args[0], sig.args[0], types.int64), cases[-1])
        for number, (block, (size, unpack)) in enumerate(zip(cases, _UNPACKS, strict=True)):
            switch.add_case(ir.Constant(_I64, number), block)
            builder.position_at_end(block)
            builder.store(_row_ir(builder, fp, rp, gp, nbytes, size, unpack), result)
            builder.branch(merge)
        builder.position_at_end(merge)
        return builder.load(result)

    def _check_row_args(kind: Any, *arrays: Any) -> None:
        if not (
            isinstance(kind, types.Integer) and all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)
        ):
            raise errors.TypingError("row kernels take a format number and C-contiguous 1-D arrays")

    @intrinsic  # type: ignore[untyped-decorator]
    def _dot(typingctx: Any, kind: Any, f: Any, row: Any, xsums: Any) -> Any:
        """f . row as float32 for a float32 row ``f`` and a row of blocks (uint8) of format number ``kind``;
        ``xsums``: f summed over each run of 32 values (formats with offsets use it)."""
        _check_row_args(kind, f, row, xsums)
        return types.float32(kind, f, row, xsums), _row_codegen

    @intrinsic  # type: ignore[untyped-decorator]
    def _vals(typingctx: Any, kind: Any, f: Any, row: Any) -> Any:
        """A row of blocks of format number ``kind`` written into the float32 row ``f`` as values (prompts convert
        chunks of rows so, then multiply with BLAS); returns 0."""
        _check_row_args(kind, f, row)
        return types.float32(kind, f, row), _row_codegen

    @njit(cache=True, nogil=True)
    def _sums32(x: Any) -> Any:  # x [T, K] -> [T, K // 32]: the sum of each run of 32 values
        out = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
        for t in range(x.shape[0]):
            for g in range(out.shape[1]):
                acc = np.float32(0.0)
                for k in range(32 * g, 32 * g + 32):
                    acc += x[t, k]
                out[t, g] = acc
        return out

    @njit(parallel=True, cache=True, nogil=True)
    def _BLOCKS_ROWS(data: Any, kind: int, out: Any) -> None:  # rows of blocks -> out [N, K] float32
        for n in prange(data.shape[0]):
            _vals(kind, out[n], data[n])

    def _fused(parallel: bool) -> tuple[Any, Any]:
        """The fused kernels (16-bit, blocks), their rows split over threads or all on the calling thread (for
        small weights, where waking threads costs more than it saves)."""

        @njit(parallel=parallel, fastmath=True, cache=True, nogil=True)
        def half(x: Any, w: Any, bf16: bool, out: Any) -> None:  # x [T, K] f32, w [N, K] 16-bit bits -> [T, N]
            _ = parallel  # a cell of the closure: numba's cache tells the twins apart by cells, not by options
            for n in prange(w.shape[0]):
                row = w[n]
                for t in range(x.shape[0]):
                    acc = np.float32(0.0)
                    if bf16:  # two loops, not a select per value: each vectorizes
                        for k in range(row.shape[0]):
                            acc += x[t, k] * _bf16(row[k])
                    else:
                        for k in range(row.shape[0]):
                            acc += x[t, k] * _f16(row[k])
                    out[t, n] = acc

        @njit(parallel=parallel, cache=True, nogil=True)
        def blocks(x: Any, data: Any, kind: int, out: Any) -> None:  # kind: _BLOCKS's number of the format
            _ = parallel  # (by compile options alone, both twins would load one cached build)
            xsums = _sums32(x)
            for n in prange(data.shape[0]):
                row = data[n]
                for t in range(x.shape[0]):
                    out[t, n] = _dot(kind, x[t], row, xsums[t])

        return half, blocks

    (_HALF_FEW, _BLOCKS_FEW), (_HALF_ONE, _BLOCKS_ONE) = _fused(True), _fused(False)


_BLOCKS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q5_0": 3, "q5_1": 4, "q4_k": 5, "q5_k": 6, "q6_k": 7}  # _UNPACKS order


def set_threads(n: int | None) -> None:
    """Threads the compiled kernels use on this thread (numba keeps the count per thread); None: every core."""
    if numba is not None:
        numba.set_num_threads(min(n or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))


def _compiled(w: Any) -> str | None:
    """Which compiled kernel serves weight ``w``: its format name ("f16", "bf16", "q8_0", "q4_k" ...), or None."""
    if numba is None:
        return None
    if isinstance(w, Packed):
        fused = w.fmt.name in dtypes.QUANT_BLOCKS and w.data.ndim == 2 and w.data.flags.c_contiguous
        return w.fmt.name if fused else None
    if w.ndim == 2 and w.flags.c_contiguous and w.dtype in (dtypes.float16, dtypes.bfloat16):
        return "bf16" if w.dtype == dtypes.bfloat16 else "f16"
    return None


def rows_float32(w: Any, lo: int, hi: int, kind: str) -> np.ndarray:
    """Rows [lo, hi) of a weight a compiled kernel serves, as float32."""
    out = np.empty((hi - lo, w.shape[1]), np.float32)
    if kind in _BLOCKS:
        _BLOCKS_ROWS(w.data[lo:hi], _BLOCKS[kind], out)
    else:
        _HALF_ROWS(w[lo:hi].view(np.uint16), kind == "bf16", out)
    return out


def fast_linear(xp: Any, x: Any, w: Any, out: Any = None) -> Any:
    """``ops.weights.linear`` with compiled kernels where one serves ``w`` (same results, float32 accumulation)."""
    kind = _compiled(w) if x.dtype == dtypes.float32 and x.size and math.prod(w.shape) else None
    if kind is None:
        return linear(xp, x, w, out)
    lead, (n_out, n_in) = x.shape[:-1], w.shape
    x2 = np.ascontiguousarray(x.reshape(-1, n_in))
    direct = out is not None and out.dtype == np.float32 and out.flags.c_contiguous
    res = out.reshape(x2.shape[0], n_out) if direct else np.empty((x2.shape[0], n_out), np.float32)
    if x2.shape[0] <= FEW_ROWS:
        big = n_out * n_in >= PARALLEL_MIN
        if kind in _BLOCKS:
            (_BLOCKS_FEW if big else _BLOCKS_ONE)(x2, w.data, _BLOCKS[kind], res)
        else:
            (_HALF_FEW if big else _HALF_ONE)(x2, w.view(np.uint16), kind == "bf16", res)
    else:
        step = max(1, CHUNK_BYTES // (4 * max(n_in, 1)))
        for lo in range(0, n_out, step):
            hi = min(lo + step, n_out)
            np.matmul(x2, rows_float32(w, lo, hi, kind).T, out=res[:, lo:hi])
    if out is None:
        return res.reshape(*lead, n_out)
    if not direct:
        out[...] = res.reshape(*lead, n_out)
    return out


def _k_matmul(xp: Any, out: Any, x: Any, w: Any) -> None:
    if is_narrow(w):
        fast_linear(xp, x, w, out)
    else:
        OPS["matmul"].kernel(xp, out, x, w)


def _matmul_t(xp: Any, x: Any, w: Any) -> Any:
    return fast_linear(xp, x, w) if is_narrow(w) else x @ w.T


# --- the small ops of a decode step ---------------------------------------------------------------------------
# Once matmuls stream narrow weights, numpy's per-call overhead on one token's norms, activations and rotations was
# a quarter of a decode step (8-15 array operations each, a few microseconds apiece). These compiled twins take the
# common case (float32, C-contiguous, same shapes) and leave everything else to core's reference kernels, whose
# math they follow (rope's angles in float64; float32 elsewhere). tests/test_cpu_step_kernels.py holds them to it.

if numba is not None:

    @njit(cache=True, nogil=True, fastmath=True)
    def _RMS_NORM(x: Any, w: Any, eps: float, plus_one: bool, out: Any) -> None:  # x, out [R, H]; w [H] or [0]
        for r in range(x.shape[0]):
            ss = np.float32(0.0)
            for k in range(x.shape[1]):
                ss += x[r, k] * x[r, k]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[1]) + np.float32(eps))
            if w.shape[0] == 0:
                for k in range(x.shape[1]):
                    out[r, k] = x[r, k] * inv
            elif plus_one:
                for k in range(x.shape[1]):
                    out[r, k] = x[r, k] * inv * (np.float32(1.0) + w[k])
            else:
                for k in range(x.shape[1]):
                    out[r, k] = x[r, k] * inv * w[k]

    @njit(cache=True, nogil=True, inline="always")
    def _sigmoid(v: Any) -> Any:  # as ops.elementwise.sigmoid: exp(-|v|) never overflows
        e = np.exp(-np.abs(v))
        return (np.float32(1.0) if v >= 0 else e) / (np.float32(1.0) + e)

    @njit(cache=True, nogil=True)
    def _GLU(gate: Any, up: Any, gelu: bool, out: Any) -> None:  # flat float32: act(gate) * up
        c = np.float32(2.0 * math.sqrt(2.0 / math.pi))
        for i in range(gate.shape[0]):
            g = gate[i]
            if gelu:  # tanh approximation, as sigmoid(2u)
                out[i] = g * _sigmoid(c * (g + np.float32(0.044715) * g * g * g)) * up[i]
            else:
                out[i] = g * _sigmoid(g) * up[i]

    @njit(cache=True, nogil=True)
    def _ROPE(x: Any, pos: Any, inv: Any, neox: bool, n_rot: int, out: Any) -> None:  # x, out [T, heads, hd]
        half = n_rot // 2
        for t in range(x.shape[0]):
            for i in range(half):
                ang = np.float64(pos[t]) * inv[i]
                c, s = np.float32(np.cos(ang)), np.float32(np.sin(ang))
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                for h in range(x.shape[1]):
                    x1, x2 = x[t, h, a], x[t, h, b]
                    out[t, h, a] = x1 * c - x2 * s
                    out[t, h, b] = x2 * c + x1 * s
            for h in range(x.shape[1]):
                for k in range(n_rot, x.shape[2]):
                    out[t, h, k] = x[t, h, k]

    @njit(cache=True, nogil=True, fastmath=True)
    def _ATTEND(q: Any, ck: Any, cv: Any, pos: Any, scale: float, softcap: float, out: Any) -> None:
        """Causal attention of a few queries q [T, H, D] over a position-indexed cache [ctx, KV, D] holding keys
        0..max(pos): softmax(q k * scale) v per head, query head h reading KV head h // (H / KV)."""
        group = q.shape[1] // ck.shape[1]
        probs = np.empty(int(pos.max()) + 1, np.float32)
        acc = np.empty(q.shape[2], np.float32)
        for t in range(q.shape[0]):
            seen = pos[t] + 1
            for h in range(q.shape[1]):
                kv = h // group
                top = np.float32(-np.inf)
                for j in range(seen):
                    sc = np.float32(0.0)
                    for d in range(q.shape[2]):
                        sc += q[t, h, d] * ck[j, kv, d]
                    sc *= np.float32(scale)
                    if softcap:
                        sc = np.float32(softcap) * np.tanh(sc / np.float32(softcap))
                    probs[j] = sc
                    if sc > top:
                        top = sc
                total = np.float32(0.0)
                for j in range(seen):
                    probs[j] = np.exp(probs[j] - top)
                    total += probs[j]
                acc[:] = 0.0
                for j in range(seen):
                    for d in range(q.shape[2]):
                        acc[d] += probs[j] * cv[j, kv, d]
                for d in range(q.shape[2]):
                    out[t, h, d] = acc[d] / total


def _plain(*arrays: Any) -> bool:
    """Whether the compiled small-op kernels take these: float32 host arrays, C-contiguous."""
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def _k_rms_norm(xp: Any, out: Any, x: Any, w: Any = None, *, eps: float, plus_one: bool = False) -> None:
    wf = np.zeros(0, np.float32) if w is None else w.astype(np.float32, copy=False) if isinstance(w, np.ndarray) else w
    if _plain(out, x, wf) and out.shape == x.shape and x.ndim and x.shape[-1]:
        _RMS_NORM(x.reshape(-1, x.shape[-1]), wf, eps, plus_one, out.reshape(-1, x.shape[-1]))
    else:
        OPS["rms_norm"].kernel(xp, out, x, w, eps=eps, plus_one=plus_one)


def _glu_kernel(op: str) -> Callable[..., None]:
    def kernel(xp: Any, out: Any, gate: Any, up: Any) -> None:
        if _plain(out, gate, up) and out.shape == gate.shape == up.shape:
            _GLU(gate.reshape(-1), up.reshape(-1), op == "geglu", out.reshape(-1))
        else:
            OPS[op].kernel(xp, out, gate, up)

    return kernel


def _k_rope(xp: Any, out: Any, x: Any, positions: Any, **attrs: Any) -> None:
    n_rot = attrs.get("n_rot") or x.shape[2]
    if _plain(out, x) and out.shape == x.shape and isinstance(positions, np.ndarray):
        scaling = tuple(sorted((attrs.get("scaling") or {}).items()))
        inv = _cached_inv_freq(n_rot, attrs.get("theta", 10000.0), scaling)
        _ROPE(x, positions, inv, attrs.get("neox", True), n_rot, out)
    else:
        OPS["rope"].kernel(xp, out, x, positions, **attrs)


def _cache_float32(xp: Any, x: Any) -> Any:
    """Keys or values read from a 16-bit KV cache, as float32 through the compiled row conversion: numpy's float16
    ``astype`` has no SIMD path here (one decode step's attention over 1024 positions of 12 heads x 64: float32
    0.38 ms, float16 through numpy 3.5 ms, compiled 0.57 ms; bfloat16 1.2 ms and 0.59 ms)."""
    kind = {dtypes.float16: "f16", dtypes.bfloat16: "bf16"}.get(x.dtype)
    if kind is None or not x.flags.c_contiguous or not x.size:
        return as_float32(xp, x)
    rows = x.reshape(x.shape[0], -1)
    return rows_float32(rows, 0, rows.shape[0], kind).reshape(x.shape)


_attend_16bit = attention_kernel(_cache_float32)


def _k_attention(xp: Any, out: Any, *inputs: Any, **attrs: Any) -> None:
    """Decode steps (a few tokens, position-indexed float32 cache, causal, no window or sinks) compiled; over a
    16-bit cache core's kernel widening through ``_cache_float32``; the rest by core's reference."""
    q, k, v, pos, ck, cv, _ = attention_inputs(inputs, attrs)
    if ck is not None and (is_narrow(ck) or is_narrow(cv)):
        _attend_16bit(xp, out, *inputs, **attrs)
        return
    fast = attrs.get("cache") and not attrs.get("window") and not attrs.get("sinks") and attrs.get("causal", True)
    fast = fast and _plain(out, q, k, v, ck, cv) and isinstance(pos, np.ndarray) and 0 < q.shape[0] <= FEW_ROWS
    if fast:  # shapes the reference would reject or mask differently stay with it
        fast = k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0 and pos.min() >= 0 and pos.max() < ck.shape[0]
    if not fast:
        OPS["attention"].kernel(xp, out, *inputs, **attrs)
        return
    if attrs.get("write", True):
        ck[pos] = k
        cv[pos] = v
    _ATTEND(q, ck, cv, pos, attrs["scale"], attrs.get("softcap") or 0.0, out)


KERNELS: dict[str, Callable[..., Any]] = (
    {
        "matmul": _k_matmul,
        "moe_ffn": moe_kernel(_matmul_t),
        "rms_norm": _k_rms_norm,
        "swiglu": _glu_kernel("swiglu"),
        "geglu": _glu_kernel("geglu"),
        "rope": _k_rope,
        "attention": _k_attention,
    }
    if numba is not None
    else {}
)

__all__ = ["FEW_ROWS", "KERNELS", "fast_linear", "rows_float32"]

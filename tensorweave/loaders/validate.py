"""Checks a model file passes before its loader allocates or builds anything from it (hostile files welcome).

A loader trusts nothing it reads: a count drives an allocation or a loop only after it is bounded by the file's size
or by the tensors actually present, so a 4-byte edit (``block_count`` = 0xFFFFFFFF, an array whose element type
became ARRAY) fails in milliseconds with one ``ModelFormatError`` naming the file and key, instead of building a
graph of four billion layers. What is checked, and where the rule comes from:

- GGUF (``gguf_file``): the header is walked with every string, array and tensor-info count bounded by the bytes
  left; nested arrays, duplicate keys or tensors, more than 4 dims are refused (llama.cpp's gguf.cpp refuses them
  too); tensor data must start at the running, alignment-padded offset of the tensors before it (llama.cpp's rule:
  no range overlaps another, escapes the file or is misaligned), and the last must end the file, as both GGUF
  writers leave it (so a type edit that shrinks even the last tensor is caught); tensor types must be ones we can
  read (``UnsupportedError`` otherwise), and norms, biases and other 1-D tensors must be F32/F16/BF16, as llama.cpp
  stores them (a norm that "became" Q5_0 would read as NaNs).
- safetensors (``safetensors_layout``): the tensors tile the data section exactly, in offset order, with no gap,
  overlap or tail (the official library's "invalid offset" / "file not fully covered"), so an off-by-one header
  length or aliased tensors are refused.
- config.json (``hf_config``) and GGUF metadata (``gguf_metadata``): counts are integers (not 1.5, not true),
  floats finite; the layer count is bounded by the layers whose tensors are present, before a family loops over it.
- the family's config (``config``): every size positive and no larger than the largest tensor dimension present,
  eps in (0, 1), rope theta and scales positive and finite, window and context inside int32 positions.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UnsupportedError

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_POSITION = 2**31 - 1  # positions are int32 on every backend
TENSOR_NAME = re.compile(r"[\w.\-]{1,64}", re.ASCII)  # llama.cpp's names: at most GGML_MAX_NAME (64) bytes
LAYER_INDEX = re.compile(r"(?:^|\.)(?:blk|layers|h|blocks)\.(\d+)\.")

# GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
FLOAT_TYPES = ("F32", "F16", "BF16")  # what a norm, a bias or any 1-D tensor may be stored as


def supported_gguf_types() -> set[str]:
    """GGML tensor types the GGUF loader can read: plain floats and what ``gguf.quants`` dequantizes."""
    import gguf.quants

    traits = getattr(gguf.quants, "_type_traits", {})
    return set(FLOAT_TYPES) | {t.name for t in traits}


class _Cursor:
    """Bounded little/big-endian reads over a memory map: every read checks the bytes left first."""

    def __init__(self, buf: Any, path: Path, order: str) -> None:
        self.buf, self.path, self.order, self.pos, self.size = buf, path, order, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(
                f"{self.path}: {what} needs {n} bytes at offset {self.pos} but the file has {self.size}: "
                "truncated or corrupt"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def skip_value(self, vtype: int, key: str) -> Any:
        """Skip one value of ``vtype``, returning scalars (for general.alignment); arrays skip in one step when
        their elements have a fixed size."""
        where = f"metadata {key!r}"
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], where)
        if vtype == STRING:
            self.string(where)
            return None
        if vtype != ARRAY:
            raise ModelFormatError(f"{self.path}: {where} has unknown value type {vtype}")
        etype, count = self.unpack("I", where), self.unpack("Q", where)
        if etype == ARRAY:
            raise ModelFormatError(f"{self.path}: {where} is an array of arrays (not supported by GGUF readers)")
        if etype in _SCALAR:
            self.need(count * struct.calcsize(_SCALAR[etype]), f"{where} ({count} elements)")
            self.pos += count * struct.calcsize(_SCALAR[etype])
        elif etype == STRING:
            self.need(count * 8, f"{where} ({count} strings)")
            for _ in range(count):
                self.string(where)
        else:
            raise ModelFormatError(f"{self.path}: {where} is an array of unknown value type {etype}")
        return None


def gguf_file(path: Path) -> None:
    """Walk a GGUF file's header and tensor index with every count bounded by the file, before ``GGUFReader``
    allocates anything; check each tensor's type, name-allowed type and data range (see the module docstring)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelFormatError(f"{path}: empty file, not a GGUF") from None
    with buf:
        head = _Cursor(buf, path, "<")
        if head.unpack("4s", "the GGUF magic") != b"GGUF":
            raise ModelFormatError(f"{path}: not a GGUF file (no GGUF magic)")
        version = head.unpack("I", "the GGUF version")
        if version & 0xFFFF == 0:  # written on a big-endian host: every number is byte-swapped
            head.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = head.unpack("Q", "the tensor count"), head.unpack("Q", "the metadata count")
        left = head.size - head.pos
        if n_kv * 13 > left or n_tensors * 28 > left:  # the smallest possible key/value and tensor info
            raise ModelFormatError(
                f"{path}: {n_kv} metadata entries and {n_tensors} tensors cannot fit in {head.size} bytes: corrupt"
            )
        keys: set[bytes] = set()
        alignment = 32
        for _ in range(n_kv):
            key = head.string("a metadata key")
            name = key.decode("utf-8", "replace")
            if key in keys:
                raise ModelFormatError(f"{path}: metadata key {name!r} appears twice")
            keys.add(key)
            value = head.skip_value(head.unpack("I", f"metadata {name!r}"), name)
            if name == "general.alignment":
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
                    raise ModelFormatError(f"{path}: metadata 'general.alignment' = {value!r} is not a power of 2")
                alignment = value
        supported = supported_gguf_types()
        infos: list[tuple[str, list[int], str, int, int]] = []  # name, dims, type, offset, bytes
        names: set[str] = set()
        for _ in range(n_tensors):
            name = head.string("a tensor name").decode("utf-8", "replace")
            where = f"{path}: tensor {name!r}"
            if not TENSOR_NAME.fullmatch(name):
                raise ModelFormatError(f"{where}: a tensor name is 1..64 letters, digits, '_', '.' or '-'")
            if name in names:
                raise ModelFormatError(f"{where} appears twice")
            names.add(name)
            n_dims = head.unpack("I", f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFormatError(f"{where} has {n_dims} dimensions (1..{MAX_DIMS}): corrupt")
            ne = [head.unpack("Q", f"tensor {name!r}") for _ in range(n_dims)]
            raw_type, offset = head.unpack("I", f"tensor {name!r}"), head.unpack("Q", f"tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelFormatError(f"{where} has unknown type {raw_type}") from None
            if qtype.name in ("I8", "I16", "I32", "I64"):  # no weight of ours is an integer tensor
                raise ModelFormatError(f"{where} is {qtype.name}, not a float or quantized type")
            if qtype.name not in supported:
                known = ", ".join(sorted(supported))
                raise UnsupportedError(f"{where} is {qtype.name}, which tensorweave cannot read (supported: {known})")
            if (n_dims == 1 or _float_only(name)) and qtype.name not in FLOAT_TYPES:
                raise ModelFormatError(f"{where} is {qtype.name}; a norm, bias or 1-D tensor must be F32, F16 or BF16")
            if ne[0] % block:
                raise ModelFormatError(f"{where} rows of {ne[0]} are not whole {qtype.name} blocks")
            elements = math.prod(ne)
            if elements > head.size * block:  # bounds the byte count below
                raise ModelFormatError(f"{where} {ne} cannot fit in a file of {head.size} bytes: truncated or corrupt")
            infos.append((name, ne, qtype.name, offset, elements // block * type_size))
        start = head.pos + (-head.pos % alignment)
        expected = 0
        for name, ne, qname, offset, nbytes in infos:
            if offset != expected:
                raise ModelFormatError(
                    f"{path}: tensor {name!r} ({qname} {ne}) has data offset {offset}, expected {expected}: its "
                    "range overlaps, skips or misaligns against the tensors before it"
                )
            if start + offset + nbytes > head.size:
                raise ModelFormatError(
                    f"{path}: tensor {name!r} ({qname} {ne}) at offset {start + offset} needs {nbytes} bytes but "
                    f"the file has {head.size}: truncated or corrupt"
                )
            expected += nbytes + (-nbytes % alignment)
        if infos and not expected - alignment < head.size - start <= expected:  # only the last padding may be cut
            raise ModelFormatError(
                f"{path}: the tensors cover {expected} data bytes but the file holds {head.size - start}: the file "
                "is not fully covered (a tensor type or size was changed, or data appended)"
            )


def _float_only(name: str) -> bool:
    """Tensors llama.cpp always keeps in float: norms, biases, rope factors."""
    base = name.removesuffix(".weight")
    return base.endswith(("norm", ".bias")) or base == "rope_freqs"


def safetensors_layout(path: Path, spans: Iterable[tuple[str, int, int]], data_size: int) -> None:
    """The tensors' ``(name, begin, end)`` data ranges tile ``[0, data_size)`` exactly: sorted by offset, each
    starts where the one before ends (no overlap, no alias, no gap) and the last ends at the file's end."""
    at, before = 0, None
    for name, begin, end in sorted(spans, key=lambda s: (s[1], s[2])):
        if begin != at:
            what = f"overlaps tensor {before!r}" if begin < at else f"leaves bytes {at}..{begin} unused"
            raise ModelFormatError(f"{path}: tensor {name!r} data [{begin}, {end}) {what} (invalid offset)")
        at, before = end, name
    if at != data_size:
        raise ModelFormatError(
            f"{path}: the tensors cover {at} of the {data_size} data bytes: the file is not fully covered "
            "(a wrong header length, or data appended)"
        )


# config.json keys the families read as counts, and as real numbers
HF_INTS = (
    *("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"),
    *("intermediate_size", "max_position_embeddings", "sliding_window", "num_experts", "num_local_experts"),
    *("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step"),
    "max_window_layers",
)
HF_FLOATS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "routed_scaling_factor")


def hf_config(path: Path, raw: Mapping[str, Any], stored: Iterable[str]) -> None:
    """config.json's counts are integers and its real numbers finite, and ``num_hidden_layers`` does not exceed the
    layers whose tensors are in the checkpoint; run before a family turns the config into loops and graphs."""
    for key in HF_INTS:
        v = raw.get(key)
        if v is not None and not _is_int(v):
            raise ModelFormatError(f"{path}: {key} = {v!r} is not an integer")
    for key in HF_FLOATS:
        v = raw.get(key)
        if v is not None and not _is_finite(v):
            raise ModelFormatError(f"{path}: {key} = {v!r} is not a finite number")
    _layer_bound(path, "num_hidden_layers", raw.get("num_hidden_layers"), stored)


def gguf_metadata(path: Path, meta: Mapping[str, Any], stored: Iterable[str]) -> None:
    """GGUF metadata counts of the architecture (``{arch}.*_count``, ``*_length``) are integers, its floats
    finite, and ``{arch}.block_count`` does not exceed the layers whose tensors are in the file."""
    arch = meta.get("general.architecture")
    for key, v in meta.items():
        if not isinstance(arch, str) or not key.startswith(f"{arch}."):
            continue
        if key.endswith(("_count", "_length", "count_kv")) and not isinstance(v, list) and not _is_int(v):
            raise ModelFormatError(f"{path}: metadata {key!r} = {v!r} is not an integer")
        if isinstance(v, float) and not math.isfinite(v):
            raise ModelFormatError(f"{path}: metadata {key!r} = {v!r} is not finite")
    _layer_bound(path, f"metadata {arch}.block_count", meta.get(f"{arch}.block_count"), stored)


def _layer_bound(path: Path, key: str, n_layer: Any, stored: Iterable[str]) -> None:
    present = {int(m.group(1)) for s in stored if (m := LAYER_INDEX.search(s))}
    if _is_int(n_layer) and present and not 1 <= n_layer <= max(present) + 1:
        raise ModelFormatError(f"{path}: {key} = {n_layer} but the file holds tensors of {len(present)} layers")


def config(path: Path, cfg: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A family's config against the tensors present (graph names): every size a positive integer no larger than
    the largest tensor dimension, the layer count no larger than the layers present, eps, theta, scales finite and
    in range, window and context inside int32 positions. Fields a family's config lacks are skipped."""
    largest = max((d for s in shapes.values() for d in s), default=0)

    def get(name: str, default: Any = None) -> Any:
        return getattr(cfg, name, default)

    def bad(field: str, why: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: config {field} = {get(field)!r} {why}")

    sizes = ("vocab", "hidden", "n_head", "n_kv", "head_dim")
    for field in (*sizes, "ffn", "n_expert", "expert_ffn", "shared_ffn", "top_k", "n_layer", "ctx"):
        v = get(field)
        if v is not None and (not _is_int(v) or v < (1 if field in (*sizes, "n_layer", "ctx") else 0)):
            raise bad(field, "is not a positive integer" if field in sizes else "is not a non-negative integer")
    for field in (*sizes, "ffn", "n_expert", "expert_ffn", "shared_ffn"):
        if (get(field) or 0) > largest:
            raise bad(field, f"exceeds every tensor dimension in the file (largest {largest})")
    for field in ("n_head", "n_kv"):
        if get(field) is not None and get(field) * (get("head_dim") or 1) > largest:
            raise bad(field, f"x head_dim {get('head_dim')} exceeds every tensor dimension (largest {largest})")
    present = {int(m.group(1)) for s in shapes if (m := LAYER_INDEX.search(s))}
    if get("n_layer") is not None and get("n_layer") > (max(present) + 1 if present else 0):
        raise bad("n_layer", f"but the file holds tensors of {len(present)} layers")
    if get("n_expert") and not 1 <= get("top_k", 1) <= get("n_expert"):
        raise bad("top_k", f"is not in 1..n_expert ({get('n_expert')})")
    eps = get("norm_eps")
    if eps is not None and not (_is_finite(eps) and 0 < eps < 1):
        raise bad("norm_eps", "is not in (0, 1)")
    for field in ("rope_theta", "route_scale", "softcap"):
        v = get(field)
        if v is not None and not (_is_finite(v) and v > 0):
            raise bad(field, "is not a positive finite number")
    for key, v in get("rope_scaling") or ():
        values = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, (int, float)) and not _is_finite(x) for x in values):
            raise bad("rope_scaling", f"has a non-finite {key}")
        if key in ("factor", "factors") and not all(_is_finite(x) and x > 0 for x in values):
            raise bad("rope_scaling", f"has a {key} that is not positive")
    n_rot, head_dim = get("n_rot"), get("head_dim")
    if n_rot is not None and (not _is_int(n_rot) or not 0 < n_rot <= (head_dim or 0) or n_rot % 2):
        raise bad("n_rot", f"is not an even count of rotated dims in 1..head_dim ({head_dim})")
    for field in ("window", "ctx"):
        v = get(field)
        if v is not None and (not _is_int(v) or not 1 <= v <= MAX_POSITION):
            raise bad(field, f"is not in 1..{MAX_POSITION} (positions are int32)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

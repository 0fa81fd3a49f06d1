"""GGUF files (llama.cpp's format) through the ``gguf`` package: metadata -> config, tensors -> device slices.

The file is memory-mapped by ``gguf.GGUFReader``. A device's slice of a float tensor is a view; a quantized tensor
(Q8_0, Q4_0, Q4_K, Q6_K and the rest ``gguf.quants`` can dequantize) is dequantized a bounded chunk of rows at a
time, only over the rows the slice needs, so the whole tensor never exists in float. ``read_held`` hands the same
slice out as stored (F16/BF16 arrays, quantization blocks as bytes) for weights that stay in their format on the
device. Generic over families: the
architecture (and ``gguf_requires``) picks the family, whose ``gguf_naming`` maps the file's tensor names (by
default the graph's own names plus ``.weight``) through loaders/names.py. Where the family says
``gguf_permuted_qk`` (llama), llama.cpp's converter interleaved the rows of each Q and K head (for ggml's "normal"
rope); we undo that per head, so the graph runs the same NEOX rope as the HF model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.hookspecs import hookimpl
from ..core.model import Checkpoint, Loader, ModelFamily
from ..errors import ModelFormatError, SplitError, UnsupportedError
from . import validate
from .names import MappedCheckpoint, map_names

CHUNK_BYTES = 16 << 20  # dequantize at most this much float output at a time


class GGUFCheckpoint(MappedCheckpoint):
    def __init__(self, path: Path, families: Mapping[str, ModelFamily]) -> None:
        from gguf import GGMLQuantizationType

        from .tokenizer import gguf_metadata

        self.path = path
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFormatError(f"{path}: not a GGUF file (no GGUF magic)")
        validate.gguf_file(path)  # every count bounded by the file before the reader allocates
        try:
            self.reader = _reader(path)
            self.meta = gguf_metadata(self.reader)
        except ModelFormatError:
            raise
        except Exception as e:  # the reader fails with numpy/struct/Value errors on truncated or corrupt files
            raise ModelFormatError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
        self.tensors = {t.name.removesuffix(".weight"): t for t in self.reader.tensors}  # checked by _reader
        stored = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in self.tensors.items()}
        validate.gguf_metadata(path, self.meta, stored)
        self.family = fam = pick_family(path, self.meta, families)
        meta = dict(self.meta)
        if "rope_freqs" in stored:  # llama3-style rope scaling is stored as per-pair factors: metadata, not a weight
            meta["rope_freqs"] = self._read_stored("rope_freqs", (slice(None),)).tolist()
            del stored["rope_freqs"]
        mapped = map_names(
            fam.gguf_naming,
            stored,
            self._read_stored,
            lambda n: f"{path}: tensor {self.tensors[n].name!r}",
            fam.name,
            str(path),
            meta=meta,
            held=self._read_held,
            formats={n: t.tensor_type.name.lower() for n, t in self.tensors.items()},
        )
        self.mapped = mapped
        try:
            self.config = fam.config_from_gguf(meta, mapped.shapes)
        except (ModelFormatError, UnsupportedError) as e:  # the family's own words, without the file
            raise type(e)(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise ModelFormatError(f"{path}: missing or malformed metadata {e}") from None
        validate.config(path, self.config, mapped.shapes)
        embd = self.tensors.get("token_embd")
        kinds: dict[int, np.dtype[Any]] = {
            int(GGMLQuantizationType.F32): dtypes.float32,
            int(GGMLQuantizationType.F16): dtypes.float16,
            int(GGMLQuantizationType.BF16): dtypes.bfloat16,
        }
        self.dtype = kinds.get(int(embd.tensor_type), dtypes.float32) if embd is not None else dtypes.float32

    def _read_stored(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` of the file's tensor ``name`` (without ``.weight``), dequantized, Q/K rows in HF order."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        qtype = GGMLQuantizationType(int(t.tensor_type))
        lead, last = index[:-1], index[-1]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            out = t.data[index]
        elif qtype == GGMLQuantizationType.BF16:  # the reader hands BF16 out as raw bytes
            out = t.data.view(dtypes.bfloat16)[index]
        else:
            rows = t.data[lead]  # [..., bytes per row], still quantized
            flat = rows.reshape(-1, rows.shape[-1])
            n_cols = int(t.shape[0])  # ggml lists the innermost dimension first
            width = len(range(*last.indices(n_cols)))
            step = max(1, CHUNK_BYTES // (4 * n_cols))
            out = np.empty((flat.shape[0], width), np.float32)
            for i in range(0, flat.shape[0], step):
                out[i : i + step] = dequantize(flat[i : i + step], qtype)[:, last]
            out = out.reshape(*rows.shape[:-1], width)
        if self.family.gguf_permuted_qk and name.endswith((".attn_q", ".attn_k", ".attn_q.bias", ".attn_k.bias")):
            out = _unpermute(np.asarray(out), self.config.head_dim)
        return np.asarray(out)

    def _read_held(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` as stored: a float view, or the quantization blocks of the slice as bytes."""
        t = self.tensors[name]
        fmt = dtypes.FORMATS.get(t.tensor_type.name.lower())
        if fmt is None or not fmt.quantized:
            return self._read_stored(name, index)
        n_cols = int(t.shape[0])
        start, stop, step = index[-1].indices(n_cols)
        if step != 1 or start % fmt.block or (stop % fmt.block and stop != n_cols):
            raise SplitError(
                f"{self.path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be cut at columns {start}:{stop}: "
                f"not on its {fmt.block}-value block boundaries"
            )
        out = t.data[index[:-1]][..., start // fmt.block * fmt.block_bytes : stop // fmt.block * fmt.block_bytes]
        if self.family.gguf_permuted_qk and name.endswith((".attn_q", ".attn_k")):
            out = _unpermute(np.asarray(out), self.config.head_dim)
        return np.asarray(out)

    def tokenizer(self) -> Any:
        if "tokenizer.ggml.tokens" not in self.meta:
            return None
        from .tokenizer import Tokenizer

        return Tokenizer.from_gguf(self.meta)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.tensors.items()):
            raw = t.data.reshape(-1).view(np.uint8)
            h.update(name.encode() + bytes(raw[:256]) + bytes(raw[-256:]))
        return h.hexdigest()[:16]

    def close(self) -> None:
        self.tensors = {}


def pick_family(path: Path, meta: Mapping[str, Any], families: Mapping[str, ModelFamily]) -> ModelFamily:
    """The family that reads a GGUF: among those listing its architecture, the one whose ``gguf_requires`` keys are
    all set and most numerous (a Mixtral file is arch "llama" with "llama.expert_count")."""
    arch = meta.get("general.architecture")
    claims = [f for f in families.values() if arch in f.gguf_architectures]
    fits = [f for f in claims if all(meta.get(k.format(arch=arch)) for k in f.gguf_requires)]
    if not fits:
        known = sorted({a for f in families.values() for a in f.gguf_architectures})
        hint = f" (families of it need {', '.join(k for f in claims for k in f.gguf_requires)})" if claims else ""
        raise UnsupportedError(f"{path}: unknown GGUF architecture {arch!r}{hint}; supported: {', '.join(known)}")
    return max(fits, key=lambda f: len(f.gguf_requires))


def _reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` that first checks every tensor's type, row blocks and data range against the file, so
    a truncated file or a corrupt offset is named by tensor (the reader itself only fails with a bare numpy reshape
    error)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderField

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = GGMLQuantizationType(int(raw_type[0]))
                    block, type_size = GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    raise ModelFormatError(f"{path}: tensor {name!r} has unknown type {int(raw_type[0])}") from None
                if qtype.name in ("I8", "I16", "I32", "I64"):  # no weight of ours is an integer tensor
                    raise ModelFormatError(f"{path}: tensor {name!r} is {qtype.name}, not a float or quantized type")
                ne = [int(d) for d in dims]
                if ne and ne[0] % block:
                    raise ModelFormatError(f"{path}: tensor {name!r} rows of {ne[0]} are not whole {qtype.name} blocks")
                begin, nbytes = start_offs + int(offset[0]), math.prod(ne) // block * type_size
                if begin + nbytes > size:
                    raise ModelFormatError(
                        f"{path}: tensor {name!r} ({qtype.name} {ne}) at offset {begin} needs {nbytes} bytes "
                        f"but the file has {size}: truncated or corrupt"
                    )
            super()._build_tensors(start_offs, fields)

    return Reader(path)


def _unpermute(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave ``reshape(heads, 2, hd/2, ...).swapaxes(1, 2)`` on whole heads."""
    rows = w.shape[0]
    if rows % head_dim:
        raise ModelFormatError(f"q/k slice of {rows} rows is not whole heads of {head_dim}")
    heads = rows // head_dim
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFLoader(Loader):
    name = "gguf"

    def probe(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".gguf"

    def open(self, path: Path, families: Mapping[str, ModelFamily]) -> Checkpoint:
        return GGUFCheckpoint(path, families)


@hookimpl
def tensorweave_register_loaders(register: Callable[[Loader], None]) -> None:
    register(GGUFLoader())

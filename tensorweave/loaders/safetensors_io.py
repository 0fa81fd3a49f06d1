"""safetensors files, read and written without the ``safetensors`` package: the neutral module that the HF loader
(model weights) and ``runtime/state.py`` (session state files) both use.

Reading parses the 8-byte header length and the JSON header and checks every entry against the file size before
anything is allocated; the data is one read-only memory map, so a tensor is a view and only the pages a slice touches
are read. ``save_pretrained`` writes a Hugging Face checkpoint named by a family's ``Naming`` (the HF loader's
inverse), for synthetic models, the demo and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.model import LLAMA_HF, Naming
from ..errors import ModelFormatError
from . import validate

ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": dtypes.float64,
    "F32": dtypes.float32,
    "F16": dtypes.float16,
    "BF16": dtypes.bfloat16,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
FLOATS = {dtypes.float64, dtypes.float32, dtypes.float16, dtypes.bfloat16}


class SafetensorsFile:
    """One .safetensors file: header validated against the file size, data memory-mapped, tensors as views."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: {size} bytes is too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise ModelFormatError(
                    f"{path}: header length {n} exceeds the file ({size} bytes): truncated or not a safetensors file"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{path}: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.entries: dict[str, tuple[np.dtype[Any], tuple[int, ...], int]] = {}
        for name, info in header.items():
            self.entries[name] = self._check(name, info, size - self.start)
        spans = ((name, at, at + math.prod(shape) * dt.itemsize) for name, (dt, shape, at) in self.entries.items())
        validate.safetensors_layout(path, spans, size - self.start)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > self.start else None

    def _check(self, name: str, info: Any, data_size: int) -> tuple[np.dtype[Any], tuple[int, ...], int]:
        where = f"{self.path}: tensor {name!r}"
        try:
            dt, shape, (begin, end) = ST_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except KeyError as e:
            raise ModelFormatError(f"{where}: unknown dtype or missing field {e}") from None
        except (TypeError, ValueError):
            raise ModelFormatError(f"{where}: malformed header entry {info!r}") from None
        if not all(isinstance(s, int) and s >= 0 for s in (*shape, begin, end)):
            raise ModelFormatError(f"{where}: malformed shape {shape} or offsets {info['data_offsets']}")
        nbytes = math.prod(shape) * dt.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise ModelFormatError(f"{where}: offsets [{begin}, {end}) do not hold {shape} {info['dtype']}")
        if end > data_size:
            raise ModelFormatError(
                f"{where}: data ends at byte {self.start + end} but the file has {self.start + data_size}: truncated"
            )
        return dt, shape, begin

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view into the memory map (nothing is read until it is indexed)."""
        dt, shape, begin = self.entries[name]
        if self._map is None or math.prod(shape) == 0:
            return np.zeros(shape, dt)
        return (
            self._map[self.start + begin : self.start + begin + math.prod(shape) * dt.itemsize].view(dt).reshape(shape)
        )

    def header_digest(self) -> bytes:
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read(self.start)).digest()


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` as a .safetensors file atomically: a temporary file beside ``path``, unique to this call,
    is renamed over it only when complete, so an interrupted write never destroys an older file of the same name
    and two concurrent writes leave one of them whole (the last renamed)."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, a in tensors.items():
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # one per call: concurrent writers never share
    try:
        with open(tmp, "xb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for a in tensors.values():
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_pretrained(
    directory: Path, config: Mapping[str, Any], weights: Mapping[str, np.ndarray], naming: Naming = LLAMA_HF
) -> None:
    """Write graph-named ``weights`` as a Hugging Face checkpoint (config.json + model.safetensors) with the stored
    names of ``naming`` (default: llama-like), experts one tensor per expert as ``save_pretrained`` does."""
    inverse: dict[str, str] = {}  # graph name pattern -> stored pattern; per-expert patterns win over fused ones
    for stored, target in naming.names.items():
        if isinstance(target, str) and ("{E}" in stored or target not in inverse):
            inverse[target] = stored
    patterns = [(re.compile(re.escape(g).replace(r"\{L\}", r"(?P<L>\d+)")), s) for g, s in inverse.items()]
    tensors: dict[str, np.ndarray] = {}
    for name, a in weights.items():
        found = next(((m, s) for r, s in patterns if (m := r.fullmatch(name))), None)
        if found is None:
            raise ModelFormatError(f"graph weight {name!r} has no Hugging Face name in this naming")
        groups, stored = found[0].groupdict(), found[1]
        if naming.norm_shift and name.endswith("norm"):
            a = a - np.asarray(naming.norm_shift, a.dtype)
        if "{E}" in stored:
            tensors.update({stored.format(**groups, E=e): expert for e, expert in enumerate(a)})
        else:
            tensors[stored.format(**groups)] = a
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})

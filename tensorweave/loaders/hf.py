"""Hugging Face checkpoints: config.json + model.safetensors (or shards with model.safetensors.index.json).

safetensors is read here directly (8-byte header length, JSON header, raw data) so every header entry can be
checked against the file before anything is allocated, and so the data is one read-only memory map: a device's
slice is a view into the map, and only the pages it touches are read. Hugging Face tensor names map onto the
graph's GGUF-style names; MoE experts come either one tensor per expert (what ``save_pretrained`` writes) or fused
(``experts.gate_up_proj`` [E, 2F, H], ``experts.down_proj`` [E, H, F]) and are sliced without stacking the whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.hookspecs import hookimpl
from ..core.model import Checkpoint, Loader, ModelFamily
from ..errors import ModelFormatError, UnsupportedError

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
    """Write ``tensors`` as a .safetensors file atomically: a temporary file beside ``path`` is renamed over it
    only when complete, so an interrupted write never destroys an older file of the same name."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, a in tensors.items():
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
    tmp.replace(path)


# Hugging Face names -> graph names (llama.cpp's GGUF names without ".weight").
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "lm_head.weight": "output",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm",
    **{
        f"self_attn.{x}_proj.{kind}": f"attn_{x}{'.bias' if kind == 'bias' else ''}"
        for x in "qkv"
        for kind in ("weight", "bias")
    },
    "self_attn.o_proj.weight": "attn_output",
    "self_attn.o_proj.bias": "attn_output.bias",
    **{f"mlp.{x}_proj.weight": f"ffn_{x}" for x in ("gate", "up", "down")},
    "mlp.gate.weight": "ffn_gate_inp",
    "mlp.experts.down_proj": "ffn_down_exps",
}
IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq$")  # buffers some exporters save; recomputed from the config
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def save_pretrained(directory: Path, config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
    """Write graph-named ``weights`` as a Hugging Face checkpoint (config.json + model.safetensors, experts one
    tensor per expert as ``save_pretrained`` does): the loader's inverse, for synthetic models and benchmarks."""
    to_hf = {graph: hf for hf, graph in GLOBAL_NAMES.items()}
    layer_hf = {graph: hf for hf, graph in LAYER_NAMES.items()}
    tensors: dict[str, np.ndarray] = {}
    for name, a in weights.items():
        if not name.startswith("blk."):
            tensors[to_hf[name]] = a
            continue
        _, il, rest = name.split(".", 2)
        if rest.endswith("_exps"):
            for e, expert in enumerate(a):
                tensors[f"model.layers.{il}.mlp.experts.{e}.{rest.split('_')[1]}_proj.weight"] = expert
        else:
            tensors[f"model.layers.{il}.{layer_hf[rest]}"] = a
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})


# A graph weight is read from: one tensor, a [lo, hi) part of axis 1 of a fused tensor, or stacked experts.
Source = Callable[[tuple[slice, ...]], np.ndarray]


class HFCheckpoint(Checkpoint):
    def __init__(self, path: Path, families: Mapping[str, ModelFamily]) -> None:
        self.path = path
        cfg_path = path / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: no config.json (a Hugging Face model directory needs one)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{cfg_path}: not a JSON object")
        model_type = raw.get("model_type")
        fam = next((f for f in families.values() if model_type in f.hf_model_types), None)
        if fam is None:
            known = sorted(t for f in families.values() for t in f.hf_model_types)
            raise UnsupportedError(
                f"{cfg_path}: unknown architecture model_type={model_type!r} "
                f"(architectures {raw.get('architectures')}); supported: {', '.join(known)}"
            )
        self.family = fam
        try:
            self.config = fam.config_from_hf(raw)
        except UnsupportedError as e:
            raise UnsupportedError(f"{cfg_path}: {e}") from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise ModelFormatError(f"{cfg_path}: missing or malformed field {e}") from None
        self.files = self._open_files()
        self.sources, self.shapes = self._map_names()
        embd = self._owner.get("model.embed_tokens.weight")  # a float: _map_names checked it
        self.dtype = embd.entries["model.embed_tokens.weight"][0] if embd else dtypes.float32

    def _open_files(self) -> dict[str, SafetensorsFile]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelFormatError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        elif (self.path / "model.safetensors").exists():
            names = ["model.safetensors"]
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not names:
                raise ModelFormatError(f"{self.path}: no model.safetensors, index or *.safetensors file")
        files = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for n in names:
            if not (self.path / n).exists():
                raise ModelFormatError(f"{index}: lists {n}, which is not in {self.path}")
            files[n] = SafetensorsFile(self.path / n)
        for f in files.values():
            for t in f.entries:
                if t in self._owner:
                    raise ModelFormatError(
                        f"{self.path}: tensor {t!r} is in both {self._owner[t].path.name} and {f.path.name}"
                    )
                self._owner[t] = f
        return files

    def _map_names(self) -> tuple[dict[str, Source], dict[str, tuple[int, ...]]]:
        sources: dict[str, Source] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        experts: dict[tuple[int, str], dict[int, str]] = {}
        self.origin: dict[str, str] = {}  # graph name -> "file: tensor 'hf name'", for messages
        tied = getattr(self.config, "tied", False)
        for hf, f in self._owner.items():
            if IGNORED.match(hf) or (tied and hf == "lm_head.weight"):
                continue
            m = LAYER.match(hf)
            if m is None:
                name = GLOBAL_NAMES.get(hf)
            elif (e := EXPERT.match(m.group(2))) is not None:
                experts.setdefault((int(m.group(1)), e.group(2)), {})[int(e.group(1))] = hf
                continue
            elif m.group(2) == "mlp.experts.gate_up_proj":
                self._fused_gate_up(int(m.group(1)), hf, f, sources, shapes)
                continue
            else:
                name = LAYER_NAMES.get(m.group(2))
                name = name and f"blk.{m.group(1)}.{name}"
            if name is None:
                raise ModelFormatError(f"{f.path}: tensor {hf!r} has no place in a {self.family.name} model")
            _check_float(f, hf)
            sources[name] = _view(f, hf)
            self.origin[name] = f"{f.path}: tensor {hf!r}"
            shapes[name] = f.entries[hf][1]
        for (il, which), by_index in experts.items():
            name = f"blk.{il}.ffn_{which}_exps"
            names = [by_index.get(e, "") for e in range(max(by_index) + 1)]
            if "" in names:
                missing = names.index("")
                raise ModelFormatError(
                    f"{self.path}: expert tensor model.layers.{il}.mlp.experts.{missing}.{which}_proj.weight is missing"
                )
            for n in names:
                _check_float(self._owner[n], n)
            first = self._owner[names[0]].entries[names[0]][1]
            for n in names:
                shape = self._owner[n].entries[n][1]
                if shape != first:
                    raise ModelFormatError(f"{self._owner[n].path}: tensor {n!r} has shape {shape}, expert 0 {first}")
            sources[name] = _stacked([_view(self._owner[n], n) for n in names])
            self.origin[name] = f"{self.path}: tensors 'model.layers.{il}.mlp.experts.*.{which}_proj.weight'"
            shapes[name] = (len(names), *first)
        return sources, shapes

    def _fused_gate_up(
        self, il: int, hf: str, f: SafetensorsFile, sources: dict[str, Source], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        _check_float(f, hf)
        if len(f.entries[hf][1]) != 3:
            raise ModelFormatError(f"{f.path}: tensor {hf!r} {f.entries[hf][1]} is not [experts, 2 x ffn, hidden]")
        E, two_f, H = f.entries[hf][1]
        if two_f % 2:
            raise ModelFormatError(f"{f.path}: tensor {hf!r} {f.entries[hf][1]}: axis 1 is not gate and up halves")
        half = two_f // 2
        for k, which in enumerate(("gate", "up")):
            sources[f"blk.{il}.ffn_{which}_exps"] = _part(f, hf, k * half)
            shapes[f"blk.{il}.ffn_{which}_exps"] = (E, half, H)
            self.origin[f"blk.{il}.ffn_{which}_exps"] = f"{f.path}: tensor {hf!r} ({which} half)"

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def names(self) -> list[str]:
        return list(self.shapes)

    def describe(self, name: str) -> str:
        """Where graph weight ``name`` comes from, for messages: the file and the Hugging Face tensor name."""
        return f"{self.origin[name]} ({name})" if name in self.origin else super().describe(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.sources[name](index)

    def tokenizer(self) -> Any:
        if not (self.path / "tokenizer.json").exists():
            return None
        from .tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(self.path)

    def fingerprint(self) -> str:
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for name in sorted(self._owner):  # a sample of every tensor's bytes: cheap, and tells two models apart
            a = self._owner[name].get(name).reshape(-1)
            h.update(name.encode())
            h.update(np.ascontiguousarray(a[:64]).tobytes() + np.ascontiguousarray(a[-64:]).tobytes())
        return h.hexdigest()[:16]

    def close(self) -> None:
        for f in self.files.values():
            f._map = None


def _check_float(f: SafetensorsFile, hf: str) -> None:
    dt = f.entries[hf][0]
    if dt not in FLOATS:
        raise ModelFormatError(f"{f.path}: tensor {hf!r} is {dt.name}; weights must be F32, F16, BF16 or F64")


def _view(f: SafetensorsFile, hf: str) -> Source:
    return lambda index: f.get(hf)[index]


def _part(f: SafetensorsFile, hf: str, lo: int) -> Source:
    """Half of a fused [E, 2F, H] tensor: graph index on [E, F, H] shifted by ``lo`` along axis 1."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        e, rows, cols = index
        start, stop, _ = rows.indices(f.entries[hf][1][1] // 2)
        return f.get(hf)[e, lo + start : lo + stop, cols]

    return read


def _stacked(parts: list[Source]) -> Source:
    """One [E, ...] weight from per-expert tensors: only the asked experts and slices are read and stacked."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        chosen = parts[index[0]]
        if not chosen:  # np.stack of nothing has no shape: an empty stack of expert 0's slice
            return parts[0](index[1:])[None][:0]
        return np.stack([p(index[1:]) for p in chosen])

    return read


class HFLoader(Loader):
    name = "hf"

    def probe(self, path: Path) -> bool:
        # A directory with config.json or safetensors is ours even when the other is missing: open() says which.
        return path.is_dir() and ((path / "config.json").exists() or any(path.glob("*.safetensors*")))

    def open(self, path: Path, families: Mapping[str, ModelFamily]) -> Checkpoint:
        return HFCheckpoint(path, families)


@hookimpl
def tensorweave_register_loaders(register: Callable[[Loader], None]) -> None:
    register(HFLoader())

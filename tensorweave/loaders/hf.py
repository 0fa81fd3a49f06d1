"""Hugging Face checkpoints: config.json + model.safetensors (or shards with model.safetensors.index.json).

Generic over families: config.json's ``model_type`` picks the family, whose ``hf_naming`` (core/model.py) maps the
stored tensor names onto the graph's GGUF-style names (loaders/names.py does the mapping: prefixes, ignored tensors,
fused and per-expert tensors, transforms). The files are read by ``safetensors_io.SafetensorsFile``: every header
entry is checked against the file before anything is allocated, and a device's slice is a view into a memory map.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.hookspecs import hookimpl
from ..core.model import Checkpoint, Loader, ModelFamily
from ..errors import ModelFormatError, UnsupportedError
from . import validate
from .names import MappedCheckpoint, map_names
from .safetensors_io import FLOATS, SafetensorsFile


class HFCheckpoint(MappedCheckpoint):
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
        self.files = self._open_files()
        validate.hf_config(cfg_path, raw, self._owner)  # before the family loops over the layers
        try:
            self.config = fam.config_from_hf(raw)
        except UnsupportedError as e:
            raise UnsupportedError(f"{cfg_path}: {e}") from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise ModelFormatError(f"{cfg_path}: missing or malformed field {e}") from None
        self._map_names()
        validate.config(cfg_path, self.config, self.mapped.shapes)
        # the weights' own dtype: the float dtype most of the bytes are in (norms are often kept in float32)
        held: dict[np.dtype[Any], int] = {}
        for hf, f in self._owner.items():
            dt, shape, _ = f.entries[hf]
            held[dt] = held.get(dt, 0) + math.prod(shape) * dt.itemsize * (dt in FLOATS)
        self.dtype = max(held, key=lambda dt: held[dt]) if any(held.values()) else dtypes.float32

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

    def _map_names(self) -> None:
        def check_float(hf: str) -> None:
            f = self._owner[hf]
            if f.entries[hf][0] not in FLOATS:
                raise ModelFormatError(
                    f"{f.path}: tensor {hf!r} is {f.entries[hf][0].name}; weights must be F32, F16, BF16 or F64"
                )

        mapped = map_names(
            self.family.hf_naming,
            {hf: f.entries[hf][1] for hf, f in self._owner.items()},
            lambda hf, index: self._owner[hf].get(hf)[index],
            lambda hf: f"{self._owner[hf].path}: tensor {hf!r}",
            self.family.name,
            str(self.path),
            unused=("output",) if getattr(self.config, "tied", False) else (),
            check=check_float,
            held=lambda hf, index: self._owner[hf].get(hf)[index],
            formats={
                hf: dtypes.weight_format(f.entries[hf][0]).name
                for hf, f in self._owner.items()
                if f.entries[hf][0] in FLOATS
            },
        )
        self.mapped = mapped

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

"""A session's state as data (``SessionState``), and its file: read and write, nothing else.

A state file is a plain safetensors container (no pickle). Its JSON metadata (key ``tensorweave``) holds the format
version, the model's fingerprint, the tokens, each cache's kind and first stored position, the last logits'
presence and the sampler's state; its tensors are the caches in the *unsplit* layout, plus the last position's
logits. A kv cache is stored as [positions, all KV heads, head_dim] in position order; a ring as the positions it
still holds (the last ``rows``) in position order; a recurrent state whole. Nothing in it depends on how the saving
model was split: ``Session.load_state`` places each device's part from the whole, as loading places weights.

Format version 1 (before caches had kinds) stored only each cache's first position; its caches were all kv or
ring, so they read back with kind None (position-indexed, the restoring model's cache says which).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import ModelFormatError, StateError
from ..loaders.safetensors_io import SafetensorsFile, write_safetensors

FORMAT, VERSION = "tensorweave.state", 2
LOGITS = "__logits__"  # the tensor holding the last position's logits (what the next token is sampled from)


@dataclass
class CacheState:
    """One cache, whole along its split axis: positions ``first``, ``first + 1``... in order (kv, ring; one row
    each), or the whole value (state). ``kind`` None: a version-1 file's position-indexed cache (kv or ring)."""

    kind: str | None
    values: np.ndarray
    first: int = 0


@dataclass
class SessionState:
    """Everything a session needs to continue: what the file holds, independent of devices and split."""

    model: dict[str, str]  # "fingerprint", "family", "source" of the model that saved it
    tokens: list[int]  # every evaluated token
    caches: dict[str, CacheState]
    logits: np.ndarray | None = None  # after the last token
    sampler: dict[str, Any] | None = None  # Session.sampler_state()


def write(state: SessionState, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically."""
    tensors = {name: np.ascontiguousarray(c.values) for name, c in state.caches.items()}
    if state.logits is not None:
        tensors[LOGITS] = np.asarray(state.logits, np.float32)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tensorweave": __version__,
        "model": state.model,
        "tokens": list(state.tokens),
        "caches": {name: {"kind": c.kind, "first": c.first} for name, c in state.caches.items()},
        "sampler": state.sampler,
    }
    out = Path(path).expanduser()
    write_safetensors(out, tensors, {"tensorweave": json.dumps(meta)})
    return out


def read(path: str | Path) -> SessionState:
    """The state in ``path`` (tensors stay memory-mapped until used); ``StateError`` for anything else."""
    p = Path(path).expanduser()
    try:
        f = SafetensorsFile(p)
    except FileNotFoundError:
        raise StateError(f"{p}: no such state file") from None
    except ModelFormatError as e:
        raise StateError(f"not a tensorweave state file: {e}") from None
    try:
        meta = json.loads(f.metadata.get("tensorweave", "null"))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{p}: not a tensorweave state file (no {FORMAT!r} metadata)")
    version = meta.get("version")
    if version not in (1, VERSION):
        raise StateError(f"{p}: state format version {version} is not 1..{VERSION} (tensorweave {__version__})")
    caches = {}
    for name, c in meta["caches"].items():
        if name not in f.entries:
            raise StateError(f"{p}: cache {name!r} has no tensor in the file")
        kind, first = (None, c) if version == 1 else (c["kind"], c["first"])
        caches[name] = CacheState(kind, f.get(name), int(first))
    return SessionState(
        model=dict(meta["model"]),
        tokens=[int(t) for t in meta["tokens"]],
        caches=caches,
        logits=np.array(f.get(LOGITS), np.float32) if LOGITS in f.entries else None,
        sampler=meta.get("sampler"),
    )

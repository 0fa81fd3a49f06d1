"""A session's state as data (``SessionState``), and its file: read and write, nothing else.

A state file is a plain safetensors container (no pickle). Its JSON metadata (key ``tensorweave``) holds the format
version, the model's fingerprint, the tokens, each cache's kind and first stored position, the last logits'
presence and the sampler's state; its tensors are the caches in the *unsplit* layout, plus the last position's
logits. A kv cache is stored as [positions, all KV heads, head_dim] in position order; a ring as the positions it
still holds (the last ``rows``) in position order; a recurrent state whole. Nothing in it depends on how the saving
model was split: ``Session.load_state`` places each device's part from the whole, as loading places weights.
Each cache is saved in the dtype it is held in (a float16 or bfloat16 KV cache as F16/BF16 tensors, half the
bytes), so the file's tensor dtypes record the saver's cache dtype; a restore converts to the restoring model's
(a 16-bit cache widens to float32 exactly; a float32 one rounds once into a 16-bit cache).

Format version 1 (before caches had kinds) stored only each cache's first position; its caches were all kv or
ring, so they read back with kind None (position-indexed, the restoring model's cache says which).

A state file is input like any other: ``read`` checks every field (types, ranges, that each cache has its tensor
and every tensor a purpose) and, when the metadata carries a ``checksum`` (sha256 over the tensors' bytes, which
``write`` adds unless told not to), that no bit of the data flipped; every failure is one ``StateError`` naming the
file and field. What only the restoring model knows (token ids below its vocabulary, cache shapes, the sampler) is
checked by ``Session.load_state`` before it takes over any cache. ``write`` goes through a temporary file of its own
(unique per call), so concurrent saves to one path leave the last complete one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import ModelFormatError, StateError
from ..loaders.safetensors_io import FLOATS, SafetensorsFile, write_safetensors

FORMAT, VERSION = "tensorweave.state", 2
KINDS = (None, "kv", "ring", "state")
MAX_TOKENS = 2**31 - 1  # positions are int32
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


def write(state: SessionState, path: str | Path, checksum: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically (a unique temporary file renamed over it); ``checksum``: record the
    sha256 of the tensor data so ``read`` detects a flipped bit. ``StateError`` when the path cannot be written."""
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
    if checksum:
        meta["checksum"] = _digest(tensors)
    out = Path(path).expanduser()
    try:
        write_safetensors(out, tensors, {"tensorweave": json.dumps(meta)})
    except OSError as e:
        raise StateError(f"cannot save to {out}: {e.strerror or e}") from None
    return out


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def read(path: str | Path) -> SessionState:
    """The state in ``path`` (tensors stay memory-mapped until used), every field checked; ``StateError`` for
    anything else (a missing or unreadable file, another format, a malformed or out-of-range field, a checksum
    that does not match the data)."""
    p = Path(path).expanduser()
    try:
        f = SafetensorsFile(p)
    except FileNotFoundError:
        raise StateError(f"{p}: no such state file") from None
    except OSError as e:
        raise StateError(f"{p}: cannot read the state file: {e.strerror or e}") from None
    except ModelFormatError as e:
        raise StateError(f"not a tensorweave state file: {e}") from None
    raw = f.metadata.get("tensorweave", "null") if isinstance(f.metadata, dict) else None
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{p}: not a tensorweave state file (no {FORMAT!r} metadata)")
    version = meta.get("version")
    if version not in (1, VERSION) or isinstance(version, bool):
        raise StateError(f"{p}: state format version {version!r} is not 1..{VERSION} (tensorweave {__version__})")

    def bad(field: str, why: str) -> StateError:
        return StateError(f"{p}: state field {field!r} {why}")

    model = meta.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("fingerprint", "family")):
        raise bad("model", "must name the saving model's fingerprint and family")
    tokens = meta.get("tokens")
    if not isinstance(tokens, list) or len(tokens) > MAX_TOKENS:
        raise bad("tokens", "must be a list of token ids")
    for t in tokens:
        if not _is_int(t) or not 0 <= t < MAX_TOKENS:
            raise bad("tokens", f"holds {t!r}, which is no token id")
    cache_meta = meta.get("caches")
    if not isinstance(cache_meta, dict):
        raise bad("caches", "must map each cache to its kind and first position")
    caches = {}
    for name, c in cache_meta.items():
        if version == 1:  # the first position only
            kind, first = None, c
        else:
            kind, first = (c.get("kind"), c.get("first")) if isinstance(c, dict) else ("?", None)
        if kind not in KINDS or not _is_int(first) or not 0 <= first <= len(tokens):
            raise bad(
                f"caches.{name}", f"= {c!r}: needs a kind ({', '.join(map(str, KINDS[1:]))}) and 0 <= first <= tokens"
            )
        if name not in f.entries:
            raise StateError(f"{p}: cache {name!r} has no tensor in the file")
        values = f.get(name)
        if values.dtype not in FLOATS:  # a 16-bit KV cache is saved as held (bfloat16's numpy kind is "V")
            raise bad(f"caches.{name}", f"tensor is {values.dtype}, not floating point")
        caches[name] = CacheState(kind, values, first)
    extra = sorted(set(f.entries) - set(caches) - {LOGITS})
    if extra:
        raise StateError(f"{p}: tensors {', '.join(map(repr, extra))} belong to no cache")
    logits = None
    if LOGITS in f.entries:
        logits = np.array(f.get(LOGITS), np.float32)
        if logits.ndim != 1 or np.isnan(logits).any():
            raise bad(LOGITS, f"must be one row of logits without NaN, not {logits.shape}")
    sampler = meta.get("sampler")
    if sampler is not None and not (
        isinstance(sampler, dict) and isinstance(sampler.get("params"), dict) and isinstance(sampler.get("state"), dict)
    ):
        raise bad("sampler", "must be null or hold the sampler's params and state")
    digest = meta.get("checksum")
    if digest is not None and digest != _digest({name: f.get(name) for name in f.entries}):
        raise StateError(f"{p}: checksum mismatch: the state's data changed after it was saved (a corrupt file)")
    return SessionState(model=dict(model), tokens=list(tokens), caches=caches, logits=logits, sampler=sampler)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

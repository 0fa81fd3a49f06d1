"""Session state files: save a conversation's KV cache and resume it on any device count, split or backend.

A state file is a plain safetensors container (no pickle). Its JSON metadata (key ``tensorweave``) holds the
model's fingerprint, the tokens, where each cache's rows start, the last logits' presence and the sampler's state;
its tensors are each KV cache in the *unsplit* layout — [positions, all KV heads, head_dim], in position order —
plus the last position's logits. Nothing in it depends on how the saving model was split: restoring places each
device's KV heads from the whole rows, exactly as loading places weights. A sliding-window layer's ring stores only
the positions it still holds (the last ``window``), and they go back into slot ``position % slots``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._version import __version__
from ..errors import ModelFormatError, StateError
from ..loaders.safetensors_io import SafetensorsFile, write_safetensors

if TYPE_CHECKING:
    from .model import Model
    from .session import Session

FORMAT, VERSION = "tensorweave.state", 1
LOGITS = "__logits__"  # the tensor holding the last position's logits (what the next token is sampled from)


def save(session: Session, path: str | Path) -> Path:
    """Write ``session`` to ``path`` (atomically). Every rank of a multi-process group must call it; the rank
    holding device rank 0 writes the file."""
    m = session.model
    session.flush()
    n_past = session.n_past
    graph = m.graphs(tokens=1)
    m.executor.ensure_caches(graph)
    tensors: dict[str, np.ndarray] = {}
    caches: dict[str, int] = {}
    for name, t in graph.caches.items():
        slots = t.shape[0]
        first = max(0, n_past - slots)  # a ring keeps only the last `slots` positions
        positions = np.arange(first, n_past)
        tensors[name] = np.ascontiguousarray(m.executor.read_cache(name, positions % slots), dtype=t.dtype)
        caches[name] = first
    if session.last_logits is not None:
        tensors[LOGITS] = np.asarray(session.last_logits, np.float32)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tensorweave": __version__,
        "model": {
            "fingerprint": m.checkpoint.fingerprint(),
            "family": m.family.name,
            "source": str(m.checkpoint.path),
        },
        "tokens": list(session.tokens),
        "caches": caches,
        "sampler": session.sampler_state(),
    }
    out = Path(path).expanduser()
    if 0 in m.executor.ranks:
        write_safetensors(out, tensors, {"tensorweave": json.dumps(meta)})
    return out


def restore(model: Model, path: str | Path) -> Session:
    """A new session of ``model`` holding the state saved in ``path``; it takes over the model's KV caches."""
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
    if meta.get("version") != VERSION:
        raise StateError(
            f"{p}: state format version {meta.get('version')} is not {VERSION} (tensorweave {__version__})"
        )
    saved, fp = meta["model"], model.checkpoint.fingerprint()
    if saved["fingerprint"] != fp:
        raise StateError(
            f"{p}: this state belongs to another model ({saved['family']} from {saved['source']}, fingerprint "
            f"{saved['fingerprint']}); the loaded model is {model.family.name} from {model.checkpoint.path} ({fp})"
        )
    tokens = [int(t) for t in meta["tokens"]]
    if len(tokens) > model.config.ctx:
        raise StateError(
            f"{p}: the state holds {len(tokens)} tokens but the model's context is {model.config.ctx} (load with a "
            f"larger ctx=)"
        )
    graph = model.graphs(tokens=1)
    if set(meta["caches"]) != set(graph.caches):
        raise StateError(f"{p}: the state's KV caches do not match this model's layers")
    model.executor.ensure_caches(graph)
    session = model.session()  # not Session(model): the session module imports this one (Session.save)
    session.take_over()
    for name, t in graph.caches.items():
        rows, first = f.get(name), int(meta["caches"][name])
        slots = t.shape[0]
        keep = max(first, len(tokens) - slots)  # this model's ring may be shorter than the saver's
        want = (len(tokens) - first, *t.shape[1:])
        if tuple(rows.shape) != want or not 0 <= first <= len(tokens):
            raise StateError(f"{p}: cache {name!r} has shape {tuple(rows.shape)}, expected {want}")
        if keep < len(tokens):
            positions = np.arange(keep, len(tokens))
            model.executor.write_cache(name, positions % slots, np.asarray(rows[keep - first :], t.dtype))
    session.tokens = tokens
    if LOGITS in f.entries:
        session.last_logits = np.array(f.get(LOGITS), np.float32)
    session.load_sampler_state(meta.get("sampler"))
    return session

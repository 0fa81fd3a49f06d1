"""A session: one running context over a model's sharded KV cache (tokens seen, next position).

The KV caches live on the devices inside the model's executor, split by KV head; a session owns them while it is
the model's active session. Starting another session (or ``model.logits``) takes them over, and the older session
then refuses to run instead of silently reading someone else's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ShapeError, StateError

if TYPE_CHECKING:
    from .model import Model

UBATCH = 512  # tokens per step when prefilling: bounds activation memory and the number of traced graph shapes


class Session:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.tokens: list[int] = []

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def eval(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append ``ids`` to the context; returns float32 logits [len(ids), vocab], one row per new token."""
        m = self.model
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= m.vocab):
            bad = int(ids[(ids < 0) | (ids >= m.vocab)][0])
            raise ShapeError(f"token id {bad} is outside the vocabulary [0, {m.vocab})")
        if self.n_past + ids.size > m.config.ctx:
            raise StateError(
                f"context full: {self.n_past} + {ids.size} tokens exceed ctx {m.config.ctx} (load with a larger ctx=)"
            )
        if m.active is not self:
            if self.n_past:
                raise StateError("this session's KV cache was taken over by a newer session of the same model")
            m.executor.reset_caches()
            m.active = self
        out = np.empty((ids.size, m.vocab), np.float32)
        for lo in range(0, ids.size, UBATCH):
            chunk = ids[lo : lo + UBATCH]
            g = m.graphs(tokens=chunk.size)
            pos = np.arange(self.n_past, self.n_past + chunk.size, dtype=np.int32)
            out[lo : lo + chunk.size] = m.executor.run(g, {"tokens": chunk.astype(np.int32), "positions": pos})[
                "logits"
            ]
            self.tokens.extend(int(t) for t in chunk)
        return out

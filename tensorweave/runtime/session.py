"""A session: one running context over a model's sharded caches, and text generation on top of it.

The caches live on the devices inside the model's executor, split as their layers declare (KV caches by KV head,
sliding-window layers as rings of ``window`` slots, recurrent states whole); a session owns them while it is the
model's active session. Starting another session (or ``model.logits``) takes them over, and the older session then
refuses to run instead of silently reading someone else's cache. ``generate`` samples token by token
(``runtime.sampling``), streams text, stops on EOS, stop strings or the token limit; ``chat`` renders a conversation
with the model's chat template and reuses the cached prefix that the conversation shares with what the session
already holds. ``rewind`` goes back by cache kind: a KV cache in place, a wrapped ring or a recurrent state from a
snapshot (``chat`` takes one per turn) or not at all (``StateError``). ``save`` writes the state (``state()``, data)
to a file that ``Model.restore`` reads on any device count or split (``runtime.state``); a restore checks the whole
state against the model (tokens below the vocabulary, cache shapes, the sampler) before it takes over any cache, so
a bad file leaves the running session as it was.

Threads: each step that reads or changes which session owns the caches (the ownership check, taking over, the
executor run, reading or writing caches) holds ``model.lock``, so sessions of one model used from several threads
see their own caches or a ``StateError``; a generation checks that it still owns the caches before each token it
hands out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SamplingError, ShapeError, StateError
from .sampling import Sampler, SamplingParams, StopStrings, reasoning_tags
from .state import CacheState, SessionState, write

if TYPE_CHECKING:
    from .model import Model

UBATCH = 512  # tokens per step when prefilling: bounds activation memory and the number of traced graph shapes
SNAPSHOTS = 4  # snapshots a session keeps (chat takes one per turn): the latest ones
PARAMS = {f.name for f in fields(SamplingParams)}


@dataclass
class Generation:
    """What ``generate``/``chat`` produced: the text (stop strings removed), the new token ids, why it stopped
    ("eos", "stop", "length", or "context" when the KV cache is full), and timings."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prompt_seconds: float
    gen_seconds: float

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.gen_seconds if self.gen_seconds > 0 else 0.0


class TextStream:
    """Text pieces as they are generated (``for piece in stream``); ``result`` is the Generation once done."""

    def __init__(self, pieces: Iterator[str], result: list[Generation]) -> None:
        self._pieces, self._result = pieces, result

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def result(self) -> Generation:
        if not self._result:
            raise StateError("the generation has not finished: iterate the stream to the end first")
        return self._result[0]

    def collect(self) -> Generation:
        for _ in self._pieces:
            pass
        return self.result


class Session:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.tokens: list[int] = []  # evaluated: their keys/values are in the KV cache
        self.last_logits: np.ndarray | None = None  # logits after the last evaluated token
        self.sampler: Sampler | None = None  # the last generation's sampler (continued by a bare generate())
        self._pending: list[int] = []  # sampled but not evaluated yet (a generation's last token)
        # (tokens, device parts of the caches that cannot rewind in place: rings, recurrent states), oldest first
        self._snapshots: list[tuple[int, dict[str, list[np.ndarray]]]] = []

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def context(self) -> list[int]:
        """Every token of the conversation: evaluated ones and a generation's last, not yet evaluated, token."""
        return self.tokens + self._pending

    def take_over(self) -> None:
        """Make this the model's active session, with empty caches."""
        with self.model.lock:
            self.model.executor.reset_caches()
            self.model.active = self
            self.tokens, self._pending, self.last_logits, self._snapshots = [], [], None, []

    def _check_owner(self, doing: str) -> None:
        """``StateError`` when another session took this one's caches over (call with ``model.lock`` held)."""
        if self.model.active is not self and self.n_past:
            raise StateError(f"cannot {doing}: this session's caches were taken over by a newer session of the model")

    def eval(self, ids: Sequence[int] | np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """Append ``ids`` to the context; returns float32 logits [len(ids), vocab], one row per new token. With
        ``last_only`` only the last evaluated token's row [1, vocab] comes back, and the LM head runs for that row
        alone (what generation does with a prompt). (A generation's last sampled token, if any, is evaluated
        first; its row is not returned.)"""
        m = self.model
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= m.vocab):
            bad = int(ids[(ids < 0) | (ids >= m.vocab)][0])
            raise ShapeError(f"token id {bad} is outside the vocabulary [0, {m.vocab})")
        with m.lock:
            return self._eval_locked(ids, last_only)

    def _eval_locked(self, ids: np.ndarray, last_only: bool) -> np.ndarray:
        m = self.model
        pending, self._pending = self._pending, []
        ids = np.concatenate([np.asarray(pending, np.int64), ids])
        if self.n_past + ids.size > m.config.ctx:
            self._pending = pending
            raise StateError(
                f"context full: {self.n_past} + {ids.size} tokens exceed ctx {m.config.ctx} (load with a larger ctx=)"
            )
        if m.active is not self:
            if self.n_past:
                self._pending = pending
                raise StateError("this session's KV cache was taken over by a newer session of the same model")
            self.take_over()
        out = np.empty((min(ids.size, 1) if last_only else ids.size, m.vocab), np.float32)
        for lo in range(0, ids.size, UBATCH):
            chunk = ids[lo : lo + UBATCH]
            # a graph per (tokens, rows of logits); rows = tokens is the plain graph, shared with decode steps
            g = m.graphs(tokens=chunk.size, n_logits=1) if last_only and chunk.size > 1 else m.graphs(tokens=chunk.size)
            pos = np.arange(self.n_past, self.n_past + chunk.size, dtype=np.int32)
            logits = m.executor.run(g, {"tokens": chunk.astype(np.int32), "positions": pos})["logits"]
            if last_only:
                out[:] = logits[-1:]
            else:
                out[lo : lo + chunk.size] = logits
            self.tokens.extend(int(t) for t in chunk)
        if ids.size:
            self.last_logits = out[-1].copy()
        return out if last_only else out[len(pending) :]

    def flush(self) -> None:
        """Evaluate a generation's last sampled token, so the KV cache holds the whole context."""
        if self._pending:
            self.eval([])

    def rewind(self, n: int) -> None:
        """Keep only the first ``n`` tokens of the context. KV caches go back in place. A sliding-window ring
        that has overwritten positions ``n`` needs, and a recurrent state (it holds the newest position only), go
        back from the latest snapshot (``snapshot``) at or before ``n``, evaluating the tokens from there to ``n``
        again; without one the rewind is refused with ``StateError`` and nothing changes. ``n = 0`` always works."""
        if n >= self.n_past:
            self._pending = self.context[self.n_past : n]
            return
        with self.model.lock:
            if n <= 0:
                self.take_over()
                return
            if self.model.active is not self:
                raise StateError("cannot rewind: this session's caches were taken over by a newer session of the model")
            caches = self.model.caches
            stuck = [t.cache for t in caches.values() if t.cache and not t.cache.can_rewind(t.shape[0], self.n_past, n)]
            snapshots = [s for s in self._snapshots if s[0] <= n]
            if stuck and not snapshots:
                why = {
                    "ring": "a sliding-window layer's ring has already overwritten them",
                    "state": "a recurrent state holds only the newest position",
                }
                kinds = sorted({c.kind for c in stuck})
                raise StateError(
                    f"cannot rewind to {n} tokens: {'; '.join(why[k] for k in kinds)}; and no snapshot was kept at or "
                    f"before {n}"
                )
            self._snapshots, self._pending, self.last_logits = snapshots, [], None
            if not stuck:
                self.tokens = self.tokens[:n]
                return
            at, parts = snapshots[-1]
            self.model.executor.load_cache_parts(parts)
            redo, self.tokens = self.tokens[at:n], self.tokens[:at]
            if redo:
                self.eval(redo, last_only=True)

    def snapshot(self) -> None:
        """Remember the caches that cannot rewind in place (rings, recurrent states) as they are now, so that a
        later ``rewind`` to this length or beyond can start from here. Keeps the latest few; a no-op for a model
        with KV caches only."""
        m = self.model
        with self.model.lock:
            names = [name for name, t in m.caches.items() if t.cache and t.cache.kind != "kv"]
            if not names or m.active is not self:
                return
            kept = [s for s in self._snapshots if s[0] != self.n_past]
            self._snapshots = [*kept, (self.n_past, m.executor.cache_parts(names))][-SNAPSHOTS:]

    # --- generation -------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        max_tokens: int = 256,
        *,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        stream: bool = False,
        add_special: bool | None = None,
        snapshot: bool = False,
        **params: Any,
    ) -> Generation | TextStream:
        """Continue the context with ``prompt`` (text or token ids; None: continue from where it stands) and
        sample up to ``max_tokens`` tokens. Sampling: ``sampling=SamplingParams(...)`` or its fields as keywords
        (``temperature=0.7, top_p=0.9, seed=1, reasoning_budget=64, ...``); with neither, a session that has
        generated before continues its sampler (RNG, penalties, reasoning budget), and a new one is greedy.
        ``stop``: strings that end the generation (not included in the text). ``add_special``: BOS for a text
        prompt (default: only at the start of the context). ``stream=True`` returns a TextStream to iterate.
        ``snapshot``: take a ``snapshot`` just before the prompt's last token, for a later ``rewind`` (as
        ``chat`` does: its next turn, or this turn again, goes back to there)."""
        m, tok = self.model, self.model.tokenizer
        if max_tokens < 0:
            raise SamplingError(f"max_tokens={max_tokens}: must be >= 0")
        if isinstance(prompt, str):
            if tok is None:
                raise StateError(f"{m.checkpoint.path}: the model has no tokenizer; pass token ids instead of text")
            ids = tok.encode(prompt, add_special=not self.context if add_special is None else add_special)
        else:
            ids = [int(t) for t in (prompt or ())]
        if not ids and not self._pending and self.last_logits is None:
            raise StateError("nothing to continue from: give a prompt")
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise SamplingError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(PARAMS))}"
            )
        if sampling is None and (params or self.sampler is None):
            sampling = SamplingParams(**params)
        elif sampling is not None and params:
            sampling = SamplingParams(**{**asdict(sampling), **params})
        if sampling is not None:
            self.sampler = Sampler(sampling, m.vocab, tok, reasoning_tags(m.family, tok))
            self.sampler.prime(self.context + ids)
        elif ids:
            assert self.sampler is not None
            self.sampler.prime(ids)
        result: list[Generation] = []
        text = TextStream(self._generate(ids, max_tokens, stop, ignore_eos, snapshot, result), result)
        return text if stream else text.collect()

    def _generate(
        self,
        ids: list[int],
        max_tokens: int,
        stop: Sequence[str],
        ignore_eos: bool,
        snapshot: bool,
        result: list[Generation],
    ) -> Iterator[str]:
        tok, sampler = self.model.tokenizer, self.sampler
        assert sampler is not None
        t0 = time.perf_counter()
        with self.model.lock:
            self._check_owner("generate")
        if snapshot and len(ids) > 1 and any(t.cache and t.cache.kind != "kv" for t in self.model.caches.values()):
            self.eval(ids[:-1], last_only=True)
            self.snapshot()
            ids_left = ids[-1:]
        else:
            ids_left = ids
        if ids_left or self._pending:
            self.eval(ids_left, last_only=True)
        logits = self.last_logits
        assert logits is not None
        t1 = time.perf_counter()
        eos = set() if ignore_eos or tok is None else set(tok.eos_ids)
        decoder, stops = (tok.decode_stream() if tok else None), StopStrings(stop)
        new: list[int] = []
        pieces: list[str] = []
        finish = "length"
        for i in range(max_tokens):
            if self.n_past >= self.model.config.ctx:  # end cleanly, keeping the text, rather than fail mid-answer
                finish = "context"
                break
            with self.model.lock:  # no token from a session whose caches another one took
                self._check_owner("generate")
            t = sampler.sample(logits)
            if t in eos:
                finish = "eos"
                break
            new.append(t)
            piece, stopped = stops.feed(decoder.step(t) if decoder else "")
            if piece:
                pieces.append(piece)
                yield piece
            if stopped:
                finish = "stop"
                self._pending.append(t)
                break
            if i + 1 < max_tokens:
                logits = self.eval([t])[-1]
            else:
                self._pending.append(t)  # evaluated by whatever comes next (save, another generate)
        if finish != "stop":
            piece = stops.feed(decoder.flush())[0] + stops.flush() if decoder else stops.flush()
            if piece:
                pieces.append(piece)
                yield piece
        t2 = time.perf_counter()
        result.append(Generation("".join(pieces), new, finish, len(ids), t1 - t0, t2 - t1))

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int = 256,
        *,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> Generation | TextStream:
        """Answer the last message of a conversation (``[{"role": "user", "content": ...}, ...]``) rendered with
        the model's chat template. Tokens the conversation shares with this session's context are not evaluated
        again, so calling ``chat`` with a growing conversation costs only the new turns. Other keywords as for
        ``generate``; ``enable_thinking`` reaches templates that have the switch (Qwen3)."""
        ids = self.chat_prompt(messages, enable_thinking)
        common = self.reuse(ids)
        return self.generate(ids[common:], max_tokens, snapshot=True, **kwargs)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], enable_thinking: bool | None = None) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template, ready for the answer."""
        tok = self.model.tokenizer
        if tok is None:
            raise StateError(f"{self.model.checkpoint.path}: the model has no tokenizer for chat")
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **extra), add_special=False)
        if not ids:
            raise ShapeError("the conversation renders to no tokens")
        return list(ids)

    def reuse(self, ids: Sequence[int]) -> int:
        """Rewind to the longest prefix that ``ids`` shares with the context, so that only the rest of ``ids``
        is evaluated; returns its length. The last token of ``ids`` is always left over: its logits start the
        answer. A ring or recurrent state with no snapshot to come back from starts over (returns 0)."""
        ctx = self.context
        common = 0
        while common < min(len(ctx), len(ids) - 1) and ctx[common] == ids[common]:
            common += 1
        try:
            self.rewind(common)
        except StateError:
            self.take_over()
            common = 0
        return common

    # --- state ------------------------------------------------------------------------------------------------

    def save(self, path: str | Path, checksum: bool = True) -> Path:
        """Write this session (``state()``) to ``path``; ``Model.restore`` reads it back on any device count,
        split or backend. ``checksum``: record a sha256 of the data, which restore verifies (a flipped bit is a
        ``StateError``). Every rank of a multi-process group must call it; the rank holding device rank 0 writes
        the file."""
        state = self.state()
        out = Path(path).expanduser()
        if 0 in self.model.executor.ranks:
            write(state, out, checksum)
        return out

    def state(self) -> SessionState:
        """This session as data: tokens, every cache whole along its split axis (a kv or ring cache as the
        positions it holds, a recurrent state whole), the last logits, the sampler. A generation's last sampled
        token is evaluated first. Every rank of a multi-process group must call it (caches are gathered)."""
        m = self.model
        with self.model.lock:
            self.flush()
            if m.active is not self:
                if self.n_past:
                    raise StateError(
                        "cannot save: this session's caches were taken over by a newer session of the model"
                    )
                self.take_over()
            m.executor.ensure_caches(m.graphs(tokens=1))
            caches = {}
            for name, t in m.caches.items():
                assert t.cache is not None
                held = t.cache.positions(t.shape[0], self.n_past)
                if held is None:
                    caches[name] = CacheState(t.cache.kind, m.executor.read_cache(name))
                else:
                    rows = np.arange(held.start, held.stop) % t.shape[0]
                    caches[name] = CacheState(t.cache.kind, m.executor.read_cache(name, rows), held.start)
        ckpt = m.checkpoint
        return SessionState(
            model={"fingerprint": ckpt.fingerprint(), "family": m.family.name, "source": str(ckpt.path)},
            tokens=list(self.tokens),
            caches=caches,
            logits=self.last_logits,
            sampler=self.sampler_state(),
        )

    def load_state(self, state: SessionState, where: str = "state") -> None:
        """Continue from ``state`` (``runtime.state.read``), taking over the model's caches; refused with
        ``StateError`` (naming ``where``), before anything changes, when it belongs to another model or does not
        fit this model's vocabulary, caches, context or sampler: the session that held the caches keeps them."""
        m, n = self.model, len(state.tokens)
        saved, fp = state.model, m.checkpoint.fingerprint()
        if saved.get("fingerprint") != fp:
            raise StateError(
                f"{where}: this state belongs to another model ({saved.get('family')} from {saved.get('source')}, "
                f"fingerprint {saved.get('fingerprint')}); the loaded model is {m.family.name} from "
                f"{m.checkpoint.path} ({fp})"
            )
        if n > m.config.ctx:
            raise StateError(
                f"{where}: the state holds {n} tokens but the model's context is {m.config.ctx} (load with a "
                f"larger ctx=)"
            )
        bad = next((t for t in state.tokens if not 0 <= t < m.vocab), None)
        if bad is not None:
            raise StateError(f"{where}: token id {bad} is outside this model's vocabulary [0, {m.vocab})")
        if state.logits is not None and state.logits.shape != (m.vocab,):
            raise StateError(f"{where}: the saved logits {state.logits.shape} do not fit the vocabulary {m.vocab}")
        sampler = self._sampler_from(state.sampler, where)
        caches = m.caches
        if set(state.caches) != set(caches):
            raise StateError(f"{where}: the state's caches do not match this model's layers")
        writes: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        for name, t in caches.items():
            c, spec = state.caches[name], t.cache
            assert spec is not None
            held = spec.positions(t.shape[0], n)
            shape = tuple(c.values.shape)
            if held is None:  # a recurrent state: whole
                if c.kind != "state" or shape != t.shape:
                    raise StateError(
                        f"{where}: cache {name!r} is a {c.kind or 'kv'} cache {shape}; this model's is a state "
                        f"{t.shape}"
                    )
                writes.append((name, np.asarray(c.values, t.dtype), None))
                continue
            # kv and ring caches hold positions: this model's needs `held`, from the saved rows (first..n-1)
            if c.kind not in (None, "kv", "ring") or shape != (n - c.first, *t.shape[1:]) or held.start < c.first:
                raise StateError(
                    f"{where}: cache {name!r} holds {shape} ({c.kind or 'kv/ring'}, positions {c.first}..{n - 1}); "
                    f"this model's {spec.kind} cache {t.shape} needs positions {held.start}..{n - 1}"
                )
            values = np.asarray(c.values[held.start - c.first :], t.dtype)
            writes.append((name, values, np.arange(held.start, n) % t.shape[0]))
        with m.lock:  # everything is checked: only now take the caches over
            m.executor.ensure_caches(m.graphs(tokens=1))
            self.take_over()
            for name, values, rows in writes:
                if rows is None or rows.size:
                    m.executor.write_cache(name, values, rows)
            self.tokens = list(state.tokens)
            self.last_logits = None if state.logits is None else np.array(state.logits, np.float32)
            self.sampler = sampler

    def sampler_state(self) -> dict[str, Any] | None:
        if self.sampler is None:
            return None
        return {"params": asdict(self.sampler.params), "state": self.sampler.state_dict()}

    def load_sampler_state(self, state: Mapping[str, Any] | None) -> None:
        self.sampler = self._sampler_from(state, "sampler state")

    def _sampler_from(self, state: Mapping[str, Any] | None, where: str) -> Sampler | None:
        """The sampler ``sampler_state()`` described, checked against this model (``StateError`` otherwise)."""
        if not state:
            return None
        m = self.model
        try:
            params = SamplingParams(**state["params"])
            sampler = Sampler(params, m.vocab, m.tokenizer, reasoning_tags(m.family, m.tokenizer))
            sampler.load_state_dict(dict(state["state"]))
        except StateError as e:
            raise StateError(f"{where}: {e}") from None
        except (SamplingError, KeyError, TypeError, ValueError) as e:
            raise StateError(f"{where}: the sampler state is malformed ({type(e).__name__}: {e})") from None
        return sampler

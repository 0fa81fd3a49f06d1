"""Token sampling: llama.cpp's sampler chain, the reasoning-budget sampler, and stop strings over streamed text.

The chain, in llama.cpp's default order (``common_params_sampling.samplers``, the stages tensorweave has)::

    reasoning forcing -> penalties -> top_k -> top_p -> min_p -> temperature -> dist

- **reasoning forcing** comes first and overrides everything: while the reasoning budget is forcing its closing
  tokens, the next forced token is returned whatever the logits and parameters (no RNG is drawn).
- **penalties** look at the last ``repeat_last_n`` accepted tokens (prompt included, like llama.cpp): a token seen
  there gets ``logit / repeat_penalty`` when its logit is positive, ``logit * repeat_penalty`` otherwise (CTRL),
  then ``- count * frequency_penalty - presence_penalty`` (OpenAI).
- **greedy** (``temperature <= 0``): the argmax of the penalized logits, lowest id on ties. It consumes no RNG, so
  a greedy step inside a seeded run leaves the rest of the run unchanged. The filters below cannot change the
  argmax, so they are skipped.
- **top_k** keeps the k highest logits (lowest ids first among equal logits at the boundary).
- **top_p** keeps the smallest prefix of the tokens sorted by probability (at temperature 1, as llama.cpp) whose
  cumulative probability reaches ``top_p``; **min_p** keeps tokens with ``p >= min_p * p_max``.
- **temperature** divides what is left by T; **dist** draws one token from its softmax with one uniform double
  from ``numpy.random.Generator(PCG64(seed))`` (inverse CDF over the kept tokens in id order).

Everything runs in float64 on a copy of the caller's logits; logits may hold ``-inf`` (masked tokens), not NaN or
``+inf``.

The reasoning budget (llama.cpp ``--reasoning-budget``; see REFERENCES.md) is a small state machine over the
accepted tokens::

    IDLE --start tag--> COUNTING --budget spent--> [WAITING_UTF8] --> FORCING --forced end tag--> DONE
                           |                              |
                           +--------- natural end tag ----+------------------------------------> DONE

COUNTING starts when the tail of the accepted tokens is the start tag's tokens, or when ``prime`` sees a prompt
that opened thinking and did not close it. Each token accepted while COUNTING spends one from the budget; once the
budget is ``<= 0`` the sampler forces the tokens of ``reasoning_budget_message + end_tag`` one by one. If the budget
runs out in the middle of a UTF-8 character (a byte-fallback or byte-level token holding part of it), it waits
(WAITING_UTF8) until the text decodes to whole characters, so the forced message never splits a character; a
character has at most 4 bytes, so the wait lasts at most 3 tokens. ``-1`` never forces; ``0`` closes right after
the start tag. DONE lasts until the next ``prime``. Tags are matched as token sequences, so a tag the model spells
with other tokens than ``tokenizer.encode(tag)`` is not seen (in the Qwen3 and Gemma 4 vocabularies the tags are
special tokens, which the model can only spell one way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SamplingError, ShapeError, StateError

if TYPE_CHECKING:
    from ..core.model import ModelFamily
    from ..loaders.tokenizer import Tokenizer

__all__ = ["Sampler", "SamplingParams", "StopStrings", "prefix_overlap", "reasoning_tags"]

# Reasoning states (strings: they go into state_dict as they are).
IDLE, COUNTING, WAITING_UTF8, FORCING, DONE = "idle", "counting", "waiting_utf8", "forcing", "done"
_STATES = (IDLE, COUNTING, WAITING_UTF8, FORCING, DONE)

# A UTF-8 character has at most 4 bytes and every token holds at least one, so the character the budget ran out
# in is complete after at most 3 more tokens; past that the text is not valid UTF-8 and waiting would never end.
_UTF8_MAX_WAIT = 3

# The first pool of best candidates top_p sorts (see _top_p).
_TOP_P_POOL = 1024

_STATE_FORMAT = "tensorweave.sampler/1"

THINK_TAGS = ("<think>", "</think>")
GEMMA4_TAGS = ("<|channel>thought", "<channel|>")
# For a family that declares no tags: tags whose opening and closing tokens are in the vocabulary (DeepSeek-R1
# distills of Llama, for one, keep the llama family but think in <think> ... </think>).
_VOCAB_TAGS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (THINK_TAGS, THINK_TAGS),
    (GEMMA4_TAGS, ("<|channel>", "<channel|>")),
)


def reasoning_tags(family: ModelFamily, tokenizer: Tokenizer | None) -> tuple[str, str] | None:
    """Thinking start/end tags: the family's own (``ModelFamily.reasoning_tags``), or else tags found in the
    tokenizer's vocabulary; None when the model has none."""
    if family.reasoning_tags is not None:
        return family.reasoning_tags
    if tokenizer is not None:
        for tags, tokens in _VOCAB_TAGS:
            if all(tokenizer.token_to_id(t) is not None for t in tokens):
                return tags
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; the defaults are greedy decoding with no penalties and no reasoning budget."""

    temperature: float = 0.0  # <= 0: greedy (argmax); ties -> lowest id
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off (llama.cpp semantics: keep p >= min_p * p_max)
    repeat_penalty: float = 1.0  # llama.cpp/CTRL style: logit>0 -> /penalty, else *penalty, over the last n
    repeat_last_n: int = 64  # tokens of history the penalties look at (-1: all, 0: off)
    presence_penalty: float = 0.0  # OpenAI style: - presence * (count>0)
    frequency_penalty: float = 0.0  # - frequency * count
    seed: int | None = None  # same seed -> same tokens; None: fresh entropy
    reasoning_budget: int = -1  # -1 unlimited, 0 close thinking immediately, N: N counted tokens
    reasoning_budget_message: str = ""  # forced before the end tag when the budget runs out

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool, str], ...] = (
            ("temperature", _is_real(self.temperature), "must be a finite number (<= 0 means greedy)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "must be an integer >= 0 (0: off)"),
            ("top_p", _is_real(self.top_p) and 0 <= self.top_p <= 1, "must be in [0, 1] (1: off)"),
            ("min_p", _is_real(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1] (0: off)"),
            ("repeat_penalty", _is_real(self.repeat_penalty) and self.repeat_penalty > 0, "must be > 0 (1: off)"),
            ("repeat_last_n", _is_int(self.repeat_last_n) and self.repeat_last_n >= -1, "must be >= -1 (-1: all)"),
            ("presence_penalty", _is_real(self.presence_penalty), "must be a finite number"),
            ("frequency_penalty", _is_real(self.frequency_penalty), "must be a finite number"),
            ("seed", self.seed is None or (_is_int(self.seed) and self.seed >= 0), "must be an integer >= 0 or None"),
            ("reasoning_budget", _is_int(self.reasoning_budget) and self.reasoning_budget >= -1, "must be >= -1"),
            ("reasoning_budget_message", isinstance(self.reasoning_budget_message, str), "must be a string"),
        )
        for name, ok, want in checks:
            if not ok:
                raise SamplingError(f"sampling parameter {name}={getattr(self, name)!r}: {want}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """Picks tokens from logits for one generation: the chain of the module docstring plus its state (RNG, the
    token history the penalties read, the reasoning budget), which ``state_dict`` captures for save/restore."""

    def __init__(
        self,
        params: SamplingParams,
        vocab: int,
        tokenizer: Tokenizer | None = None,
        reasoning_tags: tuple[str, str] | None = None,
    ) -> None:
        if not _is_int(vocab) or vocab <= 0:
            raise SamplingError(f"vocab={vocab!r}: must be a positive number of tokens")
        self.params = params
        self.vocab = int(vocab)
        self.tokenizer = tokenizer
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._history: list[int] = []
        # Reasoning budget: tag token sequences, the forced closing tokens, and where the state machine stands.
        self._start: tuple[int, ...] = ()
        self._end: tuple[int, ...] = ()
        self._forced: tuple[int, ...] = ()
        self._state = IDLE
        self._remaining = 0  # budget left while COUNTING (may go below 0 while WAITING_UTF8)
        self._force_pos = 0  # next index into _forced while FORCING
        self._utf8_wait = 0  # tokens accepted while WAITING_UTF8
        if reasoning_tags is not None:
            if tokenizer is None:
                raise SamplingError(f"reasoning_tags={reasoning_tags!r} need a tokenizer to turn them into tokens")
            start, end = reasoning_tags
            self._start = self._tag_tokens(start, "reasoning start tag")
            self._end = self._tag_tokens(end, "reasoning end tag")
            self._forced = self._tokens(params.reasoning_budget_message + end, "reasoning_budget_message + end tag")

    def _tokens(self, text: str, what: str) -> tuple[int, ...]:
        assert self.tokenizer is not None
        ids = tuple(self.tokenizer.encode(text, add_special=False))
        if not ids:
            raise SamplingError(f"{what} {text!r} is empty: it has no tokens")
        if max(ids) >= self.vocab:
            raise SamplingError(f"{what} {text!r} has token id {max(ids)} outside the model's vocabulary {self.vocab}")
        return ids

    def _tag_tokens(self, tag: str, what: str) -> tuple[int, ...]:
        # A SentencePiece tokenizer puts a word-start token ("▁") in front of text that does not start with a
        # space; inside generated text the model writes the tag without it, so it is not part of the tag.
        assert self.tokenizer is not None
        ids = self._tokens(tag, what)
        while len(ids) > 1 and self.tokenizer.decode(ids[1:]) == tag:
            ids = ids[1:]
        return ids

    # --- feeding tokens -----------------------------------------------------------------------------------

    @property
    def history(self) -> list[int]:
        """Every token primed or accepted so far (a copy)."""
        return list(self._history)

    @property
    def reasoning_state(self) -> str:
        """Where the reasoning budget stands: "idle", "counting", "waiting_utf8", "forcing" or "done" (always
        "idle" without reasoning tags)."""
        return self._state

    def prime(self, prompt_ids: Sequence[int]) -> None:
        """Feed the prompt (history for penalties; if the prompt opened thinking and did not close it,
        the reasoning budget starts COUNTING).

        A prime starts a new generation for the reasoning budget: its state is recomputed from this prompt alone
        (a previous turn's DONE does not carry over). The history keeps growing: penalties see earlier turns too.
        """
        ids = [self._check_token(t) for t in prompt_ids]
        self._history.extend(ids)
        self._state, self._force_pos, self._utf8_wait = IDLE, 0, 0
        if self._start and _last_end(ids, self._start) > _last_end(ids, self._end):
            self._begin_counting()

    def accept(self, token: int) -> None:
        """Add a token to the history and advance the reasoning state; ``sample`` calls it with what it picked,
        and a caller feeds forced or externally chosen tokens through it."""
        self._history.append(self._check_token(token))
        if not self._start:
            return
        if self._state == FORCING:
            # A token other than the expected one (fed from outside) does not advance the forced sequence.
            if token == self._forced[self._force_pos]:
                self._force_pos += 1
            if self._force_pos == len(self._forced) or self._ends_with(self._end):
                self._state = DONE
        elif self._state in (COUNTING, WAITING_UTF8) and self._ends_with(self._end):
            self._state = DONE
        elif self._state == IDLE:
            if self._ends_with(self._start):
                self._begin_counting()
        elif self._state == COUNTING:
            self._remaining -= 1
            self._check_budget()
        elif self._state == WAITING_UTF8:
            self._remaining -= 1
            self._utf8_wait += 1
            if self._utf8_wait >= _UTF8_MAX_WAIT or self._utf8_complete():
                self._state, self._force_pos = FORCING, 0

    def _check_token(self, token: Any) -> int:
        if not _is_int(token) or not 0 <= token < self.vocab:
            raise ShapeError(f"token id {token!r} is outside the vocabulary [0, {self.vocab})")
        return int(token)

    def _begin_counting(self) -> None:
        self._state, self._remaining = COUNTING, self.params.reasoning_budget
        self._check_budget()

    def _check_budget(self) -> None:
        if self.params.reasoning_budget < 0 or self._remaining > 0:
            return
        if self._utf8_complete():
            self._state, self._force_pos = FORCING, 0
        else:
            self._state, self._utf8_wait = WAITING_UTF8, 0

    def _ends_with(self, tokens: tuple[int, ...]) -> bool:
        n = len(tokens)
        return len(self._history) >= n and tuple(self._history[-n:]) == tokens

    def _utf8_complete(self) -> bool:
        # The same test DecodeStream uses to hold text back: an unfinished character decodes as U+FFFD at the end.
        # The last 4 tokens hold every byte of an unfinished character (at most 3 bytes, at least 1 per token).
        assert self.tokenizer is not None
        return not self.tokenizer.decode(self._history[-4:]).endswith("\ufffd")

    # --- sampling -----------------------------------------------------------------------------------------

    def sample(self, logits: np.ndarray) -> int:
        """One token from float logits [vocab] (does not modify the caller's array); also accepts it
        (history, penalties, reasoning state)."""
        choice = self._choose(logits)
        if isinstance(choice, int):
            token = choice
        else:
            ids, probs = choice
            cdf = np.cumsum(probs)
            at = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
            token = int(ids[min(at, ids.size - 1)])
        self.accept(token)
        return token

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution [vocab] (float64) the next ``sample(logits)`` draws from; changes no state.

        One-hot for greedy decoding and while the reasoning budget forces a token.
        """
        choice = self._choose(logits)
        out = np.zeros(self.vocab)
        if isinstance(choice, int):
            out[choice] = 1.0
        else:
            out[choice[0]] = choice[1]
        return out

    def _choose(self, logits: np.ndarray) -> int | tuple[np.ndarray, np.ndarray]:
        """The token when chance plays no part (forced, greedy), else (kept ids ascending, their probabilities)."""
        x = self._penalized(logits)  # validates the logits even when a token is forced
        if self._state == FORCING:
            return self._forced[self._force_pos]
        if self.params.greedy:
            return int(np.argmax(x))  # the first maximum: lowest id on ties
        return self._distribution(x)

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        """A float64 copy of ``logits`` with the repetition penalties applied."""
        x = np.array(logits, dtype=np.float64)  # always a copy
        if x.shape != (self.vocab,):
            raise ShapeError(f"logits of shape {x.shape}: expected ({self.vocab},), one per token of the vocabulary")
        if not np.isfinite(x).all():  # the common case is one cheap pass; -inf (masked tokens) is allowed
            if np.isnan(x).any() or np.isposinf(x).any():
                raise SamplingError("logits contain NaN or +inf: the model's output is broken (check weights/dtype)")
            if x.max() == -np.inf:
                raise SamplingError("every logit is -inf: no token can be sampled")
        p = self.params
        n = p.repeat_last_n
        if (
            n == 0
            or not self._history
            or (p.repeat_penalty == 1 and not p.presence_penalty and not p.frequency_penalty)
        ):
            return x
        window = self._history if n < 0 else self._history[-n:]
        ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        v = x[ids]
        if p.repeat_penalty != 1:
            v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        x[ids] = v - counts * p.frequency_penalty - p.presence_penalty
        return x

    def _distribution(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """top_k -> top_p -> min_p -> temperature over penalized logits: (kept ids ascending, their probs)."""
        p = self.params
        finite = x > -np.inf
        ids = np.arange(x.size) if finite.all() else np.flatnonzero(finite)
        vals = x if ids.size == x.size else x[ids]
        if 0 < p.top_k < ids.size:
            kth = np.partition(vals, ids.size - p.top_k)[ids.size - p.top_k]
            keep = vals > kth
            ties = np.flatnonzero(vals == kth)[: p.top_k - int(keep.sum())]  # ids ascend: lowest ids win ties
            keep[ties] = True
            ids, vals = ids[keep], vals[keep]
        if p.top_p < 1:
            ids, vals = _top_p(ids, vals, p.top_p)
        if p.min_p > 0:
            keep = np.exp(vals - vals.max()) >= p.min_p  # p / p_max >= min_p
            ids, vals = ids[keep], vals[keep]
        z = vals / p.temperature
        e = np.exp(z - z.max())
        return ids, e / e.sum()

    # --- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable: RNG state, history, reasoning state..."""
        return {
            "format": _STATE_FORMAT,
            "vocab": self.vocab,
            "params": asdict(self.params),  # for the record; load_state_dict keeps the sampler's own params
            "rng": self._rng.bit_generator.state,
            "history": list(self._history),
            "reasoning": {
                "state": self._state,
                "remaining": self._remaining,
                "force_pos": self._force_pos,
                "utf8_wait": self._utf8_wait,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After restore, sampling continues identically (given the same params and tokenizer)."""
        try:
            if state["format"] != _STATE_FORMAT:
                raise StateError(f"sampler state format {state['format']!r}: expected {_STATE_FORMAT!r}")
            if state["vocab"] != self.vocab:
                raise StateError(f"sampler state is for a vocabulary of {state['vocab']}, this model has {self.vocab}")
            history = [self._check_token(t) for t in state["history"]]
            r = state["reasoning"]
            if r["state"] not in _STATES or (r["state"] != IDLE and not self._start):
                raise StateError(f"sampler state: reasoning state {r['state']!r} does not fit this sampler's tags")
            if r["state"] == FORCING and not 0 <= r["force_pos"] < len(self._forced):
                raise StateError("sampler state: the forced reasoning tokens differ from this sampler's")
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = state["rng"]
            remaining, force_pos, utf8_wait = int(r["remaining"]), int(r["force_pos"]), int(r["utf8_wait"])
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, ShapeError) as e:
            raise StateError(f"sampler state is malformed: {type(e).__name__}: {e}") from e
        self._rng, self._history = rng, history
        self._state, self._remaining, self._force_pos, self._utf8_wait = r["state"], remaining, force_pos, utf8_wait


def _top_p(ids: np.ndarray, vals: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most probable tokens whose probability reaches top_p (at least one)."""
    e = np.exp(vals - vals.max())
    total = e.sum()
    n = vals.size
    # Sort only the best candidates when they already hold top_p of the mass: most steps, since a sort of a
    # 150k vocabulary costs ~10-50 ms and a partition ~1. The pool grows 16x until it does.
    size = _TOP_P_POOL
    while size < n:
        kth = np.partition(vals, n - size)[n - size]
        pool = np.flatnonzero(vals >= kth)  # ties with the size-th best included, so ties still break by id
        if e[pool].sum() >= top_p * total:
            break
        size *= 16
    else:
        pool = np.arange(n)
    order = pool[np.argsort(-vals[pool], kind="stable")]  # most probable first; pool ascends, so lower id first
    cum = np.cumsum(e[order]) / total
    cut = min(int(np.searchsorted(cum, top_p, side="left")), order.size - 1)
    keep = np.sort(order[: cut + 1])
    return ids[keep], vals[keep]


def _last_end(ids: Sequence[int], tag: tuple[int, ...]) -> int:
    """One past the last occurrence of ``tag`` in ``ids``, -1 when it does not occur."""
    n = len(tag)
    for end in range(len(ids), n - 1, -1):
        if tuple(ids[end - n : end]) == tag:
            return end
    return -1


class StopStrings:
    """Stop strings over streamed text: feed(piece) -> (text safe to emit now, stopped: bool). Text that might be
    the start of a stop string is held back until it is known not to be; the stop string itself is never
    emitted; flush() returns what is held back at the end.

    When several stop strings complete in the same text, the one that starts first wins. After a stop, feed
    returns ("", True) and flush() "".
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise SamplingError(f"stop strings must be a list of strings, not the string {stops!r}")
        self.stops = tuple(stops)
        for s in self.stops:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop string {s!r}: must be a non-empty string")
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return text[: min(hits)], True
        hold = max((prefix_overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def prefix_overlap(text: str, stop: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0

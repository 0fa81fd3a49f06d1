"""tensorweave.runtime.sampling: the sampler chain against plain float64 references, seeds and saved state, the
reasoning budget driven by a scripted model over the real fixture tokenizers, and stop strings over streamed text.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorweave.core.model import ModelFamily
from tensorweave.core.plugins import registry
from tensorweave.errors import SamplingError, ShapeError, StateError, TensorweaveError
from tensorweave.loaders.tokenizer import Tokenizer
from tensorweave.runtime.sampling import (
    COUNTING,
    DONE,
    FORCING,
    IDLE,
    WAITING_UTF8,
    Sampler,
    SamplingParams,
    StopStrings,
    reasoning_tags,
)

FIXTURES = Path(__file__).parent / "fixtures" / "models"
QWEN = Tokenizer.from_hf_dir(FIXTURES / "qwen3" / "hf")  # byte-level BPE; <think> </think> are special tokens
LLAMA = Tokenizer.from_hf_dir(FIXTURES / "llama" / "hf")  # SentencePiece BPE with <0xNN> byte fallback
THINK = ("<think>", "</think>")
Q_START, Q_END = QWEN.token_to_id("<think>"), QWEN.token_to_id("</think>")
Q_WORDS = [QWEN.token_to_id(t) for t in ("he", "in", "al", "it", "ro", "en", "on", "at")]  # ordinary tokens
MESSAGE = "Budget spent."


# --- independent references (plain Python loops) ------------------------------------------------------------


def reference_probs(logits: Sequence[float], history: Sequence[int], p: SamplingParams) -> list[float]:
    """The distribution llama.cpp's chain gives, written step by step over Python floats."""
    x = [float(v) for v in logits]
    n = p.repeat_last_n
    window = [] if n == 0 else list(history) if n < 0 else list(history)[max(0, len(history) - n) :]
    counts: dict[int, int] = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        x[t] = x[t] / p.repeat_penalty if x[t] > 0 else x[t] * p.repeat_penalty
        x[t] -= c * p.frequency_penalty + p.presence_penalty
    out = [0.0] * len(x)
    if p.temperature <= 0:
        best = 0
        for i in range(len(x)):
            if x[i] > x[best]:
                best = i
        out[best] = 1.0
        return out
    ranked = sorted((i for i in range(len(x)) if x[i] != -math.inf), key=lambda i: (-x[i], i))
    if p.top_k > 0:
        ranked = ranked[: p.top_k]
    if p.top_p < 1:
        weights = [math.exp(x[i] - x[ranked[0]]) for i in ranked]
        total, cum, kept = sum(weights), 0.0, []
        for i, w in zip(ranked, weights, strict=True):
            kept.append(i)
            cum += w / total
            if cum >= p.top_p:
                break
        ranked = kept
    if p.min_p > 0:
        weights = [math.exp(x[i] - x[ranked[0]]) for i in ranked]
        p_max = max(weights)
        ranked = [i for i, w in zip(ranked, weights, strict=True) if w >= p.min_p * p_max]
    weights = [math.exp((x[i] - x[ranked[0]]) / p.temperature) for i in ranked]
    total = sum(weights)
    for i, w in zip(ranked, weights, strict=True):
        out[i] = w / total
    return out


def rounded_logits(vocab: int, seed: int, masked: int = 0) -> np.ndarray:
    """Random logits rounded to quarters, so equal logits (ties at filter boundaries) are common."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0, 2, vocab) * 4) / 4
    x[rng.choice(vocab, masked, replace=False)] = -np.inf
    return x.astype(np.float32)


# --- the chain ----------------------------------------------------------------------------------------------

CHAINS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, top_p=0.0),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=1.0, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
    SamplingParams(temperature=1.0, repeat_penalty=0.8, repeat_last_n=-1, frequency_penalty=-0.5),
    SamplingParams(
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repeat_penalty=1.2,
        repeat_last_n=8,
        presence_penalty=0.3,
        frequency_penalty=0.1,
    ),
    SamplingParams(temperature=0.0, repeat_penalty=1.5, frequency_penalty=1.0),
]


@pytest.mark.parametrize("vocab", [64, 3000])
@pytest.mark.parametrize("params", CHAINS, ids=lambda p: f"T{p.temperature}k{p.top_k}p{p.top_p}m{p.min_p}")
def test_chain_matches_reference(params: SamplingParams, vocab: int) -> None:
    history = [int(t) for t in np.random.default_rng(1).integers(0, 12, 30)]  # repeats in the first ids
    for seed in range(3):
        logits = rounded_logits(vocab, seed, masked=vocab // 8)
        sampler = Sampler(params, vocab)
        sampler.prime(history)
        before = logits.copy()
        np.testing.assert_allclose(sampler.probs(logits), reference_probs(logits, history, params), atol=1e-12)
        sampler.sample(logits)
        np.testing.assert_array_equal(logits, before)  # the caller's array is untouched


@pytest.mark.parametrize("top_p", [0.5, 0.99, 0.999])
def test_top_p_over_a_large_vocabulary(top_p: float) -> None:
    # The 1024 best candidates hold 64% of this distribution, the 16384 best 99.8%: each top_p here is reached
    # in another of the pools top_p sorts (1024, 16384, all).
    logits = np.random.default_rng(7).normal(0, 2, 20000)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    np.testing.assert_allclose(Sampler(params, 20000).probs(logits), reference_probs(logits, [], params), atol=1e-12)


def test_filter_boundaries_are_inclusive() -> None:
    # top_p stops at the token whose cumulative probability reaches p exactly (0.25 + 0.25 = 0.5), lowest ids
    # first among equals; min_p keeps p == min_p * p_max.
    flat = Sampler(SamplingParams(temperature=1.0, top_p=0.5), 4).probs(np.zeros(4))
    np.testing.assert_array_equal(flat, [0.5, 0.5, 0.0, 0.0])
    tied = Sampler(SamplingParams(temperature=1.0, min_p=1.0), 4).probs(np.array([1.0, 3.0, 3.0, 2.0]))
    np.testing.assert_array_equal(tied, [0.0, 0.5, 0.5, 0.0])


def test_greedy_takes_the_lowest_id_on_ties_and_draws_no_rng() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, seed=5), 5)
    rng_before = json.dumps(sampler.state_dict()["rng"])
    assert sampler.sample(np.array([1.0, 3.0, 0.0, 3.0, 3.0])) == 1
    assert json.dumps(sampler.state_dict()["rng"]) == rng_before


def test_penalty_changes_the_greedy_choice() -> None:
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=2)
    sampler = Sampler(params, 4)
    sampler.prime([1, 3, 0])  # the window of 2 sees 3 and 0, not 1
    assert sampler.sample(np.array([-1.0, 2.0, 0.0, 3.0])) == 1  # 3 / 2 = 1.5 < 2
    assert sampler.sample(np.array([3.0, 1.0, 0.0, 2.0])) == 3  # window [0, 1]: 3 / 2 = 1.5 < 2
    assert sampler.sample(np.array([-1.0, -0.5, -0.6, -0.4])) == 2  # window [1, 3]: negatives * 2 = -1, -0.8


def test_draws_follow_the_distribution() -> None:
    logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -3.0, 0.9])
    params = SamplingParams(temperature=0.8, top_k=6, seed=11)
    sampler = Sampler(params, logits.size)
    expected = np.array(reference_probs(logits, [], params))
    draws = 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(draws)], minlength=logits.size)
    assert counts[5] == 0  # cut by top_k
    kept = expected > 0
    chi2 = float((((counts - draws * expected) ** 2)[kept] / (draws * expected[kept])).sum())
    assert chi2 < 20.52  # chi-square, 5 degrees of freedom, p = 0.001


def test_seeds() -> None:
    logits = np.zeros(1000)

    def run(seed: int | None) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), logits.size)
        return [sampler.sample(logits) for _ in range(20)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert run(None) != run(None)


def test_state_dict_round_trip_continues_identically() -> None:
    # Random logits with penalties, through a prompt that opened thinking: the snapshots fall while counting,
    # while forcing the message and after it.
    params = SamplingParams(
        temperature=0.9, top_k=50, repeat_penalty=1.1, seed=2, reasoning_budget=3, reasoning_budget_message=MESSAGE
    )
    steps = [np.random.default_rng(s).normal(0, 3, QWEN.vocab_size) for s in range(30)]
    prompt = QWEN.encode("<|im_start|>assistant\n<think>\n")
    sampler = Sampler(params, QWEN.vocab_size, QWEN, THINK)
    sampler.prime(prompt)
    snapshots, tokens, states = [], [], []
    for logits in steps:
        snapshots.append(json.dumps(sampler.state_dict()))
        tokens.append(sampler.sample(logits))
        states.append(sampler.reasoning_state)
    assert {COUNTING, FORCING, DONE} <= set(states)
    for k in (0, 2, 4, 7, 20):
        restored = Sampler(replace(params, seed=None), QWEN.vocab_size, QWEN, THINK)  # the state brings the RNG
        restored.load_state_dict(json.loads(snapshots[k]))
        assert [restored.sample(logits) for logits in steps[k:]] == tokens[k:]


def test_load_state_dict_refuses_foreign_state() -> None:
    state = Sampler(SamplingParams(), 10).state_dict()
    with pytest.raises(StateError, match="vocabulary of 10"):
        Sampler(SamplingParams(), 11).load_state_dict(state)
    with pytest.raises(StateError, match="malformed"):
        Sampler(SamplingParams(), 10).load_state_dict({**state, "history": [99]})
    with pytest.raises(StateError, match="tags"):
        Sampler(SamplingParams(), 10).load_state_dict({**state, "reasoning": {**state["reasoning"], "state": DONE}})


# --- the reasoning budget -----------------------------------------------------------------------------------


class ScriptedModel:
    """Logits that make ``script[step]`` (then ``filler[step]``) the overwhelming choice at every step.

    ``banned`` ids get -inf: the model never wants them (a thinking end tag it would never write itself).
    """

    def __init__(self, vocab: int, script: Sequence[int], banned: Sequence[int] = ()) -> None:
        self.vocab, self.script, self.banned = vocab, list(script), list(banned)

    def preferred(self, step: int) -> int:
        return self.script[step] if step < len(self.script) else Q_WORDS[step % len(Q_WORDS)]

    def logits(self, step: int) -> np.ndarray:
        x = np.zeros(self.vocab, np.float32)
        x[self.banned] = -np.inf
        x[self.preferred(step)] = 60.0  # every other token together: < 1e-20
        return x


def drive(sampler: Sampler, model: ScriptedModel, prompt: Sequence[int], steps: int) -> tuple[list[int], list[str]]:
    sampler.prime(prompt)
    tokens, states = [], []
    for step in range(steps):
        tokens.append(sampler.sample(model.logits(step)))
        states.append(sampler.reasoning_state)
    return tokens, states


def qwen_sampler(budget: int, **kw: Any) -> Sampler:
    params = SamplingParams(temperature=1.0, seed=0, reasoning_budget=budget, reasoning_budget_message=MESSAGE, **kw)
    return Sampler(params, QWEN.vocab_size, QWEN, THINK)


FORCED = QWEN.encode(MESSAGE + "</think>", add_special=False)


@pytest.mark.parametrize("budget", [0, 1, 4, 7])
def test_budget_forces_the_end_tag_after_n_tokens(budget: int) -> None:
    model = ScriptedModel(QWEN.vocab_size, [Q_START], banned=[Q_END])
    tokens, states = drive(qwen_sampler(budget), model, QWEN.encode("Hi"), 1 + budget + len(FORCED) + 4)
    thinking = [model.preferred(s) for s in range(1, 1 + budget)]
    assert tokens[: 1 + budget] == [Q_START, *thinking]
    assert tokens[1 + budget : 1 + budget + len(FORCED)] == FORCED  # the message first, the end tag last
    assert FORCED[-1] == Q_END
    # states[i] is the state after token i: the budget is spent by token `budget` (the start tag when 0)
    assert states[:budget] == [COUNTING] * budget
    assert states[budget : budget + 1 + len(FORCED)] == [FORCING] * len(FORCED) + [DONE]
    after = range(1 + budget + len(FORCED), len(tokens))
    assert [tokens[s] for s in after] == [model.preferred(s) for s in after]  # normal sampling again
    assert states[-1] == DONE


def test_unlimited_budget_never_forces() -> None:
    model = ScriptedModel(QWEN.vocab_size, [Q_START], banned=[Q_END])
    tokens, states = drive(qwen_sampler(-1), model, [], 40)
    assert tokens == [model.preferred(s) for s in range(40)]
    assert set(states) == {COUNTING}


def test_natural_end_tag_before_the_budget() -> None:
    script = [Q_START, *Q_WORDS[:3], Q_END, *Q_WORDS[3:]]
    model = ScriptedModel(QWEN.vocab_size, script)
    tokens, states = drive(qwen_sampler(7), model, [], 20)
    assert tokens == [model.preferred(s) for s in range(20)]
    assert states[:4] == [COUNTING] * 4 and set(states[4:]) == {DONE}
    assert Q_END not in tokens[5:]  # no forcing later either


def test_thinking_opened_by_the_prompt_counts_from_the_first_token() -> None:
    model = ScriptedModel(QWEN.vocab_size, [], banned=[Q_END])
    prompt = QWEN.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    tokens, _ = drive(qwen_sampler(3), model, prompt, 3 + len(FORCED))
    assert tokens == [model.preferred(s) for s in range(3)] + FORCED
    closed = QWEN.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off: nothing to count
    tokens, states = drive(qwen_sampler(3), model, closed, 10)
    assert tokens == [model.preferred(s) for s in range(10)] and set(states) == {IDLE}


def test_forced_tokens_win_over_any_sampling_params() -> None:
    model = ScriptedModel(QWEN.vocab_size, [Q_START], banned=[*FORCED])  # -inf for every forced token
    sampler = qwen_sampler(2, top_k=1, min_p=0.5, repeat_penalty=2.0)
    tokens, _ = drive(sampler, model, [], 3 + len(FORCED))
    assert tokens[3:] == FORCED


# "—" (U+2014) is three byte-fallback tokens in the llama fixture: <0xE2> <0x80> <0x94>.
L_DASH = [LLAMA.token_to_id(t) for t in ("<0xE2>", "<0x80>", "<0x94>")]
L_WORD = LLAMA.token_to_id("\u2581he")
L_START = [LLAMA.token_to_id(t) for t in ("<0x3C>", "t", "h", "in", "k", "<0x3E>")]  # "<think>" without "▁"


@pytest.mark.parametrize(("budget", "cut"), [(1, 1), (2, 4), (3, 4), (4, 4), (5, 5)])
def test_forcing_waits_for_a_whole_utf8_character(budget: int, cut: int) -> None:
    # thinking: "▁he" then "—" split over three byte tokens, then more words; a budget that runs out after the
    # first or second byte waits until the third before forcing.
    thinking = [L_WORD, *L_DASH, L_WORD, L_WORD]
    model = ScriptedModel(LLAMA.vocab_size, [*L_START, *thinking])
    params = SamplingParams(temperature=0.0, reasoning_budget=budget, reasoning_budget_message=" Enough.")
    sampler = Sampler(params, LLAMA.vocab_size, LLAMA, THINK)
    forced = LLAMA.encode(" Enough.</think>", add_special=False)
    tokens, states = drive(sampler, model, LLAMA.encode("Q:"), len(L_START) + cut + len(forced))
    body = tokens[len(L_START) :]
    assert body[:cut] == thinking[:cut]
    assert body[cut:] == forced
    assert LLAMA.decode(tokens).endswith("Enough.</think>")
    assert ("\u2014" in LLAMA.decode(body[:cut])) == (cut >= 4)
    assert (WAITING_UTF8 in states) == (budget in (2, 3))


@given(
    budget=st.integers(-1, 10),
    words=st.lists(st.sampled_from(Q_WORDS), max_size=12),
    end_at=st.one_of(st.none(), st.integers(0, 12)),
)
def test_budget_property(budget: int, words: list[int], end_at: int | None) -> None:
    # The model thinks `words`, and writes the end tag itself after `end_at` of them (or never).
    natural = end_at is not None and end_at <= len(words)
    script = [Q_START, *words[:end_at], Q_END, *words[end_at:]] if natural else [Q_START, *words]
    model = ScriptedModel(QWEN.vocab_size, script, banned=[] if natural else [Q_END])
    steps = 1 + 12 + len(FORCED) + 3  # room for the longest script or budget, the forcing, and after
    tokens, _ = drive(qwen_sampler(budget), model, [], steps)
    thought = end_at if natural else math.inf
    if 0 <= budget <= thought:  # the budget runs out first (or with the model's last thought)
        head = [Q_START, *(model.preferred(s) for s in range(1, 1 + budget)), *FORCED]
        assert tokens == head + [model.preferred(s) for s in range(len(head), steps)]
    else:
        assert tokens == [model.preferred(s) for s in range(steps)]


def test_reasoning_tags_lookup() -> None:
    families = registry().models
    assert reasoning_tags(families["qwen3"], None) == reasoning_tags(families["qwen3_moe"], QWEN) == THINK
    llama = families["llama"]
    assert reasoning_tags(llama, QWEN) == THINK  # no tags of its own, but a vocabulary with the tokens
    assert reasoning_tags(llama, LLAMA) is None
    assert reasoning_tags(llama, None) is None

    class Channel(ModelFamily):  # a family declaring its own tags gets them, whatever the vocabulary
        reasoning_tags = ("<|channel>thought", "<channel|>")

    assert reasoning_tags(Channel(), LLAMA) == ("<|channel>thought", "<channel|>")


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("repeat_penalty", 0.0),
        ("repeat_last_n", -2),
        ("presence_penalty", float("inf")),
        ("frequency_penalty", "1"),
        ("seed", -1),
        ("reasoning_budget", -2),
        ("reasoning_budget_message", None),
    ],
)
def test_bad_params(name: str, value: Any) -> None:
    with pytest.raises(SamplingError, match=f"^sampling parameter {name}=") as info:
        SamplingParams(**{name: value})
    assert isinstance(info.value, (TensorweaveError, ValueError))
    assert "\n" not in str(info.value)


def test_bad_inputs() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0), 4)
    with pytest.raises(ShapeError, match=r"expected \(4,\)"):
        sampler.sample(np.zeros(5))
    with pytest.raises(SamplingError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(SamplingError, match="-inf"):
        sampler.sample(np.full(4, -np.inf))
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        sampler.accept(4)
    with pytest.raises(SamplingError, match="vocab"):
        Sampler(SamplingParams(), 0)
    with pytest.raises(SamplingError, match="tokenizer"):
        Sampler(SamplingParams(), 4, None, THINK)
    with pytest.raises(SamplingError, match="outside the model's vocabulary"):
        Sampler(SamplingParams(), 100, QWEN, THINK)  # a model vocabulary smaller than the tokenizer's


# --- stop strings -------------------------------------------------------------------------------------------


def stream(stops: Sequence[str], pieces: Sequence[str]) -> tuple[list[tuple[str, bool]], str]:
    s = StopStrings(stops)
    return [s.feed(p) for p in pieces], s.flush()


def test_stop_split_across_pieces() -> None:
    out, rest = stream(["</s>"], ["Hello <", "/s", "> more"])
    assert out == [("Hello ", False), ("", False), ("", True)] and rest == ""


def test_partial_match_rejected_later() -> None:
    out, rest = stream(["</s>"], ["a <", "/b", "c <"])
    assert out == [("a ", False), ("</b", False), ("c ", False)] and rest == "<"


def test_stop_at_the_very_start() -> None:
    out, _ = stream(["STOP"], ["STOP and more", "ignored"])
    assert out == [("", True), ("", True)]


def test_several_stops() -> None:
    out, _ = stream(["\n\n", "User:"], ["Hi\nUs", "er: x"])
    assert out == [("Hi\n", False), ("", True)]
    out, _ = stream(["abcd", "bc"], ["xabcd"])  # both complete in one piece: the one starting first wins
    assert out == [("x", True)]


def test_bad_stop_strings() -> None:
    with pytest.raises(SamplingError, match="non-empty"):
        StopStrings(["ok", ""])
    with pytest.raises(SamplingError, match="list"):
        StopStrings("</s>")


@given(
    text=st.text("ab\n", max_size=30),
    stops=st.lists(st.text("ab\n", min_size=1, max_size=3), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_strings_property(text: str, stops: list[str], cuts: list[int]) -> None:
    # With no stop inside another, the first stop to complete is also the first to start: cut there.
    stops = [s for s in stops if not any(s != o and s in o for o in stops)]
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    out, rest = stream(stops, [text[a:b] for a, b in itertools.pairwise(bounds)])
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    emitted = "".join(piece for piece, _ in out)
    if hits:
        assert emitted == text[: min(hits)] and out[-1][1] and rest == ""
    else:
        assert emitted + rest == text and not any(stopped for _, stopped in out)

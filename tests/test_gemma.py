"""Gemma 3 and Gemma 4 against transformers: tiny random models (tools/make_fixtures.py, gemma block) whose
logits and greedy tokens transformers computed. ``gemma3``: (1 + w) norms far from 1, a sliding last layer, a
window (6) shorter than the prefill, linear rope on the full layer only, query_pre_attn_scalar != head_dim, final
softcap. ``gemma4``: per-layer head_dim and KV heads, k_eq_v full layers with one KV head, KV sharing (layers 4
and 5 read layers 3 and 1), double-wide MLPs, per-layer embeddings, proportional rope, final softcap.
``gemma4_moe``: the MoE block beside the dense MLP in every layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tensorweave as tw

FIXTURES = Path(__file__).parent / "fixtures" / "models"
NAMES = ["gemma3", "gemma4", "gemma4_moe"]
# (devices, tensor_split): the full layers of the Gemma 4 fixtures have one KV head, so every split past TP=1 leaves
# devices without attention there; 2 KV heads over 4 devices leave two devices without any.
SPLITS = [
    ("cpu-sim", None),
    ("cpu-sim:2", [3, 1]),
    ("cpu-sim:3", [2, 1, 1]),
    ("cpu-sim:4", [1, 1, 1, 5]),
]


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("source", ["gemma3/hf", "gemma4/hf", "gemma4/model-f32.gguf", "gemma4_moe/hf"])
def test_logits_match_transformers_at_every_split(source: str) -> None:
    """(The Gemma 4 GGUF is the HF fixture converted here with gguf-py's names and keys, rope_freqs for the
    proportional rope; the real Gemma 3 GGUF is tests/test_gemma_real.py's.)"""
    ref = expected(source.split("/")[0])
    for devices, split in SPLITS:
        got = tw.load(FIXTURES / source, devices=devices, tensor_split=split).logits(ref["tokens"])
        err = float(np.abs(got - ref["logits"]).max())
        assert err < 1e-4, f"{source} {devices} {split}: max abs error {err:.2e}"


def test_gemma4_gguf_config_and_vocabulary_equal_the_hf_ones() -> None:
    hf, gg = tw.load(FIXTURES / "gemma4" / "hf"), tw.load(FIXTURES / "gemma4" / "model-f32.gguf")
    a, b = hf.config, gg.config
    assert (a.sliding, a.head_dims, a.kv_heads, a.n_kv_shared, a.k_eq_v, a.double_wide, a.ple_dim) == (
        b.sliding,
        b.head_dims,
        b.kv_heads,
        b.n_kv_shared,
        b.k_eq_v,
        b.double_wide,
        b.ple_dim,
    )
    text = "Why is the sky blue? <|channel>thought\nno<channel|>"
    assert hf.tokenizer is not None and gg.tokenizer is not None
    assert hf.tokenizer.encode(text) == gg.tokenizer.encode(text)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_single_tokens_equals_the_full_forward(name: str) -> None:
    """A 16-token prefill (longer than the 6-token window: rings wrap inside one step), then 8 single tokens; in
    float64, where the two agree exactly (float32 BLAS sums differ by ~1e-5 between 16- and 24-row products)."""
    ref = expected(name)
    model = tw.load(FIXTURES / name / "hf", devices="cpu-sim:3", tensor_split=[1, 1, 2], dtype="float64")
    full = model.logits(ref["tokens"])
    sess = model.session()
    steps = [sess.eval(ref["tokens"][:16])] + [sess.eval(ref["tokens"][i : i + 1]) for i in range(16, 24)]
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_equals_transformers(name: str) -> None:
    ref = expected(name)
    model = tw.load(FIXTURES / name / "hf", devices="cpu-sim:2", tensor_split=[1, 3])
    gen = model.generate(ref["tokens"][: int(ref["greedy_prompt_len"])].tolist(), len(ref["greedy"]), ignore_eos=True)
    assert gen.tokens == ref["greedy"].tolist()  # type: ignore[union-attr]


def test_configs_map_every_gemma_switch() -> None:
    g3 = tw.load(FIXTURES / "gemma3" / "hf").config
    assert g3.sliding == (True, False, True, True) and g3.window == 6 and g3.norm_plus_one
    assert (g3.attn_scale, g3.final_softcap, g3.softcap) == (24**-0.5, 6.0, None)
    assert dict(g3.layer(1).rope.scaling) == {"factor": 4.0, "rope_type": "linear"} and not g3.layer(0).rope.scaling
    g4 = tw.load(FIXTURES / "gemma4" / "hf").config
    assert (g4.head_dims, g4.kv_heads) == ((16, 32, 16, 16, 16, 32), (2, 1, 2, 2, 2, 1))
    assert [g4.source(il) for il in range(6)] == [0, 1, 2, 3, 3, 1] and g4.k_eq_v and g4.ple_dim == 8
    factors = dict(g4.layer(1).rope.scaling)["factors"]
    assert factors == (1.0,) * 4 + (float("inf"),) * 12  # 0.25 of 16 pairs rotate, over the full 32 dims
    moe = tw.load(FIXTURES / "gemma4_moe" / "hf").config
    assert moe.moe_block and (moe.n_expert, moe.top_k, moe.expert_ffn) == (4, 2, 32)


def test_kv_shared_layers_own_no_cache_and_add_no_collective() -> None:
    model = tw.load(FIXTURES / "gemma4" / "hf", devices="cpu-sim:3", tensor_split=[2, 1, 1])
    layers = sorted({int(name.split(".")[1]) for name in model.caches})
    assert layers == [0, 1, 2, 3]  # layers 4 and 5 read the caches of 3 and 1
    assert {c.cache.kind for c in model.caches.values() if c.cache} == {"ring", "kv"}
    # per layer one allreduce after attention and one after the FFN, one for the embedding, one for the PLE
    # table; the vocab-split logits are gathered once: the shared layers read their caches where they lie
    assert (model.plan.count("allreduce"), model.plan.count("allgather")) == (2 * 6 + 2, 1)
    moe = tw.load(FIXTURES / "gemma4_moe" / "hf", devices="cpu-sim:2")
    assert moe.plan.count("allreduce") == 2 * 3 + 1  # the dense MLP and the experts share one reduce


def test_gemma4_state_saved_at_tp3_restores_at_tp1_and_tp2(tmp_path: Path) -> None:
    """Rings wrapped (20 tokens, window 6) and shared layers: the restored sessions continue like one that never
    stopped (float64, so the state is compared, not float32 summation order)."""
    ids = expected("gemma4")["tokens"].tolist()
    saver = tw.load(FIXTURES / "gemma4" / "hf", devices="cpu-sim:3", tensor_split=[1, 2, 1], dtype="float64")
    sess = saver.session()
    sess.eval(ids[:20])
    path = sess.save(tmp_path / "gemma4.tws")
    whole = sess.eval(ids[20:])
    for devices, split in (("cpu-sim", None), ("cpu-sim:2", [1, 3])):
        resumed = tw.load(FIXTURES / "gemma4" / "hf", devices=devices, tensor_split=split, dtype="float64")
        np.testing.assert_allclose(resumed.restore(path).eval(ids[20:]), whole, rtol=0, atol=1e-9)


# --- Gemma 4 thinking: <|channel>thought ... <channel|> and the reasoning budget -----------------------------------

START, END = "<|channel>thought", "<channel|>"


def test_reasoning_budget_ends_gemma4_thinking_after_exactly_n_tokens() -> None:
    """On the Gemma 4 fixture: thinking switched on in the system turn, the model's turn opens a thought; after 4
    counted tokens the budget message and <channel|> are forced, token by token. (The question is one whose
    thought starts with whole ASCII characters: after a partial UTF-8 byte token the budget waits for the rest.)"""
    model = tw.load(FIXTURES / "gemma4" / "hf", devices="cpu-sim:3", tensor_split=[1, 1, 2])
    tok = model.tokenizer
    assert tok is not None and model.family.reasoning_tags == (START, END)
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    prompt = tok.apply_chat_template(question, enable_thinking=True) + START + "\n"
    assert prompt.startswith("<s><|turn>system\n<|think|><turn|>\n") and prompt.endswith(
        "<|turn>model\n" + START + "\n"
    )
    ids = tok.encode(prompt, add_special=False)
    forced = tok.encode(" ok." + END, add_special=False)
    assert forced[-1] == tok.token_to_id(END)
    gen = model.generate(ids, 4 + len(forced) + 3, reasoning_budget=4, reasoning_budget_message=" ok.", ignore_eos=True)
    free = model.generate(ids, 4 + len(forced) + 3, ignore_eos=True)
    assert gen.tokens[4 : 4 + len(forced)] == forced  # type: ignore[union-attr]
    assert gen.tokens[:4] == free.tokens[:4] and forced[-1] not in gen.tokens[:4]  # type: ignore[union-attr]
    assert free.tokens[4 : 4 + len(forced)] != forced  # type: ignore[union-attr]  # the model would not have


@pytest.mark.parametrize("budget", [0, 1, 3])
def test_scripted_gemma4_thought_is_cut_after_the_budget(budget: int) -> None:
    """A scripted model that writes <|channel>thought itself and would never close it: exactly ``budget`` thought
    tokens, then the forced message and end tag, then free sampling again."""
    from tensorweave.runtime.sampling import Sampler, SamplingParams

    tok = tw.load(FIXTURES / "gemma4" / "hf").tokenizer
    assert tok is not None
    start, end = tok.encode(START, add_special=False), tok.token_to_id(END)
    words = tok.encode(" the quick brown fox jumps over the lazy dog", add_special=False)
    script = [*start, *words]
    params = SamplingParams(temperature=0.0, reasoning_budget=budget, reasoning_budget_message=" Done.")
    sampler = Sampler(params, tok.vocab_size, tok, (START, END))
    sampler.prime(tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=True)))
    out = []
    for step in range(len(start) + budget + 8):
        logits = np.zeros(tok.vocab_size, np.float32)
        logits[end] = -np.inf
        logits[script[step] if step < len(script) else words[0]] = 60.0
        out.append(sampler.sample(logits))
    forced = tok.encode(" Done." + END, add_special=False)
    assert out[: len(start) + budget] == script[: len(start) + budget]
    assert out[len(start) + budget : len(start) + budget + len(forced)] == forced
    assert sampler.reasoning_state == "done"


@pytest.mark.parametrize(("name", "model_type"), [("gemma3", "gemma3"), ("gemma4", "gemma4")])
def test_the_language_model_of_a_multimodal_checkpoint_loads(name: str, model_type: str, tmp_path: Path) -> None:
    """The fixture as a multimodal checkpoint stores it: config under ``text_config``, the language model under
    ``model.language_model.``, a vision tower beside it (skipped)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    src = FIXTURES / name / "hf"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    text = json.loads((src / "config.json").read_text())
    config = {"model_type": model_type, "text_config": text, "tie_word_embeddings": True, "vision_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {
        k.replace("model.", "model.language_model.", 1): v for k, v in load_file(src / "model.safetensors").items()
    }
    tensors["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] = np.ones((4, 4), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    ref = expected(name)
    got = tw.load(tmp_path, devices="cpu-sim:2").logits(ref["tokens"])
    assert float(np.abs(got - ref["logits"]).max()) < 1e-4


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("gemma3", {"use_bidirectional_attention": True}, "bidirectional"),
        ("gemma4", {"num_kv_shared_layers": 5}, "share caches no earlier layer"),
        ("gemma4", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}}, "yarn"),
    ],
)
def test_settings_gemma_cannot_run_are_refused_naming_the_file(
    name: str, change: dict[str, object], message: str, tmp_path: Path
) -> None:
    import json
    import shutil

    for f in (FIXTURES / name / "hf").iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(tw.errors.UnsupportedError, match=message) as e:
        tw.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_family_turn_format_fills_in_only_where_the_file_has_no_template() -> None:
    from tensorweave.models.gemma3 import Gemma3
    from tensorweave.runtime.model import with_family_defaults

    tok = tw.load(FIXTURES / "gemma3" / "hf", progress=False).tokenizer
    own, eos = tok.chat_template, tok.eos_ids
    assert own is not None and with_family_defaults(tok, Gemma3()).chat_template == own  # the file's own wins
    tok.chat_template = None
    with_family_defaults(tok, Gemma3())
    msgs = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}]
    bos = tok.special_tokens["bos_token"]
    assert (
        tok.apply_chat_template(msgs, add_generation_prompt=False)
        == f"{bos}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    )
    assert tok.eos_ids == eos  # <end_of_turn> is not in the fixture's vocabulary: nothing added

"""Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5-MoE, Qwen3.5) against transformers: the fixtures (tools/make_fixtures.py)
are tiny random models with loud 1-D weights and a layer pattern other than 3:1 (linear, full, linear, linear), 2 key
heads with 2 value heads each and 2 KV heads, as HF safetensors and GGUF files written the way llama.cpp's converter
names (and, for qwen35 and qwen35moe, tiles) them.

Splits over up to 4 devices leave devices without a key head in a linear-attention layer and without a KV head in
the full-attention one; sessions carry the recurrent states across steps, save them in a split-independent layout
and rewind them only from snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.core.sharding import Split
from tensorweave.errors import ModelFormatError, StateError, UnsupportedError

FIXTURES = Path(__file__).parent / "fixtures" / "models"
NAMES = ["qwen3_next", "qwen3_5_moe", "qwen3_5"]
SOURCES = {"hf": "hf", "gguf": "model-f32.gguf"}
SPLITS = [("cpu-sim", None), ("cpu-sim:2", [1, 3]), ("cpu-sim:3", [2, 1, 1]), ("cpu-sim:4", [1, 1, 1, 5])]


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def load(name: str, devices: str, split: list[int] | None, source: str = "hf") -> tw.Model:
    return tw.load(FIXTURES / name / SOURCES[source], devices=devices, tensor_split=split, progress=False)


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_at_tp_1_to_4_with_devices_holding_no_head(name: str, source: str) -> None:
    ref = expected(name)
    for devices, split in SPLITS:
        with load(name, devices, split, source) as model:
            err = float(np.abs(model.logits(ref["tokens"]) - ref["logits"]).max())
            assert err < 1e-4, f"{name} {source} {devices} {split}: max abs error {err:.2e}"
            if devices == "cpu-sim:4":  # 2 key heads and 2 KV heads over 4 devices: some hold none of either
                held = {v.name: v.state for v in model.plan.values if v.kind == "cache"}
                for cache in ("blk.0.ssm_state", "blk.0.conv_q", "blk.1.k_cache"):
                    state = held[cache]
                    assert isinstance(state, Split) and 0 in state.sizes, (cache, state)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_12_then_8_single_tokens_equals_the_full_forward(name: str) -> None:
    ref = expected(name)
    with load(name, "cpu-sim:3", [2, 1, 1]) as model:
        sess = model.session()
        steps = [sess.eval(ref["tokens"][:12])] + [sess.eval(ref["tokens"][i : i + 1]) for i in range(12, 20)]
        err = float(np.abs(np.concatenate(steps) - ref["logits"][:20]).max())
        assert err < 1e-4, f"{name}: incremental vs transformers {err:.2e}"


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_transformers(name: str, source: str) -> None:
    """Generation through the session (prefill, then one token per step on the carried states) is greedy
    transformers' ``generate``."""
    ref = expected(name)
    with load(name, "cpu-sim:2", [1, 3], source) as model:
        prompt = ref["tokens"][: int(ref["greedy_prompt_len"])].tolist()
        gen = model.generate(prompt, max_tokens=len(ref["greedy"]), temperature=0.0, ignore_eos=True)
        assert gen.tokens == ref["greedy"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_a_session_saved_at_tp3_continues_at_tp1_and_tp2(name: str, tmp_path: Path) -> None:
    """Saved after 14 tokens on 3 devices (2:1:1), restored on 1 and on 2 (1:3) devices: the next 6 tokens give
    the logits of an uninterrupted run (transformers')."""
    ref = expected(name)
    ids = ref["tokens"]
    with load(name, "cpu-sim:3", [2, 1, 1]) as model:
        sess = model.session()
        sess.eval(ids[:14])
        path = sess.save(tmp_path / "s.twstate")
    for devices, split in (("cpu-sim", None), ("cpu-sim:2", [1, 3])):
        with load(name, devices, split) as model:
            sess = model.restore(path)
            assert sess.n_past == 14
            got = np.concatenate([sess.eval(ids[14:16])] + [sess.eval(ids[i : i + 1]) for i in range(16, 20)])
            err = float(np.abs(got - ref["logits"][14:20]).max())
            assert err < 1e-4, f"{name} restored at {devices} {split}: {err:.2e}"


def test_rewinding_a_recurrent_state_is_exact_from_a_snapshot_or_refused() -> None:
    ref = expected("qwen3_next")
    ids = ref["tokens"]
    with load("qwen3_next", "cpu-sim:3", [1, 2, 1]) as model:
        sess = model.session()
        sess.eval(ids[:10])
        sess.eval(ids[10:14])
        with pytest.raises(StateError, match="recurrent state"):
            sess.rewind(12)  # inside the last turn, no snapshot: refused rather than silently wrong
        sess.rewind(0)
        sess.eval(ids[:10])
        sess.snapshot()  # a turn boundary, as chat takes one
        sess.eval(ids[10:14])
        sess.rewind(12)  # back to the snapshot at 10, then 10..11 evaluated again
        assert sess.n_past == 12
        got = sess.eval(ids[12:16])
        np.testing.assert_allclose(got, ref["logits"][12:16], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_plan_has_one_allreduce_per_layer_of_each_kind_and_the_recurrent_state_bytes(name: str) -> None:
    with load(name, "cpu-sim:2", [1, 3]) as model:
        plan = model.plan
        cfg = model.config
        # the embedding (vocab-split), then per layer: the mixer's output (linear or full attention) and the
        # FFN/MoE block (routed experts and the shared expert reduced together); the logits gathered once
        assert plan.count("allreduce") == 1 + 2 * cfg.n_layer and plan.count("allgather") == 1
        whole = sum(np.prod(t.shape) * t.dtype.itemsize for t in model.caches.values() if t.cache.kind == "state")
        assert sum(plan.state_bytes) == whole and all(b > 0 for b in plan.state_bytes)
        assert "recurrent state" in plan.summary().splitlines()[1]


def test_a_multimodal_qwen35_checkpoint_with_fused_experts_loads_its_language_model(tmp_path: Path) -> None:
    """Qwen3.5-MoE as published: config.json nests the text model (model_type qwen3_5_moe, text_config), the
    language model lives under model.language_model., experts are fused (gate_up_proj [E, 2F, H], down_proj), rope
    has mrope sections, and a vision tower and mtp.* tensors sit beside it; they are ignored and the logits are the
    text model's."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    src = FIXTURES / "qwen3_5_moe" / "hf"
    text = json.loads((src / "config.json").read_text())
    # mrope over (t, h, w) sections: with text-only positions all three are alike, which is plain partial rotary
    text["rope_parameters"] |= {"mrope_section": [1, 1, 0], "mrope_interleaved": True}
    config = {
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"depth": 1},
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    tensors = load_file(src / "model.safetensors")
    out: dict[str, np.ndarray] = {"mtp.fc.weight": np.ones((4, 4), np.float32)}
    out["model.visual.blocks.0.attn.qkv.weight"] = np.ones((6, 4), np.float32)
    for il in range(text["num_hidden_layers"]):
        p = f"model.layers.{il}.mlp.experts"
        per = [
            [tensors.pop(f"{p}.{e}.{x}_proj.weight") for e in range(text["num_experts"])]
            for x in ("gate", "up", "down")
        ]
        out[f"model.language_model.layers.{il}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(per[0], per[1], strict=True)]
        )
        out[f"model.language_model.layers.{il}.mlp.experts.down_proj"] = np.stack(per[2])
    for k, v in tensors.items():
        out[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k] = v
    save_file(out, tmp_path / "model.safetensors")
    ref = expected("qwen3_5_moe")
    with tw.load(tmp_path, devices="cpu-sim:3", tensor_split=[1, 1, 2], progress=False) as model:
        assert model.family.name == "qwen3_5_moe"
        assert float(np.abs(model.logits(ref["tokens"]) - ref["logits"]).max()) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_both_formats_carry_the_tokenizer_chat_template_and_think_budget(name: str) -> None:
    """The GGUF's vocabulary and chat template are the HF tokenizer's; a <think> the prompt opens is closed by the
    reasoning budget after 2 tokens (and the end of a UTF-8 character begun), in both formats alike."""
    runs = []
    for source in SOURCES:
        with load(name, "cpu-sim:2", [1, 3], source) as model:
            tok = model.tokenizer
            chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
            gen = model.generate("Hi <think>", max_tokens=5, temperature=0.0, reasoning_budget=2)
            assert "</think>" in [tok.decode([t]) for t in gen.tokens][2:4]
            runs.append((chat, gen.tokens))
    assert runs[0] == runs[1] and runs[0][0].endswith("<|im_start|>assistant\n")


def test_plan_command_lists_the_recurrent_state_per_device() -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tensorweave.cli", "plan", str(FIXTURES / "qwen3_5_moe" / "hf"), "-ts", "2,1,1"]
    out = subprocess.run([*cmd, "--devices", "cpu-sim:3"], capture_output=True, text=True, timeout=120).stdout
    line = next(x for x in out.splitlines() if x.startswith("of which recurrent state:"))
    assert len(line.split(",")) == 3 and "per decode token: 9 allreduce + 1 allgather" in out


def _hf_copy(tmp_path: Path, name: str, config: dict[str, object], drop_row: str | None = None) -> Path:
    """The fixture's HF directory with config.json fields replaced, and optionally one row cut off a tensor."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    src = FIXTURES / name / "hf"
    shutil.copytree(src, tmp_path / name)
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **config}))
    if drop_row is not None:
        tensors = load_file(src / "model.safetensors")
        tensors[drop_row] = tensors[drop_row][1:]
        save_file(tensors, tmp_path / name / "model.safetensors")
    return tmp_path / name


@pytest.mark.parametrize(
    ("config", "drop_row", "error", "message"),
    [
        (
            {"linear_num_value_heads": 3},
            None,
            UnsupportedError,
            "config.json: .*not a multiple of linear_num_key_heads",
        ),
        ({"layer_types": ["full_attention"]}, None, UnsupportedError, "config.json: layer_types must be 4"),
        (
            {},
            "model.layers.0.linear_attn.conv1d.weight",
            ModelFormatError,
            r"qwen3_5_moe: model.layers.0.linear_attn.conv1d.weight \(95, 1, 4\): no q\|k\|v blocks beside",
        ),
    ],
)
def test_inconsistent_checkpoints_fail_with_one_error_naming_the_field_or_tensor(
    tmp_path: Path, config: dict[str, object], drop_row: str | None, error: type[Exception], message: str
) -> None:
    path = _hf_copy(tmp_path, "qwen3_5_moe", config, drop_row)
    with pytest.raises(error, match=message):
        tw.load(path, devices="cpu-sim:2", progress=False)


def test_uneven_remainders_rotate_among_the_linear_attention_layers() -> None:
    """Layers 0, 2 and 3 are the linear ones: their key heads split as the 1st, 2nd and 3rd turn of the rotation
    (llama.cpp rotates among layers of one kind), so over 4 devices (1:1:1:5) the two key heads go
    (0, 0, 0, 2), (1, 0, 0, 1), (0, 1, 0, 1), whatever the full-attention layer between them."""
    from tensorweave.core.sharding import shard_sizes

    with load("qwen3_next", "cpu-sim:4", [1, 1, 1, 5]) as model:
        held = {v.name: v.state for v in model.plan.values if v.kind == "cache"}
        r = model.config.lin_v_heads // model.config.lin_k_heads
        for turn, il in enumerate((0, 2, 3)):
            state = held[f"blk.{il}.ssm_state"]
            assert isinstance(state, Split)
            assert state.sizes == tuple(n * r for n in shard_sizes(2, [1, 1, 1, 5], turn)), (il, state)


def test_gguf_names_regroup_tiled_value_heads_and_split_fused_experts_reading_only_slices() -> None:
    """qwen35moe's tiled value heads come back grouped by key head for any slice a device reads (runs of stored
    rows, never the whole tensor), and a fused ffn_gate_up_exps splits into gate and up."""
    from tensorweave.loaders.names import map_names
    from tensorweave.models import hybrid

    nk, r, dv, hidden = 2, 3, 2, 5
    rng = np.random.default_rng(0)
    grouped = rng.standard_normal((nk * r * dv, hidden))  # rows: key head, value head of it, dv
    tiled = grouped.reshape(nk, r, dv, hidden).transpose(1, 0, 2, 3).reshape(-1, hidden)  # llama.cpp's order
    gate_up = rng.standard_normal((4, 2 * 3, hidden))
    stored = {
        "blk.0.attn_gate": tiled,
        "blk.0.ssm_out": rng.standard_normal((hidden, nk * r * dv)),
        "blk.1.ffn_gate_up_exps": gate_up,
    }
    reads: list[tuple[slice, ...]] = []

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        reads.append(index)
        return stored[name][index]

    meta = {
        "general.architecture": "qwen35moe",
        "qwen35moe.ssm.group_count": nk,
        "qwen35moe.ssm.time_step_rank": nk * r,
    }
    shapes = {n: a.shape for n, a in stored.items()}
    mapped = map_names(hybrid.GGUF_TILED_NAMING, shapes, read, str, "qwen3_5_moe", "test.gguf", meta=meta)
    for lo, hi in ((0, 12), (6, 12), (2, 9), (5, 5)):
        reads.clear()
        np.testing.assert_array_equal(mapped.sources["blk.0.attn_gate"]((slice(lo, hi), slice(None))), grouped[lo:hi])
        assert all(i[0].stop - i[0].start <= max(hi - lo, 1) for i in reads)  # no whole-tensor read
    np.testing.assert_array_equal(
        mapped.sources["blk.1.ffn_up_exps"]((slice(1, 3), slice(None), slice(None))), gate_up[1:3, 3:]
    )
    np.testing.assert_array_equal(
        mapped.sources["blk.1.ffn_gate_exps"]((slice(None), slice(0, 2), slice(None))), gate_up[:, :2]
    )


def test_a_qwen3next_gguf_with_split_projections_is_refused_not_misread() -> None:
    """Converters differ in the value-head order of qwen3next files whose projections are split (attn_qkv, ...):
    such a file is refused with UnsupportedError instead of being read in a guessed order."""
    from tensorweave.models.qwen3_next import Qwen3Next
    from tensorweave.runtime.model import open_checkpoint

    ck = open_checkpoint(FIXTURES / "qwen3_5_moe" / "model-f32.gguf")  # split projections, arch qwen35moe
    meta = {k.replace("qwen35moe.", "qwen3next.", 1): v for k, v in ck.meta.items()}  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedError, match="split linear-attention projections"):
        Qwen3Next().config_from_gguf(meta, ck.mapped.shapes)  # type: ignore[attr-defined]
    ck.close()

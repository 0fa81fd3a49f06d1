"""Model families against transformers: the committed fixtures (tools/make_fixtures.py) hold tiny random models as
Hugging Face directories and GGUF files, with the logits and greedy tokens transformers produced for them.

Every family x format must match those logits at TP=1 and split over 2-4 cpu-sim devices with uneven ratios,
including splits where a device holds no KV head; incremental evaluation must equal the full forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tensorweave as tw

FIXTURES = Path(__file__).parent / "fixtures" / "models"
NAMES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_moe_norm", "mixtral"]
SOURCES = {"hf": "hf", "gguf": "model-f32.gguf"}
# (devices, tensor_split): 2 KV heads over 4 devices leave devices without a KV head in the last two.
SPLITS = [
    ("cpu-sim", None),
    ("cpu-sim:2", [3, 1]),
    ("cpu-sim:3", [2, 1, 1]),
    ("cpu-sim:4", [1, 1, 1, 5]),
    ("cpu-sim:4", [1, 1, 1, 1]),
]


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_at_every_split(name: str, source: str) -> None:
    ref = expected(name)
    for devices, split in SPLITS:
        model = tw.load(FIXTURES / name / SOURCES[source], devices=devices, tensor_split=split)
        got = model.logits(ref["tokens"])
        assert got.shape == ref["logits"].shape and got.dtype == np.float32
        err = float(np.abs(got - ref["logits"]).max())
        assert err < 1e-4, f"{name} {source} {devices} {split}: max abs error {err:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_q8_0_gguf_matches_transformers_on_the_dequantized_weights(name: str) -> None:
    ref = expected(name)
    for devices, split in [("cpu-sim", None), ("cpu-sim:3", [1, 2, 1])]:
        got = tw.load(FIXTURES / name / "model-q8_0.gguf", devices=devices, tensor_split=split).logits(ref["tokens"])
        err = float(np.abs(got - ref["logits_q8_0"]).max())
        assert err < 1e-3, f"{name} q8_0 {devices}: max abs error {err:.2e}"
    # and the quantization itself moved the logits: the file really is quantized
    assert float(np.abs(ref["logits_q8_0"] - ref["logits"]).max()) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_incremental_evaluation_equals_the_full_forward(name: str) -> None:
    ref = expected(name)
    model = tw.load(FIXTURES / name / "hf", devices="cpu-sim:3", tensor_split=[1, 1, 2])
    full = model.logits(ref["tokens"])
    sess = model.session()
    steps = [sess.eval(ref["tokens"][:16])] + [sess.eval(ref["tokens"][i : i + 1]) for i in range(16, 24)]
    assert sess.n_past == 24
    # float32 rounding only: decode steps attend through cpu-sim's compiled kernel, the full forward through BLAS
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_equals_transformers(name: str, source: str) -> None:
    ref = expected(name)
    model = tw.load(FIXTURES / name / SOURCES[source], devices="cpu-sim:2", tensor_split=[1, 3])
    sess = model.session()
    logits = sess.eval(ref["tokens"][: int(ref["greedy_prompt_len"])])
    out: list[int] = []
    for _ in range(len(ref["greedy"])):
        out.append(int(np.argmax(logits[-1])))
        logits = sess.eval([out[-1]])
    assert out == ref["greedy"].tolist()


def test_configs_map_every_family_switch() -> None:
    """The fixtures exercise what each family must honour: the loaded configs say so."""
    cfgs = {n: tw.load(FIXTURES / n / "hf").config for n in NAMES}
    gguf = {n: tw.load(FIXTURES / n / "model-f32.gguf").config for n in NAMES}
    assert dict(cfgs["llama"].rope_scaling)["rope_type"] == "llama3" and not cfgs["llama"].tied
    assert dict(gguf["llama"].rope_scaling)["rope_type"] == "factors"  # llama.cpp's rope_freqs tensor
    assert cfgs["mistral"].window == 8 == gguf["mistral"].window
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].tied and cfgs["qwen3"].head_dim * 4 != cfgs["qwen3"].hidden
    assert (cfgs["qwen3_moe"].norm_topk, cfgs["qwen3_moe"].dense_layers) == (False, (1,))
    assert cfgs["qwen3_moe_norm"].norm_topk and cfgs["qwen3_moe_norm"].dense_layers == (0,)
    assert (cfgs["qwen2"].qkv_bias, cfgs["qwen2"].o_bias, gguf["qwen2"].qkv_bias, gguf["qwen2"].o_bias) == (
        True,
        False,
        True,
        False,
    )
    assert (cfgs["mixtral"].n_expert, cfgs["mixtral"].dense_layers, cfgs["mixtral"].norm_topk) == (4, (), True)
    # one GGUF architecture, two families: a llama file with llama.expert_count is Mixtral's, one without is Llama's
    families = {n: tw.load(FIXTURES / n / "model-f32.gguf").family.name for n in ("llama", "mistral", "mixtral")}
    assert families == {"llama": "llama", "mistral": "llama", "mixtral": "mixtral"}
    for n in NAMES:  # GGUF metadata and the tensor list lead to the same config as config.json
        a, b = cfgs[n], gguf[n]
        assert (a.n_expert, a.top_k, a.norm_topk, a.dense_layers, a.tied, a.qk_norm, a.head_dim, a.n_kv) == (
            b.n_expert,
            b.top_k,
            b.norm_topk,
            b.dense_layers,
            b.tied,
            b.qk_norm,
            b.head_dim,
            b.n_kv,
        ), n


def test_tokenizers_of_both_formats_agree() -> None:
    text = "Hello world, tensor parallel héllo 你好 <3"
    for n in NAMES:
        hf = tw.load(FIXTURES / n / "hf").tokenizer
        gg = tw.load(FIXTURES / n / "model-f32.gguf").tokenizer
        assert hf is not None and gg is not None
        assert hf.encode(text) == gg.encode(text), n
        assert hf.decode(hf.encode(text, add_special=False)) == text


def test_plan_reports_per_device_memory_and_traffic() -> None:
    model = tw.load(FIXTURES / "qwen3" / "hf", devices="cpu-sim:2", tensor_split=[3, 1])
    plan = model.plan
    assert len(plan.weight_bytes) == 2 and plan.weight_bytes[0] > plan.weight_bytes[1] > 0
    # attention and FFN per layer, plus the vocab-split embedding; the vocab-split logits are gathered
    assert (plan.count("allreduce"), plan.count("allgather")) == (2 * model.config.n_layer + 1, 1)
    assert (plan.comm_bytes_per_token or 0) > 0 and len(plan.cache_bytes) == 2


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    tw.load(FIXTURES / "llama" / "hf", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "loading hf" in err


def test_a_session_taken_over_refuses_to_run() -> None:
    model = tw.load(FIXTURES / "llama" / "hf")
    first = model.session()
    first.eval([1, 2, 3])
    model.logits([4, 5])  # a fresh context takes the KV cache over
    with pytest.raises(tw.errors.StateError, match="taken over"):
        first.eval([6])
    with pytest.raises(tw.errors.ShapeError, match="outside the vocabulary"):
        model.logits([model.vocab])
    small = tw.load(FIXTURES / "llama" / "hf", ctx=8)
    with pytest.raises(tw.errors.StateError, match="context full"):
        small.logits(list(range(9)))


def test_meta_json_describes_the_fixtures() -> None:
    for n in NAMES:
        meta = json.loads((FIXTURES / n / "meta.json").read_text())
        assert meta, n


RANK_SCRIPT = """
import sys, numpy as np, tensorweave as tw
from tensorweave.core.spmd import spmd_from_env
comm = spmd_from_env()
model = tw.load(sys.argv[1], communicator=comm, tensor_split=[1, 3, 2][: comm.world_size])
ids = np.load(sys.argv[2])["tokens"]
held = sum(a.nbytes for parts in model.executor.weights.values() for a in parts)
np.savez(f"{sys.argv[3]}/rank{comm.local_ranks[0]}.npz", logits=model.logits(ids), held=held)
"""


@pytest.mark.parametrize("launcher", ["launch", "mpiexec"])
def test_one_process_per_rank_loads_only_its_shard(launcher: str, tmp_path: Path) -> None:
    """SPMD: every rank opens the checkpoint, places only its own slices, and gets the whole logits."""
    import os
    import shutil
    import subprocess
    import sys

    name, world = "qwen3_moe", 2 if launcher == "launch" else 3
    if launcher == "mpiexec" and shutil.which("mpiexec") is None:
        pytest.skip("mpiexec is not installed (pip install 'tensorweave[mpi]')")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    args = [str(FIXTURES / name / "model-f32.gguf"), str(FIXTURES / name / "expected.npz"), str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
    if launcher == "launch":
        cmd = [sys.executable, "-m", "tensorweave.cli", "launch", "-n", str(world), "--timeout", "60", "--"]
        cmd += ["python", str(script), *args]
    else:
        cmd = ["mpiexec", "-n", str(world), sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    ref = expected(name)
    whole = tw.load(FIXTURES / name / "model-f32.gguf")
    total = sum(a.nbytes for parts in whole.executor.weights.values() for a in parts)
    held = []
    for rank in range(world):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert float(np.abs(got["logits"] - ref["logits"]).max()) < 1e-4, rank
        held.append(int(got["held"]))
    # each rank holds less than the whole model; together, the split weights once plus the replicated ones per rank
    assert max(held) < total <= sum(held)

"""The `tensorweave` command as a user meets it: exit codes, clean stdout, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def tw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensorweave.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_checks_every_communicator_and_dtype() -> None:
    proc = tw("demo", "--elements", "10000", "--repeat", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("local ", "peer "))]
    assert {(r[0], r[1]) for r in rows} == {
        (c, d) for c in ("local", "peer") for d in ("float32", "float16", "bfloat16")
    }
    assert all(r[-1] == "ok" for r in rows)
    assert "cpu-sim:3" in proc.stdout and "staged through host" in proc.stdout


def test_demo_runs_a_model_split_over_the_devices_like_one_device() -> None:
    proc = tw("demo", "--elements", "1000", "--repeat", "1", "--devices", "cpu-sim:3", "-ts", "2,0,1", "-n", "4")
    assert proc.returncode == 0, proc.stderr
    assert "loaded on 3 devices with tensor_split 2,0,1 and on 1 device" in proc.stdout
    assert "4 greedy tokens agree" in proc.stdout
    zero_ratio = [line.split() for line in proc.stdout.splitlines() if line.startswith("cpu-sim:1 ")][-1]
    assert zero_ratio[1] != "0" and zero_ratio[3:5] == ["0", "B"]  # replicated weights (norms, router), no KV heads
    assert "collectives per decode step: 9 allreduce + 1 allgather" in proc.stdout
    err = re.search(r"restored on 1: next logits within (\S+) of an uninterrupted run", proc.stdout)
    assert err and float(err.group(1)) < 1e-4


def test_devices_json_and_table() -> None:
    proc = tw("devices", "cpu-sim:3,mem=64MiB,peer=ring", "--json")
    devs = json.loads(proc.stdout)["devices"]
    assert [d["name"] for d in devs] == ["cpu-sim:0", "cpu-sim:1", "cpu-sim:2"]
    assert devs[0]["total_bytes"] == 64 << 20 and devs[0]["peers"] == ["cpu-sim:1", "cpu-sim:2"]
    listing = tw("devices").stdout
    assert "cpu-sim" in listing and "yes" in listing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("devices", "cpu-sim:0"),
            "tensorweave: error: device spec cpu-sim:0: device count must be between 1 and 256",
        ),
        (("devices", "nosuch"), "tensorweave: error: unknown backend 'nosuch'"),
        (("demo", "--devices", "cpu-sim:2,mem=1KiB"), "tensorweave: error: cpu-sim:0: out of memory"),
        (
            ("demo", "--elements", "10", "--repeat", "1", "-ts", "1,1,1"),
            "tensorweave: error: tensor_split has 3 entries",
        ),
        (("run", "no/such/model", "-p", "hi"), "tensorweave: error: no/such/model: no such file or directory"),
        (
            ("run", str(FIXTURES / "llama" / "expected.npz"), "-p", "hi"),
            f"tensorweave: error: {FIXTURES / 'llama' / 'expected.npz'}: not a model file tensorweave can open",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    proc = tw(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback() -> None:
    proc = tw("--debug", "devices", "cpu-sim:0")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DeviceSpecError" in proc.stderr


RUN = ["run", str(FIXTURES / "qwen3_moe" / "model-f32.gguf"), "-p", "The café pays 42 €", "-n", "10"]


def test_run_prints_the_same_greedy_text_on_one_and_three_devices() -> None:
    one = tw(*RUN)
    three = tw(*RUN, "--devices", "cpu-sim:3", "-ts", "1,2,1", "-sm", "tensor")
    assert one.returncode == 0 and three.returncode == 0, one.stderr + three.stderr
    assert one.stdout == three.stdout and len(one.stdout) > 1  # stdout holds only the generated text
    assert "generated 10 tokens" in one.stderr and "on 3 device(s)" in three.stderr


def test_run_seed_reproduces_sampled_text() -> None:
    sample = [*RUN, "--temp", "1.5", "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01"]
    a, b, c = (
        tw(*sample, "--seed", "3"),
        tw(*sample, "--seed", "3", "--devices", "cpu-sim:2"),
        tw(*sample, "--seed", "4"),
    )
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_run_reasoning_budget_ends_thinking_after_exactly_n_tokens() -> None:
    from tensorweave.loaders.tokenizer import Tokenizer

    model = FIXTURES / "qwen3" / "hf"
    prompt = "<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    common = ["run", str(model), "-p", prompt, "-n", "12", "--ignore-eos"]
    free = tw(*common)
    budget = tw(*common, "--reasoning-budget", "4", "--reasoning-budget-message", " Enough.")
    assert free.returncode == 0 and budget.returncode == 0, free.stderr + budget.stderr
    tok = Tokenizer.from_hf_dir(model)
    four = tok.decode(tok.encode(free.stdout, add_special=False)[:4])
    assert "</think>" not in free.stdout
    assert budget.stdout.startswith(four + " Enough.</think>")  # 4 free tokens, then the forced message and end tag
    assert "warning" not in budget.stderr
    untagged = tw("run", str(FIXTURES / "llama" / "hf"), "-p", "hi", "-n", "2", "--reasoning-budget", "4")
    assert untagged.returncode == 0 and "no thinking tags; --reasoning-budget has no effect" in untagged.stderr


def test_chat_streams_answers_and_saves_a_restorable_conversation(tmp_path: Path) -> None:
    state = tmp_path / "talk.tws"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorweave.cli",
            "chat",
            str(FIXTURES / "qwen3" / "hf"),
            "-n",
            "5",
            "--devices",
            "cpu-sim:2",
            "-ts",
            "3,1",
        ],
        input=f"hello\nand more\n/save {state}\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") == 4 and len(proc.stdout) > 4 * 2 + 2 * 5  # 4 prompts, two 5-token answers
    import tensorweave as tw_api

    resumed = tw_api.load(FIXTURES / "qwen3" / "hf").restore(state)
    assert json.loads(state.with_name("talk.tws.json").read_text())[-1]["role"] == "assistant"
    assert resumed.n_past > 10


@pytest.mark.parametrize("launcher", ["launch", "mpiexec"])
def test_run_with_one_process_per_rank_prints_the_same_text_once(launcher: str) -> None:
    if launcher == "mpiexec" and shutil.which("mpiexec") is None:
        pytest.skip("mpiexec is not installed (pip install 'tensorweave[mpi]')")
    want = tw(*RUN).stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
    if launcher == "launch":
        cmd = [
            sys.executable,
            "-m",
            "tensorweave.cli",
            "launch",
            "-n",
            "2",
            "--timeout",
            "60",
            "--",
            *RUN,
            "-ts",
            "3,1",
        ]
    else:
        cmd = ["mpiexec", "-n", "3", sys.executable, "-m", "tensorweave.cli", *RUN, "-ts", "1,0,2"]
        cmd += ["--communicator", "mpi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want
    assert proc.stderr.count("generated 10 tokens") == 1  # rank 0 alone reports

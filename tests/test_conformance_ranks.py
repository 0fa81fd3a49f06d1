"""The conformance kit cannot pass vacuously: a communicator with one process per rank (shm) is tested in real ranks
that `tensorweave launch` starts, and a wrong one fails there; a section that executes nothing fails the run;
--models takes one model as well as a directory of them, and the summary says where `auto` looked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_conformance import by_id, conformance
from test_plugins import install_plugin

from tensorweave.cli import main
from tensorweave.conformance import FIXTURES, models_note
from tensorweave.conformance.cases import model_cases

OFF_BY_ONE = '''
    """shm whose allreduce leaves rank 1 one too high: a communicator the kit must fail."""
    import tensorweave as tw
    from tensorweave.communicators.shm import ShmCommunicator

    class OffByOneCommunicator(ShmCommunicator):
        name = "off-by-one"

        def allreduce(self, buffers, op="sum"):
            super().allreduce(buffers, op)
            if self.local_ranks[0] == 1:
                for d, b in zip(self.devices, buffers):
                    d.from_host(d.to_host(b) + 1, out=b)

    @tw.hookimpl
    def tensorweave_register_communicators(register):
        register(OffByOneCommunicator)
'''


def test_shm_is_tested_in_three_real_ranks_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--backend", "cpu-sim", "--communicator", "shm", "--world-size", "3", "--max-examples", "2"]
    proc = conformance(*args, "--models", "none", "--report", str(out), "--", "-k", "3]")  # world=3], tp=3]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["summary"]["collectives"]["passed"] == (3 + 3 + 1 + 1) * 5  # all kinds, ops and dtypes at world 3
    assert report["summary"]["end to end"]["passed"] == 2  # the synthetic models at TP=3
    assert report["empty_sections"] == [] and "\nnot supported:" not in proc.stdout


def test_a_wrong_multi_process_communicator_fails_in_the_ranks(tmp_path_factory: pytest.TempPathFactory) -> None:
    site = install_plugin(
        tmp_path_factory, "tw-off-by-one", {"tw_off_by_one.py": OFF_BY_ONE}, {"off-by-one": "tw_off_by_one"}
    )
    out = tmp_path_factory.mktemp("report") / "report.json"
    args = ["--backend", "cpu-sim", "--communicator", "off-by-one", "--max-examples", "2", "--models", "none"]
    selected = "allreduce and sum and 2] and (float32 or int32) or broadcast and float32 and 2]"  # world=2]
    proc = conformance(*args, "--report", str(out), "--", "-k", selected, site=site)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    tests = by_id(json.loads(out.read_text()))
    assert tests["broadcast[dtype=float32,world=2]"]["outcome"] == "passed"
    for dtype in ("float32", "int32"):
        wrong = tests[f"allreduce[op=sum,dtype={dtype},world=2]"]
        assert wrong["outcome"] == "failed" and re.match(
            r"rank 1, example \d+ \(length \d+, seed \d+\): ", wrong["message"]
        )


def test_a_section_that_executes_nothing_fails_the_run(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--backend", "cpu-sim", "--devices", "cpu-sim:1", "--world-size", "2", "--report", str(out)]
    proc = conformance(*args, "--", "-k", "allgather and 2]")  # one device: world 2 is not supported
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "FAILED: a section that executes no test proves nothing:" in proc.stdout
    assert "  collectives: none of its 5 tests executed (5 not supported, 0 skipped)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["exit_status"] == 1 and len(report["empty_sections"]) == 1


def test_models_takes_one_model_or_a_directory_of_them(capsys: pytest.CaptureFixture[str]) -> None:
    def names(p: Path) -> list[str]:
        return [c.name for c in model_cases(p)][2:]  # after the two synthetic models

    # every fixture directory holding a Hugging Face model (gemma3_270m holds only the real model's expectations)
    assert names(FIXTURES) == sorted(d.name for d in FIXTURES.iterdir() if (d / "hf" / "config.json").exists())
    assert names(FIXTURES / "qwen3") == names(FIXTURES / "qwen3" / "hf") == ["qwen3"]
    assert names(FIXTURES / "qwen3" / "model-f32.gguf") == ["model-f32"]
    assert main(["conformance", "--backend", "cpu-sim", "--models", str(FIXTURES / "qwen3" / "meta.json")]) == 2
    assert "meta.json: not a model" in capsys.readouterr().err
    assert models_note("auto", None).startswith(f"none: no fixture models at {FIXTURES}")

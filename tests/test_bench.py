"""``tensorweave plan`` and ``tensorweave bench``: the plan from metadata equals the loaded model's, reads no
tensor data; bench reports pp/tg rows with sane numbers; the commands' tables, JSON and argument errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.cli import main
from tensorweave.core.model import Checkpoint
from tensorweave.core.plugins import registry
from tensorweave.loaders.gguf import GGUFCheckpoint
from tensorweave.loaders.hf import HFCheckpoint
from tensorweave.runtime.bench import bench, plan_model

FIXTURES = Path(__file__).parent / "fixtures" / "models"
SOURCES = sorted(p for d in FIXTURES.iterdir() for p in (d / "hf", d / "model-f32.gguf") if p.exists())
CTX = 48


def _rel(p: Path) -> str:
    return str(p.relative_to(FIXTURES))


def _table(text: str) -> list[dict[str, str]]:
    """The rows of the first table in ``text`` (format.table's layout: header, dashes, rows) as header -> cell."""
    lines = text.splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans, pos = [], 0
    for dashes in lines[k].split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    rows = []
    for line in lines[k - 1 : k] + lines[k + 1 :]:
        if not line.strip():
            break
        rows.append([line[a:b].strip() for a, b in spans])
    return [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names passed to every checkpoint's ``read`` and ``read_held`` (the ways weight data leaves a checkpoint: as
    floats, or as stored), as they happen."""
    seen: list[str] = []

    def spying(orig: Callable[..., Any]) -> Callable[..., Any]:
        def spy(self: Checkpoint, name: str, index: Any) -> Any:
            seen.append(name)
            return orig(self, name, index)

        return spy

    for cls in (HFCheckpoint, GGUFCheckpoint):
        for method in ("read", "read_held"):
            monkeypatch.setattr(cls, method, spying(getattr(cls, method)))
    return seen


@pytest.mark.parametrize("source", SOURCES, ids=_rel)
def test_plan_from_metadata_equals_the_loaded_models_plan_and_reads_no_weight(source: Path, reads: list[str]) -> None:
    mp = plan_model(source, "cpu-sim:3", [3, 1, 1], ctx=CTX)
    read_while_planning = set(reads)
    reads.clear()
    with tw.load(source, devices="cpu-sim:3", tensor_split=[3, 1, 1], ctx=CTX) as model:
        loaded = model.plan
        weights = set(loaded.graph.weights)
    assert weights <= set(reads)  # the spy sees real weight reads: loading does them all
    # Opening a llama GGUF reads its rope_freqs tensor (a rope-scaling setting, no graph weight), as loading does.
    assert not read_while_planning & weights
    assert [d.weight_bytes for d in mp.devices] == loaded.weight_bytes
    assert [d.kv_bytes for d in mp.devices] == loaded.cache_bytes
    assert min(d.weight_bytes for d in mp.devices) > 0 and mp.devices[0].kv_bytes > mp.devices[1].kv_bytes
    assert [c.kind for c in mp.plan.collectives] == [c.kind for c in loaded.collectives]
    assert mp.plan.comm_bytes == loaded.comm_bytes > 0
    assert mp.params == sum(int(np.prod(t.shape)) for t in loaded.graph.weights.values())


def test_plan_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    src = str(FIXTURES / "qwen3_moe" / "hf")
    assert main(["plan", src, "--devices", "cpu-sim:2,mem=400KiB", "-ts", "3,1", "--ctx", "64"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert [(r["device"], r["memory"], r["fits"]) for r in rows] == [
        ("cpu-sim:0", "400.0 KiB", "NO"),  # 3/4 of ~800 KiB of weights does not fit
        ("cpu-sim:1", "400.0 KiB", "yes"),
    ]
    assert "kv cache (64 tok)" in out.splitlines()[1]
    assert any(line.startswith("per decode token:") and "allreduce" in line for line in out.splitlines())
    assert main(["plan", src, "--devices", "cpu-sim:2,mem=400KiB", "-ts", "3,1", "--ctx", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and data["ctx"] == 64 and data["devices"][0]["memory_bytes"] == 400 << 10
    assert [d["fits"] for d in data["devices"]] == [False, True]
    assert data["per_decode_token"]["allreduce"] > 0 and data["per_decode_token"]["bytes"] > 0


def test_plan_for_devices_not_here_needs_a_ratio_per_device(capsys: pytest.CaptureFixture[str]) -> None:
    absent = next((b.name for b in registry().backends.values() if not b.available()), None)
    if absent is None:
        pytest.skip("every backend is available on this machine")
    src = str(FIXTURES / "llama" / "hf")
    assert main(["plan", src, "--devices", f"{absent}:0,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tensorweave: error:") and "-ts" in err and "\n" not in err
    assert main(["plan", src, "--devices", f"{absent}:0,1", "-ts", "1,1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data["devices"]] == ["rank 0", "rank 1"] and data["devices"][0]["fits"] is None


def test_bench_measures_pp_and_tg_with_the_collectives_share() -> None:
    with tw.load(FIXTURES / "qwen3" / "hf", devices="cpu-sim:2", tensor_split=[2, 1], ctx=8) as model:
        res = bench(model, n_prompt=6, n_gen=3, repetitions=2)
    assert [t.name for t in res.tests] == ["pp6", "tg3"]
    for t in res.tests:
        assert len(t.seconds) == 2 and t.tps_mean > 0 and t.tps_std >= 0
        assert 0 < t.collective_share <= 1  # two devices: every step allreduces
    assert [d.kv_bytes > 0 for d in res.devices] == [True, True] and res.ctx == 8


def test_bench_command_table_json_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    src = str(FIXTURES / "llama" / "model-f32.gguf")
    args = ["bench", src, "-p", "5", "-n", "2", "-r", "1", "--devices", "cpu-sim:2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert [(r["model"], r["devices"], r["split"], r["test"]) for r in rows] == [
        ("llama float32", "cpu-sim:2", "1,1", "pp5"),
        ("llama float32", "cpu-sim:2", "1,1", "tg2"),
    ]
    for r in rows:
        mean, pm, std = r["t/s"].split()
        assert float(mean) > 0 and pm == "±" and float(std) >= 0 and 0 <= float(r["coll %"]) <= 100
    memory = _table(out.split("\n\n", 1)[1])
    assert [r["device"] for r in memory] == ["cpu-sim:0", "cpu-sim:1"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["test"] for t in data["tests"]] == ["pp5", "tg2"]
    assert all(t["tokens_per_second"] > 0 and 0 <= t["collective_share"] <= 1 for t in data["tests"])
    for bad in (["-p", "-3"], ["-p", "many"], ["-p", "0", "-n", "0"], ["-p", "8", "--ctx", "4"]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", src, *bad])
        assert exc.value.code == 2
        assert "tensorweave bench: error:" in capsys.readouterr().err

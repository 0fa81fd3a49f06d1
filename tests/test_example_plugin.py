"""The out-of-tree example backend (examples/tensorweave-array-api-strict) after a real ``pip install``: discovered
through its entry point, listed, opening devices, and running a fixture model whose logits match the reference."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from example_site import ROOT, example_site
from test_plugins import plugins_json, run

QWEN3 = ROOT / "tests" / "fixtures" / "models" / "qwen3" / "hf"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return example_site(tmp_path_factory)


def test_plugins_lists_the_example(site: Path) -> None:
    data, stderr = plugins_json(site)
    by_name = {p["name"]: p for p in data["plugins"]}
    plugin = by_name["array-api-strict"]
    assert (plugin["status"], plugin["distribution"], plugin["version"], plugin["builtin"]) == (
        "loaded",
        "tensorweave-array-api-strict",
        "0.1.0",
        False,
    ), plugin["error"]
    assert plugin["hooks"] == ["tensorweave_register_backends"] and plugin["backends"] == ["array-api-strict"]
    assert stderr == ""
    data, _ = plugins_json(site, select="")  # built-ins only: the example is listed as blocked
    assert {p["name"]: p["status"] for p in data["plugins"]}["array-api-strict"] == "blocked"


def test_devices_command(site: Path) -> None:
    proc = run(site, "-m", "tensorweave.cli", "devices", "array-api-strict:2,mem=64MiB", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["devices"]
    assert [(r["name"], r["backend"], r["total_bytes"], r["peers"]) for r in rows] == [
        ("array-api-strict:0", "array-api-strict", 64 << 20, ["array-api-strict:1"]),
        ("array-api-strict:1", "array-api-strict", 64 << 20, ["array-api-strict:0"]),
    ]
    proc = run(site, "-m", "tensorweave.cli", "devices", "array-api-strict:2,peer=ring")
    assert proc.returncode == 2 and "peer must be all or none, not 'ring'" in proc.stderr


def test_fixture_model_runs_at_tp2_like_the_reference(site: Path) -> None:
    code = textwrap.dedent(f"""
        import json, numpy as np, tensorweave as tw
        path, ids = {str(QWEN3)!r}, [3, 17, 52, 9, 100, 7, 7, 64, 1, 250, 31, 8]
        ref = tw.load(path, devices="cpu-sim:1").logits(ids)
        model = tw.load(path, devices="array-api-strict:2")
        got = model.logits(ids)
        sess = model.session()  # incremental decode through the KV cache, one token at a time after a prompt
        steps = np.concatenate([sess.eval(ids[:8])] + [sess.eval([t]) for t in ids[8:]])
        devs = model.executor.devices
        native = model.executor.weights["token_embd"][0].native
        try:
            tw.load(path, devices="array-api-strict:2", dtype="bfloat16")
            refused = ""
        except tw.errors.UnsupportedError as e:
            refused = str(e)
        print(json.dumps(dict(
            diff=float(np.abs(got - ref).max()), steps=float(np.abs(steps - ref).max()),
            namespace=type(native).__module__.split(".")[0], backends=[d.backend.name for d in devs],
            used=[d.memory_info().used for d in devs], refused=refused,
        )))
    """)
    proc = run(site, "-c", code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backends"] == ["array-api-strict"] * 2 and out["namespace"] == "array_api_strict"
    assert out["diff"] <= 1e-4 and out["steps"] <= 1e-4, out
    assert all(u > 0 for u in out["used"])
    assert "array-api-strict has no bfloat16" in out["refused"]


def test_conformance_kit_passes_on_the_example(site: Path, tmp_path: Path) -> None:
    """What a third-party author runs: the kit on their backend after `pip install`; 16-bit floats, which the
    array API standard lacks, come out NOT_SUPPORTED rather than failed."""
    report = tmp_path / "report.json"
    args = ["--backend", "array-api-strict", "--world-size", "2", "--max-examples", "3", "--report", str(report)]
    proc = run(site, "-m", "tensorweave.cli", "conformance", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    totals = data["summary"]
    sections = ("device", "ops", "collectives", "end to end")
    assert all(totals[s]["passed"] > 0 and totals[s]["failed"] == 0 for s in sections), totals
    assert totals["ops"]["not_supported"] > 0 and data["backend"] == "array-api-strict"

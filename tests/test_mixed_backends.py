"""Mixed-backend tensor-parallel groups: one model split over cpu-sim and the pip-installed array-api-strict example
backend, joined by the peer communicator, whose copies between the two backends go through host memory."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from example_site import ROOT, example_site
from test_plugins import run

import tensorweave as tw
from tensorweave.core.device import DeviceSpec
from tensorweave.errors import DeviceSpecError, PluginError

QWEN3 = ROOT / "tests" / "fixtures" / "models" / "qwen3" / "hf"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return example_site(tmp_path_factory)


def test_mixed_group_logits_match_the_reference(site: Path) -> None:
    code = textwrap.dedent(f"""
        import json, numpy as np, tensorweave as tw
        path, ids = {str(QWEN3)!r}, [3, 17, 52, 9, 100, 7, 7, 64, 1, 250, 31, 8]
        ref = tw.load(path, devices="cpu-sim:1").logits(ids)
        runs = []
        for devices, split in [
            ("cpu-sim:1+array-api-strict:1", None),
            ("array-api-strict:1+cpu-sim:1", [3, 1]),  # uneven, the other backend first
            (tw.devices("cpu-sim:2") + tw.devices("array-api-strict:1"), [1, 2, 1]),  # Device objects, 3 ranks
        ]:
            model = tw.load(path, devices=devices, tensor_split=split)
            got = model.logits(ids)
            devs = model.executor.devices
            runs.append(dict(
                diff=float(np.abs(got - ref).max()), comm=model.executor.comm.name,
                names=[d.name for d in devs], peer=[d.stats.peer_copies for d in devs],
                staged=[d.stats.staged_copies for d in devs],
            ))
        try:
            tw.communicator(tw.devices("cpu-sim:1+array-api-strict:1"), "nccl")
            refused = ""
        except tw.errors.UnsupportedError as e:
            refused = str(e)
        print(json.dumps(dict(runs=runs, refused=refused)))
    """)
    proc = run(site, "-c", code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    even, uneven, three = out["runs"]
    for r in out["runs"]:
        assert r["comm"] == "peer" and r["diff"] <= 1e-4, r
    assert even["names"] == ["cpu-sim:0", "array-api-strict:0"] and uneven["names"] == even["names"][::-1]
    for r in (even, uneven):  # two backends, no peer access between them: every copy went through the host
        assert r["peer"] == [0, 0] and all(s > 0 for s in r["staged"]), r
    # cpu-sim:0 and :1 reach each other directly; the array-api-strict device only through the host
    assert three["names"] == ["cpu-sim:0", "cpu-sim:1", "array-api-strict:0"]
    assert three["peer"][0] > 0 and three["peer"][1] > 0 and three["peer"][2] == 0 and three["staged"][2] > 0, three
    assert "cannot span a group that mixes backends array-api-strict, cpu-sim" in out["refused"]
    assert "'peer' communicator spans backends" in out["refused"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cpu-sim:1+cpu-sim:1", "names backend 'cpu-sim' more than once; give it one count (e.g. cpu-sim:2)"),
        ("cpu-sim:1+", "empty part in device spec 'cpu-sim:1+'"),
    ],
)
def test_mixed_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(DeviceSpecError, match=re.escape(message)):
        tw.devices(spec)


def test_mixed_spec_names_unknown_backends_and_is_not_one_backend() -> None:
    with pytest.raises(PluginError, match="unknown backend 'nosuch'"):
        tw.devices("cpu-sim:1+nosuch:1")
    with pytest.raises(DeviceSpecError, match="joins several backends"):
        DeviceSpec.parse("cpu-sim:1+nosuch:1")

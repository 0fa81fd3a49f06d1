"""The conformance kit as a backend author meets it: `tensorweave conformance` passes on cpu-sim with its summary
table and JSON report, and fails on a deliberately broken backend (a throwaway plugin distribution, pip-installed
into a temp dir and found through its real entry point) naming the op, the dtype and the error; declared xfails,
stale declarations, capabilities (not supported), usage errors; the pytest plugin stays inert without its options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_plugins import install_plugin

from tensorweave.cli import main
from tensorweave.conformance.cases import compare
from tensorweave.conformance.plugin import KIT, glob

BROKEN = '''
    """A cpu-sim look-alike with wrong kernels, for the conformance kit's own tests."""
    import numpy as np
    import tensorweave as tw
    from tensorweave.backends.cpu_sim import CpuSimBackend
    from tensorweave.core.device import Capabilities
    from tensorweave.core.ops import OPS

    def off_in(dtype, op):
        def kernel(xp, out, *inputs, **attrs):
            OPS[op].kernel(xp, out, *inputs, **attrs)
            if out.dtype == np.dtype(dtype):
                out[...] = out * 1.01  # 1% off: NMSE 1e-4
        return kernel

    class BrokenBackend(CpuSimBackend):
        name = "broken"
        capabilities = Capabilities(dtypes=frozenset({"float32", "float16", "float64", "int32"}))  # no bfloat16
        kernels = {"silu": off_in("float16", "silu"), "gelu": off_in("float32", "gelu")}
        conformance_xfail = {"op[gelu,dtype=float32]": "gelu is off in float32 (known)", "op[nosuch,*]": "stale"}

    @tw.hookimpl
    def tensorweave_register_backends(register):
        register(BrokenBackend())
'''


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_plugin(
        tmp_path_factory, "tw-broken-backend", {"tw_broken_backend.py": BROKEN}, {"broken": "tw_broken_backend"}
    )


def conformance(*args: str, site: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORWEAVE_PLUGINS"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "tensorweave.cli", "conformance", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in report["tests"]}


def test_cpu_sim_passes_with_a_summary_table(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = conformance("--backend", "cpu-sim", "--world-size", "2", "--max-examples", "2", "--report", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()  # stdout: the summary only; pytest's progress went to stderr
    assert lines[0] == "conformance of backend 'cpu-sim' with communicator 'local' on 2 device(s), world sizes 1..2:"
    assert lines[1].split() == ["section", "passed", "failed", "not", "supported", "xfailed", "xpassed", "skipped"]
    rows = {r.split("  ")[0].strip(): r.split()[-6:] for r in lines[3:9]}
    assert set(rows) == {"device", "ops", "weight formats", "collectives", "end to end", "total"}
    assert all(int(r[0]) > 0 and r[1:] == ["0"] * 5 for r in rows.values()), rows
    assert "passed" in proc.stderr
    report = json.loads(out.read_text())
    tests = by_id(report)
    for tid in (
        "op[matmul,dtype=float16]",
        "held[moe_ffn,format=q4_k]",
        "allreduce[op=sum,dtype=bfloat16,world=2]",
        "round_trip[dtype=bfloat16]",
    ):
        assert tests[tid]["outcome"] == "passed", tests[tid]
    assert tests["op[matmul,dtype=float16]"]["threshold"] == 5e-4 and tests["op[copy,dtype=float32]"]["nmse"] == 0
    models = {t["id"] for t in report["tests"] if t["section"] == "end to end"}
    assert {"model[synthetic-moe,tp=2]", "model[qwen3_moe,tp=2]"} <= models  # the source tree's fixtures: auto
    assert report["summary"]["ops"]["passed"] == 3 * 29 and report["exit_status"] == 0


def test_a_broken_backend_fails_naming_op_dtype_and_error(broken_site: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = conformance("--backend", "broken", "--report", str(out), "--", "-k", "silu or gelu", site=broken_site)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith("  FAILED")]
    assert len(failed) == 1, proc.stdout
    assert re.match(
        r"  FAILED op\[silu,dtype=float16\]: op silu in float16: NMSE \d\.\d\de-0[45] > threshold 1e-07", failed[0]
    )
    assert "stale declaration: backend broken declares xfail 'op[nosuch,*]', which matches no test" in proc.stdout
    assert "   2 x backend broken does not support dtype bfloat16" in proc.stdout  # silu and gelu
    assert re.search(r"^ops +2 +1 +2 +1 +0 +0$", proc.stdout, re.M)  # -k left 6 op tests; gelu f16 passes
    tests = by_id(json.loads(out.read_text()))
    silu = tests["op[silu,dtype=float16]"]
    assert silu["outcome"] == "failed" and 5e-5 < silu["nmse"] < 2e-4  # 1% off
    assert tests["op[silu,dtype=float32]"]["outcome"] == "passed"
    assert tests["op[silu,dtype=bfloat16]"]["outcome"] == "not_supported"
    gelu = tests["op[gelu,dtype=float32]"]
    assert gelu["outcome"] == "xfailed" and "declared by backend broken: gelu is off in float32" in gelu["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nosuch"], "tensorweave: error: unknown backend 'nosuch'; registered: "),
        (["--backend", "cpu-sim", "--communicator", "nccl"], "tensorweave: error: communicator 'nccl' does not drive"),
        (["--backend", "cpu-sim", "--models", "/nonexistent"], "tensorweave: error: /nonexistent: no such directory"),
        (["--backend", "cpu-sim", "--devices", "cpu-sim:0"], "tensorweave: error: device spec cpu-sim:0: device count"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_missing_pytest_or_hypothesis_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # an import of it now fails, as when not installed
    assert main(["conformance", "--backend", "cpu-sim"]) == 2
    assert "pip install 'tensorweave[conformance]'" in capsys.readouterr().err


def test_the_plugin_is_inert_without_its_options(request: pytest.FixtureRequest) -> None:
    pm = request.config.pluginmanager
    assert pm.has_plugin("tensorweave.conformance.plugin")  # loaded through the pytest11 entry point
    assert request.config.getoption("tw_backend") is None
    assert KIT not in request.config.stash and not pm.has_plugin("tensorweave-conformance-recorder")


def test_compare_matches_nan_and_inf_positions_and_signs() -> None:
    want = np.array([1.0, np.nan, np.inf, -2.0], np.float16)
    assert compare(want.copy(), want, 0.0) == (0.0, None)
    for got, words in [
        ([1.0, 0.0, np.inf, -2.0], "NaN positions differ"),
        ([1.0, np.nan, -np.inf, -2.0], "+inf positions differ"),
        ([1.0, np.nan, np.inf, -2.5], "NMSE 5.00e-02 > threshold 1e-07"),
    ]:
        _, problem = compare(np.array(got, np.float16), want, 1e-7)
        assert problem is not None and problem.startswith(words), problem
    assert "float32" in str(compare(want.astype(np.float32), want, 1.0)[1])


def test_declaration_patterns_are_literal_but_for_stars() -> None:
    assert glob("op[silu,dtype=float16]").match("op[silu,dtype=float16]")
    assert not glob("op[silu,dtype=float16]").match("ops")  # "[" is no character class
    assert glob("allreduce[*,world=4]").match("allreduce[op=sum,dtype=bfloat16,world=4]")
    assert not glob("allreduce[*,world=4]").match("allreduce[op=sum,dtype=bfloat16,world=4]x")

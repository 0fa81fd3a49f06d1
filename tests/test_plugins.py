"""Plugins through real entry points: a throwaway distribution is pip-installed into a temporary directory and
a fresh interpreter discovers, lists, selects and blocks it; broken plugins warn and leave the others working."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tensorweave.core import hookspecs
from tensorweave.core.plugins import registry

ROOT = Path(__file__).resolve().parents[1]

PLUGINS = {
    "tw_toy_plugin.py": '''
        """A third-party backend and communicator, registered through the public hooks only."""
        import tensorweave as tw
        from tensorweave.backends.cpu_sim import CpuSimBackend
        from tensorweave.communicators.local import LocalCommunicator

        class ToyBackend(CpuSimBackend):
            name = "toy"
            description = "toy backend from a throwaway plugin"

        class ToyCommunicator(LocalCommunicator):
            name = "toy-comm"

        @tw.hookimpl
        def tensorweave_register_backends(register):
            register(ToyBackend())

        @tw.hookimpl
        def tensorweave_register_communicators(register):
            register(ToyCommunicator)
    ''',
    "tw_broken_plugin.py": 'raise ImportError("needs libfoo.so, which is not installed")\n',
    "tw_typo_plugin.py": """
        import tensorweave as tw

        @tw.hookimpl
        def tensorweave_register_backend(register):  # misspelled: no such hook
            pass
    """,
    "tw_dup_plugin.py": """
        import tensorweave as tw
        from tensorweave.backends.cpu_sim import CpuSimBackend

        @tw.hookimpl
        def tensorweave_register_backends(register):
            register(CpuSimBackend())  # "cpu-sim" is taken by the built-in
    """,
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tw-toy-plugins")
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "tw-toy-plugins"
        version = "0.0.1"

        [tool.setuptools]
        py-modules = ["tw_toy_plugin", "tw_broken_plugin", "tw_typo_plugin", "tw_dup_plugin"]

        [project.entry-points.tensorweave]
        toy = "tw_toy_plugin"
        broken = "tw_broken_plugin"
        typo = "tw_typo_plugin"
        dup = "tw_dup_plugin"
    """)
    )
    for name, code in PLUGINS.items():
        (src / name).write_text(textwrap.dedent(code))
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"pip could not install the throwaway plugin:\n{proc.stderr}"
    return target


def run(site: Path, *args: str, select: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORWEAVE_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if select is not None:
        env["TENSORWEAVE_PLUGINS"] = select
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def plugins_json(site: Path, select: str | None = None) -> tuple[dict[str, Any], str]:
    proc = run(site, "-m", "tensorweave.cli", "plugins", "--json", select=select)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout holds only the JSON; warnings went to stderr
    return data, proc.stderr


def test_builtins_are_registered_through_entry_points() -> None:
    reg = registry()
    assert {"cpu-sim", "local", "peer"} <= {p.name for p in reg.plugins if p.builtin and p.status == "loaded"}
    assert "cpu-sim" in reg.backends and {"local", "peer"} <= set(reg.communicators)


def test_third_party_plugin_is_discovered_and_listed(site: Path) -> None:
    data, _stderr = plugins_json(site)
    by_name = {p["name"]: p for p in data["plugins"]}
    toy = by_name["toy"]
    assert (toy["status"], toy["distribution"], toy["version"], toy["builtin"]) == (
        "loaded",
        "tw-toy-plugins",
        "0.0.1",
        False,
    )
    assert toy["hooks"] == ["tensorweave_register_backends", "tensorweave_register_communicators"]
    assert (toy["backends"], toy["communicators"]) == (["toy"], ["toy-comm"])
    assert "toy" in data["backends"] and "toy-comm" in data["communicators"]
    assert {"cpu-sim", "local", "peer"} <= set(data["backends"]) | set(data["communicators"])
    # The table form names the same things.
    table = run(site, "-m", "tensorweave.cli", "plugins").stdout
    assert re.search(r"toy\s+tw-toy-plugins\s+0\.0\.1\s+loaded", table) and "communicator toy-comm" in table


def test_broken_plugins_warn_and_leave_the_others_working(site: Path) -> None:
    data, stderr = plugins_json(site)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["broken"]["status"] == "failed"
    assert "tensorweave plugin 'broken' (tw_broken_plugin) failed to load: ImportError: needs libfoo.so" in stderr
    assert by_name["typo"]["status"] == "failed" and "tensorweave_register_backend" in by_name["typo"]["error"]
    assert by_name["dup"]["status"] == "failed"
    assert "registered backend 'cpu-sim', which another plugin already provides" in by_name["dup"]["error"]
    assert by_name["toy"]["status"] == "loaded" and by_name["cpu-sim"]["status"] == "loaded"


def test_toy_backend_and_communicator_work(site: Path) -> None:
    code = textwrap.dedent("""
        import numpy as np, tensorweave as tw
        devs = tw.devices("toy:3")
        bufs = [d.from_host(np.full(4, r + 1.0, np.float32)) for r, d in enumerate(devs)]
        tw.communicator(devs, "toy-comm").allreduce(bufs)
        print([d.name for d in devs], devs[2].to_host(bufs[2]).tolist())
    """)
    proc = run(site, "-W", "ignore", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['toy:0', 'toy:1', 'toy:2'] [6.0, 6.0, 6.0, 6.0]"


def test_tensorweave_plugins_env_selects_and_blocks(site: Path) -> None:
    data, stderr = plugins_json(site, select="")  # empty: built-ins only
    status = {p["name"]: p["status"] for p in data["plugins"]}
    assert status == {
        **dict.fromkeys(
            ["cpu-sim", "local", "peer", "shm", "mpi", "nccl", "cuda", "rocm"], "loaded"
        ),  # no GPU/MPI needed
        "toy": "blocked",
        "broken": "blocked",
        "typo": "blocked",
        "dup": "blocked",
    }
    assert "toy" not in data["backends"] and stderr == ""
    data, stderr = plugins_json(site, select="toy, nosuch")
    status = {p["name"]: p["status"] for p in data["plugins"]}
    assert status["toy"] == "loaded" and status["broken"] == "blocked" and "toy" in data["backends"]
    assert "TENSORWEAVE_PLUGINS names plugin 'nosuch', which is not installed" in stderr
    proc = run(site, "-m", "tensorweave.cli", "devices", "toy:2", select="")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "tensorweave: error: unknown backend 'toy'; registered: cpu-sim, cuda, rocm"
    )


def test_every_hookspec_is_documented_and_exercised() -> None:
    doc = (ROOT / "plugins.md").read_text()
    specs = [n for n in dir(hookspecs) if n.startswith("tensorweave_")]
    assert specs
    for name in specs:
        assert f"### `{name}(register)`" in doc, f"{name} is missing from plugins.md's hook reference"
        assert name in PLUGINS["tw_toy_plugin.py"], f"{name} has no throwaway-plugin test"

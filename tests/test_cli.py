"""The `tensorweave` command as a user meets it: exit codes, clean stdout, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
    assert "split over 3 devices with tensor_split 2,0,1" in proc.stdout
    assert "tokens agree" in proc.stdout and "0 device allocations in steady-state decode" in proc.stdout
    zero_ratio = [line.split() for line in proc.stdout.splitlines() if line.startswith("cpu-sim:1 ")][-1]
    assert zero_ratio[1] != "0" and zero_ratio[-2:] == ["0", "B"]  # replicated weights (norms, router), no KV heads
    assert "collectives per decode step: 8 allreduce + 1 allgather" in proc.stdout


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
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    proc = tw(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback() -> None:
    proc = tw("--debug", "devices", "cpu-sim:0")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DeviceSpecError" in proc.stderr

"""The executor with one process per rank: the same programs, each rank running its own, joined by shm (ranks
started by `tensorweave launch`) or mpi (`mpiexec`); every rank's logits equal the unsharded reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from spmd_executor_worker import CFG, STEPS, feeds

from tensorweave.models.synthetic import build, random_weights

WORKER = str(Path(__file__).with_name("spmd_executor_worker.py"))


def reference() -> list[np.ndarray]:
    weights = random_weights(build(CFG, STEPS[0]), 0)
    caches: dict[str, np.ndarray] = {}
    return [build(CFG, n).evaluate(feeds(i), weights, caches)["logits"] for i, n in enumerate(STEPS)]


def check(outdir: Path, world: int) -> None:
    want = reference()
    for rank in range(world):
        got = np.load(outdir / f"rank{rank}.npz")
        for i, w in enumerate(want):
            g = got[f"arr_{i}"]
            assert ((g - w) ** 2).sum() / (w**2).sum() <= 1e-12, (rank, i)


@pytest.mark.parametrize(("world", "tensor_split"), [(2, None), (3, [2, 0, 1]), (4, [1, 1, 1, 1])])
def test_shm_ranks_equal_the_reference(world: int, tensor_split: list[int] | None, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tensorweave.cli", "launch", "-n", str(world), "--timeout", "60", "--"]
    proc = subprocess.run(
        [*cmd, "python", WORKER, str(tmp_path), json.dumps(tensor_split)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    check(tmp_path, world)


@pytest.mark.skipif(
    shutil.which("mpiexec") is None
    or subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode != 0,
    reason="mpi4py and mpiexec are not installed (pip install 'tensorweave[mpi]')",
)
def test_mpi_ranks_equal_the_reference(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(WORKER).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, WORKER, str(tmp_path), "[3, 1]"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    check(tmp_path, 2)

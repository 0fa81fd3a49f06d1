"""The kit's sections for a communicator that runs one process per rank (shm, mpi): real ranks started by
``tensorweave launch -n W`` (``mpiexec -n W`` for mpi), one group per world size, each running the collective
cases and the end-to-end models of that size; the suites then judge what the ranks wrote.

Run as a rank: ``python -m tensorweave.conformance.ranks --backend B --communicator C --max-examples K --models
DIR|none --out DIR``. Every rank runs the same collectives in the same order (examples come from a seeded numpy
generator, not hypothesis: a rank that shrank a failure alone would leave the others waiting), checks its own
results against the float64 reference, and writes ``rank{R}.json`` (case id -> problem or null, and a digest of
what it received, so the suite can check that every rank holds the same bits) after every case, so a rank that
dies leaves what it did. Rank 0 writes each model's logits to ``model-{NAME}.npz``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.communicator import REDUCE_OPS, Communicator
from .cases import assert_reduced, make_inputs, model_cases, split_for

DTYPES = ["float32", "float16", "bfloat16", "float64", "int32"]
KINDS = ("allreduce", "reduce_scatter", "allgather", "broadcast")
SPECIAL_LENGTHS = [0, 1, 2, 3, 7, 8, 9, 64, 1023, 1025]
RANK_TIMEOUT_S = 60.0  # a collective that waits longer has lost a rank
GROUP_TIMEOUT_S = 900.0  # a whole group (every case and model of one world size)


def case_id(kind: str, dtype: str, op: str | None = None) -> str:
    return f"{kind}[{'op=' + op + ',' if op else ''}dtype={dtype}]"


def cases(comm: type[Communicator] | Communicator, backend_dtypes: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(kind, dtype, op) of every collective case the communicator and backend support, in a fixed order."""
    caps = comm.capabilities
    out: list[tuple[str, str, str | None]] = []
    for kind in KINDS:
        for op in REDUCE_OPS if kind in ("allreduce", "reduce_scatter") else [None]:
            if op is not None and op not in caps.ops:
                continue
            out += [(kind, dt, op) for dt in DTYPES if dt in caps.dtypes and dt in backend_dtypes]
    return out


def _example(rng: np.random.Generator, i: int) -> tuple[int, int]:
    """(length, seed) of example ``i``: the lengths that break chunking, small random ones, and large ones."""
    pools = (
        lambda: SPECIAL_LENGTHS[i // 3 % len(SPECIAL_LENGTHS)],
        lambda: int(rng.integers(0, 4097)),
        lambda: int(rng.integers(30_000, 70_001)),
    )
    return pools[i % 3](), int(rng.integers(0, 2**32 - 1))


def run_case(comm: Communicator, kind: str, dtype: str, op: str | None, examples: int) -> tuple[str | None, str]:
    """Run one case's examples on this rank: (the first problem or None, a digest of every result received)."""
    rng = np.random.default_rng(zlib.crc32(case_id(kind, dtype, op).encode()))
    digest, problem = hashlib.sha256(), None
    for i in range(examples):
        length, seed = _example(rng, i)
        try:
            digest.update(_run_example(comm, kind, dtype, op or "sum", rng, i, length, seed).tobytes())
        except AssertionError as e:
            problem = problem or f"rank {comm.local_ranks[0]}, example {i} (length {length}, seed {seed}): {e}"
    return problem, digest.hexdigest()


def _run_example(
    comm: Communicator, kind: str, dtype: str, op: str, rng: np.random.Generator, i: int, length: int, seed: int
) -> np.ndarray:
    """One collective on this rank's device, checked against the reference; what this rank received."""
    dev, rank, world = comm.devices[0], comm.local_ranks[0], comm.world_size
    if kind == "allreduce":
        hosts = make_inputs(world, length, dtype, seed)
        buf = dev.from_host(hosts[rank])
        comm.allreduce([buf], op=op)
        got = dev.to_host(buf)
        assert_reduced(got, hosts, op)
    elif kind == "reduce_scatter":
        sizes = [int(s) for s in rng.integers(0, 501, world)] if i % 2 else None
        rows = sum(sizes) if sizes is not None else min(length, 3000)
        hosts = make_inputs(world, rows, dtype, seed, (2,))
        got = dev.to_host(comm.reduce_scatter([dev.from_host(hosts[rank])], sizes=sizes, op=op)[0])
        parts = sizes or [rows // world + (r < rows % world) for r in range(world)]
        lo, hi = sum(parts[:rank]), sum(parts[: rank + 1])
        assert_reduced(got, [h[lo:hi] for h in hosts], op)
    elif kind == "allgather":
        lengths = [int(n) for n in rng.integers(0, 2001, world)]
        trailing = [(), (3,), (2, 2)][i % 3]
        hosts = [make_inputs(1, n, dtype, seed + r, trailing)[0] for r, n in enumerate(lengths)]
        got = dev.to_host(comm.allgather([dev.from_host(hosts[rank])])[0])
        _assert_bits(got, np.concatenate(hosts, axis=0))
    else:
        root = int(rng.integers(0, world))
        hosts = make_inputs(world, length, dtype, seed)
        buf = dev.from_host(hosts[rank])
        comm.broadcast([buf], root=root)
        got = dev.to_host(buf)
        _assert_bits(got, hosts[root])
    return got


def _assert_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"got {got.shape} {got.dtype}, expected {want.shape} {want.dtype}"
    )
    assert got.tobytes() == want.tobytes(), f"{int((got != want).sum())} entries differ"


def rank_main(argv: Sequence[str] | None = None) -> int:
    """One rank of a kit group: every collective case, then every model at TP = world size."""
    from ..core.plugins import registry
    from ..core.spmd import spmd_from_env

    p = argparse.ArgumentParser(prog="python -m tensorweave.conformance.ranks", allow_abbrev=False)
    p.add_argument("--backend", required=True)
    p.add_argument("--communicator", required=True)
    p.add_argument("--max-examples", type=int, required=True)
    p.add_argument("--models", default="none")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    comm = spmd_from_env(backend=args.backend, name=args.communicator)
    rank, world = comm.local_ranks[0], comm.world_size
    out = Path(args.out)
    results: dict[str, Any] = {}
    backend_dtypes = sorted(registry().backend(args.backend).capabilities.dtypes)
    for kind, dtype, op in cases(comm, backend_dtypes):
        problem, digest = run_case(comm, kind, dtype, op, args.max_examples)
        results[case_id(kind, dtype, op)] = {"problem": problem, "digest": digest}
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    models = None if args.models == "none" else Path(args.models)
    for case in model_cases(models):
        try:
            logits = case.logits(None, comm, split_for(world))
        except Exception as e:  # the suite reports it as this model's failure
            results[f"model[{case.name}]"] = {"problem": f"rank {rank}: {type(e).__name__}: {e}"}
        else:
            results[f"model[{case.name}]"] = {"problem": None}
            if rank == 0:
                np.savez(out / f"model-{case.name}.npz", *logits)
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    comm.close()
    return 0


@dataclass
class Group:
    """What the ranks of one world size reported: per rank, case id -> result; or why the group failed."""

    world: int
    ranks: list[dict[str, Any]]
    out: Path
    failure: str | None

    def check_case(self, kind: str, dtype: str, op: str | None) -> None:
        """AssertionError unless every rank ran the case and found no problem, and all received the same bits."""
        self.check_ran(key := case_id(kind, dtype, op))
        if kind != "reduce_scatter":  # (whose ranks each receive their own part)
            digests = {r[key]["digest"] for r in self.ranks}
            assert len(digests) == 1, f"the {self.world} ranks received different bits"

    def check_ran(self, key: str) -> None:
        missing = [r for r, got in enumerate(self.ranks) if key not in got]
        if missing:
            why = self.failure or "the rank did not report it"
            raise AssertionError(f"{key} at world size {self.world}: no result from rank(s) {missing}: {why}")
        problems = [r[key]["problem"] for r in self.ranks if r[key]["problem"]]
        assert not problems, problems[0]

    def model_logits(self, name: str) -> list[np.ndarray]:
        self.check_ran(f"model[{name}]")
        with np.load(self.out / f"model-{name}.npz") as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]


_groups: dict[tuple[Any, ...], Group] = {}
_scratch: list[tempfile.TemporaryDirectory[str]] = []


def launcher(communicator: str, world: int) -> list[str]:
    """How the ranks of ``communicator`` start: mpiexec for mpi, ``tensorweave launch`` for every other."""
    if communicator == "mpi":
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise FileNotFoundError("mpiexec is not installed (pip install 'tensorweave[mpi]')")
        return [mpiexec, "-n", str(world), sys.executable]
    return [sys.executable, "-m", "tensorweave.cli", "launch", "-n", str(world), "--timeout", str(RANK_TIMEOUT_S), "--"]


def group(backend: str, communicator: str, world: int, max_examples: int, models: Path | None) -> Group:
    """The ranks' reports for ``world``: started once per world size and kit run."""
    key = (backend, communicator, world, max_examples, models)
    if key in _groups:
        return _groups[key]
    if not _scratch:
        _scratch.append(tempfile.TemporaryDirectory(prefix="tw-conformance-ranks-"))
    out = Path(_scratch[0].name) / f"world{world}"
    out.mkdir()
    cmd = [
        *launcher(communicator, world),
        *(["-m", __name__] if communicator == "mpi" else ["python", "-m", __name__]),
        *("--backend", backend, "--communicator", communicator, "--max-examples", str(max_examples)),
        *("--models", str(models) if models else "none", "--out", str(out)),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}  # the launcher sets its own
    if communicator == "mpi":
        env["TENSORWEAVE_TIMEOUT"] = str(RANK_TIMEOUT_S)
    failure = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=GROUP_TIMEOUT_S, env=env)
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
            failure = f"`{' '.join(cmd[:6])} ...` exited with {proc.returncode}: {' | '.join(tail)}"
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = f"cannot run the ranks: {e}"
    ranks = []
    for r in range(world):
        f = out / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {})
    _groups[key] = Group(world, ranks, out, failure)
    return _groups[key]


if __name__ == "__main__":
    sys.exit(rank_main())

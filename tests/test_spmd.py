"""Multi-process communicators for real: shm ranks started by `tensorweave launch`, mpi ranks by `mpiexec`, each
rank a separate process running tests/spmd_worker.py; every result must equal the `local` communicator's,
bitwise. Plus hang safety (a rank that never arrives, a rank killed mid-run) and the launcher's behaviour."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from spmd_worker import case_input, cases

import tensorweave as tw
from tensorweave.cli.launch import rank_env
from tensorweave.communicators.shm import ShmGroup
from tensorweave.core import dtypes
from tensorweave.core.spmd import SpmdEnv, resolve_rank, timeout_from
from tensorweave.errors import CollectiveError

WORKER = str(Path(__file__).with_name("spmd_worker.py"))
HAVE_MPI = (
    shutil.which("mpiexec") is not None
    and subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode == 0
)
needs_mpi = pytest.mark.skipif(
    not HAVE_MPI, reason="mpi4py and mpiexec are not installed (pip install 'tensorweave[mpi]')"
)
MPI_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}


def launch(n: int, *args: str, opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tensorweave.cli", "launch", "-n", str(n), *opts, "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def local_results(world: int) -> dict[str, list[np.ndarray]]:
    devs = tw.devices(f"cpu-sim:{world}")
    comm = tw.communicator(devs, "local")
    out: dict[str, list[np.ndarray]] = {}
    for key, spec in cases(world):
        bufs = [d.from_host(case_input(spec, r)) for r, d in enumerate(devs)]
        kind = spec["kind"]
        if kind == "allreduce":
            for _ in range(spec.get("repeat", 1)):
                comm.allreduce(bufs, op=spec["op"])
        elif kind == "reduce_scatter":
            bufs = comm.reduce_scatter(bufs, sizes=spec["sizes"], op=spec["op"])
        elif kind == "allgather":
            bufs = comm.allgather(bufs)
        else:
            comm.broadcast(bufs, root=spec["root"])
        out[key] = [d.to_host(b) for d, b in zip(devs, bufs, strict=True)]
    return out


def assert_equals_local(outdir: Path, world: int, bitwise: bool = True) -> None:
    expected = local_results(world)
    for rank in range(world):
        got = np.load(outdir / f"rank{rank}.npz")
        assert sorted(got.files) == sorted(expected), f"rank {rank} ran different cases"
        for key, per_rank in expected.items():
            want = per_rank[rank]
            have = got[key].view(want.dtype).reshape(want.shape)
            if bitwise or not key.startswith("allreduce") or "-sum-" not in key or want.dtype == dtypes.int32:
                assert have.tobytes() == want.tobytes(), f"rank {rank}, {key}: differs from local"
            else:  # rounded at each of MPI's combining steps: within world * eps of the inputs' magnitude
                spec = dict(cases(world))[key]
                repeat = spec.get("repeat", 1)  # each call multiplies the magnitude by `world` and adds its error
                magnitude = np.sum([np.abs(case_input(spec, r).astype(np.float64)) for r in range(world)], axis=0)
                magnitude *= world ** (repeat - 1)
                err = np.abs(have.astype(np.float64) - want.astype(np.float64))
                bound = repeat * world * float(dtypes.finfo(want.dtype).eps) * magnitude
                assert np.all(err <= bound), f"rank {rank}, {key}"


@pytest.mark.parametrize(
    ("world", "options"),
    [
        (2, {}),
        (2, {"ordering": "lock", "spin_us": 30}),  # weakly-ordered CPUs' protocol, on x86 too; the bounded spin
        (3, {"piece_bytes": 8192, "chunked_min_bytes": 0, "stage_bytes": 4096}),  # many rounds; the device's memory
        (4, {"piece_bytes": 4096}),
        (4, {"small_max_bytes": 0, "ordering": "lock"}),  # no small path: every allreduce on the general one
    ],
)
def test_shm_equals_local(world: int, options: dict[str, Any], tmp_path: Path) -> None:
    proc = launch(world, "python", WORKER, "shm", str(tmp_path), json.dumps(options))
    assert proc.returncode == 0, proc.stderr
    assert_equals_local(tmp_path, world)


@needs_mpi
@pytest.mark.parametrize(("world", "algorithm"), [(2, "ordered"), (3, "ordered"), (3, "native")])
def test_mpi_equals_local(world: int, algorithm: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            "mpiexec",
            "-n",
            str(world),
            sys.executable,
            WORKER,
            "mpi",
            str(tmp_path),
            json.dumps({"algorithm": algorithm, "stage_bytes": 4096 * (world == 3)}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=MPI_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert_equals_local(tmp_path, world, bitwise=algorithm == "ordered")  # native: MPI's own summation order


def assert_timed_out(output: str, limit: float) -> None:
    """Ranks 0 and 2 each reported a timeout of collective #3 naming rank 1 (lines of ranks may interleave)."""
    reports = re.findall(
        r"TIMEOUT after ([\d.]+)s: (\w+) allreduce #3 \(rank (\d) of 3\)[^\n]*?rank 1 did not arrive", output
    )
    assert sorted(r[2] for r in reports) == ["0", "2"], output
    assert all(float(r[0]) < limit for r in reports), output


def test_shm_rank_that_never_arrives_times_out_everywhere(tmp_path: Path) -> None:
    proc = launch(3, "python", WORKER, "shm", str(tmp_path), "{}", "--hang-check", opts=("--timeout", "1"))
    assert proc.returncode == 0, proc.stderr
    assert_timed_out(proc.stderr, limit=3)  # 1 s timeout, plus process noise


@needs_mpi
def test_mpi_rank_that_never_arrives_times_out_everywhere(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["mpiexec", "-n", "3", sys.executable, WORKER, "mpi", str(tmp_path), '{"timeout": 1}', "--hang-check"],
        capture_output=True,
        text=True,
        timeout=120,
        env=MPI_ENV,
    )
    assert_timed_out(proc.stderr, limit=5)  # 1 s timeout + the 0.5 s diagnosis, plus process noise


@pytest.mark.parametrize(
    ("how", "size"), [("kill", "large"), ("kill", "small"), ("stop", "small"), ("kill-lock", "small")]
)
def test_shm_rank_killed_mid_run_fails_the_others_within_the_timeout(how: str, size: str) -> None:
    """A rank killed (or stopped) mid-loop of large or small allreduces: the others time out naming it and the
    collective's number: a dead process is noticed at once, a stopped one at the deadline."""
    name = f"tw-test-{os.getpid()}-{how}-{size}"
    options = json.dumps({"timeout": 5 if how != "stop" else 1.5, "ordering": "lock" if "lock" in how else "auto"})
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "shm", "-", options, "--loop", *(["--small"] if size == "small" else [])],
            env=rank_env(os.environ, r, 3, name, None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        killed_at = time.monotonic()
        # killed: not reaped until the end, a zombie, as under a careless parent; stopped: alive but silent
        procs[1].send_signal(signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        outs = [procs[r].communicate(timeout=30)[0] for r in (0, 2)]
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert elapsed < (1.5 + 2 if how == "stop" else 4), elapsed  # the dead: noticed by the liveness check
    gave_up = r"rank [02] gave up waiting for them in collective #\d+"
    why = (
        r"no sign of them within the 1.5 s timeout"
        if how == "stop"
        else r"the process of rank 1 \(pid \d+\) has exited"
    )
    seqs = []
    for out in outs:
        found = re.search(
            rf"TIMEOUT after [\d.]+s: shm allreduce #(\d+) \(rank [02] of 3\): rank 1 did not arrive: "
            rf"({why}|{gave_up})",
            out,
        )
        assert found, out
        seqs.append(found[1])
    assert seqs[0] == seqs[1], outs  # both name the collective they were in: the same one


def test_launch_forwards_rank0_stdout_and_prefixes_other_stderr() -> None:
    code = "import os,sys; r=os.environ['TENSORWEAVE_RANK']; print('out', r); print('err', r, file=sys.stderr)"
    proc = launch(3, "python", "-c", code)
    assert proc.returncode == 0
    assert proc.stdout == "out 0\n"
    assert "err 0" in proc.stderr and "[rank 1] err 1" in proc.stderr and "[rank 2] err 2" in proc.stderr


def test_launch_stops_everyone_when_a_rank_dies() -> None:
    code = "import os,time; r=int(os.environ['TENSORWEAVE_RANK']); time.sleep(0 if r == 2 else 60); os._exit(3)"
    t0 = time.monotonic()
    proc = launch(3, "python", "-c", code)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == "tensorweave launch: rank 2 exited with code 3; stopped ranks 0, 1"


def test_launch_runs_tensorweave_subcommands_and_reports_bad_usage() -> None:
    proc = launch(2, "devices", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["backends"]
    bad = subprocess.run(
        [sys.executable, "-m", "tensorweave.cli", "launch", "-n", "0", "--", "devices"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "positive integer" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "tensorweave.cli", "launch", "-n", "2"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "needs a command" in missing.stderr


def test_shm_mismatched_collectives_fail_on_every_rank() -> None:
    code = (
        "import numpy as np, tensorweave as tw\n"
        "from tensorweave.core.spmd import spmd_from_env\n"
        "c = spmd_from_env(); d = c.devices[0]; b = [d.from_host(np.zeros(4 + c.local_ranks[0], np.float32))]\n"
        "try:\n    c.allreduce(b)\nexcept tw.errors.CollectiveError as e:\n    print(e)\n"
        "c.barrier()\n"  # still usable afterwards: the ranks agree where they are
        "print('barrier ok')\n"
        # an `out` that does not fit on rank 1 only: rank 1 still takes part (rank 0 completes), then raises
        "r = c.local_ranks[0]; x = [d.from_host(np.full((2, 3), r, np.float32))]\n"
        "out = [d.empty((4 if r == 0 else 5, 3), np.float32)]\n"
        "try:\n    print('gathered', d.to_host(c.allgather(x, out=out)[0])[:, 0].tolist())\n"
        "except tw.errors.CollectiveError as e:\n    print(e, file=__import__('sys').stderr)\n"
    )
    proc = launch(2, "python", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "ranks called mismatched collectives: rank 1 passes 5 elements while rank 0 passes 4" in proc.stdout
    assert "barrier ok" in proc.stdout
    assert "gathered [0.0, 0.0, 1.0, 1.0]" in proc.stdout  # rank 0's stdout: rank 1 took part
    assert proc.stderr.count("[rank 1] ") == 1, proc.stderr  # ... and then refused its `out`
    assert "out has shape (5, 3) float32, expected (4, 3) float32" in proc.stderr


def test_shm_option_errors_are_one_clear_line() -> None:
    devs = tw.devices("cpu-sim:2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
    with pytest.MonkeyPatch.context() as mp:
        for k in os.environ:
            if k.startswith(("TENSORWEAVE_", "PMI_", "OMPI_", "PMIX_")):
                mp.delenv(k)
        with pytest.raises(CollectiveError, match="ONE device"):
            tw.communicator(devs, "shm", rank=0, world_size=2, shm_name="x")
        with pytest.raises(CollectiveError, match="rank and world size unknown"):
            tw.communicator(devs[:1], "shm")
        with pytest.raises(CollectiveError, match="no rendezvous name"):
            tw.communicator(devs[:1], "shm", rank=0, world_size=1)
        with pytest.raises(CollectiveError, match="timeout must be positive"):
            tw.communicator(devs[:1], "shm", rank=0, world_size=1, shm_name="x", timeout=0)
    assert env is not None


def test_shm_rank0_alone_times_out_naming_the_missing_ranks() -> None:
    devs = tw.devices("cpu-sim:1")
    with pytest.raises(
        tw.errors.CollectiveTimeoutError, match=r"shm init #1 \(rank 0 of 3\): ranks 1, 2 did not arrive"
    ):
        tw.communicator(devs, "shm", rank=0, world_size=3, shm_name=f"tw-alone-{os.getpid()}", timeout=0.3)
    assert not Path(f"/dev/shm/tw-alone-{os.getpid()}").exists()  # rank 0 removed the name when giving up
    with pytest.raises(tw.errors.CollectiveTimeoutError, match="rank 0 did not create segment"):
        tw.communicator(devs, "shm", rank=1, world_size=2, shm_name=f"tw-nobody-{os.getpid()}", timeout=0.3)


def test_spmd_environment() -> None:
    assert SpmdEnv.detect({}) is None
    env = SpmdEnv.detect({"TENSORWEAVE_RANK": "1", "TENSORWEAVE_WORLD_SIZE": "4", "TENSORWEAVE_LOCAL_RANK": "0"})
    assert env == SpmdEnv(1, 4, 0, "shm", "TENSORWEAVE_RANK") and env.device_spec("cuda") == "cuda:0"
    mpi = SpmdEnv.detect({"PMI_RANK": "2", "PMI_SIZE": "3"})
    assert mpi is not None and (mpi.rank, mpi.world_size, mpi.communicator) == (2, 3, "mpi")
    assert mpi.device_spec() == "cpu-sim:1"
    with pytest.raises(CollectiveError, match="set both"):
        SpmdEnv.detect({"TENSORWEAVE_RANK": "0"})
    with pytest.raises(CollectiveError, match="outside"):
        SpmdEnv.detect({"TENSORWEAVE_RANK": "5", "TENSORWEAVE_WORLD_SIZE": "2"})
    with pytest.raises(CollectiveError, match="not an integer"):
        SpmdEnv.detect({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})
    assert resolve_rank(1, 2, "t") == (1, 2)
    assert timeout_from(None, "t", {"TENSORWEAVE_TIMEOUT": "2.5"}) == 2.5 and timeout_from(None, "t", {}) == 300
    with pytest.raises(CollectiveError, match="TENSORWEAVE_TIMEOUT must be a number"):
        timeout_from(None, "t", {"TENSORWEAVE_TIMEOUT": "soon"})


def _in_threads(fns: list[Any]) -> list[Any]:
    """Run one callable per rank, each in a thread of its own (shm groups work between threads too)."""
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except Exception as e:  # handed back to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_shm_group_adopts_rank0_thresholds_and_names_kind_mismatches_on_the_small_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two ranks in one process share one resource-tracker registration (Python < 3.13): keep it out of the way.
    monkeypatch.setattr(resource_tracker, "register", lambda *a: None)
    monkeypatch.setattr(resource_tracker, "unregister", lambda *a: None)
    name = f"tw-adopt-{os.getpid()}"
    groups = _in_threads(
        [
            lambda: ShmGroup(name, 0, 2, timeout=10),
            lambda: ShmGroup(name, 1, 2, timeout=10, small_max_bytes=0, chunked_min_bytes=4096, ordering="lock"),
        ]
    )
    try:
        assert [g.small_max_bytes for g in groups] == [64 << 10] * 2  # rank 0's: every rank takes the same path
        assert [g.chunked_min_bytes for g in groups] == [256 << 10] * 2
        xs = [np.arange(6, dtype=dtypes.bfloat16) + r for r in range(2)]
        want = xs[0].astype(np.float32) + xs[1].astype(np.float32)
        _in_threads([lambda g=g, x=x: g.allreduce(x, "sum") for g, x in zip(groups, xs, strict=True)])
        assert all(x.tobytes() == want.astype(dtypes.bfloat16).tobytes() for x in xs)
        errors = _in_threads([lambda: groups[0].allreduce(xs[0], "sum"), lambda: groups[1].broadcast(xs[1], 0)])
        for e in errors:
            assert isinstance(
                e, CollectiveError
            ) and "rank 1 is in broadcast #3 while rank 0 is in allreduce #3" in str(e), e
    finally:
        for g in groups:
            if isinstance(g, ShmGroup):
                g.close()
    with pytest.raises(CollectiveError, match="ordering must be one of auto, tso, lock"):
        ShmGroup(name + "-x", 0, 1, timeout=1, ordering="weak")


@needs_mpi
def test_mpi_mismatched_collectives_fail_on_every_rank_on_and_off_the_small_path() -> None:
    """Sizes that differ on the small path (one message each), and across its limit (rank 1 on the general path:
    the header rides the same messages, so the ranks still meet): the same error everywhere, the group usable."""
    code = (
        "import numpy as np, tensorweave as tw\n"
        "from mpi4py import MPI\n"
        "c = tw.communicator(tw.devices('cpu-sim:1'), 'mpi', timeout=20); d = c.devices[0]; r = c.local_ranks[0]\n"
        "lines = []\n"
        "for n in ([4, 5, 4], [4, 20_000, 4]):\n"
        "    try:\n        c.allreduce([d.from_host(np.zeros(n[r], np.float32))])\n"
        "    except tw.errors.CollectiveError as e:\n        lines.append(f'{r} {e}')\n"
        "b = [d.from_host(np.full(3, r + 1, np.float32))]; c.allreduce(b); c.barrier()\n"
        "lines.append(f'{r} after {d.to_host(b[0]).tolist()}')\n"
        "every = MPI.COMM_WORLD.gather(lines)\n"  # printed by rank 0 alone: lines of ranks would interleave
        "print(*(line for ls in every or [] for line in ls), sep='\\n')\n"
    )
    proc = subprocess.run(
        ["mpiexec", "-n", "3", sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=MPI_ENV
    )
    assert proc.returncode == 0, proc.stderr
    for r in range(3):
        for seq, count in ((2, 5), (3, 20000)):
            assert (
                f"{r} mpi allreduce #{seq} (rank {r}): ranks called mismatched collectives: "
                f"rank 1 passes {count} elements while rank 0 passes 4" in proc.stdout
            ), proc.stdout
        assert f"{r} after [6.0, 6.0, 6.0]" in proc.stdout, proc.stdout

"""Allreduce latency and bandwidth of the communicators, each against a baseline measured in the same run.

    python benchmarks/collectives.py [--world 2 4] [--sizes 4KiB 1MiB 64MiB] [--repeat 9]
    python benchmarks/collectives.py --processes 2 [--sizes ...]      # needs mpi4py + mpiexec

In-process (default): every in-process communicator on cpu-sim, as a ratio of `local`. Multi-process
(``--processes N``): the script re-runs itself under ``mpiexec -n N`` and measures, per size and dtype,
mpi4py's own Allreduce on numpy arrays (the baseline; bfloat16 through a user-defined op over uint16, since MPI
has no bfloat16), the shm engine on the same numpy arrays (``shm-host``: engine against engine), and the
``shm`` and ``mpi`` communicators on cpu-sim device buffers (what tensorweave users get, contract checks and
staging included). Times are medians of --repeat batches of back-to-back calls after a warm-up. "algbw" is
buffer bytes / time, as nccl-tests reports it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import tensorweave as tw
from tensorweave.core import dtypes
from tensorweave.core.device import parse_size
from tensorweave.core.plugins import registry
from tensorweave.format import table


def median_seconds(comm: tw.core.communicator.Communicator, bufs: list[object], repeat: int) -> float:
    comm.allreduce(bufs)  # warm-up: scratch buffers, worker threads
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        comm.allreduce(bufs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", nargs="+", default=["4KiB", "1MiB", "64MiB"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--processes", type=int, help="multi-process mode: shm and mpi vs mpi4py, under mpiexec")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spmd_worker(args)
        return
    if args.processes:
        cmd = ["mpiexec", "-n", str(args.processes), sys.executable, __file__, "--worker", "--repeat", str(args.repeat)]
        sys.exit(subprocess.call([*cmd, "--sizes", *args.sizes, "--dtypes", *args.dtypes]))
    names = sorted(
        n
        for n, c in registry().communicators.items()
        if c.capabilities.in_process and (c.capabilities.backends is None or "cpu-sim" in c.capabilities.backends)
    )
    names.sort(key=lambda n: n != "local")  # baseline first
    rows = []
    for world in args.world:
        devs = tw.devices(f"cpu-sim:{world}")
        for size in args.sizes:
            nbytes = parse_size(size)
            for dt in args.dtypes:
                n = nbytes // dtypes.to_dtype(dt).itemsize
                host = np.random.default_rng(0).standard_normal(n).astype(dtypes.to_dtype(dt))
                bufs = [d.from_host(host) for d in devs]
                base = None
                for name in names:
                    print(f"world {world} {size} {dt} {name}...", file=sys.stderr)
                    t = median_seconds(tw.communicator(devs, name), bufs, args.repeat)
                    base = base or t
                    rows.append([world, size, dt, name, f"{t * 1e6:.0f}", f"{nbytes / t / 1e9:.2f}", f"{t / base:.2f}"])
    print(table(["world", "size", "dtype", "communicator", "median us", "algbw GB/s", "x local"], rows))


def batch_seconds(op: Callable[[], Any], barrier: Callable[[], Any], nbytes: int, repeat: int) -> float:
    """Median time per call over ``repeat`` batches of back-to-back calls (batches sized by the buffer)."""
    calls = max(3, min(500, (256 << 20) // max(nbytes, 1) // 64))
    op()  # warm-up: segments, scratch buffers, worker threads
    times = []
    for _ in range(repeat):
        barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            op()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def spmd_worker(args: argparse.Namespace) -> None:
    """One rank of --processes mode (started by mpiexec)."""
    from mpi4py import MPI

    from tensorweave.communicators.shm import ShmGroup

    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    name = world.bcast(f"tw-bench-{os.getpid()}" if rank == 0 else None)
    group = ShmGroup(name, rank, n, timeout=60)
    (dev,) = tw.devices("cpu-sim:1")
    shm = tw.communicator([dev], "shm", rank=rank, world_size=n, shm_name=name + "-c")
    mpi = tw.communicator([dev], "mpi")
    bf16_sum = MPI.Op.Create(
        lambda a, b, _t: np.copyto(
            np.frombuffer(b, np.uint16).view(dtypes.bfloat16),
            np.frombuffer(a, np.uint16).view(dtypes.bfloat16).astype(np.float32)
            + np.frombuffer(b, np.uint16).view(dtypes.bfloat16).astype(np.float32),
            casting="unsafe",
        ),
        commute=True,
    )
    rows = []
    for size in args.sizes:
        nbytes = parse_size(size)
        for dt in args.dtypes:
            host = np.random.default_rng(rank).standard_normal(nbytes // dtypes.to_dtype(dt).itemsize)
            host = host.astype(dtypes.to_dtype(dt))
            buf = [dev.from_host(host)]
            native = [host, MPI.FLOAT, MPI.SUM] if dt == "float32" else [host.view(np.uint16), MPI.UINT16_T, bf16_sum]
            cases: dict[str, Callable[[], Any]] = {
                "mpi4py Allreduce": lambda nat=native: world.Allreduce(MPI.IN_PLACE, nat[:2], op=nat[2]),
                "shm-host": lambda h=host: group.allreduce(h, "sum"),
                "shm": lambda b=buf: shm.allreduce(b),
                "mpi": lambda b=buf: mpi.allreduce(b),
            }
            base = None
            for label, op in cases.items():
                if rank == 0:
                    print(f"{n} processes {size} {dt} {label}...", file=sys.stderr)
                # Summing in place doubles the values each call: they reach inf after ~128 calls, and inf arithmetic
                # runs at full speed; only numpy's overflow warnings (printed, and slow to raise) are silenced.
                with np.errstate(over="ignore"):
                    t = batch_seconds(op, world.Barrier, nbytes, args.repeat)
                t = world.allreduce(t, op=MPI.MAX)  # the slowest rank's time is the collective's time
                base = base or t
                rows.append([n, size, dt, label, f"{t * 1e6:.1f}", f"{nbytes / t / 1e9:.2f}", f"{t / base:.2f}"])
    if rank == 0:
        print(table(["procs", "size", "dtype", "implementation", "median us", "algbw GB/s", "x mpi4py"], rows))
    group.close()
    shm.close()
    mpi.close()
    bf16_sum.Free()


if __name__ == "__main__":
    main()

"""One rank of a multi-process communicator test (started by tests/test_spmd.py through launch or mpiexec).

    python tests/spmd_worker.py NAME OUTDIR [OPTIONS_JSON] [--hang-check | --loop [--small]]

Runs every case of ``cases(world)`` through communicator NAME on one cpu-sim device and saves this rank's results
to OUTDIR/rank<R>.npz; the test compares them with the ``local`` communicator's. Inputs derive from the case
seed and the rank, so every process (and the test) can rebuild every rank's input.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import tensorweave as tw
from tensorweave.core import dtypes
from tensorweave.core.spmd import SpmdEnv
from tensorweave.errors import CollectiveTimeoutError

DTYPES = ["float32", "float16", "bfloat16", "float64", "int32"]
OPS = ["sum", "max", "min"]
LENGTHS = [0, 1, 1000, 16_384, 70_000]  # 70k elements: several shm pieces, the 1/n-per-rank reduction;
# 1000 and (in 16-bit) 16384 elements go through shm's small-allreduce path


def make_input(seed: int, rank: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    rng = np.random.default_rng([seed, rank])
    dt = dtypes.to_dtype(dtype)
    if dt == dtypes.int32:
        return rng.integers(-1000, 1000, shape).astype(dt)
    return (rng.standard_normal(shape) * 4).astype(dt)


def cases(world: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, spec) of every collective the worker runs, in the order every rank runs them."""
    seed = 0
    for dt in DTYPES:
        for op in OPS:
            for n in LENGTHS:
                seed += 1
                yield (
                    f"allreduce-{dt}-{op}-{n}",
                    {"kind": "allreduce", "dtype": dt, "op": op, "shape": (n,), "seed": seed},
                )
            seed += 1  # the same small collective again and again: the reused plan and header words
            yield (
                f"allreduce-{dt}-{op}-repeat",
                {"kind": "allreduce", "dtype": dt, "op": op, "shape": (33, 5), "seed": seed, "repeat": 4},
            )
            seed += 1
            sizes = [(7 * r + 3) % 11 for r in range(world)]  # uneven, some zero-size parts at larger worlds
            shape = (sum(sizes), 3)
            yield (
                f"reduce_scatter-{dt}-{op}",
                {"kind": "reduce_scatter", "dtype": dt, "op": op, "shape": shape, "sizes": sizes, "seed": seed},
            )
        for out in (False, True):
            seed += 1
            yield (
                f"allgather-{dt}-{out}",
                {
                    "kind": "allgather",
                    "dtype": dt,
                    "rows": [(5 * r + 2) % 9 for r in range(world)],
                    "out": out,
                    "seed": seed,
                },
            )
        seed += 1
        yield f"broadcast-{dt}", {"kind": "broadcast", "dtype": dt, "shape": (40_000,), "root": world - 1, "seed": seed}


def case_input(spec: dict[str, Any], rank: int) -> np.ndarray:
    shape = (spec["rows"][rank], 2) if spec["kind"] == "allgather" else tuple(spec["shape"])
    return make_input(spec["seed"], rank, shape, spec["dtype"])


def run_case(comm: Any, dev: Any, spec: dict[str, Any], host: np.ndarray) -> np.ndarray:
    buf = dev.from_host(host)
    kind = spec["kind"]
    if kind == "allreduce":
        for _ in range(spec.get("repeat", 1)):
            comm.allreduce([buf], op=spec["op"])
        return dev.to_host(buf)
    if kind == "reduce_scatter":
        return dev.to_host(comm.reduce_scatter([buf], sizes=spec["sizes"], op=spec["op"])[0])
    if kind == "allgather":
        out = [dev.empty((sum(spec["rows"]), 2), host.dtype)] if spec["out"] else None
        return dev.to_host(comm.allgather([buf], out=out)[0])
    comm.broadcast([buf], root=spec["root"])
    return dev.to_host(buf)


def main() -> int:
    name, outdir = sys.argv[1], sys.argv[2]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    env = SpmdEnv.detect()
    assert env is not None, "not started as a rank"
    dev = tw.devices("cpu-sim:1")[0]
    comm = env.connect([dev], name, **options)
    rank, world = comm.local_ranks[0], comm.world_size
    if "--hang-check" in sys.argv:  # rank 1 never joins collective #2: the others must time out naming it
        comm.barrier()
        if rank == 1:
            time.sleep(comm.group.timeout * 2 + 1)  # past the others timing out (and MPI's diagnosis)
            return 0
        t0 = time.monotonic()
        try:
            comm.allreduce([dev.from_host(np.ones(10, np.float32))])
        except CollectiveTimeoutError as e:
            print(f"TIMEOUT after {time.monotonic() - t0:.2f}s: {e}", file=sys.stderr, flush=True)
            return 0
        return 1
    if "--loop" in sys.argv:  # allreduce until a collective fails (the test kills or stops a rank meanwhile)
        size = 1000 if "--small" in sys.argv else 1 << 18  # shm: the small-allreduce path, or the chunked one
        buf = dev.from_host(np.ones(size, np.float32))
        comm.allreduce([buf])
        print("ready", flush=True)
        t0 = time.monotonic()
        try:
            while True:
                t0 = time.monotonic()
                comm.allreduce([buf])
        except CollectiveTimeoutError as e:
            print(f"TIMEOUT after {time.monotonic() - t0:.2f}s: {e}", flush=True)
            return 0
    results = {key: run_case(comm, dev, spec, case_input(spec, rank)) for key, spec in cases(world)}
    comm.barrier()
    np.savez(
        f"{outdir}/rank{rank}.npz", **{k: v.view(np.uint8) for k, v in results.items()}
    )  # bytes: npz knows no bf16
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

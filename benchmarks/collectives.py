"""Allreduce latency and bandwidth of the in-process communicators on cpu-sim, `local` as the baseline.

    python benchmarks/collectives.py [--world 2 4] [--sizes 4KiB 1MiB 64MiB] [--repeat 9]

Prints a table (median of --repeat runs after one warm-up) with each communicator's time as a ratio of
`local`'s in the same run. "algbw" is buffer bytes / time, as nccl-tests reports it.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import tensorweave as tw
from tensorweave.cli import table
from tensorweave.core import dtypes
from tensorweave.core.device import parse_size
from tensorweave.core.plugins import registry


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
    args = ap.parse_args()
    names = sorted(n for n, c in registry().communicators.items() if c.capabilities.in_process)
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


if __name__ == "__main__":
    main()

"""The ``tensorweave`` command. stdout carries only what was asked for (tables or --json); warnings and
progress go to stderr. User errors print one line and exit 2; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import errors
from .core import dtypes
from .core.communicator import open_communicator
from .core.device import Device, DeviceSpec, open_devices
from .core.plugins import registry
from .core.sharding import normalize_split

if TYPE_CHECKING:
    from .core.executor import Executor
    from .core.graph import GraphCache


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = registry()
    rows = [p.as_dict() for p in reg.plugins]
    _emit(
        args,
        {
            "plugins": rows,
            "backends": sorted(reg.backends),
            "communicators": sorted(reg.communicators),
            "models": sorted(reg.models),
            "loaders": sorted(reg.loaders),
        },
        table(
            ["plugin", "distribution", "version", "status", "hooks", "registered"],
            [
                [
                    p.name,
                    p.distribution,
                    p.version,
                    p.status + (f" ({p.error})" if p.error else ""),
                    ", ".join(h.removeprefix("tensorweave_") for h in p.hooks) or "-",
                    ", ".join(
                        f"{kind} {n}"
                        for kind, names in (
                            ("backend", p.backends),
                            ("communicator", p.communicators),
                            ("model", p.models),
                            ("loader", p.loaders),
                        )
                        for n in names
                    )
                    or "-",
                ]
                for p in reg.plugins
            ],
        ),
    )
    return 0


def _device_rows(devs: Sequence[Device]) -> list[dict[str, Any]]:
    return [
        {
            "name": d.name,
            "backend": d.backend.name,
            "total_bytes": m.total,
            "used_bytes": m.used,
            "peers": [o.name for o in devs if o is not d and d.peer_access(o)],
        }
        for d, m in ((d, d.memory_info()) for d in devs)
    ]


def _devices_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["device", "memory", "peers"],
        [[r["name"], errors.format_bytes(r["total_bytes"]), ", ".join(r["peers"]) or "-"] for r in rows],
    )


def cmd_devices(args: argparse.Namespace) -> int:
    reg = registry()
    if not args.spec:
        backends: list[dict[str, Any]] = [
            {
                "name": b.name,
                "available": b.available(),
                "default_communicator": b.default_communicator,
                "dtypes": sorted(b.capabilities.dtypes),
                "description": b.description,
            }
            for b in reg.backends.values()
        ]
        _emit(
            args,
            {"backends": backends},
            table(
                ["backend", "available", "communicator", "dtypes", "description"],
                [
                    [
                        b["name"],
                        "yes" if b["available"] else "no",
                        b["default_communicator"],
                        ",".join(b["dtypes"]),
                        b["description"],
                    ]
                    for b in backends
                ],
            ),
        )
        return 0
    rows = _device_rows(open_devices(args.spec))
    _emit(args, {"devices": rows}, _devices_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulated devices, the plugins, and an allreduce round trip per communicator and dtype, checked."""
    devs = open_devices(args.devices)
    if args.tensor_split is None:  # an uneven default that fits any device count: 3,1,2,1,3,1,...
        args.tensor_split = [(3.0, 1.0, 2.0, 1.0)[i % 4] for i in range(len(devs))]
    normalize_split(args.tensor_split, len(devs))  # a bad -ts fails before any output
    print(f"tensorweave demo on {len(devs)} simulated devices ({args.devices})\n")
    print(_devices_table(_device_rows(devs)))
    reg = registry()
    print(
        f"\nplugins: {', '.join(p.name for p in reg.plugins if p.status == 'loaded')}"
        f"; communicators: {', '.join(sorted(reg.communicators))}\n"
    )
    rng = np.random.default_rng(0)
    n = args.elements
    rows, ok = [], True
    for name, cls in sorted(reg.communicators.items()):
        caps = cls.capabilities
        if not caps.in_process or (caps.backends is not None and devs[0].backend.name not in caps.backends):
            continue  # one-process-per-rank, or made for other devices (nccl: cuda)
        with open_communicator(devs, name) as comm:
            for dt in ("float32", "float16", "bfloat16"):
                host = [rng.standard_normal(n).astype(dtypes.to_dtype(dt)) for _ in devs]
                exact = np.sum([h.astype(np.float64) for h in host], axis=0)
                bufs = [d.from_host(h) for d, h in zip(devs, host, strict=True)]
                times = []
                for _ in range(args.repeat):
                    for d, h, b in zip(devs, host, bufs, strict=True):
                        d.from_host(h, out=b)
                    t0 = time.perf_counter()
                    comm.allreduce(bufs)
                    times.append(time.perf_counter() - t0)
                outs = [d.to_host(b).astype(np.float64) for d, b in zip(devs, bufs, strict=True)]
                err = max(float(np.max(np.abs(o - exact))) for o in outs)
                rtol, _ = dtypes.TOLERANCES[dt]
                good = err <= 4 * rtol * float(np.max(np.abs(exact))) and all((o == outs[0]).all() for o in outs)
                ok &= good
                ms = float(np.median(times)) * 1e3
                rows.append(
                    [
                        name,
                        dt,
                        f"{ms:.2f}",
                        f"{n * dtypes.to_dtype(dt).itemsize / ms / 1e6:.2f}",
                        f"{err:.2e}",
                        "ok" if good else "MISMATCH",
                    ]
                )
    print(f"allreduce(sum) of {n} elements per device, median of {args.repeat} runs, vs a float64 reference:")
    print(table(["communicator", "dtype", "ms", "GB/s per rank", "max abs err", "check"], rows))
    stats = [d.stats for d in devs]
    print(
        f"\ncopies: {sum(s.peer_copies for s in stats)} direct peer, "
        f"{sum(s.staged_copies for s in stats)} staged through host (no peer access on that pair)"
    )
    ok &= _demo_tensor_parallel(devs, args.tensor_split, args.tokens)
    return 0 if ok else 1


def _demo_tensor_parallel(devs: list[Device], tensor_split: list[float], n_new: int) -> bool:
    """A synthetic transformer (dense and MoE layers) split over ``devs`` vs one device: same greedy tokens."""
    from .core.executor import Executor
    from .core.graph import GraphCache
    from .models.synthetic import Config, build, random_weights

    cfg = Config(
        vocab=512,
        hidden=128,
        n_layer=4,
        n_head=8,
        n_kv=4,
        head_dim=16,
        ffn=256,
        n_expert=4,
        top_k=2,
        dense_layers=(0, 1),
        qk_norm=True,
        ctx=64,
    )
    graphs = GraphCache(lambda tokens: build(cfg, tokens))
    prompt = [(7 * i + 3) % cfg.vocab for i in range(16)]
    weights = random_weights(graphs(tokens=len(prompt)), seed=0)
    ref = Executor(open_devices("cpu-sim:1"))
    ex = Executor(devs, tensor_split=tensor_split)
    (ref_ids, ref_logits, ref_s, _), (ids, logits, step_s, allocs) = (
        _greedy(e, graphs, weights, prompt, n_new) for e in (ref, ex)
    )
    nmse = float(((logits - ref_logits) ** 2).sum() / (ref_logits**2).sum())
    plan = ex.plan(graphs(tokens=1))
    same = ids == ref_ids
    split = ",".join(f"{r:g}" for r in plan.ratios)
    print(
        f"\na synthetic transformer (random weights; 4 layers: 2 dense, 2 MoE with 4 experts; 8 heads / 4 KV heads) "
        f"split over "
        f"{len(devs)} devices with tensor_split {split}, against 1 device, {n_new} greedy tokens:"
    )
    rows = [
        [d.name, errors.format_bytes(w), errors.format_bytes(c * cfg.ctx)]
        for d, w, c in zip(devs, plan.weight_bytes, plan.cache_bytes_per_token, strict=True)
    ]
    print(table(["device", "weights", f"kv cache ({cfg.ctx} tokens)"], rows))
    print(
        f"collectives per decode step: {plan.count('allreduce')} allreduce + {plan.count('allgather')} allgather, "
        f"{errors.format_bytes(plan.comm_bytes)} per token"
    )
    print(
        f"tokens {'agree' if same else 'DIFFER'} ({' '.join(map(str, ids[:8]))} ...); logits NMSE {nmse:.1e}; "
        f"decode {1 / step_s:.0f} tok/s on {len(devs)} devices vs {1 / ref_s:.0f} tok/s on 1 "
        f"(simulated devices share this machine's cores); {allocs} device allocations in steady-state decode"
    )
    return same and nmse < 1e-6 and allocs == 0


def cmd_run(args: argparse.Namespace) -> int:
    """Greedy generation from a prompt; one process for all devices, or one rank per process under launch/mpiexec.

    Every rank runs the same steps (the executor gathers the logits to each) and takes the same argmax, so no
    token has to be broadcast; rank 0 alone prints.
    """
    from .core.spmd import SpmdEnv, spmd_from_env
    from .runtime.model import load

    spmd = SpmdEnv.detect()
    common = {"tensor_split": args.tensor_split, "dtype": args.dtype, "ctx": args.ctx}
    if spmd is not None:  # started by `tensorweave launch` or mpiexec: this process is one rank with one device
        backend = DeviceSpec.parse(args.devices or "cpu-sim").backend
        comm = spmd_from_env(backend=backend, name=args.communicator)
        model = load(args.model, communicator=comm, progress=False if spmd.rank else None, **common)
    else:
        model = load(args.model, devices=args.devices or "cpu-sim", communicator=args.communicator, **common)
    printing = spmd is None or spmd.rank == 0
    tok = model.tokenizer
    if tok is None:
        raise errors.ModelFormatError(f"{args.model}: the model has no tokenizer (tokenizer.json or GGUF vocabulary)")
    ids = tok.encode(args.prompt)
    if not ids:
        raise errors.ShapeError("the prompt encodes to no tokens")
    sess, stream, stop = model.session(), tok.decode_stream(skip_special=True), set(tok.eos_ids)
    t0 = time.perf_counter()
    logits = sess.eval(ids)
    t_prompt, generated = time.perf_counter() - t0, 0
    t0 = time.perf_counter()
    for _ in range(args.n_predict):
        nxt = int(np.argmax(logits[-1]))
        if nxt in stop and not args.ignore_eos:
            break
        generated += 1
        if printing:
            print(stream.step(nxt), end="", flush=True)
        if generated < args.n_predict:
            logits = sess.eval([nxt])
    t_gen = time.perf_counter() - t0
    if printing:
        print(stream.flush())
        print(
            f"prompt {len(ids)} tokens {len(ids) / t_prompt:.1f} tok/s, generated {generated} tokens "
            f"{generated / max(t_gen, 1e-9):.1f} tok/s on {model.executor.world_size} device(s)",
            file=sys.stderr,
        )
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        args.parser.error("launch needs a command after --, e.g. tensorweave launch -n 2 -- python script.py")
    return launch(args.nprocs, command, subcommands=set(args.subcommands.choices), timeout=args.timeout)


def _greedy(
    ex: Executor, graphs: GraphCache, weights: dict[str, np.ndarray], prompt: list[int], n_new: int
) -> tuple[list[int], np.ndarray, float, int]:
    """Greedy decoding: (new ids, last-position logits per step, median decode step seconds, steady allocations)."""
    ex.load_weights(graphs(tokens=len(prompt)), weights)
    ids, logits, times, allocs = list(prompt), [], [], 0
    for step in range(n_new + 1):
        new = ids if step == 0 else ids[-1:]
        feeds = {"tokens": np.array(new), "positions": np.arange(len(ids) - len(new), len(ids))}
        before = sum(d.stats.allocations for d in ex.devices)
        t0 = time.perf_counter()
        out = ex.run(graphs(tokens=len(new)), feeds)["logits"][-1]
        times.append(time.perf_counter() - t0)
        if step > 1:  # step 1 is the first decode step: it plans its graph and places its buffers
            allocs += sum(d.stats.allocations for d in ex.devices) - before
        logits.append(out)
        ids.append(int(np.argmax(out)))
    return ids[len(prompt) :], np.array(logits), float(np.median(times[2:] or times)), allocs


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ratios like 3,1,1,1, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _format_count(n: float) -> str:
    """Parameter counts as llama-bench shows them: 124.70 M, 1.24 B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _memory_rows(devices: Sequence[Any], with_capacity: bool) -> list[list[str]]:
    fits = {True: "yes", False: "NO", None: "?"}
    return [
        [
            d.name,
            errors.format_bytes(d.weight_bytes),
            errors.format_bytes(d.kv_bytes),
            errors.format_bytes(d.total_bytes),
        ]
        + ([errors.format_bytes(d.capacity) if d.capacity is not None else "?", fits[d.fits]] if with_capacity else [])
        for d in devices
    ]


def _split_text(ratios: Sequence[float]) -> str:
    return ",".join(f"{r:g}" for r in ratios)


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-device memory and communication of a model split over devices, from its metadata alone."""
    from .runtime.bench import plan_model

    args.devices = args.devices or "cpu-sim"
    mp = plan_model(args.model, args.devices, args.tensor_split, args.dtype, args.ctx)
    p = mp.plan
    text = "\n".join(
        [
            f"{mp.family} {mp.dtype}, {_format_count(mp.params)} params, {errors.format_bytes(mp.weight_bytes)} of "
            f"weights, ctx {mp.ctx}, {p.world_size} device(s) ({args.devices}), split {_split_text(p.ratios)}",
            table(
                ["device", "weights", f"kv cache ({mp.ctx} tok)", "total", "memory", "fits"],
                _memory_rows(mp.devices, with_capacity=True),
            ),
            "",
            f"per decode token: {p.count('allreduce')} allreduce + {p.count('allgather')} allgather, "
            f"{errors.format_bytes(p.comm_bytes)} communicated",
        ]
    )
    _emit(args, mp.to_dict(), text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """llama-bench-style prefill (pp) and decode (tg) speed of a model split over devices."""
    from .runtime.bench import bench
    from .runtime.model import load

    if not args.n_prompt and not args.n_gen:
        args.parser.error("nothing to measure: -p and -n are both 0")
    need = max(args.n_prompt, args.n_gen)  # each test starts from an empty context
    if args.ctx is not None and args.ctx < need:
        args.parser.error(f"--ctx {args.ctx} is shorter than the longest test ({need} tokens)")
    ctx = args.ctx or need
    args.devices = args.devices or "cpu-sim"
    model = load(args.model, args.devices, args.tensor_split, args.dtype, ctx=ctx)
    with model:
        res = bench(model, args.n_prompt, args.n_gen, args.repetitions, args.seed)
    model_name = f"{res.family} {res.dtype}"
    rows = [
        [
            model_name,
            errors.format_bytes(res.weight_bytes),
            _format_count(res.params),
            args.devices,
            _split_text(res.tensor_split),
            t.name,
            f"{t.tps_mean:.2f} ± {t.tps_std:.2f}",
            f"{100 * t.collective_share:.1f}",
        ]
        for t in res.tests
    ]
    text = "\n\n".join(
        [
            table(["model", "size", "params", "devices", "split", "test", "t/s", "coll %"], rows),
            table(["device", "weights", f"kv cache ({res.ctx} tok)", "total"], _memory_rows(res.devices, False)),
        ]
    )
    _emit(args, res.to_dict(), text)
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a token count >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorweave", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the embedded default on simulated devices")
    p.add_argument("--devices", default="cpu-sim:4,peer=ring", help="device spec (default: %(default)s)")
    p.add_argument("--elements", type=int, default=1 << 20, help="elements per buffer (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per case (default: %(default)s)")
    p.add_argument(
        "-ts", "--tensor-split", type=_ratios, help="ratios per device (default: 3,1,2,1, repeated to the device count)"
    )
    p.add_argument("-n", "--tokens", type=_positive_int, default=16, help="tokens to generate (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "run",
        help="generate text from a prompt with a model split over devices (greedy)",
        description="Load MODEL (a Hugging Face directory or a .gguf file), split it over --devices by "
        "--tensor-split, and print the greedy continuation of -p. Under `tensorweave launch -n N` or mpiexec each "
        "rank holds only its shard and rank 0 prints.",
    )
    p.add_argument("model", help="Hugging Face model directory or .gguf file")
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("-n", "--n-predict", type=_positive_int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--devices", help="device spec (default: cpu-sim; per rank under launch/mpiexec: its backend)")
    p.add_argument("-ts", "--tensor-split", type=_ratios, help="ratios per device, e.g. 3,1 (default: even)")
    p.add_argument(
        "-sm", "--split-mode", choices=["tensor"], default="tensor", help="accepted for llama.cpp familiarity"
    )
    p.add_argument("--communicator", help="communicator name (default: the backend's, or the launcher's)")
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's; quantized GGUF: float32)")
    p.add_argument("--ctx", type=_positive_int, help="KV-cache length in tokens (default: the model's, at most 4096)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "plan",
        help="per-device memory and communication of a model split over devices, from metadata alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan MODEL (a Hugging Face directory or a .gguf file) over --devices split by --tensor-split,\n"
        "reading only its config and tensor index (no weights are read or placed).\n\n"
        "columns: device = the device (rank N where the backend is not available here); weights = its weight\n"
        "slices; kv cache = its KV-cache slice at --ctx tokens; total = weights + kv cache (activation buffers\n"
        "come on top); memory = the device's memory (cpu-sim: mem= or host RAM; ? when unknown); fits = total <=\n"
        "memory. Then the collectives of one decode token (allreduce / allgather counts) and the bytes they carry.",
    )
    p.add_argument("model", help="Hugging Face model directory or .gguf file")
    p.add_argument(
        "--devices",
        default="cpu-sim",
        help="device spec, e.g. cpu-sim:4,mem=8GiB or cuda:0,1 (a backend not available here needs -ts) "
        "(default: %(default)s)",
    )
    p.add_argument("-ts", "--tensor-split", type=_ratios, help="ratios per device, e.g. 3,1 (default: even)")
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's; quantized GGUF: float32)")
    p.add_argument("--ctx", type=_positive_int, help="KV-cache length in tokens (default: the model's, at most 4096)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "bench",
        help="prefill and decode speed like llama-bench (pp/tg tok/s), memory, share of time in collectives",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load MODEL split over --devices and measure, like llama-bench, prefill of a -p token prompt\n"
        "(test ppP) and decoding of -n tokens one at a time (test tgN), from random token ids, each after one\n"
        "warm-up and -r times in a fresh session.\n\n"
        "columns: model = family and dtype; size = all weight bytes; params = parameter count; devices, split =\n"
        "the device spec and ratios; test = ppP or tgN; t/s = tokens per second, mean ± sample std over the\n"
        "repetitions; coll % = share of the measured time spent inside communicator calls (allreduce,\n"
        "allgather). Below: per-device weights and KV cache (at --ctx) bytes.",
    )
    p.add_argument("model", help="Hugging Face model directory or .gguf file")
    p.add_argument("-p", "--n-prompt", type=_count, default=512, help="prompt tokens, 0 skips pp (default: 512)")
    p.add_argument("-n", "--n-gen", type=_count, default=128, help="generated tokens, 0 skips tg (default: 128)")
    p.add_argument("-r", "--repetitions", type=_positive_int, default=3, help="repetitions per test (default: 3)")
    p.add_argument("--devices", default="cpu-sim", help="device spec (default: %(default)s)")
    p.add_argument("-ts", "--tensor-split", type=_ratios, help="ratios per device, e.g. 3,1 (default: even)")
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's; quantized GGUF: float32)")
    p.add_argument("--ctx", type=_positive_int, help="KV-cache length in tokens (default: max(-p, -n))")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench, parser=p)
    p = sub.add_parser("devices", help="list backends, or the devices a spec names")
    p.add_argument("spec", nargs="?", help="device spec, e.g. cpu-sim:4,mem=256MiB,peer=ring")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("plugins", help="list plugins, their hooks and what they registered")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser(
        "launch",
        help="run N ranks of a command on this host, joined by the shm communicator",
        description="Run N ranks of `tensorweave ARGS` (or `python ...`, a script, any program) on this host. "
        "Rank 0's stdout is printed; other ranks' stderr is prefixed [rank K]; if a rank fails, the others stop.",
    )
    p.add_argument("-n", "--nprocs", type=_positive_int, required=True, help="number of ranks")
    p.add_argument("--timeout", type=float, help="collective timeout in seconds (TENSORWEAVE_TIMEOUT; default 300)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the command every rank runs")
    p.set_defaults(func=cmd_launch, parser=p, subcommands=sub)  # read when run: later subcommands count too
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except errors.TensorweaveError as e:
        if args.debug:
            raise
        print(f"tensorweave: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tensorweave plugins | head`: the reader left; not an error worth a traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open so the interpreter's final flush is quiet
        return 141


if __name__ == "__main__":
    sys.exit(main())

"""``tensorweave plugins | devices | plan | bench``: what is installed, what a device spec opens, and what a model
split over devices needs (from metadata) and achieves (llama-bench-style speed)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import errors
from ..core.device import Device
from ..core.plugins import open_devices, registry
from ..format import format_count, memory_rows, split_text, table
from .generate import warn_beyond_trained
from .options import emit, model_args, positive_int

if TYPE_CHECKING:
    from ..runtime.kvcache import CacheTypes


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = registry()
    rows = [p.as_dict() for p in reg.plugins]
    emit(
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


def device_rows(devs: Sequence[Device]) -> list[dict[str, Any]]:
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


def devices_table(rows: list[dict[str, Any]]) -> str:
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
        emit(
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
    rows = device_rows(open_devices(args.spec))
    emit(args, {"devices": rows}, devices_table(rows))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-device memory and communication of a model split over devices, from its metadata alone."""
    from ..runtime.bench import plan_model

    args.devices = args.devices or "cpu-sim"
    mp = plan_model(args.model, args.devices, args.tensor_split, args.dtype, args.ctx, args.cache_dtype)
    warn_beyond_trained(mp.ctx, mp.trained_ctx)
    p, host = mp.plan, mp.host
    text = "\n".join(
        [
            f"{mp.family} {mp.dtype}, {format_count(mp.params)} params, {errors.format_bytes(mp.weight_bytes)} of "
            f"weights, ctx {mp.ctx}, {p.world_size} device(s) ({args.devices}), split {split_text(p.ratios)}",
            table(
                ["device", "weights", kv_header(mp.ctx, mp.cache_types, mp.dtype), "total", "memory", "fits"],
                memory_rows(mp.devices, with_capacity=True),
            ),
            *(  # a recurrent model's states are a fixed part of its "kv cache" column, whatever the context
                [f"of which recurrent state: {', '.join(errors.format_bytes(b) for b in p.state_bytes)}"]
                if any(p.state_bytes)
                else []
            ),
            "",
            *(
                []
                if host is None
                else [
                    f"host memory, which {len(host.devices)} of these devices share: "
                    f"{errors.format_bytes(host.need_bytes)} needed of {errors.format_bytes(host.capacity)}: "
                    f"{'fits' if host.fits else 'does NOT fit'}"
                ]
            ),
            f"weights as held: {format_mix(mp.formats)}",
            *[f"note: {n}" for n in p.notes],
            f"per decode token: {p.count('allreduce')} allreduce + {p.count('allgather')} allgather, "
            f"{errors.format_bytes(p.comm_bytes)} communicated",
        ]
    )
    emit(args, mp.to_dict(), text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """llama-bench-style prefill (pp) and decode (tg) speed of a model split over devices."""
    from ..runtime.bench import bench
    from ..runtime.model import load, open_checkpoint

    ckpt = open_checkpoint(args.model)  # metadata only: the context it was trained for
    trained = ckpt.config.ctx
    ckpt.close()
    # llama-bench's defaults, shortened to what the model was trained for
    args.n_prompt = min(PP_DEFAULT, trained) if args.n_prompt is None else args.n_prompt
    args.n_gen = min(TG_DEFAULT, trained) if args.n_gen is None else args.n_gen
    if not args.n_prompt and not args.n_gen:
        args.parser.error("nothing to measure: -p and -n are both 0")
    need = max(args.n_prompt, args.n_gen)  # each test starts from an empty context
    if args.ctx is not None and args.ctx < need:
        args.parser.error(f"--ctx-size {args.ctx} is shorter than the longest test ({need} tokens)")
    ctx = args.ctx or need
    warn_beyond_trained(ctx, trained)
    args.devices = args.devices or "cpu-sim"
    model = load(
        args.model,
        args.devices,
        args.tensor_split,
        args.dtype,
        communicator=args.communicator,
        ctx=ctx,
        cache_dtype=args.cache_dtype,
    )
    with model:
        res = bench(model, args.n_prompt, args.n_gen, args.repetitions, args.seed)
    model_name = f"{res.family} {res.dtype}"
    rows = [
        [
            model_name,
            res.weight_format,
            errors.format_bytes(res.weight_bytes),
            format_count(res.params),
            args.devices,
            split_text(res.tensor_split),
            t.name,
            f"{t.tps_mean:.2f} ± {t.tps_std:.2f}",
            f"{100 * t.collective_share:.1f}",
        ]
        for t in res.tests
    ]
    text = "\n\n".join(
        [
            table(["model", "weights", "size", "params", "devices", "split", "test", "t/s", "coll %"], rows),
            table(
                ["device", "weights", kv_header(res.ctx, res.cache_types, res.dtype), "total"],
                memory_rows(res.devices, False),
            ),
        ]
    )
    emit(args, res.to_dict(), text)
    return 0


PP_DEFAULT, TG_DEFAULT = 512, 128  # llama-bench's

DEVICES_HELP = """Without SPEC: the registered backends, whether each is available here, its communicator and dtypes.
With SPEC: the devices it opens, their memory and which pairs have peer access.

A device spec is BACKEND[:ARGS][,key=value...]; several backends join with + into one group:
  cpu-sim[:COUNT][,mem=SIZE][,peer=TOPOLOGY][,threads=K]
      COUNT simulated devices in this process (default 1); mem= caps each one (default: the host's RAM,
      which all of them share); peer=all|none|ring|0-1,2-3 says which pairs copy directly (others stage
      through the host); threads= BLAS threads per device (default: cores // COUNT).
  cuda | cuda:0,1 | cuda:0,0,0[,mem=SIZE][,peer_access=auto|on|off]
      every GPU, those ordinals, or logical devices sharing one GPU (rocm: the same for AMD GPUs).
  cpu-sim:1+cuda:0
      a group that mixes backends (its communicator must drive both).
Sizes are like 256MiB, 8GiB, 1.5GB. Plugins add backends and their own spec grammar (tensorweave plugins)."""


def kv_header(ctx: int, types: CacheTypes | None, compute: str) -> str:
    """The KV-cache column's title: its length, and its types where -ctk/-ctv changed them (as llama-bench shows
    type_k/type_v only then)."""
    changed = types is not None and types.names != (compute, compute)
    return f"kv cache ({ctx} tok{f', {types}' if changed else ''})"


def format_mix(mix: dict[str, int]) -> str:
    """``{"q8_0": 900, "f32": 100}`` -> "q8_0 900 B (90%), f32 100 B (10%)"."""
    total = sum(mix.values()) or 1
    return ", ".join(f"{k} {errors.format_bytes(b)} ({100 * b / total:.0f}%)" for k, b in mix.items())


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a token count >= 0, got {text!r}")
    return value


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``plan``, ``bench``, ``devices`` and ``plugins`` subcommands."""
    p = sub.add_parser(
        "plan",
        help="per-device memory and communication of a model split over devices, from metadata alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan MODEL (a Hugging Face directory or a .gguf file) over --devices split by --tensor-split,\n"
        "reading only its config and tensor index (no weights are read or placed).\n\n"
        "columns: device = the device (rank N where the backend is not available here); weights = its weight\n"
        "slices; kv cache = its KV-cache slice at --ctx tokens; total = weights + kv cache (activation buffers\n"
        "come on top); memory = the device's memory (cpu-sim: mem= or host RAM; ? when unknown); fits = total <=\n"
        "memory. Then the weights by held format (16-bit and quantized weights stay as stored), notes on weights\n"
        "converted at load and split units widened to whole quantization blocks, and the collectives of one decode\n"
        "token (allreduce / allgather counts) and the bytes they carry.",
    )
    model_args(p, devices="device spec, e.g. cpu-sim:4,mem=8GiB or cuda:0,1 (a backend not available here needs -ts)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "bench",
        help="prefill and decode speed like llama-bench (pp/tg tok/s), memory, share of time in collectives",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load MODEL split over --devices and measure, like llama-bench, prefill of a -p token prompt\n"
        "(test ppP) and decoding of -n tokens one at a time (test tgN), from random token ids, each after one\n"
        "warm-up and -r times in a fresh session.\n\n"
        "columns: model = family and compute dtype; weights = the formats weights are held in, most bytes first\n"
        "(like llama-bench's type: q8_0+f32); size = all weight bytes as held; params = parameter count;\n"
        "devices, split = the device spec and ratios; test = ppP or tgN; t/s = tokens per second, mean ± sample\n"
        "std over the repetitions; coll % = share of the measured time spent inside communicator calls (allreduce,\n"
        "allgather). Below: per-device weights and KV cache (at --ctx) bytes.",
    )
    model_args(p, ctx="KV-cache length in tokens (default: max(-p, -n))")
    p.add_argument("--communicator", help="communicator name (default: the backend's)")
    p.add_argument(
        "-p", "--n-prompt", type=count, help=f"prompt tokens, 0 skips pp (default: {PP_DEFAULT}, at most the model's)"
    )
    p.add_argument(
        "-n", "--n-gen", type=count, help=f"generated tokens, 0 skips tg (default: {TG_DEFAULT}, at most the model's)"
    )
    p.add_argument("-r", "--repetitions", type=positive_int, default=3, help="repetitions per test (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench, parser=p)
    p = sub.add_parser(
        "devices",
        help="list backends, or the devices a spec names",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DEVICES_HELP,
    )
    p.add_argument("spec", nargs="?", help="device spec, e.g. cpu-sim:4,mem=256MiB,peer=ring")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("plugins", help="list plugins, their hooks and what they registered")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

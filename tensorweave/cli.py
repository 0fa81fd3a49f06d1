"""The ``tensorweave`` command. stdout carries only what was asked for (tables or --json); warnings and
progress go to stderr. User errors print one line and exit 2; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import errors
from .core import dtypes
from .core.device import Device, DeviceSpec
from .core.plugins import open_communicator, open_devices, registry
from .core.sharding import normalize_split
from .runtime.session import TextStream

if TYPE_CHECKING:
    from .runtime.model import Model


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
    ok &= _demo_tensor_parallel(args.devices, args.tensor_split, args.tokens)
    return 0 if ok else 1


DEMO_CONFIG = {  # a Qwen3-MoE-style model: 2 dense and 2 MoE layers, GQA, q/k norms; 9.5M parameters, 36 MiB
    "model_type": "qwen3_moe",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "mlp_only_layers": [0, 1],
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
DEMO_TEXT = (
    "tensorweave runs a transformer model split across several devices, whatever vendor the devices come from. "
    "Every layer's weights and its KV cache are divided by heads and columns; partial sums meet in an allreduce. "
)


def _write_demo_model(directory: Path) -> None:
    """The embedded default: a byte-level BPE tokenizer trained on DEMO_TEXT and seeded random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .loaders.hf import save_pretrained
    from .models.synthetic import random_weights

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([DEMO_TEXT], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {**DEMO_CONFIG, "vocab_size": tok.get_vocab_size(), "eos_token_id": 0}
    family = registry().models["qwen3_moe"]
    weights = random_weights(family.build(family.config_from_hf(config), 1), seed=0)
    save_pretrained(directory, config, weights)


def _demo_tensor_parallel(spec: str, tensor_split: list[float], n_new: int) -> bool:
    """The embedded model written to a temp dir, loaded at TP=1 and over ``spec`` split by ``tensor_split``:
    the same greedy tokens, each device's memory, tok/s, and a state saved on one split and restored on the other."""
    import tempfile

    from .runtime.model import load
    from .runtime.session import Generation

    with tempfile.TemporaryDirectory(prefix="tensorweave-demo-") as tmp:
        d = Path(tmp)
        _write_demo_model(d)
        one = load(d, devices="cpu-sim:1", progress=False)
        tp = load(d, devices=spec, tensor_split=tensor_split, progress=False)
        prompt = "tensorweave runs a transformer model"
        runs = [m.generate(prompt, n_new, ignore_eos=True) for m in (one, tp)]
        (g1, gn) = (g for g in runs if isinstance(g, Generation))
        plan, cfg = tp.plan, tp.config
        n = tp.executor.world_size
        split = ",".join(f"{r:g}" for r in plan.ratios)
        size = (d / "model.safetensors").stat().st_size
        print(
            f"\nthe embedded model: {cfg.n_layer} layers (2 dense, 2 MoE with {cfg.n_expert} experts), "
            f"{cfg.n_head} heads / {cfg.n_kv} KV heads, random weights (the text is noise; what matters is that "
            f"both runs agree), written to a temp dir as a Hugging Face checkpoint, {errors.format_bytes(size)} "
            f"loaded on {n} devices with tensor_split {split} and on 1 device:"
        )
        rows = [
            [dev.name, errors.format_bytes(w), errors.format_bytes(c), f"{w / max(sum(plan.weight_bytes), 1):.0%}"]
            for dev, w, c in zip(tp.executor.devices, plan.weight_bytes, plan.cache_bytes, strict=True)
        ]
        print(table(["device", "weights", f"kv cache ({cfg.ctx} tokens)", "share"], rows))
        print(
            f"collectives per decode step: {plan.count('allreduce')} allreduce + {plan.count('allgather')} "
            f"allgather, {errors.format_bytes(plan.comm_bytes)} per token"
        )
        same = g1.tokens == gn.tokens
        print(
            f"{n_new} greedy tokens {'agree' if same else 'DIFFER'}: {' '.join(map(str, gn.tokens[:10]))} ... = "
            f"{gn.text[:48]!r}...\ndecode {gn.tokens_per_second:.0f} tok/s on {n} devices vs "
            f"{g1.tokens_per_second:.0f} tok/s on 1 (simulated devices share this machine's cores)"
        )
        # a conversation's state saved on the split run, resumed on one device
        sess = tp.session()
        sess.eval(tp.tokenizer.encode(prompt) + gn.tokens)
        sess.save(d / "state.tws")
        resumed = one.restore(d / "state.tws").eval([1, 2, 3])
        straight = one.logits(one.tokenizer.encode(prompt) + gn.tokens + [1, 2, 3])[-3:]
        err = float(np.abs(resumed - straight).max())
        print(
            f"state saved on {n} devices ({sess.n_past} tokens) and restored on 1: next logits within "
            f"{err:.1e} of an uninterrupted run"
        )
        tp.close()
        one.close()
    return same and err < 1e-4


def cmd_run(args: argparse.Namespace) -> int:
    """Generate from a prompt; one process for all devices, or one rank per process under launch/mpiexec.

    Every rank runs the same steps (the executor gathers the logits to each) and samples with the same seed (rank
    0's, broadcast), so every rank picks the same token without a broadcast per step; rank 0 alone prints.
    """
    model, printing = _load_for_cli(args)
    if model.tokenizer is None:
        raise errors.ModelFormatError(f"{args.model}: the model has no tokenizer (tokenizer.json or GGUF vocabulary)")
    _check_reasoning_tags(args, model, printing)
    stream = model.generate(
        args.prompt, args.n_predict, stream=True, stop=args.stop, ignore_eos=args.ignore_eos, **_sampling(args)
    )
    assert isinstance(stream, TextStream)
    for piece in stream:
        if printing:
            print(piece, end="", flush=True)
    if printing:
        g = stream.result
        print()
        print(
            f"prompt {g.prompt_tokens} tokens {g.prompt_tokens_per_second:.1f} tok/s, generated {len(g.tokens)} "
            f"tokens {g.tokens_per_second:.1f} tok/s on {model.executor.world_size} device(s) ({g.finish_reason})",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive conversation: each answer streams as it is generated; the session keeps the conversation's
    KV cache, so a turn evaluates only its new tokens. Commands: /save FILE, /load FILE, /reset, /exit."""
    model, _ = _load_for_cli(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise errors.ModelFormatError(f"{args.model}: the model has no chat template; use `tensorweave run`")
    _check_reasoning_tags(args, model, True)
    sess = model.session()
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    params = _sampling(args)
    print(
        f"{model!r}\n/exit or Ctrl-D ends, /reset forgets, /save FILE and /load FILE keep a conversation",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages, sess = messages[:1] if args.system else [], model.session()
            continue
        if line.startswith(("/save ", "/load ")):
            path = line[6:].strip()
            if line.startswith("/save"):
                sess.save(path)
                Path(path + ".json").write_text(json.dumps(messages))
            else:
                sess, messages = model.restore(path), json.loads(Path(path + ".json").read_text())
            print(f"{line[1:5]}d {path} ({sess.n_past} tokens)", file=sys.stderr)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        stream = sess.chat(messages, args.n_predict, stream=True, stop=args.stop, ignore_eos=args.ignore_eos, **params)
        assert isinstance(stream, TextStream)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": stream.result.text})
        params = {}  # later turns continue the sampler (its RNG and penalties' history)


def _load_for_cli(args: argparse.Namespace) -> tuple[Model, bool]:
    """The model for run/chat: all devices in this process, or this rank's under launch/mpiexec; and whether this
    process prints (rank 0)."""
    from .core.spmd import SpmdEnv, spmd_from_env
    from .runtime.model import load

    spmd = SpmdEnv.detect()
    common = {"tensor_split": args.tensor_split, "dtype": args.dtype, "ctx": args.ctx}
    if spmd is None:
        return load(args.model, devices=args.devices or "cpu-sim", communicator=args.communicator, **common), True
    # started by `tensorweave launch` or mpiexec: this process is one rank with one device
    backend = DeviceSpec.parse(args.devices or "cpu-sim").backend
    comm = spmd_from_env(backend=backend, name=args.communicator)
    model = load(args.model, communicator=comm, progress=False if spmd.rank else None, **common)
    if args.seed is None and args.temp > 0:
        args.seed = _shared_seed(model)
    return model, spmd.rank == 0


def _shared_seed(model: Model) -> int:
    """Rank 0's random seed on every rank: ranks must sample the same tokens."""
    dev = model.executor.devices[0]
    buf = dev.from_host(np.array([np.random.default_rng().integers(0, 2**31 - 1)], np.int32))
    model.executor.comm.broadcast([buf])
    return int(dev.to_host(buf)[0])


def _check_reasoning_tags(args: argparse.Namespace, model: Model, printing: bool) -> None:
    """--reasoning-budget on a model without thinking tags does nothing; say so rather than silently ignore it."""
    from .runtime.sampling import reasoning_tags

    if args.reasoning_budget >= 0 and printing and reasoning_tags(model.family.name, model.tokenizer) is None:
        print(
            f"tensorweave: warning: this {model.family.name} model has no thinking tags; --reasoning-budget has no "
            "effect",
            file=sys.stderr,
        )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "temperature": args.temp,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "repeat_last_n": args.repeat_last_n,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "seed": args.seed,
        "reasoning_budget": args.reasoning_budget,
        "reasoning_budget_message": args.reasoning_budget_message,
    }


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        args.parser.error("launch needs a command after --, e.g. tensorweave launch -n 2 -- python script.py")
    return launch(args.nprocs, command, subcommands=set(args.subcommands.choices), timeout=args.timeout)


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import run

    extra = list(args.pytest_args)
    return run(
        args.backend,
        args.communicator,
        args.world_size,
        args.max_examples,
        args.report,
        args.devices,
        args.models,
        extra[1:] if extra[:1] == ["--"] else extra,
    )


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ratios like 3,1,1,1, got {text!r}") from None


def _seed(text: str) -> int | None:
    """A seed; negative (llama.cpp's -1) means a fresh random one, i.e. None."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    return None if value < 0 else value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_args(
    p: argparse.ArgumentParser,
    devices: str = "device spec",
    ctx: str = "KV-cache length in tokens (default: the model's, at most 4096)",
) -> None:
    """What every command that loads or plans a model takes: the model, devices, split, dtype, context."""
    p.add_argument("model", help="Hugging Face model directory or .gguf file")
    p.add_argument("--devices", help=f"{devices} (default: cpu-sim)")
    p.add_argument("-ts", "--tensor-split", type=_ratios, help="ratios per device, e.g. 3,1 (default: even)")
    p.add_argument(
        "-sm", "--split-mode", choices=["tensor"], default="tensor", help="accepted for llama.cpp familiarity"
    )
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's; quantized GGUF: float32)")
    p.add_argument("--ctx", type=_positive_int, help=ctx)


def _run_args(p: argparse.ArgumentParser) -> None:
    """run and chat: a model, and the communicator (they also run one rank per process under launch/mpiexec)."""
    _model_args(p, devices="device spec (per rank under launch/mpiexec: its backend)")
    p.add_argument("--communicator", help="communicator name (default: the backend's, or the launcher's)")


def _generation_args(p: argparse.ArgumentParser, n_predict: int) -> None:
    """Sampling flags, named as llama.cpp names them."""
    p.add_argument(
        "-n", "--n-predict", type=_positive_int, default=n_predict, help="tokens to generate (default: %(default)s)"
    )
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 is off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability; 0 is off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize repeated tokens; 1.0 is off")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalties look back over (default: 64)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract for every token already present")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract per occurrence of a token")
    p.add_argument("--seed", type=_seed, help="random seed: the same seed gives the same text (default, or -1: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument(
        "--reasoning-budget",
        type=int,
        default=-1,
        help="thinking tokens before the end tag is forced; -1 unlimited, 0 no thinking (default: -1)",
    )
    p.add_argument("--reasoning-budget-message", default="", help="text forced before the end tag")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


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
    model = load(args.model, args.devices, args.tensor_split, args.dtype, communicator=args.communicator, ctx=ctx)
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
        help="generate text from a prompt with a model split over devices",
        description="Load MODEL (a Hugging Face directory or a .gguf file), split it over --devices by "
        "--tensor-split, and stream the continuation of -p (greedy unless --temp > 0). Under `tensorweave launch "
        "-n N` or mpiexec each rank holds only its shard and rank 0 prints.",
    )
    _run_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    _generation_args(p, n_predict=64)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "chat",
        help="talk to a model interactively (its chat template, streamed answers)",
        description="An interactive conversation with MODEL split over devices. The session keeps the KV cache "
        "across turns; /save FILE and /load FILE keep a conversation (restorable on another device count).",
    )
    _run_args(p)
    p.add_argument("--system", help="a system message")
    _generation_args(p, n_predict=512)
    p.set_defaults(func=cmd_chat)
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
    _model_args(p, devices="device spec, e.g. cpu-sim:4,mem=8GiB or cuda:0,1 (a backend not available here needs -ts)")
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
    _model_args(p, ctx="KV-cache length in tokens (default: max(-p, -n))")
    p.add_argument("--communicator", help="communicator name (default: the backend's)")
    p.add_argument("-p", "--n-prompt", type=_count, default=512, help="prompt tokens, 0 skips pp (default: 512)")
    p.add_argument("-n", "--n-gen", type=_count, default=128, help="generated tokens, 0 skips tg (default: 128)")
    p.add_argument("-r", "--repetitions", type=_positive_int, default=3, help="repetitions per test (default: 3)")
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
    from .conformance import DEFAULT_MAX_EXAMPLES, DEFAULT_WORLD_SIZE

    p = sub.add_parser(
        "conformance",
        help="check a backend and communicator against the cpu-sim reference (the conformance kit)",
        description="Run the conformance kit's suites (device contract, ops, collectives, end to end) with pytest "
        "against --backend. pytest's progress goes to stderr; the summary table to stdout. Arguments after -- go "
        "to pytest (e.g. -- -k attention -x). Needs pip install 'tensorweave[conformance]'.",
    )
    p.add_argument("--backend", required=True, help="backend to test, as registered (tensorweave plugins)")
    p.add_argument("--communicator", help="communicator to test (default: the backend's)")
    p.add_argument("--devices", help="device spec to test on (default: BACKEND:N, else BACKEND)")
    p.add_argument(
        "--world-size", type=_positive_int, default=DEFAULT_WORLD_SIZE, help="test 1..N devices (default: %(default)s)"
    )
    p.add_argument(
        "--max-examples",
        type=_positive_int,
        default=DEFAULT_MAX_EXAMPLES,
        help="hypothesis examples per test (default: %(default)s)",
    )
    p.add_argument(
        "--models", default="auto", help="HF model dirs for end to end: DIR, none, or auto (the source tree's fixtures)"
    )
    p.add_argument("--report", help="write the JSON report to this file")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST ARGS", help="passed on to pytest")
    p.set_defaults(func=cmd_conformance)
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

"""``tensorweave demo``: simulated devices, the plugins, allreduce checked per communicator and dtype, then an
embedded Qwen3-MoE-style model generated with at TP=1 and split unevenly, and its state moved between the two."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .. import errors
from ..core import dtypes
from ..core.plugins import open_communicator, open_devices, registry
from ..core.sharding import normalize_split
from ..format import split_text, table
from .inspect import device_rows, devices_table
from .options import positive_int, ratios


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulated devices, the plugins, and an allreduce round trip per communicator and dtype, checked."""
    devs = open_devices(args.devices)
    if args.tensor_split is None:  # an uneven default that fits any device count: 3,1,2,1,3,1,...
        args.tensor_split = [(3.0, 1.0, 2.0, 1.0)[i % 4] for i in range(len(devs))]
    normalize_split(args.tensor_split, len(devs))  # a bad -ts fails before any output
    print(f"tensorweave demo on {len(devs)} simulated devices ({args.devices})\n")
    print(devices_table(device_rows(devs)))
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

    from ..loaders.safetensors_io import save_pretrained
    from ..models.synthetic import random_weights

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

    from ..runtime.model import load
    from ..runtime.session import Generation

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
        split = split_text(plan.ratios)
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
        mix = ", ".join(f"{k} {errors.format_bytes(b)}" for k, b in plan.weight_formats.items())
        print(f"weights as held (all devices): {mix}; activations and KV cache {cfg.dtype}")
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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``demo`` subcommand."""
    p = sub.add_parser("demo", help="run the embedded default on simulated devices")
    p.add_argument("--devices", default="cpu-sim:4,peer=ring", help="device spec (default: %(default)s)")
    p.add_argument("--elements", type=int, default=1 << 20, help="elements per buffer (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per case (default: %(default)s)")
    p.add_argument(
        "-ts", "--tensor-split", type=ratios, help="ratios per device (default: 3,1,2,1, repeated to the device count)"
    )
    p.add_argument("-n", "--tokens", type=positive_int, default=16, help="tokens to generate (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

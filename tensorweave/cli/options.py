"""Arguments and output shared by the command groups: ratio and positive-integer parsing, the flags every command that
loads or plans a model takes (named as llama.cpp names them where they mean the same), and --json or text output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..core import dtypes
from ..errors import TensorweaveError


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ratios like 3,1,1,1, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


COMPUTE_DTYPES = [n for n in dtypes.DTYPES if dtypes.is_float(n)]  # a model computes in a float dtype


def compute_dtype(text: str) -> str:
    """A --dtype value: a float dtype name or alias (bf16, fp16 ...), as its canonical name."""
    try:
        name = dtypes.name(text)
    except TensorweaveError:
        name = ""
    if name not in COMPUTE_DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(COMPUTE_DTYPES)} (or bf16, f16 ...), got {text!r}"
        )
    return name


CACHE_TYPES = ["f32", "f16", "bf16"]  # llama.cpp's names for the float KV-cache types


def cache_type(text: str) -> str:
    """A -ctk/-ctv value: f32, f16, bf16 (or float32, float16, bfloat16 ...), as its canonical dtype name."""
    from ..runtime.kvcache import CACHE_DTYPES

    try:
        name = dtypes.name(text)
    except TensorweaveError:
        name = ""
    if name not in CACHE_DTYPES:
        quantized = " (quantized KV caches are not supported)" if text.lower().startswith(("q", "iq")) else ""
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(CACHE_TYPES)}, got {text!r}{quantized}")
    return name


def model_args(
    p: argparse.ArgumentParser,
    devices: str = "device spec",
    ctx: str = "KV-cache length in tokens (default: the model's, at most 4096)",
) -> None:
    """What every command that loads or plans a model takes: the model (MODEL or -m), devices, split, dtype, context,
    threads, and llama.cpp's -ngl (accepted, without effect). ``resolve_model_args`` completes them after parsing."""
    p.add_argument("model", nargs="?", help="Hugging Face model directory or .gguf file (or -m MODEL)")
    p.add_argument("-m", "--model", dest="model_option", metavar="MODEL", help="the model, as llama.cpp takes it")
    p.add_argument("--devices", help=f"{devices} (default: cpu-sim; see tensorweave devices --help)")
    p.add_argument("-ts", "--tensor-split", type=ratios, help="ratios per device, e.g. 3,1 (default: even)")
    p.add_argument(
        "-sm", "--split-mode", choices=["tensor"], default="tensor", help="accepted for llama.cpp familiarity"
    )
    p.add_argument(
        "--dtype",
        type=compute_dtype,
        metavar="{" + ",".join(COMPUTE_DTYPES) + "}",
        help="convert the weights to this float dtype (default: keep each as stored, F16/BF16/quantized "
        "included; activations are float32)",
    )
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=positive_int, help=ctx)
    for short, what in (("k", "keys"), ("v", "values")):
        p.add_argument(
            f"-ct{short}",
            f"--cache-type-{short}",
            type=cache_type,
            metavar="{" + ",".join(CACHE_TYPES) + "}",
            help=f"the KV cache's dtype for {what} (default: f32; f16/bf16 halve its memory, attention still "
            "computes in float32)",
        )
    p.add_argument(
        "-t", "--threads", type=positive_int, help="BLAS threads of each cpu-sim device (the spec's threads=N)"
    )
    p.add_argument(
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        dest="gpu_layers",
        metavar="N",
        help="accepted for llama.cpp familiarity, without effect: every layer is split over --devices",
    )


def resolve_model_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """After parsing: one model from MODEL or -m; -t into a cpu-sim spec; a note for -ngl; -ctk/-ctv into
    ``args.cache_dtype``, the (k, v) pair ``tw.load`` takes."""
    if args.model and args.model_option:
        parser.error(f"the model is given twice: {args.model!r} and -m {args.model_option!r}")
    args.model = args.model or args.model_option
    if not args.model:
        parser.error("the model is required: MODEL or -m MODEL")
    args.cache_dtype = (args.cache_type_k, args.cache_type_v)
    if args.gpu_layers is not None:
        print(
            "tensorweave: note: -ngl has no effect: every layer is split over --devices (tensor parallelism)",
            file=sys.stderr,
        )
    if args.threads is not None:
        spec = args.devices or "cpu-sim"
        if spec.split(":")[0].split(",")[0] != "cpu-sim" or "threads=" in spec:
            print(f"tensorweave: note: -t has no effect on --devices {spec}", file=sys.stderr)
        else:
            args.devices = f"{spec},threads={args.threads}"

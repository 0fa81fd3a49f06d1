"""Arguments and output shared by the command groups: ratio and positive-integer parsing, the flags every command that
loads or plans a model takes, and --json or text output."""

from __future__ import annotations

import argparse
import json
from typing import Any


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


def model_args(
    p: argparse.ArgumentParser,
    devices: str = "device spec",
    ctx: str = "KV-cache length in tokens (default: the model's, at most 4096)",
) -> None:
    """What every command that loads or plans a model takes: the model, devices, split, dtype, context."""
    p.add_argument("model", help="Hugging Face model directory or .gguf file")
    p.add_argument("--devices", help=f"{devices} (default: cpu-sim)")
    p.add_argument("-ts", "--tensor-split", type=ratios, help="ratios per device, e.g. 3,1 (default: even)")
    p.add_argument(
        "-sm", "--split-mode", choices=["tensor"], default="tensor", help="accepted for llama.cpp familiarity"
    )
    p.add_argument(
        "--dtype",
        help="convert the weights to this float dtype (default: keep each as stored, F16/BF16/quantized "
        "included; activations are float32)",
    )
    p.add_argument("--ctx", type=positive_int, help=ctx)

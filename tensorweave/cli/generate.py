"""``tensorweave run``: text from a model split over devices, in one process or one rank per process under
``tensorweave launch``/mpiexec; and what ``run``, ``chat`` (cli/chat.py) and ``serve`` share: loading for the command
line, sampling flags, rank 0's text on every rank."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors
from ..core.device import DeviceSpec
from ..core.spmd import SpmdEnv
from ..runtime.session import Generation, TextStream
from .options import model_args, positive_int

if TYPE_CHECKING:
    from ..runtime.model import Model


def cmd_run(args: argparse.Namespace) -> int:
    """Generate from a prompt; one process for all devices, or one rank per process under launch/mpiexec.

    Every rank runs the same steps (the executor gathers the logits to each) and samples with the same seed (rank
    0's, broadcast), so every rank picks the same token without a broadcast per step; rank 0 alone prints. The
    prompt is rank 0's (read from -p, -f or stdin), broadcast to the others.
    """
    spmd = SpmdEnv.detect()
    prompt = read_prompt(args) if spmd is None or spmd.rank == 0 else None  # read before the model loads
    model, printing = _load_for_cli(args)
    if model.tokenizer is None:
        raise errors.ModelFormatError(f"{args.model}: the model has no tokenizer (tokenizer.json or GGUF vocabulary)")
    _check_reasoning_tags(args, model, printing)
    prompt = share_text(model, prompt)
    assert prompt is not None
    stream = model.generate(
        prompt, args.n_predict, stream=True, stop=args.stop, ignore_eos=args.ignore_eos, **_sampling(args)
    )
    assert isinstance(stream, TextStream)
    try:
        for piece in stream:
            if printing and not args.json:
                print(piece, end="", flush=True)
    except errors.StateError as e:  # a prompt longer than the context: name the flag, not the Python argument
        raise errors.StateError(str(e).replace("load with a larger ctx=", "a larger -c/--ctx-size")) from None
    if not printing:
        return 0
    g = stream.result
    if args.json:
        print(json.dumps(generation_dict(g, model), indent=2))
        return 0
    print()
    print(
        f"prompt {g.prompt_tokens} tokens {g.prompt_tokens_per_second:.1f} tok/s, generated {len(g.tokens)} "
        f"tokens {g.tokens_per_second:.1f} tok/s on {model.executor.world_size} device(s) ({g.finish_reason})",
        file=sys.stderr,
    )
    return 0


def generation_dict(g: Generation, model: Model) -> dict[str, Any]:
    """``run --json``: the text, its tokens, why it stopped, and timings."""
    return {
        "text": g.text,
        "tokens": g.tokens,
        "finish_reason": g.finish_reason,
        "prompt_tokens": g.prompt_tokens,
        "timings": {
            "prompt_seconds": g.prompt_seconds,
            "prompt_tokens_per_second": g.prompt_tokens_per_second,
            "generation_seconds": g.gen_seconds,
            "tokens_per_second": g.tokens_per_second,
        },
        "devices": model.executor.world_size,
    }


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt of -p TEXT, -f FILE, or stdin for ``-p -`` / ``-f -``."""
    source = args.file if args.file is not None else args.prompt
    if source == "-":
        return sys.stdin.read()
    if args.file is None:
        return str(args.prompt)
    try:
        return Path(args.file).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise errors.ModelFormatError(f"{args.file}: cannot read the prompt file: {why}") from None


END, KEEPALIVE = -1, -2  # share_text's length word for "no more input" and "still waiting for input"


def share_text(model: Model, text: str | None, *, keepalive: bool = False) -> str | None:
    """Rank 0's ``text`` on every rank of a multi-process group (None stays None: the end of input); in one process
    it is ``text``. Broadcasts over the model's communicator: the UTF-8 length, then the bytes. Rank 0 waiting for
    a person's input sends ``keepalive`` now and then, so the other ranks' broadcasts restart before they time out."""
    comm = model.executor.comm
    if comm.capabilities.in_process:
        return text
    dev = model.executor.devices[0]
    data = b"" if text is None else text.encode()
    n = KEEPALIVE if keepalive else END if text is None else len(data)
    while True:
        head = dev.from_host(np.array([n], np.int32))
        comm.broadcast([head])
        n = int(dev.to_host(head)[0])
        if n != KEEPALIVE or keepalive:
            break
    if n <= 0:
        return None if n < 0 else ""
    words = np.zeros((n + 3) // 4, np.int32)
    words.view(np.uint8)[: len(data)] = np.frombuffer(data, np.uint8)
    buf = dev.from_host(words)
    comm.broadcast([buf])
    return dev.to_host(buf).view(np.uint8)[:n].tobytes().decode()


def _load_for_cli(args: argparse.Namespace) -> tuple[Model, bool]:
    """The model for run/chat: all devices in this process, or this rank's under launch/mpiexec; and whether this
    process prints (rank 0)."""
    from ..core.spmd import spmd_from_env
    from ..runtime.model import load

    spmd = SpmdEnv.detect()
    common = {"tensor_split": args.tensor_split, "dtype": args.dtype, "ctx": args.ctx, "cache_dtype": args.cache_dtype}
    if spmd is None:
        model = load(args.model, devices=args.devices or "cpu-sim", communicator=args.communicator, **common)
    else:  # started by `tensorweave launch` or mpiexec: this process is one rank with one device
        backend = DeviceSpec.parse(args.devices or "cpu-sim").backend
        comm = spmd_from_env(backend=backend, name=args.communicator)
        model = load(args.model, communicator=comm, progress=False if spmd.rank else None, **common)
        if args.seed is None and args.temp > 0:
            args.seed = _shared_seed(model)
    printing = spmd is None or spmd.rank == 0
    if printing:
        warn_beyond_trained(model.config.ctx, model.checkpoint.config.ctx)
    return model, printing


def warn_beyond_trained(ctx: int, trained: int) -> None:
    """A context longer than the model was trained for runs, but the model's output degrades past it: say so."""
    if ctx > trained:
        print(
            f"tensorweave: warning: context {ctx} is beyond the {trained} tokens the model was trained for; "
            "expect degraded output past them",
            file=sys.stderr,
        )


def _shared_seed(model: Model) -> int:
    """Rank 0's random seed on every rank: ranks must sample the same tokens."""
    dev = model.executor.devices[0]
    buf = dev.from_host(np.array([np.random.default_rng().integers(0, 2**31 - 1)], np.int32))
    model.executor.comm.broadcast([buf])
    return int(dev.to_host(buf)[0])


def _check_reasoning_tags(args: argparse.Namespace, model: Model, printing: bool) -> None:
    """--reasoning-budget on a model without thinking tags does nothing; say so rather than silently ignore it."""
    from ..runtime.sampling import reasoning_tags

    if args.reasoning_budget >= 0 and printing and reasoning_tags(model.family, model.tokenizer) is None:
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


def seed(text: str) -> int | None:
    """A seed; negative (llama.cpp's -1) means a fresh random one, i.e. None."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    return None if value < 0 else value


def run_args(p: argparse.ArgumentParser) -> None:
    """run and chat: a model, and the communicator (they also run one rank per process under launch/mpiexec)."""
    model_args(p, devices="device spec (per rank under launch/mpiexec: its backend)")
    p.add_argument("--communicator", help="communicator name (default: the backend's, or the launcher's)")


def generation_args(p: argparse.ArgumentParser, n_predict: int) -> None:
    """Sampling flags, named as llama.cpp names them."""
    p.add_argument(
        "-n", "--n-predict", type=positive_int, default=n_predict, help="tokens to generate (default: %(default)s)"
    )
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 is off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability; 0 is off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize repeated tokens; 1.0 is off")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalties look back over (default: 64)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract for every token already present")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract per occurrence of a token")
    p.add_argument("--seed", type=seed, help="random seed: the same seed gives the same text (default, or -1: random)")
    p.add_argument(
        "-r",
        "--reverse-prompt",
        "--stop",
        dest="stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop at this text (repeatable)",
    )
    p.add_argument(
        "--reasoning-budget",
        type=int,
        default=-1,
        help="thinking tokens before the end tag is forced; -1 unlimited, 0 no thinking (default: -1)",
    )
    p.add_argument("--reasoning-budget-message", default="", help="text forced before the end tag")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="generate text from a prompt with a model split over devices",
        description="Load MODEL (a Hugging Face directory or a .gguf file), split it over --devices by "
        "--tensor-split, and stream the continuation of the prompt (greedy unless --temp > 0). Under 'tensorweave "
        "launch -n N' or mpiexec each rank holds only its shard and rank 0 prints.",
    )
    run_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="the prompt text; - reads it from stdin")
    prompt.add_argument("-f", "--file", help="read the prompt from this file; - reads stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, finish reason, timings")
    generation_args(p, n_predict=64)
    p.set_defaults(func=cmd_run)

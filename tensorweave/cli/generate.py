"""``tensorweave run`` and ``tensorweave chat``: text from a model split over devices, in one process or one rank
per process under ``tensorweave launch``/mpiexec."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors
from ..core.device import DeviceSpec
from ..runtime.session import TextStream
from .options import model_args, positive_int

if TYPE_CHECKING:
    from ..runtime.model import Model


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
    from ..core.spmd import SpmdEnv, spmd_from_env
    from ..runtime.model import load

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
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument(
        "--reasoning-budget",
        type=int,
        default=-1,
        help="thinking tokens before the end tag is forced; -1 unlimited, 0 no thinking (default: -1)",
    )
    p.add_argument("--reasoning-budget-message", default="", help="text forced before the end tag")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``run`` and ``chat`` subcommands."""
    p = sub.add_parser(
        "run",
        help="generate text from a prompt with a model split over devices",
        description="Load MODEL (a Hugging Face directory or a .gguf file), split it over --devices by "
        "--tensor-split, and stream the continuation of -p (greedy unless --temp > 0). Under `tensorweave launch "
        "-n N` or mpiexec each rank holds only its shard and rank 0 prints.",
    )
    run_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    generation_args(p, n_predict=64)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "chat",
        help="talk to a model interactively (its chat template, streamed answers)",
        description="An interactive conversation with MODEL split over devices. The session keeps the KV cache "
        "across turns; /save FILE and /load FILE keep a conversation (restorable on another device count).",
    )
    run_args(p)
    p.add_argument("--system", help="a system message")
    generation_args(p, n_predict=512)
    p.set_defaults(func=cmd_chat)

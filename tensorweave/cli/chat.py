"""``tensorweave chat``: an interactive conversation with a model split over devices, in one process or one rank per
process under ``tensorweave launch``/mpiexec.

The conversation survives the user's mistakes: a bad /save or /load, a state file of another model, an unknown
command or a message too long for the context prints one line and the prompt comes back. Ctrl-C stops the answer
being generated (the part already shown stays in the conversation); at the prompt it ends the chat, like Ctrl-D.
When the conversation outgrows the context, the oldest turns are dropped (llama.cpp's context shift, by whole
turns: a user message and its answer; the system message stays), and a line says so.

Under launch/mpiexec rank 0 reads the input and broadcasts each line over the model's communicator (waiting for a
person, it sends a keepalive now and then so the others' broadcasts never time out); every rank runs the same
commands and turns, and only rank 0 prints. There, Ctrl-C ends the whole chat: the launcher stops every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from ..core.spmd import timeout_from
from ..runtime.session import TextStream
from .generate import _check_reasoning_tags, _load_for_cli, _sampling, generation_args, run_args, share_text

if TYPE_CHECKING:
    from ..runtime.model import Model
    from ..runtime.session import Session

COMMANDS = """commands:
  /help         this list
  /reset        forget the conversation (the --system message stays)
  /save FILE    keep the conversation: FILE (the session's state) and FILE.json (its messages)
  /load FILE    continue a conversation /save kept (the same model, on any device count)
  /exit, /quit  end the chat (so does Ctrl-D)
Ctrl-C stops the answer being generated. To send a message that starts with /, write // instead."""

# Errors after which the ranks of a group cannot go on together: the chat ends on them.
FATAL = (errors.CollectiveTimeoutError, errors.CommunicationLibraryError)


class Chat:
    """One conversation: its messages, the session whose KV cache holds them, and the commands around it."""

    def __init__(self, args: argparse.Namespace, model: Model, printing: bool) -> None:
        self.args, self.model, self.printing = args, model, printing
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = list(self.system)
        self.session: Session = self.model.session()
        self.params = _sampling(self.args)  # later turns continue the sampler (its RNG and penalties' history)

    def say(self, text: str) -> None:
        if self.printing:
            print(text, file=sys.stderr, flush=True)

    def handle(self, line: str) -> bool:
        """Run one line of input; False when the chat should end. User errors print one line."""
        try:
            if line.startswith("/") and not line.startswith("//"):
                return self.command(line)
            if line:
                self.turn(line.removeprefix("/"))
        except FATAL:
            raise
        except errors.TensorweaveError as e:
            self.say(f"error: {e}")
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(COMMANDS)
        elif name == "/reset":
            self.reset()
            self.say("forgot the conversation")
        elif name in ("/save", "/load"):
            if not arg:
                self.say(f"usage: {name} FILE")
            else:
                (self.save if name == "/save" else self.load)(Path(arg).expanduser())
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return True

    def save(self, path: Path) -> None:
        try:
            self.session.save(path)  # every rank takes part (the caches are gathered); rank 0 writes
            if self.printing:
                Path(f"{path}.json").write_text(json.dumps(self.messages))
        except OSError as e:
            raise errors.StateError(f"cannot save to {path}: {e.strerror or e}") from None
        self.say(f"saved {path} ({self.session.n_past} tokens, {len(self.messages)} messages)")

    def load(self, path: Path) -> None:
        """Continue from ``path`` and ``path.json``; on any error the current conversation stays as it was."""
        messages = read_messages(path) if path.exists() else None  # a missing state: restore names it
        session = self.model.restore(path)  # refuses another model's state before touching the caches
        assert messages is not None
        self.session, self.messages = session, messages
        self.params = {} if session.sampler is not None else _sampling(self.args)
        self.say(f"loaded {path} ({session.n_past} tokens, {len(messages)} messages)")

    def turn(self, text: str) -> None:
        """Answer ``text``, streaming; the conversation keeps the user message only if an answer came."""
        self.messages.append({"role": "user", "content": text})
        try:
            self.fit()
            stream = self.session.chat(
                self.messages,
                self.args.n_predict,
                stream=True,
                stop=self.args.stop,
                ignore_eos=self.args.ignore_eos,
                **self.params,
            )
            assert isinstance(stream, TextStream)
            answer, finish = self.show(stream)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        self.params = {}
        if finish == "interrupted":
            self.say("(stopped)")
        elif finish == "context":
            self.say("(the context is full: the next message drops the oldest turns; /reset starts over)")

    def show(self, stream: TextStream) -> tuple[str, str]:
        """Print the answer as it comes; (its text, why it ended). In one process Ctrl-C ends it early (between
        tokens, so the caches stay whole) and the text shown so far is the answer."""
        pieces: list[str] = []
        stopped = threading.Event()
        gen: Iterator[str] = iter(stream)
        with sigint_sets(stopped, enabled=self.model.executor.comm.capabilities.in_process):
            for piece in gen:
                pieces.append(piece)
                if self.printing:
                    print(piece, end="", flush=True)
                if stopped.is_set():
                    break
        if self.printing:
            print(flush=True)
        if stopped.is_set():
            getattr(gen, "close", lambda: None)()
            return "".join(pieces), "interrupted"
        return stream.result.text, stream.result.finish_reason

    def tokens(self, messages: list[dict[str, str]]) -> int:
        tok = self.model.tokenizer
        assert tok is not None
        return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special=False))

    def fit(self) -> None:
        """Context shift: drop the oldest turns until the conversation leaves room for an answer (up to -n tokens,
        at most a quarter of the context); a message that alone cannot fit is refused."""
        ctx = self.model.config.ctx
        alone = self.tokens([*self.system, self.messages[-1]])
        if alone >= ctx:
            raise errors.StateError(
                f"the message takes {alone} tokens and the context holds {ctx}; write less, or start the chat with "
                "a larger -c/--ctx-size"
            )
        room, first, dropped = min(self.args.n_predict, ctx // 4), len(self.system), 0
        while len(self.messages) > first + 1 and self.tokens(self.messages) + room > ctx:
            del self.messages[first]  # the oldest user message, then what answered it
            while len(self.messages) > first + 1 and self.messages[first]["role"] != "user":
                del self.messages[first]
            dropped += 1
        if dropped:
            self.say(f"(context full: dropped the oldest {dropped} turn{'s' * (dropped > 1)} to make room)")


def read_messages(path: Path) -> list[dict[str, str]]:
    """The messages /save wrote beside a state (FILE.json); StateError when missing or malformed."""
    side = Path(f"{path}.json")
    try:
        messages = json.loads(side.read_text())
    except FileNotFoundError:
        raise errors.StateError(f"{side}: no such file (/load reads the FILE.json that /save writes)") from None
    except (OSError, ValueError) as e:
        raise errors.StateError(f"{side}: not a conversation /save wrote ({e})") from None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise errors.StateError(f"{side}: not a conversation /save wrote (a list of role/content messages)")
    return messages


@contextlib.contextmanager
def sigint_sets(event: threading.Event, enabled: bool) -> Iterator[None]:
    """While active (in the main thread, when ``enabled``), SIGINT sets ``event`` instead of raising
    KeyboardInterrupt: the answer stops between two tokens rather than inside a step."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_line(model: Model, printing: bool) -> str | None:
    """The next line of input on every rank (None at the end of input). Rank 0 reads it; in a group, a thread
    reads while the main thread keeps the other ranks' broadcast alive."""
    if model.executor.comm.capabilities.in_process:
        return _input()
    if not printing:
        return share_text(model, None)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: lines.put(_input()), daemon=True).start()
    period = min(30.0, timeout_from(None, "chat") / 3)
    while True:
        try:
            return share_text(model, lines.get(timeout=period))
        except queue.Empty:
            share_text(model, None, keepalive=True)


def _input() -> str | None:
    try:
        return input("> ").strip()
    except EOFError:
        print(file=sys.stderr)
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive conversation: each answer streams as it is generated; the session keeps the conversation's
    KV cache, so a turn evaluates only its new tokens."""
    model, printing = _load_for_cli(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise errors.ModelFormatError(f"{args.model}: the model has no chat template; use `tensorweave run`")
    _check_reasoning_tags(args, model, printing)
    chat = Chat(args, model, printing)
    if printing and sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - input() gets line editing and history
    chat.say(f"{model!r}\n/help lists the commands; /exit or Ctrl-D ends the chat")
    while True:
        line = read_line(model, printing)
        if line is None or not chat.handle(line):
            return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``chat`` subcommand."""
    p = sub.add_parser(
        "chat",
        help="talk to a model interactively (its chat template, streamed answers)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An interactive conversation with MODEL split over devices. The session keeps the KV cache\n"
        "across turns; when the conversation outgrows the context (-c), its oldest turns are dropped.\n"
        "Ctrl-C stops an answer. Under 'tensorweave launch -n N' or mpiexec rank 0 reads the input.\n\n" + COMMANDS,
    )
    run_args(p)
    p.add_argument("-sys", "--system-prompt", "--system", dest="system", help="a system message")
    generation_args(p, n_predict=512)
    p.set_defaults(func=cmd_chat)

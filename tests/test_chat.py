"""`tensorweave chat` as a person meets it, through a pseudo-terminal: every mistake prints one line and the
conversation goes on; Ctrl-C stops an answer, not the chat; a conversation outgrowing the context drops its oldest
turns; under `tensorweave launch` rank 0 reads the input and every turn gets one answer."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import tensorweave as tw
from tensorweave.runtime.session import Generation

FIXTURES = Path(__file__).parent / "fixtures" / "models"
QWEN3 = str(FIXTURES / "qwen3" / "hf")  # a chat template; trained context 256
PROMPT = "\n> "


class Terminal:
    """A process on a pseudo-terminal of its own (its controlling terminal: ^C is SIGINT, as for a person)."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 2000, 0, 0))  # wide: lines echo unscrolled
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorweave.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "dumb"},
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.out, self.seen = "", 0

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Wait for ``pattern`` in the output after what was already matched; the match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.out, self.seen)
            if m:
                self.seen = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{self.out[-3000:]}")
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the process closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"the chat ended before {pattern!r}; output:\n{self.out[-3000:]}")
            self.out += data.decode(errors="replace").replace("\r\n", "\n")

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")
        self.expect(re.escape(line) + "\n")  # the terminal's echo

    def answer(self, line: str) -> str:
        """Send a message; the answer (what came before the next prompt)."""
        self.send(line)
        return self.expect(r"(.*?)\n> ").group(1)

    def close(self) -> int:
        """The exit status, once the process ends by itself."""
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def test_each_mistake_prints_one_line_and_the_conversation_goes_on(tmp_path: Path) -> None:
    other = tmp_path / "llama.tws"  # a state of another model, with the messages file /save writes beside it
    llama = tw.load(FIXTURES / "llama" / "hf", progress=False)
    session = llama.session()
    session.eval([1, 2, 3])
    session.save(other)
    Path(f"{other}.json").write_text("[]")
    kept = tmp_path / "talk.tws"
    term = Terminal("chat", "-m", QWEN3, "-c", "128", "-n", "40", "--ignore-eos")
    try:
        term.expect("/help lists the commands")
        term.expect(PROMPT)
        assert term.answer("hello").strip()
        mistakes = {
            "/load nosuch.tws": "error: nosuch.tws: no such state file",
            f"/load {other}": "error: .*belongs to another model",
            "/save /nonexistent/dir/x.tws": "error: cannot save to /nonexistent/dir/x.tws: No such file or directory",
            "/save": "usage: /save FILE",
            "/frobnicate": "unknown command /frobnicate; /help lists the commands",
            "word " * 150: r"error: the message takes \d+ tokens and the context holds 128",
        }
        for line, message in mistakes.items():
            term.send(line)
            said = term.expect(r"([^>\n]*)\n> ").group(1)
            assert re.match(message, said), (line, said)  # one line, then the prompt again
            assert "Traceback" not in said
        term.send("/help")
        listing = term.expect(r"(?s)commands:\n(.*?)\n> ").group(1)
        assert all(c in listing for c in ("/reset", "/save FILE", "/load FILE", "/exit"))
        for n in range(4):  # each turn adds ~50 tokens: the context of 128 overflows, the oldest turns go
            assert term.answer(f"turn {n}").strip()
        assert re.search(r"\(context full: dropped the oldest \d+ turns?", term.out)
        term.send(f"/save {kept}")
        term.expect(r"saved .*talk.tws \(\d+ tokens, \d+ messages\)\n> ")
        term.send("/exit")
        assert term.close() == 0
    finally:
        term.kill()
    said = [m["content"] for m in json.loads(Path(f"{kept}.json").read_text()) if m["role"] == "user"]
    assert said[-1] == "turn 3" and "hello" not in said  # the latest turns stayed, the oldest were dropped
    resumed = tw.load(QWEN3, ctx=128, progress=False).restore(kept)
    assert 0 < resumed.n_past <= 128


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tmp_path: Path) -> None:
    kept = tmp_path / "talk.tws"
    term = Terminal("chat", QWEN3, "-c", "4096", "-n", "4000", "--ignore-eos")  # answers far longer than a test
    try:
        term.expect("beyond the 256 tokens the model was trained for")
        term.expect(PROMPT)
        term.send("tell me everything")
        term.expect(r"(?s).")  # the answer has begun (this model likes blank lines)
        os.write(term.master, b"\x03")
        term.expect(r"\n\(stopped\)\n> ")
        term.send(f"/save {kept}")
        term.expect(r"saved .* \((\d+) tokens, 2 messages\)\n> ")
        messages = json.loads(Path(f"{kept}.json").read_text())
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"]
        term.send("and now?")
        term.expect(r"(?s).")
        os.write(term.master, b"\x03")
        term.expect(r"\n\(stopped\)\n> ")
        os.write(term.master, b"\x03")  # at the prompt: ends the chat
        assert term.close() == 130
    finally:
        term.kill()


def test_launch_chat_reads_on_rank_0_and_answers_each_turn_once() -> None:
    """Two ranks, scripted input with a pause longer than the collective timeout between turns (rank 0 keeps the
    others' broadcast alive): the answers of one process's session, the banner once, nothing from rank 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
    chat = ["chat", QWEN3, "-n", "6", "--devices", "cpu-sim:2", "-ts", "3,1"]  # under launch: the backend
    session = tw.load(QWEN3, devices="cpu-sim:2", tensor_split=[3, 1], progress=False).session()
    said = [{"role": "user", "content": "hello"}]
    first = session.chat(said, 6)
    assert isinstance(first, Generation)
    said += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and more"}]
    second = session.chat(said, 6)
    assert isinstance(second, Generation)
    want = f"> {first.text}\n> > {second.text}\n> "  # the error's prompt between, the end of input after
    launch = [sys.executable, "-m", "tensorweave.cli", "launch", "-n", "2", "--timeout", "3", "--", *chat]
    proc = subprocess.Popen(launch, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(b"hello\n/load nosuch.tws\n")
    proc.stdin.flush()
    time.sleep(4)  # longer than --timeout 3
    proc.stdin.write(b"and more\n")
    proc.stdin.close()
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()  # (stderr is a few lines: no deadlock)
    assert proc.wait(timeout=60) == 0, err
    assert out == want and first.text and second.text
    assert err.count("<Model qwen3") == 1 and "[rank 1]" not in err
    assert err.count("error: nosuch.tws: no such state file") == 1

"""`tensorweave serve` as a client meets it: a real server on 127.0.0.1 (one process, and two ranks under
`tensorweave launch -n 2`), driven by the official `openai` client and by httpx; answers checked against
`tensorweave run` and the Python API on the same fixture model."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import tensorweave as tw
from tensorweave.cli.launch import free_port, rank_env
from tensorweave.serve.app import ReasoningSplit

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "qwen3" / "hf"  # a chat template and thinking tags
PROMPT = "Once upon a time"  # the fixture answers it a token per piece of text
N = 12
CTX = 4096  # beyond the fixture's 256 positions: room for generations long enough to interrupt


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    health: list[int]  # the statuses /health answered until it was ready

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def slots(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/slots").json())


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tensorweave.cli", *argv], stderr=err, env=env, start_new_session=True
        )


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> list[int]:
    """Poll /health until it says 200; the statuses seen on the way."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()}"
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            seen.append(httpx.get(f"{url}/health", timeout=5).status_code)
        if seen and seen[-1] == 200:
            return seen
        time.sleep(0.002)
    raise AssertionError(f"not ready in {timeout} s: {log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve(tmp: Path, *flags: str, model: Path = FIXTURE, ranks: int = 1) -> Iterator[Server]:
    port = free_port()
    argv = ["serve", str(model), "--port", str(port), "--ctx", str(CTX), *flags]
    log = tmp / "serve.log"
    proc = start(["launch", "-n", str(ranks), "--", *argv] if ranks > 1 else argv, log)
    try:
        url = f"http://127.0.0.1:{port}"
        yield Server(url, proc, log, wait_ready(url, proc, log))
    finally:
        stop(proc)


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "launch -n 2"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(tmp_path_factory.mktemp("serve"), "--parallel", "2", ranks=request.param)


@pytest.fixture(scope="module")
def model() -> Iterator[tw.Model]:
    with tw.load(FIXTURE, ctx=CTX) as m:
        yield m


@pytest.fixture(scope="module")
def run_text() -> str:
    """What `tensorweave run` prints for PROMPT, greedy."""
    proc = subprocess.run(
        [sys.executable, "-m", "tensorweave.cli", "run", str(FIXTURE), "-p", PROMPT, "-n", str(N)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


def test_health_says_loading_with_503_then_ready_with_200(server: Server) -> None:
    assert server.health[0] == 503 and server.health[-1] == 200
    assert set(server.health) == {503, 200}
    body = httpx.get(f"{server.url}/health").json()
    assert body == {"status": "ok", "slots_idle": 2, "slots_processing": 0, "requests_waiting": 0}


def test_models_lists_the_model(server: Server) -> None:
    (card,) = server.client.models.list().data
    assert card.id == "hf" and card.owned_by == "tensorweave"


def test_completion_is_tensorweave_runs_greedy_text_streamed_or_not(server: Server, run_text: str) -> None:
    whole = server.client.completions.create(model="hf", prompt=PROMPT, max_tokens=N)
    assert whole.choices[0].text == run_text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == N
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + N
    chunks = list(
        server.client.completions.create(
            model="hf", prompt=PROMPT, max_tokens=N, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == run_text and len(chunks) > N
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == N
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its slot's cache


def test_chat_is_the_python_apis_greedy_answer_streamed_or_not(server: Server, model: tw.Model) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = model.chat(messages, N).text  # type: ignore[union-attr]
    whole = server.client.chat.completions.create(model="hf", messages=messages, max_completion_tokens=N)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    stream = server.client.chat.completions.create(model="hf", messages=messages, max_tokens=N, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == want


def test_stop_and_seed(server: Server, run_text: str) -> None:
    stop = run_text[3:8]
    cut = server.client.completions.create(model="hf", prompt=PROMPT, max_tokens=N, stop=[stop])
    assert cut.choices[0].text == run_text[: run_text.index(stop)] and cut.choices[0].finish_reason == "stop"

    def sample(seed: int) -> str:
        kwargs: dict[str, Any] = {"temperature": 1.5, "top_p": 0.95, "seed": seed, "extra_body": {"top_k": 50}}
        return server.client.completions.create(model="hf", prompt="a b c", max_tokens=N, **kwargs).choices[0].text

    assert sample(1) == sample(1) != sample(2)


def test_the_readmes_openai_snippet_runs_against_the_server(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    url = "http://127.0.0.1:8080"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if url in b]
    assert blocks
    for block in blocks:
        exec(compile(block.replace(url, server.url), "README.md", "exec"), {})
    assert "CompletionUsage(completion_tokens=" in capsys.readouterr().out


def test_four_concurrent_greedy_requests_each_get_their_own_text(server: Server, model: tw.Model) -> None:
    prompts = ["One two three", "The café pays 42 €", "a b c", PROMPT]
    want = [model.generate(p, N).text for p in prompts]  # type: ignore[union-attr]

    def ask(prompt: str) -> str:
        return server.client.completions.create(model="hf", prompt=prompt, max_tokens=N).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, prompts)) == want  # two run, two wait in the queue (--parallel 2)


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"prompt": "word " * CTX}, "prompt"),
        ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ],
    ids=["negative max_tokens", "message without content", "prompt longer than the context", "bad type", "stop"],
)
def test_a_bad_request_gets_400_and_the_next_request_succeeds(
    server: Server, run_text: str, request_body: dict[str, Any], param: str
) -> None:
    route = "/v1/chat/completions" if "messages" in request_body else "/v1/completions"
    r = httpx.post(server.url + route, json={"model": "hf", **request_body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert server.client.completions.create(model="hf", prompt=PROMPT, max_tokens=N).choices[0].text == run_text


def test_unknown_route_gets_404_in_openais_shape(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        server.client.embeddings.create(model="hf", input="x")
    assert e.value.status_code == 404 and "no such route" in str(e.value.body)


def test_a_client_closing_a_stream_after_two_chunks_frees_its_slot(server: Server, run_text: str) -> None:
    """The server drops the request at its next step and frees the slot. An attempt in which the two chunks
    reached the client only once the whole generation was over cannot tell and is repeated (seen on a 2-core
    machine under heavy load, with both ranks busy: the client process got no CPU until they idled)."""
    for _attempt in range(3):
        before = [s["cancelled"] for s in server.slots()]
        with server.client.completions.create(
            model="hf", prompt=PROMPT, max_tokens=CTX, stream=True, extra_body={"ignore_eos": True}
        ) as stream:
            for _, _chunk in zip(range(2), stream, strict=False):
                pass
        deadline = time.monotonic() + 60
        while any(s["is_processing"] for s in server.slots()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        slots = server.slots()
        dropped = [s for s, n in zip(slots, before, strict=True) if s["cancelled"] == n + 1]
        if dropped:
            break
        assert any(s["n_past"] == CTX for s in slots)  # not dropped: it ran to the end of the context
    assert len(dropped) == 1 and dropped[0]["n_past"] < CTX - 1  # it stopped well before the context was full
    assert server.client.completions.create(model="hf", prompt=PROMPT, max_tokens=N).choices[0].text == run_text


@pytest.mark.parametrize("cuts", [(), (1,), (3, 9), (8, 9, 10), (20,), (24, 26)])
def test_reasoning_split_is_the_same_however_the_text_is_cut(cuts: tuple[int, ...]) -> None:
    """A tag cut across pieces is held back until whole; the whitespace after a tag is dropped."""
    text = "<think>\nmull it</think>\n\nThe answer"
    split = ReasoningSplit(("<think>", "</think>"), thinking=False)
    bounds = [0, *cuts, len(text)]
    parts = [split.feed(text[a:b], final=b == len(text)) for a, b in itertools.pairwise(bounds)]
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == ("mull it", "The answer")
    opened = ReasoningSplit(("<think>", "</think>"), thinking=True)  # the prompt opened the thinking
    assert opened.feed("\n a</thi") == ("a", "") and opened.feed("nk> b", final=True) == ("", "b")


# --- one more server: a thinking template, an API key, no queue ----------------------------------------------


@pytest.fixture(scope="module")
def thinking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The fixture model with a chat template whose generation prompt opens the thinking (as DeepSeek-R1's and
    Qwen3-thinking's do), behind an API key, with one slot and no queue."""
    tmp = tmp_path_factory.mktemp("thinking")
    model = tmp / "thinker"
    shutil.copytree(FIXTURE, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
    )
    assert "<think>" in config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    flags = ("--api-key", "sesame", "--parallel", "1", "--queue", "0", "--reasoning-budget-message", " Enough.")
    yield from serve(tmp, *flags, model=model)


def test_a_wrong_api_key_gets_401(thinking: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        thinking.client.models.list()
    assert e.value.status_code == 401
    good = openai.OpenAI(base_url=f"{thinking.url}/v1", api_key="sesame", max_retries=0)
    assert good.models.list().data[0].id == "thinker"


def test_thinking_goes_to_reasoning_content_within_the_requests_budget(thinking: Server) -> None:
    """The answer of `tensorweave run` on the rendered prompt with --reasoning-budget 4, split at </think>: the
    request's budget over the server's (none), the server's --reasoning-budget-message."""
    messages = [{"role": "user", "content": "why?"}]
    prompt = "<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    argv = ["run", str(FIXTURE), "-p", prompt, "-n", "16", "--ignore-eos", "--reasoning-budget", "4"]
    argv += ["--reasoning-budget-message", " Enough."]  # the server's
    run = subprocess.run([sys.executable, "-m", "tensorweave.cli", *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    reasoning, content = run.stdout[:-1].split("</think>")
    assert reasoning.endswith(" Enough.")
    client = openai.OpenAI(base_url=f"{thinking.url}/v1", api_key="sesame", max_retries=0)
    extra = {"thinking_budget_tokens": 4, "ignore_eos": True}
    whole = client.chat.completions.create(model="x", messages=messages, max_tokens=16, extra_body=extra)  # type: ignore[arg-type]
    message = whole.choices[0].message.model_dump()
    assert message["reasoning_content"] == message["reasoning"] == reasoning.lstrip()
    assert message["content"] == content.lstrip()
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, extra_body=extra, stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta.model_dump() for c in stream]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning.lstrip()
    assert "".join(d.get("content") or "" for d in deltas) == content.lstrip()


def test_a_full_queue_gets_503_and_the_server_keeps_serving(thinking: Server) -> None:
    client = openai.OpenAI(base_url=f"{thinking.url}/v1", api_key="sesame", max_retries=0)
    kwargs: dict[str, Any] = {"model": "x", "prompt": PROMPT, "extra_body": {"ignore_eos": True}}
    with client.completions.create(max_tokens=CTX, stream=True, **kwargs) as stream:
        next(iter(stream))  # the only slot is busy, and --queue 0
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(max_tokens=1, **kwargs)
        assert e.value.status_code == 503 and "busy" in e.value.message
    deadline = time.monotonic() + 30
    while True:  # the slot frees once the server notices the closed stream
        try:
            assert client.completions.create(max_tokens=2, **kwargs).usage.completion_tokens == 2  # type: ignore[union-attr]
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_chat_pages_script_parses(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node installed")
    from tensorweave.serve.page import PAGE

    (script,) = re.findall(r"<script>(.*?)</script>", PAGE, re.S)
    (tmp_path / "page.js").write_text(script)
    check = subprocess.run([node, "--check", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_chat_page_streams_an_answer_in_headless_chromium(thinking: Server) -> None:
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium installed")
    page = httpx.get(thinking.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{thinking.url}/?key=sesame&prompt=why%3F",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-done="1"' in dom and re.search(r'class="thinking">[^<]+<', dom)


# --- ranks ----------------------------------------------------------------------------------------------------


def test_a_dead_rank_makes_rank_0_answer_503_and_exit_naming_it(tmp_path: Path) -> None:
    """Two ranks started by hand (no launcher to stop rank 0 first): rank 1 is killed; rank 0 notices at its next
    heartbeat, answers 503 naming it, and exits with one line naming it."""
    port, name = free_port(), f"tw-test-{os.getpid()}"
    argv = ["serve", str(FIXTURE), "--port", str(port), "--ctx", str(CTX)]
    ranks = [start(argv, tmp_path / f"rank{r}.log", rank_env(os.environ, r, 2, name, 60)) for r in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, ranks[0], tmp_path / "rank0.log")
        ranks[1].kill()
        deadline = time.monotonic() + 30
        while (r := httpx.get(f"{url}/health")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
        assert ranks[0].wait(30) == 2
        err = (tmp_path / "rank0.log").read_text().splitlines()
        assert err[-1].startswith("tensorweave: error: ") and "rank 1" in err[-1]
    finally:
        for p in ranks:
            stop(p)

"""The HTTP side of ``tensorweave serve``: OpenAI's API over an ``Engine``, on Starlette (SSE by sse-starlette).

Routes: ``GET /health`` (503 while the model loads or after the ranks failed, else 200 with the slots' load),
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events: ``data: {chunk}`` lines and a final ``data: [DONE]``), ``GET /slots`` (each slot's context,
as llama-server's), and ``GET /`` (the chat page). Errors have OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for an invalid request, 401 for a wrong ``--api-key``, 404 for an unknown route, 503 while
loading, when the queue is full or after a rank died. A failed request never stops the server.

Request fields beyond OpenAI's, as llama-server takes them: ``top_k``, ``min_p``, ``repeat_penalty``,
``repeat_last_n``, ``ignore_eos``, ``thinking_budget_tokens`` (over ``--reasoning-budget``) and
``chat_template_kwargs.enable_thinking``. For a model with thinking tags, a chat answer's thinking goes to
``reasoning_content`` (and ``reasoning``, the name vLLM uses) and the rest to ``content``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import SamplingError, TensorweaveError
from ..runtime.sampling import SamplingParams, prefix_overlap, reasoning_tags
from .engine import Engine, Finished, Job, Unavailable
from .page import PAGE

if TYPE_CHECKING:
    from ..runtime.model import Model

ROLES = ("system", "developer", "user", "assistant", "tool")
PARAMS = {  # request field -> SamplingParams field
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "seed": "seed",
    "thinking_budget_tokens": "reasoning_budget",
}


@dataclass
class ServerState:
    """What the app serves: set ``engine`` once the model is loaded; ``failure`` once the ranks are lost."""

    name: str  # the model's id in /v1/models and in responses
    api_key: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields: the server's sampling flags
    n_predict: int = -1  # max_tokens when a request gives none; -1: until the context is full
    stop: list[str] = field(default_factory=list)  # stop strings of every request
    ignore_eos: bool = False
    engine: Engine | None = None
    failure: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> Model:
        assert self.engine is not None
        return self.engine.model


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "unavailable_error" if self.status == 503 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


class ReasoningSplit:
    """Streamed text -> (reasoning, content) pieces, split at the thinking tags. A tag cut across pieces is held
    back until it is whole; the whitespace right after a tag (Qwen3 writes ``<think>\\n`` and ``</think>\\n\\n``)
    is dropped."""

    def __init__(self, tags: tuple[str, str], thinking: bool) -> None:
        self.tags, self.thinking, self.strip, self.held = tags, thinking, thinking, ""

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        parts = {True: "", False: ""}
        text, self.held = self.held + piece, ""
        while True:
            tag = self.tags[self.thinking]
            at = text.find(tag)
            if at < 0:
                hold = 0 if final else prefix_overlap(text, tag)
                self._add(parts, text[: len(text) - hold])
                self.held = text[len(text) - hold :]
                return parts[True], parts[False]
            self._add(parts, text[:at])
            text, self.thinking, self.strip = text[at + len(tag) :], not self.thinking, True

    def _add(self, parts: dict[bool, str], text: str) -> None:
        if self.strip:
            text = text.lstrip()
            self.strip = not text
        parts[self.thinking] += text


# --- requests -------------------------------------------------------------------------------------------------


def _int(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise bad(f"{key} must be an integer >= {minimum}, got {value!r}", key)
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)  # type: ignore[arg-type]
        raise bad(f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported", where)
    raise bad(f"{where} has no content (a string or a list of text parts)", where)


def prompt_ids(state: ServerState, body: Mapping[str, Any], chat: bool) -> tuple[list[int], ReasoningSplit | None]:
    """The prompt's token ids, and for a chat with a thinking model, the splitter of its answer (thinking from the
    start when the prompt opened a thinking tag and did not close it)."""
    model, tok = state.model, state.model.tokenizer
    if tok is None:
        raise bad(f"{state.name} has no tokenizer: it cannot take text")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list of {'role', 'content'} objects", "messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise bad(f"messages[{i}] needs a role, one of {', '.join(ROLES)}", f"messages[{i}].role")
            turns.append({**m, "content": _text(m.get("content"), f"messages[{i}]")})
        kwargs = body.get("chat_template_kwargs") or {}
        thinking = kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None
        try:
            ids = model.session().chat_prompt(turns, None if thinking is None else bool(thinking))
        except (TensorweaveError, jinja2.TemplateError) as e:
            raise bad(f"the conversation does not render with the model's chat template: {e}", "messages") from e
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special=True)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < model.vocab for t in ids):
                raise bad(f"prompt has token ids outside the vocabulary [0, {model.vocab})", "prompt")
        else:
            raise bad("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    ctx = model.config.ctx
    if not ids:
        raise bad("the prompt is empty", "prompt")
    if len(ids) >= ctx:
        raise bad(
            f"the prompt has {len(ids)} tokens; the context holds {ctx} (start the server with a larger --ctx)",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    tags = reasoning_tags(model.family, tok) if chat else None
    if tags is None:
        return ids, None
    text = tok.decode(ids)
    return ids, ReasoningSplit(tags, thinking=text.rfind(tags[0]) > text.rfind(tags[1]))


def make_job(state: ServerState, body: Mapping[str, Any], ids: list[int], emit: Any) -> Job:
    """The engine's job for a request: sampling over the server's defaults, max tokens, stop strings."""
    for key in ("n", "best_of"):
        if body.get(key, 1) != 1:
            raise bad(f"{key}={body[key]!r}: only one choice per request is supported", key)
    if body.get("logprobs") or body.get("echo") or body.get("tools"):
        raise bad("logprobs, echo and tools are not supported", "logprobs")
    params = dict(state.defaults)
    for key, name in PARAMS.items():
        if body.get(key) is not None:
            params[name] = body[key]
    if params.get("seed") is None:  # every rank must sample the same tokens: rank 0 picks the seed
        params["seed"] = secrets.randbelow(2**31)
    try:
        sampling = SamplingParams(**params)
    except SamplingError as e:  # its message names the field: "sampling parameter top_k=-1: ..."
        raise bad(str(e), next((k for k, v in PARAMS.items() if f"parameter {v}=" in str(e)), None)) from e
    a, b = _int(body, "max_completion_tokens", 0), _int(body, "max_tokens", 0)
    max_tokens = a if a is not None else b if b is not None else state.n_predict
    ctx = state.model.config.ctx
    max_tokens = ctx if max_tokens < 0 else max_tokens  # the context's end stops it first ("length")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    ignore_eos = body.get("ignore_eos", state.ignore_eos)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    return Job(ids, sampling, max_tokens, [*state.stop, *stop], ignore_eos, emit)


# --- responses ------------------------------------------------------------------------------------------------


def usage(done: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def job_error(e: Exception) -> ApiError:
    if isinstance(e, Unavailable):
        return ApiError(503, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}")


class Completion:
    """One request's answer as OpenAI shapes it: chunks while streaming, or the whole object."""

    def __init__(self, state: ServerState, chat: bool, split: ReasoningSplit | None) -> None:
        self.state, self.chat, self.split = state, chat, split
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.state.name, "choices": choices}

    def pieces(self, text: str, final: bool = False) -> dict[str, str]:
        """The message fields a piece of text adds: content, or reasoning and content split at the tags."""
        if not self.chat:
            return {"text": text}
        if self.split is None:
            return {"content": text}
        reasoning, content = self.split.feed(text, final)
        out = {"content": content} if content else {}
        return {**out, "reasoning_content": reasoning, "reasoning": reasoning} if reasoning else out

    def chunk(self, fields: Mapping[str, Any], finish: str | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["delta"] = dict(fields)
        else:
            choice.update(text=fields.get("text", ""), logprobs=None)
        return json.dumps(self._envelope([choice], True))

    def usage_chunk(self, done: Finished) -> str:
        return json.dumps({**self._envelope([], True), "usage": usage(done)})

    def whole(self, fields: Mapping[str, str], done: Finished) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": fields.get("content", ""), **fields}
        else:
            choice.update(text=fields.get("text", ""), logprobs=None)
        return {**self._envelope([choice], False), "usage": usage(done)}


# --- the app --------------------------------------------------------------------------------------------------


def create_app(state: ServerState) -> Starlette:
    def engine() -> Engine:
        if state.failure is not None:
            raise ApiError(503, state.failure)
        if state.engine is None:
            raise ApiError(503, "Loading model", code="loading")
        return state.engine

    def authorize(request: Request) -> None:
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            raise ApiError(401, "invalid API key: send the server's --api-key as 'Authorization: Bearer KEY'")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **engine().info()})

    async def models(request: Request) -> Response:
        authorize(request)
        m = engine().model
        meta = {"family": m.family.name, "n_ctx": m.config.ctx, "n_vocab": m.vocab, "devices": m.executor.world_size}
        card = {"id": state.name, "object": "model", "created": state.created, "owned_by": "tensorweave", "meta": meta}
        return JSONResponse({"object": "list", "data": [card]})

    async def slots(request: Request) -> Response:
        authorize(request)
        return JSONResponse([s.info() for s in engine().slots])

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def complete(request: Request, chat: bool) -> Response:
        authorize(request)
        eng = engine()
        try:
            body = await request.json()
        except ValueError:
            raise bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        stream = body.get("stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise bad("stream must be true or false and stream_options an object", "stream")
        ids, split = prompt_ids(state, body, chat)
        loop, events = asyncio.get_running_loop(), asyncio.Queue[tuple[str, Any]]()

        def emit(kind: str, value: Any) -> None:  # called by the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is going away
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = make_job(state, body, ids, emit)
        answer = Completion(state, chat, split)
        try:
            eng.submit(job)
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        if stream:
            return EventSourceResponse(_stream(answer, job, events, bool(options.get("include_usage"))))
        return await _whole(request, answer, job, events)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        what = "route" if exc.status_code == 404 else "method"
        return ApiError(exc.status_code, f"no such {what}: {request.method} {request.url.path}").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if state.engine is not None:  # shutting down (uvicorn re-raises SIGTERM after this): stop the other ranks too
            await asyncio.to_thread(state.engine.close)

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/slots", slots),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
    )


async def _stream(
    answer: Completion, job: Job, events: asyncio.Queue[tuple[str, Any]], include_usage: bool
) -> AsyncIterator[str]:
    """The SSE chunks of one request; a client that goes away cancels this, which drops the job."""
    try:
        if answer.chat:
            yield answer.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            job.taken += 1
            if kind == "piece":
                fields = answer.pieces(value)
                if fields:
                    yield answer.chunk(fields)
                continue
            if kind == "error":
                yield json.dumps(job_error(value).body)
                return
            rest = answer.pieces("", final=True) if answer.chat and answer.split else {}
            if rest:
                yield answer.chunk(rest)
            yield answer.chunk({}, value.finish_reason)
            if include_usage:
                yield answer.usage_chunk(value)
            yield "[DONE]"
            return
    finally:
        job.cancelled = True  # no-op once it finished


async def _whole(request: Request, answer: Completion, job: Job, events: asyncio.Queue[tuple[str, Any]]) -> Response:
    """The whole answer of a request that did not stream; dropped if the client goes away while it runs."""
    pieces = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            job.taken += 1
            if kind == "error":
                return job_error(value).response()
            if kind == "done":
                break
            pieces.append(value)
    finally:
        job.cancelled = True
    text = "".join(pieces)
    fields = answer.pieces(text, final=True) if answer.chat else {"text": text}
    return JSONResponse(answer.whole(fields, value))

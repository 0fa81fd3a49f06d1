"""``tensorweave serve MODEL``: an OpenAI-compatible HTTP server over a model split over devices (the ``serve``
extra: Starlette, uvicorn, sse-starlette).

The server listens at once and answers 503 on /health until the model is loaded (in a thread beside the event
loop). Under ``tensorweave launch``/mpiexec rank 0 serves HTTP and the other ranks follow its steps
(``serve.engine``); when the communicator reports a rank gone, rank 0 answers 503 for a moment, then exits with
one line naming it. stdout stays empty; what the server says goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from .. import errors
from .generate import _load_for_cli, _sampling, generation_args, run_args
from .options import positive_int

FAILURE_GRACE_S = 1.0  # after a rank died: answer 503 this long (in-flight clients get the error), then exit


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import ServerState, create_app
        from ..serve.engine import Engine, Link, follow
    except ImportError as e:
        raise errors.MissingDependencyError(
            f"tensorweave serve needs the serve extra ({e.name} is missing): pip install 'tensorweave[serve]'"
        ) from None
    from ..core.spmd import SpmdEnv

    spmd = SpmdEnv.detect()
    if spmd is not None and spmd.rank != 0:
        model, _ = _load_for_cli(args)
        follow(model, args.parallel, Link(model))
        return 0
    state = ServerState(
        name=args.alias or Path(args.model).name,
        api_key=args.api_key,
        defaults=_sampling(args),
        n_predict=args.n_predict,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,  # uvicorn's access log goes to stdout
            timeout_graceful_shutdown=2,
        )
    )
    failed: list[BaseException] = []

    def fail(message: str) -> None:
        state.failure = message
        threading.Timer(FAILURE_GRACE_S, lambda: setattr(server, "should_exit", True)).start()

    def load() -> None:
        while not server.started and not server.should_exit:  # listen first: /health says 503 while this loads
            time.sleep(0.01)
        try:
            model, _ = _load_for_cli(args)
            link = Link(model) if spmd is not None else None
            state.engine = Engine(model, args.parallel, args.queue, link, on_failure=fail)
            print(
                f"tensorweave serve: {model!r} ready at http://{args.host}:{args.port} ({args.parallel} slot(s))",
                file=sys.stderr,
                flush=True,
            )
        except BaseException as e:
            failed.append(e)
            state.failure = f"the model failed to load: {e}"
            server.should_exit = True

    print(f"tensorweave serve: loading {args.model}, listening on http://{args.host}:{args.port}", file=sys.stderr)
    threading.Thread(target=load, name="tensorweave-load", daemon=True).start()
    try:
        server.run()  # the app's lifespan closes the engine when it stops
    except SystemExit:  # uvicorn could not bind (it logged why)
        raise errors.ServeError(f"cannot listen on {args.host}:{args.port} (see the line above)") from None
    if failed:
        raise failed[0]
    if state.failure is not None:
        raise errors.ServeError(state.failure)
    return 0


def queue_size(text: str) -> int:
    """--queue: how many requests may wait, 0 or more."""
    value = int(text) if text.strip().lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server over a model split over devices",
        description="Serve MODEL over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, streaming, "
        "/v1/models, /health) and a chat page at /. Sampling flags are the defaults of every request; a "
        "request's own fields win. -n -1 (the default): until the context is full. Under `tensorweave launch -n N` "
        "or mpiexec rank 0 serves and the other ranks follow.",
    )
    run_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    p.add_argument(
        "-np",
        "--parallel",
        type=positive_int,
        default=1,
        help="requests run at once, each in a KV-cache slot of its own of --ctx tokens (default: %(default)s)",
    )
    p.add_argument(
        "--queue", type=queue_size, default=16, help="requests waiting beyond them; more get 503 (default: 16)"
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
    p.add_argument("--alias", help="the model's name in the API (default: the model's file or directory name)")
    generation_args(p, n_predict=-1)
    p.set_defaults(func=cmd_serve)

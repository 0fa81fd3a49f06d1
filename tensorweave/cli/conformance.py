"""``tensorweave conformance``: the conformance kit's suites against a backend and communicator."""

from __future__ import annotations

import argparse

from ..conformance import DEFAULT_MAX_EXAMPLES, DEFAULT_WORLD_SIZE, run
from .options import positive_int


def cmd_conformance(args: argparse.Namespace) -> int:
    extra = list(args.pytest_args)
    return run(
        args.backend,
        args.communicator,
        args.world_size,
        args.max_examples,
        args.report,
        args.devices,
        args.models,
        extra[1:] if extra[:1] == ["--"] else extra,
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``conformance`` subcommand."""
    p = sub.add_parser(
        "conformance",
        help="check a backend and communicator against the cpu-sim reference (the conformance kit)",
        description="Run the conformance kit's suites (device contract, ops, collectives, end to end) with pytest "
        "against --backend. pytest's progress goes to stderr; the summary table to stdout. Arguments after -- go "
        "to pytest (e.g. -- -k attention -x). Needs pip install 'tensorweave[conformance]'.",
    )
    p.add_argument("--backend", required=True, help="backend to test, as registered (tensorweave plugins)")
    p.add_argument("--communicator", help="communicator to test (default: the backend's)")
    p.add_argument("--devices", help="device spec to test on (default: BACKEND:N, else BACKEND)")
    p.add_argument(
        "--world-size", type=positive_int, default=DEFAULT_WORLD_SIZE, help="test 1..N devices (default: %(default)s)"
    )
    p.add_argument(
        "--max-examples",
        type=positive_int,
        default=DEFAULT_MAX_EXAMPLES,
        help="hypothesis examples per test (default: %(default)s)",
    )
    p.add_argument(
        "--models", default="auto", help="HF model dirs for end to end: DIR, none, or auto (the source tree's fixtures)"
    )
    p.add_argument("--report", help="write the JSON report to this file")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST ARGS", help="passed on to pytest")
    p.set_defaults(func=cmd_conformance)

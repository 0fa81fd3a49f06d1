"""The ``tensorweave`` command. stdout carries only what was asked for (tables or --json); warnings and
progress go to stderr. User errors print one line and exit 2; ``--debug`` (anywhere on the line) shows the
traceback instead. No abbreviated long options: ``-t 4`` is never read as ``-ts 4``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import errors
from .._version import __version__
from . import chat, conformance, demo, generate, inspect, launch
from . import serve as serve_cli
from .options import resolve_model_args

DESCRIPTION = (
    "Run transformer models split over devices (tensor parallelism). stdout carries only what was asked for "
    "(text, tables or --json); warnings and progress go to stderr. A user error prints one line and exits 2; "
    "--debug, anywhere on the line, shows the traceback instead. 'tensorweave COMMAND --help' explains a command."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorweave", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parsers(sub)
    generate.add_parsers(sub)
    chat.add_parsers(sub)
    inspect.add_parsers(sub)
    launch.add_parsers(sub)
    conformance.add_parsers(sub)
    serve_cli.add_parser(sub)
    for p in set(sub.choices.values()):  # every subcommand, whoever registered it
        p.allow_abbrev = False
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        p.set_defaults(subparser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "model_option"):  # the subcommand took options.model_args
        resolve_model_args(args, args.subparser)
    try:
        return int(args.func(args))
    except errors.TensorweaveError as e:
        if args.debug:
            raise
        print(f"tensorweave: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tensorweave plugins | head`: the reader left; not an error worth a traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open so the interpreter's final flush is quiet
        return 141

"""``tensorweave launch -n N -- ARGS...``: run N ranks of one program on this host, joined by ``shm``.

ARGS is a tensorweave subcommand (``run MODEL ...`` runs ``tensorweave run MODEL ...`` in every rank), ``python
...`` / ``-m module`` / ``script.py`` (this interpreter), or any other program. Each rank gets the SPMD
environment of ``tensorweave.core.spmd`` (``TENSORWEAVE_RANK``, ``_WORLD_SIZE``, ``_LOCAL_RANK``,
``_COMMUNICATOR=shm``, a fresh ``TENSORWEAVE_SHM_NAME``, ``TENSORWEAVE_STORE`` on a free local port for ranks
that open ``nccl`` instead, ``TENSORWEAVE_TIMEOUT`` when ``--timeout`` is given) and,
unless already set, BLAS/OpenMP thread counts that share the cores instead of oversubscribing them.

Input and output: rank 0 alone reads this command's stdin (the others read an empty one); rank 0's stdout is this
command's stdout (so it pipes); rank 0's stderr passes through; the other ranks'
stderr lines are prefixed ``[rank K]``; their stdout is dropped. When a rank fails (nonzero exit or signal) the
others are terminated (SIGTERM, then SIGKILL after a grace period) and the launcher exits nonzero with one line
naming the rank; its exit code is the failed rank's (128 + signal number for a signal). SIGINT, SIGTERM or SIGHUP
to the launcher is forwarded to the ranks, which are reaped (SIGKILL after the grace period) before it exits with
128 + the signal number: no rank is left behind as an orphan.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import IO, Any

from ..core import spmd
from .options import positive_int

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
POLL_S = 0.02
GRACE_S = 5.0


def rank_command(args: Sequence[str], subcommands: Collection[str]) -> list[str]:
    """The argv every rank runs for ``launch -- ARGS``."""
    first = args[0]
    if first in subcommands:
        return [sys.executable, "-m", "tensorweave.cli", *args]
    if first in ("python", "python3"):
        return [sys.executable, *args[1:]]
    if first == "-m" or first.endswith(".py"):
        return [sys.executable, *args]
    return list(args)


def free_port() -> int:
    """A TCP port free right now, for the rendezvous store rank 0 serves (NCCL unique ids)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(
    base: Mapping[str, str], rank: int, world: int, shm_name: str, timeout: float | None, store: str = ""
) -> dict[str, str]:
    env = dict(base)
    env.update(
        {
            spmd.ENV_RANK: str(rank),
            spmd.ENV_WORLD_SIZE: str(world),
            spmd.ENV_LOCAL_RANK: str(rank),
            spmd.ENV_COMMUNICATOR: "shm",
            spmd.ENV_SHM_NAME: shm_name,
            spmd.ENV_STORE: store or base.get(spmd.ENV_STORE, ""),
            "PYTHONUNBUFFERED": "1",  # prefixed stderr lines should arrive as they are written
        }
    )
    if timeout is not None:
        env[spmd.ENV_TIMEOUT] = str(timeout)
    threads = str(max(1, (os.cpu_count() or 1) // world))
    for var in THREAD_VARS:
        env.setdefault(var, threads)
    return env


def _prefix(stream: IO[bytes], rank: int, sink: IO[bytes], lock: threading.Lock) -> None:
    tag = f"[rank {rank}] ".encode()
    for line in iter(stream.readline, b""):
        with lock:
            sink.write(tag + line)
            sink.flush()
    stream.close()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(nprocs: int, args: Sequence[str], subcommands: Collection[str] = (), timeout: float | None = None) -> int:
    """Run the ranks and return the exit code (0 when every rank succeeded)."""
    shm_name = f"tw-{os.getpid()}-{secrets.token_hex(4)}"
    argv = rank_command(args, subcommands)
    store = f"127.0.0.1:{free_port()}"
    sink = sys.stderr.buffer
    lock = threading.Lock()
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[threading.Thread] = []
    sys.stdout.flush()
    forwarded = _forward_signals()
    try:
        for rank in range(nprocs):
            proc = subprocess.Popen(
                argv,
                env=rank_env(os.environ, rank, nprocs, shm_name, timeout, store),
                stdin=None if rank == 0 else subprocess.DEVNULL,  # rank 0 reads input (chat) and shares it
                stdout=None if rank == 0 else subprocess.DEVNULL,
                stderr=None if rank == 0 else subprocess.PIPE,
            )
            procs.append(proc)
            if proc.stderr is not None:
                t = threading.Thread(target=_prefix, args=(proc.stderr, rank, sink, lock), daemon=True)
                t.start()
                readers.append(t)
        while True:
            codes = [p.poll() for p in procs]
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                rank, code = failed
                stopped = _stop([p for p in procs if p.poll() is None])
                others = [str(r) for r, p in enumerate(procs) if p in stopped]
                with lock:
                    print(
                        f"tensorweave launch: rank {rank} {_describe(code)}"
                        + (f"; stopped rank{'s' * (len(others) > 1)} {', '.join(others)}" if others else ""),
                        file=sys.stderr,
                        flush=True,
                    )
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except (KeyboardInterrupt, _Signalled) as e:  # forwarded to the ranks, which are reaped before we return
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        stopped = _stop(procs, signum)
        with lock:
            print(
                f"tensorweave launch: got {signal.Signals(signum).name}; stopped rank{'s' * (len(stopped) != 1)} "
                + ", ".join(str(r) for r, p in enumerate(procs) if p in stopped),
                file=sys.stderr,
                flush=True,
            )
        return 128 + signum
    except OSError as e:  # the program could not be started
        _stop(procs)
        print(f"tensorweave launch: cannot start {argv[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
        for t in readers:
            t.join(timeout=1.0)
        _remove_segment(shm_name)


class _Signalled(Exception):
    """A signal to the launcher, raised where its main thread stands (see ``_forward_signals``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _forward_signals() -> dict[int, Any]:
    """While ranks run, SIGTERM and SIGHUP to the launcher raise ``_Signalled`` in its main thread, so it forwards
    them and reaps the ranks instead of dying and leaving them orphans (SIGINT arrives as KeyboardInterrupt).
    Returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def raise_signalled(signum: int, _frame: Any) -> None:
        raise _Signalled(signum)

    return {s: signal.signal(s, raise_signalled) for s in (signal.SIGTERM, signal.SIGHUP)}


def _stop(procs: Sequence[subprocess.Popen[bytes]], signum: int = signal.SIGTERM) -> list[subprocess.Popen[bytes]]:
    """Send ``signum`` to the running ones, SIGKILL whoever is left after the grace period; returns those that
    were running."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signum)
    deadline = time.monotonic() + GRACE_S
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return running


def _remove_segment(name: str) -> None:
    """Rank 0 unlinks the segment once all ranks attached; this covers runs that died before that."""
    with contextlib.suppress(OSError):
        os.unlink(f"/dev/shm/{name}")


def cmd_launch(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        args.parser.error("launch needs a command after --, e.g. tensorweave launch -n 2 -- python script.py")
    return launch(args.nprocs, command, subcommands=set(args.subcommands.choices), timeout=args.timeout)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``launch`` subcommand."""
    p = sub.add_parser(
        "launch",
        help="run N ranks of a command on this host, joined by the shm communicator",
        description="Run N ranks of `tensorweave ARGS` (or `python ...`, a script, any program) on this host. "
        "Rank 0's stdout is printed; other ranks' stderr is prefixed [rank K]; if a rank fails, the others stop.",
    )
    p.add_argument("-n", "--nprocs", type=positive_int, required=True, help="number of ranks")
    p.add_argument("--timeout", type=float, help="collective timeout in seconds (TENSORWEAVE_TIMEOUT; default 300)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the command every rank runs")
    p.set_defaults(func=cmd_launch, parser=p, subcommands=sub)  # read when run: later subcommands count too

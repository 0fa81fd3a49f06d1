"""The conformance kit: proves a backend (and a communicator) equivalent to the cpu-sim reference.

Run it::

    tensorweave conformance --backend NAME [--communicator NAME] [--world-size N] [--max-examples K]
                            [--devices SPEC] [--models DIR|none] [--report out.json] [-- PYTEST ARGS]
    pytest --pyargs tensorweave.conformance --tw-backend NAME [--tw-communicator NAME] [--tw-world-size N]
           [--tw-max-examples K] [--tw-devices SPEC] [--tw-models DIR|none] [--tw-nmse OP=X,...] [--tw-report F]

(``pip install 'tensorweave[conformance]'`` brings pytest and hypothesis.) The command prints pytest's progress and
failure details on stderr and ends with the summary table on stdout: one row per section with the counts passed /
failed / not supported / xfailed / skipped, then one line per failed test naming it and its error. It exits 0 when
nothing failed and every section executed tests, 1 otherwise (2 for a usage error such as an unknown backend).

Sections (one test module each):

- **device**: memory accounting (``empty``/``from_host`` raise ``used`` by at least the bytes, freeing lowers it
  again), ``from_host``/``to_host`` round trips bit-exact for every dtype (every float16/bfloat16 bit pattern, NaN
  payloads and infinities of float32/float64 included, strided host arrays and ``out=`` too), ``copy_from`` between
  every pair of devices counted as a peer copy exactly when peer access is enabled (staged otherwise, and always
  across backends), ``enable_peer_access`` refused where ``peer_access`` is False, ``PlacementError`` for arrays
  used on the wrong device, ``OutOfMemoryError`` naming the device past the capacity.
- **ops**: every registered op x float32/float16/bfloat16, one op per graph run through the executor on the
  backend against ``Graph.evaluate`` (the numpy kernels cpu-sim runs). Shapes, attributes and values are drawn by
  hypothesis (``--max-examples`` bounds the examples per test); element-wise ops also get NaN/inf inputs, softmax
  -inf masks. NaN and inf positions (and inf signs) must match the reference; the finite entries must have
  NMSE = sum((a - b)^2) / sum(b^2) below the op's threshold: 1e-7 by default, matmul/attention/moe_ffn 5e-4,
  softmax 1e-6, copies (copy, cast, embedding, reshape, transpose, slice, concat) 0 -- llama.cpp's test-backend-ops
  values; ``--tw-nmse matmul=1e-3`` overrides them. An op or dtype the backend's ``Capabilities`` leaves out is
  reported *not supported*, not failed.
- **weight formats**: matmul, embedding and moe_ffn reading weights held as float32, float16, bfloat16 and the GGUF
  quantization blocks tensorweave keeps (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; random blocks, every bit
  pattern) against core's reference kernels on the same weights converted to float32: matmul/moe_ffn within the
  matmul NMSE, embedding within 1e-12. A format the backend's ``Capabilities.weight_formats`` leaves out is *not
  supported* (the runtime converts such weights to float32 at load).
- **collectives**: allreduce / reduce_scatter (sum, max, min), allgather (unequal lengths) and broadcast of the
  chosen communicator over the first 1..N devices, for float32/float16/bfloat16/float64/int32, against a float64
  numpy reference (sums within the final rounding plus float32 accumulation; max/min and integers exact; every
  rank holding the same bits). Lengths, values and roots are drawn by hypothesis.
- **end to end**: models at TP = 1..N on the backend (uneven split 2:1:...:1, prompt then two decode steps) against
  cpu-sim at TP = 1, logits NMSE <= 1e-4 at every step: two synthetic random-weight transformers (dense and MoE,
  GQA, q/k-norm) always, plus the models of ``--models``: one Hugging Face directory or .gguf file, or every model
  directory under a parent (default ``auto``: the source tree's ``tests/fixtures/models`` when the package runs
  from a checkout; elsewhere the summary says where it looked; ``none`` turns it off).

Test ids read like ``op[matmul,dtype=float16]``, ``allreduce[op=sum,dtype=bfloat16,world=4]``,
``round_trip[dtype=bfloat16]``, ``model[synthetic-moe,tp=2]``. World sizes beyond the devices a spec gives are
reported not supported. A communicator that needs one process per rank (shm, mpi) is tested in real ranks: for each
world size W the kit starts ``tensorweave launch -n W`` (``mpiexec -n W`` for mpi) running the collective cases
(seeded examples, ``--max-examples`` per case) and the end-to-end models at TP = W (``tensorweave.conformance.ranks``),
and the tests judge what the ranks report. A section whose tests were all not supported or skipped executed nothing:
the run fails, and the summary says which section.

Devices: ``--devices SPEC`` when given; otherwise ``BACKEND:N`` (the count grammar of cpu-sim), and when that is
refused or gives fewer than N devices, the backend's default group ``BACKEND`` (GPU backends: every GPU). Pass
e.g. ``--devices cuda:0,0,0,0`` for four logical devices on one GPU.

**Declaring known failures in code.** A backend class (or communicator class) may set::

    class MyBackend(Backend):
        conformance_xfail = {"op[attention,dtype=float16]": "fp16 flash kernel accumulates in fp16 (#12)"}
        conformance_skip = {"allgather[*,world=8]": "hangs with 8 ranks on this driver"}

Keys are test-id patterns where ``*`` matches any run of characters and everything else is literal (``[`` too).
Matching tests are marked xfail (still run; a pass is reported as XPASS so the entry can go) or skipped, with the
reason and who declared it in the report. A pattern that matches no test is listed as stale in the summary.

JSON report (``--report``): ``backend``, ``communicator``, ``devices``, ``world_size``, ``max_examples``,
``thresholds`` (op -> NMSE bound), ``summary`` (section -> outcome -> count), ``empty_sections`` (sections that
executed nothing), ``models`` (the end-to-end models, or where ``auto`` looked), ``tests`` (one object per test:
``id``, ``section``, ``outcome`` in passed/failed/not_supported/xfailed/xpassed/skipped, ``message``, and for
numeric tests the worst ``nmse`` seen and its ``threshold``), ``stale_declarations``, ``exit_status``,
``duration_s``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DeviceSpecError, MissingDependencyError, ModelFormatError, PluginError
from ..format import table

if TYPE_CHECKING:
    from ..core.communicator import Communicator
    from ..core.device import Backend, Device

SECTIONS = {
    "device": "device",
    "ops": "ops",
    "weights": "weight formats",
    "collectives": "collectives",
    "end_to_end": "end to end",
}
OUTCOMES = ("passed", "failed", "not_supported", "xfailed", "xpassed", "skipped")
NOT_SUPPORTED = "NOT_SUPPORTED: "  # prefix of the skip reason that marks a test not supported
DEFAULT_WORLD_SIZE = 4  # 1..4 includes 3, the non-power-of-two size generic allreduces got wrong
DEFAULT_MAX_EXAMPLES = 10  # the whole kit on cpu-sim, 2 cores: ~9 s quiet, ~17 s loaded


FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "models"  # where a source checkout has them


def default_models_dir() -> Path | None:
    """The source tree's fixture models (``tests/fixtures/models`` beside the package), when running from one."""
    return FIXTURES if FIXTURES.is_dir() else None


def models_dir(option: str) -> Path | None:
    """The end-to-end section's models for ``--models``: ``auto`` (the source tree's fixtures, when there are
    any), ``none``, a directory of model directories, or one model (a Hugging Face directory or a .gguf file)."""
    if option == "none":
        return None
    if option == "auto":
        return default_models_dir()
    if not Path(option).exists():
        raise ModelFormatError(
            f"{option}: no such directory or file (--models takes a model directory or .gguf file, a directory of "
            "them, auto or none)"
        )
    if Path(option).is_file() and Path(option).suffix != ".gguf":
        raise ModelFormatError(f"{option}: not a model (--models takes a model directory or .gguf file, or a parent)")
    return Path(option)


def models_note(option: str, found: Path | None) -> str:
    """Which models the end-to-end section runs besides the synthetic ones, and where ``auto`` looked."""
    if found is not None:
        return str(found)
    if option == "auto":
        return f"none: no fixture models at {FIXTURES} (not a source checkout); --models DIR adds models"
    return "none (--models none)"


def empty_sections(summary: dict[str, dict[str, int]]) -> list[str]:
    """The sections that had tests but executed none (all not supported or skipped): a kit that tested nothing
    there must not pass."""
    executed = ("passed", "failed", "xfailed", "xpassed")
    return [
        f"{s}: none of its {sum(c.values())} tests executed ({c['not_supported']} not supported, {c['skipped']} "
        "skipped)"
        for s, c in summary.items()
        if sum(c.values()) and not sum(c[o] for o in executed)
    ]


def check_setup(backend: str, communicator: str | None) -> tuple[Backend, type[Communicator]]:
    """The Backend and Communicator class to test; one TensorweaveError naming the problem when unusable."""
    from ..core.plugins import registry

    reg = registry()
    b = reg.backend(backend)
    if not b.available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"backend {backend!r} is not available on this machine")
    cls = reg.communicator(communicator or b.default_communicator)
    allowed = cls.capabilities.backends
    if allowed is not None and backend not in allowed:
        raise PluginError(
            f"communicator {cls.name!r} does not drive {backend!r} devices (it supports: {', '.join(sorted(allowed))})"
        )
    return b, cls


def open_group(backend: str, n: int, spec: str | None) -> list[Device]:
    """The devices the kit tests on: ``spec`` (only ``backend``'s), else ``BACKEND:N``, else the backend's default
    group, whichever opens more devices (up to ``n``)."""
    from ..core.plugins import open_devices

    if spec:
        devs = open_devices(spec)
        others = sorted({d.backend.name for d in devs} - {backend})
        if others:
            raise DeviceSpecError(f"devices {spec!r} include {', '.join(others)} devices; the kit tests {backend} only")
        return devs
    best: list[Device] = []
    for candidate in (f"{backend}:{n}", backend):  # the count grammar; else the backend's own default group
        try:
            devs = open_devices(candidate)
        except DeviceSpecError:
            continue
        if len(devs) > len(best):
            best = devs
        if len(best) >= n:
            break
    if not best:
        raise DeviceSpecError(f"cannot open {backend} devices as {backend}:{n} or {backend}; name them (--devices)")
    return best


def format_summary(report: dict[str, Any]) -> str:
    """The section x outcome table and one line per failed test (what the command prints last)."""
    heads = ["passed", "failed", "not supported", "xfailed", "xpassed", "skipped"]
    rows = [[s, *(counts.get(o, 0) for o in OUTCOMES)] for s, counts in report["summary"].items()]
    total = [sum(int(r[i]) for r in rows) for i in range(1, len(heads) + 1)]
    lines = [
        f"conformance of backend {report['backend']!r} with communicator {report['communicator']!r} on "
        f"{len(report['devices'])} device(s), world sizes 1..{report['world_size']}:",
        table(["section", *heads], [*rows, ["total", *total]]),
    ]
    failed = [t for t in report["tests"] if t["outcome"] == "failed"]
    if failed:
        lines.append(f"\n{len(failed)} failed:")
        lines += [f"  FAILED {t['id']}: {t['message']}" for t in failed]
    reasons: dict[str, int] = {}
    for t in report["tests"]:
        if t["outcome"] == "not_supported":
            reasons[t["message"]] = reasons.get(t["message"], 0) + 1
    if reasons:
        lines.append("\nnot supported:")
        lines += [f"  {n:4d} x {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    lines += [f"\nstale declaration: {s}" for s in report["stale_declarations"]]
    lines.append(f"\nend-to-end models besides the synthetic ones: {report['models']}")
    if report["empty_sections"]:
        lines.append("\nFAILED: a section that executes no test proves nothing:")
        lines += [f"  {s}" for s in report["empty_sections"]]
    return "\n".join(lines)


def run(
    backend: str,
    communicator: str | None = None,
    world_size: int = DEFAULT_WORLD_SIZE,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    report: str | None = None,
    devices: str | None = None,
    models: str = "auto",
    pytest_args: Sequence[str] = (),
) -> int:
    """``tensorweave conformance``: run the suites with ``pytest.main``; pytest's output goes to stderr, the summary
    table to stdout. Returns pytest's exit status (0: all passed or not supported, 1: something failed)."""
    try:
        import hypothesis  # noqa: F401
        import pytest
    except ImportError as e:
        raise MissingDependencyError(
            f"the conformance kit needs pytest and hypothesis ({e}); pip install 'tensorweave[conformance]'"
        ) from None
    check_setup(backend, communicator)
    open_group(backend, world_size, devices)  # a bad spec: one line here rather than a pytest usage error
    models_dir(models)  # a missing directory: one line here rather than a pytest usage error
    with tempfile.TemporaryDirectory(prefix="tw-conformance-") as tmp:
        # An empty ini of our own: the kit behaves the same whatever pytest configuration the current directory has.
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        out = Path(report) if report else Path(tmp) / "report.json"
        args = [
            "--pyargs",
            __name__,
            "-c",
            str(ini),
            "--rootdir",
            str(Path(__file__).parent),
            "--confcutdir",
            str(Path(__file__).parent),
            "-p",
            "tensorweave.conformance.plugin",  # a no-op when the pytest11 entry point already loaded it
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::pytest.PytestAssertRewriteWarning",  # tensorweave is imported before pytest starts
            "-q",
            "--tb=short",
            "--tw-no-table",
            "--tw-backend",
            backend,
            "--tw-world-size",
            str(world_size),
            "--tw-max-examples",
            str(max_examples),
            "--tw-models",
            models,
            "--tw-report",
            str(out),
            *(["--tw-communicator", communicator] if communicator else []),
            *(["--tw-devices", devices] if devices else []),
            *pytest_args,
        ]
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the summary
            status = int(pytest.main(args))
        if not out.exists() or status not in (0, 1):  # a usage error or an interruption: its message is on stderr
            return status
        data = json.loads(out.read_text())
    print(format_summary(data))
    print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return status

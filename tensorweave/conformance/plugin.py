"""The kit's pytest plugin (entry point group ``pytest11``): the ``--tw-*`` options, the ``Kit`` the suites read,
declared xfails/skips, and the per-section summary table and JSON report.

Installed with tensorweave, so pytest loads it in every session of the environment; it stays inert (adds its
options, nothing else) unless ``--tw-backend`` is given. Everything that acts is on a ``Recorder`` registered only
then, and the suites' modules are only collected by ``pytest --pyargs tensorweave.conformance``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_WORLD_SIZE,
    NOT_SUPPORTED,
    OUTCOMES,
    SECTIONS,
    check_setup,
    empty_sections,
    format_summary,
    models_dir,
    models_note,
    open_group,
)

if TYPE_CHECKING:  # the plugin loads in every pytest session: keep its import light
    from ..core.communicator import Communicator
    from ..core.device import Backend, Device
    from .ranks import Group

KIT = pytest.StashKey["Kit"]()
RecordProperty = Callable[[str, object], None]  # pytest's record_property fixture
PACKAGE = __name__.rpartition(".")[0]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tensorweave-conformance", "tensorweave conformance kit (pytest --pyargs " + PACKAGE + ")")
    group.addoption("--tw-backend", metavar="NAME", help="backend to test; the kit is off without it")
    group.addoption("--tw-communicator", metavar="NAME", help="communicator to test (default: the backend's)")
    group.addoption("--tw-devices", metavar="SPEC", help="device spec to test on (default: BACKEND:N, else BACKEND)")
    group.addoption(
        "--tw-world-size", type=int, default=DEFAULT_WORLD_SIZE, metavar="N", help="test world sizes 1..N (%(default)s)"
    )
    group.addoption(
        "--tw-max-examples",
        type=int,
        default=DEFAULT_MAX_EXAMPLES,
        metavar="K",
        help="hypothesis examples per test (%(default)s)",
    )
    group.addoption("--tw-models", default="auto", metavar="DIR", help="HF model dirs for end to end (auto, none)")
    group.addoption("--tw-nmse", default="", metavar="OP=X,...", help="override per-op NMSE thresholds")
    group.addoption("--tw-report", metavar="FILE", help="write the JSON report here")
    group.addoption("--tw-no-table", action="store_true", help=argparse.SUPPRESS)  # the CLI prints it itself


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("tw_backend") is None:
        return
    from ..errors import TensorweaveError

    try:
        kit = Kit.from_config(config)
    except TensorweaveError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[KIT] = kit
    config.pluginmanager.register(Recorder(kit, config), "tensorweave-conformance-recorder")


def glob(pattern: str) -> re.Pattern[str]:
    """A test-id pattern: ``*`` matches any run of characters, everything else (``[`` included) itself."""
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")) + r"\Z")


@dataclass
class Kit:
    """What the suites test, resolved once per session from the options."""

    backend: Backend
    communicator: type[Communicator]
    world_size: int
    max_examples: int
    devices_spec: str | None
    models_dir: Path | None
    nmse_overrides: dict[str, float]
    report_path: Path | None
    declared: list[tuple[str, str, str, str]] = field(default_factory=list)  # (kind, pattern, reason, declared by)
    models_option: str = "auto"  # --tw-models as given
    _group: list[Device] | None = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> Kit:
        from ..errors import ModelFormatError

        opt = config.getoption
        backend, comm = check_setup(opt("tw_backend"), opt("tw_communicator"))
        if opt("tw_world_size") < 1 or opt("tw_max_examples") < 1:
            raise pytest.UsageError("--tw-world-size and --tw-max-examples must be at least 1")
        try:
            models = models_dir(opt("tw_models"))
        except ModelFormatError as e:
            raise pytest.UsageError(f"--tw-models {e}") from None
        from ..core.ops import OPS

        overrides = {}
        for item in filter(None, (s.strip() for s in opt("tw_nmse").split(","))):
            op, _, value = (p.strip() for p in item.partition("="))
            try:
                overrides[op] = float(value)
            except ValueError:
                raise pytest.UsageError(f"--tw-nmse: expected OP=NUMBER, got {item!r}") from None
            if op not in OPS:
                raise pytest.UsageError(f"--tw-nmse: unknown op {op!r}; ops: {', '.join(sorted(OPS))}")
        kit = cls(
            backend,
            comm,
            opt("tw_world_size"),
            opt("tw_max_examples"),
            opt("tw_devices"),
            models,
            overrides,
            Path(opt("tw_report")) if opt("tw_report") else None,
            models_option=opt("tw_models"),
        )
        kit.group()  # open the devices now: a spec that fails is a usage error, not a failure in every test
        for owner, obj in ((f"backend {backend.name}", backend), (f"communicator {comm.name}", comm)):
            for kind in ("xfail", "skip"):
                for pattern, reason in dict(getattr(obj, f"conformance_{kind}", {}) or {}).items():
                    kit.declared.append((kind, pattern, reason, owner))
        return kit

    def group(self) -> list[Device]:
        """The devices under test, opened once: ``--tw-devices``, else ``BACKEND:N``, else ``BACKEND``."""
        if self._group is None:
            self._group = open_group(self.backend.name, self.world_size, self.devices_spec)
        return self._group

    def ranks(self, world: int) -> Group:
        """What ``world`` real ranks of the (one-process-per-rank) communicator reported: started on first use."""
        from .ranks import group

        return group(self.backend.name, self.communicator.name, world, self.max_examples, self.models_dir)

    def threshold(self, op: str) -> float:
        from .cases import DEFAULT_NMSE, NMSE

        return self.nmse_overrides.get(op, NMSE.get(op, DEFAULT_NMSE))

    def settings(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Hypothesis settings of every property: the example budget, reproducible runs, no database files."""
        from hypothesis import HealthCheck, Phase, settings

        return settings(
            max_examples=self.max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        )

    def not_supported(self, why: str) -> None:
        pytest.skip(NOT_SUPPORTED + why)


def kit_items(items: list[pytest.Item]) -> Iterator[pytest.Item]:
    return (i for i in items if getattr(getattr(i, "module", None), "__name__", "").startswith(PACKAGE + ".test_"))


def display_id(item: pytest.Item) -> str:
    return item.name.removeprefix("test_")


def section_of(item: pytest.Item) -> str:
    return SECTIONS.get(item.module.__name__.rpartition(".test_")[2], "other")  # type: ignore[attr-defined]


class Recorder:
    """Applies declared xfails/skips and keeps every kit test's outcome for the table and the report."""

    def __init__(self, kit: Kit, config: pytest.Config) -> None:
        self.kit, self.config = kit, config
        self.tests: dict[str, dict[str, Any]] = {}
        self.stale: list[str] = []
        self.t0 = time.perf_counter()

    def pytest_report_header(self) -> str:
        kit = self.kit
        names = ", ".join(d.name for d in kit.group())
        return f"tensorweave conformance: backend {kit.backend.name}, communicator {kit.communicator.name}, on {names}"

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        mine = list(kit_items(items))
        for kind, pattern, reason, owner in self.kit.declared:
            rx = glob(pattern)
            hits = [i for i in mine if rx.match(display_id(i))]
            if not hits:
                self.stale.append(f"{owner} declares {kind} {pattern!r}, which matches no test")
            mark = pytest.mark.xfail if kind == "xfail" else pytest.mark.skip
            for i in hits:
                i.add_marker(mark(reason=f"declared by {owner}: {reason}"))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for i in kit_items(session.items):  # what is left after -k/-m deselection
            self.tests[i.nodeid] = {"id": display_id(i), "section": section_of(i), "outcome": "passed", "message": ""}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.get(report.nodeid)
        if entry is None or entry.get("_final"):
            return
        entry["duration_s"] = round(entry.get("duration_s", 0.0) + report.duration, 4)
        for key, value in report.user_properties:  # JSON has no inf: an NMSE of a misshapen result becomes null
            entry[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            entry.update(outcome="failed", message=_crash_message(report), _final=True)
        elif report.skipped:
            reason = str(report.longrepr[2]).removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else ""
            if xfail:
                entry.update(outcome="xfailed", message=str(report.wasxfail))
            elif reason.startswith(NOT_SUPPORTED):
                entry.update(outcome="not_supported", message=reason.removeprefix(NOT_SUPPORTED))
            else:
                entry.update(outcome="skipped", message=reason)
            entry["_final"] = True
        elif report.when == "call" and xfail:
            entry.update(outcome="xpassed", message=f"passed although declared xfail ({report.wasxfail})")

    def report(self, exitstatus: int) -> dict[str, Any]:
        from ..core.ops import OPS

        tests = [{k: v for k, v in t.items() if not k.startswith("_")} for t in self.tests.values()]
        summary: dict[str, dict[str, int]] = {}
        for s in [*SECTIONS.values(), *(t["section"] for t in tests)]:
            summary.setdefault(s, dict.fromkeys(OUTCOMES, 0))
        for t in tests:
            summary[t["section"]][t["outcome"]] += 1
        return {
            "empty_sections": empty_sections(summary),
            "models": models_note(self.kit.models_option, self.kit.models_dir),
            "backend": self.kit.backend.name,
            "communicator": self.kit.communicator.name,
            "devices": [d.name for d in self.kit.group()],  # opened in pytest_configure
            "world_size": self.kit.world_size,
            "max_examples": self.kit.max_examples,
            "thresholds": {op: self.kit.threshold(op) for op in sorted(OPS)},
            "summary": summary,
            "tests": tests,
            "stale_declarations": self.stale,
            "exit_status": int(exitstatus),
            "duration_s": round(time.perf_counter() - self.t0, 2),
        }

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        if not self.config.getoption("tw_no_table"):
            terminalreporter.write_sep("=", "tensorweave conformance")
            terminalreporter.write_line(format_summary(self.report(exitstatus)))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        report = self.report(exitstatus)
        if report["empty_sections"] and exitstatus == pytest.ExitCode.OK:  # a kit that tested nothing did not pass
            session.exitstatus = report["exit_status"] = int(pytest.ExitCode.TESTS_FAILED)
        if self.kit.report_path is not None:
            self.kit.report_path.write_text(json.dumps(report, indent=2) + "\n")


def _crash_message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.removeprefix("AssertionError: ").splitlines()[0] if text else "failed"


def param_ids(rows: Sequence[Mapping[str, Any]], lead: str | None = None) -> list[str]:
    """Readable ids: ``op=sum,dtype=float32,world=2``; the ``lead`` key's value goes first, bare (``silu,...``)."""
    return [",".join(str(v) if k == lead else f"{k}={v}" for k, v in r.items()) for r in rows]

"""The out-of-tree example plugin (examples/tensorweave-array-api-strict), pip-installed for real, once per test
session, into a temporary prefix; tests run a fresh interpreter with that prefix on PYTHONPATH (``run``).

``--prefix`` rather than ``--target``: pip then counts the tensorweave under test as installed and fetches only
what is missing (array-api-strict, ~80 kB) instead of reinstalling tensorweave from the index."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tensorweave-array-api-strict"

_installed: dict[str, Path] = {}


def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site-packages directory holding the example plugin and its dependencies (installed on first call)."""
    if "site" not in _installed:
        # A copy: setuptools builds in the source tree and would leave build/ and *.egg-info in the repository.
        src = tmp_path_factory.mktemp("example-src") / EXAMPLE.name
        shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        prefix = tmp_path_factory.mktemp("example-prefix")
        t0 = time.perf_counter()
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-build-isolation"]
        proc = subprocess.run(
            [*pip, "--prefix", str(prefix), str(src)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"pip could not install the example plugin:\n{proc.stderr}"
        sites = list(prefix.glob("lib*/python*/site-packages"))
        assert len(sites) == 1, f"expected one site-packages under {prefix}, found {sites}"
        print(f"example plugin installed in {time.perf_counter() - t0:.1f} s")
        _installed["site"] = sites[0]
    return _installed["site"]

"""plugins.md stays true to the code: every hookspec is in the hook reference with its exact signature, each of its
arguments and an example implementation; the tutorial's pyproject snippet is what the example package declares."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

from tensorweave.core import hookspecs

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "plugins.md").read_text()
EXAMPLE = ROOT / "examples" / "tensorweave-array-api-strict" / "pyproject.toml"
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("tensorweave_"))


def problems(doc: str, name: str) -> list[str]:
    """What the hook reference in ``doc`` lacks for hookspec ``name`` (empty: documented)."""
    sig = inspect.signature(getattr(hookspecs, name))  # annotations are strings: hookspecs defers them
    params = list(sig.parameters.values())
    heading = f"### `{name}({', '.join(p.name for p in params)})`"
    if heading not in doc:
        return [f"no heading {heading}"]
    section = re.split(r"\n#{2,3} ", doc.split(heading, 1)[1], maxsplit=1)[0]
    exact = f"def {name}({', '.join(f'{p.name}: {p.annotation}' for p in params)}) -> {sig.return_annotation}"
    found = [] if exact in section else [f"no exact signature {exact!r}"]
    found += [f"argument {p.name!r} undescribed" for p in params if f"- `{p.name}: {p.annotation}`" not in section]
    if not re.search(rf"@tw\.hookimpl\ndef {name}\(", section):
        found.append("no example implementation")
    return found


def test_there_are_hookspecs() -> None:
    assert len(HOOKS) >= 4


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_documented(name: str) -> None:
    assert problems(DOC, name) == [], f"plugins.md's entry for {name} is incomplete"


def test_the_check_notices_a_missing_argument_or_hook() -> None:
    name = HOOKS[0]
    assert problems(DOC.replace("- `register: ", "- register: "), name) == ["argument 'register' undescribed"]
    assert problems(DOC.replace(f"### `{name}(", "### `"), name) == [f"no heading ### `{name}(register)`"]


def test_tutorial_pyproject_matches_the_example_package() -> None:
    example = tomllib.loads(EXAMPLE.read_text())["project"]
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", DOC, re.S)]
    shown = [b["project"] for b in blocks if b.get("project", {}).get("name") == example["name"]]
    assert len(shown) == 1, f"plugins.md should show {example['name']}'s pyproject once"
    for key in ("version", "dependencies", "entry-points"):
        assert shown[0][key] == example[key], f"plugins.md shows another {key} than {EXAMPLE.relative_to(ROOT)}"


README = (ROOT / "README.md").read_text()
SERVER = "http://127.0.0.1:8080"  # a block that is a client of `tensorweave serve`: tests/test_serve.py runs it
SNIPPETS = [s for s in re.findall(r"```python\n(.*?)```", README, re.S) if SERVER not in s]
FIXTURE = str(ROOT / "tests" / "fixtures" / "models" / "qwen3" / "hf")  # has a chat template and thinking tags


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[s.splitlines()[-1][:40] for s in SNIPPETS])
def test_readme_python_snippet_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of the README runs as written, its placeholder paths pointing at a fixture model. The
    one that is a rank's program (``spmd_from_env``) must, started without a launcher, fail asking for one."""
    code = SNIPPETS[index].replace("path/to/hf_dir_or_model.gguf", FIXTURE).replace("path/to/same/model", FIXTURE)
    monkeypatch.chdir(tmp_path)  # snippets that save files write them here
    if "spmd_from_env()" in code:
        from tensorweave.errors import CollectiveError

        with pytest.raises(CollectiveError, match="launch"):
            exec(compile(code, f"README.md python block {index}", "exec"), {})
        return
    exec(compile(code, f"README.md python block {index}", "exec"), {})


PLUGIN_SNIPPETS = [s for s in re.findall(r"```python\n(.*?)```", DOC, re.S) if not re.fullmatch(r"def .*\n", s)]
EXAMPLE_PACKAGE = "tensorweave_array_api_strict"  # the tutorial's excerpts run in its modules' namespaces


@pytest.mark.parametrize("index", range(len(PLUGIN_SNIPPETS)), ids=[s.splitlines()[-1][:40] for s in PLUGIN_SNIPPETS])
def test_plugins_md_python_snippet_runs(index: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every ```python block of plugins.md (but the hook signatures, checked above) runs as written: on its own; the
    tutorial's excerpts in the example package's namespace (step 2 in its package, the others in its backend
    module); blocks that open array-api-strict devices in a fresh interpreter with the example installed. A hook
    a block defines registers something when called."""
    code = PLUGIN_SNIPPETS[index].replace("path/to/hf_dir_or_model.gguf", FIXTURE)
    code = code.replace('"tests/fixtures/models/qwen3/hf"', repr(FIXTURE))
    where: dict[str, object] = {"__name__": "plugins_md_snippet"}
    excerpt = "from .backend import" in code or "StrictBackend" in code or "(xp, out," in code
    if not excerpt and "array-api-strict:" in code:
        from example_site import example_site
        from test_plugins import run

        proc = run(example_site(tmp_path_factory), "-c", code)
        assert proc.returncode == 0, proc.stderr
        return
    if excerpt:
        sys.path.insert(0, str(EXAMPLE.parent))
        try:
            backend = importlib.import_module(f"{EXAMPLE_PACKAGE}.backend")
        finally:
            sys.path.remove(str(EXAMPLE.parent))
        where = {**vars(backend), "__name__": f"{EXAMPLE_PACKAGE}.snippet", "__package__": EXAMPLE_PACKAGE}
        modules = [importlib.import_module(f"{EXAMPLE_PACKAGE}{m}") for m in ("", ".backend", ".kernels")]
        for name in re.findall(r"^(?:class|def) (\w+)\(", code, re.M):  # an excerpt shows what the example has
            assert any(hasattr(m, name) for m in modules), f"the example package has no {name}"
    exec(compile(code, f"plugins.md python block {index}", "exec"), where)
    for name in HOOKS:
        if callable(where.get(name)):
            registered: list[object] = []
            where[name](registered.append)  # type: ignore[operator]
            assert registered, f"{name} in plugins.md python block {index} registers nothing"

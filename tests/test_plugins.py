"""Plugins through real entry points: a throwaway distribution is pip-installed into a temporary directory and
a fresh interpreter discovers, lists, selects and blocks it; broken plugins warn and leave the others working."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tensorweave.core import hookspecs
from tensorweave.core.plugins import registry

ROOT = Path(__file__).resolve().parents[1]

PLUGINS = {
    "tw_toy_plugin.py": '''
        """A third-party backend and communicator, registered through the public hooks only."""
        import tensorweave as tw
        from tensorweave.backends.cpu_sim import CpuSimBackend
        from tensorweave.communicators.local import LocalCommunicator

        class ToyBackend(CpuSimBackend):
            name = "toy"
            description = "toy backend from a throwaway plugin"

        class ToyCommunicator(LocalCommunicator):
            name = "toy-comm"

        @tw.hookimpl
        def tensorweave_register_backends(register):
            register(ToyBackend())

        @tw.hookimpl
        def tensorweave_register_communicators(register):
            register(ToyCommunicator)

        import json
        from pathlib import Path
        import numpy as np
        from tensorweave.core.model import Checkpoint, Loader
        from tensorweave.models.llama import Llama

        class ToyLlama(Llama):  # a new model_type reusing llama's graph
            name = "toy-llama"
            hf_model_types = ("toy_llama",)
            gguf_architectures = ()

        class NpzCheckpoint(Checkpoint):  # config.json + weights.npz keyed by graph weight names
            def __init__(self, path, families):
                self.path, self.family = path, families["toy-llama"]
                self.config = self.family.config_from_hf(json.loads((path / "config.json").read_text()))
                self.arrays, self.dtype = np.load(path / "weights.npz"), np.dtype("float32")
            def shape(self, name):
                return self.arrays[name].shape if name in self.arrays.files else None
            def names(self):
                return list(self.arrays.files)
            def read(self, name, index):
                return self.arrays[name][index]

        class NpzLoader(Loader):
            name = "npz"
            def probe(self, path):
                return (path / "weights.npz").exists()
            def open(self, path, families):
                return NpzCheckpoint(path, families)

        from tensorweave.core.model import Derived, Naming, piece
        from tensorweave.models.llama import gguf_common

        QKV = tuple(Derived(f"blk.{{L}}.attn_{x}", rows=piece(i, 3)) for i, x in enumerate("qkv"))
        GATE_UP = tuple(Derived(f"blk.{{L}}.ffn_{x}", rows=piece(i, 2)) for i, x in enumerate(("gate", "up")))

        class RenamedLlama(Llama):  # llama's graph under other names: fused q/k/v and gate/up, (1 + w) norms
            name = "toy-renamed"
            hf_model_types = ("toy_renamed",)
            gguf_architectures = ("toyarch",)
            gguf_permuted_qk = False
            reasoning_tags = ("<reason>", "</reason>")
            hf_naming = Naming(
                names={
                    "wte.weight": "token_embd",
                    "ln_f.weight": "output_norm",
                    "head.weight": "output",
                    "h.{L}.ln_1.weight": "blk.{L}.attn_norm",
                    "h.{L}.ln_2.weight": "blk.{L}.ffn_norm",
                    "h.{L}.attn.qkv.weight": QKV,
                    "h.{L}.attn.out.weight": "blk.{L}.attn_output",
                    "h.{L}.mlp.fc_in.weight": GATE_UP,
                    "h.{L}.mlp.fc_out.weight": "blk.{L}.ffn_down",
                },
                prefixes={"model.text.": ""},  # a multimodal checkpoint: the language model under a prefix
                ignore=("model[.]vision[.].*", "mtp[.].*"),
                norm_shift=1.0,  # stores w for a (1 + w) norm
            )
            gguf_naming = Naming(
                names={
                    "blk.{L}.attn_qkv": QKV,
                    "blk.{L}.ffn_gate_up": GATE_UP,
                    "blk.{L}.ffn_norm": Derived("blk.{L}.ffn_norm", squeeze=0, transform=np.exp),  # [1, H] of log w
                },
                passthrough=True,
            )

            def config_from_gguf(self, meta, shapes):
                return gguf_common(meta, shapes, "toyarch")

        @tw.hookimpl
        def tensorweave_register_models(register):
            register(ToyLlama())
            register(RenamedLlama())

        @tw.hookimpl
        def tensorweave_register_loaders(register):
            register(NpzLoader())
    ''',
    "tw_broken_plugin.py": 'raise ImportError("needs libfoo.so, which is not installed")\n',
    "tw_typo_plugin.py": """
        import tensorweave as tw

        @tw.hookimpl
        def tensorweave_register_backend(register):  # misspelled: no such hook
            pass
    """,
    "tw_dup_plugin.py": """
        import tensorweave as tw
        from tensorweave.backends.cpu_sim import CpuSimBackend

        @tw.hookimpl
        def tensorweave_register_backends(register):
            register(CpuSimBackend())  # "cpu-sim" is taken by the built-in
    """,
}


def install_plugin(
    tmp_path_factory: pytest.TempPathFactory, dist: str, modules: dict[str, str], entry_points: dict[str, str]
) -> Path:
    """pip-install a throwaway distribution (``modules``: file name -> source; ``entry_points``: name -> module of
    the ``tensorweave`` group) into a temporary --target directory, for a subprocess's PYTHONPATH."""
    src = tmp_path_factory.mktemp(dist)
    eps = "\n".join(f'{name} = "{module}"' for name, module in entry_points.items())
    py_modules = ", ".join(f'"{m.removesuffix(".py")}"' for m in modules)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{dist}"\nversion = "0.0.1"\n[tool.setuptools]\npy-modules = [{py_modules}]\n'
        f"[project.entry-points.tensorweave]\n{eps}\n"
    )
    for name, code in modules.items():
        (src / name).write_text(textwrap.dedent(code))
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    proc = subprocess.run([*pip, "--target", str(target), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"pip could not install the throwaway plugin {dist}:\n{proc.stderr}"
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry_points = {
        "toy": "tw_toy_plugin",
        "broken": "tw_broken_plugin",
        "typo": "tw_typo_plugin",
        "dup": "tw_dup_plugin",
    }
    return install_plugin(tmp_path_factory, "tw-toy-plugins", PLUGINS, entry_points)


def run(site: Path, *args: str, select: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORWEAVE_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if select is not None:
        env["TENSORWEAVE_PLUGINS"] = select
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def plugins_json(site: Path, select: str | None = None) -> tuple[dict[str, Any], str]:
    proc = run(site, "-m", "tensorweave.cli", "plugins", "--json", select=select)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout holds only the JSON; warnings went to stderr
    return data, proc.stderr


def test_builtins_are_registered_through_entry_points() -> None:
    reg = registry()
    assert {"cpu-sim", "local", "peer"} <= {p.name for p in reg.plugins if p.builtin and p.status == "loaded"}
    assert "cpu-sim" in reg.backends and {"local", "peer"} <= set(reg.communicators)


def test_third_party_plugin_is_discovered_and_listed(site: Path) -> None:
    data, _stderr = plugins_json(site)
    by_name = {p["name"]: p for p in data["plugins"]}
    toy = by_name["toy"]
    assert (toy["status"], toy["distribution"], toy["version"], toy["builtin"]) == (
        "loaded",
        "tw-toy-plugins",
        "0.0.1",
        False,
    )
    assert toy["hooks"] == [
        "tensorweave_register_backends",
        "tensorweave_register_communicators",
        "tensorweave_register_loaders",
        "tensorweave_register_models",
    ]
    assert (toy["backends"], toy["communicators"], toy["models"], toy["loaders"]) == (
        ["toy"],
        ["toy-comm"],
        ["toy-llama", "toy-renamed"],
        ["npz"],
    )
    assert "toy" in data["backends"] and "toy-comm" in data["communicators"]
    assert {"cpu-sim", "local", "peer"} <= set(data["backends"]) | set(data["communicators"])
    # The table form names the same things.
    table = run(site, "-m", "tensorweave.cli", "plugins").stdout
    assert re.search(r"toy\s+tw-toy-plugins\s+0\.0\.1\s+loaded", table) and "communicator toy-comm" in table


def test_broken_plugins_warn_and_leave_the_others_working(site: Path) -> None:
    data, stderr = plugins_json(site)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["broken"]["status"] == "failed"
    assert "tensorweave plugin 'broken' (tw_broken_plugin) failed to load: ImportError: needs libfoo.so" in stderr
    assert by_name["typo"]["status"] == "failed" and "tensorweave_register_backend" in by_name["typo"]["error"]
    assert by_name["dup"]["status"] == "failed"
    assert "registered backend 'cpu-sim', which another plugin already provides" in by_name["dup"]["error"]
    assert by_name["toy"]["status"] == "loaded" and by_name["cpu-sim"]["status"] == "loaded"


def test_toy_backend_and_communicator_work(site: Path) -> None:
    code = textwrap.dedent("""
        import numpy as np, tensorweave as tw
        devs = tw.devices("toy:3")
        bufs = [d.from_host(np.full(4, r + 1.0, np.float32)) for r, d in enumerate(devs)]
        tw.communicator(devs, "toy-comm").allreduce(bufs)
        print([d.name for d in devs], devs[2].to_host(bufs[2]).tolist())
    """)
    proc = run(site, "-W", "ignore", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['toy:0', 'toy:1', 'toy:2'] [6.0, 6.0, 6.0, 6.0]"


def test_toy_model_family_and_loader_load_a_model(site: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import json, numpy as np, tensorweave as tw
        from pathlib import Path
        from tensorweave.core.plugins import registry
        from tensorweave.models.synthetic import random_weights
        d = Path({str(tmp_path)!r})
        raw = dict(model_type="toy_llama", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
        (d / "config.json").write_text(json.dumps(raw))
        fam = registry().models["toy-llama"]
        np.savez(d / "weights.npz", **random_weights(fam.build(fam.config_from_hf(raw), 1), seed=3))
        ids = [1, 5, 9, 39, 0, 7]
        whole = tw.load(d).logits(ids)
        split = tw.load(d, devices="cpu-sim:2", tensor_split=[3, 1]).logits(ids)
        print(type(tw.load(d).checkpoint).__name__, whole.shape, float(np.abs(whole - split).max()) < 1e-5)
    """)
    proc = run(site, "-W", "ignore", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "NpzCheckpoint (6, 40) True"


def test_toy_family_brings_its_own_names_to_hf_and_gguf(site: Path, tmp_path: Path) -> None:
    """A family from a plugin maps its own tensor names (fused q/k/v and gate/up, a prefix, ignored vision and mtp
    tensors, (1 + w) norms; in GGUF another architecture, a squeezed and transformed norm) through the built-in
    loaders, whose files are written here by hand; the logits equal the numpy reference on the graph's weights."""
    code = textwrap.dedent(f"""
        import json, gguf, numpy as np, tensorweave as tw
        from pathlib import Path
        from tensorweave.core.plugins import registry
        from tensorweave.loaders.safetensors_io import write_safetensors
        from tensorweave.models.synthetic import random_weights
        from tensorweave.runtime.sampling import reasoning_tags
        d = Path({str(tmp_path)!r})
        raw = dict(model_type="toy_renamed", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5)
        fam = registry().models["toy-renamed"]
        cfg = fam.config_from_hf(raw)
        w = random_weights(fam.build(cfg, 1), seed=3)
        ids = [1, 5, 9, 39, 0, 7]
        g = fam.build(cfg, len(ids))
        feeds = dict(tokens=np.array(ids, np.int32), positions=np.arange(len(ids), dtype=np.int32))
        want = g.evaluate(feeds, w, {{n: np.zeros(t.shape, t.dtype) for n, t in g.caches.items()}})["logits"]
        hf = {{"model.text.wte.weight": w["token_embd"], "model.text.ln_f.weight": w["output_norm"] - 1,
              "head.weight": w["output"], "model.vision.patch.weight": np.ones((3, 3), np.float32),
              "mtp.0.proj.weight": np.ones((2, 2), np.float32)}}
        gg = {{"token_embd": w["token_embd"], "output_norm": w["output_norm"], "output": w["output"]}}
        for il in range(cfg.n_layer):
            b = lambda n: w[f"blk.{{il}}.{{n}}"]
            qkv = np.concatenate([b("attn_q"), b("attn_k"), b("attn_v")])
            gate_up = np.concatenate([b("ffn_gate"), b("ffn_up")])
            p = f"model.text.h.{{il}}."
            hf.update({{p + "ln_1.weight": b("attn_norm") - 1, p + "ln_2.weight": b("ffn_norm") - 1,
                       p + "attn.qkv.weight": qkv, p + "attn.out.weight": b("attn_output"),
                       p + "mlp.fc_in.weight": gate_up, p + "mlp.fc_out.weight": b("ffn_down")}})
            p = f"blk.{{il}}."
            gg.update({{p + "attn_norm": b("attn_norm"), p + "ffn_norm": np.log(b("ffn_norm"))[None],
                       p + "attn_qkv": qkv, p + "attn_output": b("attn_output"), p + "ffn_gate_up": gate_up,
                       p + "ffn_down": b("ffn_down")}})
        (d / "hf").mkdir()
        (d / "hf" / "config.json").write_text(json.dumps(raw))
        write_safetensors(d / "hf" / "model.safetensors", hf, {{"format": "pt"}})
        out = gguf.GGUFWriter(str(d / "m.gguf"), "toyarch")
        for key, v in dict(block_count=2, embedding_length=32, feed_forward_length=48, context_length=64,
                           vocab_size=40, **{{"attention.head_count": 4, "attention.head_count_kv": 4}}).items():
            out.add_uint32("toyarch." + key, v)
        out.add_float32("toyarch.attention.layer_norm_rms_epsilon", 1e-5)
        for n, a in gg.items():
            out.add_tensor(n + ".weight", np.ascontiguousarray(a, np.float32))
        out.write_header_to_file(); out.write_kv_data_to_file(); out.write_tensors_to_file(); out.close()
        for path in (d / "hf", d / "m.gguf"):
            for devices, split in (("cpu-sim", None), ("cpu-sim:3", [2, 1, 1])):
                m = tw.load(path, devices=devices, tensor_split=split)
                print(path.name, m.family.name, float(np.abs(m.logits(ids) - want).max()) < 1e-4)
        print(reasoning_tags(fam, None))
    """)
    proc = run(site, "-W", "ignore", "-c", code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[:4] == ["hf toy-renamed True"] * 2 + ["m.gguf toy-renamed True"] * 2, proc.stdout
    assert lines[4] == "('<reason>', '</reason>')"


def test_tensorweave_plugins_env_selects_and_blocks(site: Path) -> None:
    data, stderr = plugins_json(site, select="")  # empty: built-ins only
    status = {p["name"]: p["status"] for p in data["plugins"]}
    assert status == {
        **dict.fromkeys(
            [
                "cpu-sim",
                "local",
                "peer",
                "shm",
                "mpi",
                "nccl",
                "cuda",
                "rocm",
                "llama",
                "qwen2",
                "qwen3",
                "qwen3_moe",
                "mixtral",
                "gemma3",  # gemma families (issue 16)
                "gemma4",
                "hf",
                "gguf",
                "qwen3_next",  # Gated DeltaNet hybrids
                "qwen3_5_moe",
                "qwen3_5",
            ],
            "loaded",
        ),  # no GPU/MPI needed
        "toy": "blocked",
        "broken": "blocked",
        "typo": "blocked",
        "dup": "blocked",
    }
    assert "toy" not in data["backends"] and stderr == ""
    data, stderr = plugins_json(site, select="toy, nosuch")
    status = {p["name"]: p["status"] for p in data["plugins"]}
    assert status["toy"] == "loaded" and status["broken"] == "blocked" and "toy" in data["backends"]
    assert "TENSORWEAVE_PLUGINS names plugin 'nosuch', which is not installed" in stderr
    proc = run(site, "-m", "tensorweave.cli", "devices", "toy:2", select="")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "tensorweave: error: unknown backend 'toy'; registered: cpu-sim, cuda, rocm"
    )


def test_every_hookspec_is_documented_and_exercised() -> None:
    doc = (ROOT / "plugins.md").read_text()
    specs = [n for n in dir(hookspecs) if n.startswith("tensorweave_")]
    assert specs
    for name in specs:
        assert f"### `{name}(register)`" in doc, f"{name} is missing from plugins.md's hook reference"
        assert name in PLUGINS["tw_toy_plugin.py"], f"{name} has no throwaway-plugin test"

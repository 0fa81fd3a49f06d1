"""The command line as llama.cpp users type it: its flags parse to what they mean there, nothing is abbreviated,
--debug works anywhere, prompts come from -p, -f or stdin, run --json, help is plain text; plan and bench account
for the host's memory and the model's trained context."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from tensorweave.cli import build_parser, main
from tensorweave.core.device import total_host_memory
from tensorweave.errors import DeviceSpecError

FIXTURES = Path(__file__).parent / "fixtures" / "models"
QWEN3 = str(FIXTURES / "qwen3" / "hf")  # trained context 256


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_llama_cpp_flags_mean_what_they_mean_there() -> None:
    args = parse(
        *("run", "-m", QWEN3, "-p", "hi", "-n", "7", "-c", "128", "-t", "2", "-ts", "3,1", "-sm", "tensor"),
        *("-ngl", "99", "--temp", "0.7", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.05", "--seed", "3"),
        *("--repeat-penalty", "1.1", "-r", "User:", "-r", "###"),
    )
    got = vars(args)
    assert got["model_option"] == QWEN3 and got["prompt"] == "hi" and got["n_predict"] == 7 and got["ctx"] == 128
    assert got["threads"] == 2 and got["tensor_split"] == [3.0, 1.0] and got["gpu_layers"] == "99"
    assert (got["temp"], got["top_k"], got["top_p"], got["min_p"], got["seed"]) == (0.7, 40, 0.9, 0.05, 3)
    assert got["repeat_penalty"] == 1.1 and got["stop"] == ["User:", "###"]
    assert vars(parse("chat", QWEN3, "-sys", "be brief", "--ctx-size", "64"))["system"] == "be brief"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", QWEN3, "-p", "x", "--tem", "1"],  # an abbreviation of --temp
        ["run", QWEN3, "-p", "x", "--n-pred", "3"],
        ["plan", QWEN3, "--tensor", "1"],
        ["--deb", "devices"],
    ],
)
def test_no_option_is_abbreviated(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_debug_works_before_and_after_the_command() -> None:
    assert main(["devices", "cpu-sim:0"]) == 2
    for argv in (["--debug", "devices", "cpu-sim:0"], ["devices", "cpu-sim:0", "--debug"]):
        with pytest.raises(DeviceSpecError):
            main(argv)


def test_model_is_given_once(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run", "-p", "x"], ["run", QWEN3, "-m", QWEN3, "-p", "x"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "tensorweave run: error: the model" in capsys.readouterr().err


def test_dtype_lists_its_values_and_refuses_int32_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "{float32,float16,bfloat16,float64}" in subcommands()["run"].format_help()
    with pytest.raises(SystemExit) as e:
        main(["run", QWEN3, "-p", "x", "--dtype", "int32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "tensorweave run: error: argument --dtype: expected one of float32, float16, bfloat16, float64 (or bf16, "
        "f16 ...), got 'int32'"
    )
    assert vars(parse("run", QWEN3, "-p", "x", "--dtype", "bf16"))["dtype"] == "bfloat16"


def test_help_is_plain_text_and_devices_help_explains_the_spec() -> None:
    subparsers = subcommands()
    for name, p in {"": build_parser(), **subparsers}.items():
        text = p.format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name
    devices = subparsers["devices"].format_help()
    assert all(s in devices for s in ("cpu-sim[:COUNT]", "mem=SIZE", "peer=", "cuda:0,1", "+"))


def test_prompt_from_stdin_or_a_file_and_run_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "The café pays 42 €\nand more"
    (tmp_path / "prompt.txt").write_text(text)
    runs = []
    for source in (["-p", text], ["-f", str(tmp_path / "prompt.txt")], ["-p", "-"], ["-f", "-"]):
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
        assert main(["run", "-m", QWEN3, *source, "-n", "5", "--json", "-t", "1", "-ngl", "99"]) == 0
        out, err = capsys.readouterr()
        runs.append(json.loads(out))
        assert "-ngl has no effect" in err
    assert all(r == {**runs[0], "timings": r["timings"]} for r in runs)  # the same prompt every way
    first = runs[0]
    assert len(first["tokens"]) == 5 and first["finish_reason"] == "length" and isinstance(first["text"], str)
    assert first["prompt_tokens"] > 5 and first["timings"]["tokens_per_second"] > 0
    assert main(["run", QWEN3, "-f", str(tmp_path / "nosuch.txt")]) == 2
    assert "nosuch.txt: cannot read the prompt file" in capsys.readouterr().err


def test_a_context_beyond_the_trained_length_warns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", QWEN3, "-p", "hi", "-n", "1", "-c", "512"]) == 0
    assert "context 512 is beyond the 256 tokens the model was trained for" in capsys.readouterr().err
    assert main(["plan", QWEN3, "-c", "256"]) == 0
    assert "beyond" not in capsys.readouterr().err


def test_plan_fits_only_if_the_devices_sharing_host_memory_fit_in_it_together(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", QWEN3, "--devices", "cpu-sim:4", "-c", "1000", "--json"]) == 0
    per_token = [d["kv_cache_bytes"] / 1000 for d in json.loads(capsys.readouterr().out)["devices"]]
    ctx = int(0.9 * total_host_memory() / max(per_token))  # each device alone fits in the host's memory
    assert sum(per_token) * ctx > 1.5 * total_host_memory()  # all four together do not
    assert main(["plan", QWEN3, "--devices", "cpu-sim:4", "-c", str(ctx), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(d["total_bytes"] <= d["memory_bytes"] for d in data["devices"])
    assert [d["fits"] for d in data["devices"]] == [False] * 4 and data["host"]["fits"] is False
    assert main(["plan", QWEN3, "--devices", "cpu-sim:4", "-c", str(ctx)]) == 0
    assert "host memory, which 4 of these devices share:" in capsys.readouterr().out


def test_bench_defaults_fit_the_models_context(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", QWEN3, "-r", "1", "-n", "2", "--json"]) == 0  # -p defaults to 512, beyond 256
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert [t["test"] for t in data["tests"]] == ["pp256", "tg2"] and data["ctx"] == 256 and "warning" not in err


def test_a_prompt_longer_than_the_context_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", QWEN3, "-p", "word " * 100, "-c", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorweave: error: context full:") and err.rstrip().endswith("(a larger -c/--ctx-size)")


def test_load_refuses_a_dtype_that_is_no_float_dtype() -> None:
    import tensorweave as tw
    from tensorweave.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="dtype int32: a model computes in a float dtype"):
        tw.load(QWEN3, dtype="int32", progress=False)

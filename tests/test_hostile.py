"""Hostile files and faults (issue 20): mutated model files, edited state files, sessions raced from threads, a
stopped MPI rank, killed launchers, runaway chat templates. Each fault ends in one error of the tensorweave family
(or in a correct result), never in a hang, a crash or a silently wrong answer.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import tensorweave as tw
from tensorweave.errors import ModelFormatError, TensorweaveError, UnsupportedError

FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA_GGUF = FIXTURES / "llama" / "model-q8_0.gguf"


def expect(kind: type[TensorweaveError], path: Path, *words: str) -> str:
    """``tw.load(path)`` raises exactly ``kind`` naming the file and ``words``."""
    with pytest.raises(TensorweaveError) as info:
        tw.load(path, "cpu-sim:2")
    assert type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for w in (str(path), *words):
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# === 1. model files ================================================================================================


def edit_gguf(tmp_path: Path, src: Path, key: str, part: int, value: bytes) -> Path:
    """A copy of ``src`` with part ``part`` of metadata field (or tensor info) ``key`` overwritten by ``value``."""
    reader = gguf.GGUFReader(src)
    field = reader.fields.get(key) or next(t.field for t in reader.tensors if t.name == key)
    at = field.offset + sum(p.nbytes for p in field.parts[:part])
    assert field.parts[part].nbytes == len(value)
    data = bytearray(src.read_bytes())
    data[at : at + len(value)] = value
    out = tmp_path / src.name
    out.write_bytes(bytes(data))
    return out


def test_gguf_block_count_of_four_billion_fails_at_once_naming_the_key(tmp_path: Path) -> None:
    path = edit_gguf(tmp_path, LLAMA_GGUF, "llama.block_count", 3, b"\xff\xff\xff\xff")
    t0 = time.process_time()  # CPU time: a busy CI machine does not make it flaky
    expect(ModelFormatError, path, "llama.block_count", "4294967295", "3 layers")
    assert time.process_time() - t0 < 1.0  # the graph of 4e9 layers is never built (it took minutes, then OOM)


def test_gguf_metadata_array_whose_element_type_became_array_fails_at_once(tmp_path: Path) -> None:
    path = edit_gguf(tmp_path, LLAMA_GGUF, "tokenizer.ggml.scores", 3, struct.pack("<I", 9))  # element type ARRAY
    t0 = time.process_time()  # CPU time: a busy CI machine does not make it flaky
    expect(ModelFormatError, path, "'tokenizer.ggml.scores'", "array of arrays")
    assert time.process_time() - t0 < 1.0


def test_gguf_norm_stored_as_q5_0_is_refused_by_its_name(tmp_path: Path) -> None:
    src = FIXTURES / "llama" / "model-f32.gguf"
    path = edit_gguf(tmp_path, src, "blk.0.attn_norm.weight", 4, struct.pack("<I", int(gguf.GGMLQuantizationType.Q5_0)))
    expect(ModelFormatError, path, "'blk.0.attn_norm.weight'", "Q5_0", "F32")


def test_gguf_matrix_whose_type_changed_is_caught_by_its_data_range(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(LLAMA_GGUF)
    first, last = reader.tensors[1].name, reader.tensors[-1].name  # [0] is rope_freqs (F32, 1-D)
    q4_1 = struct.pack("<I", int(gguf.GGMLQuantizationType.Q4_1))
    expect(ModelFormatError, edit_gguf(tmp_path, LLAMA_GGUF, first, 4, q4_1), "offset")
    expect(ModelFormatError, edit_gguf(tmp_path, LLAMA_GGUF, last, 4, q4_1), "not fully covered")


@pytest.mark.parametrize("qtype", ["F64", "Q8_1", "Q8_K"])
def test_gguf_tensor_types_we_cannot_read_are_unsupported(tmp_path: Path, qtype: str) -> None:
    name = gguf.GGUFReader(LLAMA_GGUF).tensors[1].name
    path = edit_gguf(tmp_path, LLAMA_GGUF, name, 4, struct.pack("<I", int(gguf.GGMLQuantizationType[qtype])))
    expect(UnsupportedError, path, repr(name), qtype)


def safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict[str, Any], data: bytes, length_delta: int = 0) -> None:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes((len(head) + length_delta).to_bytes(8, "little") + head + data)


def hf_copy(tmp_path: Path, family: str = "llama", **config: Any) -> Path:
    out = tmp_path / family
    shutil.copytree(FIXTURES / family / "hf", out)
    if config:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return out


def test_safetensors_aliased_overlapping_and_uncovered_ranges_are_refused(tmp_path: Path) -> None:
    st = hf_copy(tmp_path) / "model.safetensors"
    header, data = safetensors_header(st)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    a, b = next((a, b) for a in names for b in names if a < b and header[a]["shape"] == header[b]["shape"])
    aliased = {b: {**header[b], "data_offsets": header[a]["data_offsets"]}}  # b reads a's bytes
    write_header(st, {**header, **aliased}, data)
    expect(ModelFormatError, st.parent, "overlaps", "invalid offset")
    shifted = {a: {**header[a], "data_offsets": [o + 4 for o in header[a]["data_offsets"]]}}
    write_header(st, {**header, **shifted}, data)
    expect(ModelFormatError, st.parent, "invalid offset")
    for delta in (-1, 1, 8):
        write_header(st, header, data, length_delta=delta)
        with pytest.raises(ModelFormatError):
            tw.load(st.parent, "cpu-sim:2")
    write_header(st, header, data + b"\0" * 8)
    expect(ModelFormatError, st.parent, "not fully covered")


@pytest.mark.parametrize(
    ("family", "edit", "words"),
    [
        ("llama", {"rms_norm_eps": -1}, ["norm_eps", "(0, 1)"]),
        ("llama", {"rms_norm_eps": float("nan")}, ["rms_norm_eps", "finite"]),
        ("llama", {"rope_parameters": {"rope_theta": -1.0}}, ["rope_theta", "positive"]),
        ("qwen3_moe", {"num_experts_per_tok": 1.5}, ["num_experts_per_tok", "1.5", "integer"]),
        ("llama", {"head_dim": 2**63}, ["head_dim", "tensor dimension"]),
        ("mistral", {"sliding_window": 2**31}, ["window", "int32"]),
        ("qwen3_moe", {"num_hidden_layers": 2**32}, ["num_hidden_layers", "3 layers"]),
    ],
)
def test_config_values_out_of_range_are_one_model_format_error(
    tmp_path: Path, family: str, edit: dict[str, Any], words: list[str]
) -> None:
    expect(ModelFormatError, hf_copy(tmp_path, family, **edit), *words)


def test_gguf_freq_base_of_minus_one_is_refused(tmp_path: Path) -> None:
    path = edit_gguf(tmp_path, LLAMA_GGUF, "llama.rope.freq_base", 3, struct.pack("<f", -1.0))
    expect(ModelFormatError, path, "rope_theta", "positive")


def run_fuzz(seed: int, total: int, scratch: Path, case_timeout: float = 10.0) -> dict[int, tuple[str, str]]:
    """Cases 0..total-1 of tests/fuzz_loader_worker.py in a child (memory-capped); a case that prints nothing for
    ``case_timeout`` s is a hang: the child is killed and restarted after it. Returns case -> (outcome, detail)."""
    worker = Path(__file__).with_name("fuzz_loader_worker.py")
    results: dict[int, tuple[str, str]] = {}
    first = 0
    while first < total:
        cmd = [sys.executable, str(worker), str(seed), str(first), str(total - first), str(scratch)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current = first
        while True:
            if not sel.select(timeout=case_timeout):
                proc.kill()
                results[current] = ("hang", "")
                break
            line = proc.stdout.readline()
            if not line:
                if current not in results:
                    results[current] = ("crash", f"exit {proc.wait()}")
                break
            record = json.loads(line)
            current = record["case"]
            if not record.get("start"):
                results[current] = (record["outcome"], f"{record['what']}: {record['error']}")
        proc.wait()
        sel.close()
        first = max(results, default=first - 1) + 1
    return results


def test_fuzzed_model_files_end_in_a_family_error_or_a_finite_model(tmp_path: Path) -> None:
    """300 seeded mutations of the fixture models (GGUF metadata/tensor-index fields, header bytes, truncation,
    safetensors header entries and length, config.json values): no hang, no crash, no exception outside the family
    and no NaN logits from a file that loaded."""
    results = run_fuzz(seed=20, total=300, scratch=tmp_path)
    outcomes = Counter(o for o, _ in results.values())
    bad = {i: r for i, r in results.items() if r[0] not in ("family", "ok")}
    assert not bad, f"{outcomes}: {dict(list(bad.items())[:10])}"
    assert len(results) == 300 and outcomes["family"] > 150  # the mutations do break files


# === 2. state files ================================================================================================

TINY = FIXTURES / "llama" / "hf"
PROMPT = [5, 9, 13, 17]


@pytest.fixture(scope="module")
def tiny() -> tw.Model:
    return tw.load(TINY, "cpu-sim:2")


@pytest.fixture(scope="module")
def tiny1() -> tw.Model:
    """On one device: the thread races run hundreds of steps, and a step on one device is cheapest."""
    return tw.load(TINY, "cpu-sim:1")


def saved_state(model: tw.Model, path: Path, prompt: list[int] = PROMPT) -> Path:
    sess = model.session()
    sess.generate(prompt, 3, temperature=1.0, seed=3)
    return sess.save(path)


def edit_state(path: Path, edit: Any) -> Path:
    """Apply ``edit(meta)`` to the state file's JSON metadata (its data stays as it was)."""
    header, data = safetensors_header(path)
    meta = json.loads(header["__metadata__"]["tensorweave"])
    edit(meta)
    header["__metadata__"]["tensorweave"] = json.dumps(meta)
    out = path.with_name("edited.tws")
    write_header(out, header, data)
    return out


def setter(*keys: str, value: Any = None, delete: bool = False) -> Any:
    def edit(meta: dict[str, Any]) -> None:
        for k in keys[:-1]:
            meta = meta[k]
        if delete:
            del meta[keys[-1]]
        else:
            meta[keys[-1]] = value

    return edit


STATE_EDITS = {
    "no tokens": setter("tokens", delete=True),
    "no caches": setter("caches", delete=True),
    "no model": setter("model", delete=True),
    "tokens not a list": setter("tokens", value="5 9 13"),
    "token -1": lambda m: m["tokens"].__setitem__(2, -1),
    "token 1e9": lambda m: m["tokens"].__setitem__(2, 10**9),
    "token 2**70": lambda m: m["tokens"].__setitem__(2, 2**70),
    "token 1.5": lambda m: m["tokens"].__setitem__(2, 1.5),
    "token true": lambda m: m["tokens"].__setitem__(2, True),
    "token = vocab": lambda m: m["tokens"].__setitem__(2, 384),
    "cache kind": lambda m: m["caches"][next(iter(m["caches"]))].update(kind="tape"),
    "cache first -3": lambda m: m["caches"][next(iter(m["caches"]))].update(first=-3),
    "cache first str": lambda m: m["caches"][next(iter(m["caches"]))].update(first="0"),
    "cache entry not a dict": lambda m: m["caches"].update({next(iter(m["caches"])): 7}),
    "cache without tensor": lambda m: m["caches"].update({"blk.9.k": {"kind": "kv", "first": 0}}),
    "tensor without cache": lambda m: m["caches"].pop(next(iter(m["caches"]))),
    "sampler not a dict": setter("sampler", value=[1, 2]),
    "sampler without params": setter("sampler", "params", delete=True),
    "sampler without state": setter("sampler", "state", delete=True),
    "sampler unknown param": setter("sampler", "params", "warmth", value=1),
    "sampler temperature str": setter("sampler", "params", "temperature", value="hot"),
    "sampler top_p 7": setter("sampler", "params", "top_p", value=7),
    "sampler rng": setter("sampler", "state", "rng", value={"bit_generator": "MT19937"}),
    "sampler history -1": setter("sampler", "state", "history", value=[-1]),
    "sampler vocab": setter("sampler", "state", "vocab", value=7),
    "sampler no reasoning": setter("sampler", "state", "reasoning", delete=True),
    "fingerprint int": setter("model", "fingerprint", value=7),
    "version true": setter("version", value=True),
    "version 99": setter("version", value=99),
}


@pytest.mark.parametrize("edit", STATE_EDITS)
def test_state_file_field_edits_are_one_state_error_and_leave_the_live_session(
    tiny: tw.Model, tmp_path: Path, edit: str
) -> None:
    path = edit_state(saved_state(tiny, tmp_path / "s.tws"), STATE_EDITS[edit])
    live = tiny.session()
    live.eval(PROMPT)
    with pytest.raises(TensorweaveError) as info:
        tiny.restore(path)
    assert type(info.value) is tw.errors.StateError, f"{type(info.value).__name__}: {info.value}"
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert tiny.active is live  # the failed restore took nothing over: the live session goes on
    np.testing.assert_allclose(live.eval([21])[-1], tiny.logits([*PROMPT, 21])[-1], rtol=1e-5, atol=1e-5)


def mutate_json(rng: Any, meta: dict[str, Any]) -> str:
    """Replace or delete one value somewhere in ``meta`` (seeded), like a hand edit of the file."""
    node: Any = meta
    path: list[Any] = []
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.7):
        key = rng.choice(sorted(node) if isinstance(node, dict) else range(len(node)))
        if not isinstance(node[key], (dict, list)) or not node[key] or rng.random() < 0.3:
            break
        node, path = node[key], [*path, key]
    if not isinstance(node, (dict, list)) or not node:
        return "nothing"
    key = rng.choice(sorted(node) if isinstance(node, dict) else range(len(node)))
    if isinstance(node, dict) and rng.random() < 0.2:
        del node[key]
        return f"delete {[*path, key]}"
    node[key] = rng.choice([None, -1, 0, 1.5, 2**70, 10**9, "x", [], {}, True, float("nan")])
    return f"{[*path, key]} = {node[key]!r}"


def test_fuzzed_state_files_restore_right_or_raise_one_state_error(tiny: tw.Model, tmp_path: Path) -> None:
    """200 seeded edits of a state file's metadata: each restore either works or is one StateError that leaves
    the live session's caches alone."""
    import random

    rng = random.Random(20)
    saved = saved_state(tiny, tmp_path / "s.tws")
    live = tiny.session()
    live.eval(PROMPT)
    outcomes: Counter[str] = Counter()
    for _ in range(200):
        what: list[str] = []
        path = edit_state(saved, lambda meta, what=what: what.append(mutate_json(rng, meta)))
        try:
            tiny.restore(path).generate(None, 1)
            outcomes["restored"] += 1
        except tw.errors.StateError:
            outcomes["StateError"] += 1
            assert tiny.active is live, what  # refused before taking anything over
        except Exception as e:
            raise AssertionError(f"{what}: {type(e).__name__}: {e}") from None
        if tiny.active is not live:  # a restore that worked took over: start a live session again
            live = tiny.session()
            live.eval(PROMPT)
    assert outcomes["StateError"] > 100, outcomes
    np.testing.assert_allclose(live.eval([21])[-1], tiny.logits([*PROMPT, 21])[-1], rtol=1e-5, atol=1e-5)


def test_state_checksum_detects_a_flipped_bit_in_the_cache_data(tiny: tw.Model, tmp_path: Path) -> None:
    path = saved_state(tiny, tmp_path / "s.tws")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(tw.errors.StateError, match="checksum"):
        tiny.restore(path)
    unchecked = saved_state(tiny, tmp_path / "unchecked.tws")
    sess = tiny.session()
    sess.eval(PROMPT)
    sess.save(unchecked, checksum=False)  # opted out: restores without the check
    assert tiny.restore(unchecked).n_past == len(PROMPT)


@pytest.mark.parametrize("where", ["missing-dir/s.tws", "a-file/s.tws", "a-dir"])
def test_saving_or_restoring_at_a_bad_path_is_a_state_error(tiny: tw.Model, tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "a-dir").mkdir()
    sess = tiny.session()
    sess.eval(PROMPT)
    with pytest.raises(tw.errors.StateError, match="cannot save to"):
        sess.save(tmp_path / where)
    with pytest.raises(tw.errors.StateError, match=str(tmp_path / where)):
        tiny.restore(tmp_path / where)
    assert tiny.active is sess


def test_concurrent_saves_to_one_path_leave_the_last_one_whole(tmp_path: Path) -> None:

    from tensorweave.runtime import state

    models = [tw.load(TINY, "cpu-sim:1") for _ in range(2)]
    states = []
    for model, prompt in zip(models, ([5, 9, 13], [7, 11, 2, 3, 4]), strict=True):
        sess = model.session()
        sess.eval(prompt)
        states.append(sess.state())
    path = tmp_path / "both.tws"
    for _ in range(20):
        threads = [threading.Thread(target=state.write, args=(s, path)) for s in states]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert state.read(path).tokens in ([5, 9, 13], [7, 11, 2, 3, 4])  # one whole save (checksum verified)
    state.write(states[1], path)
    state.write(states[0], path)
    assert state.read(path).tokens == [5, 9, 13]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.tws"]  # no temporary file left behind


# === 3. threads ====================================================================================================


def race(*jobs: Any) -> list[Any]:
    """Run ``jobs`` in threads started together; each one's result, or the exception it raised."""

    results: list[Any] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = jobs[i]()
        except Exception as e:  # collected: the test judges them
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_sessions_in_two_threads_get_their_own_tokens_or_a_state_error(tiny1: tw.Model) -> None:
    tiny = tiny1
    prompts = ([5, 9, 13, 17], [40, 2, 77])
    want = [tiny.session().generate(p, 3).tokens for p in prompts]
    seen: Counter[str] = Counter()
    for _ in range(300):
        sessions = [tiny.session() for _ in prompts]
        jobs = [lambda s=s, p=p: s.generate(p, 3).tokens for s, p in zip(sessions, prompts, strict=True)]
        for got, expected in zip(race(*jobs), want, strict=True):
            if isinstance(got, Exception):
                assert type(got) is tw.errors.StateError, repr(got)
                seen["StateError"] += 1
            else:
                assert got == expected  # never another session's cache: no silent wrong token
                seen["right"] += 1
    assert seen["right"] >= 300  # at least one of each pair finishes


def test_a_stream_raced_by_logits_yields_only_right_text_before_its_state_error(tiny1: tw.Model) -> None:
    tiny = tiny1
    prompt = [5, 9, 13, 17]
    want = tiny.session().generate(prompt, 4).text
    for _ in range(100):
        stream = tiny.session().generate(prompt, 4, stream=True)
        pieces: list[str] = []
        outcome = race(lambda s=stream, out=pieces: out.extend(s), lambda: tiny.logits([1, 2, 3]))[0]
        if isinstance(outcome, Exception):
            assert type(outcome) is tw.errors.StateError, repr(outcome)
            assert want.startswith("".join(pieces))  # what it printed before the error was right
        else:
            assert "".join(pieces) == want


# === 4. processes ==================================================================================================

RANK_LOOP = """
import os, pathlib, sys
import numpy as np
import tensorweave as tw
from tensorweave.core.spmd import SpmdEnv
dev = tw.devices("cpu-sim:1")[0]
comm = SpmdEnv.detect().connect([dev], sys.argv[1], timeout=1)
buf = dev.from_host(np.zeros(1000, np.float32))
comm.allreduce([buf])
pathlib.Path(sys.argv[2], f"rank{comm.local_ranks[0]}").write_text(str(os.getpid()))
while True:
    comm.allreduce([buf])
"""


def wait_for_pids(outdir: Path, n: int, proc: subprocess.Popen[str]) -> dict[int, int]:
    deadline = time.monotonic() + 60
    while len(list(outdir.glob("rank*"))) < n or any(not p.read_text() for p in outdir.glob("rank*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)
    return {int(p.name[4:]): int(p.read_text()) for p in outdir.glob("rank*")}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def reap(pids: Any) -> None:

    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


HAVE_MPI = (
    shutil.which("mpiexec") is not None
    and subprocess.run([sys.executable, "-c", "import mpi4py.MPI"], capture_output=True).returncode == 0
)


@pytest.mark.skipif(not HAVE_MPI, reason="mpi4py and mpiexec are not installed (pip install 'tensorweave[mpi]')")
def test_mpiexec_with_a_stopped_rank_ends_every_process_with_the_error_line(tmp_path: Path) -> None:

    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWEAVE_")}
    cmd = ["mpiexec", "-n", "3", sys.executable, "-c", RANK_LOOP, "mpi", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pids: dict[int, int] = {}
    try:
        pids = wait_for_pids(tmp_path, 3, proc)
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - stopped_at
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [r for r, p in pids.items() if alive(p)]
    finally:
        proc.kill()
        reap(pids.values())
    assert elapsed < 1 + 0.5 + 1.5 + 5, elapsed  # 1 s timeout, 0.5 s diagnosis, 1.5 s for peers to report, noise
    assert proc.returncode != 0
    assert re.search(r"mpi allreduce #\d+ \(rank [02] of 3\): timed out after 1 s: rank 1 did not arrive", err), err
    assert "aborting the MPI job" in err
    assert not left, f"ranks {left} still running"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_to_launch_is_forwarded_and_every_rank_reaped(tmp_path: Path, signame: str) -> None:

    code = "import os,pathlib,sys,time; pathlib.Path(sys.argv[1], 'rank' + os.environ['TENSORWEAVE_RANK'])" + (
        ".write_text(str(os.getpid())); time.sleep(120)"
    )
    cmd = [sys.executable, "-m", "tensorweave.cli", "launch", "-n", "3", "--", "python", "-c", code, str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: dict[int, int] = {}
    try:
        pids = wait_for_pids(tmp_path, 3, proc)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=20)
        left = [r for r, p in pids.items() if alive(p)]
    finally:
        proc.kill()
        reap(pids.values())
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert f"tensorweave launch: got {signame}; stopped ranks 0, 1, 2" in err
    assert not left, f"ranks {left} were left running"


# === 5. chat templates =============================================================================================

RUNAWAY_TEMPLATES = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "range too long": "{% for i in range(10**7) %}{% endfor %}",
    "huge power": "{{ 7 ** 999999999 }}",
    "repeated string": "{{ 'x' * 10**10 }}",
    "centered": "{{ 'x' | center(10**10) }}",
    "method width": "{{ 'x'.ljust(10**10) }}",
    "format width": "{{ '%99999999d' % 1 }}",
    "macro fan-out": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "deep recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "escape attempt": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "undefined": "{{ messages[0].nope.deeper }}",
    "syntax": "{% for m in messages %}",
}


@pytest.mark.parametrize("name", RUNAWAY_TEMPLATES)
def test_runaway_or_broken_chat_templates_are_one_template_error_line(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorweave.loaders import chat_limits
    from tensorweave.loaders.tokenizer import Tokenizer

    monkeypatch.setattr(chat_limits, "TIME_LIMIT_S", 0.5)  # the default (5 s) is no faster to hit
    base = tw.load(TINY, "cpu-sim:1").tokenizer
    tok = Tokenizer(base.backend, chat_template=RUNAWAY_TEMPLATES[name], source="hostile-template")
    t0 = time.monotonic()
    with pytest.raises(TensorweaveError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert type(info.value) is tw.errors.TemplateError, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    assert msg.startswith("hostile-template: ") and "\n" not in msg, msg
    assert time.monotonic() - t0 < 10  # bounded by the time limit, not by the template (it ran >30 s before)


def test_real_chat_templates_render_under_the_limits(tiny: tw.Model) -> None:
    tok = tiny.tokenizer
    assert tok is not None and tok.chat_template
    messages = [{"role": "user", "content": "x" * 100_000}, {"role": "assistant", "content": "ok"}]
    text = tok.apply_chat_template(messages)
    assert "x" * 100_000 in text and text.count("ok") >= 1


def test_a_runaway_template_in_the_cli_is_one_error_line(tmp_path: Path) -> None:
    model = hf_copy(tmp_path)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ 'x' * 10**10 }}"}))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "tensorweave.cli", "chat", str(model), "-n", "4"],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "chat template" in ln]
    assert len(lines) == 1 and "exceeds the output limit" in lines[0], proc.stderr

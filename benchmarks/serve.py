"""Aggregate decode speed and first-token latency of ``tensorweave serve`` at 1, 2 and 4 concurrent streams.

    python benchmarks/serve.py [--streams 1 2 4] [--tokens 32] [--prompt 64] [--runs 3] [--devices cpu-sim]
                               [--ranks 1] [--dir /tmp/tw-serve-bench]

The model is the 125M llama-like benchmark model of benchmarks/loading.py (written once to --dir), with a
word-level tokenizer over its 32000 ids (``w0 w1 ...``, no end-of-sequence token) so that every step streams
one word. The server runs with ``--parallel`` = the largest stream count (``--ranks 2``: under ``tensorweave
launch -n 2``); each case sends that many streaming completions at once (distinct prompts of --prompt words, so no
prompt cache hits) through the official ``openai`` client and measures, per request, the time to its first
text (TTFT) and, over the case, generated tokens / wall time. One stream is the baseline of the ratio column.
Medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from loading import write_model  # benchmarks/loading.py: the same 125M model

from tensorweave.cli.launch import free_port
from tensorweave.format import table

VOCAB = 32000


def write_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))


def stream(client: openai.OpenAI, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first, n = 0.0, 0
    chunks = client.completions.create(
        model="bench", prompt=prompt, max_tokens=tokens, stream=True, stream_options={"include_usage": True}
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].text and not first:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return first, time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--devices", default="cpu-sim")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tw-serve-bench"))
    args = ap.parse_args()
    if not (args.dir / "model.safetensors").exists():
        print(f"writing the benchmark model to {args.dir}...", file=sys.stderr)
        write_model(args.dir, 12, 768)
    if not (args.dir / "tokenizer.json").exists():
        write_tokenizer(args.dir)
    port = free_port()
    serve = ["serve", str(args.dir), "--port", str(port), "--parallel", str(max(args.streams)), "--ctx", "512"]
    serve += ["--devices", args.devices, "--ignore-eos"]
    argv = ["launch", "-n", str(args.ranks), "--", *serve] if args.ranks > 1 else serve
    server = subprocess.Popen([sys.executable, "-m", "tensorweave.cli", *argv], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        stream(client, "w1 w2 w3", 4)  # warm up: trace and compile the graphs
        rows, base = [], None
        for c in args.streams:
            ttft, speed = [], []
            for run in range(args.runs):
                prompts = [
                    " ".join(f"w{(97 * (run * 16 + i) + 13 * k) % VOCAB}" for k in range(args.prompt)) for i in range(c)
                ]
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    results = list(pool.map(lambda p: stream(client, p, args.tokens), prompts))
                wall = time.perf_counter() - t0
                ttft += [r[0] for r in results]
                speed.append(sum(r[2] for r in results) / wall)
            tps = statistics.median(speed)
            base = base or tps
            rows.append(
                [
                    c,
                    f"{statistics.median(ttft) * 1000:.0f}",
                    f"{max(ttft) * 1000:.0f}",
                    f"{tps:.1f}",
                    f"{tps / base:.2f}x",
                ]
            )
        print(
            f"tensorweave serve, 125M llama-like float32 on {args.devices} x {args.ranks} rank(s), prompt "
            f"{args.prompt} tokens, {args.tokens} generated per stream, medians of {args.runs}"
        )
        print(table(["streams", "TTFT median ms", "TTFT max ms", "aggregate tok/s", "vs 1 stream"], rows))
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the launcher and its ranks
        server.wait()


if __name__ == "__main__":
    main()

"""Child process of tests/test_hostile.py's loader fuzz: mutates fixture model files and loads each.

``python fuzz_loader_worker.py SEED FIRST COUNT SCRATCH`` builds cases FIRST..FIRST+COUNT-1 of the seeded
sequence (case i depends only on SEED and i, so a parent that restarts after a hang skips exactly the hung case),
writes each mutated model under SCRATCH, runs ``tw.load(path, "cpu-sim:2").logits([1, 2, 3])`` and prints one JSON
line per case: ``{"case": i, "start": true}`` before, ``{"case": i, "outcome": ..., "what": ...}`` after, where the
outcome is "ok", "family" (an error of the tensorweave family) or "foreign" (anything else: a bug). Memory is capped
(RLIMIT_AS) so an unbounded allocation ends as a MemoryError instead of swapping; hangs are the parent's to catch.

Mutations are structured, as a hostile user edits a file: GGUF metadata values, value types, array element types
and counts, tensor dims, types and offsets set to boundary values; bytes flipped in the header; truncation;
safetensors header length, offsets, shapes, dtypes; config.json counts and reals set to boundary values.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "models"
GGUFS = ["llama/model-q8_0.gguf", "qwen3_moe/model-q8_0.gguf", "mistral/model-q8_0.gguf", "llama/model-f32.gguf"]
HF = ["llama/hf", "qwen3_moe/hf", "mixtral/hf"]
INTS = [0, 1, 2, 3, 7, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**48, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT_BITS = [struct.unpack("<I", struct.pack("<f", v))[0] for v in (float("nan"), float("inf"), -1.0, 0.0, 1e38)]
JSON_VALUES: list[Any] = [0, -1, 1.5, 2**31, 2**63, 1e308, None, True, "7", [], {}, float("nan"), -1e-5]


def gguf_fields(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every number in the header the reader parsed (kv types, values, counts, tensor dims,
    types, offsets), and where the data starts."""
    import gguf

    r = gguf.GGUFReader(path)
    spots: list[tuple[int, int]] = []
    for field in [*r.fields.values(), *(t.field for t in r.tensors)]:
        at = field.offset
        for part in field.parts[:24]:  # a long array's elements are all alike: its first ones are enough
            if part.nbytes in (1, 2, 4, 8) and part.dtype.kind in "uif":
                spots.append((at, part.nbytes))
            at += part.nbytes
    return spots, r.data_offset


def mutate_gguf(rng: random.Random, data: bytearray, spots: list[tuple[int, int]], header: int) -> str:
    kind = rng.choice(["field", "field", "field", "float", "bytes", "truncate"])
    if kind in ("field", "float"):
        at, width = rng.choice(spots)
        value = rng.choice(FLOAT_BITS if kind == "float" and width == 4 else INTS) % (1 << (8 * width))
        data[at : at + width] = value.to_bytes(width, "little")
        return f"{kind} @{at}/{width} = {value:#x}"
    if kind == "bytes":
        at = rng.randrange(header)
        for i in range(rng.randint(1, 4)):
            data[min(at + i, header - 1)] = rng.randrange(256)
        return f"bytes @{at}"
    cut = rng.randrange(len(data))
    del data[cut:]
    return f"truncate {cut}"


def mutate_hf(rng: random.Random, root: Path) -> str:
    if rng.random() < 0.5:
        cfg_path = root / "config.json"
        cfg = json.loads(cfg_path.read_text())
        key = rng.choice(sorted(k for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))
        cfg[key] = rng.choice(JSON_VALUES)
        cfg_path.write_text(json.dumps(cfg))
        return f"config {key} = {cfg[key]!r}"
    st = root / "model.safetensors"
    raw = bytearray(st.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    kind = rng.choice(["length", "entry", "entry", "bytes"])
    if kind == "length":
        n2 = n + rng.choice([-9, -1, 1, 8, 2**32])
        raw[:8] = (n2 % 2**64).to_bytes(8, "little")
        st.write_bytes(bytes(raw))
        return f"header length {n2}"
    if kind == "bytes":
        at = rng.randrange(8, 8 + n)
        raw[at] = rng.randrange(256)
        st.write_bytes(bytes(raw))
        return f"header byte @{at}"
    header = json.loads(raw[8 : 8 + n])
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry, what = header[name], rng.choice(["offsets", "shape", "dtype", "alias"])
    if what == "offsets":
        i = rng.randrange(2)
        entry["data_offsets"][i] = max(0, entry["data_offsets"][i] + rng.choice([-4, -1, 1, 4, 2**40]))
    elif what == "shape" and entry["shape"]:
        entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice(INTS[:8])
    elif what == "dtype":
        entry["dtype"] = rng.choice(["F64", "F16", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "Q8"])
    else:  # alias another tensor of the same size
        same = [k for k, v in header.items() if k not in ("__metadata__", name) and v.get("shape") == entry["shape"]]
        if same:
            entry["data_offsets"] = list(header[rng.choice(same)]["data_offsets"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    st.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n :])
    return f"{name} {what}"


def case(seed: int, i: int, scratch: Path, spots: dict[str, tuple[list[tuple[int, int]], int]]) -> tuple[Path, str]:
    rng = random.Random(f"{seed}:{i}")
    if rng.random() < 0.6:
        src = rng.choice(GGUFS)
        data = bytearray((FIXTURES / src).read_bytes())
        what = mutate_gguf(rng, data, *spots[src])
        out = scratch / f"case{i}.gguf"
        out.write_bytes(bytes(data))
        return out, f"{src}: {what}"
    src = rng.choice(HF)
    out = scratch / f"case{i}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(FIXTURES / src, out)
    return out, f"{src}: {mutate_hf(rng, out)}"


def main() -> None:
    seed, first, count, scratch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    import numpy as np

    import tensorweave as tw
    from tensorweave.errors import TensorweaveError

    spots = {src: gguf_fields(FIXTURES / src) for src in GGUFS}
    cap = 3 << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for i in range(first, first + count):
        print(json.dumps({"case": i, "start": True}), flush=True)
        path, what = case(seed, i, scratch, spots)
        try:
            with tw.load(path, "cpu-sim:2") as model:
                finite = bool(np.isfinite(model.logits([1, 2, 3])).all())
            outcome, message = ("ok", "") if finite else ("nan", "")
        except TensorweaveError as e:
            outcome, message = "family", f"{type(e).__name__}: {e}"
        except BaseException as e:  # the point: anything else is a bug to report
            outcome, message = "foreign", f"{type(e).__name__}: {e}"
        print(json.dumps({"case": i, "outcome": outcome, "what": what, "error": message[:300]}), flush=True)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()

"""Plain-text formatting shared by everything that prints a report: the command line, the conformance kit's
summary and the benchmarks. A leaf module (it imports only ``errors``), so any of them may use it without
importing one another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import format_bytes

if TYPE_CHECKING:
    from .runtime.bench import DeviceMemory


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_count(n: float) -> str:
    """Parameter counts as llama-bench shows them: 124.70 M, 1.24 B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def split_text(ratios: Sequence[float]) -> str:
    """A tensor split as the -ts flag spells it: 3,1,2."""
    return ",".join(f"{r:g}" for r in ratios)


def memory_rows(devices: Sequence[DeviceMemory], with_capacity: bool) -> list[list[str]]:
    """Per device: name, weights, KV cache, total; with the device's memory and whether the total fits."""
    fits = {True: "yes", False: "NO", None: "?"}
    return [
        [d.name, format_bytes(d.weight_bytes), format_bytes(d.kv_bytes), format_bytes(d.total_bytes)]
        + ([format_bytes(d.capacity) if d.capacity is not None else "?", fits[d.fits]] if with_capacity else [])
        for d in devices
    ]

"""What a model needs on each device before loading it (``plan_model``), and how fast it runs (``bench``).

``plan_model`` opens the checkpoint with the registered loaders exactly as ``tw.load`` does (config and tensor
index; no tensor data is read), traces the family's one-token decode graph and runs the planner for the split: per
device the weight and KV-cache bytes, against the device's memory when the device spec can be opened here, and the
collectives and bytes communicated per decode token. ``tensorweave plan`` prints it.

``bench`` measures a loaded model the way llama-bench does: ``pp N`` is the prefill speed of an N-token prompt
(one ``Session.eval`` of N random token ids with the last token's logits only, as generation and llama-bench
evaluate a prompt), ``tg N`` the decode speed of N tokens evaluated one per step from an
empty context (random ids, no sampling: the model's speed, not the sampler's). Each test runs once as a warm-up
(tracing, planning and placing the buffers of its graph shapes) and then ``repetitions`` times, each in a fresh
session; it reports the mean and sample standard deviation of tokens per second over the repetitions, and the share
of the measured wall time spent inside communicator calls (``Executor.timings``). The KV-cache clear at the start
of a fresh session is inside the timing, as it is a memset of at most a few MiB per device. ``tensorweave bench``
prints it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.device import Device, total_host_memory
from ..core.graph import Graph
from ..core.planner import Plan, plan
from ..core.plugins import open_devices
from ..errors import BackendUnavailableError
from . import formats as weight_formats
from . import kvcache
from .model import check_weights, config_errors, open_checkpoint, runtime_config

if TYPE_CHECKING:
    from .model import Model


@dataclass(frozen=True)
class DeviceMemory:
    """One device's share of a model: its weight slices and its KV-cache slice at the planned context length."""

    name: str
    weight_bytes: int
    kv_bytes: int
    capacity: int | None = None  # the device's memory; None where the devices could not be opened here
    host_fits: bool | None = None  # devices sharing the host's memory: whether all of them together fit in it

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def fits(self) -> bool | None:
        """Whether weights + KV cache fit in the device's memory (activation buffers come on top), and, for devices
        that share the host's memory, whether all of theirs fit in it; None: unknown."""
        return None if self.capacity is None else self.total_bytes <= self.capacity and self.host_fits is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": self.kv_bytes,
            "total_bytes": self.total_bytes,
            "memory_bytes": self.capacity,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class HostMemory:
    """The host memory that some of the devices allocate from (cpu-sim's): what they need together, and its size."""

    devices: list[str]
    need_bytes: int
    capacity: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "need_bytes": self.need_bytes,
            "memory_bytes": self.capacity,
            "fits": self.fits,
        }


def device_memory(p: Plan, devices: Sequence[Device] | None = None) -> list[DeviceMemory]:
    """Per-device bytes of decode plan ``p`` (weights, the KV cache as preallocated); capacities from ``devices``."""
    names = [d.name for d in devices] if devices is not None else [f"rank {r}" for r in range(p.world_size)]
    caps = [d.memory_info().total for d in devices] if devices is not None else [None] * p.world_size
    rows = [DeviceMemory(n, w, c, cap) for n, w, c, cap in zip(names, p.weight_bytes, p.cache_bytes, caps, strict=True)]
    host = host_memory(rows, devices)
    if host is None:
        return rows
    return [replace(r, host_fits=host.fits) if r.name in host.devices else r for r in rows]


def host_memory(rows: Sequence[DeviceMemory], devices: Sequence[Device] | None) -> HostMemory | None:
    """What the devices that allocate from this host's memory need of it together; None when none does."""
    shared = [r for r, d in zip(rows, devices or (), strict=False) if d.backend.shares_host_memory]
    if not shared:
        return None
    return HostMemory([r.name for r in shared], sum(r.total_bytes for r in shared), total_host_memory())


def _params(g: Graph) -> int:
    return sum(math.prod(t.shape) for t in g.weights.values())


@dataclass
class ModelPlan:
    """``plan_model``'s answer: where a model's bytes go on each device and what moves per decode token."""

    path: str
    family: str
    dtype: str
    ctx: int
    params: int
    devices: list[DeviceMemory]
    plan: Plan  # the planner's plan of one decode step (tokens=1)
    trained_ctx: int = 0  # the context the model was trained for (config); ctx beyond it runs, degraded
    host: HostMemory | None = None  # the host memory devices share (cpu-sim), when some do
    formats: dict[str, int] = field(default_factory=dict)  # held format -> bytes of the model's weights in it
    cache_types: kvcache.CacheTypes | None = None  # attention's K and V caches as held (None: the compute dtype)

    @property
    def tensor_split(self) -> tuple[float, ...]:
        return self.plan.ratios

    @property
    def weight_bytes(self) -> int:
        """The model's weights as held on the devices (each weight once; 16-bit and quantized as stored)."""
        return sum(self.formats.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.path,
            "family": self.family,
            "dtype": self.dtype,
            "ctx": self.ctx,
            "trained_ctx": self.trained_ctx,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "weight_formats": self.formats,
            **_cache_type_fields(self.cache_types, self.dtype),
            "notes": self.plan.notes,
            "world_size": self.plan.world_size,
            "host": None if self.host is None else self.host.to_dict(),
            "tensor_split": list(self.tensor_split),
            "devices": [d.to_dict() for d in self.devices],
            "per_decode_token": {
                "allreduce": self.plan.count("allreduce"),
                "allgather": self.plan.count("allgather"),
                "bytes": self.plan.comm_bytes,
            },
        }


def plan_model(
    path: str | Path,
    devices: str | Sequence[Device] = "cpu-sim",
    tensor_split: Sequence[float] | None = None,
    dtype: Any = None,
    ctx: int | None = None,
    cache_dtype: Any = None,
) -> ModelPlan:
    """Plan ``path`` (a Hugging Face directory or .gguf file) over ``devices`` split by ``tensor_split``, reading
    only metadata. Arguments as ``tw.load``'s; the KV-cache bytes are those of ``cache_dtype``.

    A device spec whose backend is not available here (``cuda:0,1`` on a machine without GPUs) still plans when
    ``tensor_split`` gives one ratio per device; memory capacities are then unknown.
    """
    devs: list[Device] | None
    if isinstance(devices, str):
        try:
            devs = open_devices(devices)
        except BackendUnavailableError as e:
            if tensor_split is None:
                raise BackendUnavailableError(
                    f"{e}; to plan for it anyway give -ts/tensor_split with one ratio per device"
                ) from None
            devs = None
    else:
        devs = list(devices)
    world = len(devs) if devs is not None else len(tensor_split or ())
    ckpt = open_checkpoint(path)
    try:
        config = runtime_config(ckpt, dtype, ctx)
        types = kvcache.cache_types(cache_dtype, config.dtype)
        kvcache.check_devices(devs or [], types, config.dtype)
        with config_errors(ckpt):
            g = kvcache.apply(ckpt.family.build(config, 1), types)
        check_weights(ckpt, g)
        held, _, notes = weight_formats.prepare(ckpt, g, devs or [], world, dtype)
        p = plan(g, world, tensor_split, held)
        p.notes = notes
        rows = device_memory(p, devs)
        return ModelPlan(
            str(ckpt.path),
            ckpt.family.name,
            config.dtype,
            config.ctx,
            _params(g),
            rows,
            p,
            trained_ctx=ckpt.config.ctx,
            host=host_memory(rows, devs),
            formats=weight_formats.mix(held, g),
            cache_types=types,
        )
    finally:
        ckpt.close()


@dataclass
class TestResult:
    """One llama-bench test: ``pp N`` (prefill of N tokens) or ``tg N`` (N decode steps), per repetition."""

    kind: str  # "pp" | "tg"
    tokens: int
    seconds: list[float] = field(default_factory=list)  # wall time of each repetition
    collective_seconds: list[float] = field(default_factory=list)  # of which inside communicator calls

    @property
    def name(self) -> str:
        return f"{self.kind}{self.tokens}"

    @property
    def tps(self) -> list[float]:
        return [self.tokens / s for s in self.seconds]

    @property
    def tps_mean(self) -> float:
        return float(np.mean(self.tps))

    @property
    def tps_std(self) -> float:
        """Sample standard deviation over the repetitions (0 with one), as llama-bench reports."""
        return float(np.std(self.tps, ddof=1)) if len(self.tps) > 1 else 0.0

    @property
    def collective_share(self) -> float:
        """Fraction of the measured wall time spent inside communicator calls."""
        return sum(self.collective_seconds) / sum(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.name,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tps_mean,
            "tokens_per_second_std": self.tps_std,
            "collective_share": self.collective_share,
        }


@dataclass
class BenchResult:
    """``bench``'s answer: the model, its split, per-device memory, and the pp/tg tests."""

    model: str
    family: str
    dtype: str
    ctx: int
    params: int
    weight_bytes: int
    devices: list[DeviceMemory]
    tensor_split: tuple[float, ...]
    tests: list[TestResult]
    formats: dict[str, int] = field(default_factory=dict)  # held format -> bytes of the model's weights in it
    cache_types: kvcache.CacheTypes | None = None  # attention's K and V caches as held (None: the compute dtype)

    @property
    def weight_format(self) -> str:
        """The format mix in llama-bench's "type" spirit: the formats by share of bytes, "q8_0+f32"."""
        return "+".join(self.formats) or self.dtype

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "family": self.family,
            "dtype": self.dtype,
            "weight_format": self.weight_format,
            "weight_formats": self.formats,
            **_cache_type_fields(self.cache_types, self.dtype),
            "ctx": self.ctx,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "tensor_split": list(self.tensor_split),
            "devices": [d.to_dict() for d in self.devices],
            "tests": [t.to_dict() for t in self.tests],
        }


def bench(model: Model, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3, seed: int = 0) -> BenchResult:
    """Measure ``model``: a ``pp{n_prompt}`` and a ``tg{n_gen}`` test (a count of 0 skips that test), each after
    one warm-up, ``repetitions`` times. Token ids are random with ``seed``; the context must hold
    ``max(n_prompt, n_gen)`` tokens (load the model with ``ctx=`` at least that)."""
    if n_prompt < 0 or n_gen < 0 or repetitions < 1:
        raise ValueError(f"need n_prompt, n_gen >= 0 and repetitions >= 1, got {n_prompt}, {n_gen}, {repetitions}")
    rng = np.random.default_rng(seed)
    tests = [TestResult(k, n) for k, n in (("pp", n_prompt), ("tg", n_gen)) if n > 0]
    timings = model.executor.timings
    for t in tests:
        ids = rng.integers(0, model.vocab, t.tokens)
        # Warm-up: pp traces and places its prompt shapes; one decode step does it for tg.
        _run_test(model, t.kind, ids if t.kind == "pp" else ids[:1])
        for _ in range(repetitions):
            timings.reset()
            seconds = _run_test(model, t.kind, ids)
            t.seconds.append(seconds)
            t.collective_seconds.append(timings.collective_seconds)
    p = model.plan
    devices = model.executor.devices if len(model.executor.devices) == p.world_size else None  # one rank/process
    return BenchResult(
        str(model.checkpoint.path),
        model.family.name,
        model.config.dtype,
        model.config.ctx,
        _params(p.graph),
        sum(model.formats[n].nbytes(t.shape) for n, t in p.graph.weights.items()),
        device_memory(p, devices),
        p.ratios,
        tests,
        weight_formats.mix(model.formats, p.graph),
        model.cache_types,
    )


def _cache_type_fields(types: kvcache.CacheTypes | None, compute: str) -> dict[str, str]:
    """The JSON fields naming the KV cache's dtypes, as llama.cpp's flags do (``cache_type_k``/``_v``)."""
    k, v = (compute, compute) if types is None else types.names
    return {"cache_type_k": k, "cache_type_v": v}


def _run_test(model: Model, kind: str, ids: np.ndarray) -> float:
    """Wall seconds of one repetition in a fresh session: the prompt at once (pp; as generation and llama-bench
    evaluate a prompt, with the logits of its last token only) or one token per step (tg)."""
    sess = model.session()
    t0 = time.perf_counter()
    if kind == "pp":
        sess.eval(ids, last_only=True)
    else:
        for i in range(ids.size):
            sess.eval(ids[i : i + 1])
    return time.perf_counter() - t0

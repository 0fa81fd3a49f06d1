"""The Device and Backend contracts every backend implements, and device-spec parsing.

A *backend* (cpu-sim, cuda, rocm, a third party's) turns a spec such as ``"cpu-sim:4,mem=256MiB"`` into
``Device`` objects. A *device array* is whatever the backend allocates; the core treats it as opaque apart from
``.shape``, ``.dtype`` (a numpy dtype) and ``.nbytes``, and only touches its contents through the Device
methods below. Work runs on a device through ``Device.submit`` so devices progress concurrently; data moves
between devices only through ``copy_from`` (directly when ``peer_access`` is enabled, else staged via host).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import DeviceSpecError

DeviceArray = Any  # backend-specific; exposes .shape, .dtype (numpy dtype) and .nbytes


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes on one device: capacity, live now, and the high-water mark."""

    total: int
    used: int
    peak: int

    @property
    def free(self) -> int:
        return max(self.total - self.used, 0)


@dataclass
class DeviceStats:
    """Counters a device keeps so tests and benchmarks can see what moved and what was allocated."""

    allocations: int = 0  # new device buffers (kernel outputs included)
    allocated_bytes: int = 0
    peer_copies: int = 0  # direct device-to-device copies (peer access enabled)
    peer_bytes: int = 0
    staged_copies: int = 0  # device-to-device copies that went through host memory
    staged_bytes: int = 0
    to_host_bytes: int = 0
    from_host_bytes: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run, as data: dtype names, and op names (None: every op of the reference set)."""

    dtypes: frozenset[str]
    ops: frozenset[str] | None = None
    op_dtypes: frozenset[tuple[str, str]] = frozenset()  # (op, dtype) pairs supported beyond ``dtypes``
    # formats (core.dtypes.FORMATS names) its kernels take weights in, as held (see OpDef.held); a weight stored in
    # another format is converted to the compute dtype once, at load
    weight_formats: frozenset[str] = frozenset({"f32", "f64"})

    def supports(self, op: str, dtype: str) -> bool:
        return (dtype in self.dtypes and (self.ops is None or op in self.ops)) or (op, dtype) in self.op_dtypes


class Device(ABC):
    """One device of a backend. Methods may be called from any thread unless said otherwise."""

    name: str  # unique within its group, e.g. "cpu-sim:2", "cuda:0"
    backend: Backend
    index: int  # position within the group the backend returned
    stats: DeviceStats

    @property
    def xp(self) -> Any:
        """The array namespace kernels use on this device (numpy, cupy, ...)."""
        return self.backend.xp

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Capacity, live and peak bytes."""

    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        """Allocate an uninitialized array; raises OutOfMemoryError naming device, requested and free bytes."""

    @abstractmethod
    def from_host(self, host: np.ndarray, out: DeviceArray | None = None) -> DeviceArray:
        """Copy a host array onto this device (into ``out`` when given: same shape and dtype)."""

    @abstractmethod
    def to_host(self, array: DeviceArray) -> np.ndarray:
        """Copy an array of this device to a new host numpy array (waits for pending work on it)."""

    @abstractmethod
    def owns(self, array: Any) -> bool:
        """True when ``array`` is an array of this device."""

    @abstractmethod
    def peer_access(self, other: Device) -> bool:
        """True when this device *can* read/write ``other``'s memory directly (capability, not state)."""

    @abstractmethod
    def enable_peer_access(self, other: Device) -> None:
        """Turn on direct access to ``other``; raises PlacementError when ``peer_access(other)`` is False."""

    @abstractmethod
    def peer_enabled(self, other: Device) -> bool:
        """True when direct access to ``other`` has been enabled."""

    @abstractmethod
    def copy_from(self, array: DeviceArray, src: Device, out: DeviceArray | None = None) -> DeviceArray:
        """Copy ``array`` (which lives on ``src``) onto this device, into ``out`` when given.

        Direct when peer access to ``src`` is enabled; otherwise staged through host memory. Either way the
        result is the same; only the path (and the stats) differ.
        """

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn`` on this device, after everything submitted before; returns a Future.

        Device arrays among ``args`` (also inside lists/tuples) must live on this device (PlacementError
        otherwise) and reach ``fn`` as native arrays of ``self.xp``. Native arrays that ``fn`` returns (alone or
        in a tuple/list) come back as this device's arrays (views of an existing array count no new allocation); other
        return values pass through as they are. Exceptions surface from ``Future.result()``.
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Block until all work submitted to this device has finished."""

    def __repr__(self) -> str:
        return f"<Device {self.name}>"


class Backend(ABC):
    """A family of devices. Registered as an instance through ``tensorweave_register_backends``."""

    name: str  # the spec prefix: tw.devices("NAME:...")
    xp: Any  # array namespace of its native arrays
    capabilities: Capabilities
    # Faster kernels by op name, same signature as the reference kernel in core.ops (kernel(xp, out, *inputs,
    # **attrs)); ops not listed run the reference kernel on ``xp``.
    kernels: Mapping[str, Callable[..., Any]] = MappingProxyType({})
    default_communicator: str = "local"
    description: str = ""
    # Its devices allocate from this host's memory (cpu-sim), so together they must fit in it, whatever each says.
    shares_host_memory: bool = False

    @abstractmethod
    def available(self) -> bool:
        """Whether this backend can create devices here. Must not raise, even without drivers."""

    @abstractmethod
    def devices(self, spec: DeviceSpec) -> list[Device]:
        """Create the devices a parsed spec names: ``spec.args`` (items after the colon) and ``spec.options``.

        Raise DeviceSpecError for args or options this backend does not understand, naming them.
        """


# --- device specs --------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


MIXED = "+"  # joins the specs of several backends into one group: "cpu-sim:1+array-api-strict:1"


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456; '1.5GB' -> 1500000000; plain numbers are bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise DeviceSpecError(f"cannot read size {text!r}: expected e.g. 512MiB, 2GiB, 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class DeviceSpec:
    """A parsed spec: ``BACKEND[:ARGS][,key=value...]``. ``args`` are the positional items after the colon."""

    backend: str
    args: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> DeviceSpec:
        """'cpu-sim:4,mem=256MiB,peer=0-1,2-3' -> backend cpu-sim, args ['4'], options {mem, peer: '0-1,2-3'}.

        Items without '=' after an option continue that option's value, so comma lists stay readable.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise DeviceSpecError(f"empty device spec {spec!r}; expected e.g. 'cpu-sim:4' or 'cuda:0,1'")
        if MIXED in spec:
            raise DeviceSpecError(
                f"device spec {spec!r} joins several backends; it names a group for tw.devices(), not one backend"
            )
        head, _, rest = spec.strip().partition(":")
        backend, _, first_opts = head.partition(",")
        if not re.fullmatch(r"[A-Za-z][\w.-]*", backend):
            raise DeviceSpecError(f"bad backend name {backend!r} in device spec {spec!r}")
        out = cls(backend=backend)
        last_key: str | None = None
        items = (first_opts.split(",") if first_opts else []) + (rest.split(",") if rest else [])
        for item in (i.strip() for i in items):
            if not item:
                raise DeviceSpecError(f"empty item in device spec {spec!r}")
            key, eq, value = item.partition("=")
            if eq:
                if not key or not value:
                    raise DeviceSpecError(f"bad option {item!r} in device spec {spec!r}")
                out.options[key.strip().lower()] = value.strip()
                last_key = key.strip().lower()
            elif last_key is not None:
                out.options[last_key] += "," + item
            else:
                out.args.append(item)
        return out


def total_host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40

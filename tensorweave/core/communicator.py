"""The Communicator contract: collectives over a group of devices, with capabilities as data.

Every collective takes **one buffer per local rank**, in the order of ``local_ranks``. A single process that
drives all devices (cpu-sim, one-process multi-GPU) passes all of them, like an NCCL group call; a process per
rank (MPI, shared memory, multi-node NCCL) passes one. The same model code runs in both worlds.

The public methods check their arguments here, once, for every communicator (buffer count, placement, shapes,
dtypes, ops) and then call the subclass's ``_allreduce`` / ``_allgather`` / ... implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import CollectiveError, PlacementError, UnsupportedError
from . import dtypes
from .device import Device, DeviceArray

# Reduction ops every communicator may offer -> the array-API function that combines two operands.
REDUCE_OPS: dict[str, str] = {"sum": "add", "max": "maximum", "min": "minimum"}


@dataclass(frozen=True)
class CommunicatorCapabilities:
    """What a communicator can do, as data (listed by ``tensorweave plugins``, checked before every call)."""

    in_process: bool  # one process drives every rank (all buffers passed at once)
    multi_process: bool  # ranks live in separate processes or hosts
    deterministic: bool  # bitwise-identical results run to run
    ops: frozenset[str] = frozenset(REDUCE_OPS)
    dtypes: frozenset[str] = frozenset(dtypes.DTYPES)  # canonical names, see core.dtypes
    # Device backends it accepts; None: any, mixed in one group too (it moves data only through the Device contract).
    # A group mixing backends must have every one of them here.
    backends: frozenset[str] | None = None


def even_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` items over ``parts`` as evenly as possible, the remainder going to the first parts."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


class Communicator(ABC):
    """A group of ranks that run collectives together. Subclasses implement the ``_``-prefixed methods.

    Construction: ``cls(devices, **options)`` with this process's devices. In-process communicators own every
    rank (``world_size == len(devices)``); multi-process ones set ``world_size`` and ``local_ranks`` themselves.
    Collectives run in place where the result has the input's shape (allreduce, broadcast) and return new
    device arrays otherwise (allgather, reduce_scatter).
    """

    name: ClassVar[str]
    capabilities: ClassVar[CommunicatorCapabilities]

    def __init__(self, devices: Sequence[Device], **options: Any) -> None:
        if not devices:
            raise CollectiveError(f"communicator {self.name!r} needs at least one device")
        if options:
            raise CollectiveError(f"communicator {self.name!r} got unknown options: {', '.join(sorted(options))}")
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise CollectiveError(f"communicator {self.name!r}: a device appears twice in {names}")
        allowed = self.capabilities.backends
        group = sorted({d.backend.name for d in devices})
        for d in devices:
            if allowed is not None and d.backend.name not in allowed:
                if len(group) > 1:
                    raise UnsupportedError(
                        f"communicator {self.name!r} cannot span a group that mixes backends {', '.join(group)}: it "
                        f"drives {', '.join(sorted(allowed))} only; the 'peer' communicator spans backends "
                        "(copies between them go through host memory)"
                    )
                raise UnsupportedError(
                    f"communicator {self.name!r} does not drive {d.backend.name!r} devices ({d.name}); "
                    f"it supports: {', '.join(sorted(allowed))}"
                )
        self.devices: list[Device] = list(devices)
        self.world_size: int = len(self.devices)
        self.local_ranks: list[int] = list(range(self.world_size))

    # --- public collectives: argument checks live here, once --------------------------------------------------

    def allreduce(self, buffers: Sequence[DeviceArray], op: str = "sum") -> None:
        """Reduce element-wise over all ranks with ``op`` (sum, max, min); every rank receives the result in place.

        16-bit floats accumulate in float32 and are rounded once.
        """
        self._check(buffers, "allreduce", op=op, same_shape=True)
        self._allreduce(list(buffers), op)

    def allgather(self, buffers: Sequence[DeviceArray], out: Sequence[DeviceArray] | None = None) -> list[DeviceArray]:
        """Concatenate every rank's buffer along axis 0, in rank order; sizes along axis 0 may differ by rank.

        Returns one array per local rank holding the whole concatenation: new arrays, or ``out`` (one buffer per
        local rank, of the concatenated shape) filled in place, so a steady-state caller allocates nothing.
        """
        self._check(buffers, "allgather", same_shape=False)
        if out is not None:
            self._check(out, "allgather(out=)", same_shape=True)
            rows = sum(int(b.shape[0]) for b in buffers)  # in-process: every rank's part is visible here
            want = (rows, *tuple(buffers[0].shape[1:]))
            if self.world_size == len(self.devices) and tuple(out[0].shape) != want:
                raise CollectiveError(f"{self.name}.allgather: out has shape {tuple(out[0].shape)}, expected {want}")
            if np.dtype(out[0].dtype) != np.dtype(buffers[0].dtype):
                raise CollectiveError(f"{self.name}.allgather: out dtype differs from the buffers' dtype")
        return self._allgather(list(buffers), None if out is None else list(out))

    def reduce_scatter(
        self, buffers: Sequence[DeviceArray], sizes: Sequence[int] | None = None, op: str = "sum"
    ) -> list[DeviceArray]:
        """Reduce like allreduce, then give rank r only rows ``[sum(sizes[:r]), sum(sizes[:r+1]))`` of axis 0.

        ``sizes`` defaults to an even split (remainder to the first ranks); zero-size parts are allowed.
        """
        self._check(buffers, "reduce_scatter", op=op, same_shape=True)
        if not buffers[0].shape:
            raise CollectiveError(f"{self.name}.reduce_scatter: buffers must have at least one axis to split")
        rows = buffers[0].shape[0]
        sizes = even_sizes(rows, self.world_size) if sizes is None else [int(s) for s in sizes]
        if len(sizes) != self.world_size or any(s < 0 for s in sizes) or sum(sizes) != rows:
            raise CollectiveError(
                f"{self.name}.reduce_scatter: sizes {sizes} must be {self.world_size} non-negative counts "
                f"summing to the buffers' {rows} rows"
            )
        return self._reduce_scatter(list(buffers), sizes, op)

    def broadcast(self, buffers: Sequence[DeviceArray], root: int = 0) -> None:
        """Copy rank ``root``'s buffer into every other rank's buffer, in place."""
        self._check(buffers, "broadcast", same_shape=True)
        if not 0 <= root < self.world_size:
            raise CollectiveError(f"{self.name}.broadcast: root {root} outside ranks 0..{self.world_size - 1}")
        self._broadcast(list(buffers), root)

    def barrier(self) -> None:
        """Return once every rank has reached the barrier (and, in-process, every device is idle)."""
        self._barrier()

    def close(self) -> None:  # noqa: B027 - optional hook; most communicators hold nothing to release
        """Release resources (scratch buffers, library handles). Idempotent."""

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} world_size={self.world_size} local_ranks={self.local_ranks}>"

    # --- what a communicator implements -------------------------------------------------------------------------

    @abstractmethod
    def _allreduce(self, buffers: list[DeviceArray], op: str) -> None: ...

    @abstractmethod
    def _allgather(self, buffers: list[DeviceArray], out: list[DeviceArray] | None) -> list[DeviceArray]: ...

    @abstractmethod
    def _reduce_scatter(self, buffers: list[DeviceArray], sizes: list[int], op: str) -> list[DeviceArray]: ...

    @abstractmethod
    def _broadcast(self, buffers: list[DeviceArray], root: int) -> None: ...

    @abstractmethod
    def _barrier(self) -> None: ...

    # --- shared argument checks ---------------------------------------------------------------------------------

    def _check(self, buffers: Sequence[DeviceArray], what: str, *, op: str | None = None, same_shape: bool) -> None:
        caps = self.capabilities
        if op is not None and op not in caps.ops:
            raise UnsupportedError(
                f"{self.name}.{what}: unsupported op {op!r}; supported: {', '.join(sorted(caps.ops))}"
            )
        if isinstance(buffers, (str, bytes)) or not isinstance(buffers, Sequence):
            raise CollectiveError(f"{self.name}.{what}: expected a list with one buffer per local rank")
        if len(buffers) != len(self.devices):
            raise CollectiveError(
                f"{self.name}.{what}: got {len(buffers)} buffers for {len(self.devices)} local ranks "
                f"{self.local_ranks}: pass exactly one buffer per local rank"
            )
        first = buffers[0]
        for rank, dev, buf in zip(self.local_ranks, self.devices, buffers, strict=True):
            if not dev.owns(buf):
                raise PlacementError(
                    f"{self.name}.{what}: the buffer for rank {rank} does not live on {dev.name}"
                    + (" (it is a host numpy array)" if isinstance(buf, np.ndarray) else "")
                )
            dt = np.dtype(buf.dtype)
            try:
                dt_name = dtypes.name(dt)
            except UnsupportedError:
                dt_name = dt.name
            if dt_name not in caps.dtypes:
                raise UnsupportedError(
                    f"{self.name}.{what}: unsupported dtype {dt_name}; supported: {', '.join(sorted(caps.dtypes))}"
                )
            if dt != np.dtype(first.dtype):
                raise CollectiveError(
                    f"{self.name}.{what}: rank {rank} has dtype {dt_name} but rank {self.local_ranks[0]} "
                    f"has {np.dtype(first.dtype).name}; all ranks must agree"
                )
            shape, ref = tuple(buf.shape), tuple(first.shape)
            if same_shape and shape != ref:
                raise CollectiveError(
                    f"{self.name}.{what}: rank {rank} has shape {shape} but rank {self.local_ranks[0]} has {ref}; "
                    "all ranks must pass buffers of the same shape"
                )
            if not same_shape and (len(shape) == 0 or shape[1:] != ref[1:]):
                raise CollectiveError(
                    f"{self.name}.{what}: rank {rank} has shape {shape}; buffers must have at least one axis "
                    f"and agree on all axes but the first (rank {self.local_ranks[0]}: {ref})"
                )

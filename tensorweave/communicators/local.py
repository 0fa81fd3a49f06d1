"""local: collectives for devices of one process, staged through host memory. The reference communicator.

Reductions run in a fixed order (rank 0, 1, ..., n-1) in the accumulator dtype (float32 for 16-bit floats) and
round once, so results are bitwise reproducible run to run and a bfloat16 sum is the float32 sum rounded once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core import dtypes
from ..core.communicator import REDUCE_OPS, Communicator, CommunicatorCapabilities
from ..core.device import DeviceArray
from ..core.hookspecs import hookimpl


def reduce_in_order(parts: list[np.ndarray], op: str) -> np.ndarray:
    """Reduce host arrays element-wise in list order, accumulating in the accumulator dtype; round once."""
    dtype = parts[0].dtype
    combine = getattr(np, REDUCE_OPS[op])
    acc = parts[0].astype(dtypes.accumulator(dtype), copy=True)
    for p in parts[1:]:
        combine(acc, p.astype(acc.dtype, copy=False), out=acc)
    return acc.astype(dtype, copy=False)


class LocalCommunicator(Communicator):
    name = "local"
    capabilities = CommunicatorCapabilities(in_process=True, multi_process=False, deterministic=True)

    def _gather_host(self, buffers: list[DeviceArray]) -> list[np.ndarray]:
        return [d.to_host(b) for d, b in zip(self.devices, buffers, strict=True)]

    def _allreduce(self, buffers: list[DeviceArray], op: str) -> None:
        result = reduce_in_order(self._gather_host(buffers), op)
        for d, b in zip(self.devices, buffers, strict=True):
            d.from_host(result, out=b)

    def _allgather(self, buffers: list[DeviceArray], out: list[DeviceArray] | None) -> list[DeviceArray]:
        whole = np.concatenate(self._gather_host(buffers), axis=0)
        if out is None:
            return [d.from_host(whole) for d in self.devices]
        return [d.from_host(whole, out=o) for d, o in zip(self.devices, out, strict=True)]

    def _reduce_scatter(self, buffers: list[DeviceArray], sizes: list[int], op: str) -> list[DeviceArray]:
        result = reduce_in_order(self._gather_host(buffers), op)
        starts = np.cumsum([0, *sizes])
        return [d.from_host(result[starts[r] : starts[r + 1]]) for r, d in enumerate(self.devices)]

    def _broadcast(self, buffers: list[DeviceArray], root: int) -> None:
        data = self.devices[root].to_host(buffers[root])
        for r, (d, b) in enumerate(zip(self.devices, buffers, strict=True)):
            if r != root:
                d.from_host(data, out=b)

    def _barrier(self) -> None:
        for d in self.devices:
            d.synchronize()


@hookimpl
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    register(LocalCommunicator)

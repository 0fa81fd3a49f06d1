"""peer: vendor-agnostic collectives built only from ``Device.peer_access``/``copy_from`` and device kernels.

Works for any backend (and for groups that mix backends: copies then go through host memory). Allreduce is
recursive doubling with the ranks beyond the largest power of two *folded in* first and sent the result last,
so every world size is exact — llama.cpp's first generic fallback skipped those ranks and lost a device's
contribution with 3 devices. Partial sums travel in the accumulator dtype (float32 for 16-bit floats) and are
rounded once at the end. The schedule is fixed, so results are bitwise reproducible; scratch buffers are cached
per shape and reused across calls.

Option ``peer_access``: ``"auto"`` (default) enables direct access for every pair that reports the capability;
``"on"`` requires it for every pair; ``"off"`` stages every copy through host memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.communicator import REDUCE_OPS, Communicator, CommunicatorCapabilities
from ..core.device import Device, DeviceArray
from ..core.hookspecs import hookimpl
from ..errors import CollectiveError, PlacementError

SCRATCH_SHAPES = 4  # (shape, dtype) combinations whose scratch buffers stay cached; older ones are dropped


def _wait(futures: Sequence[Future[Any]]) -> list[Any]:
    return [f.result() for f in futures]


class PeerCommunicator(Communicator):
    name = "peer"
    capabilities = CommunicatorCapabilities(in_process=True, multi_process=False, deterministic=True)

    def __init__(self, devices: Sequence[Device], peer_access: str = "auto", **options: Any) -> None:
        super().__init__(devices, **options)
        if peer_access not in ("auto", "on", "off"):
            raise CollectiveError(f"peer communicator: peer_access must be auto, on or off, not {peer_access!r}")
        self.peer_access = peer_access
        for a in self.devices:
            for b in self.devices:
                if a is b:
                    continue
                if a.peer_access(b):
                    if peer_access != "off" and not a.peer_enabled(b):
                        a.enable_peer_access(b)
                elif peer_access == "on":
                    raise PlacementError(f"peer_access='on' but {a.name} has no peer access to {b.name}")
        self._scratch: OrderedDict[tuple[Any, ...], DeviceArray] = OrderedDict()

    def close(self) -> None:
        self._scratch.clear()

    def _buffer(self, rank: int, tag: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> DeviceArray:
        key = (rank, tag, shape, dtype)
        buf = self._scratch.pop(key, None)
        if buf is None:
            buf = self.devices[rank].empty(shape, dtype)
        self._scratch[key] = buf
        # per rank: 2 for an allreduce (acc, recv) + one receive buffer per peer for an allgather
        while len(self._scratch) > SCRATCH_SHAPES * (2 + self.world_size) * self.world_size:
            self._scratch.popitem(last=False)
        return buf

    def _combine_kernel(self, rank: int, op: str) -> Callable[[Any, Any], None]:
        fn = getattr(self.devices[rank].xp, REDUCE_OPS[op])

        def combine(acc: Any, other: Any) -> None:
            if hasattr(fn, "nin"):  # a numpy/cupy ufunc: reduce in place, no temporary
                fn(acc, other, out=acc)
            else:  # plain array-API namespaces have no out=
                acc[...] = fn(acc, other)

        return combine

    def _allreduce(self, buffers: list[DeviceArray], op: str) -> None:
        n, devs = self.world_size, self.devices
        shape, dtype = tuple(buffers[0].shape), np.dtype(buffers[0].dtype)
        if n == 1 or 0 in shape:
            return
        acc_dtype = dtypes.accumulator(dtype)
        if acc_dtype == dtype:
            acc = list(buffers)
        else:
            acc = [self._buffer(r, "acc", shape, acc_dtype) for r in range(n)]
            _wait([d.submit(_assign, a, b) for d, a, b in zip(devs, acc, buffers, strict=True)])
        recv = [self._buffer(r, "recv", shape, acc_dtype) for r in range(n)]
        combine = [self._combine_kernel(r, op) for r in range(n)]

        def exchange(pairs: list[tuple[int, int]]) -> None:
            """For each (dst, src): dst receives src's partial value, then all dst combine concurrently."""
            for dst, src in pairs:  # every copy lands before any combine overwrites a partial value
                devs[dst].copy_from(acc[src], devs[src], out=recv[dst])
            _wait([devs[dst].submit(combine[dst], acc[dst], recv[dst]) for dst, _ in pairs])

        p = 1 << (n.bit_length() - 1)  # largest power of two <= n
        exchange([(r - p, r) for r in range(p, n)])  # fold the extra ranks into the first n - p
        step = 1
        while step < p:
            exchange([(r, r ^ step) for r in range(p)])
            step <<= 1
        for r in range(p, n):  # hand the result back to the folded ranks
            devs[r].copy_from(acc[r - p], devs[r - p], out=acc[r])
        if acc is not buffers:
            _wait([d.submit(_assign, b, a) for d, a, b in zip(devs, acc, buffers, strict=True)])

    def _allgather(self, buffers: list[DeviceArray], out: list[DeviceArray] | None) -> list[DeviceArray]:
        dtype = np.dtype(buffers[0].dtype)
        done = []
        for r, dst in enumerate(self.devices):
            parts = [
                b if s == r else dst.copy_from(b, src, out=self._buffer(r, f"gather{s}", tuple(b.shape), dtype))
                for s, (src, b) in enumerate(zip(self.devices, buffers, strict=True))
            ]
            done.append(dst.submit(_concat(dst.xp), parts) if out is None else dst.submit(_concat_into, out[r], parts))
        results = _wait(done)
        return results if out is None else out

    def _reduce_scatter(self, buffers: list[DeviceArray], sizes: list[int], op: str) -> list[DeviceArray]:
        starts = np.cumsum([0, *sizes]).tolist()
        dtype = np.dtype(buffers[0].dtype)
        out = []
        for r, dst in enumerate(self.devices):
            a, b = starts[r], starts[r + 1]
            chunks = _wait([src.submit(_rows, buf, a, b) for src, buf in zip(self.devices, buffers, strict=True)])
            parts = [c if s == r else dst.copy_from(c, self.devices[s]) for s, c in enumerate(chunks)]
            out.append(dst.submit(_reduce_parts(dst.xp, op, dtype), parts))
        return _wait(out)

    def _broadcast(self, buffers: list[DeviceArray], root: int) -> None:
        src = self.devices[root]
        for r, dst in enumerate(self.devices):
            if r != root:
                dst.copy_from(buffers[root], src, out=buffers[r])

    def _barrier(self) -> None:
        for d in self.devices:
            d.synchronize()


# --- device kernels (array-API code; run on the device through Device.submit) ---------------------------------
# Strict array-API namespaces (array_api_strict) want every axis in an index (hence the trailing ``...``) and take
# only their own dtype objects (hence the arrays' own ``.dtype`` where no widening is needed).


def _assign(dst: Any, src: Any) -> None:
    dst[...] = src  # casts to dst's dtype, rounding once


def _rows(x: Any, a: int, b: int) -> Any:
    return x[a:b, ...]


def _concat(xp: Any) -> Callable[[list[Any]], Any]:
    return lambda parts: xp.concat(parts, axis=0)


def _concat_into(out: Any, parts: list[Any]) -> None:
    start = 0
    for p in parts:
        out[start : start + p.shape[0], ...] = p
        start += p.shape[0]


def _reduce_parts(xp: Any, op: str, dtype: np.dtype[Any]) -> Callable[[list[Any]], Any]:
    fn = getattr(xp, REDUCE_OPS[op])
    acc_dtype = dtypes.accumulator(dtype)

    def reduce(parts: list[Any]) -> Any:
        native = parts[0].dtype
        wide = native if acc_dtype == dtype else acc_dtype
        acc = xp.astype(parts[0], wide, copy=True)
        for p in parts[1:]:
            acc = fn(acc, p if wide is native else xp.astype(p, wide))
        return acc if wide is native else xp.astype(acc, native)

    return reduce


@hookimpl
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    register(PeerCommunicator)

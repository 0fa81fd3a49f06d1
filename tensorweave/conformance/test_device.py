"""Conformance, device contract: memory accounting, bit-exact host round trips, copy_from as peer_access says,
submit, and clear errors (PlacementError, OutOfMemoryError) for misuse."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..core import dtypes
from ..core.device import Device
from ..core.plugins import open_devices
from ..errors import OutOfMemoryError, PlacementError, UnsupportedError
from . import open_group
from .plugin import Kit

DTYPES = list(dtypes.DTYPES)
PAIRS_UP_TO = 4  # copies are checked between every ordered pair of the first devices


def fresh_group(kit: Kit) -> list[Device]:
    """A group of its own: these tests enable peer access, which must not leak into the other sections."""
    return open_group(kit.backend.name, kit.world_size, kit.devices_spec)


def two_devices(kit: Kit) -> tuple[Device, Device]:
    group = fresh_group(kit)
    return group[0], group[1] if len(group) > 1 else fresh_group(kit)[0]  # a second group's device is another


def test_memory_accounting(kit: Kit) -> None:
    dev = fresh_group(kit)[0]
    gc.collect()
    start = dev.memory_info()
    assert start.total > 0 and 0 <= start.used <= start.peak, f"memory_info() {start} is not total > 0, used <= peak"
    n = 1 << 18
    a = dev.empty((n,), "float32")
    mid = dev.memory_info()
    assert mid.used - start.used >= a.nbytes == 4 * n, f"empty of {4 * n} bytes raised used by {mid.used - start.used}"
    b = dev.from_host(np.ones(n, np.float32))
    end = dev.memory_info()
    assert end.used - mid.used >= 4 * n, f"from_host of {4 * n} bytes raised used by {end.used - mid.used}"
    assert end.peak >= end.used and end.free <= start.free - 8 * n
    del a, b
    gc.collect()
    dev.synchronize()
    freed = dev.memory_info()
    assert freed.used <= start.used, f"used is {freed.used} after freeing everything, {start.used} before"


def edge_values(dt: np.dtype[Any]) -> np.ndarray:
    """Every bit pattern of a 16-bit float; for wider types the edges: +-0, +-inf, NaNs with quiet and signalling
    payloads of either sign, subnormals, the largest finite (integers: 0, +-1, the extremes)."""
    if dt.itemsize == 2:
        return np.arange(1 << 16, dtype=np.uint16).view(dt)
    if not dtypes.is_float(dt):
        info = np.iinfo(dt)
        return np.array([0, 1, -1, info.min, info.max], dt)
    bits, mant = dt.itemsize * 8, int(dtypes.finfo(dt).nmant)
    uint = np.dtype(f"u{dt.itemsize}")
    exp_ones = ((1 << (bits - 1)) - 1) ^ ((1 << mant) - 1)
    payloads = [0, 1, 1 << (mant - 1), (1 << mant) - 1, 0x12345]  # inf, signalling and quiet NaNs
    positive = [exp_ones | p for p in payloads] + [0, 1, (1 << mant) - 1, exp_ones - 1]
    return np.array(positive + [p | (1 << (bits - 1)) for p in positive], uint).view(dt)


def round_trip(dev: Device, host: np.ndarray, out: Any = None) -> None:
    back = dev.to_host(dev.from_host(host, out=out))
    want = np.ascontiguousarray(host)
    assert back.dtype == host.dtype and back.shape == host.shape, (
        f"{host.dtype} {host.shape} came back {back.dtype} {back.shape}"
    )
    assert back.tobytes() == want.tobytes(), f"{int((back.view(np.uint8) != want.view(np.uint8)).sum())} bytes changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=[f"dtype={d}" for d in DTYPES])
def test_round_trip(kit: Kit, dtype: str) -> None:
    dev, dt = kit.group()[0], dtypes.to_dtype(dtype)
    try:
        first = dev.from_host(edge_values(dt))
    except UnsupportedError as e:
        kit.not_supported(f"backend {kit.backend.name} does not store {dtype} ({e})")
    edges = edge_values(dt)
    assert dev.to_host(first).tobytes() == edges.tobytes(), f"{dtype} edge values changed on the way"

    @kit.settings()
    @given(
        shape=st.lists(st.integers(0, 9), max_size=3).map(tuple),
        seed=st.integers(0, 2**32 - 1),
        strided=st.booleans(),
        into_out=st.booleans(),
    )
    def check(shape: tuple[int, ...], seed: int, strided: bool, into_out: bool) -> None:
        rng = np.random.default_rng(seed)
        whole = (2 * shape[0], *shape[1:]) if strided and shape else shape
        host = rng.integers(0, 256, int(np.prod(whole)) * dt.itemsize, dtype=np.uint8).view(dt).reshape(whole)
        host = host[::2] if strided and shape else host  # a non-contiguous host array
        round_trip(dev, host, dev.empty(host.shape, dt) if into_out else None)

    check()


def check_copy(dst: Device, src: Device, array: Any, host: np.ndarray) -> None:
    """``dst.copy_from(array, src)`` gives the same bytes and counts one peer copy exactly when peer access is on."""
    enabled = dst.peer_enabled(src)
    before = (dst.stats.peer_copies, dst.stats.peer_bytes, dst.stats.staged_copies, dst.stats.staged_bytes)
    out = dst.copy_from(array, src)
    assert dst.owns(out), f"{dst.name}.copy_from returned an array {dst.name} does not own"
    assert dst.to_host(out).tobytes() == host.tobytes(), f"{src.name} -> {dst.name}: copy changed the data"
    after = (dst.stats.peer_copies, dst.stats.peer_bytes, dst.stats.staged_copies, dst.stats.staged_bytes)
    n = host.nbytes
    want = (before[0] + 1, before[1] + n, *before[2:]) if enabled else (*before[:2], before[2] + 1, before[3] + n)
    assert after == want, (
        f"{src.name} -> {dst.name} with peer access {'enabled' if enabled else 'off'}: stats (peer copies, peer "
        f"bytes, staged copies, staged bytes) went {before} -> {after}, expected {want}"
    )


def test_copy_from_follows_peer_access(kit: Kit) -> None:
    devs = fresh_group(kit)[:PAIRS_UP_TO]
    if len(devs) < 2:
        kit.not_supported("peer checks need 2 devices")
    host = np.arange(1000, dtype=np.float32)
    arrays = [d.from_host(host) for d in devs]
    for dst in devs:
        for src, array in zip(devs, arrays, strict=True):
            if src is dst:
                continue
            check_copy(dst, src, array, host)
            if dst.peer_access(src):
                if not dst.peer_enabled(src):
                    dst.enable_peer_access(src)
                assert dst.peer_enabled(src), f"{dst.name}.enable_peer_access({src.name}) left it disabled"
            else:
                with pytest.raises(PlacementError):
                    dst.enable_peer_access(src)
                assert not dst.peer_enabled(src), f"{dst.name} has peer access to {src.name} enabled without capability"
            check_copy(dst, src, array, host)


def test_copy_across_backends(kit: Kit) -> None:
    """To and from a cpu-sim device (another group): through host memory, so counted as staged."""
    dev, (sim,) = kit.group()[0], open_devices("cpu-sim:1")
    host = np.linspace(-3, 3, 777, dtype=np.float32)
    check_copy(dev, sim, sim.from_host(host), host)
    check_copy(sim, dev, dev.from_host(host), host)


def test_submit_returns_device_arrays(kit: Kit) -> None:
    dev = kit.group()[0]
    a = dev.from_host(np.arange(6, dtype=np.float32))
    doubled = dev.submit(lambda x: x * 2, a).result()
    assert dev.owns(doubled), "an array a submitted function returns must come back as the device's"
    assert dev.to_host(doubled).tolist() == [0, 2, 4, 6, 8, 10]
    with pytest.raises(ZeroDivisionError):  # errors surface from Future.result()
        dev.submit(lambda: 1 / 0).result()


MISUSES: dict[str, Callable[[Device, Device, Any], Any]] = {
    "to_host": lambda d0, d1, a0: d1.to_host(a0),
    "submit": lambda d0, d1, a0: d1.submit(lambda x: x, a0).result(),
    "copy_from": lambda d0, d1, a0: d0.copy_from(a0, d1),  # a0 does not live on the named source
    "from_host_out": lambda d0, d1, a0: d1.from_host(np.zeros(4, np.float32), out=a0),
    "host_array": lambda d0, d1, a0: d0.to_host(np.zeros(4, np.float32)),
}


@pytest.mark.parametrize("misuse", list(MISUSES))
def test_wrong_device(kit: Kit, misuse: str) -> None:
    d0, d1 = two_devices(kit)
    a0 = d0.from_host(np.arange(4, dtype=np.float32))
    with pytest.raises(PlacementError) as info:
        MISUSES[misuse](d0, d1, a0)
    assert d0.name in str(info.value) or d1.name in str(info.value), f"the message names no device: {info.value}"


def test_out_of_memory(kit: Kit) -> None:
    dev = kit.group()[0]
    n = dev.memory_info().total // 2 + 1  # float32: twice the capacity
    with pytest.raises(OutOfMemoryError) as info:
        dev.empty((n,), "float32")
    assert dev.name in str(info.value), f"the message does not name {dev.name}: {info.value}"

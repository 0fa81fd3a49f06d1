"""cpu-sim devices: spec parsing, memory accounting, strict placement, peer topology and concurrency."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.core import dtypes
from tensorweave.core.device import DeviceSpec, parse_size
from tensorweave.errors import (
    DeviceSpecError,
    OutOfMemoryError,
    PlacementError,
    PluginError,
    ShapeError,
    TensorweaveError,
    UnsupportedError,
)


def test_spec_grammar() -> None:
    s = DeviceSpec.parse("cpu-sim:4,mem=256MiB,peer=0-1,2-3")
    assert (s.backend, s.args, s.options) == ("cpu-sim", ["4"], {"mem": "256MiB", "peer": "0-1,2-3"})
    assert DeviceSpec.parse("cuda:0,1").args == ["0", "1"]
    assert DeviceSpec.parse("rocm").args == []
    assert DeviceSpec.parse("cpu-sim,mem=1GiB").options == {"mem": "1GiB"}


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256MiB", 256 << 20),
        ("1.5GiB", 3 << 29),
        ("2GB", 2_000_000_000),
        ("4096", 4096),
        ("1k", 1000),
        ("8 KiB", 8192),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_devices_have_names_and_count() -> None:
    assert [d.name for d in tw.devices("cpu-sim:3")] == ["cpu-sim:0", "cpu-sim:1", "cpu-sim:2"]
    assert len(tw.devices("cpu-sim")) == 1


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("cpu-sim:0", DeviceSpecError, "device count must be between 1 and 256, got 0"),
        ("cpu-sim:-2", DeviceSpecError, "between 1 and 256, got -2"),
        ("cpu-sim:four", DeviceSpecError, "'four' is not an integer"),
        ("cpu-sim:2,3", DeviceSpecError, "takes one device count"),
        ("cpu-sim:2,bogus=1", DeviceSpecError, "unknown option.*bogus"),
        ("cpu-sim:2,mem=lots", DeviceSpecError, "cannot read size 'lots'"),
        ("cpu-sim:2,peer=0-5", DeviceSpecError, "pair of distinct device indices 0..1"),
        ("cpu-sim:2,peer=1-1", DeviceSpecError, "distinct"),
        ("cpu-sim:2,peer=star", DeviceSpecError, "'star'"),
        ("cpu-sim:2,,mem=1", DeviceSpecError, "empty item"),
        ("", DeviceSpecError, "empty device spec"),
        (":4", DeviceSpecError, "bad backend name"),
        ("nosuch:2", PluginError, "unknown backend 'nosuch'; registered: .*cpu-sim"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        tw.devices(spec)
    assert isinstance(info.value, TensorweaveError)


def test_memory_accounting_live_and_peak() -> None:
    (dev,) = tw.devices("cpu-sim:1,mem=1MiB")
    assert dev.memory_info().total == 1 << 20
    a = dev.empty((256, 256), "float32")  # 256 KiB
    b = dev.from_host(np.ones(65536, np.float32))  # 256 KiB
    assert dev.memory_info().used == 512 << 10
    view = dev.submit(lambda x: x[10:20], b).result()  # a view shares its buffer: no new bytes
    assert dev.owns(view) and dev.memory_info().used == 512 << 10
    out = dev.submit(lambda x: x * 2, b).result()  # a kernel output is a new allocation
    assert dev.memory_info().used == 768 << 10
    del a, b, view, out
    info = dev.memory_info()
    assert info.used == 0 and info.peak == 768 << 10 and info.free == 1 << 20


def test_out_of_memory_names_device_requested_and_free() -> None:
    devs = tw.devices("cpu-sim:2,mem=1MiB")
    keep = devs[1].empty((200_000,), "float32")  # 800000 bytes
    with pytest.raises(OutOfMemoryError) as info:
        devs[1].empty((100_000,), "float32")
    e = info.value
    assert (e.device, e.requested, e.free) == ("cpu-sim:1", 400_000, (1 << 20) - 800_000)
    assert (
        str(e) == "cpu-sim:1: out of memory: requested 390.6 KiB (400000 bytes) but only 242.8 KiB (248576 bytes) free"
    )
    with pytest.raises(OutOfMemoryError, match="cpu-sim:1"):
        devs[1].submit(lambda: np.zeros(100_000, np.float32)).result()  # kernel outputs count too
    assert devs[1].memory_info().used == 800_000 and keep.nbytes == 800_000
    devs[0].empty((200_000,), "float32")  # the other device has its own capacity


def test_round_trips_are_bit_exact_for_every_dtype() -> None:
    (dev,) = tw.devices("cpu-sim:1")
    rng = np.random.default_rng(0)
    for name, dt in dtypes.DTYPES.items():
        host = (rng.standard_normal((7, 5)) * 100).astype(dt)
        back = dev.to_host(dev.from_host(host))
        assert back.dtype == dt and back.tobytes() == host.tobytes(), name


def test_unsupported_dtype_is_refused() -> None:
    (dev,) = tw.devices("cpu-sim:1")
    with pytest.raises(UnsupportedError, match="unsupported dtype int8"):
        dev.from_host(np.zeros(3, np.int8))
    with pytest.raises(UnsupportedError, match="unsupported dtype 'float8'"):
        dev.empty((3,), "float8")
    with pytest.raises(ShapeError, match="negative dimension"):
        dev.empty((-1,), "float32")


def test_strict_placement() -> None:
    d0, d1 = tw.devices("cpu-sim:2")
    a = d0.from_host(np.arange(4, dtype=np.float32))
    with pytest.raises(PlacementError, match=r"read on the host directly; use cpu-sim:0\.to_host"):
        np.asarray(a)
    with pytest.raises(PlacementError, match=r"lives on cpu-sim:0; copy it first with cpu-sim:1.copy_from"):
        d1.submit(lambda x: x + 1, a)
    with pytest.raises(PlacementError, match="lives on cpu-sim:0"):
        d1.to_host(a)
    with pytest.raises(PlacementError, match="host numpy array"):
        d0.submit(lambda x: x, np.ones(3))
    with pytest.raises(PlacementError, match="not on cpu-sim:1"):
        d0.copy_from(a, d1)
    with pytest.raises(PlacementError, match="use copy_from"):
        d1.from_host(a)
    with pytest.raises(ShapeError, match="out has shape"):
        d0.from_host(np.zeros(5, np.float32), out=a)
    b = d1.copy_from(a, d0)
    assert d1.owns(b) and not d0.owns(b)
    np.testing.assert_array_equal(d1.to_host(b), np.arange(4, dtype=np.float32))
    (other_group,) = tw.devices("cpu-sim:1")  # same name, different device: still caught
    with pytest.raises(PlacementError):
        other_group.to_host(a)


@pytest.mark.parametrize(
    ("topology", "pairs"),
    [
        ("all", {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}),
        ("none", set()),
        ("ring", {(0, 1), (1, 2), (2, 3), (0, 3)}),
        ("0-1,2-3", {(0, 1), (2, 3)}),
    ],
)
def test_peer_topology(topology: str, pairs: set[tuple[int, int]]) -> None:
    devs = tw.devices(f"cpu-sim:4,peer={topology}")
    found = {(i, j) for i in range(4) for j in range(i + 1, 4) if devs[i].peer_access(devs[j])}
    assert found == pairs
    assert all(devs[i].peer_access(devs[j]) == devs[j].peer_access(devs[i]) for i in range(4) for j in range(4))


def test_copies_without_peer_access_are_staged_and_counted() -> None:
    d0, d1, d2 = tw.devices("cpu-sim:3,peer=0-1")
    a = d0.from_host(np.ones(1000, np.float32))
    d1.copy_from(a, d0)  # capable but not enabled yet: staged
    assert (d1.stats.peer_copies, d1.stats.staged_copies, d1.stats.staged_bytes) == (0, 1, 4000)
    d1.enable_peer_access(d0)
    assert d1.peer_enabled(d0) and not d0.peer_enabled(d1)
    d1.copy_from(a, d0)
    assert (d1.stats.peer_copies, d1.stats.peer_bytes) == (1, 4000)
    with pytest.raises(PlacementError, match="cpu-sim:2 has no peer access to cpu-sim:0"):
        d2.enable_peer_access(d0)
    d2.copy_from(a, d0)  # still works, through host
    assert d2.stats.staged_copies == 1


def test_devices_run_concurrently() -> None:
    """Each device's work blocks until all four are inside it at once: only possible with a worker each."""
    devs = tw.devices("cpu-sim:4")
    meet = threading.Barrier(4, timeout=30)

    def work() -> int:
        meet.wait()
        return threading.get_ident()

    idents = [f.result(timeout=60) for f in [d.submit(work) for d in devs]]
    assert len(set(idents)) == 4


def test_submit_orders_work_and_surfaces_errors() -> None:
    (dev,) = tw.devices("cpu-sim:1")
    buf = dev.from_host(np.zeros(3, np.float32))
    for i in range(5):
        dev.submit(lambda x, i=i: x.__setitem__(slice(None), x * 10 + i), buf)
    np.testing.assert_array_equal(dev.to_host(buf), np.full(3, 1234, np.float32))  # to_host waits, in order
    fut = dev.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.result()
    inner = dev.submit(lambda: dev.submit(lambda: 41).result() + 1)  # nested submit does not deadlock
    assert inner.result(timeout=30) == 42


def test_cpu_sim_limits_blas_threads_per_device_group() -> None:
    """Kernels run on each device's worker thread, so that is where the group's BLAS thread count must hold
    (OpenBLAS keeps the count per thread in recent versions, process-wide in older ones)."""
    from threadpoolctl import ThreadpoolController

    (blas,) = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"][:1]

    def blas_threads_in_work(spec: str) -> int:
        return int(tw.devices(spec)[0].submit(lambda: blas.num_threads).result())

    cores = len(os.sched_getaffinity(0))
    assert blas_threads_in_work("cpu-sim:2,threads=1") == 1
    assert blas_threads_in_work(f"cpu-sim:{2 * cores}") == 1
    with pytest.raises(DeviceSpecError, match="threads must be a count"):
        tw.devices("cpu-sim:2,threads=many")

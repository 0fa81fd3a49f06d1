"""GPU backends (cuda, rocm on CuPy) and NCCL on real GPUs, marked `gpu`: they skip cleanly without one.

Without a GPU the rest still runs: the backends register, report unavailable without raising, and the ROCm
architecture table reads gcnArchName strings."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.backends.rocm import ARCHITECTURES, arch_of
from tensorweave.core import dtypes
from tensorweave.core.plugins import registry
from tensorweave.errors import BackendUnavailableError, CollectiveError, DeviceSpecError, PlacementError

CUDA = registry().backend("cuda").available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU (and CuPy) on this machine")
DTYPES = ["float32", "float16", "bfloat16", "float64", "int32"]


def test_backends_register_and_report_unavailable_without_a_gpu() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tensorweave.cli", "devices", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    listed = {b["name"]: b for b in json.loads(proc.stdout)["backends"]}
    assert listed["cuda"]["default_communicator"] == "nccl" and listed["rocm"]["default_communicator"] == "rccl"
    if not CUDA:
        assert listed["cuda"]["available"] is False
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
            tw.devices("cuda:0")


def test_rocm_architecture_table() -> None:
    assert arch_of(b"gfx942:sramecc+:xnack-") == ("gfx942", ARCHITECTURES["gfx942"])
    assert "MI300X" in ARCHITECTURES["gfx942"].products and "MI355X" in ARCHITECTURES["gfx950"].products
    assert ARCHITECTURES["gfx950"].family == "CDNA4" and ARCHITECTURES["gfx1100"].wavefront == 32
    assert arch_of("gfx9999") == ("gfx9999", None)


@pytest.mark.parametrize(
    ("src", "dst"),
    [(s, "bfloat16") for s in ("float32", "float16", "float64")]
    + [("bfloat16", d) for d in ("float32", "float16", "float64")],
)
def test_gpu_cast_kernel_on_bfloat16_bits_rounds_like_the_reference(src: str, dst: str) -> None:
    """The GPU backend's cast holds bfloat16 as uint16 bits; run on numpy it must equal the reference cast bit for
    bit (ties, NaN, inf, values past float32's range and subnormals included)."""
    from tensorweave.backends.gpu import _cast
    from tensorweave.core.ops import OPS

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(4096) * 10.0 ** rng.integers(-40, 40, 4096),
            [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e300, -1e-300, 1 + 2.0**-8, 1 + 3 * 2.0**-9],
        ]
    )
    with np.errstate(over="ignore", invalid="ignore"):  # past float16's range: inf, on both sides
        host = x.astype(dtypes.to_dtype(src)) if src != "float64" else x
        want = np.empty(host.shape, dtypes.to_dtype(dst))
        OPS["cast"].kernel(np, want, host, dtype=dst)
        got = np.empty(host.shape, np.uint16 if dst == "bfloat16" else want.dtype)
        _cast(np, got, host.view(np.uint16) if src == "bfloat16" else host, dtype=dst)
    np.testing.assert_array_equal(got.view(want.dtype) if dst == "bfloat16" else got, want)


# --- on a GPU ---------------------------------------------------------------------------------------------------


def host_data(dtype: str, shape: tuple[int, ...] = (257, 3)) -> np.ndarray:
    rng = np.random.default_rng(len(dtype))
    dt = dtypes.to_dtype(dtype)
    return rng.integers(-100, 100, shape).astype(dt) if dt == dtypes.int32 else rng.standard_normal(shape).astype(dt)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_device_round_trips_like_cpu_sim(dtype: str) -> None:
    (dev,) = tw.devices("cuda:0")
    (ref,) = tw.devices("cpu-sim:1")
    host = host_data(dtype)
    a, b = dev.from_host(host), ref.from_host(host)
    assert a.shape == b.shape and a.dtype == b.dtype and a.nbytes == b.nbytes
    assert dev.to_host(a).tobytes() == ref.to_host(b).tobytes() == host.tobytes()
    out = dev.empty(host.shape, host.dtype)
    assert dev.from_host(host, out=out) is out and dev.to_host(out).tobytes() == host.tobytes()
    assert dev.owns(a) and not ref.owns(a) and dev.memory_info().used >= a.nbytes
    with pytest.raises(PlacementError):
        np.asarray(a)


@gpu
@needs_cuda
def test_cuda_submit_runs_cupy_kernels_on_the_device_stream() -> None:
    (dev,) = tw.devices("cuda:0")
    (ref,) = tw.devices("cpu-sim:1")
    host = host_data("float32")

    def kernel(x: Any) -> Any:
        xp = dev.xp if not isinstance(x, np.ndarray) else np
        return xp.tanh(x) * 2 + xp.sum(x, axis=0)

    got = dev.to_host(dev.submit(kernel, dev.from_host(host)).result())
    want = ref.to_host(ref.submit(kernel, ref.from_host(host)).result())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(PlacementError):
        dev.submit(kernel, ref.from_host(host))


@gpu
@needs_cuda
def test_logical_devices_on_one_gpu_with_the_peer_communicator() -> None:
    devs = tw.devices("cuda:0,0,0")
    assert [d.name for d in devs] == ["cuda:0", "cuda:0/1", "cuda:0/2"]
    ref = tw.devices("cpu-sim:3")
    hosts = [host_data("float32", (4099,)) * (r + 1) for r in range(3)]
    bufs = [d.from_host(h) for d, h in zip(devs, hosts, strict=True)]
    rbufs = [d.from_host(h) for d, h in zip(ref, hosts, strict=True)]
    tw.communicator(devs, "peer").allreduce(bufs)
    tw.communicator(ref, "local").allreduce(rbufs)
    for d, b in zip(devs, bufs, strict=True):
        np.testing.assert_allclose(d.to_host(b), ref[0].to_host(rbufs[0]), rtol=1e-6, atol=1e-6)
    assert sum(d.stats.peer_copies for d in devs) > 0 and sum(d.stats.staged_copies for d in devs) == 0
    gathered = tw.communicator(devs, "peer").allgather(bufs)
    assert devs[2].to_host(gathered[2]).shape == (3 * 4099,)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nccl_world_size_one(dtype: str) -> None:
    (dev,) = tw.devices("cuda:0")
    comm = tw.communicator([dev], "nccl")
    host = host_data(dtype, (1000,))
    buf = dev.from_host(host)
    for op in ("sum", "max", "min"):
        comm.allreduce([buf], op=op)
    comm.broadcast([buf], root=0)
    assert dev.to_host(buf).tobytes() == host.tobytes()
    assert dev.to_host(comm.allgather([buf])[0]).tobytes() == host.tobytes()
    assert dev.to_host(comm.reduce_scatter([buf])[0]).tobytes() == host.tobytes()
    comm.barrier()
    comm.close()


@gpu
@needs_cuda
def test_nccl_several_gpus_agree_with_local() -> None:
    count = registry().backend("cuda").device_count()  # type: ignore[attr-defined]
    if count < 2:
        pytest.skip("needs two GPUs")
    devs = tw.devices(f"cuda:{','.join(map(str, range(count)))}")
    ref = tw.devices(f"cpu-sim:{count}")
    hosts = [host_data("float32", (10_000,)) + r for r in range(count)]
    bufs = [d.from_host(h) for d, h in zip(devs, hosts, strict=True)]
    rbufs = [d.from_host(h) for d, h in zip(ref, hosts, strict=True)]
    tw.communicator(devs, "nccl").allreduce(bufs)
    tw.communicator(ref, "local").allreduce(rbufs)
    np.testing.assert_allclose(devs[-1].to_host(bufs[-1]), ref[0].to_host(rbufs[0]), rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
def test_cuda_spec_errors() -> None:
    with pytest.raises(DeviceSpecError, match="no GPU 999"):
        tw.devices("cuda:999")
    with pytest.raises(DeviceSpecError, match="peer_access must be auto, on or off"):
        tw.devices("cuda:0,peer_access=maybe")
    with pytest.raises(DeviceSpecError, match="unknown option"):
        tw.devices("cuda:0,bogus=1")


@gpu
@needs_cuda
def test_nccl_refuses_two_ranks_on_one_gpu() -> None:
    with pytest.raises(CollectiveError, match=r"share a GPU.*peer"):
        tw.communicator(tw.devices("cuda:0,0"), "nccl")

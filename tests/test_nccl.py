"""The NCCL/RCCL ctypes binding against the real libnccl of the nvidia-nccl-cu12 wheel (no GPU needed: version,
error strings, unique ids, and ncclCommInitRank's no-GPU failure), library discovery, the 16-bit policy, the
rendezvous store, and the bfloat16 bit kernels the GPU paths use. Tests that need the library skip without it."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

import tensorweave as tw
from tensorweave.communicators import nccl
from tensorweave.communicators._store import TcpStore, parse_address
from tensorweave.core import dtypes
from tensorweave.errors import (
    BackendUnavailableError,
    CollectiveError,
    CollectiveTimeoutError,
    CommunicationLibraryError,
    UnsupportedError,
)

try:
    nccl.find_library(nccl.NCCL)
    HAVE_NCCL = True
except BackendUnavailableError:
    HAVE_NCCL = False
needs_nccl = pytest.mark.skipif(not HAVE_NCCL, reason="libnccl not found (pip install nvidia-nccl-cu12)")


def test_version_codes_decode() -> None:
    assert nccl.decode_version(23203) == (2, 32, 3)
    assert nccl.decode_version(21903) == (2, 19, 3)
    assert nccl.decode_version(2708) == (2, 7, 8)  # before 2.9: X*1000 + Y*100 + Z


@needs_nccl
def test_real_library_version_errors_and_unique_ids() -> None:
    lib = nccl.load(nccl.NCCL)
    major, minor, _ = lib.version()
    assert (major, minor) >= (2, 13)
    err = lib.error("ncclAllReduce", 5, None)
    assert isinstance(err, CommunicationLibraryError)
    assert "ncclAllReduce failed with ncclInvalidUsage (5): invalid usage" in str(err)
    assert "same collectives in the same order" in str(err)  # the hint
    a, b = lib.unique_id(), lib.unique_id()
    assert len(a) == len(b) == 128 and a != b


@needs_nccl
def test_comm_init_without_gpu_is_one_clean_error() -> None:
    lib = nccl.load(nccl.NCCL)
    with pytest.raises(CommunicationLibraryError) as info:
        lib.init_rank(1, lib.unique_id(), 0)
    msg = str(info.value)
    assert msg.startswith("nccl rank 0: ncclCommInitRank failed with ncclUnhandledCudaError (1):")
    assert "CUDA driver version is insufficient" in msg  # ncclGetLastError's words
    assert "check the driver" in msg and "\n" not in msg


def test_discovery_errors_list_where_they_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("TENSORWEAVE_NCCL_LIBRARY", "/nonexistent/libnccl.so.2")
    with pytest.raises(BackendUnavailableError, match=r"TENSORWEAVE_NCCL_LIBRARY=/nonexistent/libnccl.so.2 does not"):
        nccl.find_library(nccl.NCCL)
    monkeypatch.delenv("TENSORWEAVE_RCCL_LIBRARY", raising=False)
    try:
        nccl.find_library(nccl.RCCL)
    except BackendUnavailableError as e:  # the usual case off AMD machines
        assert "RCCL library not found; looked in: TENSORWEAVE_RCCL_LIBRARY (unset)" in str(e)
        assert "librccl.so.1 (missing)" in str(e) and "system loader" in str(e) and "install ROCm" in str(e)


def test_a_library_that_is_not_nccl_is_refused() -> None:
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a wrong library")
    with pytest.raises(BackendUnavailableError, match="lacks ncclGetVersion: not a usable NCCL library"):
        nccl.Library(libm, nccl.NCCL)


def test_nccl_and_rccl_refuse_non_gpu_devices() -> None:
    devs = tw.devices("cpu-sim:2")
    with pytest.raises(UnsupportedError, match="does not drive 'cpu-sim' devices"):
        tw.communicator(devs, "nccl")
    with pytest.raises(UnsupportedError, match="it supports: rocm"):
        tw.communicator(devs, "rccl")


def test_sixteen_bit_policy_follows_llama_cpp() -> None:
    t = nccl.parse_float32_below(None)
    assert t == {2: 32768, 3: 131072, 4: 262144}
    assert nccl.reduce_in_float32(32767, 2, "auto", t) and not nccl.reduce_in_float32(32768, 2, "auto", t)
    assert nccl.reduce_in_float32(131071, 3, "auto", t) and not nccl.reduce_in_float32(262144, 8, "auto", t)
    assert nccl.reduce_in_float32(10**9, 2, "float32", t) and not nccl.reduce_in_float32(1, 2, "native", t)
    assert nccl.parse_float32_below("2:10,8:99") == {2: 10, 8: 99}
    with pytest.raises(CollectiveError, match="must look like"):
        nccl.parse_float32_below("lots")


def test_bfloat16_bit_kernels_match_ml_dtypes() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(50_000) * 1e3).astype(np.float32)
    x[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.3895314e38, 1e-40, 1.0000001]
    bits = dtypes.float32_to_bf16_bits(np, x)
    ref = x.astype(ml_dtypes.bfloat16)
    assert bits.dtype == np.uint16 and np.isnan(bits.view(ml_dtypes.bfloat16)[0])
    assert np.array_equal(bits[1:], ref.view(np.uint16)[1:])
    assert np.array_equal(dtypes.bf16_bits_to_float32(np, bits[1:]), ref[1:].astype(np.float32))


def test_store_rendezvous_and_timeouts() -> None:
    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    got: list[bytes] = []
    client = threading.Thread(target=lambda: got.append(TcpStore(address, False, 5).get("uid")))
    client.start()  # may start before the server: connecting retries
    server = TcpStore(address, True, 5)
    server.set("uid", b"\x00" * 128)
    client.join(10)
    assert got == [b"\x00" * 128]
    with pytest.raises(CollectiveTimeoutError, match=r"key 'never' was not set within 0\.2 s"):
        server.get("never", timeout=0.2)
    server.set("after", b"ok")  # still usable after a timeout
    assert server.get("after") == b"ok"
    server.close()
    with pytest.raises(CollectiveTimeoutError, match=f"nobody answers at 127.0.0.1:{port}"):
        TcpStore(address, False, 0.3)
    with pytest.raises(CollectiveError, match="must be HOST:PORT"):
        parse_address("localhost")

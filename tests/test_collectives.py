"""Every registered in-process communicator against a numpy float64 reference, for world sizes 1..8, every
dtype and op, and lengths from 0 to ~1e5; plus the argument checks every communicator shares. The inputs and the
error bound come from the conformance kit, which runs the same properties against any backend's communicator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorweave as tw
from tensorweave.conformance.cases import assert_reduced, make_inputs
from tensorweave.core import dtypes
from tensorweave.core.communicator import REDUCE_OPS
from tensorweave.core.plugins import registry
from tensorweave.errors import CollectiveError, PlacementError, PluginError, UnsupportedError

IN_PROCESS = sorted(  # those that drive cpu-sim devices from one process (not nccl: cuda only)
    n
    for n, c in registry().communicators.items()
    if c.capabilities.in_process and (c.capabilities.backends is None or "cpu-sim" in c.capabilities.backends)
)
DTYPES = ["float32", "float16", "bfloat16", "float64", "int32"]
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 8, 9, 64, 1023, 1025]), st.integers(0, 100_000), st.integers(50_000, 100_000)
)


def test_builtin_in_process_communicators_are_tested() -> None:
    assert {"local", "peer"} <= set(IN_PROCESS)


def upload(devs: list[Any], hosts: list[np.ndarray]) -> list[Any]:
    return [d.from_host(h) for d, h in zip(devs, hosts, strict=True)]


def download(devs: list[Any], bufs: list[Any]) -> list[np.ndarray]:
    return [d.to_host(b) for d, b in zip(devs, bufs, strict=True)]


@pytest.mark.parametrize("world", range(1, 9))  # every world size, not whichever hypothesis favours
@pytest.mark.parametrize("name", IN_PROCESS)
@settings(max_examples=max(10, settings().max_examples // 4))
@given(
    dtype=st.sampled_from(DTYPES),
    op=st.sampled_from(list(REDUCE_OPS)),
    length=LENGTHS,
    seed=st.integers(0, 2**32 - 1),
    topology=st.sampled_from(["all", "none", "ring"]),
)
def test_allreduce_matches_float64_reference(
    name: str, world: int, dtype: str, op: str, length: int, seed: int, topology: str
) -> None:
    devs = tw.devices(f"cpu-sim:{world},peer={topology}")
    hosts = make_inputs(world, length, dtype, seed)
    bufs = upload(devs, hosts)
    tw.communicator(devs, name).allreduce(bufs, op=op)
    outs = download(devs, bufs)
    assert_reduced(outs[0], hosts, op)
    for o in outs[1:]:  # every rank holds the same bits
        assert o.tobytes() == outs[0].tobytes()


@pytest.mark.parametrize("name", IN_PROCESS)
@given(world=st.integers(1, 8), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_allgather_unequal_sizes(name: str, world: int, dtype: str, seed: int, data: st.DataObject) -> None:
    devs = tw.devices(f"cpu-sim:{world}")
    trailing = data.draw(st.sampled_from([(), (3,), (2, 2)]))
    rng = np.random.default_rng(seed)
    hosts = [
        make_inputs(1, data.draw(st.integers(0, 2000)), dtype, int(rng.integers(2**31)), trailing)[0]
        for _ in range(world)
    ]
    comm = tw.communicator(devs, name)
    expected = np.concatenate(hosts, axis=0)
    if data.draw(st.booleans(), label="out="):
        out = [d.empty(expected.shape, expected.dtype) for d in devs]
        comm.allgather(upload(devs, hosts), out=out)  # warm the communicator's scratch buffers
        before = [d.stats.allocations for d in devs]
        result = comm.allgather(upload(devs, hosts), out=out)
        assert all(r is o for r, o in zip(result, out, strict=True))
        assert [d.stats.allocations for d in devs] == [b + 1 for b in before]  # only upload() allocated
    else:
        out = comm.allgather(upload(devs, hosts))
    for d, o in zip(devs, out, strict=True):
        assert d.owns(o)
        np.testing.assert_array_equal(d.to_host(o), expected, strict=True)


@pytest.mark.parametrize("name", IN_PROCESS)
@given(
    world=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    op=st.sampled_from(list(REDUCE_OPS)),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_reduce_scatter(name: str, world: int, dtype: str, op: str, seed: int, data: st.DataObject) -> None:
    devs = tw.devices(f"cpu-sim:{world}")
    sizes = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 500), min_size=world, max_size=world)))
    rows = sum(sizes) if sizes is not None else data.draw(st.integers(0, 3000))
    hosts = make_inputs(world, rows, dtype, seed, (2,))
    outs = tw.communicator(devs, name).reduce_scatter(upload(devs, hosts), sizes=sizes, op=op)
    expected_sizes = sizes or [rows // world + (r < rows % world) for r in range(world)]
    start = 0
    for r, (d, o) in enumerate(zip(devs, outs, strict=True)):
        stop = start + expected_sizes[r]
        assert_reduced(d.to_host(o), [h[start:stop] for h in hosts], op)
        start = stop


@pytest.mark.parametrize("name", IN_PROCESS)
@given(
    world=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    length=LENGTHS,
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_broadcast(name: str, world: int, dtype: str, length: int, seed: int, data: st.DataObject) -> None:
    devs = tw.devices(f"cpu-sim:{world},peer=ring")
    root = data.draw(st.integers(0, world - 1))
    hosts = make_inputs(world, length, dtype, seed)
    bufs = upload(devs, hosts)
    tw.communicator(devs, name).broadcast(bufs, root=root)
    for o in download(devs, bufs):
        np.testing.assert_array_equal(o, hosts[root], strict=True)


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_and_local_agree(world: int, dtype: str) -> None:
    devs = tw.devices(f"cpu-sim:{world},peer=ring")
    local, peer = tw.communicator(devs, "local"), tw.communicator(devs, "peer")
    hosts = make_inputs(world, 4099, dtype, seed=world)
    for op in REDUCE_OPS:
        a, b = upload(devs, hosts), upload(devs, hosts)
        local.allreduce(a, op=op)
        peer.allreduce(b, op=op)
        got_local, got_peer = devs[0].to_host(a[0]), devs[0].to_host(b[0])
        if op != "sum" or dtype == "int32":
            np.testing.assert_array_equal(got_peer, got_local, strict=True)
        else:  # different (fixed) summation orders: both within the bound of the same reference
            assert_reduced(got_local, hosts, op)
            assert_reduced(got_peer, hosts, op)
            rtol, atol = dtypes.TOLERANCES[dtype]
            np.testing.assert_allclose(
                got_peer.astype(np.float64), got_local.astype(np.float64), rtol=rtol, atol=atol * world
            )


@pytest.mark.parametrize("name", IN_PROCESS)
@pytest.mark.parametrize("world", range(1, 9))
def test_every_rank_contributes(name: str, world: int) -> None:
    """Rank r contributes 2**r: the sum is 2**world - 1 only if no rank was skipped (llama.cpp's 3-GPU bug)."""
    devs = tw.devices(f"cpu-sim:{world}")
    bufs = upload(devs, [np.full(5, 2.0**r, np.float32) for r in range(world)])
    tw.communicator(devs, name).allreduce(bufs)
    for o in download(devs, bufs):
        np.testing.assert_array_equal(o, np.full(5, 2.0**world - 1, np.float32))


@given(world=st.integers(2, 8), length=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_local_bfloat16_sum_is_the_float32_sum_rounded_once(world: int, length: int, seed: int) -> None:
    """Inputs are bf16 multiples of 2**-6 below 2**9, so their float32 sum is exact: rounding must happen once.

    Chained bf16 additions (round at every step) fail this for most seeds.
    """
    rng = np.random.default_rng(seed)
    hosts = [(rng.integers(-(2**15), 2**15, length) / 64.0).astype(dtypes.bfloat16) for _ in range(world)]
    exact = np.sum([h.astype(np.float64) for h in hosts], axis=0)
    assert np.all(exact.astype(np.float32).astype(np.float64) == exact)  # exact in float32
    devs = tw.devices(f"cpu-sim:{world}")
    bufs = upload(devs, hosts)
    tw.communicator(devs, "local").allreduce(bufs)
    expected = exact.astype(np.float32).astype(dtypes.bfloat16)
    for o in download(devs, bufs):
        assert o.tobytes() == expected.tobytes()


@pytest.mark.parametrize("name", IN_PROCESS)
def test_results_are_bitwise_reproducible(name: str) -> None:
    devs = tw.devices("cpu-sim:5")
    hosts = make_inputs(5, 10_000, "float32", seed=7)
    comm = tw.communicator(devs, name)
    runs = []
    for _ in range(3):
        bufs = upload(devs, hosts)
        comm.allreduce(bufs)
        runs.append(devs[0].to_host(bufs[0]).tobytes())
    assert runs[0] == runs[1] == runs[2]


def test_peer_reuses_scratch_buffers() -> None:
    devs = tw.devices("cpu-sim:3")
    comm = tw.communicator(devs, "peer")
    bufs = upload(devs, make_inputs(3, 1000, "bfloat16", seed=1))
    comm.allreduce(bufs)
    before = [d.stats.allocations for d in devs]
    for _ in range(5):
        comm.allreduce(bufs)
    assert [d.stats.allocations for d in devs] == before


def test_peer_uses_direct_copies_where_the_topology_allows() -> None:
    devs = tw.devices("cpu-sim:4,peer=0-1,2-3")
    bufs = upload(devs, make_inputs(4, 100, "float32", seed=3))
    tw.communicator(devs, "peer").allreduce(bufs)
    assert all(d.stats.peer_copies > 0 for d in devs[:2] + devs[2:])  # partners 0-1 and 2-3 copy directly
    assert sum(d.stats.staged_copies for d in devs) > 0  # the 0/2 and 1/3 exchanges go through host
    off = tw.devices("cpu-sim:4")
    tw.communicator(off, "peer", peer_access="off").allreduce(upload(off, make_inputs(4, 10, "float32", 3)))
    assert sum(d.stats.peer_copies for d in off) == 0


def test_default_communicator_is_the_backends() -> None:
    devs = tw.devices("cpu-sim:2")
    assert tw.communicator(devs).name == "local"


# --- bad input: one clear TensorweaveError, never a hang or a wrong result -------------------------------------


@pytest.fixture(params=IN_PROCESS)
def comm_and_devs(request: pytest.FixtureRequest) -> tuple[Any, list[Any]]:
    devs = tw.devices("cpu-sim:3")
    return tw.communicator(devs, request.param), devs


def test_rejects_buffers_of_different_length(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.from_host(np.zeros(4 + (r == 2), np.float32)) for r, d in enumerate(devs)]
    with pytest.raises(CollectiveError, match=r"rank 2 has shape \(5,\)"):
        comm.allreduce(bufs)


def test_rejects_buffers_of_different_dtype(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.from_host(np.zeros(4, np.float16 if r == 1 else np.float32)) for r, d in enumerate(devs)]
    with pytest.raises(CollectiveError, match="rank 1 has dtype float16"):
        comm.allreduce(bufs)


def test_rejects_buffer_on_the_wrong_device(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.from_host(np.zeros(4, np.float32)) for d in devs]
    with pytest.raises(PlacementError, match="rank 0 does not live on cpu-sim:0"):
        comm.allreduce([bufs[1], bufs[0], bufs[2]])
    with pytest.raises(PlacementError, match="host numpy array"):
        comm.allreduce([np.zeros(4, np.float32), bufs[1], bufs[2]])


def test_rejects_wrong_buffer_count(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    with pytest.raises(CollectiveError, match="got 2 buffers for 3 local ranks"):
        comm.allreduce([d.from_host(np.zeros(2, np.float32)) for d in devs[:2]])


def test_rejects_unsupported_op_and_dtype(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.from_host(np.zeros(4, np.float32)) for d in devs]
    with pytest.raises(UnsupportedError, match="unsupported op 'prod'"):
        comm.allreduce(bufs, op="prod")
    int8 = [d.submit(lambda: np.zeros(4, np.int8)).result() for d in devs]  # a kernel output of an odd dtype
    with pytest.raises(UnsupportedError, match="unsupported dtype int8"):
        comm.allreduce(int8)


def test_rejects_bad_reduce_scatter_sizes_and_broadcast_root(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.from_host(np.zeros(6, np.float32)) for d in devs]
    with pytest.raises(CollectiveError, match="summing to the buffers' 6 rows"):
        comm.reduce_scatter(bufs, sizes=[1, 2, 2])
    with pytest.raises(CollectiveError, match="non-negative"):
        comm.reduce_scatter(bufs, sizes=[-1, 5, 2])
    with pytest.raises(CollectiveError, match="at least one axis to split"):
        comm.reduce_scatter([d.from_host(np.array(1.0, np.float32)) for d in devs])
    with pytest.raises(CollectiveError, match=r"root 3 outside ranks 0\.\.2"):
        comm.broadcast(bufs, root=3)


def test_rejects_allgather_out_of_the_wrong_shape(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.empty((3, 2), "float32") for d in devs]
    with pytest.raises(CollectiveError, match="expected"):
        comm.allgather(bufs, out=[d.empty((3, 2), "float32") for d in devs])


def test_rejects_allgather_with_mismatched_trailing_axes(comm_and_devs: tuple[Any, list[Any]]) -> None:
    comm, devs = comm_and_devs
    bufs = [d.from_host(np.zeros((2, 3 + (r == 1)), np.float32)) for r, d in enumerate(devs)]
    with pytest.raises(CollectiveError, match="agree on all axes but the first"):
        comm.allgather(bufs)


def test_communicator_construction_errors() -> None:
    devs = tw.devices("cpu-sim:2,peer=none")
    with pytest.raises(PluginError, match="unknown communicator 'nccl-typo'"):
        tw.communicator(devs, "nccl-typo")
    with pytest.raises(CollectiveError, match="unknown options: bogus"):
        tw.communicator(devs, "peer", bogus=1)
    with pytest.raises(PlacementError, match="peer_access='on' but cpu-sim:0 has no peer access"):
        tw.communicator(devs, "peer", peer_access="on")
    with pytest.raises(CollectiveError, match="at least one device"):
        tw.communicator([])
    with pytest.raises(CollectiveError, match="appears twice"):
        tw.communicator([devs[0], devs[0]], "local")

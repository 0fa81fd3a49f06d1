"""Conformance, collectives: the communicator over the first 1..N devices against a float64 numpy reference, for
every dtype and reduce op, with lengths, sizes, roots and values drawn by hypothesis. A communicator with one
process per rank (shm, mpi) runs the same cases in 1..N real ranks (``ranks``: seeded examples instead of
hypothesis, which would shrink a failure on one rank alone)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..core.communicator import REDUCE_OPS, Communicator
from ..core.device import Device
from .cases import assert_reduced, make_inputs
from .plugin import KIT, Kit, param_ids

DTYPES = ["float32", "float16", "bfloat16", "float64", "int32"]
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 8, 9, 64, 1023, 1025]), st.integers(0, 4096), st.integers(30_000, 70_000)
)
SEEDS = st.integers(0, 2**32 - 1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    kit = metafunc.config.stash.get(KIT, None)
    worlds = range(1, (kit.world_size if kit else 1) + 1)
    ops = list(REDUCE_OPS) if "op" in metafunc.fixturenames else [None]
    rows = [{"op": op, "dtype": dt, "world": w} for op in ops for dt in DTYPES for w in worlds]
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    metafunc.parametrize(list(rows[0]), [tuple(r.values()) for r in rows], ids=param_ids(rows))


_comms: dict[int, Communicator] = {}


def setup(
    kit: Kit, kind: str, world: int, dtype: str, op: str | None = None
) -> tuple[list[Device], Communicator] | None:
    """The first ``world`` devices and the communicator over them; not supported where the kit cannot test. A
    communicator with one process per rank is tested in ``world`` real ranks instead (``ranks``): None when they
    passed the case, their problem as an AssertionError otherwise."""
    cls, devs = kit.communicator, kit.group()
    caps = cls.capabilities
    if dtype not in caps.dtypes:
        kit.not_supported(f"communicator {cls.name} does not support dtype {dtype}")
    if dtype not in kit.backend.capabilities.dtypes:
        kit.not_supported(f"backend {kit.backend.name} does not support dtype {dtype}")
    if op is not None and op not in caps.ops:
        kit.not_supported(f"communicator {cls.name} does not support reduce op {op}")
    if not caps.in_process:
        kit.ranks(world).check_case(kind, dtype, op)
        return None
    if world > len(devs):
        kit.not_supported(f"world size {world}: only {len(devs)} device(s) to test on (--devices)")
    comm = _comms.get(world)
    if comm is None or comm.devices != devs[:world]:
        comm = _comms[world] = cls(devs[:world])
    return devs[:world], comm


def upload(devs: list[Device], hosts: list[np.ndarray]) -> list[Any]:
    return [d.from_host(h) for d, h in zip(devs, hosts, strict=True)]


def assert_same(devs: list[Device], outs: list[Any], expected: np.ndarray) -> None:
    for rank, (d, o) in enumerate(zip(devs, outs, strict=True)):
        assert d.owns(o), f"rank {rank}'s result does not live on {d.name}"
        got = d.to_host(o)
        assert got.dtype == expected.dtype and got.shape == expected.shape, (
            f"rank {rank}: got {got.shape} {got.dtype}, expected {expected.shape} {expected.dtype}"
        )
        assert got.tobytes() == expected.tobytes(), f"rank {rank}: {int((got != expected).sum())} entries differ"


def test_allreduce(kit: Kit, op: str, dtype: str, world: int) -> None:
    if (group := setup(kit, "allreduce", world, dtype, op)) is None:
        return
    devs, comm = group

    @kit.settings()
    @given(length=LENGTHS, seed=SEEDS)
    def check(length: int, seed: int) -> None:
        hosts = make_inputs(world, length, dtype, seed)
        bufs = upload(devs, hosts)
        comm.allreduce(bufs, op=op)
        first = devs[0].to_host(bufs[0])
        assert_reduced(first, hosts, op)
        assert_same(devs, bufs, first)  # every rank holds the same bits

    check()


def test_reduce_scatter(kit: Kit, op: str, dtype: str, world: int) -> None:
    if (group := setup(kit, "reduce_scatter", world, dtype, op)) is None:
        return
    devs, comm = group

    @kit.settings()
    @given(sizes=st.one_of(st.none(), st.lists(st.integers(0, 500), min_size=world, max_size=world)), data=st.data())
    def check(sizes: list[int] | None, data: st.DataObject) -> None:
        rows = sum(sizes) if sizes is not None else data.draw(st.integers(0, 3000), label="rows")
        hosts = make_inputs(world, rows, dtype, data.draw(SEEDS, label="seed"), (2,))
        outs = comm.reduce_scatter(upload(devs, hosts), sizes=sizes, op=op)
        parts = sizes or [rows // world + (r < rows % world) for r in range(world)]
        starts = np.cumsum([0, *parts])
        for r, (d, o) in enumerate(zip(devs, outs, strict=True)):
            assert d.owns(o), f"rank {r}'s part does not live on {d.name}"
            assert_reduced(d.to_host(o), [h[starts[r] : starts[r + 1]] for h in hosts], op)

    check()


def test_allgather(kit: Kit, dtype: str, world: int) -> None:
    if (group := setup(kit, "allgather", world, dtype)) is None:
        return
    devs, comm = group

    @kit.settings()
    @given(
        lengths=st.lists(st.integers(0, 2000), min_size=world, max_size=world),  # unequal, zero included
        trailing=st.sampled_from([(), (3,), (2, 2)]),
        seed=SEEDS,
        into_out=st.booleans(),
    )
    def check(lengths: list[int], trailing: tuple[int, ...], seed: int, into_out: bool) -> None:
        hosts = [make_inputs(1, n, dtype, seed + r, trailing)[0] for r, n in enumerate(lengths)]
        expected = np.concatenate(hosts, axis=0)
        out = [d.empty(expected.shape, expected.dtype) for d in devs] if into_out else None
        result = comm.allgather(upload(devs, hosts), out=out)
        if out is not None:
            assert all(r is o for r, o in zip(result, out, strict=True)), "allgather(out=) returned other arrays"
        assert_same(devs, result, expected)

    check()


def test_broadcast(kit: Kit, dtype: str, world: int) -> None:
    if (group := setup(kit, "broadcast", world, dtype)) is None:
        return
    devs, comm = group

    @kit.settings()
    @given(length=LENGTHS, seed=SEEDS, data=st.data())
    def check(length: int, seed: int, data: st.DataObject) -> None:
        root = data.draw(st.integers(0, world - 1), label="root")
        hosts = make_inputs(world, length, dtype, seed)
        bufs = upload(devs, hosts)
        comm.broadcast(bufs, root=root)
        assert_same(devs, bufs, hosts[root])

    check()

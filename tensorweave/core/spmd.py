"""SPMD bootstrap: which rank this process is, how many ranks there are, and which communicator joins them.

One process per rank (``tensorweave launch -n N -- ...``, ``mpiexec -n N ...``) runs the same program; each rank
opens its own device(s) and a multi-process communicator. This module reads where the process stands, with
explicit arguments first, then, in order:

- ``TENSORWEAVE_RANK`` / ``TENSORWEAVE_WORLD_SIZE`` / ``TENSORWEAVE_LOCAL_RANK`` / ``TENSORWEAVE_COMMUNICATOR``,
  set by ``tensorweave launch`` (communicator ``shm``, rendezvous ``TENSORWEAVE_SHM_NAME``);
- an MPI launcher's variables (MPICH/Hydra ``PMI_RANK``/``PMI_SIZE``, Open MPI ``OMPI_COMM_WORLD_*``,
  Slurm ``PMIX_RANK``): communicator ``mpi``.

``TENSORWEAVE_TIMEOUT`` (seconds) is the default collective timeout of every multi-process communicator.
Core code: reads the environment and opens communicators through the plugin registry, never a plugin directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CollectiveError

if TYPE_CHECKING:
    from .communicator import Communicator
    from .device import Device

ENV_RANK = "TENSORWEAVE_RANK"
ENV_WORLD_SIZE = "TENSORWEAVE_WORLD_SIZE"
ENV_LOCAL_RANK = "TENSORWEAVE_LOCAL_RANK"
ENV_COMMUNICATOR = "TENSORWEAVE_COMMUNICATOR"
ENV_TIMEOUT = "TENSORWEAVE_TIMEOUT"
ENV_SHM_NAME = "TENSORWEAVE_SHM_NAME"  # the shm communicator's rendezvous segment
ENV_STORE = "TENSORWEAVE_STORE"  # HOST:PORT of the TCP rendezvous store (NCCL unique ids)
DEFAULT_TIMEOUT = 300.0  # seconds; long enough for a slow rank to load its shard, short enough to notice a hang

# (rank, world size, local rank) variables of MPI launchers, tried in order.
_MPI_ENV = (
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Hydra, Intel MPI
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),  # PMIx launchers (srun --mpi=pmix)
)


def _int_env(env: Mapping[str, str], key: str, who: str) -> int | None:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise CollectiveError(f"{who}: environment variable {key}={raw!r} is not an integer") from None


def timeout_from(value: float | str | None, who: str, env: Mapping[str, str] | None = None) -> float:
    """A collective timeout in seconds: ``value`` if given, else ``TENSORWEAVE_TIMEOUT``, else 300."""
    env = os.environ if env is None else env
    source = "timeout"
    if value is None:
        value, source = env.get(ENV_TIMEOUT, DEFAULT_TIMEOUT), ENV_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise CollectiveError(f"{who}: {source} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise CollectiveError(f"{who}: {source} must be positive, got {value!r}")
    return seconds


@dataclass(frozen=True)
class SpmdEnv:
    """Where this process stands in an SPMD run."""

    rank: int
    world_size: int
    local_rank: int  # rank among the processes of this host: picks the GPU (cuda:<local_rank>)
    communicator: str  # the communicator the launcher prepared: "shm" (tensorweave launch), "mpi" (mpiexec)
    source: str  # which variables said so, for messages

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> SpmdEnv | None:
        """The SPMD position from the environment, or None when this process was not launched as a rank."""
        env = os.environ if env is None else env
        rank, world = _int_env(env, ENV_RANK, "spmd"), _int_env(env, ENV_WORLD_SIZE, "spmd")
        if rank is not None or world is not None:
            if rank is None or world is None:
                raise CollectiveError(f"spmd: set both {ENV_RANK} and {ENV_WORLD_SIZE} (only one is set)")
            local = _int_env(env, ENV_LOCAL_RANK, "spmd")
            found = cls(rank, world, rank if local is None else local, env.get(ENV_COMMUNICATOR, "shm"), ENV_RANK)
        else:
            for rk, wk, lk in _MPI_ENV:
                rank, world = _int_env(env, rk, "spmd"), _int_env(env, wk, "spmd")
                if rank is not None and world is not None:
                    local = _int_env(env, lk, "spmd")
                    found = cls(rank, world, rank if local is None else local, env.get(ENV_COMMUNICATOR, "mpi"), rk)
                    break
            else:
                return None
        if not 0 <= found.rank < found.world_size:
            raise CollectiveError(f"spmd: rank {found.rank} outside 0..{found.world_size - 1} (from {found.source})")
        return found

    def device_spec(self, backend: str = "cpu-sim") -> str:
        """The device this rank drives: one simulated device, or the GPU numbered by the local rank."""
        return f"{backend}:1" if backend == "cpu-sim" else f"{backend}:{self.local_rank}"

    def connect(self, devices: Sequence[Device], name: str | None = None, **options: Any) -> Communicator:
        """Open this rank's communicator (``name`` overrides the launcher's choice) over this rank's devices."""
        from .plugins import open_communicator

        name = name or self.communicator
        if name != "mpi":  # MPI knows rank and size itself; the others are told
            options.setdefault("rank", self.rank)
            options.setdefault("world_size", self.world_size)
        return open_communicator(devices, name, **options)


def resolve_rank(rank: int | None, world_size: int | None, who: str) -> tuple[int, int]:
    """Rank and world size from explicit options, else from the SPMD environment; one clear error if neither."""
    if rank is None or world_size is None:
        found = SpmdEnv.detect()
        if found is None:
            raise CollectiveError(
                f"{who}: rank and world size unknown: pass rank= and world_size=, set {ENV_RANK} and "
                f"{ENV_WORLD_SIZE}, or start the ranks with `tensorweave launch -n N -- ...`"
            )
        rank = found.rank if rank is None else rank
        world_size = found.world_size if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise CollectiveError(f"{who}: rank {rank} is outside 0..{world_size - 1} (world_size={world_size})")
    return rank, world_size


def spmd_from_env(
    devices: Sequence[Device] | None = None, backend: str = "cpu-sim", name: str | None = None, **options: Any
) -> Communicator:
    """The rank bootstrap an SPMD program (``tensorweave run`` under launch/mpiexec) calls first.

    Opens this rank's device (``backend``: ``cpu-sim:1``, or ``cuda:<local_rank>``) unless ``devices`` are given,
    and returns the communicator the launcher prepared (``shm`` or ``mpi``, or ``name``). Raises CollectiveError
    when the process was not started as a rank.
    """
    from .plugins import open_devices

    found = SpmdEnv.detect()
    if found is None:
        raise CollectiveError(
            "spmd: this process was not started as a rank: use `tensorweave launch -n N -- ...` or mpiexec"
        )
    devs = list(devices) if devices is not None else open_devices(found.device_spec(backend))
    return found.connect(devs, name, **options)

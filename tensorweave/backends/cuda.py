"""cuda: NVIDIA GPUs through CuPy (``pip install 'tensorweave[cuda12]'`` or ``[cuda13]``); see backends/gpu.py.

Default communicator ``nccl``. ``available()`` is False, without raising, when CuPy, the driver or a GPU is
missing, so ``tensorweave devices`` and ``plugins`` work on any machine.
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.device import Backend
from ..core.hookspecs import hookimpl
from .gpu import GpuBackend


class CudaBackend(GpuBackend):
    name = "cuda"
    hip = False
    default_communicator = "nccl"
    description = "NVIDIA GPUs through CuPy (spec cuda, cuda:0,1; peer_access=auto|on|off, mem=)"


@hookimpl
def tensorweave_register_backends(register: Callable[[Backend], None]) -> None:
    register(CudaBackend())

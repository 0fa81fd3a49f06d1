"""rocm: AMD GPUs through CuPy's ROCm build (``pip install 'tensorweave[rocm]'``); see backends/gpu.py.

Default communicator ``rccl``. Each device is matched against ``ARCHITECTURES`` by its ``gcnArchName``
(e.g. ``gfx942:sramecc+:xnack-``), so listings say what the GPU is and unknown architectures are flagged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..core.device import Backend
from ..core.hookspecs import hookimpl
from .gpu import GpuBackend


@dataclass(frozen=True)
class Arch:
    """One AMD GPU architecture (LLVM target name) as far as tensor parallelism cares."""

    family: str
    products: str
    wavefront: int  # threads per wavefront: 64 on CDNA (Instinct), 32 on RDNA (Radeon)
    matrix: str  # matrix instructions: MFMA (CDNA), WMMA (RDNA3+), none
    fp8: bool  # hardware FP8 matrix math
    xgmi: bool  # Infinity Fabric links between GPUs of a node (fast peer copies, RCCL over xGMI)


ARCHITECTURES: dict[str, Arch] = {
    "gfx908": Arch("CDNA", "Instinct MI100", 64, "MFMA", False, True),
    "gfx90a": Arch("CDNA2", "Instinct MI210, MI250, MI250X", 64, "MFMA", False, True),
    "gfx942": Arch("CDNA3", "Instinct MI300X, MI300A, MI325X", 64, "MFMA", True, True),
    "gfx950": Arch("CDNA4", "Instinct MI350X, MI355X", 64, "MFMA", True, True),
    "gfx1030": Arch("RDNA2", "Radeon RX 6800/6900 XT, PRO W6800", 32, "none", False, False),
    "gfx1100": Arch("RDNA3", "Radeon RX 7900 XTX/XT, PRO W7900/W7800", 32, "WMMA", False, False),
    "gfx1101": Arch("RDNA3", "Radeon RX 7800/7700 XT, PRO W7700", 32, "WMMA", False, False),
    "gfx1102": Arch("RDNA3", "Radeon RX 7600", 32, "WMMA", False, False),
    "gfx1200": Arch("RDNA4", "Radeon RX 9060 XT", 32, "WMMA", True, False),
    "gfx1201": Arch("RDNA4", "Radeon RX 9070/9070 XT, AI PRO R9700", 32, "WMMA", True, False),
}


def arch_of(gcn_arch_name: str | bytes) -> tuple[str, Arch | None]:
    """'gfx942:sramecc+:xnack-' -> ('gfx942', its Arch); unknown architectures -> (name, None)."""
    text = gcn_arch_name.decode(errors="replace") if isinstance(gcn_arch_name, bytes) else gcn_arch_name
    base = text.split(":", 1)[0].strip()
    return base, ARCHITECTURES.get(base)


class RocmBackend(GpuBackend):
    name = "rocm"
    hip = True
    default_communicator = "rccl"
    description = "AMD GPUs through CuPy-ROCm (spec rocm, rocm:0,1; peer_access=auto|on|off, mem=)"

    def describe(self, ordinal: int) -> str:
        props = self.cupy.cuda.runtime.getDeviceProperties(ordinal)
        base, arch = arch_of(props.get("gcnArchName", b"?"))
        if arch is None:
            warnings.warn(f"rocm: GPU {ordinal} is {base}, which tensorweave has not been tested on", stacklevel=2)
            return f"{super().describe(ordinal)} ({base}, untested architecture)"
        return f"{arch.products.split(',')[0]} ({base}, {arch.family}, wavefront {arch.wavefront})"


@hookimpl
def tensorweave_register_backends(register: Callable[[Backend], None]) -> None:
    register(RocmBackend())

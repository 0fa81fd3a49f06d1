"""Every exception a tensorweave user can see: one family rooted at TensorweaveError.

Each class also derives from the builtin exception a Python user would expect (ValueError for bad input,
MemoryError for out-of-memory, TimeoutError for a stuck collective), so generic handlers keep working.
Messages name what went wrong and where: the device, the rank, the plugin, the file.
"""

from __future__ import annotations


class TensorweaveError(Exception):
    """Base of every error tensorweave raises on purpose."""


class DeviceSpecError(TensorweaveError, ValueError):
    """A device spec string such as "cpu-sim:4,mem=256MiB" could not be understood."""


class BackendUnavailableError(TensorweaveError, RuntimeError):
    """The backend exists but cannot run here (no driver, no hardware, missing library)."""


class PluginError(TensorweaveError, RuntimeError):
    """A plugin is unknown, broken, or registered something invalid."""


class OutOfMemoryError(TensorweaveError, MemoryError):
    """A device allocation exceeded the device's capacity."""

    def __init__(self, device: str, requested: int, free: int) -> None:
        self.device, self.requested, self.free = device, requested, free
        super().__init__(
            f"{device}: out of memory: requested {format_bytes(requested)} ({requested} bytes) "
            f"but only {format_bytes(free)} ({free} bytes) free"
        )


class PlacementError(TensorweaveError, RuntimeError):
    """An array was used on a device it does not live on, or read on the host without to_host()."""


class ShapeError(TensorweaveError, ValueError):
    """An array has a shape or dtype that does not fit where it is used."""


class CollectiveError(TensorweaveError, ValueError):
    """A collective was called with buffers that do not fit together (count, shape, dtype, op)."""


class OpAttributeError(TensorweaveError, TypeError):
    """A graph node gave its op an attribute the op does not declare (a typo), or left out a required one."""


class UnsupportedError(TensorweaveError, NotImplementedError):
    """A backend or communicator does not support the requested op or dtype."""


class SplitError(TensorweaveError, ValueError):
    """A tensor_split (ratios over devices) cannot be applied: wrong count, negative or non-finite entries."""


class PlanError(TensorweaveError, ValueError):
    """A graph cannot be split over devices: an op without a sharding rule, a weight used against its role."""


class CollectiveTimeoutError(TensorweaveError, TimeoutError):
    """A collective did not complete in time; the message names the ranks that never arrived."""


class CommunicationLibraryError(TensorweaveError, RuntimeError):
    """NCCL, RCCL or MPI reported a failure; the message carries the library's own words and what to do."""


class ModelFormatError(TensorweaveError, ValueError):
    """A model file (safetensors, GGUF, config.json, tokenizer) is corrupt, truncated or does not fit its config;
    the message names the file and, where there is one, the tensor."""


class TemplateError(ModelFormatError):
    """A model's chat template does not compile, fails while rendering (a sandbox refusal, an undefined variable, a
    Python error) or hits a limit (time, output size, loop range, number size); one line naming the template."""


class StateError(TensorweaveError, RuntimeError):
    """A session or saved state cannot be used here: superseded by another session, full, or from another model."""


class MissingDependencyError(TensorweaveError, ImportError):
    """An optional dependency a feature needs is not installed; the message says which extra to install."""


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class SamplingError(TensorweaveError, ValueError):
    """A sampling parameter is out of range (the message names it), or logits or stop strings cannot be used."""


class ServeError(TensorweaveError, RuntimeError):
    """``tensorweave serve`` cannot serve: its address is taken, or its ranks lost one another (the message names
    the rank)."""

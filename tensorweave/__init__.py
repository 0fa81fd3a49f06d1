"""tensorweave: run transformer models split across devices of any vendor (tensor parallelism).

Public API::

    import tensorweave as tw
    devs = tw.devices("cpu-sim:4,mem=512MiB,peer=ring")
    comm = tw.communicator(devs)            # the backend's default, or name="peer" / "local" / ...
    comm.allreduce(buffers)                 # one buffer per local rank
    model = tw.load("model_dir_or.gguf", devices="cpu-sim:3", tensor_split=[3, 1, 1])
    model.logits(token_ids)                 # float32 [len(token_ids), vocab], fresh context

Plugin authors: ``tw.hookimpl`` marks hook implementations (see plugins.md); errors live in ``tw.errors``.
"""

from __future__ import annotations

from . import errors
from ._version import __version__
from .core.hookspecs import hookimpl
from .core.plugins import open_communicator as communicator
from .core.plugins import open_devices as devices
from .runtime.model import Model, load

__all__ = ["Model", "__version__", "communicator", "devices", "errors", "hookimpl", "load"]

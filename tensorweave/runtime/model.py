"""``tw.load``: open a checkpoint with the registered loaders, place each device's weight slices, and run.

Loading checks every weight the family's graph declares against the checkpoint's index first (missing, extra,
misshapen tensors are one ``ModelFormatError`` naming the file and tensor) and only then reads data, streaming one
slice per device and weight: the checkpoint hands out ``weight[index]`` and the executor copies it to the device.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.communicator import Communicator
from ..core.device import Device
from ..core.executor import Executor
from ..core.graph import Graph, GraphCache, Tensor
from ..core.model import Checkpoint, ModelFamily
from ..core.planner import Plan
from ..core.plugins import registry
from ..errors import ModelFormatError, ShapeError, UnsupportedError
from . import formats, kvcache
from .session import Generation, Session, TextStream
from .state import read as read_state

DEFAULT_CTX = 4096  # KV-cache tokens when the caller does not say (a model's own maximum can be 128k and more)


class Model:
    """A checkpoint placed on devices. ``logits(ids)`` runs a fresh context; ``session()`` keeps one going."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        devices: str | Sequence[Device] = "cpu-sim",
        tensor_split: Sequence[float] | None = None,
        dtype: Any = None,
        communicator: Communicator | str | None = None,
        ctx: int | None = None,
        progress: bool | None = None,
        cache_dtype: Any = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.config = runtime_config(checkpoint, dtype, ctx)
        # attention's K/V caches as stored (runtime/kvcache.py); refused before any device is opened
        self.cache_types = kvcache.cache_types(cache_dtype, self.config.dtype)
        self.executor = Executor(devices, communicator, tensor_split)
        kvcache.check_devices(self.executor.devices, self.cache_types, self.config.dtype)
        self.units: dict[str, int] = {}  # split groups widened to whole quantization blocks (runtime/formats.py)
        self.graphs = GraphCache(self._build, maxsize=8)
        with config_errors(checkpoint):
            g = self.graphs(tokens=1)
        check_weights(checkpoint, g)
        world = self.executor.world_size
        self.formats, self.units, self.notes = formats.prepare(checkpoint, g, self.executor.devices, world, dtype)
        total = sum(self.formats[n].nbytes(t.shape) for n, t in g.weights.items())
        with _progress_bar(total, progress, checkpoint.path.name) as bar:
            self.executor.load_weights(
                g, formats.read_as(checkpoint, self.formats), lambda _name, n: bar.update(n), self.formats
            )
        self.tokenizer = with_family_defaults(checkpoint.tokenizer(), checkpoint.family)
        self.active: Session | None = None  # the session whose tokens the KV caches hold
        # held while a session checks that it is ``active``, takes the caches over or runs the executor: those are
        # one step, so two threads with a session each get right results or StateError, never each other's cache
        self.lock = threading.RLock()

    def _build(self, tokens: int, n_logits: int | None = None) -> Graph:
        """The family's graph of one step: ``graphs(tokens=n)`` has every token's logits, ``graphs(tokens=n,
        n_logits=k)`` the last k tokens' only (families that never get k < n need not take the argument)."""
        if n_logits is None:
            g = self.family.build(self.config, tokens)
        else:
            g = self.family.build(self.config, tokens, n_logits)
        return formats.apply_groups(kvcache.apply(g, self.cache_types), self.units)

    @property
    def vocab(self) -> int:
        return int(self.config.vocab)

    @property
    def caches(self) -> dict[str, Tensor]:
        """The caches the model's layers declare: name -> declaration (shape, ``cache`` kind and split axis)."""
        return self.graphs(tokens=1).caches

    @property
    def plan(self) -> Plan:
        """The plan of one decode step: per-device weight bytes as held and their format mix, KV bytes, collectives
        and bytes moved per token, and notes on weights converted at load and split units widened to whole
        quantization blocks."""
        p = self.executor.plan(self.graphs(tokens=1))
        p.notes = list(self.notes)
        return p

    def session(self) -> Session:
        return Session(self)

    def replica(self) -> Model:
        """This model again over the same devices and weights (shared, not copied) with KV caches of its own, so
        that several sessions can each keep their context at once (a server's parallel slots). Replicas take
        turns on the devices: their steps run one at a time."""
        twin = object.__new__(Model)
        twin.__dict__.update(self.__dict__)
        twin.executor, twin.active = self.executor.replica(), None
        return twin

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **kwargs: Any) -> Generation | TextStream:
        """Text (or token ids) in, a continuation out, in a fresh session; keywords as ``Session.generate``
        (sampling parameters, ``stop``, ``stream=True``...)."""
        return self.session().generate(prompt, max_tokens, **kwargs)

    def chat(
        self, messages: Sequence[Mapping[str, Any]], max_tokens: int = 256, **kwargs: Any
    ) -> Generation | TextStream:
        """The answer to a conversation rendered with the model's chat template, in a fresh session (keep a
        ``session()`` and call its ``chat`` to reuse the cached conversation across turns)."""
        return self.session().chat(messages, max_tokens, **kwargs)

    def restore(self, path: str | Path) -> Session:
        """A session resumed from a file ``Session.save`` wrote, on this model's devices and split (which may
        differ from the saver's); refused with ``StateError`` when the file belongs to another model."""
        session = self.session()
        session.load_state(read_state(path), str(Path(path).expanduser()))
        return session

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 [len(token_ids), vocab] for ``token_ids`` as a fresh context (position 0 onward)."""
        return self.session().eval(token_ids)

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Model {self.family.name} {self.checkpoint.path.name} on {self.executor.world_size} device(s) "
            f"{self.config.dtype}, weights {'+'.join(sorted({f.name for f in self.formats.values()}))}, "
            f"ctx {self.config.ctx}, kv cache {self.cache_types}>"
        )


def load(
    path: str | Path,
    devices: str | Sequence[Device] = "cpu-sim",
    tensor_split: Sequence[float] | None = None,
    dtype: Any = None,
    *,
    communicator: Communicator | str | None = None,
    ctx: int | None = None,
    progress: bool | None = None,
    cache_dtype: Any = None,
) -> Model:
    """Open a Hugging Face model directory or a .gguf file and place it on ``devices`` split by ``tensor_split``.

    ``dtype``: convert the weights to this float dtype (None: keep each weight as stored: float32, float16,
    bfloat16 or GGUF quantization blocks, where the devices' backend takes that format; see runtime/formats.py).
    Activations are float32 (float64 with ``dtype="float64"``). ``ctx``: KV-cache length in tokens (None: the
    model's maximum, at most 4096). ``cache_dtype``: how attention's key and value caches are stored, "float32",
    "float16" or "bfloat16" (names as ``dtype=`` takes them, "f16", numpy dtypes...), or a ``(k, v)`` pair of
    them, like llama.cpp's ``-ctk``/``-ctv``; None: the compute dtype. A 16-bit cache halves the KV cache's memory;
    attention still reads it into float32 and accumulates in float32. Recurrent states stay in the compute dtype.
    ``progress``: a progress bar on stderr (None: only when stderr is a terminal).
    """
    ckpt = open_checkpoint(path)
    try:
        return Model(ckpt, devices, tensor_split, dtype, communicator, ctx, progress, cache_dtype)
    except BaseException:
        ckpt.close()
        raise


def with_family_defaults(tokenizer: Any, family: ModelFamily) -> Any:
    """The checkpoint's tokenizer, given the family's chat template where the file has none and the family's
    end-of-turn tokens (those in the vocabulary) as ends of generation."""
    if tokenizer is None:
        return None
    if tokenizer.chat_template is None:
        tokenizer.chat_template = family.chat_template
    ends = [i for i in map(tokenizer.token_to_id, family.end_of_turn) if i is not None]
    tokenizer.eos_ids = tuple(dict.fromkeys((*tokenizer.eos_ids, *ends)))
    return tokenizer


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` with the first registered loader that claims it: metadata and tensor index only, no data."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    reg = registry()
    # Third-party loaders are asked first so a plugin can claim files a built-in would also accept.
    builtin = {n for info in reg.plugins if info.builtin for n in info.loaders}
    order = sorted(reg.loaders.values(), key=lambda ld: ld.name in builtin)
    loader = next((ld for ld in order if ld.probe(p)), None)
    if loader is None:
        raise ModelFormatError(
            f"{p}: not a model file tensorweave can open (a Hugging Face directory with config.json, or a .gguf "
            f"file); loaders: {', '.join(reg.loaders)}"
        )
    return loader.open(p, reg.models)


def runtime_config(checkpoint: Checkpoint, dtype: Any = None, ctx: int | None = None) -> Any:
    """The checkpoint's config with the compute dtype and KV-cache length a model runs with (see ``load``)."""
    formats.requested_format(dtype)  # an impossible dtype is refused before anything else
    cfg = checkpoint.config
    dt = formats.compute_dtype(checkpoint, dtype)
    return replace(cfg, ctx=int(ctx or min(cfg.ctx, DEFAULT_CTX)), dtype=dtypes.name(dt))


@contextmanager
def config_errors(checkpoint: Checkpoint) -> Iterator[None]:
    """Errors from tracing a checkpoint's graph, reworded to name the checkpoint."""
    try:
        yield
    except UnsupportedError as e:  # a setting of the checkpoint's config the graph cannot run (rope scaling ...)
        raise UnsupportedError(f"{checkpoint.path}: {e}") from None
    except ShapeError as e:  # a config that is no valid model (heads not in whole KV-head groups ...)
        raise ModelFormatError(f"{checkpoint.path}: the config does not describe a valid model: {e}") from None


def check_weights(checkpoint: Checkpoint, g: Graph) -> None:
    """Every weight ``g`` declares is in the checkpoint's index with its shape, and nothing else is (no data read)."""
    ck, family = checkpoint, checkpoint.family.name
    for name, t in g.weights.items():
        shape = ck.shape(name)
        if shape is None:
            raise ModelFormatError(f"{ck.path}: tensor {name!r} {t.shape} is missing ({family} model)")
        if tuple(shape) != t.shape:
            raise ModelFormatError(f"{ck.describe(name)} has shape {tuple(shape)} but the config implies {t.shape}")
    extra = sorted(set(ck.names()) - set(g.weights))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ModelFormatError(
            f"{ck.path}: tensors {', '.join(map(repr, extra[:3]))}{more} have no place in this "
            f"{family} config (wrong architecture or config?)"
        )


def _progress_bar(total: int, enabled: bool | None, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"loading {what}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None if enabled is None else not enabled,  # None: only when stderr is a terminal
        leave=False,
    )

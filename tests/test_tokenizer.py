"""tensorweave.loaders.tokenizer against real `tokenizers` tokenizers trained here and real GGUF files.

Each vocabulary goes tokenizers -> GGUF file (gguf.GGUFWriter) -> gguf.GGUFReader -> Tokenizer.from_gguf and must
then encode and decode exactly as the tokenizer it came from.
"""

# The samples use look-alike characters (fullwidth comma, Fraktur letters) on purpose: they are what tokenizers
# must get right.
# ruff: noqa: RUF001, RUF003

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from tensorweave.errors import ModelFormatError, TemplateError, TensorweaveError, UnsupportedError
from tensorweave.loaders.tokenizer import (
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    Tokenizer,
    gguf_metadata,
    gguf_vocab_metadata,
    write_gguf_vocab,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Hello, world! Hello again, world. It's a small world, isn't it? We'll see, they're here.",
    "Numbers: 12345 and 67890, 3.14159, 2024-06-01, 100%.",
    "Le café est très bon, naïve façon de parler. Ça va? Élève, garçon, déjà vu.",
    "Größe, Straße, über, schön. Ångström and smörgåsbord.",
    "日本語のテキストです。東京は大きな都市です。今日は良い天気ですね。",
    "中文文本，你好世界。我们在学习分词器。",
    "Привет, мир! Как дела? Хорошо, спасибо.",
    "مرحبا بالعالم. كيف حالك؟",
    "def main():\n    print('hello')\n    return 0\n\n\tindented\ttabs  and   spaces",
    "Emoji time 🙂🙂 🚀 and 👍 thumbs.",
] * 3

SAMPLES = [
    "Hello, world!",
    "The quick brown fox, naïve café, Größe.",
    "日本語のテキスト、中文文本。",
    "emoji 🙂👍🏽 🤖 and a family 👨‍👩‍👧",
    "مرحبا بالعالم — שלום עולם",
    "a  b\n\n\tc   ",
    "   leading spaces",
    " one leading space",
    "digits 1234567890 and 3.14159 and 42",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "don't WON'T I'm they'll",
    "unseen: ẞ ℵ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ ไทย",
    "",
]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- tokenizers trained here ----------------------------------------------------------------------------------


def _train_byte_level(kind: str) -> tokenizers.Tokenizer:
    """A byte-level BPE with the pre-tokenizer GGUF calls `kind`: "gpt2", "qwen2" or "llama-bpe"."""
    tok = tokenizers.Tokenizer(BPE())
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pattern = QWEN2_PATTERN if kind == "qwen2" else LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2
    )
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "llama-bpe":  # Llama 3 looks whole words up before merging
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tok


def _train_sentencepiece() -> tokenizers.Tokenizer:
    """A Llama 2 style tokenizer.json: <unk> <s> </s>, the 256 <0xNN> byte tokens, then learned pieces."""
    trainer_tok = tokenizers.Tokenizer(BPE())
    # SentencePiece never merges across words; splitting at "▁" for training gives the same pieces.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, min_frequency=2))
    learned = json.loads(trainer_tok.to_str())["model"]
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(head)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in learned["merges"]]
    tok = tokenizers.Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    return tok


def _through_gguf(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the vocabulary into a real GGUF file and read its metadata back."""
    writer = gguf.GGUFWriter(path, "llama")
    write_gguf_vocab(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_metadata(gguf.GGUFReader(path))


@pytest.fixture(scope="module", params=["gpt2", "qwen2", "llama-bpe"])
def byte_level(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Tokenizer]:
    original = _train_byte_level(request.param)
    meta = gguf_vocab_metadata(original, "gpt2", bos="<|endoftext|>", eos="<|im_end|>", chat_template=CHATML)
    assert meta["tokenizer.ggml.pre"] == request.param
    back = _through_gguf(meta, tmp_path_factory.mktemp("gguf") / "vocab.gguf")
    return original, Tokenizer.from_gguf(back, source="vocab.gguf")


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Tokenizer]:
    original = _train_sentencepiece()
    meta = gguf_vocab_metadata(original, "llama", bos="<s>", eos="</s>", add_bos=True)
    back = _through_gguf(meta, tmp_path_factory.mktemp("gguf") / "spm.gguf")
    return original, Tokenizer.from_gguf(back, source="spm.gguf")


# --- GGUF round trips -----------------------------------------------------------------------------------------


def test_gguf_metadata_types(tmp_path: Path) -> None:
    meta = {
        "general.name": "tiny",
        "test.u32": 7,
        "test.flag": True,
        "test.ratio": 0.5,
        "test.strings": ["a", "é", "🙂"],
        "test.floats": [1.5, -2.0],
        "test.ints": [1, 2, 3],
        "tokenizer.ggml.bos_token_id": 3,
    }
    back = _through_gguf(meta, tmp_path / "kv.gguf")
    for key, value in meta.items():
        assert back[key] == value and type(back[key]) is type(value), key
    assert not any(key.startswith("GGUF.") for key in back)
    fields = gguf.GGUFReader(tmp_path / "kv.gguf").fields
    assert fields["tokenizer.ggml.bos_token_id"].types == [gguf.GGUFValueType.UINT32]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_gguf_roundtrip(byte_level: tuple[Any, Tokenizer], text: str) -> None:
    original, tok = byte_level
    expected = original.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_special=False) == expected
    assert tok.decode(expected) == original.decode(expected, skip_special_tokens=False) == text
    assert tok.decode(expected, skip_special=True) == original.decode(expected, skip_special_tokens=True)


def test_byte_level_specials(byte_level: tuple[Any, Tokenizer]) -> None:
    original, tok = byte_level
    assert tok.vocab_size == original.get_vocab_size()
    assert tok.bos_id == original.token_to_id("<|endoftext|>")
    assert tok.eos_ids == (original.token_to_id("<|im_end|>"),)
    assert tok.add_bos is False  # byte-level GGUF vocabularies do not add BOS unless they say so
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(ids, skip_special=True) == "user"
    assert tok.id_to_token(tok.vocab_size) is None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_gguf_roundtrip(sentencepiece: tuple[Any, Tokenizer], text: str) -> None:
    original, tok = sentencepiece
    expected = original.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_special=False) == expected
    assert tok.decode(expected) == original.decode(expected, skip_special_tokens=False)
    assert tok.decode(expected, skip_special=True) == original.decode(expected, skip_special_tokens=True)
    assert tok.encode(text) == [tok.bos_id, *expected]  # add_bos_token = true


def test_sentencepiece_byte_fallback(sentencepiece: tuple[Any, Tokenizer]) -> None:
    _, tok = sentencepiece
    ids = tok.encode("ℵ𝔘", add_special=False)
    pieces = [tok.id_to_token(i) for i in ids]
    # ℵ is 3 UTF-8 bytes, 𝔘 is 4; neither is in the corpus, so both must be spelled as byte tokens.
    assert pieces.count("<0xE2>") == 1 and sum(p is not None and p.startswith("<0x") for p in pieces) == 7
    assert tok.decode(ids) == "ℵ𝔘"
    assert tok.token_to_id("<unk>") == 0 and tok.bos_id == 1 and tok.eos_ids == (2,)


def test_sentencepiece_types_and_scores(sentencepiece: tuple[Any, Tokenizer]) -> None:
    original, _ = sentencepiece
    meta = gguf_vocab_metadata(original, "llama")
    types, scores, tokens = (
        meta["tokenizer.ggml.token_type"],
        meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.tokens"],
    )
    assert types[0] == 2 and types[1] == types[2] == 3 and types[3] == types[258] == 6
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    merged = [i for i in range(259, len(tokens)) if types[i] == 1 and len(tokens[i]) > 1]
    # Earlier merges score higher, so SentencePiece applies them first.
    assert scores[merged[0]] > scores[merged[-1]]
    assert meta["tokenizer.ggml.add_space_prefix"] is True


# --- Hugging Face directories ---------------------------------------------------------------------------------


def _hf_dir(tmp_path: Path, config: dict[str, Any] | None, generation: dict[str, Any] | None = None) -> Path:
    _train_byte_level("qwen2").save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_from_hf_dir_chatml(tmp_path: Path) -> None:
    config = {
        "chat_template": CHATML,
        "bos_token": None,
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
    }
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, config, {"eos_token_id": [2, 0]}))
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert (im_end, endoftext) == (2, 0)
    assert tok.bos_id is None and tok.eos_ids == (im_end, endoftext)

    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello 日本"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello 日本<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], add_generation_prompt=False
    )
    assert no_prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.decode(ids) == prompt
    # tojson as transformers has it: no HTML escaping, non-ASCII kept.
    with_tools = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "a<b", "d": "é"}])
    assert '<tools>[{"name": "a<b", "d": "é"}]</tools>' in with_tools


def test_from_hf_dir_template_sources(tmp_path: Path) -> None:
    config = {
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
    }
    root = _hf_dir(tmp_path, config)
    tok = Tokenizer.from_hf_dir(root)
    assert tok.apply_chat_template([]) == "<|endoftext|>D"
    assert tok.add_bos is False  # not stated, and the tokenizer.json post-processor adds nothing
    assert tok.encode("hi") == tok.encode("hi", add_special=False)
    # transformers 5 writes chat_template.jinja; it wins over tokenizer_config.json.
    # It may use what transformers' environment offers: strftime_now, {% generation %}, loop controls.
    (root / "chat_template.jinja").write_text(
        "{{ eos_token }}J{{ strftime_now('%Y') | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert Tokenizer.from_hf_dir(root).apply_chat_template(two) == "<|im_end|>J4a"


def test_from_hf_dir_bos_and_eos_sources(tmp_path: Path) -> None:
    root = _hf_dir(tmp_path, {"add_bos_token": True, "add_eos_token": True}, {"eos_token_id": 1})
    (root / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_hf_dir(root)
    assert tok.bos_id == 0 and tok.eos_ids == (2, 1) and tok.chat_template is None
    assert tok.encode("hi") == [0, *tok.encode("hi", add_special=False), 2]


def test_chat_template_errors(tmp_path: Path) -> None:
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, None))
    with pytest.raises(UnsupportedError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == ""
    with pytest.raises(UnsupportedError, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    tok.chat_template = "{{ messages | length }}"  # a changed template is compiled again
    assert tok.apply_chat_template([{"role": "system", "content": "x"}]) == "1"
    broken = Tokenizer(tok.backend, chat_template="{% for m in messages %}", source="broken")
    with pytest.raises(ModelFormatError, match="does not compile"):
        broken.apply_chat_template([])
    sandboxed = Tokenizer(tok.backend, chat_template="{{ messages.append(1) }}")
    with pytest.raises(TemplateError, match="unsafe"):  # one line of the family, not a jinja2 traceback
        sandboxed.apply_chat_template([])


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    root = _hf_dir(tmp_path, {"eos_token": "<|not_there|>"})
    with pytest.raises(ModelFormatError, match="not_there"):
        Tokenizer.from_hf_dir(root)
    (root / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelFormatError, match=r"tokenizer_config\.json"):
        Tokenizer.from_hf_dir(root)


def test_gguf_llama3_matches_whole_words_first() -> None:
    # "abc" is in the vocabulary but the merges never build it ("b c" comes first and nothing merges "a"+"bc");
    # Llama 3 (pre "llama-bpe") looks whole pieces up before merging, Qwen 2 does not.
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "c", "ab", "bc", "abc"],
        "tokenizer.ggml.merges": ["b c", "a b"],
    }
    assert Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "qwen2"}).encode("abc") == [0, 4]
    assert Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe"}).encode("abc") == [5]


def test_gguf_errors(byte_level: tuple[Any, Tokenizer]) -> None:
    original, _ = byte_level
    meta = gguf_vocab_metadata(original, "gpt2")
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedError, match=r"'tekken'.*llama-bpe.*qwen2"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(ModelFormatError, match="tokens"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.tokens": []})
    with pytest.raises(ModelFormatError, match="merges"):
        Tokenizer.from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ModelFormatError, match="token_type"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ModelFormatError, match="eos_token_id"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.eos_token_id": 10**6})
    llama = gguf_vocab_metadata(_train_sentencepiece(), "llama")
    with pytest.raises(ModelFormatError, match="scores"):
        Tokenizer.from_gguf({**llama, "tokenizer.ggml.scores": [0.0]})
    assert issubclass(UnsupportedError, TensorweaveError) and issubclass(ModelFormatError, ValueError)


def test_writer_refuses_what_gguf_cannot_say() -> None:
    tok = _train_byte_level("gpt2")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(UnsupportedError, match="pre-tokenizer"):
        gguf_vocab_metadata(tok, "gpt2")
    with pytest.raises(UnsupportedError, match="style"):
        gguf_vocab_metadata(tok, "bert")
    lowercase = _train_byte_level("gpt2")
    lowercase.normalizer = normalizers.Lowercase()
    with pytest.raises(UnsupportedError, match="normalizer"):
        gguf_vocab_metadata(lowercase, "gpt2")
    with pytest.raises(ModelFormatError, match="<nope>"):
        gguf_vocab_metadata(_train_byte_level("gpt2"), "gpt2", bos="<nope>")


# --- streaming ------------------------------------------------------------------------------------------------

STREAM_TEXTS = ["日本語のテキスト 🙂👍🏽 café", "unseen ẞ ℵ 𝔘𝔫𝔦 and ไทย!", " x  y\n🦀 ok"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_decode_stream(byte_level: tuple[Any, Tokenizer], sentencepiece: tuple[Any, Tokenizer], text: str) -> None:
    for _, tok in (byte_level, sentencepiece):
        ids = tok.encode(text, add_special=False)
        # The test means something only if single tokens hold parts of characters.
        assert any("\ufffd" in tok.decode([i]) for i in ids)
        stream = tok.decode_stream()
        pieces = [stream.step(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "" in pieces  # held back at least once while a character was incomplete
        assert "".join(pieces) + stream.flush() == tok.decode(ids) == text


def test_decode_stream_flush_and_skip(sentencepiece: tuple[Any, Tokenizer]) -> None:
    _, tok = sentencepiece
    head = tok.encode("ℵ", add_special=False)[:-1]  # a character cut short: nothing until flush
    stream = tok.decode_stream()
    assert all(stream.step(i) == "" for i in head)
    assert stream.flush() == tok.decode(head) == "\ufffd\ufffd"
    ids = [tok.bos_id or 0, *tok.encode("hi there", add_special=False), *tok.eos_ids]
    skipping = tok.decode_stream(skip_special=True)
    assert "".join(skipping.step(i) for i in ids) == tok.decode(ids, skip_special=True) == "hi there"

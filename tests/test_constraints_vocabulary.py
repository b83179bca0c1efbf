"""The byte vocabulary: every token id maps to exactly the bytes decoding it produces."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sglite.constraints import get_vocabulary
from sglite.constraints.vocabulary import detect_kind

TEXTS = [
    '{"name": "Alice", "age": 31}',
    "def f(x):\n\treturn x**2  # square",
    "  two leading spaces and trailing  ",
    "émigré naïve café — ÄÖÜ äöü ß",
    "你好，世界 こんにちは 😀",
    "line1\r\nline2\n\n\n",
]


@pytest.fixture(scope="module")
def bpe_tokenizer(llama_path):
    return AutoTokenizer.from_pretrained(llama_path)


def spelled(vocab, ids: list[int]) -> str:
    return b"".join(vocab.token_bytes[i] for i in ids).decode("utf-8")


def test_kinds_are_detected(bpe_tokenizer, sp_tokenizer):
    assert detect_kind(bpe_tokenizer) == "byte_level"
    assert detect_kind(sp_tokenizer) == "sentencepiece"


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(bpe_tokenizer, text):
    vocab = get_vocabulary(bpe_tokenizer)
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    assert spelled(vocab, ids) == text == bpe_tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sp_tokenizer, text):
    vocab = get_vocabulary(sp_tokenizer)
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    # The normalizer prepends "▁" to the text and the decoder strips it again.
    assert spelled(vocab, ids) == " " + text
    assert sp_tokenizer.decode(ids) == text


def test_sentencepiece_byte_fallback_tokens(sp_tokenizer):
    vocab = get_vocabulary(sp_tokenizer)
    for byte in (0x00, 0x0A, 0x41, 0xC3, 0xFF):
        token_id = sp_tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")
        assert vocab.token_bytes[token_id] == bytes([byte])
    assert vocab.token_bytes[sp_tokenizer.convert_tokens_to_ids("\u2581")] == b" "


@pytest.mark.parametrize("fixture", ["bpe_tokenizer", "sp_tokenizer"])
def test_special_tokens_are_left_out_and_eos_is_separate(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    vocab = get_vocabulary(tokenizer)
    for special in tokenizer.all_special_ids:
        assert vocab.token_bytes[special] is None
    assert vocab.eos_token_ids == {tokenizer.eos_token_id}
    assert vocab.outlines.get_eos_token_id() == tokenizer.eos_token_id
    # Every ordinary token is spelled; bytes_to_ids inverts the table.
    ordinary = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    assert all(vocab.token_bytes[i] for i in ordinary)
    for token_id in ordinary[::97]:
        assert token_id in vocab.bytes_to_ids[vocab.token_bytes[token_id]]


def test_added_non_special_token_is_literal_text(llama_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    tokenizer.add_tokens(["<tool call>", "Ġliteral"])
    vocab = get_vocabulary(tokenizer)
    assert vocab.token_bytes[tokenizer.convert_tokens_to_ids("<tool call>")] == b"<tool call>"
    # An added token's "Ġ" is a literal character, not the byte-level space.
    assert vocab.token_bytes[tokenizer.convert_tokens_to_ids("Ġliteral")] == "Ġliteral".encode()


def test_vocabulary_is_owned_by_its_backend_not_cached_globally(bpe_tokenizer):
    # No module-level cache keyed by id(tokenizer): each backend builds (and keeps) its own.
    assert get_vocabulary(bpe_tokenizer) is not get_vocabulary(bpe_tokenizer)
    # Extra EOS ids make a different vocabulary (they are masked like EOS).
    with_extra = get_vocabulary(bpe_tokenizer, eos_token_ids=[0])
    assert with_extra.eos_token_ids == {0, bpe_tokenizer.eos_token_id}

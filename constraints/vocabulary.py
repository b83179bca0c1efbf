"""Token id -> the exact bytes it adds to the output, built once per tokenizer.

The FSM runs on bytes, so every token's surface form must be turned back into what decoding
it produces:

* byte-level BPE (GPT-2, Llama 3, Qwen): each byte is spelled by one printable character
  (``Ġ`` is the space, ``Ċ`` the newline); invert GPT-2's ``bytes_to_unicode`` table;
* SentencePiece (Llama 2, Mistral): ``▁`` is a space and ``<0xNN>`` byte-fallback tokens are
  the single byte ``NN``;
* added (non-special) tokens are literal text;
* special tokens are left out, so the FSM never allows them; EOS is passed to outlines-core
  separately and is allowed exactly in accepting states.

The outlines-core vocabulary also carries two synthetic tokens: ``START_SENTINEL``, which the
compiler puts before every regex (and steps over to reach the initial state), and
``ACCEPT_SENTINEL``, which it appends and reads "this state accepts" off (see
``compiler.CompiledFSM``). Tokens containing byte ``0xF4`` (the lead byte of
U+100000..U+10FFFF, private-use plane 16) are left out so no real token can spell either.

    >>> from transformers import AutoTokenizer                                  # doctest: +SKIP
    >>> vocab = get_vocabulary(AutoTokenizer.from_pretrained(path))             # doctest: +SKIP
    >>> vocab.token_bytes[vocab.bytes_to_ids[b" the"][0]]                       # doctest: +SKIP
    b' the'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from outlines_core import Vocabulary

from sglite.constraints.errors import ConstraintError

ACCEPT_SENTINEL = "\U0010FFFF"
"""Appended to every compiled regex; its transition marks accepting states."""
ACCEPT_SENTINEL_ID = 0x7FFF_FFF0
"""The synthetic token id spelling ``ACCEPT_SENTINEL`` (beyond any real vocabulary)."""
START_SENTINEL = "\U0010FFFE"
"""Put before every compiled regex; stepping over it gives the initial state."""
START_SENTINEL_ID = 0x7FFF_FFF1
"""The synthetic token id spelling ``START_SENTINEL``."""
_SENTINEL_LEAD = ACCEPT_SENTINEL.encode("utf-8")[0]  # 0xF4, shared by START_SENTINEL

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_PIECE = "\u2581"  # SentencePiece's "▁"


@dataclass(frozen=True, eq=False)
class TokenVocabulary:
    """One tokenizer's byte view, shared by every constraint one backend compiles for it."""

    key: tuple
    """Cache identity: ``(id(tokenizer), name_or_path, len(tokenizer), eos ids)``."""
    kind: str
    """``"byte_level"``, ``"sentencepiece"`` or ``"raw"`` (token text is its UTF-8)."""
    token_bytes: tuple[bytes | None, ...]
    """``token_bytes[i]``: what token ``i`` appends; ``None`` for special and unused ids."""
    eos_token_ids: frozenset[int]
    """Ids that end generation; allowed exactly where the constraint accepts."""
    outlines: Vocabulary = field(repr=False)
    """The outlines-core vocabulary (``token_bytes`` without specials, primary EOS)."""
    bytes_to_ids: dict[bytes, list[int]] = field(repr=False)
    """Inverse of ``token_bytes`` over the tokens constraints may use (several ids may share bytes)."""

    def __len__(self) -> int:
        return len(self.token_bytes)


def vocabulary_key(tokenizer, eos_token_ids: Iterable[int] | None = None) -> tuple:
    """Identity of ``tokenizer``'s vocabulary (plus the EOS ids the caller adds), for cache keys."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    extra = tuple(sorted(set(eos_token_ids or ())))
    return (id(tokenizer), str(name), len(tokenizer), extra)


def get_vocabulary(tokenizer, eos_token_ids: Iterable[int] | None = None) -> TokenVocabulary:
    """The byte vocabulary of a Hugging Face tokenizer (built afresh: the backend that needs it keeps it).

    ``eos_token_ids`` adds stop ids (e.g. a model's ``generation_config.eos_token_id`` list)
    to ``tokenizer.eos_token_id``; all of them act as EOS.
    """
    return _build(tokenizer, vocabulary_key(tokenizer, eos_token_ids), eos_token_ids)


def detect_kind(tokenizer) -> str:
    """How ``tokenizer`` spells bytes in its token strings (see the module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = repr(getattr(backend, "decoder", None)) if backend is not None else ""
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder or "Metaspace" in decoder or _SPACE_PIECE in decoder:
        return "sentencepiece"
    if getattr(tokenizer, "sp_model", None) is not None:
        return "sentencepiece"
    pieces = list(tokenizer.get_vocab())
    byte_level = sum(1 for p in pieces if p.startswith(("Ġ", "Ċ")))
    spaces = sum(1 for p in pieces if p.startswith(_SPACE_PIECE))
    if byte_level > spaces:
        return "byte_level"
    if spaces:
        return "sentencepiece"
    return "raw"


def _build(tokenizer, key: tuple, extra_eos: Iterable[int] | None) -> TokenVocabulary:
    kind = detect_kind(tokenizer)
    size = len(tokenizer)
    special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    eos_ids = {int(i) for i in (extra_eos or ())}
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    table: list[bytes | None] = [None] * size
    for piece, token_id in tokenizer.get_vocab().items():
        if not 0 <= token_id < size or token_id in eos_ids:
            continue
        table[token_id] = _piece_bytes(piece, token_id, kind, special_ids, added)

    bytes_to_ids: dict[bytes, list[int]] = {}
    for token_id, spelled in enumerate(table):
        # Empty spellings would loop the FSM in place; 0xF4 could spell a sentinel.
        if spelled and _SENTINEL_LEAD not in spelled:
            bytes_to_ids.setdefault(spelled, []).append(token_id)
    if not bytes_to_ids:
        raise ConstraintError("the tokenizer has no ordinary tokens to constrain")
    # outlines-core wants exactly one EOS id outside the map; other EOS ids are handled by the mask.
    primary_eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else None
    if primary_eos is None:
        primary_eos = min(eos_ids) if eos_ids else size  # an id no token uses
    outlines_map = dict(bytes_to_ids)
    outlines_map[ACCEPT_SENTINEL.encode("utf-8")] = [ACCEPT_SENTINEL_ID]
    outlines_map[START_SENTINEL.encode("utf-8")] = [START_SENTINEL_ID]
    outlines = Vocabulary(int(primary_eos), outlines_map)
    return TokenVocabulary(
        key=key,
        kind=kind,
        token_bytes=tuple(table),
        eos_token_ids=frozenset(eos_ids),
        outlines=outlines,
        bytes_to_ids=bytes_to_ids,
    )


def _piece_bytes(piece: str, token_id: int, kind: str, special_ids: set[int], added: dict) -> bytes | None:
    if kind == "sentencepiece":
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    if token_id in special_ids:
        return None
    added_token = added.get(token_id)
    if added_token is not None:
        if getattr(added_token, "special", False):
            return None
        # Added tokens are stored as literal text, not in the byte-level alphabet.
        return str(getattr(added_token, "content", piece)).encode("utf-8")
    if kind == "byte_level":
        return _byte_level_bytes(piece)
    if kind == "sentencepiece":
        return piece.replace(_SPACE_PIECE, " ").encode("utf-8")
    return piece.encode("utf-8")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code
    points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _byte_level_bytes(piece: str) -> bytes:
    table = _unicode_to_byte()
    out = bytearray()
    for char in piece:
        code = table.get(char)
        if code is None:
            out += char.encode("utf-8")  # as the ByteLevel decoder does for foreign characters
        else:
            out.append(code)
    return bytes(out)

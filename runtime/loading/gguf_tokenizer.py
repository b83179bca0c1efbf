"""A GGUF file's tokenizer (vocabulary, merges, special tokens, chat template) as a Hugging Face tokenizer.

transformers' GGUF conversion rebuilds the vocabulary, merges, special tokens and chat template; it
does not know every llama.cpp pre-tokenizer. Files whose ``tokenizer.ggml.pre`` is one of
``DIGIT_SPLIT_PRE_TYPES`` (SmolLM, StarCoder, ...) split every digit on its own before the GPT-2
regex; without that, ``"  5"`` becomes ``Ġ Ġ 5`` instead of the ``ĠĠ 5`` the model was trained on.

    >>> save_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf", "out/")     # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sglite.runtime.loading.gguf_metadata import UnsupportedGGUFError, field, open_gguf

if TYPE_CHECKING:
    from sglite.runtime.loading.gguf_file import GGUFFile as GGUFReader

DIGIT_SPLIT_PRE_TYPES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
"""llama.cpp pre-tokenizers that isolate each ``\\p{N}`` character before the GPT-2 split."""


def save_gguf_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, reader: GGUFReader | None = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and the chat template of ``gguf_path`` into ``out_dir``.

    ``reader`` (an open reader of the same file) saves parsing the metadata twice.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    reader = reader if reader is not None else open_gguf(gguf_path)
    byte_level = field(reader, "tokenizer.ggml.model") == "gpt2"
    pre_type = str(field(reader, "tokenizer.ggml.pre", ""))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise UnsupportedGGUFError(f"{gguf_path.name}: its tokenizer cannot be converted: {error}") from error
    if byte_level and pre_type in DIGIT_SPLIT_PRE_TYPES:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    tokenizer.save_pretrained(str(out_dir))

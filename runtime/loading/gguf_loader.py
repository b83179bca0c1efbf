"""GGUF as a model format: a small cached folder with the file's config and tokenizer; the weights stay in the file.

The folder (config, tokenizer, chat template, generation config and ``gguf_source.json`` naming the file)
lives under ``$SGLITE_CACHE`` (default ``~/.cache/sglite``), named by a digest of the file and its path,
so the second start only hashes a few MiB of the file. The weights are never written out: the model is
built from the file itself (:mod:`sglite.runtime.loading.gguf_model`), its quantized blocks memory-mapped.
Folders are written to a temporary directory and renamed into place, so processes preparing the same
file at once never see a half-written folder.

    >>> from sglite.runtime.loading.gguf_loader import gguf_model_dir
    >>> folder = gguf_model_dir("SmolLM2-135M-Instruct.Q4_1.gguf")     # doctest: +SKIP
    >>> sorted(p.name for p in folder.iterdir())                       # doctest: +SKIP
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'gguf_source.json', 'tokenizer.json', ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from sglite.runtime.loading.cache_dir import sglite_cache_dir
from sglite.runtime.loading.gguf_metadata import architecture_of, hf_config_from_gguf, open_gguf
from sglite.runtime.loading.gguf_tokenizer import save_gguf_tokenizer

if TYPE_CHECKING:
    from sglite.runtime.loading.gguf_file import GGUFFile

CONVERTER_VERSION = 3
"""Bumped when the folder's contents change, so stale cached folders are not reused."""
GGUF_SOURCE = "gguf_source.json"
"""The file in a prepared folder that names its GGUF file (``{"path": ..., "size": ...}``)."""
_SAMPLE_BYTES = 1 << 16
_SAMPLES = 64


class GGUFNotFoundError(FileNotFoundError):
    """The path is not a GGUF file, or a directory holds no (or several) ``.gguf`` files."""


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a ``.gguf`` file, or a directory without ``config.json`` that holds ``.gguf`` files."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def find_gguf(path: str | os.PathLike) -> Path:
    """The GGUF file ``path`` names: the file itself, or the single ``.gguf`` inside a directory."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GGUFNotFoundError(f"{path} is not a .gguf file")
        return path.absolute()
    candidates = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise GGUFNotFoundError(
            f"{path}: expected exactly one .gguf file (found {found}); pass the path of the .gguf file itself"
        )
    return candidates[0].absolute()


def gguf_digest(path: str | os.PathLike) -> str:
    """A cheap fingerprint: the size plus ``_SAMPLES`` evenly spaced 64 KiB blocks (head and tail included).

    Reads about 4 MiB whatever the file size, so a 5 GB model's cache hit costs milliseconds.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:{CONVERTER_VERSION}".encode())
    with path.open("rb") as handle:
        last = max(size - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            handle.seek(last * i // (_SAMPLES - 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def write_gguf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write config, generation config, tokenizer and ``gguf_source.json`` of ``gguf_path`` into ``out_dir``.

    Every tensor's name, type and shape is checked first, so a corrupt file leaves nothing behind.
    """
    from transformers import GenerationConfig

    from sglite.runtime.loading.gguf_model import check_tensors
    from sglite.runtime.models import get_model_class

    gguf_path, out = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    architecture_of(reader)
    config = hf_config_from_gguf(reader)
    import torch

    with torch.device("meta"):
        check_tensors(reader, get_model_class(config)(config))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    GenerationConfig(
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    ).save_pretrained(str(out))
    _copy_cached_tokenizer(gguf_path, reader, out)
    (out / GGUF_SOURCE).write_text(json.dumps({"path": str(gguf_path.absolute()), "size": gguf_path.stat().st_size}))
    return out


def tokenizer_digest(reader: GGUFFile) -> str:
    """A fingerprint of a file's ``tokenizer.*`` metadata: files that share it share one converted tokenizer."""
    fields = {key: value for key, value in reader.fields.items() if key.startswith("tokenizer.")}
    return hashlib.sha256(json.dumps([CONVERTER_VERSION, fields], sort_keys=True).encode()).hexdigest()[:16]


def _copy_cached_tokenizer(gguf_path: Path, reader: GGUFFile, out: Path) -> None:
    """Put the tokenizer files into ``out``, converting them once per distinct tokenizer (several quantizations
    of one model, or synthetic files reusing a vocabulary, convert it once: transformers' conversion is slow)."""
    cached = out.parent / f"tokenizer-{tokenizer_digest(reader)}"
    if not (cached / "tokenizer_config.json").is_file():
        tmp = out.parent / f".{cached.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save_gguf_tokenizer(gguf_path, tmp, reader)
            try:
                tmp.rename(cached)
            except OSError:  # another process finished first
                if not (cached / "tokenizer_config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for item in cached.iterdir():
        shutil.copy2(item, out / item.name)


def gguf_source(model_dir: str | os.PathLike) -> Path | None:
    """The GGUF file a folder of :func:`gguf_model_dir` stands for, or None for any other folder."""
    marker = Path(model_dir) / GGUF_SOURCE
    if not marker.is_file():
        return None
    source = Path(json.loads(marker.read_text())["path"])
    if not source.is_file():
        raise GGUFNotFoundError(f"{model_dir} was prepared from {source}, which no longer exists; load the .gguf file itself")
    return source


def transformers_source(model_dir: str | os.PathLike) -> tuple[str, dict]:
    """``(path, from_pretrained kwargs)`` that make transformers load the same model as ``model_dir``: a GGUF's
    folder holds no weights, so transformers reads the file itself (``gguf_file=``), dequantized.

        >>> transformers_source("/models/llama")
        ('/models/llama', {})
    """
    source = gguf_source(model_dir) if Path(model_dir).is_dir() else None
    if source is None:
        return str(model_dir), {}
    return str(source.parent), {"gguf_file": source.name}


def gguf_model_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached folder (config, tokenizer; no weights) for a GGUF file or a directory holding one, written on first use."""
    gguf_path = find_gguf(path)
    cache = Path(cache_dir) if cache_dir is not None else sglite_cache_dir()
    where = hashlib.sha256(str(gguf_path).encode()).hexdigest()[:8]  # the folder points at this path
    target = cache / f"gguf-{gguf_path.stem}-{gguf_digest(gguf_path)}{where}"
    if (target / "config.json").is_file():
        return target
    tmp = cache / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_gguf_folder(gguf_path, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its folder is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

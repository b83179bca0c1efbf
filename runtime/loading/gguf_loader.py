"""GGUF as a model format: convert a ``.gguf`` once into a cached Hugging Face folder, then load that.

The folder (config, safetensors, tokenizer, chat template, generation config) lives under
``$SGLITE_CACHE`` (default ``~/.cache/sglite``), named by a digest of the file, so the second
start only hashes a few MiB of the file. Conversions are written to a temporary directory and
renamed into place, so processes converting the same file at once never see a half-written folder.

    >>> from sglite.runtime.loading.gguf_loader import gguf_model_dir
    >>> folder = gguf_model_dir("SmolLM2-135M-Instruct.Q4_1.gguf")     # doctest: +SKIP
    >>> sorted(p.name for p in folder.iterdir())                       # doctest: +SKIP
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors', ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from sglite.runtime.loading.cache_dir import sglite_cache_dir
from sglite.runtime.loading.gguf_metadata import architecture_of, hf_config_from_gguf, open_gguf
from sglite.runtime.loading.gguf_tensors import hf_tensors
from sglite.runtime.loading.gguf_tokenizer import save_gguf_tokenizer

CONVERTER_VERSION = 2
"""Bumped when the conversion changes, so stale cached folders are not reused."""
SHARD_BYTES = 2 << 30
"""Weights are written in safetensors shards of about this size (peak memory ~ one shard)."""
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


def _write_weights(reader, spec, config, out: Path) -> None:
    """Dequantized tensors as ``model.safetensors`` (or shards plus an index past ``SHARD_BYTES``)."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    shard_bytes = 0
    for name, tensor in hf_tensors(reader, spec, config.num_attention_heads, config.num_key_value_heads):
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            save_file(shards[-1], str(out / f"shard-{len(shards)}.safetensors"))
            shards[-1] = {name: None for name in shards[-1]}  # keep only the names for the index
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    save_file(shards[-1], str(out / f"shard-{len(shards)}.safetensors"))
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        final = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{index}.safetensors").rename(out / final)
        weight_map.update({name: final for name in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Hugging Face folder for ``gguf_path`` into ``out_dir`` (created; must not hold a model)."""
    from transformers import GenerationConfig

    gguf_path, out = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    _, spec = architecture_of(reader)
    config = hf_config_from_gguf(reader)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(reader, spec, config, out)
    config.save_pretrained(str(out))
    GenerationConfig(
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    ).save_pretrained(str(out))
    save_gguf_tokenizer(gguf_path, out, reader)
    return out


def gguf_model_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face folder for a GGUF file (or a directory holding one), converting on first use."""
    gguf_path = find_gguf(path)
    cache = Path(cache_dir) if cache_dir is not None else sglite_cache_dir()
    target = cache / f"gguf-{gguf_path.stem}-{gguf_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    tmp = cache / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        convert_gguf(gguf_path, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its folder is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

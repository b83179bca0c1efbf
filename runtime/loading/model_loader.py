"""Find a checkpoint (local directory or Hugging Face cache) and load it into a native model.

    >>> model, config = load_model("/path/to/Qwen2.5-0.5B-Instruct")          # doctest: +SKIP
    >>> model, config = load_model("Qwen/Qwen2.5-0.5B-Instruct", device="cuda")  # from the HF cache  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from sglite.runtime.dtypes import resolve_dtype  # noqa: F401 - re-exported (the loader's callers import it here)
from sglite.runtime.loading.weight_names import IGNORED_WEIGHT_SUFFIXES, WeightMismatchError  # noqa: F401 - re-exported
from sglite.runtime.models import get_model_class

# What a download fetches: config, weights, tokenizer and chat template; never *.bin/*.pt/*.gguf.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ModelNotFoundError(FileNotFoundError):
    """Neither a local model directory nor a checkpoint in the Hugging Face cache."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (not import time).

    ``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_HUB_OFFLINE`` are huggingface_hub's own contract with the user,
    read where the hub is reached, as huggingface_hub itself does; they are not engine options."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local directory holding ``config.json`` for ``name_or_path``.

    A directory is used as is. For a ``.gguf`` file (or a directory holding one and no config.json) a
    small cached folder with its config and tokenizer is written once (``runtime/loading/gguf_loader.py``)
    and returned; the weights stay in the file.
    Anything else is taken as a hub id and looked up in the local HF cache; only when that misses and
    ``HF_HUB_OFFLINE`` is not set is a download attempted.

        >>> resolve_model_path("/models/llama")                 # doctest: +SKIP
        PosixPath('/models/llama')
    """
    from sglite.runtime.loading.gguf_loader import gguf_model_dir, is_gguf

    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if is_gguf(path):
        return gguf_model_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but has no config.json (nor a .gguf file); "
                "point at a Hugging Face model directory or a GGUF file"
            )
        return path.absolute()
    if path.exists() or _looks_like_local_path(name):
        raise ModelNotFoundError(f"model directory {path} does not exist (or is not a directory)")

    from huggingface_hub import snapshot_download

    cache_dir = hub_cache_dir()
    offline = _env_flag("HF_HUB_OFFLINE")
    hint = (
        f"model {name!r} is not a local directory and is not in the Hugging Face cache at {cache_dir}. "
        f"Pass the path of a directory holding config.json and *.safetensors (e.g. --model /path/to/model), "
        f"or download it first with `huggingface-cli download {name}`"
    )
    try:
        return Path(snapshot_download(repo_id=name, cache_dir=cache_dir, local_files_only=True))
    except (OSError, ValueError) as missing:  # not cached (LocalEntryNotFoundError) or an invalid id
        if offline:
            raise ModelNotFoundError(hint + " (HF_HUB_OFFLINE is set, so nothing was downloaded).") from missing
    try:
        return Path(snapshot_download(repo_id=name, cache_dir=cache_dir, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as failed:  # network, auth, unknown repo: all mean "not available"
        raise ModelNotFoundError(f"{hint}; the download failed: {failed}") from failed


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's ``*.safetensors`` files (the shards named by the index, when there is one)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / shard for shard in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{model_dir}: shards listed in {SAFETENSORS_INDEX} are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(
            f"{model_dir} has no *.safetensors weights (sglite does not load *.bin/*.pt); "
            "re-save the model with save_pretrained(dir, safe_serialization=True)"
        )
    return files


@torch.no_grad()
def load_weights(model: nn.Module, files: list[Path], tied_embeddings: bool) -> None:
    """Copy every tensor of ``files`` into the same-named parameter of ``model``.

    Every parameter must be filled exactly once and every tensor must have a home; the head of a
    tied-embedding model is filled by its embedding (``lm_head.weight`` in the file is ignored).
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())  # deduplicated: a tied head appears as the embedding
    ignored = tuple(getattr(model, "ignored_weight_prefixes", ()))  # checkpoint tensors the model does not use
    unfilled = set(params)
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                if name.endswith(IGNORED_WEIGHT_SUFFIXES) or name.startswith(ignored) or (tied_embeddings and name == "lm_head.weight"):
                    continue
                param = params.get(name)
                if param is None:
                    unexpected.append(name)
                    continue
                tensor = shard.get_tensor(name)
                if tensor.shape != param.shape:
                    raise WeightMismatchError(
                        f"{file.name}: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}"
                    )
                param.copy_(tensor)  # casts to the model dtype and moves to its device
                unfilled.discard(name)
    if unexpected or unfilled:
        parts = []
        if unfilled:
            parts.append(f"missing from the checkpoint: {', '.join(sorted(unfilled)[:8])}")
        if unexpected:
            parts.append(f"not part of the architecture: {', '.join(sorted(unexpected)[:8])}")
        raise WeightMismatchError(
            "checkpoint does not match its config (" + "; ".join(parts) + "). Is config.json from the same model?"
        )


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[nn.Module, PretrainedConfig]:
    """Build the native model for a checkpoint and load its safetensors weights.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. A GGUF file keeps its quantized blocks
    unless ``dtype`` is given (see :mod:`sglite.runtime.loading.gguf_model`). Returns ``(model, hf_config)``;
    the model is in eval mode with gradients off.

        >>> model, config = load_model(build_tiny_model("qwen3"))   # doctest: +SKIP
        >>> model.num_layers, model.num_kv_heads, model.head_dim   # doctest: +SKIP
        (3, 2, 32)
    """
    from sglite.runtime.loading.gguf_loader import gguf_source

    model_dir = resolve_model_path(name_or_path)
    source = gguf_source(model_dir)
    if source is not None:  # the weights stay in the GGUF file
        from sglite.runtime.loading.gguf_model import load_gguf_model

        return load_gguf_model(source, device=device, dtype=dtype)
    device = torch.device(device)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    from sglite.runtime.loading.gptq_awq import load_quantized_checkpoint, quantization_settings

    settings = quantization_settings(config)  # GPTQ/AWQ options checked before anything is allocated
    model_class = get_model_class(config)
    files = weight_files(model_dir)
    if settings is not None:  # 4-bit codes repacked into ggml blocks; never a dense copy
        if device.type != "cpu":
            raise ValueError(f"{settings['method']} checkpoints run on CPU only (the ggml kernels); got device {device}")
        with torch.device("meta"):
            model = model_class(config)
        load_quantized_checkpoint(model, files, settings)
        model.eval().requires_grad_(False)
        return model, config
    # Build on the meta device: no random init, no second copy of the weights in memory.
    with torch.device("meta"):
        model = model_class(config).to(resolve_dtype(dtype, device))
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each tied reference its own storage; share it again
    load_weights(model, files, model.tied_embeddings)
    model.eval().requires_grad_(False)
    return model, config


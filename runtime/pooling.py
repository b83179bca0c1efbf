"""From per-token hidden states to one vector per sequence: sentence-transformers' pooling, read from the folder.

A sentence-transformers folder says how its vectors are made in ``modules.json`` (Transformer, then
Pooling, then optionally Normalize) and ``1_Pooling/config.json`` (which ``pooling_mode_*`` is on);
``sentence_bert_config.json`` caps the input length (``max_seq_length``). A folder without them gets the
caller's default (last-token pooling, normalised: the recipe of decoder embedding models such as
Qwen3-Embedding).

    >>> hidden = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])   # two sequences: 2 tokens, 1 token
    >>> pool(hidden, [2, 1], PoolingConfig("mean", normalize=False)).tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    >>> pool(hidden, [2, 1], PoolingConfig("last")).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_METHODS = ("mean", "cls", "last")

_MODE_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
_UNSUPPORTED_MODE_KEYS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_KNOWN_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling", "sentence_transformers.models.Normalize")


class PoolingConfigError(ValueError):
    """The folder's sentence-transformers modules ask for something this runtime does not implement."""


@dataclass(frozen=True)
class PoolingConfig:
    """How one sequence's hidden states become its embedding."""

    method: str = "last"
    """``mean`` (over the sequence's tokens), ``cls`` (its first token) or ``last`` (its last token)."""
    normalize: bool = True
    """Scale every vector to unit L2 norm (so a dot product is the cosine)."""
    max_seq_length: int | None = None
    """Most tokens one input may have (sentence-transformers' ``max_seq_length``); None: the model's positions."""

    def __post_init__(self) -> None:
        if self.method not in POOLING_METHODS:
            raise PoolingConfigError(f"pooling method must be one of {', '.join(POOLING_METHODS)}, got {self.method!r}")


def read_pooling_config(model_dir: str | Path, default: PoolingConfig) -> PoolingConfig:
    """The pooling a sentence-transformers folder declares, or ``default`` for a folder without ``modules.json``.

    Raises :class:`PoolingConfigError` for modules that would change the vectors and are not implemented
    (a ``Dense`` projection, max pooling ...), rather than serve vectors that differ from the recipe's.
    """
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    max_seq_length = _max_seq_length(model_dir)
    if not modules_file.is_file():
        return PoolingConfig(default.method, default.normalize, max_seq_length or default.max_seq_length)
    modules = json.loads(modules_file.read_text())
    unknown = [m.get("type") for m in modules if m.get("type") not in _KNOWN_MODULES]
    if unknown:
        raise PoolingConfigError(f"{modules_file}: sentence-transformers module(s) {', '.join(map(str, unknown))} are not supported")
    method = default.method
    for module in modules:
        if module["type"].endswith(".Pooling"):
            method = _pooling_method(model_dir / module.get("path", "") / "config.json")
    normalize = any(m["type"].endswith(".Normalize") for m in modules)
    return PoolingConfig(method, normalize, max_seq_length)


def _pooling_method(config_file: Path) -> str:
    config = json.loads(config_file.read_text())
    if not config.get("include_prompt", True):
        raise PoolingConfigError(f"{config_file}: include_prompt=false (instruction-excluded pooling) is not supported")
    on = [key for key in (*_MODE_KEYS, *_UNSUPPORTED_MODE_KEYS) if config.get(key)]
    if len(on) != 1 or on[0] not in _MODE_KEYS:
        raise PoolingConfigError(
            f"{config_file}: pooling modes {on or 'none'} are not supported; one of {', '.join(_MODE_KEYS)} must be on"
        )
    return _MODE_KEYS[on[0]]


def _max_seq_length(model_dir: Path) -> int | None:
    config_file = model_dir / "sentence_bert_config.json"
    if not config_file.is_file():
        return None
    value = json.loads(config_file.read_text()).get("max_seq_length")
    return int(value) if value else None


def pool(hidden: torch.Tensor, seq_lens: list[int], config: PoolingConfig) -> torch.Tensor:
    """float32 ``[N, hidden]``: one vector per sequence of ``hidden`` ``[sum(seq_lens), hidden]``."""
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=hidden.device)
    ends = lens.cumsum(0)
    if config.method == "cls":
        vectors = hidden.index_select(0, ends - lens).float()
    elif config.method == "last":
        vectors = hidden.index_select(0, ends - 1).float()
    else:  # mean: one segment sum, in float32 as sentence-transformers sums
        seq_of_token = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        sums = hidden.new_zeros(len(seq_lens), hidden.shape[1], dtype=torch.float32).index_add_(0, seq_of_token, hidden.float())
        vectors = sums / lens[:, None].to(torch.float32)
    return F.normalize(vectors, dim=-1) if config.normalize else vectors


def truncate_dimensions(vectors: torch.Tensor, dimensions: int, normalize: bool) -> torch.Tensor:
    """The first ``dimensions`` components (Matryoshka truncation), re-normalised when the model normalises.

        >>> truncate_dimensions(torch.tensor([[3.0, 4.0, 12.0]]), 2, normalize=True).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    vectors = vectors[:, :dimensions]
    return F.normalize(vectors, dim=-1) if normalize else vectors.contiguous()

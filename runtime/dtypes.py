"""The dtypes the engine runs in, and the one normaliser every layer (config, loader, estimate) uses."""

from __future__ import annotations

import torch

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Canonical dtype names -> bytes per element."""

DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of ``dtype`` (an alias, a canonical name, ``"torch.float16"`` or a torch dtype).

        >>> dtype_name("bf16"), dtype_name(torch.float16), dtype_name("float32")
        ('bfloat16', 'float16', 'float32')
        >>> dtype_name("int8")
        Traceback (most recent call last):
        ...
        ValueError: unknown dtype 'int8'; use float32, bfloat16 or float16 (or fp32, float, bf16, fp16, half)
    """
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16 (or {', '.join(DTYPE_ALIASES)})")
    return name


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` as a ``torch.dtype`` (same names as :func:`dtype_name`).

        >>> torch_dtype("bf16")
        torch.bfloat16
    """
    return getattr(torch, dtype_name(dtype))


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> float32 on CPU, bfloat16 on CUDA; a name like "bfloat16" -> torch dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)

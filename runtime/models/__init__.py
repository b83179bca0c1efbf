"""Native model implementations over the KV slot pool, and the registry that picks one per config.

    >>> from transformers import AutoConfig
    >>> get_model_class(AutoConfig.for_model("qwen2")).__name__
    'Qwen2ForCausalLM'
"""

from __future__ import annotations

from transformers import PretrainedConfig

from sglite.runtime.models.bert import BertModel
from sglite.runtime.models.layers import LENGTH_DEPENDENT_ROPE_TYPES, rope_parameters_of
from sglite.runtime.models.llama import LlamaForCausalLM
from sglite.runtime.models.qwen2 import Qwen2ForCausalLM
from sglite.runtime.models.qwen3 import Qwen3ForCausalLM


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its features has no native implementation here."""


MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    # Mistral is Llama plus an optional all-layer sliding window, which the shared attention handles.
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}
"""``config.model_type`` -> native causal-LM class."""

ENCODER_REGISTRY: dict[str, type[BertModel]] = {"bert": BertModel}
"""``config.model_type`` -> native encoder-only class (embedding models: no KV cache, no LM head)."""


def is_encoder_config(config: PretrainedConfig) -> bool:
    """True for encoder-only checkpoints (BERT), which serve embeddings and cannot generate.

        >>> from transformers import AutoConfig
        >>> is_encoder_config(AutoConfig.for_model("bert")), is_encoder_config(AutoConfig.for_model("qwen2"))
        (True, False)
    """
    return getattr(config, "model_type", None) in ENCODER_REGISTRY


def supported_model_types() -> list[str]:
    return sorted({*MODEL_REGISTRY, *ENCODER_REGISTRY})


def _unsupported_features(config: PretrainedConfig) -> list[str]:
    """Reasons a config of a supported family still cannot run natively (empty when it can)."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    problems = []
    if getattr(config, "quantization_config", None):
        quant = config.quantization_config
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        if str(method).lower() not in ("gptq", "awq"):  # 4-bit GPTQ/AWQ load through runtime/loading/gptq_awq.py
            problems.append(f"quantized weights ({method}); use an unquantized, GPTQ or AWQ checkpoint")
    rope = rope_parameters_of(config)
    rope_type = rope["rope_type"]
    if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        problems.append(
            f"rope_type {rope_type!r} rescales frequencies with the batch length, which a KV cache cannot follow"
        )
    elif rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        problems.append(f"unknown rope_type {rope_type!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial rotary embeddings (partial_rotary_factor != 1)")
    if getattr(config, "hidden_act", "silu") not in ACT2FN:
        problems.append(f"activation {config.hidden_act!r}")
    return problems


def get_model_class(config: PretrainedConfig) -> type[LlamaForCausalLM] | type[BertModel]:
    """The native class for ``config``; raises :class:`UnsupportedModelError` naming what to change.

        >>> from transformers import AutoConfig
        >>> try:
        ...     get_model_class(AutoConfig.for_model("gpt2"))
        ... except UnsupportedModelError as err:
        ...     print(err)
        model_type 'gpt2' is not supported; supported model types: bert, llama, mistral, qwen2, qwen3
    """
    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_REGISTRY:
        return ENCODER_REGISTRY[model_type]
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )
    problems = _unsupported_features(config)
    if problems:
        raise UnsupportedModelError(f"{model_type} checkpoint uses unsupported features: {'; '.join(problems)}")
    return MODEL_REGISTRY[model_type]


__all__ = [
    "BertModel",
    "ENCODER_REGISTRY",
    "is_encoder_config",
    "MODEL_REGISTRY",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "UnsupportedModelError",
    "get_model_class",
    "supported_model_types",
]

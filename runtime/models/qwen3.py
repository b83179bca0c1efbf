"""Qwen3: the Llama decoder with an RMSNorm over each head of q and k (before RoPE)."""

from __future__ import annotations

from transformers import PretrainedConfig

from sglite.runtime.models.llama import AttentionSpec, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 causal LM over the KV slot pool (see :class:`LlamaForCausalLM`).

    Its explicit ``head_dim`` (which need not be hidden_size / heads) is honoured by the base class.
    """

    @classmethod
    def attention_spec(cls, config: PretrainedConfig) -> AttentionSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionSpec(qkv_bias=bias, o_bias=bias, qk_norm=True)

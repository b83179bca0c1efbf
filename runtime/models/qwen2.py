"""Qwen2: the Llama decoder with a bias on the q/k/v projections (and none on the output)."""

from __future__ import annotations

from transformers import PretrainedConfig

from sglite.runtime.models.llama import AttentionSpec, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 causal LM over the KV slot pool (see :class:`LlamaForCausalLM`)."""

    @classmethod
    def attention_spec(cls, config: PretrainedConfig) -> AttentionSpec:
        # Qwen2 hard-codes the q/k/v bias; its config has no `attention_bias` switch.
        return AttentionSpec(qkv_bias=True, o_bias=False)

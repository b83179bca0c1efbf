"""Llama-style decoder reading and writing the KV slot pool. Also serves Mistral as is, and is
the base of Qwen2 (QKV bias) and Qwen3 (per-head q/k RMSNorm), which only switch an
:class:`AttentionSpec`.

Module and parameter names mirror the Hugging Face checkpoints (``model.layers.0.self_attn.q_proj``
...), so loading is a one-to-one name match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.models.attention import AttentionMetadata, paged_attention
from sglite.runtime.models.decode_attention import DecodeContext, decode_attention
from sglite.runtime.kernels.fused_elementwise import apply_rotary
from sglite.runtime.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, fuse_linears, head_dim_of


@dataclass(frozen=True)
class AttentionSpec:
    """The few switches that separate the Llama, Qwen2 and Qwen3 attention blocks."""

    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2: always; Llama/Qwen3: ``config.attention_bias``)."""
    o_bias: bool = False
    """Bias on the output projection."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""


def sliding_window_of(config: PretrainedConfig, layer_id: int) -> int | None:
    """The attention window of layer ``layer_id``, or None for full causal attention.

    Qwen2/Qwen3 mark windowed layers in ``layer_types`` (and null ``sliding_window`` unless
    ``use_sliding_window``); Mistral applies ``sliding_window`` to every layer.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return window if layer_types[layer_id] == "sliding_attention" else None


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, spec: AttentionSpec) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = head_dim_of(config)
        self.scaling = self.head_dim**-0.5
        self.sliding_window = sliding_window_of(config, layer_id)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (one matmul instead of three per layer). Quantized
        projections stay apart: concatenating them would copy blocks that are views of the file."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if not all(type(p) is nn.Linear for p in projections):
            return
        self.qkv_proj = fuse_linears(projections)
        del self.q_proj, self.k_proj, self.v_proj
        self.q_proj = self.k_proj = self.v_proj = None

    def project(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q`` ``[T, heads, head_dim]``, ``k`` and ``v`` ``[T, kv_heads, head_dim]``; q and k rotated."""
        num_tokens, heads, kv_heads = hidden.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(hidden).view(num_tokens, heads + 2 * kv_heads, self.head_dim)
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        else:
            q = self.q_proj(hidden).view(num_tokens, heads, self.head_dim)
            k = self.k_proj(hidden).view(num_tokens, kv_heads, self.head_dim)
            v = self.v_proj(hidden).view(num_tokens, kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # q and k rotate in one pass over their heads side by side (in a fused qkv output they already are)
        qk = qkv[:, : heads + kv_heads] if self.qkv_proj is not None and self.q_norm is None else torch.cat((q, k), dim=1)
        qk = apply_rotary(qk, cos, sin)
        return qk[:, :heads], qk[:, heads:], v

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        pool: KVSlotPool,
        keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output of every new token, or of the rows ``keep_rows`` only (K/V of all are stored)."""
        q, k, v = self.project(hidden, cos, sin)
        out = paged_attention(q, k, v, pool, self.layer_id, meta, self.scaling, self.sliding_window)
        return self.o_proj(out if keep_rows is None else out.index_select(0, keep_rows))

    def forward_decode(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, cached: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode token per sequence over the pool's cached keys (read only): ``(out, k, v)``; the
        caller writes ``k``/``v`` into the pool."""
        q, k, v = self.project(hidden, cos, sin)
        out = decode_attention(q, k, v, kv[self.layer_id, 0], kv[self.layer_id, 1], cached, self.scaling)
        return self.o_proj(out), k, v


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, spec: AttentionSpec) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, spec)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=getattr(config, "mlp_bias", False)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        pool: KVSlotPool,
        keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of every new token, or of ``keep_rows`` only (their K/V are stored either way)."""
        attn = self.self_attn(self.input_layernorm(hidden), cos, sin, meta, pool, keep_rows)
        return self._add_attention_then_mlp(hidden if keep_rows is None else hidden.index_select(0, keep_rows), attn)

    def forward_decode(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, cached: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` for one decode token per sequence, leaving the pool untouched: ``(hidden, k, v)``."""
        attn, k, v = self.self_attn.forward_decode(self.input_layernorm(hidden), cos, sin, kv, cached)
        return self._add_attention_then_mlp(hidden, attn), k, v

    def _add_attention_then_mlp(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer's two residual branches after attention; unfused adds, in the reference's order, keep
        float32 results bit-comparable."""
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: AttentionSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, spec) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, batch: ForwardBatch, pool: KVSlotPool, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)
        if pool.kv.dtype != hidden.dtype:
            raise ValueError(
                f"KV pool dtype {pool.kv.dtype} != model dtype {hidden.dtype}; build the pool with dtype=model.dtype"
            )
        meta = AttentionMetadata.from_batch(batch, device=hidden.device)
        cos, sin = self.rotary_emb(batch.positions, dtype=hidden.dtype)
        for layer in self.layers[:-1]:
            hidden = layer(hidden, cos, sin, meta, pool)
        # The last layer's output only matters where logits are taken: past its K/V, other rows stop.
        return self.norm(self.layers[-1](hidden, cos, sin, meta, pool, keep_rows))

    def forward_decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, cached: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step that reads the pool and writes nothing: final-norm hidden ``[B, hidden_size]``
        and the new tokens' K/V ``[layers, 2, B, kv_heads, head_dim]`` for the caller to store.

        Free of Python branching on data and of in-place writes to its inputs, so that it can be
        captured whole (``torch.compile``; see :mod:`sglite.runtime.compiled_decode`).
        """
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, dtype=hidden.dtype)
        new_kv = []
        for layer in self.layers:
            hidden, k, v = layer.forward_decode(hidden, cos, sin, kv, cached)
            new_kv.append(torch.stack((k, v)))
        return self.norm(hidden), torch.stack(new_kv)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM whose KV cache is the shared :class:`KVSlotPool`.

        >>> model, config = load_model(path)                       # doctest: +SKIP
        >>> pool = KVSlotPool(256, model.num_layers, model.num_kv_heads, model.head_dim)  # doctest: +SKIP
        >>> hidden = model(batch, pool)          # [T, hidden_size]; K/V written at batch.out_slots  # doctest: +SKIP
        >>> logits = model.compute_logits(hidden[batch.last_token_indices()])  # doctest: +SKIP
    """

    @classmethod
    def attention_spec(cls, config: PretrainedConfig) -> AttentionSpec:
        """Which attention switches this family uses; subclasses override only this."""
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionSpec(qkv_bias=bias, o_bias=bias)

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self.head_dim: int = head_dim_of(config)
        self.vocab_size: int = config.vocab_size
        self.max_position_embeddings: int = config.max_position_embeddings
        self.model = LlamaModel(config, self.attention_spec(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up projections into one matmul each, in every layer (after loading:
        parameter names no longer match the checkpoint's)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def tie_weights(self) -> None:
        """Share the input embedding with the output head when the config says so."""
        if self.tied_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the final norm's: a quantized embedding has no float weight)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(self, batch: ForwardBatch, pool: KVSlotPool, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[T, hidden_size]`` of every new token in ``batch``, or
        ``[len(keep_rows), hidden_size]`` of those rows only (a prefill needs just its last token's:
        the last layer then skips its output projection and MLP for the rest).

        Writes each new token's K (after RoPE) and V into ``pool.kv[layer, 0|1, batch.out_slots]``.
        """
        return self.model(batch, pool, keep_rows)

    def decode_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, cached: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 logits ``[B, vocab_size]`` of one decode token per sequence, and the new K/V
        ``[layers, 2, B, kv_heads, head_dim]`` (not yet in the pool ``kv``)."""
        hidden, new_kv = self.model.forward_decode(input_ids, positions, kv, cached)
        return self.compute_logits(hidden), new_kv

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab_size]`` for hidden rows ``[N, hidden_size]``."""
        return self.lm_head(hidden).float()

"""BERT encoder (absolute positions, token types, bidirectional attention, no KV cache) over packed sequences.

Several sequences run as one forward over their concatenated tokens (``[T, hidden]``): every linear
layer, LayerNorm and the MLP see only real tokens. Attention alone needs a per-sequence view; it runs
over a ``[B, L]`` layout (:class:`PackedLayout`) whose padding the caller keeps small by batching
sequences of similar length (``runtime/embedder.py`` sorts them).

Module and parameter names mirror the Hugging Face ``BertModel`` checkpoint (``embeddings.word_embeddings``,
``encoder.layer.0.attention.self.query`` ...), so loading is a one-to-one name match.

    >>> from transformers import BertConfig
    >>> config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    >>> model = BertModel(config).eval()
    >>> hidden = model(torch.tensor([2, 7, 3, 2, 9]), PackedLayout.of([3, 2]))
    >>> tuple(hidden.shape)
    (5, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from sglite.runtime.models.layers import fuse_linears


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed token sits in a ``[B, L]`` grid (L = longest sequence), and the key mask.

    Built once per forward and shared by every layer.
    """

    seq_lens: tuple[int, ...]
    positions: torch.Tensor
    """``[T]`` int64 position of each token within its sequence (0-based)."""
    grid_index: torch.Tensor | None
    """``[T]`` int64 row of each token in the flattened ``[B * L]`` grid; None when all lengths are equal
    (the packed tokens then *are* the grid)."""
    key_mask: torch.Tensor | None
    """``[B, 1, 1, L]`` bool, True where a key is a real token; None when all lengths are equal."""

    @classmethod
    def of(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> PackedLayout:
        """The layout of sequences of ``seq_lens`` tokens, concatenated in that order.

            >>> layout = PackedLayout.of([3, 1])
            >>> layout.positions.tolist(), layout.grid_index.tolist()
            ([0, 1, 2, 0], [0, 1, 2, 3])
        """
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        starts = lens.cumsum(0) - lens
        seq_of_token = torch.repeat_interleave(torch.arange(len(seq_lens)), lens)
        positions = torch.arange(int(lens.sum())) - starts[seq_of_token]
        longest = int(lens.max())
        if all(n == longest for n in seq_lens):
            return cls(tuple(seq_lens), positions.to(device), None, None)
        grid_index = seq_of_token * longest + positions
        key_mask = (torch.arange(longest)[None, :] < lens[:, None]).view(len(seq_lens), 1, 1, longest)
        return cls(tuple(seq_lens), positions.to(device), grid_index.to(device), key_mask.to(device))

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def longest(self) -> int:
        return max(self.seq_lens)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Bidirectional attention of each sequence's tokens over its own tokens: ``[T, H, D]`` -> ``[T, H * D]``."""
    num_tokens, heads, head_dim = q.shape
    batch, longest = layout.batch_size, layout.longest

    def to_grid(x: torch.Tensor) -> torch.Tensor:
        if layout.grid_index is not None:
            x = x.new_zeros(batch * longest, heads, head_dim).index_copy_(0, layout.grid_index, x)
        return x.view(batch, longest, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(to_grid(q), to_grid(k), to_grid(v), attn_mask=layout.key_mask)
    out = out.transpose(1, 2).reshape(batch * longest, heads * head_dim)
    return out if layout.grid_index is None else out.index_select(0, layout.grid_index)


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        # The reference's order: words + token types, then + positions, then LayerNorm.
        types = self.token_type_embeddings(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        return self.LayerNorm(self.word_embeddings(input_ids) + types + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.qkv: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """One matmul for query/key/value (after loading: names no longer match the checkpoint's)."""
        self.qkv = fuse_linears((self.query, self.key, self.value))
        del self.query, self.key, self.value
        self.query = self.key = self.value = None

    def forward(self, hidden: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        shape = (hidden.shape[0], self.num_heads, self.head_dim)
        if self.qkv is not None:
            q, k, v = self.qkv(hidden).view(hidden.shape[0], 3 * self.num_heads, self.head_dim).split(self.num_heads, dim=1)
        else:
            q, k, v = (proj(hidden).view(shape) for proj in (self.query, self.key, self.value))
        return packed_attention(q, k, v, layout)


class BertSelfOutput(nn.Module):
    """Output projection, residual add, LayerNorm (used after attention and, as ``output``, after the MLP)."""

    def __init__(self, in_features: int, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        return self.output(self.self(hidden, layout), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        attended = self.attention(hidden, layout)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """An encoder-only model: last hidden states of packed sequences, for pooling into embeddings.

    Has no KV cache and no LM head; the ``pooler`` of the checkpoint (a tanh layer over [CLS] for next-sentence
    prediction) is not part of any sentence-transformers recipe and is skipped at load.
    """

    is_encoder = True
    ignored_weight_prefixes = ("pooler.", "embeddings.position_ids")
    """Checkpoint tensors that are not parameters here (the NSP pooler; a buffer of 0..max_positions)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        kind = getattr(config, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"BERT with position_embedding_type {kind!r} is not supported (only 'absolute')")
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.max_position_embeddings: int = config.max_position_embeddings
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    tied_embeddings = False

    def tie_weights(self) -> None:
        """Nothing is tied (no LM head); here for the loader's common contract."""

    def fuse_projections(self) -> None:
        """One query/key/value matmul per layer."""
        for layer in self.encoder.layer:
            layer.attention.self.fuse()

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(
        self, input_ids: torch.Tensor, layout: PackedLayout, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last hidden states ``[T, hidden_size]`` of the concatenated sequences ``input_ids`` ``[T]``."""
        hidden = self.embeddings(input_ids, layout.positions, token_type_ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, layout)
        return hidden

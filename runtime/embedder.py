"""Embedding models: texts or token ids in, one pooled vector per input out, batched without padding waste.

An encoder checkpoint (BERT) or a decoder one (Llama/Qwen families, ``is_embedding=True``) is loaded by
the same :class:`~sglite.runtime.model_runner.ModelRunner` as a generator. Inputs are sorted by length
and cut into forwards of at most ``chunked_prefill_size`` tokens; each forward runs over the
concatenated tokens of its sequences (no padding in any matmul), and only attention sees a per-sequence
grid, whose padding is small because neighbours in length order have similar lengths.

    >>> embedder = Embedder("path/to/all-MiniLM-L6-v2", EngineConfig())   # doctest: +SKIP
    >>> out = embedder.embed(["a cat", "a dog"])                          # doctest: +SKIP
    >>> tuple(out.vectors.shape), out.prompt_tokens                       # doctest: +SKIP
    ((2, 384), [4, 4])
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import torch

from sglite.runtime.config import EngineConfig
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.model_runner import ModelRunner, intra_op_threads
from sglite.runtime.models.bert import PackedLayout
from sglite.runtime.pooling import PoolingConfig, pool, read_pooling_config, truncate_dimensions
from sglite.runtime.prompts import is_text_prompt, prompt_batch

DECODER_DEFAULT_POOLING = PoolingConfig("last", normalize=True)
"""Decoder embedding models (Qwen3-Embedding, e5-mistral ...) take the last token's state, normalised."""
ENCODER_DEFAULT_POOLING = PoolingConfig("cls", normalize=False)
"""An encoder folder without sentence-transformers modules: the [CLS] state, as BERT was trained."""


class EmbeddingInputError(ValueError):
    """An input the embedding model cannot take; ``param`` names the request field to change."""

    def __init__(self, message: str, param: str = "input") -> None:
        super().__init__(message)
        self.param = param


class NotAnEmbeddingModelError(ValueError):
    """An embedding was asked of a generation-only engine."""


class NotAGenerationModelError(ValueError):
    """A generation was asked of an embedding-only engine."""


@dataclass(frozen=True)
class Embeddings:
    """The vectors of one :meth:`Embedder.embed` call, in input order."""

    vectors: torch.Tensor
    """float32 ``[N, dimensions]`` on the CPU."""
    prompt_tokens: list[int]
    """Tokens each input ran as (after truncation)."""


class Embedder:
    """One embedding model: tokenizer, pooling recipe and packed forwards; safe to call from many threads
    (forwards take turns; each call batches its own inputs)."""

    def __init__(self, model_path: str, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.runner = ModelRunner(model_path, config.device, config.dtype, config.quantization, config.num_threads)
        self.hf_config = self.runner.hf_config
        self.model = self.runner.model
        self.is_encoder = bool(getattr(self.model, "is_encoder", False))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        default = ENCODER_DEFAULT_POOLING if self.is_encoder else DECODER_DEFAULT_POOLING
        self.pooling = read_pooling_config(model_path, default)
        positions = self.model.max_position_embeddings
        self.max_input_tokens: int = min(self.pooling.max_seq_length or positions, positions, config.context_length or positions)
        """Most tokens one input may have: longer ones are a 400 unless truncation is asked for."""
        self.dimensions: int = self.hf_config.hidden_size
        self.matryoshka_dimensions: list[int] | None = _matryoshka_dimensions(self.hf_config)
        """Sizes the vectors may be cut to (``dimensions``); None: the model was not trained for truncation."""
        self.max_forward_tokens = max(config.chunked_prefill_size, self.max_input_tokens)
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer's truncation setting is shared state ("Already borrowed")
        self._pool = None  # a decoder's scratch KV pool, grown to the largest forward seen (never for an encoder)

    # ---- inputs ---------------------------------------------------------------------------
    def tokenize(self, inputs: list[str] | list[list[int]], truncate_prompt_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each input, checked: non-empty, known ids, at most the model's maximum (or cut to
        ``truncate_prompt_tokens``, -1 meaning the maximum; text keeps its special tokens, ids their head)."""
        if not inputs:
            raise EmbeddingInputError("input must hold at least one text or token list")
        limit = self.max_input_tokens
        if truncate_prompt_tokens is not None:
            if truncate_prompt_tokens == -1:
                truncate_prompt_tokens = limit
            if not 1 <= truncate_prompt_tokens <= limit:
                raise EmbeddingInputError(
                    f"truncate_prompt_tokens must be -1 or 1..{limit} (this model's maximum input length), "
                    f"got {truncate_prompt_tokens}",
                    param="truncate_prompt_tokens",
                )
        texts = [i for i, item in enumerate(inputs) if is_text_prompt(item)]
        for i, item in enumerate(inputs):
            if len(item) == 0:
                raise EmbeddingInputError(f"input[{i}] is empty; every input needs at least one character or token")
        ids: list[list[int]] = [list(item) if not is_text_prompt(item) else [] for item in inputs]
        if texts:
            with self._tokenizer_lock:
                encoded = self.tokenizer(
                    [inputs[i] for i in texts],
                    add_special_tokens=True,
                    truncation=truncate_prompt_tokens is not None,
                    max_length=truncate_prompt_tokens,
                )["input_ids"]
            for i, tokens in zip(texts, encoded):
                ids[i] = tokens
        vocab = self.model.vocab_size
        for i, tokens in enumerate(ids):
            bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise EmbeddingInputError(f"input[{i}] holds token id {bad!r}, outside this model's vocabulary 0..{vocab - 1}")
            if truncate_prompt_tokens is not None and len(tokens) > truncate_prompt_tokens:
                ids[i] = tokens = tokens[:truncate_prompt_tokens]
            if len(tokens) > limit:
                raise EmbeddingInputError(
                    f"input[{i}] has {len(tokens)} tokens, more than this model's maximum of {limit}; "
                    "shorten it or set truncate_prompt_tokens"
                )
        return ids

    def check_dimensions(self, dimensions: int | None) -> None:
        """Raise :class:`EmbeddingInputError` (param ``dimensions``) unless the vectors may be cut to ``dimensions``."""
        if dimensions is None or dimensions == self.dimensions:
            return
        allowed = self.matryoshka_dimensions
        if allowed is None:
            raise EmbeddingInputError(
                f"this model does not support dimensions={dimensions}: its vectors have {self.dimensions} components "
                "and it was not trained for truncation (no matryoshka_dimensions in its config)",
                param="dimensions",
            )
        if dimensions not in allowed:
            raise EmbeddingInputError(f"dimensions must be one of {allowed}, got {dimensions}", param="dimensions")

    # ---- forwards -------------------------------------------------------------------------
    def encode(
        self,
        prompt: str | list[str] | list[int] | list[list[int]],
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> dict | list[dict]:
        """SGLang's ``Engine.encode`` shape: ``{"embedding": [floats], "meta_info": {"id", "prompt_tokens"}}`` for
        one input (a string or a token-id list), a list of those for a batch."""
        inputs, single = prompt_batch(prompt)
        out = self.embed(inputs, dimensions, truncate_prompt_tokens)
        results = [
            {"embedding": vector, "meta_info": {"id": uuid.uuid4().hex, "prompt_tokens": n}}
            for vector, n in zip(out.vectors.tolist(), out.prompt_tokens)
        ]
        return results[0] if single else results

    def embed(
        self,
        inputs: list[str] | list[list[int]],
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> Embeddings:
        """The pooled vectors of ``inputs`` (texts or token-id lists), in order."""
        self.check_dimensions(dimensions)
        ids = self.tokenize(inputs, truncate_prompt_tokens)
        return Embeddings(self.embed_ids(ids, dimensions), [len(t) for t in ids])

    def embed_ids(self, ids: list[list[int]], dimensions: int | None = None) -> torch.Tensor:
        """float32 ``[len(ids), dimensions]`` for checked token lists (see :meth:`tokenize`)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        vectors = torch.empty(len(ids), self.dimensions, dtype=torch.float32)
        for group in self._forward_groups([len(ids[i]) for i in order]):
            rows = [order[i] for i in group]
            vectors[torch.tensor(rows)] = self._forward([ids[r] for r in rows]).cpu()
        if dimensions is not None and dimensions != self.dimensions:
            vectors = truncate_dimensions(vectors, dimensions, self.pooling.normalize)
        return vectors

    def _forward_groups(self, sorted_lens: list[int]) -> list[list[int]]:
        """Consecutive runs of the length-sorted inputs whose attention grid (count x longest) fits one forward."""
        groups: list[list[int]] = []
        for i, n in enumerate(sorted_lens):
            if groups and (len(groups[-1]) + 1) * n <= self.max_forward_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]]) -> torch.Tensor:
        """Pooled vectors of one packed forward over ``seqs``."""
        device = self.runner.device
        seq_lens = [len(s) for s in seqs]
        input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=device)
        num_tokens = input_ids.numel()
        with self._lock:
            threads = self.runner.threads_for(num_tokens)
            start = time.perf_counter()
            with intra_op_threads(threads):
                if self.is_encoder:
                    hidden = self.model(input_ids, PackedLayout.of(seq_lens, device))
                else:
                    hidden = self._decoder_hidden(input_ids, seq_lens)
                vectors = pool(hidden, seq_lens, self.pooling)
            tuner = self.runner.thread_tuner
            if threads is not None and self.runner.num_threads is None and tuner is not None:
                tuner.record(num_tokens, threads, time.perf_counter() - start)
        return vectors

    def _decoder_hidden(self, input_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Final-norm hidden states of every token: each sequence a fresh causal prefill into a scratch pool."""
        device = input_ids.device
        starts = torch.tensor(seq_lens).cumsum(0) - torch.tensor(seq_lens)
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=torch.cat([torch.arange(n) for n in seq_lens]).to(device),
            out_slots=torch.arange(input_ids.numel(), device=device),
            prefix_lens=[0] * len(seq_lens),
            extend_lens=seq_lens,
            kv_slots=[torch.arange(int(s), int(s) + n, device=device) for s, n in zip(starts, seq_lens)],
        )
        if self._pool is None or self._pool.size < input_ids.numel():
            # sized by use, not by the context length: a 32k-position decoder would otherwise reserve GBs up front
            self._pool = None
            self._pool = self.runner.make_pool(input_ids.numel())
        return self.model(batch, self._pool)


def _matryoshka_dimensions(hf_config: object) -> list[int] | None:
    """The truncation sizes a config declares (``matryoshka_dimensions``, or ``is_matryoshka``: any size)."""
    sizes = getattr(hf_config, "matryoshka_dimensions", None)
    if sizes:
        return sorted(int(s) for s in sizes)
    if getattr(hf_config, "is_matryoshka", False):
        return list(range(1, hf_config.hidden_size + 1))
    return None

"""The request model of SGLang's native ``POST /generate`` (``GenerateReqInput`` in SGLang 0.5.x).

Every field of SGLang's ``GenerateReqInput`` is known, and at its default changes nothing. A field
this server cannot honour (``NATIVE_UNSUPPORTED``) is a 400 naming it at any other value; fields that
only carry metadata (``METADATA_FIELDS``) are accepted at any value. Unknown fields are a 400, types
are strict like the OpenAI models', and the sampling fields are checked by the engine's ``SamplingParams``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sglite.runtime.server.protocol import TokenId, _StrictModel


_MULTIMODAL = "this server runs a text-only model"
_DISAGGREGATION = "prefill/decode disaggregation is not implemented"
_ONE_ENGINE = "this server runs one engine (no data parallelism or engine routing)"

NATIVE_UNSUPPORTED: dict[str, str] = {
    "image_data": _MULTIMODAL,
    "video_data": _MULTIMODAL,
    "audio_data": _MULTIMODAL,
    "mm_hashes": _MULTIMODAL,
    "mm_content_hashes": _MULTIMODAL,
    "use_audio_in_video": _MULTIMODAL,
    "video_config": _MULTIMODAL,
    "need_wait_for_mm_inputs": _MULTIMODAL,
    "num_items_assigned": _MULTIMODAL,
    "encoder_urls": _MULTIMODAL,
    "max_dynamic_patch": _MULTIMODAL,
    "min_dynamic_patch": _MULTIMODAL,
    "image_max_dynamic_patch": _MULTIMODAL,
    "video_max_dynamic_patch": _MULTIMODAL,
    "images_config": _MULTIMODAL,
    "mm_processor_kwargs": _MULTIMODAL,
    "positional_embed_overrides": "positional embedding overrides are not implemented",
    "input_embeds": "give text or input_ids",
    "session_id": "sessions are not implemented; the radix cache reuses shared prefixes without them",
    "session_params": "sessions are not implemented; the radix cache reuses shared prefixes without them",
    "lora_path": "LoRA adapters are not implemented",
    "lora_id": "LoRA adapters are not implemented",
    "custom_logit_processor": "custom logit processors are not loaded by this server",
    "watermark": "watermarking is not implemented",
    "token_ids_logprob": "logprobs of chosen token ids are not implemented; use top_logprobs_num",
    "return_sampling_mask": "sampling masks are not returned by this server",
    "sampling_logprobs_mode": "logprobs are always over the unprocessed logits here",
    "return_flat_raw_top_logprobs": "top logprobs are returned as nested lists only",
    "return_flat_raw_output_top_logprobs": "top logprobs are returned as nested lists only",
    "return_flat_raw_top_logprobs_b64": "top logprobs are returned as nested lists only",
    "return_hidden_states": "hidden states are not returned by this server",
    "return_routed_experts": "this server runs dense models (no experts to report)",
    "routed_experts_start_len": "this server runs dense models (no experts to report)",
    "return_indexer_topk": "sparse-attention indexer outputs are not returned by this server",
    "return_bytes": "token bytes are not returned by /generate; use /v1/completions or /v1/chat/completions logprobs",
    "return_entropy": "entropies are not returned by this server",
    "return_prompt_token_ids": "prompt token ids are not returned by /generate; give input_ids to know them",
    "bootstrap_host": _DISAGGREGATION,
    "bootstrap_port": _DISAGGREGATION,
    "bootstrap_room": _DISAGGREGATION,
    "bootstrap_pair_key": _DISAGGREGATION,
    "decode_tp_size": _DISAGGREGATION,
    "disagg_prefill_dp_rank": _DISAGGREGATION,
    "routed_dp_rank": _ONE_ENGINE,
    "data_parallel_rank": _ONE_ENGINE,
    "http_worker_ipc": "an SGLang-internal field (its multi-tokenizer transport)",
    "background": "background requests are not implemented",
    "require_reasoning": "reasoning control is not implemented",
    "max_thinking_tokens": "thinking budgets are not implemented",
    "priority": "priority scheduling is not implemented (requests are served in arrival or prefix order)",
    "extra_key": "cache namespaces are not implemented: every request shares one radix cache",
    "cache_salt": "cache namespaces are not implemented: every request shares one radix cache",
    "multi_item_delimiter_indices": "multi-item scoring is not implemented",
    "token_indices_to_pool": "pooled scoring is not implemented",
    "kv_hints": "KV placement hints are not implemented",
}
"""SGLang ``/generate`` fields this server cannot honour: accepted at their default (SGLang's clients
send them so), 400 naming the field at any other value."""

METADATA_FIELDS: dict[str, str] = {
    "log_metrics": "metrics are always recorded",
    "modalities": "text is the only modality",
    "no_logs": "request bodies are never logged",
    "custom_labels": "labels of SGLang's per-request metrics; the output is the same",
    "routing_key": "a router's hint; one engine serves every request",
    "conversation_id": "a router's hint; one engine serves every request",
    "external_trace_header": "tracing context; the output is the same",
    "received_time": "the client's timestamp; the output is the same",
}
"""SGLang ``/generate`` fields that only carry metadata: accepted at any value; they change no output."""


class GenerateRequest(_StrictModel):
    """POST /generate, SGLang's native API (``GenerateReqInput``): the engine's own arguments, answered
    with its own dicts. SGLang's sampling fields are checked by the engine's ``SamplingParams``; every
    other field of SGLang's ``GenerateReqInput`` is known (``NATIVE_UNSUPPORTED``, ``METADATA_FIELDS``)."""

    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool | None = False
    logprob_start_len: int | None = Field(-1, ge=-1, le=2**31 - 1)
    top_logprobs_num: int | None = Field(0, ge=0, le=100)
    return_text_in_logprobs: bool = False
    """Each logprob entry's third element is its token's text instead of null."""
    rid: str | list[str] | None = None
    # METADATA_FIELDS
    log_metrics: bool | None = None
    modalities: list[Literal["text"]] | None = None
    no_logs: bool | None = None
    custom_labels: dict[str, str] | None = None
    routing_key: str | None = None
    conversation_id: str | None = None
    external_trace_header: dict[str, Any] | None = None
    received_time: float | None = None
    # NATIVE_UNSUPPORTED: refused unless at SGLang's default
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    mm_hashes: Any = None
    mm_content_hashes: Any = None
    use_audio_in_video: Any = None
    video_config: Any = None
    need_wait_for_mm_inputs: Any = None
    num_items_assigned: Any = None
    encoder_urls: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    image_max_dynamic_patch: Any = None
    video_max_dynamic_patch: Any = None
    images_config: Any = None
    mm_processor_kwargs: Any = None
    positional_embed_overrides: Any = None
    input_embeds: Any = None
    session_id: Any = None
    session_params: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    watermark: Any = None
    token_ids_logprob: Any = None
    return_sampling_mask: Any = None
    sampling_logprobs_mode: Any = None
    return_flat_raw_top_logprobs: Any = None
    return_flat_raw_output_top_logprobs: Any = None
    return_flat_raw_top_logprobs_b64: Any = None
    return_hidden_states: Any = None
    return_routed_experts: Any = None
    routed_experts_start_len: Any = 0
    return_indexer_topk: Any = None
    return_bytes: Any = None
    return_entropy: Any = None
    return_prompt_token_ids: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None
    decode_tp_size: Any = None
    disagg_prefill_dp_rank: Any = None
    routed_dp_rank: Any = None
    data_parallel_rank: Any = None
    http_worker_ipc: Any = None
    background: Any = None
    require_reasoning: Any = None
    max_thinking_tokens: Any = None
    priority: Any = None
    extra_key: Any = None
    cache_salt: Any = None
    multi_item_delimiter_indices: Any = None
    token_indices_to_pool: Any = None
    kv_hints: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> GenerateRequest:
        for name, why in NATIVE_UNSUPPORTED.items():
            if not _at_default(getattr(self, name)):
                raise ValueError(f"'{name}' is not supported: {why}")
        return self


def _at_default(value: Any) -> bool:
    """SGLang's default for a field: None, False, 0, empty, or a per-prompt list of None/False.

        >>> _at_default(None), _at_default([None, None]), _at_default(0), _at_default([0]), _at_default("x")
        (True, True, True, False, False)
    """
    if isinstance(value, list):
        return all(v is None or v is False for v in value)
    return value is None or value is False or (type(value) is int and value == 0) or value in ({}, "")

"""The request model of SGLang's native ``POST /generate`` (``GenerateReqInput`` in SGLang 0.5.x).

Fields are strict like the OpenAI models': unknown ones are a 400, SGLang fields that would change the
output here are a 400 naming the field when set (null is accepted: SGLang's clients send it), and the
sampling fields are checked by the engine's ``SamplingParams``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sglite.runtime.server.protocol import TokenId, _StrictModel


NATIVE_UNSUPPORTED = {
    "image_data": "this server runs a text-only model",
    "video_data": "this server runs a text-only model",
    "audio_data": "this server runs a text-only model",
    "input_embeds": "give text or input_ids",
    "session_id": "sessions are not implemented; the radix cache reuses shared prefixes without them",
    "session_params": "sessions are not implemented; the radix cache reuses shared prefixes without them",
    "lora_path": "LoRA adapters are not implemented",
    "lora_id": "LoRA adapters are not implemented",
    "custom_logit_processor": "custom logit processors are not loaded by this server",
    "token_ids_logprob": "logprobs of chosen token ids are not implemented; use top_logprobs_num",
    "return_hidden_states": "hidden states are not returned by this server",
    "bootstrap_host": "prefill/decode disaggregation is not implemented",
    "bootstrap_port": "prefill/decode disaggregation is not implemented",
    "bootstrap_room": "prefill/decode disaggregation is not implemented",
    "data_parallel_rank": "this server runs one engine (no data parallelism)",
}
"""SGLang ``/generate`` fields that would change the output here: 400 naming the field when set."""


class GenerateRequest(_StrictModel):
    """POST /generate, SGLang's native API (``GenerateReqInput``): the engine's own arguments, answered
    with its own dicts. SGLang's sampling fields are checked by the engine's ``SamplingParams``."""

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
    # SGLang fields with no effect here: metrics are always recorded; text is the only modality.
    log_metrics: bool | None = None
    modalities: list[Literal["text"]] | None = None
    # SGLang fields refused when set (NATIVE_UNSUPPORTED says why).
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    session_id: Any = None
    session_params: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    token_ids_logprob: Any = None
    return_hidden_states: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    data_parallel_rank: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> GenerateRequest:
        for name, why in NATIVE_UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in (None, False, [], {}, "") and not (isinstance(value, list) and all(v is None for v in value)):
                raise ValueError(f"'{name}' is not supported: {why}")
        return self

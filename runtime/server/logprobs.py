"""Engine logprob tuples ``(logprob, token_id, None)`` rendered in OpenAI's two response formats."""

from __future__ import annotations

from collections.abc import Sequence

from sglite.runtime.logprob_text import LogprobEntry, TokenStrings, finite_logprob
from sglite.runtime.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def chat_logprobs(
    strings: TokenStrings, token_logprobs: Sequence[LogprobEntry], top_logprobs: Sequence[Sequence[LogprobEntry]] | None
) -> ChatLogprobs:
    """``choices[i].logprobs`` of a chat completion (or of one streamed chunk)."""
    content = []
    for position, (logprob, token_id, *_) in enumerate(token_logprobs):
        alternatives = top_logprobs[position] if top_logprobs and position < len(top_logprobs) else []
        content.append(
            ChatTokenLogprob(
                token=strings.text(token_id),
                logprob=finite_logprob(logprob),
                bytes=strings.bytes(token_id),
                top_logprobs=[
                    TopLogprob(token=strings.text(alt_id), logprob=finite_logprob(alt_lp), bytes=strings.bytes(alt_id))
                    for alt_lp, alt_id, *_ in alternatives
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    strings: TokenStrings,
    token_logprobs: Sequence[LogprobEntry],
    top_logprobs: Sequence[Sequence[LogprobEntry] | None] | None,
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """The legacy ``/v1/completions`` logprobs object, and the text offset after its last token.

    Each ``top_logprobs`` dict also holds the sampled token, so it has up to ``logprobs + 1``
    entries, as OpenAI documents. A position without a logprob (the first echoed prompt token) is None.
    """
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for position, (logprob, token_id, *_) in enumerate(token_logprobs):
        token = strings.text(token_id)
        result.tokens.append(token)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        if logprob is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(finite_logprob(logprob))
        alternatives = top_logprobs[position] if top_logprobs and position < len(top_logprobs) else None
        top = {strings.text(alt_id): finite_logprob(alt_lp) for alt_lp, alt_id, *_ in alternatives or ()}
        top.setdefault(token, finite_logprob(logprob))
        result.top_logprobs.append(top)
    return result, text_offset

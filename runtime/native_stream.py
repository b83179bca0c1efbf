"""Engine chunks as SGLang's ``/generate`` stream events, shared by the server and ``sgl.Runtime``.

SGLang's events hold *everything so far* in ``text`` and ``output_ids`` (its client slices
``text[pos:]``) and, in ``meta_info``, each logprob entry once, with ``output_token_logprobs_length``
the running count.

    >>> state = StreamState()
    >>> meta = {"completion_tokens": 1, "output_token_logprobs": [(-0.5, 7, None)]}
    >>> state.event({"text": "He", "output_ids": [7], "meta_info": meta})["text"]
    'He'
    >>> meta = {"completion_tokens": 2, "output_token_logprobs": [(-0.1, 8, None)]}
    >>> event = state.event({"text": "llo", "output_ids": [8], "meta_info": meta})
    >>> event["text"], event["output_ids"], event["meta_info"]["output_token_logprobs_length"]
    ('Hello', [7, 8], 2)
"""

from __future__ import annotations

from typing import Any

LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs", "output_top_logprobs")

Chunk = dict[str, Any]


def sglang_meta_info(meta_info: dict[str, Any]) -> dict[str, Any]:
    """The engine's meta_info in SGLang's shape: a length finish also says its length, and logprobs
    come with ``output_token_logprobs_length`` (a stream's running count, else the list's length).

        >>> sglang_meta_info({"completion_tokens": 1, "output_token_logprobs": [(-0.5, 7, None)],
        ...                   "finish_reason": {"type": "length", "matched": None}})["output_token_logprobs_length"]
        1
    """
    reason = meta_info.get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "length" and "length" not in reason:
        meta_info = {**meta_info, "finish_reason": {**reason, "length": meta_info.get("completion_tokens", 0)}}
    if "output_token_logprobs" in meta_info and "output_token_logprobs_length" not in meta_info:
        meta_info = {**meta_info, "output_token_logprobs_length": len(meta_info["output_token_logprobs"])}
    return meta_info


class StreamState:
    """What one streamed request has sent so far: SGLang's events are cumulative in text and ids,
    incremental in logprobs (each entry once, ``output_token_logprobs_length`` the running count).

    With ``incremental`` (SGLang's ``--incremental-streaming-output``) ``text`` and ``output_ids`` hold
    only what is new in each event, so a long generation streams in linear bytes; the client joins them.

        >>> state = StreamState(incremental=True)
        >>> _ = state.event({"text": "He", "output_ids": [7], "meta_info": {}})
        >>> event = state.event({"text": "llo", "output_ids": [8], "meta_info": {}})
        >>> event["text"], event["output_ids"]
        ('llo', [8])
    """

    def __init__(self, incremental: bool = False) -> None:
        self.incremental = incremental
        self.text = ""
        self.output_ids: list[int] = []
        self.sent: dict[str, int] = {key: 0 for key in LOGPROB_KEYS}

    def event(self, chunk: Chunk) -> dict[str, Any]:
        meta = self._meta_info(chunk)
        if self.incremental:
            return {"text": chunk["text"], "output_ids": list(chunk["output_ids"]), "meta_info": meta}
        self.text += chunk["text"]
        self.output_ids.extend(chunk["output_ids"])
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _meta_info(self, chunk: Chunk) -> dict[str, Any]:
        meta = dict(chunk["meta_info"])
        for key in LOGPROB_KEYS:
            if key in meta:
                meta[key] = self._new_entries(key, meta[key], meta)
        if "output_token_logprobs" in meta:
            meta["output_token_logprobs_length"] = self.sent["output_token_logprobs"]
        return sglang_meta_info(meta)

    def _new_entries(self, key: str, entries: list[Any], meta: dict[str, Any]) -> list[Any]:
        """The entries of ``entries`` not sent yet. The engine sends either the whole list so far or only
        the new entries; an output list as long as ``completion_tokens`` is the whole list."""
        total = meta.get("completion_tokens", 0) if key.startswith("output") else None
        sent = self.sent[key]
        cumulative = total is not None and len(entries) == total and sent > 0
        if key.startswith("input"):
            cumulative = sent > 0 and len(entries) == sent  # prompt logprobs arrive whole, in the first event
        new = entries[sent:] if cumulative else entries
        self.sent[key] = sent + len(new)
        return new

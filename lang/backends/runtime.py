"""``sgl.Runtime``: programs run against an in-process ``sglite.Engine``.

    >>> import sglite as sgl
    >>> runtime = sgl.Runtime("path/to/model")          # doctest: +SKIP
    >>> sgl.set_default_backend(runtime)                # then run programs  # doctest: +SKIP
    >>> runtime.shutdown()                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sglite.lang.backends.native import NativeBackend
from sglite.lang.chat_template import ChatTemplate, TokenizerChatTemplate, resolve_chat_template
from sglite.runtime.loading.default_model import MODEL_ENV, default_model_path  # noqa: F401 - re-exported for programs
from sglite.runtime.prompts import is_text_prompt
from sglite.runtime.native_stream import StreamState, sglang_meta_info


class Runtime(NativeBackend):
    """An in-process engine as a program backend.

    ``model_path`` defaults to ``$SGLITE_MODEL``, else the embedded SmolLM2-135M-Instruct. Chat turns are
    rendered with the tokenizer's own chat template unless ``chat_template`` names one
    (``"chatml"``, ``"llama-3"``, ``"qwen"``, ``"mistral"``) or is a ``ChatTemplate``. Other keyword
    arguments are SGLang's server arguments (``mem_fraction_static``, ``context_length``,
    ``chunked_prefill_size``, ``schedule_policy``, ``disable_radix_cache``, ``random_seed``,
    ``log_level``...) or ``sglite.Engine`` options; ``server_args.py`` maps them, and an argument
    this engine cannot honour (``tp_size=2``) raises ``UnsupportedServerArgError`` naming it.

        >>> runtime = sgl.Runtime(model_path=path, mem_fraction_static=0.1, log_level="error")  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        chat_template: str | ChatTemplate | None = None,
        **server_args: Any,
    ) -> None:
        from sglite.lang.backends.server_args import pool_tokens_for_fraction, server_args_to_engine_options
        from sglite.runtime.engine import Engine

        engine_options, runtime_options = server_args_to_engine_options(server_args)
        self.model_path = str(model_path) if model_path is not None else default_model_path()
        tokenizer_path = runtime_options.get("tokenizer_path")
        if tokenizer_path is not None and str(tokenizer_path) != self.model_path:
            from sglite.lang.backends.server_args import UnsupportedServerArgError

            raise UnsupportedServerArgError(
                f"tokenizer_path={tokenizer_path!r}: the tokenizer is loaded from model_path; a separate one is not supported"
            )
        if runtime_options.get("log_level"):
            logging.getLogger("sglite").setLevel(str(runtime_options["log_level"]).upper())
        chat_template = chat_template or runtime_options.get("chat_template")
        self.served_model_name = runtime_options.get("served_model_name") or self.model_path
        fraction = runtime_options.get("mem_fraction_static")
        if fraction is not None and "max_total_tokens" not in engine_options:
            engine_options["max_total_tokens"] = pool_tokens_for_fraction(
                self.model_path, fraction, engine_options.get("dtype"), engine_options.get("device")
            )
        self.engine = Engine(self.model_path, **engine_options)
        if chat_template is None and getattr(self.engine.tokenizer, "chat_template", None):
            self.chat_template: ChatTemplate = TokenizerChatTemplate(self.engine.tokenizer, name=self.model_path)
        else:
            self.chat_template = resolve_chat_template(chat_template, self.model_path)

    def _generate(
        self, prompt, sampling_params, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        return_text_in_logprobs=False,
    ):
        out = self.engine.generate(
            **_prompt_argument(prompt),
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
        )
        outs = [self._sglang_shape(o, return_text_in_logprobs) for o in (out if isinstance(out, list) else [out])]
        return outs if isinstance(out, list) else outs[0]

    def _generate_stream(
        self, prompt, sampling_params, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        return_text_in_logprobs=False,
    ) -> Iterator[dict]:
        chunks = self.engine.generate(
            **_prompt_argument(prompt),
            sampling_params=sampling_params,
            stream=True,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
        )
        state = StreamState()
        try:
            for chunk in chunks:
                event = state.event(chunk)
                yield self._with_texts(event) if return_text_in_logprobs else event
        finally:
            chunks.close()  # a reader that stops early aborts the request now, not at garbage collection

    def _sglang_shape(self, out: dict, texts: bool) -> dict:
        """What SGLang's server answers for one result (the HTTP backend gets the same from ours)."""
        out = {**out, "meta_info": sglang_meta_info(out["meta_info"])}
        return self._with_texts(out) if texts else out

    def _with_texts(self, out: dict) -> dict:
        from sglite.runtime.logprob_text import with_logprob_texts

        return {**out, "meta_info": with_logprob_texts(out["meta_info"], lambda tid: self.engine.tokenizer.decode([tid]))}

    @property
    def endpoint(self) -> Runtime:
        """SGLang's ``Runtime.endpoint`` (its HTTP client); here the runtime itself answers the same calls."""
        return self

    def get_model_name(self) -> str:
        return self.served_model_name

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    def encode(
        self, prompt: str | list[str] | list[int] | list[list[int]], dimensions: int | None = None
    ) -> dict | list[dict]:
        """Embed with the engine's embedding model (an embedding-only ``model_path``, or ``embedding_model=PATH``
        beside a generator): ``{"embedding": [floats], "meta_info": {...}}`` per input, as SGLang's ``/encode``.

            >>> runtime = sgl.Runtime(embedding_model=default_embedding_model_path())   # doctest: +SKIP
            >>> len(runtime.encode("a cat")["embedding"])                                # doctest: +SKIP
            384
        """
        return self.engine.encode(prompt, dimensions)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.engine.config),
            "model_path": self.model_path,
            "context_length": self.engine.context_length,  # the effective one (the option may be None)
            **self.engine.get_stats(),
        }

    def shutdown(self) -> None:
        """Stop the engine (idempotent)."""
        self.engine.shutdown()


def _prompt_argument(prompt: str | list) -> dict[str, Any]:
    """Token-id prompts travel as ``input_ids`` (as in the HTTP protocol), text as ``prompt``."""
    return {"prompt": prompt} if is_text_prompt(prompt) else {"input_ids": prompt}

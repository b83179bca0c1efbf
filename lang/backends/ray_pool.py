"""``sgl.RayPool``: programs whose model calls run on N engine replicas on a Ray cluster.

Programs still run in the caller (the interpreter is cheap); each ``gen``/``select`` call goes to
one replica, chosen by the prompt's prefix, so rows whose programs share a prefix (a few-shot
header, a document) hit the same replica's radix cache. A replica that dies has its calls re-sent
to another one, so ``run_batch`` and ``python -m sglite run --ray`` lose no row to it.

    >>> import sglite as sgl
    >>> pool = sgl.RayPool("path/to/model", replicas=2)                 # doctest: +SKIP
    >>> states = extract.run_batch(rows, backend=pool, progress_bar=True)  # doctest: +SKIP
    >>> pool.get_server_info()["cache_hit_tokens_total"]                # doctest: +SKIP
    >>> pool.shutdown()                                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sglite.lang.backends.native import NativeBackend
from sglite.lang.backends.runtime import _prompt_argument, default_model_path
from sglite.lang.chat_template import ChatTemplate, TokenizerChatTemplate, resolve_chat_template
from sglite.runtime.cluster.errors import ReplicasExhaustedError
from sglite.runtime.cluster.pool import PoolConfig, ReplicaPool, routing_key
from sglite.runtime.cluster.router import RouterConfig


__all__ = ["RayPool", "ReplicasExhaustedError"]


class RayPool(NativeBackend):
    """A program backend over ``replicas`` engines on Ray (a local Ray instance unless ``address`` is given).

    ``router`` is ``"prefix"`` (prefix affinity, load kept within ``max_imbalance`` requests) or
    ``"round_robin"``; ``gpus_per_replica`` defaults to 1 where the cluster has GPUs, else 0 (``pool_config``
    sets everything at once). Other keyword arguments go to each replica's ``sglite.Engine``. The model
    path must be readable on every node that hosts a replica.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        replicas: int = 2,
        address: str | None = None,
        router: str = "prefix",
        gpus_per_replica: float | None = None,
        chat_template: str | ChatTemplate | None = None,
        pool_config: PoolConfig | None = None,
        **engine_options: Any,
    ) -> None:
        self.model_path = str(model_path) if model_path is not None else default_model_path()
        config = pool_config or PoolConfig(replicas=replicas, address=address, gpus_per_replica=gpus_per_replica,
                                           router=RouterConfig(policy=router))
        self.pool = ReplicaPool(self.model_path, config, engine_options)
        tokenizer = self.pool.tokenizer
        if chat_template is None and getattr(tokenizer, "chat_template", None):
            self.chat_template: ChatTemplate = TokenizerChatTemplate(tokenizer, name=self.model_path)
        else:
            self.chat_template = resolve_chat_template(chat_template, self.model_path)

    def _kwargs(self, prompt, sampling_params, return_logprob, logprob_start_len, top_logprobs_num) -> dict[str, Any]:
        return {
            **_prompt_argument(prompt),
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
            "logprob_start_len": logprob_start_len,
            "top_logprobs_num": top_logprobs_num,
        }

    def _generate(
        self, prompt, sampling_params, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        return_text_in_logprobs=False,
    ):
        kwargs = self._kwargs(prompt, sampling_params, return_logprob, logprob_start_len, top_logprobs_num)
        out = self.pool.generate(kwargs, key=routing_key(prompt))
        if not return_text_in_logprobs:
            return out
        return [self._with_texts(o) for o in out] if isinstance(out, list) else self._with_texts(out)

    def _generate_stream(
        self, prompt, sampling_params, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        return_text_in_logprobs=False,
    ) -> Iterator[dict]:
        kwargs = self._kwargs(prompt, sampling_params, return_logprob, logprob_start_len, top_logprobs_num)
        chunks = self.pool.generate_stream(kwargs, key=routing_key(prompt))
        return (self._with_texts(c) for c in chunks) if return_text_in_logprobs else chunks

    def _with_texts(self, out: dict) -> dict:
        from sglite.runtime.logprob_text import with_logprob_texts

        tokenizer = self.pool.tokenizer
        return {**out, "meta_info": with_logprob_texts(out["meta_info"], lambda tid: tokenizer.decode([tid]))}

    def get_tokenizer(self) -> Any:
        return self.pool.tokenizer

    def flush_cache(self) -> bool:
        return all(self.pool.call_all("flush_cache"))

    def get_server_info(self) -> dict[str, Any]:
        """Engine counters summed over replicas, plus ``per_replica`` (each replica's own, None if it died)."""
        return {"model_path": self.model_path, **self.pool.get_stats(), "per_replica": self.pool.replica_stats()}

    def shutdown(self) -> None:
        """Stop the replicas (and the local Ray instance this pool started). Idempotent."""
        self.pool.shutdown()

"""The engine-shaped front of a replica pool, so the HTTP app serves N replicas unchanged.

``create_app`` needs only the part of ``sglite.Engine`` in ``streaming.AsyncEngine`` (``tokenizer``,
``context_length``, ``async_generate``, ``abort``, ``get_stats``, plus ``flush_cache`` and
``shutdown``). ``ReplicatedEngine`` implements it by routing each request to one replica actor
(prefix affinity), so auth, rate limits, streaming, ``/generate`` and ``/metrics`` (counters summed
over replicas) are the single server's code. A replica that dies mid-request ends that request
with a 503 or, mid-stream, an in-band error event; the router skips it until Ray has restarted it.

    >>> pool = ReplicaPool(model, PoolConfig(replicas=2, restart_failed=True))   # doctest: +SKIP
    >>> app = create_app(ReplicatedEngine(pool), ServerConfig(), owns_engine=True)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

from sglite.runtime.cluster.errors import ReplicasExhaustedError
from sglite.runtime.cluster.pool import ReplicaPool, routing_key
from sglite.runtime.engine import EngineShutdownError
from sglite.runtime.server.errors import APIError

STATS_TIMEOUT_S = 2.0
"""A replica that does not report its counters within this long (dead, restarting) is left out of the sum."""


def replica_failed(replica: int, exc: BaseException) -> APIError:
    """The 503 a request gets when its replica died under it (the client may retry at once)."""
    return APIError(503, f"replica {replica} failed during the request ({type(exc).__name__}); retry", code="replica_failed")


class ReplicatedEngine:
    """``async_generate``/``abort``/``get_stats`` over the replicas of ``pool`` (which it owns)."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.tokenizer = pool.tokenizer
        self.context_length = pool.context_length
        self.model_path = pool.model_path
        self.config = pool.engine_config  # what each replica's engine runs with (reported by /get_server_info)
        self._where: dict[str, int] = {}  # rid -> replica, so abort reaches the right engine
        self._lock = threading.Lock()
        self._closed = False

    def generate(self, prompt: Any = None, sampling_params: Any = None, **kwargs: Any) -> dict | list[dict]:
        """``Engine.generate`` (no streaming) on the replica the prompt routes to, from a plain thread."""
        if kwargs.get("stream"):
            raise ValueError("ReplicatedEngine.generate does not stream; use async_generate(stream=True)")
        key = routing_key(prompt if prompt is not None else kwargs.get("input_ids"))
        return self.pool.generate({"prompt": prompt, "sampling_params": sampling_params, **kwargs}, key=key)

    async def async_generate(
        self,
        prompt: Any = None,
        sampling_params: Any = None,
        stream: bool = False,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        input_ids: Any = None,
    ) -> Any:
        """``Engine.async_generate`` on one replica; a stream's first chunk is awaited here, so bad input raises before any byte."""
        from ray.exceptions import RayActorError, RayTaskError

        if self._closed:
            raise EngineShutdownError("the server is shutting down")
        kwargs = {
            "prompt": prompt, "input_ids": input_ids, "sampling_params": sampling_params, "rid": rid,
            "return_logprob": return_logprob, "logprob_start_len": logprob_start_len, "top_logprobs_num": top_logprobs_num,
        }
        try:
            replica = self.pool.choose(routing_key(prompt if prompt is not None else input_ids))
        except ReplicasExhaustedError:
            raise APIError(503, "no replica is available (all are restarting); retry", code="no_replica") from None
        rids = [r for r in ([rid] if isinstance(rid, str) else rid or []) if r]
        self._register(rids, replica)
        actor = self.pool.actors[replica]
        handed_over = False
        try:
            if not stream:
                return await actor.generate.remote(kwargs)
            chunks = actor.generate_stream.options(num_returns="streaming").remote(kwargs)
            first = await _next_chunk(chunks)
            handed_over = True
            return self._stream(chunks, first, replica, rids)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc) from None
        except RayActorError as exc:
            self.pool.mark_dead(replica)
            raise replica_failed(replica, exc) from None
        finally:
            if not handed_over:
                self._unregister(rids)
                self.pool.release(replica)

    async def _stream(self, chunks: Any, first: dict | None, replica: int, rids: list[str]) -> AsyncIterator[dict]:
        from ray.exceptions import RayActorError, RayTaskError

        finished = first is None
        try:
            chunk = first
            while chunk is not None:
                finished = bool(chunk.get("finished"))
                yield chunk
                chunk = await _next_chunk(chunks)
            finished = True
        except RayActorError as exc:
            finished = True  # nothing left to abort: the replica is gone
            self.pool.mark_dead(replica)
            raise replica_failed(replica, exc) from None
        except RayTaskError as exc:
            finished = True
            raise APIError(500, f"the engine failed mid-stream ({type(getattr(exc, 'cause', exc)).__name__})") from None
        finally:
            if not finished:
                for rid in rids:
                    self.pool.actors[replica].abort.remote(rid)
            self._unregister(rids)
            self.pool.release(replica)

    def _register(self, rids: list[str], replica: int) -> None:
        with self._lock:
            for rid in rids:
                self._where[rid] = replica

    def _unregister(self, rids: list[str]) -> None:
        with self._lock:
            for rid in rids:
                self._where.pop(rid, None)

    def abort(self, rid: str) -> None:
        """Abort ``rid`` on the replica running it (unknown or finished ids are ignored)."""
        with self._lock:
            replica = self._where.get(rid)
        if replica is not None and replica < len(self.pool.actors):
            self.pool.actors[replica].abort.remote(rid)

    def get_stats(self) -> dict[str, Any]:
        """Engine counters summed over the replicas that answered within ``STATS_TIMEOUT_S``."""
        return self.pool.get_stats(timeout=STATS_TIMEOUT_S)

    def flush_cache(self) -> bool:
        return all(self.pool.call_all("flush_cache"))

    def check_invariant(self) -> None:
        self.pool.call_all("check_invariant")

    def shutdown(self) -> None:
        """Stop every replica (idempotent)."""
        self._closed = True
        self.pool.shutdown()


async def _next_chunk(chunks: Any) -> dict | None:
    """The next chunk of a Ray streaming generator, or None at its end."""
    try:
        ref = await chunks.__anext__()
    except StopAsyncIteration:
        return None
    return await ref

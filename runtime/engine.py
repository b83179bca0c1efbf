"""The offline engine: tokenizer, scheduler and one background step loop, in SGLang's Engine shape."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from sglite.radix.tree import RadixCache
from sglite.runtime.config import EngineConfig
from sglite.runtime.detokenizer import held_back_len
from sglite.runtime.embedder import Embedder, NotAnEmbeddingModelError
from sglite.runtime.embedding_engine import EmbeddingEngine, is_embedding_only
from sglite.runtime.input_processor import GenerateInput, InputProcessor, eos_token_ids
from sglite.runtime.model_runner import ModelRunner
from sglite.runtime.kernels.openmp_workers import release_idle_workers
from sglite.runtime.request import Request
from sglite.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class EngineShutdownError(RuntimeError):
    """The engine was shut down; it accepts no more requests."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (the others carry on); ``detail`` is the cause, for logs."""

    def __init__(self, rid: str, detail: str) -> None:
        super().__init__(f"request {rid} failed: {detail}")
        self.rid = rid
        self.detail = detail


CALL_POLL_S = 0.5
"""How often a caller waiting on the step loop checks that the loop is still alive."""


class Engine:
    """Generate with continuous batching and a radix prefix cache, in process.

        >>> import sglite
        >>> with sglite.Engine("path/to/model") as engine:  # doctest: +SKIP
        ...     out = engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
        ...     out["text"], out["meta_info"]["cached_tokens"]

    Many threads (or an asyncio loop via ``async_generate``) may call at once; their requests are
    batched together by one background step loop.

    An embedding-only model (an encoder such as BERT, or ``is_embedding=True``) gives an
    :class:`~sglite.runtime.embedding_engine.EmbeddingEngine` instead; ``embedding_model=PATH`` loads one
    beside the generator, for :meth:`encode`.
    """

    is_generation = True

    def __new__(cls, model_path: str | None = None, **options: Any) -> Engine | EmbeddingEngine:
        if cls is Engine and model_path is not None and is_embedding_only(str(model_path), options):
            return EmbeddingEngine(str(model_path), **options)
        return super().__new__(cls)

    def __init__(self, model_path: str, **options: Any) -> None:
        from transformers import AutoTokenizer

        from sglite.runtime.loading.memory import pool_size_for
        from sglite.runtime.loading.model_loader import resolve_model_path

        self.config = EngineConfig.from_options(**options)
        self.model_path = str(resolve_model_path(str(model_path)))
        cfg = self.config
        self.runner = ModelRunner(
            self.model_path,
            cfg.device,
            cfg.dtype,
            cfg.quantization,
            cfg.num_threads,
            enable_torch_compile=cfg.enable_torch_compile,
            torch_compile_max_bs=cfg.torch_compile_max_bs,
            native_kernels=cfg.native_kernels,
            packed_linear=cfg.packed_linear,
            cpu_kernel_level=cfg.cpu_kernel_level,
        )
        self.model_config = self.runner.hf_config
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        max_pos = getattr(self.model_config, "max_position_embeddings", None) or 4096
        self.context_length = min(self.config.context_length or max_pos, max_pos)
        pool_size = pool_size_for(
            self.model_config,
            self.runner.dtype,
            self.runner.device,
            requested=self.config.max_total_tokens,
            context_length=self.context_length,
        )
        self.pool = self.runner.make_pool(pool_size)
        self.tree = RadixCache(self.pool, disable=self.config.disable_radix_cache)
        self.eos_token_ids = eos_token_ids(self.model_path, self.model_config, self.tokenizer)
        self.scheduler = Scheduler(
            lambda batch, rows: self.runner.forward(batch, self.pool, rows),
            self.pool,
            self.tree,
            self.config,
            self.eos_token_ids,
            self.context_length,
        )
        self.inputs = InputProcessor(
            self.tokenizer, self.runner.model.vocab_size, self.context_length, self.pool.size, self.eos_token_ids, self.config
        )
        self._inbox: queue.Queue = queue.Queue()
        self._live_rids: set[str] = set()
        self._live_lock = threading.Lock()
        self._idle = threading.Condition(self._live_lock)  # notified when the last request in flight ends
        self._closed = False
        self._inbox_lock = threading.Lock()
        """Held to put on the inbox and to close it, so nothing is queued after the stop message."""
        self.embedder = Embedder(str(resolve_model_path(cfg.embedding_model)), cfg) if cfg.embedding_model else None
        self._thread = threading.Thread(target=self._loop, name="sglite-engine", daemon=True)
        self._thread.start()

    # ---- public API ---------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt | list[Prompt] | None = None,
        sampling_params: dict | list[dict] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict) or a list of prompts (a list of dicts, in order).

        ``stream=True`` (one prompt) returns an iterator of chunks whose ``text`` and ``output_ids``
        hold what is new since the previous chunk; the last has ``finished=True``.
        """
        reqs, single = self._make_requests(
            GenerateInput(prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid)
        )
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._stream_sync(reqs[0])
        queues = [self._attach_sync(req, stream=False) for req in reqs]
        self._submit_all(reqs)
        try:
            outputs = [_collect(self._drain(q)) for q in queues]
        finally:  # one failed (or the caller was interrupted): nobody will read the rest
            for req in reqs:
                if not req.finished:
                    self._abort_request(req)
        return outputs[0] if single else outputs

    async def async_generate(
        self,
        prompt: Prompt | list[Prompt] | None = None,
        sampling_params: dict | list[dict] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """``generate`` for asyncio callers; constraint compilation runs in a worker thread."""
        reqs, single = await asyncio.to_thread(
            self._make_requests,
            GenerateInput(prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid),
        )
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._stream_async(reqs[0])
        queues = [self._attach_async(req, stream=False) for req in reqs]
        self._submit_all(reqs)
        try:
            outputs = [_collect([await out.get()]) for out in queues]
        finally:  # cancelled (the client left) or one failed: stop the rest
            for req in reqs:
                if not req.finished:
                    self._abort_request(req)
        return outputs[0] if single else outputs

    def encode(
        self,
        prompt: Prompt | list[Prompt],
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> dict | list[dict]:
        """Embed with the ``embedding_model`` loaded beside this generator: ``{"embedding", "meta_info"}`` per
        input (see :meth:`sglite.runtime.embedder.Embedder.encode`). It runs on the calling thread, in
        forwards of at most ``chunked_prefill_size`` tokens, beside (not inside) the step loop."""
        if self.embedder is None:
            raise NotAnEmbeddingModelError(
                f"model {Path(self.model_path).name!r} is a generation model and no embedding model is loaded; "
                "start with --embedding-model PATH (embedding_model=...) or serve an embedding model"
            )
        return self.embedder.encode(prompt, dimensions, truncate_prompt_tokens)

    async def async_encode(
        self, prompt: Prompt | list[Prompt], dimensions: int | None = None, truncate_prompt_tokens: int | None = None
    ) -> dict | list[dict]:
        """``encode`` in a worker thread, so the caller's event loop keeps serving."""
        return await asyncio.to_thread(self.encode, prompt, dimensions, truncate_prompt_tokens)

    def abort(self, rid: str) -> None:
        """End a request early; its KV slots go back to the pool/tree. Unknown ids are ignored."""
        self._put(("abort", rid))

    def _abort_request(self, req: Request) -> None:
        """Abort exactly ``req`` (not whichever request holds its id now)."""
        self._put(("abort_request", req))

    def _put(self, msg: tuple) -> bool:
        """Queue ``msg`` for the step loop; False once the loop is stopping (nothing would read it)."""
        with self._inbox_lock:
            if self._closed:
                return False
            self._inbox.put(msg)
            return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight (every one finished, aborted or failed); False on timeout.

        Deterministic where polling ``get_stats`` is not: an abort queued by a closed stream has been
        handled, and its slots released, when this returns True.
        """
        with self._idle:
            return self._idle.wait_for(lambda: not self._live_rids, timeout=timeout)

    def get_stats(self) -> dict:
        s = self.scheduler
        return {
            **s.stats,
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "pool_size": self.pool.size,
            "pool_free": self.pool.num_free,
            "kv_pool_bytes": self.pool.kv.nbytes,
            "cached_tokens_in_tree": self.tree.total_size,
            "evictable_tokens_in_tree": self.tree.evictable_size,
            "evicted_tokens_total": self.tree.evicted_tokens_total,
        }

    def check_invariant(self) -> None:
        """Raise if free + tree-owned + request-owned slots != pool size (runs on the step loop)."""
        self._call(self.scheduler.check_invariant)

    def flush_cache(self) -> bool:
        """Empty the radix cache; only while idle (running requests hold KV), else return False."""
        flushed: list[bool] = []

        def flush() -> None:
            if not self.scheduler.has_work():
                self.tree.reset()
                flushed.append(True)

        self._call(flush)
        return bool(flushed)

    def _call(self, fn) -> None:
        """Run ``fn`` on the step loop and wait for it; ``EngineShutdownError`` if the loop is (or goes) away."""
        done: queue.Queue = queue.Queue()
        if not self._put(("call", fn, done)):
            raise EngineShutdownError("the engine has been shut down")
        while True:
            try:
                err = done.get(timeout=CALL_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise EngineShutdownError("the engine's step loop has stopped") from None
        if err is not None:
            raise err

    def shutdown(self) -> None:
        """Abort everything still running and stop the step loop. Idempotent."""
        with self._inbox_lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(("stop", None))  # the last message: _put refuses from here on
        self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

    def _make_requests(self, given: GenerateInput) -> tuple[list[Request], bool]:
        if self._closed:
            raise EngineShutdownError("the engine has been shut down")
        return self.inputs.make_requests(given)

    # ---- delivery --------------------------------------------------------------------
    def _submit(self, req: Request) -> None:
        """Queue ``req``; its id must not belong to a request still in flight (abort goes by id)."""
        self._submit_all([req])

    def _submit_all(self, reqs: list[Request]) -> None:
        """Queue every request as one message, or none: the step loop sees a batch whole, so how it is
        scheduled (and which compiled batch sizes it uses) does not depend on how fast the caller queued it.

        The calling thread is about to wait on the step loop, so its idle OpenMP workers are given back first
        (:mod:`~sglite.runtime.kernels.openmp_workers`): kept, they would slow every parallel region of the step loop."""
        if self._closed:
            raise EngineShutdownError("the engine has been shut down")
        release_idle_workers()
        ids = [req.rid for req in reqs]
        with self._live_lock:
            batch: set[str] = set()
            for rid in ids:
                if rid in self._live_rids or rid in batch:
                    raise ValueError(f"rid: {rid!r} is already used by a request in flight")
                batch.add(rid)
            self._live_rids.update(batch)
        for req in reqs:
            req.on_update = self._releasing_id(req.on_update)
        if not self._put(("add", reqs)):
            self._release_ids(ids)
            raise EngineShutdownError("the engine has been shut down")

    def _release_ids(self, ids: list[str]) -> None:
        """Ids no longer in flight; wakes ``wait_idle`` once none is."""
        with self._idle:
            self._live_rids.difference_update(ids)
            if not self._live_rids:
                self._idle.notify_all()

    def _releasing_id(self, deliver):
        """``deliver`` wrapped to release the request's id before its last delivery."""

        def on_update(r: Request, finished: bool) -> None:
            if finished:  # released before delivery: a caller may reuse the id as soon as it has the result
                self._release_ids([r.rid])
            if deliver is not None:
                deliver(r, finished)

        return on_update

    def _drain(self, out: queue.Queue) -> list[dict]:
        """Chunks from ``out`` until the finished one; never waits on a step loop that has died."""
        chunks = []
        while True:
            chunk = self._next_chunk(out)
            chunks.append(chunk)
            if chunk["finished"]:
                return chunks

    def _next_chunk(self, out: queue.Queue) -> dict:
        """The next chunk from ``out``; raises instead of waiting on a step loop that has died."""
        while True:
            try:
                return out.get(timeout=CALL_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise EngineShutdownError("the engine's step loop has stopped") from None

    @staticmethod
    def _make_chunk(req: Request, finished: bool, state: dict) -> dict:
        """Snapshot what is new since the last chunk (runs on the step loop)."""
        visible = req.text if finished else req.text[: len(req.text) - held_back_len(req.text, req.params.stop)]
        text_delta = visible[state["text"] :]
        state["text"] = max(state["text"], len(visible))
        ids_delta = req.output_ids[state["ids"] :]
        state["ids"] = len(req.output_ids)
        # Logprob lists are deltas too: resending them whole each chunk made a stream quadratic.
        meta_info = req.meta_info(logprobs_since=(state["input_lp"], state["output_lp"]))
        state["input_lp"], state["output_lp"] = len(req.input_token_logprobs), len(req.output_token_logprobs)
        return {"text": text_delta, "output_ids": ids_delta, "meta_info": meta_info, "finished": finished}

    def _attach_sync(self, req: Request, stream: bool = True) -> queue.Queue:
        """Chunks of ``req`` arrive on the returned queue; without ``stream`` only the final one
        (holding all text and ids), so a non-streaming request costs no per-token snapshot."""
        out: queue.Queue = queue.Queue()
        state = {"text": 0, "ids": 0, "input_lp": 0, "output_lp": 0}

        def deliver(r: Request, finished: bool) -> None:
            if stream or finished:
                out.put(self._make_chunk(r, finished, state))

        req.on_update = deliver
        return out

    def _stream_sync(self, req: Request) -> Iterator[dict]:
        out = self._attach_sync(req)
        self._submit(req)
        finished = False
        try:
            while not finished:
                chunk = self._next_chunk(out)
                finished = chunk["finished"]
                yield chunk
        finally:
            if not finished:
                self._abort_request(req)

    def _attach_async(self, req: Request, stream: bool = True) -> asyncio.Queue:
        """Like ``_attach_sync``, for an asyncio caller (delivered thread-safely to its loop)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        state = {"text": 0, "ids": 0, "input_lp": 0, "output_lp": 0}

        def deliver(r: Request, finished: bool) -> None:
            if not (stream or finished):
                return
            chunk = self._make_chunk(r, finished, state)
            try:
                loop.call_soon_threadsafe(out.put_nowait, chunk)
            except RuntimeError:  # the caller's loop closed; nobody is listening
                pass

        req.on_update = deliver
        return out

    async def _stream_async(self, req: Request, stream: bool = True) -> AsyncIterator[dict]:
        out = self._attach_async(req, stream)
        self._submit(req)
        finished = False
        try:
            while not finished:
                chunk = await out.get()
                finished = chunk["finished"]
                yield chunk
        finally:
            if not finished:
                self._abort_request(req)

    # ---- the step loop --------------------------------------------------------------------
    def _loop(self) -> None:
        sched = self.scheduler
        stepped = False
        while True:
            try:
                block = not sched.has_work()
                if block and stepped:  # out of work: no idle OpenMP team of ours slows the caller's threads
                    release_idle_workers()
                    stepped = False
                while True:
                    try:
                        msg = self._inbox.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    block = False
                    if msg[0] == "stop":
                        for req in list(sched.running) + list(sched.waiting):
                            sched.abort_request(req, EngineShutdownError("the engine shut down before this request finished"))
                        return
                    self._handle(msg)
                if sched.has_work():
                    sched.step()
                    stepped = True
            except Exception as exc:  # a bug in a step must not hang callers or kill the loop
                logger.exception("engine step failed")
                sched.fail_all(exc)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            for req in msg[1]:
                self.scheduler.add(req)
        elif kind == "abort":
            self.scheduler.abort(msg[1])
        elif kind == "abort_request":
            self.scheduler.abort_request(msg[1])
        elif kind == "call":
            try:
                msg[1]()
                msg[2].put(None)
            except Exception as exc:
                msg[2].put(exc)


def _collect(chunks: list[dict]) -> dict:
    """One result from a request's chunks: text, ids and logprob lists joined (each chunk holds a delta)."""
    last = chunks[-1]
    meta_info = dict(last["meta_info"])
    if "error" in meta_info:
        if meta_info.get("error_type") == EngineShutdownError.__name__:
            raise EngineShutdownError(meta_info["error"])
        raise RequestFailedError(meta_info["id"], meta_info["error"])
    if len(chunks) > 1:
        for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs", "input_top_logprobs"):
            if key in meta_info:
                meta_info[key] = [entry for c in chunks for entry in c["meta_info"].get(key, [])]
    return {
        "text": "".join(c["text"] for c in chunks),
        "output_ids": [t for c in chunks for t in c["output_ids"]],
        "meta_info": meta_info,
    }

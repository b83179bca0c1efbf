"""The offline engine: tokenizer, scheduler and one background step loop, in SGLang's Engine shape."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch

from sglite.radix.tree import RadixCache
from sglite.runtime.config import EngineConfig
from sglite.runtime.detokenizer import IncrementalDecoder, held_back_len
from sglite.runtime.model_runner import ModelRunner
from sglite.runtime.request import Request
from sglite.runtime.sampling_params import SamplingParams
from sglite.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class EngineShutdownError(RuntimeError):
    """The engine was shut down; it accepts no more requests."""


class Engine:
    """Generate with continuous batching and a radix prefix cache, in process.

        >>> import sglite
        >>> with sglite.Engine("path/to/model") as engine:
        ...     out = engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
        ...     out["text"], out["meta_info"]["cached_tokens"]

    Many threads (or an asyncio loop via ``async_generate``) may call at once; their requests are
    batched together by one background step loop.
    """

    def __init__(self, model_path: str, **options: Any) -> None:
        from transformers import AutoTokenizer

        from sglite.runtime.memory import pool_size_for
        from sglite.runtime.model_loader import resolve_model_path

        self.config = EngineConfig.from_options(**options)
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.model_path = str(resolve_model_path(str(model_path)))
        self.runner = ModelRunner(self.model_path, self.config.device, self.config.dtype)
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
        self.eos_token_ids = self._eos_ids()
        self.scheduler = Scheduler(
            lambda batch, rows: self.runner.forward(batch, self.pool, rows),
            self.pool,
            self.tree,
            self.config,
            self.eos_token_ids,
            self.context_length,
        )
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._closed = False
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
            prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid
        )
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._stream_sync(reqs[0])
        queues = [self._attach_sync(req, stream=False) for req in reqs]
        for req in reqs:
            self._submit(req)
        outputs = [_collect(_drain(q)) for q in queues]
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
            prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid,
        )
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._stream_async(reqs[0])
        outputs = await asyncio.gather(*(self._collect_async(req) for req in reqs))
        return outputs[0] if single else list(outputs)

    def abort(self, rid: str) -> None:
        """End a request early; its KV slots go back to the pool/tree. Unknown ids are ignored."""
        self._inbox.put(("abort", rid))

    def get_stats(self) -> dict:
        s = self.scheduler
        return {
            **s.stats,
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "pool_size": self.pool.size,
            "pool_free": self.pool.num_free,
            "cached_tokens_in_tree": self.tree.total_size,
            "evictable_tokens_in_tree": self.tree.evictable_size,
        }

    def check_invariant(self) -> None:
        """Raise if free + tree-owned + request-owned slots != pool size (runs on the step loop)."""
        done: queue.Queue = queue.Queue()
        self._inbox.put(("call", lambda: self.scheduler.check_invariant(), done))
        err = done.get()
        if err is not None:
            raise err

    def flush_cache(self) -> bool:
        """Empty the radix cache; only while idle (running requests hold KV), else return False."""
        done: queue.Queue = queue.Queue()
        flushed: list[bool] = []

        def flush() -> None:
            if not self.scheduler.has_work():
                self.tree.reset()
                flushed.append(True)

        self._inbox.put(("call", flush, done))
        err = done.get()
        if err is not None:
            raise err
        return bool(flushed)

    def shutdown(self) -> None:
        """Abort everything still running and stop the step loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop", None))
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

    # ---- request construction (caller's thread) ------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model_config, getattr(self.runner.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        try:
            from transformers import GenerationConfig

            value = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            ids.update([value] if isinstance(value, int) else (value or []))
        except (OSError, ValueError):
            pass
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _make_requests(
        self, prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid
    ) -> tuple[list[Request], bool]:
        if self._closed:
            raise EngineShutdownError("the engine has been shut down")
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        source = prompt if prompt is not None else input_ids
        single = isinstance(source, str) or (
            isinstance(source, list) and (not source or isinstance(source[0], int))
        )
        prompts = [source] if single else list(source)
        if not prompts:
            raise ValueError("prompt: the list of prompts is empty")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts; give one dict or one per prompt"
                )
            params_list = sampling_params
        else:
            params_list = [sampling_params] * len(prompts)
        rids = [rid] if isinstance(rid, str) else (rid or [None] * len(prompts))
        return [
            self._make_request(p, sp, return_logprob, logprob_start_len, top_logprobs_num, r)
            for p, sp, r in zip(prompts, params_list, rids)
        ], single

    def _make_request(self, prompt, params, return_logprob, logprob_start_len, top_logprobs_num, rid) -> Request:
        sp = SamplingParams.from_dict(dict(params) if isinstance(params, dict) else params)
        if return_logprob:
            sp.return_logprob = True
        if top_logprobs_num:
            sp.top_logprobs_num = int(top_logprobs_num)
            sp.validate()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.runner.model.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"prompt is {len(ids)} tokens, over the context length of {self.context_length} "
                "(prompt plus at least one generated token must fit)"
            )
        if len(ids) + 1 > self.pool.size:
            raise ValueError(f"prompt is {len(ids)} tokens but the KV pool holds only {self.pool.size}; raise max_total_tokens")
        if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be an int >= -1, got {logprob_start_len!r}")
        processor = None
        if sp.has_constraint:
            from sglite.constraints import build_logits_processor

            processor = build_logits_processor(
                self.tokenizer,
                self.runner.model.vocab_size,
                regex=sp.regex,
                json_schema=sp.json_schema,
                choices=sp.choices,
                jump_forward=self.config.jump_forward,
                eos_token_ids=self.eos_token_ids,
            )
        generator = torch.Generator()
        generator.manual_seed(sp.seed if sp.seed is not None else self.config.random_seed * 1_000_003 + next(self._ids))
        return Request(
            rid=rid or uuid.uuid4().hex,
            prompt_ids=ids,
            params=sp,
            decoder=IncrementalDecoder(self.tokenizer, sp.skip_special_tokens, ids),
            processor=processor,
            logprob_start_len=logprob_start_len if (sp.return_logprob and logprob_start_len >= 0) else -1,
            generator=generator,
        )

    # ---- delivery --------------------------------------------------------------------
    def _submit(self, req: Request) -> None:
        if self._closed:
            raise EngineShutdownError("the engine has been shut down")
        self._inbox.put(("add", req))

    @staticmethod
    def _make_chunk(req: Request, finished: bool, state: dict) -> dict:
        """Snapshot what is new since the last chunk (runs on the step loop)."""
        visible = req.text if finished else req.text[: len(req.text) - held_back_len(req.text, req.params.stop)]
        text_delta = visible[state["text"] :]
        state["text"] = max(state["text"], len(visible))
        ids_delta = req.output_ids[state["ids"] :]
        state["ids"] = len(req.output_ids)
        return {"text": text_delta, "output_ids": ids_delta, "meta_info": req.meta_info(), "finished": finished}

    def _attach_sync(self, req: Request, stream: bool = True) -> queue.Queue:
        """Chunks of ``req`` arrive on the returned queue; without ``stream`` only the final one
        (holding all text and ids), so a non-streaming request costs no per-token snapshot."""
        out: queue.Queue = queue.Queue()
        state = {"text": 0, "ids": 0}

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
                chunk = out.get()
                finished = chunk["finished"]
                yield chunk
        finally:
            if not finished:
                self.abort(req.rid)

    def _attach_async(self, req: Request, stream: bool = True) -> asyncio.Queue:
        """Like ``_attach_sync``, for an asyncio caller (delivered thread-safely to its loop)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        state = {"text": 0, "ids": 0}

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
                self.abort(req.rid)

    async def _collect_async(self, req: Request) -> dict:
        chunks = []
        async for chunk in self._stream_async(req, stream=False):
            chunks.append(chunk)
        return _collect(chunks)

    # ---- the step loop --------------------------------------------------------------------
    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            try:
                block = not sched.has_work()
                while True:
                    try:
                        msg = self._inbox.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    block = False
                    if msg[0] == "stop":
                        for req in list(sched.running) + list(sched.waiting):
                            sched.abort(req.rid)
                        return
                    self._handle(msg)
                if sched.has_work():
                    sched.step()
            except Exception as exc:  # a bug in a step must not hang callers or kill the loop
                logger.exception("engine step failed")
                sched.fail_all(exc)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            self.scheduler.add(msg[1])
        elif kind == "abort":
            self.scheduler.abort(msg[1])
        elif kind == "call":
            try:
                msg[1]()
                msg[2].put(None)
            except Exception as exc:
                msg[2].put(exc)


def _drain(out: queue.Queue) -> list[dict]:
    chunks = []
    while True:
        chunk = out.get()
        chunks.append(chunk)
        if chunk["finished"]:
            return chunks


def _collect(chunks: list[dict]) -> dict:
    last = chunks[-1]
    if "error" in last["meta_info"]:
        raise RuntimeError(f"request {last['meta_info']['id']} failed: {last['meta_info']['error']}")
    return {
        "text": "".join(c["text"] for c in chunks),
        "output_ids": [t for c in chunks for t in c["output_ids"]],
        "meta_info": last["meta_info"],
    }

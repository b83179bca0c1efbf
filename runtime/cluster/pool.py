"""N engine replicas as Ray actors, and a routed call to one of them.

``ReplicaPool`` places one ``EngineReplica`` per Ray actor (one GPU each where the cluster has
GPUs, else ``cpus_per_replica`` CPUs), asks its router which replica a prompt goes to, and turns
an actor's death into either a retry on another replica (batch jobs: the call is stateless, the
caller never sees the failure) or ``ReplicaFailedError`` (serving: the client gets a clean error
while Ray restarts the replica).

    >>> pool = ReplicaPool("path/to/model", PoolConfig(replicas=2))        # doctest: +SKIP
    >>> pool.generate({"prompt": "Hi", "sampling_params": {"max_new_tokens": 4}}, key="Hi")  # doctest: +SKIP
    >>> pool.shutdown()                                                    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sglite.runtime.cluster.errors import ReplicaFailedError, ReplicasExhaustedError, ReplicaStartTimeoutError
from sglite.runtime.cluster.replica import EngineReplica
from sglite.runtime.cluster.router import Router, RouterConfig, RouterError, make_router
from sglite.runtime.config import EngineConfig

logger = logging.getLogger(__name__)

LOCAL_SYSTEM_CONFIG = {"memory_monitor_refresh_ms": 0}
"""A local instance shares its machine: Ray's memory monitor would kill replicas for other programs' memory use
(the kernel's OOM killer still guards the machine)."""

LOCAL_OBJECT_STORE_BYTES = 150 * 1024**2
"""Object store of a Ray instance the pool starts itself: prompts and outputs are small."""


@dataclass(frozen=True)
class PoolConfig:
    """Where replicas run and how calls are routed and retried."""

    replicas: int = 2
    """Engine replicas (Ray actors)."""
    address: str | None = None
    """Ray cluster to join (``auto``, ``ray://host:10001`` or ``host:6379``); None starts a local Ray instance."""
    gpus_per_replica: float | None = None
    """GPUs each replica reserves; None: 1 where the cluster has GPUs, else 0 (CPU engines). 0.5 puts two on a GPU."""
    cpus_per_replica: float = 1.0
    """CPUs each replica reserves (on a CPU-only cluster this bounds replicas per node)."""
    local_num_cpus: int | None = None
    """CPUs a locally started Ray instance advertises (None: the machine's)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Prefix affinity or round-robin."""
    restart_failed: bool = False
    """Ray restarts a dead replica (serving); False: a dead replica is dropped and its calls go elsewhere (batch)."""
    max_call_retries: int = 3
    """Times one call is re-sent to another replica after its replica died (without ``restart_failed``)."""
    start_timeout_s: float = 900.0
    """Seconds the replicas may take to be placed and load the model before the pool gives up (and stops them)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")


def routing_key(prompt: Any) -> str:
    """The text a router matches prefixes on: the prompt, the first of a list, token ids as characters."""
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, (str, list)):
            return routing_key(first)
        return "".join(chr(0x10000 + int(t) % 0xF0000) for t in prompt)  # one character per token, no surrogates
    return prompt if isinstance(prompt, str) else ""


def ensure_ray(config: PoolConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it (so the pool shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=config.local_num_cpus,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=False,
            _system_config=LOCAL_SYSTEM_CONFIG,
        )
    return True


class ReplicaPool:
    """Engine replicas on Ray behind one router; thread-safe."""

    def __init__(self, model_path: str, config: PoolConfig | None = None, engine_options: dict[str, Any] | None = None) -> None:
        import ray

        self.config = config or PoolConfig()
        self.model_path = str(model_path)
        EngineConfig.from_options(**(engine_options or {}))  # bad options fail before Ray or any replica starts
        self.owns_ray = ensure_ray(self.config)
        gpus = self.config.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        options = dict(engine_options or {})
        if gpus == 0 and "num_threads" not in options:
            options["num_threads"] = max(1, int(self.config.cpus_per_replica))  # replicas must not oversubscribe cores
        self.engine_config = EngineConfig.from_options(**options)
        actor_class = ray.remote(EngineReplica).options(
            num_cpus=self.config.cpus_per_replica,
            num_gpus=gpus,
            max_concurrency=256,  # concurrent calls share the replica's batch
            max_restarts=-1 if self.config.restart_failed else 0,
        )
        self.actors = [actor_class.remote(self.model_path, options) for _ in range(self.config.replicas)]
        try:
            self.infos = ray.get([a.ready.remote() for a in self.actors], timeout=self.config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise ReplicaStartTimeoutError(
                f"{self.config.replicas} replica(s) were not ready within {self.config.start_timeout_s:.0f} s: the cluster "
                f"lacks the CPUs/GPUs they reserve ({self.config.cpus_per_replica} CPU, {gpus} GPU each) or memory"
            ) from None
        except ray.exceptions.RayError as exc:
            self.shutdown()  # no replica, and no Ray instance this pool started, outlives a failed start
            raise _cause(exc) from None
        self.router: Router = make_router(self.config.replicas, self.config.router)
        self._lock = threading.Lock()
        self.dead: set[int] = set()
        self.restarting: set[int] = set()
        self.retried_calls = 0
        self.calls_per_replica = [0] * self.config.replicas
        self._tokenizer: Any = None

    def use_router(self, config: RouterConfig) -> None:
        """Route with ``config`` from now on (forgets which prefixes went where; call while idle)."""
        with self._lock:
            router = make_router(len(self.actors), config)
            for replica in self.dead | self.restarting:
                router.remove(replica)
            self.router = router

    @property
    def tokenizer(self) -> Any:
        import ray

        if self._tokenizer is None:
            self._tokenizer = ray.get(self.actors[self._any_live()].tokenizer.remote())
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return int(self.infos[0]["context_length"])

    def _any_live(self) -> int:
        with self._lock:
            for i in range(len(self.actors)):
                if i not in self.dead:
                    return i
        raise ReplicasExhaustedError("every replica has died")

    def choose(self, key: str) -> int:
        """Route ``key`` (counted in flight until ``release``)."""
        with self._lock:
            try:
                replica = self.router.choose(key)
            except RouterError as exc:
                raise ReplicasExhaustedError(str(exc)) from None
            self.calls_per_replica[replica] += 1
            return replica

    def release(self, replica: int) -> None:
        with self._lock:
            self.router.done(replica)

    def mark_dead(self, replica: int) -> None:
        """Stop routing to a replica whose actor died: for good, or (``restart_failed``) until Ray has restarted it."""
        with self._lock:
            if replica in self.dead or replica in self.restarting:
                return
            (self.restarting if self.config.restart_failed else self.dead).add(replica)
            self.router.remove(replica)
        if self.config.restart_failed:
            threading.Thread(target=self._await_restart, args=(replica,), name=f"sglite-replica-{replica}-restart",
                             daemon=True).start()

    def _await_restart(self, replica: int) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        while replica < len(self.actors):  # the pool empties its actor list at shutdown
            try:
                ray.get(self.actors[replica].ready.remote(), timeout=5)
                break
            except GetTimeoutError:
                continue
            except RayActorError:
                time.sleep(0.5)  # still restarting
            except RayTaskError:
                logger.error("replica %d failed to restart; it stays out of rotation", replica, exc_info=True)
                return
        with self._lock:
            self.restarting.discard(replica)
            self.router.restore(replica)

    def generate(self, kwargs: dict[str, Any], key: str) -> dict | list[dict]:
        """``Engine.generate(**kwargs)`` on the replica ``key`` routes to; a dead replica's call is re-sent elsewhere."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        attempts = 0
        while True:
            replica = self.choose(key)
            try:
                return ray.get(self.actors[replica].generate.remote(kwargs))
            except RayTaskError as exc:  # the engine raised: the caller's error, not the replica's
                raise _cause(exc) from None
            except RayActorError as exc:
                self.mark_dead(replica)
                attempts += 1
                if self.config.restart_failed or attempts > self.config.max_call_retries:
                    raise ReplicaFailedError(f"replica {replica} failed during the request: {type(exc).__name__}") from None
                with self._lock:
                    self.retried_calls += 1
            finally:
                self.release(replica)

    def generate_stream(self, kwargs: dict[str, Any], key: str) -> Iterator[dict]:
        """Stream chunks from one replica; re-sent elsewhere only if its replica died before the first chunk.

        A caller that stops reading early (closes the iterator) aborts the request on its replica.
        """
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        kwargs = {**kwargs, "rid": kwargs.get("rid") or f"pool-{uuid.uuid4().hex}"}  # abort needs the id
        attempts = 0
        while True:
            replica = self.choose(key)
            started = finished = False
            try:
                for ref in self.actors[replica].generate_stream.options(num_returns="streaming").remote(kwargs):
                    chunk = ray.get(ref)
                    started, finished = True, bool(chunk.get("finished"))
                    yield chunk
                return
            except GeneratorExit:
                if not finished:
                    self.actors[replica].abort.remote(kwargs["rid"])
                raise
            except RayTaskError as exc:
                raise _cause(exc) from None
            except RayActorError as exc:
                self.mark_dead(replica)
                attempts += 1
                if started or self.config.restart_failed or attempts > self.config.max_call_retries:
                    raise ReplicaFailedError(f"replica {replica} failed during the request: {type(exc).__name__}") from None
                with self._lock:
                    self.retried_calls += 1
            finally:
                self.release(replica)

    def replica_stats(self, timeout: float = 10.0) -> list[dict[str, Any] | None]:
        """Each replica's engine counters (None for one that did not answer in ``timeout`` seconds)."""
        import ray

        refs = [a.get_stats.remote() for a in self.actors]
        stats: list[dict[str, Any] | None] = []
        for i, ref in enumerate(refs):
            try:
                    stats.append(None if i in self.dead else ray.get(ref, timeout=timeout))
            except (ray.exceptions.RayError, TimeoutError):
                stats.append(None)
        return stats

    def get_stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """Counters summed over the replicas that answered within ``timeout`` seconds, plus the pool's own."""
        total: dict[str, Any] = {}
        answered = 0
        for stats in self.replica_stats(timeout):
            if stats is None:
                continue
            answered += 1
            for name, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[name] = total.get(name, 0) + value
        return {**total, "replicas": len(self.actors), "replicas_answering": answered, "retried_calls": self.retried_calls}

    def call_all(self, method: str) -> list[Any]:
        """Call ``method`` on every live replica; the results in replica order."""
        import ray

        return ray.get([getattr(a, method).remote() for i, a in enumerate(self.actors) if i not in self.dead])

    def shutdown(self) -> None:
        """Stop the replicas (and Ray, if this pool started it). Idempotent."""
        import ray

        actors, self.actors = self.actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False


def _cause(exc: Exception) -> Exception:
    """The exception an actor method raised (``RayTaskError`` wraps it with a remote traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc

"""Engine replicas on a Ray cluster: placement (``pool``), routing (``router``) and the actor (``replica``).

The HTTP server's engine-shaped front over a pool is ``runtime/server/replicated_engine.py``; the
language's backend over one is ``lang/backends/ray_pool.py``."""

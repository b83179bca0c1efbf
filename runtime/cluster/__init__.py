"""Engine replicas on a Ray cluster: placement (``pool``), routing (``router``), the actor (``replica``)
and the engine-shaped front the HTTP server uses (``replicated_engine``)."""

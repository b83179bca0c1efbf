"""What can go wrong between a caller and engine replicas on Ray (no imports: cheap for the CLI)."""

from __future__ import annotations


class ReplicaFailedError(RuntimeError):
    """The replica running a request died while the request was in flight."""


class ReplicasExhaustedError(RuntimeError):
    """Every replica has died and none is restarted: a batch job stops here (its rows stay unwritten)."""


class ReplicaStartTimeoutError(TimeoutError):
    """The replicas could not be placed or did not load their model in time."""

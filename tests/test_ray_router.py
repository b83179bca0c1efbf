"""The replica router (pure Python, no Ray): prefix affinity, its load bound, failed replicas; the CLI flags."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglite.runtime.cluster.router import PrefixAffinityRouter, RoundRobinRouter, RouterConfig, RouterError

HEADERS = [f"few-shot header number {k}: " + "example text " * 20 for k in range(5)]


def test_rows_sharing_a_prefix_go_to_one_replica_and_prefixes_spread():
    router = PrefixAffinityRouter(2, RouterConfig(block_chars=16))
    placed: dict[int, set[int]] = {}
    for i in range(50):
        k = i % len(HEADERS)
        replica = router.choose(HEADERS[k] + f"question {i}")
        router.done(replica)
        placed.setdefault(k, set()).add(replica)
    assert all(len(r) == 1 for r in placed.values())
    assert {next(iter(r)) for r in placed.values()} == {0, 1}  # new prefixes went to the less used replica


def test_round_robin_ignores_prefixes():
    router = RoundRobinRouter(2)
    replicas = [router.choose(HEADERS[0]) for _ in range(4)]
    assert replicas == [0, 1, 0, 1]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=200), st.integers(0, 6))
def test_affinity_never_breaks_the_load_bound(requests, max_imbalance):
    """A replica is chosen for its prefix only while it has at most ``max_imbalance`` more in flight than the least loaded."""
    router = PrefixAffinityRouter(3, RouterConfig(block_chars=16, max_imbalance=max_imbalance))
    in_flight: list[int] = []
    for k, finish_one in requests:
        loads_before = list(router.in_flight)
        replica = router.choose(HEADERS[k])
        assert loads_before[replica] <= min(loads_before) + max_imbalance
        in_flight.append(replica)
        if finish_one and in_flight:
            router.done(in_flight.pop(0))
    assert sum(router.in_flight) == len(in_flight)


def test_a_removed_replica_gets_nothing_until_restored():
    router = PrefixAffinityRouter(2, RouterConfig(block_chars=16))
    first = router.choose(HEADERS[0])
    router.done(first)
    router.remove(first)
    assert {router.choose(HEADERS[0]) for _ in range(5)} == {1 - first}
    router.remove(1 - first)
    with pytest.raises(RouterError, match="every replica has failed"):
        router.choose(HEADERS[0])
    router.restore(first)
    assert router.choose(HEADERS[0]) == first
    assert router.matched_blocks(first, []) == 0


def test_bad_router_settings_are_refused():
    with pytest.raises(RouterError, match="policy"):
        RouterConfig(policy="random")
    with pytest.raises(RouterError, match="at least one replica"):
        PrefixAffinityRouter(0)


def test_cluster_flags_need_their_mode(capsys):
    from sglite.lang.batch_job import main_run
    from sglite.runtime.server.cli import main_serve

    with pytest.raises(SystemExit):
        main_run(["x.py:f", "--input", "in.jsonl", "--output", "out.jsonl", "--replicas", "2"])
    assert "--address and --replicas need --ray" in capsys.readouterr().err
    assert main_serve(["--model", "m", "--ray-address", "auto"]) == 2
    assert "--ray-address needs --replicas" in capsys.readouterr().err
    assert main_serve(["--model", "m", "--replicas", "0"]) == 2

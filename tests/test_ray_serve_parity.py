"""Every single-server test of ``test_server.py`` again, against two replicas on Ray behind the same app.

The module's tests and fixtures are taken as they are; only ``engine`` changes — a ``ReplicatedEngine``
over a 2-replica pool — so the whole OpenAI/SGLang HTTP surface is checked unchanged on replicas.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from sglite.runtime.cluster.pool import LOCAL_SYSTEM_CONFIG, PoolConfig, ReplicaPool  # noqa: E402
from sglite.runtime.server.replicated_engine import ReplicatedEngine  # noqa: E402

_spec = importlib.util.spec_from_file_location("sglite_test_server_for_replicas", Path(__file__).with_name("test_server.py"))
_single = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_single)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a Ray that cannot start must not hang CI

globals().update({name: value for name, value in vars(_single).items()
                  if name.startswith("test_") or name in ("server", "client")})


@pytest.fixture(scope="module")
def engine(llama_path):
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False,
             _system_config=LOCAL_SYSTEM_CONFIG)
    replicated = ReplicatedEngine(ReplicaPool(str(llama_path), PoolConfig(replicas=2, restart_failed=True),
                                              {"max_total_tokens": 8192}))
    try:
        yield replicated
    finally:
        replicated.shutdown()
        ray.shutdown()


def test_the_single_server_suite_was_taken_whole():
    taken = [name for name in globals() if name.startswith("test_") and name != "test_the_single_server_suite_was_taken_whole"]
    assert len(taken) == len([n for n in vars(_single) if n.startswith("test_")]) >= 20

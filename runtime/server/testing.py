"""Run a real server on a free loopback port inside the current process (tests, notebooks, benchmarks).

    >>> from sglite.runtime.server.testing import serve_in_thread
    >>> with serve_in_thread(engine) as url:  # doctest: +SKIP
    ...     openai.OpenAI(base_url=f"{url}/v1", api_key="none").models.list()
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from sglite.runtime.server.app import create_app
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.server import CANCEL_BACKSTOP_S, GracefulServer
from sglite.runtime.server.streaming import AsyncEngine


@contextmanager
def serve_in_thread(
    engine: AsyncEngine, config: ServerConfig | None = None, *, startup_timeout: float = 30.0
) -> Iterator[str]:
    """Serve ``create_app(engine, config)`` with uvicorn in a daemon thread; yield its base URL.

    The socket is bound before the thread starts (port 0 = a free one), so the URL is valid the
    moment it is yielded. On exit the server stops accepting, open requests get
    ``config.graceful_shutdown_timeout`` seconds before they are aborted, and the thread is joined;
    the engine keeps running.
    """
    config = replace(config or ServerConfig(log_level="warning"), host="127.0.0.1", port=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = GracefulServer(create_app(engine, config), config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"sglite-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the test server exited during startup; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the test server did not start within {startup_timeout} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=config.graceful_shutdown_timeout + CANCEL_BACKSTOP_S + 5)
        sock.close()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(proc, url: str, timeout: float, name: str = "server") -> None:
    """Return once ``url``'s ``/health`` answers 200; raise if ``proc`` (a ``subprocess.Popen``) exits first
    (with the tail of its stderr, where it was piped) or after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else f"exit code {proc.returncode}"
            raise RuntimeError(f"{name} exited during startup: {stderr}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not start within {timeout} s")
        time.sleep(0.2)


@contextmanager
def serve_subprocess(serve_args: list[str], *, startup_timeout: float = 300.0) -> Iterator[str]:
    """``python -m sglite serve *serve_args`` in a subprocess on a free loopback port; yield its base URL
    once ``/health`` answers. The child inherits the environment (``PYTHONPATH`` included), offline.

        >>> with serve_subprocess(["--model", "path/to/model"]) as url:   # doctest: +SKIP
        ...     httpx.get(f"{url}/health").status_code
        200
    """
    import os
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "sglite", "serve", *serve_args, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, startup_timeout, name="sglite serve")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

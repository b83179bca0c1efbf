"""``python -m sglite serve --model PATH [server flags] [engine flags]``.

Server flags come from ``ServerConfig``, engine flags from ``EngineConfig``, one flag per field:

    python -m sglite serve --model ~/models/qwen2.5-0.5b --port 8000 --api-key sk-local --rate-limit 60/min \\
        --max-running-requests 32 --schedule-policy lpm
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.flags import add_dataclass_flags, dataclass_values

API_KEY_ENV = "SGLITE_API_KEY"
"""Read when ``--api-key`` is not given, so the key need not appear in the process list."""


def parse_rate_limit(text: str) -> int:
    """``60`` or ``60/min`` (requests per minute) -> 60."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(?:min|m|minute))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected requests per minute like '60' or '60/min', got {text!r}")
    return int(match.group(1))


parse_rate_limit.__name__ = "rate"


def build_parser() -> argparse.ArgumentParser:
    from sglite.runtime.config import EngineConfig

    parser = argparse.ArgumentParser(
        prog="python -m sglite serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/v1/models), SGLang's native /generate, /health and Prometheus /metrics.",
    )
    parser.add_argument("--model", "--model-path", dest="model", default=None,
                        help="checkpoint directory, .gguf file, or hub id when online "
                        "(default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    add_dataclass_flags(parser.add_argument_group("server"), ServerConfig, types_override={"rate_limit": parse_rate_limit})
    add_dataclass_flags(parser.add_argument_group("engine"), EngineConfig)
    cluster = parser.add_argument_group("replicas on Ray (pip install sglite[ray])")
    cluster.add_argument("--replicas", type=int, default=None, help="serve N engine replicas (Ray actors) behind this endpoint, routed by prefix")
    cluster.add_argument("--ray-address", default=None, help="Ray cluster for the replicas (default: start a local Ray instance)")
    cluster.add_argument("--router", choices=("prefix", "round_robin"), default="prefix", help="how requests are spread over replicas")
    cluster.add_argument("--gpus-per-replica", type=float, default=None, help="GPU share per replica (default: 1 where the cluster has GPUs, else 0)")
    return parser


def main_serve(argv: list[str] | None = None) -> int:
    """Parse flags, load the engine, serve until SIGINT/SIGTERM; the exit status (2 for bad flags)."""
    import sglite
    from sglite.runtime.config import EngineConfig
    from sglite.runtime.server.app import create_app
    from sglite.runtime.server.server import GracefulServer

    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        server_values = dataclass_values(args, ServerConfig)
        if "api_key" not in server_values and os.environ.get(API_KEY_ENV):
            server_values["api_key"] = os.environ[API_KEY_ENV]
        try:
            server_config = ServerConfig(**server_values)
            engine_options = dataclass_values(args, EngineConfig)
            EngineConfig.from_options(**engine_options)  # flag (and environment) errors before the (slow) model load
        except ValueError as exc:
            parser.error(str(exc))
        if args.replicas is not None and args.replicas < 1:
            parser.error(f"--replicas must be >= 1, got {args.replicas}")
        if args.ray_address is not None and args.replicas is None:
            parser.error("--ray-address needs --replicas")
    except SystemExit as exc:  # --help, or argparse's usage error
        return exc.code if isinstance(exc.code, int) else 2

    logging.basicConfig(level=server_config.log_level.upper() if server_config.log_level != "trace" else "DEBUG")
    try:
        if args.model is None:
            from sglite.runtime.loading.default_model import default_model_path

            args.model = default_model_path()
        engine = sglite.Engine(args.model, **engine_options) if args.replicas is None else _replicated(args, engine_options)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 1
    server = GracefulServer(create_app(engine, server_config, owns_engine=True), server_config)
    # uvicorn drains on SIGTERM, then re-raises it with this handler in place: a finished drain exits 0.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after its graceful shutdown
        pass
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        engine.shutdown()  # idempotent; covers a failed start, where the app's shutdown never ran
    return 0 if server.started else 1


def _replicated(args: argparse.Namespace, engine_options: dict) -> object:
    """``--replicas N``: N engines on Ray behind one engine-shaped router (Ray restarts a failed one)."""
    from sglite.runtime.cluster.pool import PoolConfig, ReplicaPool
    from sglite.runtime.server.replicated_engine import ReplicatedEngine
    from sglite.runtime.cluster.router import RouterConfig

    config = PoolConfig(replicas=args.replicas, address=args.ray_address, restart_failed=True,
                        gpus_per_replica=args.gpus_per_replica, router=RouterConfig(policy=args.router))
    return ReplicatedEngine(ReplicaPool(args.model, config, engine_options))


def _exit_after_drain(signum: int, frame: object) -> None:
    raise SystemExit(0)

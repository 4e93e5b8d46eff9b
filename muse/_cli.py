"""The ``muse`` command: serve, demo, evaluate, bench.

Configuration is resolved here, once: command-line flags over a TOML file
over defaults.  Each component then gets only the values it uses.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("muse.cli")

DEFAULT_REGISTRY = "./muse-registry"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from muse._demo import demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from muse._evaluate import evaluate_main

        return evaluate_main(argv[1:])
    if argv and argv[0] == "bench":
        from muse._bench import bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="muse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--registry", default=None, help="registry directory")
    serve.add_argument("--bind", default=None, help="host:port (default 127.0.0.1:8000)")
    serve.add_argument("--config", type=Path, default=None, help="muse.toml")
    serve.add_argument("--log-level", default="INFO")
    commands.add_parser("demo", help="the model-update story end to end")
    commands.add_parser("evaluate", help="evaluate a mapping on a parquet of events")
    commands.add_parser("bench", help="latency and throughput, with SLO checks")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import trio

    from muse._http import HttpLimits
    from muse._quota import QuotaPolicy
    from muse._server import ServerOptions, serve

    config = _read_config(args.config)
    server = config.get("server", {})
    engine = dict(config.get("engine", {}))
    quotas = config.get("quotas", {})
    if quotas:
        engine["quotas"] = {
            tenant: QuotaPolicy(float(q["rate"]), float(q.get("burst", q["rate"])))
            for tenant, q in quotas.items()
        }
    defaults = HttpLimits()
    limits = HttpLimits(
        score_body=int(server.pop("score_body_limit", defaults.score_body)),
        admin_body=int(server.pop("admin_body_limit", defaults.admin_body)),
        score_body_timeout=float(
            server.pop("score_body_timeout", defaults.score_body_timeout)
        ),
        admin_body_timeout=float(
            server.pop("admin_body_timeout", defaults.admin_body_timeout)
        ),
    )
    registry = args.registry or config.get("registry") or DEFAULT_REGISTRY
    options = ServerOptions(
        bind=args.bind or server.pop("bind", "127.0.0.1:8000"), limits=limits, **server
    )
    log.info("configuration: registry=%s bind=%s engine=%s", registry, options.bind, engine)
    trio.run(serve, registry, options, engine)
    return 0


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"cannot read configuration {path}: {exc}") from exc

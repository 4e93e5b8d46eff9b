"""The ``muse`` command: serve, demo, evaluate, bench.

Configuration is resolved once, at start (``_config.py``): command-line
flags over a TOML file over defaults.  Each component then gets only the
values it uses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("muse.cli")


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

    from muse._config import ConfigError, load_settings
    from muse._server import serve

    try:
        settings = load_settings(args.config, registry=args.registry, bind=args.bind)
    except ConfigError as exc:
        raise SystemExit(f"muse serve: {exc}") from None
    log.info(
        "configuration: registry=%s bind=%s engine=%s",
        settings.registry,
        settings.server.bind,
        settings.engine,
    )
    trio.run(serve, settings.registry, settings.server, settings.engine)
    return 0

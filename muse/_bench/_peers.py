"""Servers the bench starts: their virtual environments, processes and probes.

Each peer (MLServer with its XGBoost runtime; a hand-written FastAPI app)
runs from its own virtual environment under a cache directory
(``~/.cache/muse/bench-venvs/<peer>`` by default), created with
``python -m venv`` and filled by pip from PyPI the first time, then reused
while its package list is unchanged.  Every server, MUSE included, runs in a
process group of its own on a free loopback port; ``ManagedServer.stop``
signals the whole group, so worker processes go with their parent.  Callers
hold servers in an ``ExitStack`` so they stop on errors and Ctrl-C too.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Self

from muse._bench._http1 import Endpoint

__all__ = [
    "PEERS",
    "ManagedServer",
    "Peer",
    "default_cache",
    "ensure_venvs",
    "free_port",
    "http_get_status",
    "machine_busy_seconds",
    "own_python_env",
    "start_peer",
]

log = logging.getLogger("muse.bench")

# pip can take minutes for MLServer's dependency tree on a cold cache.
INSTALL_TIMEOUT_S = 1800.0
# MLServer spawns its inference worker and loads the model before it answers
# its readiness probe; on two busy cores that takes several seconds.
READY_TIMEOUT_S = 120.0
READY_POLL_S = 0.2
# Servers get this long to exit after SIGTERM before the group is killed.
STOP_TIMEOUT_S = 10.0
# Name under which MLServer serves the model (in the V2 path).
MODEL_NAME = "bench-xgb"
_MARKER = ".muse-bench-packages"


def _xgboost_pin() -> str:
    """Pin peers to the bench's own XGBoost, so all servers run the same one."""
    try:
        return f"xgboost=={metadata.version('xgboost')}"
    except metadata.PackageNotFoundError:
        return "xgboost"


@dataclass(frozen=True)
class Peer:
    """A comparison server installed in its own venv.

    Attributes:
        name: "mlserver" or "fastapi" (also the venv's directory name).
        packages: pip requirements of its venv.
        wire: request format it speaks (see ``_workload.request_set``).
    """

    name: str
    packages: tuple[str, ...]
    wire: str


PEERS: dict[str, Peer] = {
    # uvloop<0.22: MLServer 1.7.1's default event loop setup fails on 0.22.
    "mlserver": Peer(
        "mlserver",
        ("mlserver==1.7.1", "mlserver-xgboost==1.7.1", "uvloop<0.22", _xgboost_pin()),
        "v2",
    ),
    "fastapi": Peer(
        "fastapi",
        ("fastapi", "uvicorn[standard]", "msgpack", "numpy", _xgboost_pin()),
        "fastapi",
    ),
}


def default_cache() -> Path:
    """Where peer venvs live: $MUSE_BENCH_CACHE or ~/.cache/muse/bench-venvs."""
    env = os.environ.get("MUSE_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "muse" / "bench-venvs"


def ensure_venvs(names: Sequence[str], cache: Path) -> dict[str, Path]:
    """Create or reuse the venvs of the named peers, installing in parallel.

    Args:
        names: peer names (keys of ``PEERS``).
        cache: directory holding one venv per peer.

    Returns:
        Each peer's venv directory.

    Raises:
        RuntimeError: an install failed; the message names its log file.
    """
    cache.mkdir(parents=True, exist_ok=True)
    venvs = {name: cache / name for name in names}
    pending = {
        name: _start_install(PEERS[name], venvs[name])
        for name in names
        if not _venv_ready(PEERS[name], venvs[name])
    }
    for name, process in pending.items():
        rc = process.wait(timeout=INSTALL_TIMEOUT_S)
        if rc != 0:
            raise RuntimeError(
                f"installing peer {name!r} failed (exit {rc}); see {venvs[name]}.log"
            )
        (venvs[name] / _MARKER).write_text("\n".join(PEERS[name].packages))
        log.info("peer %s installed in %s", name, venvs[name])
    return venvs


def _venv_ready(peer: Peer, venv: Path) -> bool:
    marker = venv / _MARKER
    return marker.is_file() and marker.read_text() == "\n".join(peer.packages)


def _start_install(peer: Peer, venv: Path) -> subprocess.Popen[bytes]:
    """Start ``venv`` creation plus pip install in the background."""
    log.info("installing peer %s into %s (first run takes minutes)", peer.name, venv)
    quoted = " ".join(f"'{p}'" for p in peer.packages)
    script = (
        f"'{sys.executable}' -m venv '{venv}' && "
        f"'{venv}/bin/python' -m pip install --quiet {quoted}"
    )
    log_file = open(f"{venv}.log", "wb")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        ["sh", "-c", script], stdout=log_file, stderr=subprocess.STDOUT
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get_status(endpoint: Endpoint, path: str, timeout: float = 2.0) -> int:
    """Status of ``GET path`` on an endpoint, or 0 when it cannot connect.

    Args:
        endpoint: the server.
        path: path below the endpoint's base path.
        timeout: socket timeout in seconds.

    Returns:
        The HTTP status, or 0 on a connection error.
    """
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    try:
        conn.request("GET", endpoint.base_path + path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


class ManagedServer:
    """A server process in its own process group, with its log in a file.

    Attributes:
        name: label used in the report ("muse", "mlserver", ...).
        endpoint: where it listens.
        wire: request format it speaks.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        endpoint: Endpoint,
        wire: str,
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.wire = wire
        self._argv = list(argv)
        self._cwd = cwd
        self._env = env
        self.log_path = cwd / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process in a new session (its own process group)."""
        self._cwd.mkdir(parents=True, exist_ok=True)
        log.info("starting %s on %s", self.name, self.endpoint.url)
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                self._argv,
                cwd=self._cwd,
                env=self._env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # Safe here: it only calls prctl, and the bench starts
                # servers from its main thread before any helper thread.
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - see above
            )

    def wait_ready(self, path: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll ``GET path`` until it answers 200.

        Args:
            path: the readiness probe's path.
            timeout_s: how long to wait.

        Raises:
            RuntimeError: the process exited or never became ready; the
                message carries the tail of its log.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if http_get_status(self.endpoint, path) == 200:
                return
            time.sleep(READY_POLL_S)
        raise RuntimeError(
            f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by every live process of the group.

        Returns:
            utime + stime summed over the group (0.0 when not running).
        """
        if self._process is None:
            return 0.0
        return _group_cpu_seconds(self._process.pid)

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM; killing its process group", self.name)
        # Workers may outlive a parent that exited; the group goes either way.
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        log.info("stopped %s", self.name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the bench dies, even by SIGKILL.

    Covers the one case ``stop`` cannot: a bench killed outright.  Only the
    group leader gets the signal; it stops its own workers.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # Not Linux: stop() and the ExitStack remain the only guard.


_PR_SET_PDEATHSIG = 1


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _group_cpu_seconds(pgid: int) -> float:
    """Sum utime+stime of the live processes in a process group (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name; see proc(5).
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat).

    Used around each run to see how much CPU went to processes outside the
    bench, on a machine shared with other work.

    Returns:
        Busy CPU seconds (everything but idle and iowait); NaN off Linux.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / _CLOCK_TICKS


def own_python_env() -> dict[str, str]:
    """This environment, with the directory holding ``muse`` on PYTHONPATH.

    So that ``python -m muse...`` children import the same MUSE as this
    process, installed or run from a source tree.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    paths = [root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without our venv's traces, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env.update(extra)
    return env


def start_peer(
    name: str, venv: Path, model_path: Path, workdir: Path, threads: int | None = 1
) -> ManagedServer:
    """Start a peer on a free loopback port and wait until it is ready.

    Args:
        name: "mlserver" or "fastapi".
        venv: the peer's virtual environment.
        model_path: the XGBoost JSON model every server loads.
        workdir: directory for the peer's files and log.
        threads: OpenMP threads for XGBoost (``OMP_NUM_THREADS``), or None
            for XGBoost's default (every core, spin-waiting).  One is the
            default because on two cores shared with the load generator the
            default's spinning threads can slow prediction twentyfold
            whenever anything else runs, which would flatter MUSE.

    Returns:
        The running server; the caller must stop it.

    Raises:
        RuntimeError: it did not come up (message has its log's tail).
    """
    starters = {"mlserver": _mlserver, "fastapi": _fastapi}
    extra = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    server, probe = starters[name](venv, model_path, workdir / name, _clean_env(extra))
    server.start()
    try:
        server.wait_ready(probe)
    except BaseException:
        server.stop()
        raise
    return server


def _mlserver(
    venv: Path, model_path: Path, workdir: Path, env: dict[str, str]
) -> tuple[ManagedServer, str]:
    """MLServer, default settings bar the loopback host and free ports."""
    model_dir = workdir / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_bytes(model_path.read_bytes())
    ports = {p: free_port() for p in ("http_port", "grpc_port", "metrics_port")}
    _write_template("settings.json", workdir / "settings.json", ports)
    _write_template(
        "model-settings.json",
        model_dir / "model-settings.json",
        {"model_name": MODEL_NAME},
    )
    endpoint = Endpoint("127.0.0.1", ports["http_port"])
    argv = [str(venv / "bin" / "mlserver"), "start", str(workdir)]
    server = ManagedServer("mlserver", argv, endpoint, "v2", cwd=workdir, env=env)
    return server, f"/v2/models/{MODEL_NAME}/ready"


def _fastapi(
    venv: Path, model_path: Path, workdir: Path, env: dict[str, str]
) -> tuple[ManagedServer, str]:
    """The hand-written app under uvicorn, one worker, no access log."""
    app_dir = resources.files("muse._bench.peers")
    endpoint = Endpoint("127.0.0.1", free_port())
    argv = [
        str(venv / "bin" / "python"),
        "-m",
        "uvicorn",
        "fastapi_app:app",
        "--app-dir",
        str(app_dir),
        "--host",
        endpoint.host,
        "--port",
        str(endpoint.port),
        "--workers",
        "1",
        # Access logging off: a per-request INFO line would tax the peer for
        # something MUSE does not do by default either.
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    env = {**env, "MUSE_BENCH_MODEL": str(model_path.resolve())}
    server = ManagedServer("fastapi", argv, endpoint, "fastapi", cwd=workdir, env=env)
    return server, "/healthz"


def _write_template(name: str, target: Path, values: dict[str, Any]) -> None:
    """Copy an MLServer JSON template, replacing "{key}" strings by values."""
    text = resources.files("muse._bench.peers").joinpath("mlserver", name).read_text()
    target.write_text(json.dumps(_fill(json.loads(text), values), indent=2))


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, str) and node.startswith("{") and node.endswith("}"):
        return values[node[1:-1]]
    return node

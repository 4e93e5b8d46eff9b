"""Servers for the robustness tests, and a raw HTTP/1.1 connection.

Three things every robustness test needs:

- ``Deployment``: a registry with models, predictors, a route and tenant
  keys, built once per session by ``build_deployment`` and copied into each
  test's ``tmp_path`` (copying keeps the compiled model libraries, so no
  test pays for a compile it does not test);
- ``serving``: the real server in this process on a free loopback port, with
  the engine at hand for its statistics; ``ServerProcess``: the same server
  as ``python -m muse serve`` in a child process, for tests that kill it,
  signal it or measure its memory;
- ``RawConnection``: bytes in, replies out, over a trio socket, for tests
  where framing matters and an HTTP client library would repair or refuse
  what we mean to send.

Figures the tests report (bad inputs tried, kills survived, requests lost,
peak memory) are collected with ``record_figure`` into one JSON file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio

from muse._server import ServerOptions, serve

INTENT = "card-fraud"
#: Routed to a large model over two features: cheap to decode, slow to score,
#: so tests can keep requests waiting on the scorer.
HEAVY_INTENT = "heavy"
HEAVY_FEATURES = ("TX_AMOUNT", "TX_TIME_SECONDS")
TENANTS = ("bank-01", "bank-02")
FIGURES = Path(os.environ.get("MUSE_FIGURES", "/tmp/muse-robustness-figures.json"))

# Bounded waits: a test that needs longer than this has found a hang.
REPLY_TIMEOUT = 10.0
START_TIMEOUT = 60.0


# -- deployment -----------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """What ``build_deployment`` set up, with the keys it was shown once."""

    admin: str
    keys: Mapping[str, str]
    live: str  # predictor ref routed live for INTENT
    shadow: str  # its shadow
    heavy: str  # predictor ref routed for HEAVY_INTENT
    models: Mapping[str, str] = field(default_factory=dict)  # name -> ref

    def to_dict(self) -> dict[str, Any]:
        return {
            "admin": self.admin,
            "keys": dict(self.keys),
            "live": self.live,
            "shadow": self.shadow,
            "heavy": self.heavy,
            "models": dict(self.models),
        }

    @classmethod
    def read(cls, registry: Path) -> Deployment:
        return cls(**json.loads((registry / "deployment.json").read_text()))


def spec(model_ref: str, *, quantile_map: bool = False) -> dict[str, Any]:
    """A predictor of one model with posterior correction (and a map)."""
    nodes: list[dict[str, Any]] = [
        {"id": "m", "kind": "model", "model": model_ref},
        {"id": "pc", "kind": "posterior_correction", "input": "m"},
    ]
    if quantile_map:
        nodes.append({"id": "qm", "kind": "quantile_map", "input": "pc"})
    return {"nodes": nodes, "output": nodes[-1]["id"]}


async def build_deployment(
    registry: Path, xgb_bytes: bytes, lgb_bytes: bytes, heavy_bytes: bytes
) -> Deployment:
    """Publish three models, three predictors, two routes and two tenants.

    Runs the engine in this process, without HTTP; writes ``admin.key`` as
    the server would and ``deployment.json`` with every key issued.
    """
    from muse import open_engine

    async with open_engine(registry) as engine:
        admin = engine.admin
        admin_key = await admin.ensure_admin_key()
        assert admin_key is not None
        xgb = await admin.put_model("xgb", xgb_bytes, "xgboost_json", beta=0.05)
        lgb = await admin.put_model("lgb", lgb_bytes, "lightgbm", beta=0.5)
        heavy = await admin.put_model(
            "heavy",
            heavy_bytes,
            "xgboost_json",
            feature_names=list(HEAVY_FEATURES),
            beta=0.5,
        )
        live = (await admin.put_predictor("fraud", spec(xgb["ref"])))["ref"]
        shadow = (await admin.put_predictor("fraud", spec(lgb["ref"])))["ref"]
        slow = (await admin.put_predictor("slow", spec(heavy["ref"])))["ref"]
        await admin.set_route("*", INTENT, live, (shadow,))
        await admin.set_route("*", HEAVY_INTENT, slow)
        keys = {t: (await admin.create_tenant(t))["key"] for t in TENANTS}
    deployment = Deployment(
        admin_key,
        keys,
        live,
        shadow,
        slow,
        {"xgb": xgb["ref"], "lgb": lgb["ref"], "heavy": heavy["ref"]},
    )
    (registry / "admin.key").write_text(admin_key + "\n")
    (registry / "deployment.json").write_text(json.dumps(deployment.to_dict()))
    return deployment


def train_heavy(synthetic: Mapping[str, Any]) -> bytes:
    """A 100-tree XGBoost model over ``HEAVY_FEATURES`` (JSON bytes).

    Two features make an event cheap to decode; a hundred depth-6 trees make
    it about 0.3 us a row to score, so a batch of tens of thousands of rows
    keeps the scorer's worker thread busy for tens of milliseconds.
    """
    import numpy as np
    import xgboost as xgb

    X = np.column_stack([synthetic[f] for f in HEAVY_FEATURES]).astype(np.float64)
    booster = xgb.train(
        {"max_depth": 6, "objective": "binary:logistic", "nthread": 2, "eta": 0.1},
        xgb.DMatrix(X, label=synthetic["TX_FRAUD"], feature_names=list(HEAVY_FEATURES)),
        num_boost_round=100,
    )
    return bytes(booster.save_raw("json"))


_TEMPLATE: list[Path] = []


def deployed_template(
    root: Path, synthetic: Mapping[str, Any], xgb_bytes: bytes, lgb_bytes: bytes
) -> Path:
    """The session's deployed registry, built on first use under ``root``."""
    if not _TEMPLATE:
        registry = root / "template"
        trio.run(
            build_deployment, registry, xgb_bytes, lgb_bytes, train_heavy(synthetic)
        )
        _TEMPLATE.append(registry)
    return _TEMPLATE[0]


def copy_registry(template: Path, destination: Path) -> Deployment:
    """A private copy of a deployed registry; returns its deployment."""
    shutil.copytree(template, destination)
    return Deployment.read(destination)


# -- the server in this process ---------------------------------------------------


@dataclass
class Served:
    """A server running in this process."""

    url: str
    engine: Any
    host: str
    port: int


@asynccontextmanager
async def serving(
    registry: Path, options: ServerOptions | None = None, **engine_options: Any
) -> AsyncIterator[Served]:
    """Serve ``registry`` on a free loopback port for the block's duration."""
    options = options or ServerOptions()
    if options.bind == ServerOptions().bind:
        options = _with(options, bind="127.0.0.1:0")
    shutdown = trio.Event()
    started = trio.Event()
    found: dict[str, Any] = {}

    def on_ready(url: str, engine: Any) -> None:
        found.update(url=url, engine=engine)
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                serve,
                registry,
                options,
                engine_options,
                on_ready=on_ready,
                shutdown=shutdown,
            )
        )
        with trio.fail_after(START_TIMEOUT):
            await started.wait()
        host, port = _host_port(found["url"])
        try:
            yield Served(found["url"], found["engine"], host, port)
        finally:
            shutdown.set()


def _with(options: ServerOptions, **changes: Any) -> ServerOptions:
    return replace(options, **changes)


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host.strip("[]"), int(port)


# -- the server as a child process --------------------------------------------------


class ServerProcess:
    """``python -m muse serve`` on a free loopback port.

    Args:
        registry: the registry directory.
        workdir: where the config file and the server's log go.
        config: the TOML configuration as nested dicts (``server``,
            ``engine``, ``quotas`` tables).
    """

    def __init__(
        self, registry: Path, workdir: Path, config: Mapping[str, Any] | None = None
    ) -> None:
        self.registry = registry
        self.workdir = workdir
        self.config = dict(config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = workdir / "server.log"
        self._starts = 0

    def start(self) -> str:
        """Start the server and wait until it listens; returns its URL."""
        self._starts += 1
        config_path = self.workdir / "muse.toml"
        config_path.write_text(_toml(self.config))
        self.log_path = self.workdir / f"server-{self._starts}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "muse",
                    "serve",
                    "--registry",
                    str(self.registry),
                    "--bind",
                    "127.0.0.1:0",
                    "--config",
                    str(config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.url = self._wait_for_url()
        return self.url

    def _wait_for_url(self) -> str:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+?);", self.log())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log()}"
                )
            time.sleep(0.02)
        raise RuntimeError(f"server did not start in {START_TIMEOUT} s:\n{self.log()}")

    @property
    def host_port(self) -> tuple[str, int]:
        return _host_port(self.url)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=REPLY_TIMEOUT)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def peak_rss_kb(self) -> int:
        """The child's peak resident set (VmHWM), in kB."""
        return _status_field(self.pid, "VmHWM")

    def rss_kb(self) -> int:
        return _status_field(self.pid, "VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _toml(config: Mapping[str, Any]) -> str:
    """Just enough TOML for our config: tables of scalars, one level deep
    (``quotas`` nests one more)."""
    lines: list[str] = []
    for table, values in config.items():
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for key, sub in values.items():
            if isinstance(sub, Mapping):
                lines.append(f'[{table}."{key}"]')
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in sub.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


# -- raw HTTP/1.1 ------------------------------------------------------------------


@dataclass
class Reply:
    """One response (interim ones included) as it came off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes

    def document(self) -> Any:
        """The body decoded by its content type."""
        kind = self.headers.get("content-type", "")
        if "msgpack" in kind:
            return msgpack.unpackb(self.body, raw=False, strict_map_key=False)
        if "json" in kind:
            return json.loads(self.body)
        return self.body

    @property
    def error(self) -> str | None:
        document = self.document()
        return document.get("error") if isinstance(document, dict) else None

    @property
    def detail(self) -> str:
        document = self.document()
        return str(document.get("detail", "")) if isinstance(document, dict) else ""


class ConnectionClosed(Exception):
    """The server closed the connection before a whole reply arrived."""


class RawConnection:
    """One client connection that writes exactly the bytes it is given."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._eof = False

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """The next response on the connection.

        Raises:
            ConnectionClosed: EOF or reset before a complete response.
            trio.TooSlowError: nothing complete within ``timeout``.
        """
        with trio.fail_after(timeout):
            head = await self._read_until(b"\r\n\r\n")
            status, headers = _parse_head(head)
            if "content-length" in headers:
                body = await self._read_exactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._read_chunked()
            else:
                body = b""
        return Reply(status, headers, body)

    async def exchange(self, request: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send a request and read its final (non-1xx) response."""
        await self.send(request)
        while True:
            reply = await self.reply(timeout)
            if reply.status >= 200:
                return reply

    async def closed_by_server(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """Wait for EOF (or a reset); returns whatever came before it.

        Raises:
            trio.TooSlowError: the connection is still open after ``timeout``.
        """
        with trio.fail_after(timeout):
            while not self._eof:
                await self._fill()
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self._eof = True
        self._buffer += data

    async def _read_until(self, marker: bytes) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            if self._eof:
                raise ConnectionClosed(bytes(self._buffer))
            await self._fill()
        data = bytes(self._buffer[: end + len(marker)])
        del self._buffer[: end + len(marker)]
        return data

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if self._eof:
                raise ConnectionClosed(bytes(self._buffer))
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self._read_until(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await self._read_until(b"\r\n")
                return bytes(body)
            body += await self._read_exactly(size)
            await self._read_exactly(2)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


def request(
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: Iterable[tuple[str, str]] = (),
    content_type: str | None = "application/msgpack",
    key: str | None = None,
    length: bool = True,
) -> bytes:
    """A complete HTTP/1.1 request as bytes.

    Args:
        body: sent after the head as given (None: no body, no length).
        headers: extra headers, in order, duplicates allowed.
        content_type: None leaves Content-Type out.
        key: sent as ``Authorization: Bearer <key>``.
        length: add ``Content-Length`` for ``body``.
    """
    lines = [f"{method} {path} HTTP/1.1", "Host: muse.test"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


def plain_events(events: list[dict], n: int, start: int = 0) -> list[dict]:
    """``n`` events from ``start``, with only the fields a request carries."""
    return [
        {"id": e["id"], "features": e["features"]} for e in events[start : start + n]
    ]


def score_request(
    key: str, events: list[dict[str, Any]], *, intent: str = INTENT, **extra: Any
) -> bytes:
    """``POST /v1/score`` with a msgpack body."""
    body = msgpack.packb({"intent": intent, "events": events, **extra})
    return request("POST", "/v1/score", body, key=key)


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in chunked transfer coding, ``size`` bytes a chunk."""
    out = bytearray()
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


# -- load from another process -------------------------------------------------------


def generate_load(
    host: str, port: int, payload_path: str, clients: int, seconds: float, cap: int
) -> dict[str, Any]:
    """Closed-loop load: ``clients`` connections send the payload back to back.

    Meant to run in its own process (see ``LoadGenerator``) so that the
    test's own measurements do not queue behind the generator's replies.

    Returns:
        ``sent``, ``answered``, ``by_status``, ``retry_after`` (how many 503s
        carried ``Retry-After``) and ``failures`` (connections broken).
    """
    payload = Path(payload_path).read_bytes()
    counts: dict[str, Any] = {
        "sent": 0,
        "answered": 0,
        "by_status": {},
        "retry_after": 0,
        "failures": 0,
    }

    async def client(stop_at: float) -> None:
        connection = await RawConnection.open(host, port)
        try:
            while time.monotonic() < stop_at and counts["sent"] < cap:
                counts["sent"] += 1
                reply = await connection.exchange(payload, timeout=60)
                counts["answered"] += 1
                key = str(reply.status)
                counts["by_status"][key] = counts["by_status"].get(key, 0) + 1
                if reply.status == 503 and "retry-after" in reply.headers:
                    counts["retry_after"] += 1
        except (ConnectionClosed, OSError, trio.BrokenResourceError):
            counts["failures"] += 1
        finally:
            await connection.aclose()

    async def main() -> None:
        stop_at = time.monotonic() + seconds
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, stop_at)

    trio.run(main)
    return counts


class LoadGenerator:
    """``generate_load`` in a child process; ``result()`` waits for it."""

    def __init__(
        self,
        host: str,
        port: int,
        payload: bytes,
        workdir: Path,
        *,
        clients: int,
        seconds: float,
        cap: int,
    ) -> None:
        payload_path = workdir / "payload.bin"
        payload_path.write_bytes(payload)
        script = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import _servers; "
            "print(json.dumps(_servers.generate_load(sys.argv[2], int(sys.argv[3]), "
            "sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]))))"
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(Path(__file__).parent),
                host,
                str(port),
                str(payload_path),
                str(clients),
                str(seconds),
                str(cap),
            ],
            stdout=subprocess.PIPE,
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        out, _ = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, out
        return json.loads(out.decode().strip().splitlines()[-1])


# -- figures ----------------------------------------------------------------------


def record_figure(section: str, values: Mapping[str, Any]) -> None:
    """Merge ``values`` under ``section`` into the figures file and print them."""
    try:
        figures = json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        figures = {}
    current = figures.setdefault(section, {})
    for name, value in values.items():
        if isinstance(value, Mapping) and isinstance(current.get(name), Mapping):
            merged = dict(current[name])
            merged.update(value)
            current[name] = merged
        else:
            current[name] = value
    FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(f"\n[figures] {section}: {json.dumps(dict(values), sort_keys=True)}")


def open_fds() -> int:
    """File descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))

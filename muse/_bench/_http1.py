"""Just enough HTTP/1.1 for a load generator, with no I/O (sans-io, as h11).

Requests are encoded once, before a run, into complete byte strings that the
load generator writes as they are.  Responses are parsed only as far as a load
generator needs: the status code, and where the response ends (by
``Content-Length``, or by chunked framing for servers that stream).  Headers
other than those two are skipped, and bodies are discarded unread.

This is not a general HTTP client: it assumes well-formed responses from a
server under test and raises ``ResponseFormatError`` on anything else, which
the load generator counts as a connection failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "Endpoint",
    "ResponseFormatError",
    "ResponseParser",
    "encode_request",
    "parse_url",
]

# A response head larger than this is not something our servers send; stop
# buffering instead of growing without bound on a broken peer.
MAX_HEAD_BYTES = 64 * 1024

_HEAD_END = b"\r\n\r\n"
_CRLF = b"\r\n"


class ResponseFormatError(ValueError):
    """A response could not be framed (bad status line, head or chunk size)."""


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: a loopback host, a port and a base path.

    Attributes:
        host: host name or address, as used to connect and in ``Host:``.
        port: TCP port.
        base_path: path prefix without a trailing slash ("" for none).
    """

    host: str
    port: int
    base_path: str = ""

    @property
    def url(self) -> str:
        """The endpoint as an ``http://`` URL."""
        return f"http://{self.host}:{self.port}{self.base_path}"


def parse_url(url: str) -> Endpoint:
    """Split an ``http://host:port/prefix`` URL into an ``Endpoint``.

    Args:
        url: plain-HTTP URL; the port defaults to 80.

    Returns:
        The endpoint.

    Raises:
        ValueError: the URL is not plain HTTP or has no host.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http://host:port URL, got {url!r}")
    return Endpoint(parts.hostname, parts.port or 80, parts.path.rstrip("/"))


def encode_request(
    method: str,
    endpoint: Endpoint,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> bytes:
    """Encode one complete keep-alive HTTP/1.1 request.

    Args:
        method: "GET", "POST", ...
        endpoint: target; gives the Host header and the path prefix.
        path: request path below the endpoint's base path, starting with "/".
        body: request body (may be empty).
        headers: extra headers, e.g. Content-Type and Authorization.

    Returns:
        The request bytes, ready to write to a socket.
    """
    lines = [
        f"{method} {endpoint.base_path}{path} HTTP/1.1",
        f"Host: {endpoint.host}:{endpoint.port}",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    head = "\r\n".join(lines).encode("latin-1") + _HEAD_END
    return head + body


class ResponseParser:
    """Frames responses on one connection and reports their status codes.

    Feed it whatever the socket returned; it returns the status of every
    response completed by those bytes, in order.  One parser per connection.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._status = 0
        # Bytes of body still to skip, or -1 while reading a head, or -2 while
        # reading chunked framing.
        self._remaining = -1
        self._chunk_left = 0
        self._in_trailer = False

    def feed(self, data: bytes) -> list[int]:
        """Consume bytes from the connection.

        Args:
            data: the next bytes received (any split is fine).

        Returns:
            Status codes of the responses that these bytes completed.

        Raises:
            ResponseFormatError: the bytes do not frame as HTTP/1.1 responses.
        """
        self._buffer += data
        done: list[int] = []
        while self._step():
            if self._remaining == 0:
                done.append(self._status)
                self._remaining = -1
        return done

    @property
    def idle(self) -> bool:
        """True when no response is partly received."""
        return self._remaining == -1 and not self._buffer

    def _step(self) -> bool:
        """Advance the state machine once; False when more bytes are needed."""
        if self._remaining == -1:
            return self._read_head()
        if self._remaining == -2:
            return self._read_chunked()
        return self._skip_body()

    def _read_head(self) -> bool:
        end = self._buffer.find(_HEAD_END)
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise ResponseFormatError("response head exceeds 64 KiB")
            return False
        head = bytes(self._buffer[:end]).lower()
        del self._buffer[: end + len(_HEAD_END)]
        self._status = _status_of(head)
        if self._status in (204, 304) or 100 <= self._status < 200:
            # No body by definition (RFC 9110 section 6.4.1).
            self._remaining = 0 if self._status >= 200 else -1
            return True
        if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
            self._remaining, self._chunk_left = -2, 0
            self._in_trailer = False
        else:
            self._remaining = _content_length_of(head)
        return True

    def _skip_body(self) -> bool:
        take = min(self._remaining, len(self._buffer))
        if take == 0 and self._remaining > 0:
            return False
        del self._buffer[:take]
        self._remaining -= take
        return self._remaining == 0

    def _read_chunked(self) -> bool:
        """Skip chunk data and sizes; ends after the last-chunk's trailers."""
        if self._chunk_left > 0:
            take = min(self._chunk_left, len(self._buffer))
            del self._buffer[:take]
            self._chunk_left -= take
            return self._chunk_left == 0 and bool(self._buffer)
        line_end = self._buffer.find(_CRLF)
        if line_end < 0:
            return False
        line = bytes(self._buffer[:line_end])
        del self._buffer[: line_end + 2]
        if self._in_trailer:
            if not line:
                self._remaining = 0
            return True
        if not line:
            # The CRLF closing the previous chunk's data.
            return True
        size = _chunk_size_of(line)
        if size == 0:
            self._in_trailer = True
        else:
            self._chunk_left = size
        return True


def _status_of(head: bytes) -> int:
    if not head.startswith(b"http/1.") or len(head) < 12:
        raise ResponseFormatError(f"bad status line: {head[:40]!r}")
    try:
        return int(head[9:12])
    except ValueError:
        raise ResponseFormatError(f"bad status code: {head[:40]!r}") from None


def _content_length_of(head: bytes) -> int:
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        # Neither framing: the body would run to connection close, which a
        # keep-alive load generator cannot use.
        raise ResponseFormatError("response has neither Content-Length nor chunks")
    start += len(b"\r\ncontent-length:")
    end = head.find(_CRLF, start)
    value = head[start:] if end < 0 else head[start:end]
    try:
        return int(value.strip())
    except ValueError:
        raise ResponseFormatError(f"bad Content-Length: {value!r}") from None


def _chunk_size_of(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise ResponseFormatError(f"bad chunk size line: {line[:40]!r}") from None

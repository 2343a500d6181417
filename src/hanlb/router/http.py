"""HTTP/1.1 message framing for the request router, without I/O.

``RequestReader`` and ``ResponseReader`` wrap httptools (llhttp) parsers: bytes
go in with ``feed``, and events come out of ``events`` in order:

- a ``RequestHead`` / ``ResponseHead`` (method or status, headers, body framing),
- ``bytes`` of body (chunked bodies arrive de-chunked),
- ``END`` when the message is complete.

A request that cannot be served becomes an ``HttpError`` event carrying the
status to answer (400 bad syntax or request smuggling, 413 body too large,
431 head too large, 417, 501); the reader takes no input after it, and the
connection is closed after the error response. ``ResponseReader`` raises
``BackendProtocolError`` for a response it cannot frame; the proxy answers 502.

Framing choices (see the package docstring): a request with both
Content-Length and Transfer-Encoding, several Content-Length values, or a
Transfer-Encoding other than ``chunked`` is refused (RFC 9112 section 6.1,
the request smuggling rules). Bodies are re-framed hop by hop: a Content-Length
body keeps its length, a chunked body is re-chunked (chunk extensions and
trailers are dropped).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

import httptools

__all__ = [
    "END",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "REASONS",
    "BackendProtocolError",
    "End",
    "HttpError",
    "RequestHead",
    "RequestReader",
    "ResponseHead",
    "ResponseReader",
    "chunk",
    "connection_names",
    "error_response",
    "header_value",
    "hop_by_hop_names",
    "render_head",
]

Headers = list[tuple[bytes, bytes]]
Framing = Literal["none", "length", "chunked", "close"]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers that describe one hop (RFC 9110 section 7.6.1) plus ``Proxy-*``; never forwarded."""

REASONS: Final = {
    100: "Continue",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

LAST_CHUNK: Final = b"0\r\n\r\n"


class End:
    """The current message is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = End()


class HttpError(Exception):
    """A request the router answers itself with ``status`` and then closes the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class BackendProtocolError(Exception):
    """A backend's response cannot be parsed or framed (the proxy answers 502)."""


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes
    version: str
    headers: Headers
    keep_alive: bool
    framing: Framing
    length: int = 0
    """The Content-Length of a ``length`` body."""
    host: str = ""
    """The Host header (or the absolute-form target's authority), lower case, no port."""
    path: str = "/"
    expect_continue: bool = False
    upgrade: bool = False
    """The client asked for a protocol upgrade; it is not done, the request is served as is."""
    connection: frozenset[bytes] = frozenset()
    """The names the Connection header lists, lower case."""
    user_agent: bytes | None = None
    """The first User-Agent value."""
    cookies: tuple[bytes, ...] = ()
    """The Cookie header values, in order."""

    @property
    def has_body(self) -> bool:
        return self.framing == "chunked" or (self.framing == "length" and self.length > 0)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: Headers
    framing: Framing
    length: int = 0
    keep_alive: bool = True
    extra: dict[str, bytes] = field(default_factory=dict)
    connection: frozenset[bytes] = frozenset()
    """The names the Connection header lists, lower case."""


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def hop_by_hop_names(headers: Headers) -> set[bytes]:
    """``HOP_BY_HOP`` plus the names the Connection header lists, all lower case."""
    names = set(HOP_BY_HOP)
    for k, v in headers:
        if k.lower() == b"connection":
            names.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return names


_NO_NAMES: Final[frozenset[bytes]] = frozenset()


_CONNECTION_NAMES: dict[bytes, frozenset[bytes]] = {}


def connection_names(values: list[bytes]) -> frozenset[bytes]:
    """The names the Connection header values list, lower case."""
    if not values:
        return _NO_NAMES
    if len(values) == 1:  # mostly "keep-alive" or "close": remembered
        names = _CONNECTION_NAMES.get(values[0])
        if names is None:
            names = frozenset(t.strip().lower() for t in values[0].split(b",") if t.strip())
            if len(_CONNECTION_NAMES) < 256:
                _CONNECTION_NAMES[values[0]] = names
        return names
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def render_head(start_line: bytes, headers: Headers) -> bytes:
    parts = [start_line, b"\r\n"]
    for k, v in headers:
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(status: int, detail: str = "", *, close: bool = True) -> bytes:
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}{': ' + detail if detail else ''}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}"
        "\r\n"
    )
    return head.encode() + body


_METHODS: dict[bytes, str] = {}
"""Request methods seen, decoded."""
_HOSTS: dict[bytes, str] = {}
"""Host header values seen and the host name each gives (``_host_of``)."""

_BAD_TARGET: Final = re.compile(rb"[\x00-\x20\x7f]")
"""A request target byte that is a control character or a space."""


def _host_of(value: bytes) -> str:
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[: text.find("]") + 1] if "]" in text else text
    return text.rpartition(":")[0] if ":" in text else text


def _length(value: bytes) -> int:
    v = value.strip()
    if not v.isdigit() or len(v) > 18:
        raise HttpError(400, "bad Content-Length")
    return int(v)


# -- requests ----------------------------------------------------------------------------


class RequestReader:
    """Parses the requests of one client connection (pipelined or not)."""

    def __init__(
        self,
        *,
        max_header_bytes: int = 16384,
        max_headers: int = 100,
        max_body_bytes: int = 64 << 20,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self.events: deque[RequestHead | bytes | End | HttpError] = deque()
        self.in_message = False
        """A request has begun and is not complete yet."""
        self.in_head = False
        """A request has begun and its head is not complete yet."""
        self.failed = False
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._headers: Headers = []
        self._head_bytes = 0
        self._body_bytes = 0
        self._body_limit = max_body_bytes

    # -- input --------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The head is complete (llhttp stops at an upgrade request): serve it
            # without the upgrade, and take no further input on this connection.
            self.failed = True
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            self._fail(ctx if isinstance(ctx, HttpError) else HttpError(400, "bad request"))
        except httptools.HttpParserError as exc:
            self._fail(HttpError(400, _parser_reason(exc)))

    def feed_eof(self) -> None:
        """The client closed its side: a request cut short is an error."""
        if self.in_message and not self.failed:
            self._fail(HttpError(400, "request cut short"))

    def _fail(self, err: HttpError) -> None:
        self.failed = True
        self.events.append(err)

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = self.in_head = True
        self._url = []
        self._headers = []
        self._head_bytes = 0
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            raise HttpError(431, "request line too long")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_header_bytes:
            raise HttpError(431, "request header too large")
        if len(self._headers) >= self.max_headers:
            raise HttpError(431, "too many header fields")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self._parser
        raw_method = p.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii", "replace")
            if len(_METHODS) < 64:
                _METHODS[raw_method] = method
        version = p.get_http_version()
        if version not in ("1.0", "1.1"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        headers = self._headers
        target = b"".join(self._url)
        framing: Framing = "none"
        length = 0
        lengths: list[bytes] = []
        te: list[bytes] = []
        hosts: list[bytes] = []
        expect: bytes | None = None
        upgrade = False
        connection: list[bytes] = []
        cookies: list[bytes] = []
        user_agent: bytes | None = None
        for k, v in headers:
            lk = k.lower()
            if lk == b"host":
                hosts.append(v)
            elif lk == b"content-length":
                lengths.append(v.strip())
            elif lk == b"transfer-encoding":
                te.append(v)
            elif lk == b"expect":
                expect = v.strip().lower()
            elif lk == b"upgrade":
                upgrade = True
            elif lk == b"connection":
                connection.append(v)
            elif lk == b"cookie":
                cookies.append(v)
            elif lk == b"user-agent" and user_agent is None:
                user_agent = v
            if b"\x00" in v:
                raise HttpError(400, "NUL in a header value")
        if te:
            if lengths:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            codings = [c.strip().lower() for t in te for c in t.split(b",") if c.strip()]
            if codings != [b"chunked"]:
                if codings and codings[-1] == b"chunked":
                    raise HttpError(501, "only the chunked transfer coding is supported")
                raise HttpError(400, "chunked is not the final transfer coding")
            framing = "chunked"
        elif lengths:
            if len(set(lengths)) > 1:
                raise HttpError(400, "conflicting Content-Length")
            length = _length(lengths[0])
            framing = "length"
        if framing == "length" and length > self.max_body_bytes:
            raise HttpError(413, "request body too large")
        if len(hosts) > 1:
            raise HttpError(400, "more than one Host")
        if version == "1.1" and not hosts:
            raise HttpError(400, "no Host")
        if method == "CONNECT":
            raise HttpError(501, "CONNECT is not supported")
        if not target:
            raise HttpError(400, "empty request target")
        host = ""
        if hosts:
            host = _HOSTS.get(hosts[0], "")
            if not host:
                host = _host_of(hosts[0])
                if len(_HOSTS) < 1024:
                    _HOSTS[hosts[0]] = host
        path_bytes = target
        if not target.startswith(b"/"):
            if target == b"*" and method == "OPTIONS":
                path_bytes = b"*"
            else:
                try:
                    url = httptools.parse_url(target)
                except httptools.HttpParserInvalidURLError:
                    raise HttpError(400, "bad request target") from None
                if url.schema not in (b"http", b"https") or url.host is None:
                    raise HttpError(400, "bad request target")
                host = url.host.decode("latin-1").lower()
                path_bytes = (url.path or b"/") + (b"?" + url.query if url.query else b"")
        if _BAD_TARGET.search(path_bytes) is not None:
            raise HttpError(400, "bad request target")
        path = path_bytes.split(b"?", 1)[0].decode("latin-1")
        expect_continue = False
        if expect is not None:
            if expect != b"100-continue":
                raise HttpError(417, "unknown expectation")
            expect_continue = version == "1.1"
        self._body_limit = self.max_body_bytes
        self.events.append(
            RequestHead(
                method,
                target,
                version,
                headers,
                p.should_keep_alive() and not upgrade,
                framing,
                length,
                host,
                path,
                expect_continue,
                upgrade,
                connection_names(connection),
                user_agent,
                tuple(cookies),
            )
        )

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._body_limit:
            raise HttpError(413, "request body too large")
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.in_message = self.in_head = False
        self.events.append(END)


def _parser_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:80]


# -- responses ---------------------------------------------------------------------------


class ResponseReader:
    """Parses the responses on one backend connection, one request at a time.

    Call ``start(method)`` before each request's response. ``reusable`` says,
    after ``END``, whether the connection can carry another request.
    """

    def __init__(self) -> None:
        self.events: deque[ResponseHead | bytes | End] = deque()
        self._parser = httptools.HttpResponseParser(self)
        self._fresh = True
        self._clean = False
        """The parser ended a keep-alive response itself: it can parse the next one."""
        self._method = "GET"
        self._status = 0
        self._reason = b""
        self._headers: Headers = []
        self._framing: Framing = "none"
        self.head: ResponseHead | None = None
        self.done = False
        self.reusable = True
        self.bytes_seen = 0

    def start(self, method: str) -> None:
        if not self._fresh and not self._clean:
            self._parser = httptools.HttpResponseParser(self)
        self._fresh = True
        self._method = method
        self.head = None
        self.done = False
        self.events.clear()

    def feed(self, data: bytes) -> None:
        self.bytes_seen += len(data)
        if self.done:
            self.reusable = False  # bytes nobody asked for
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BackendProtocolError("backend switched protocols") from None
        except httptools.HttpParserError as exc:
            raise BackendProtocolError(_parser_reason(exc)) from None

    def feed_eof(self) -> None:
        """The backend closed: the end of a close-delimited body, else an error."""
        self.reusable = False
        if self.done:
            return
        if self.head is not None and self._framing == "close":
            self.done = True
            self.events.append(END)
            return
        raise BackendProtocolError("backend closed before the response ended")

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._fresh = self._clean = False
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= 1000:
            raise BackendProtocolError("too many header fields")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self._parser
        status = self._status = p.get_status_code()
        if status < 200:
            return  # 1xx: informational, dropped (the router answers 100 itself)
        framing: Framing
        length = 0
        te: bytes | None = None
        cl: list[bytes] = []
        connection: list[bytes] = []
        for k, v in self._headers:
            lk = k.lower()
            if lk == b"content-length":
                cl.append(v)
            elif lk == b"transfer-encoding":
                if te is None:
                    te = v
            elif lk == b"connection":
                connection.append(v)
        if self._method == "HEAD" or status in (204, 304):
            framing = "none"
            if cl:
                length = int(cl[0].strip()) if cl[0].strip().isdigit() else 0
        elif te is not None:
            framing = "chunked" if te.strip().lower().endswith(b"chunked") else "close"
        elif cl:
            length = int(cl[0].strip())
            framing = "length" if length else "none"
        else:
            framing = "close"
        self._framing = framing
        keep = p.should_keep_alive() and framing != "close"
        self.head = ResponseHead(
            status,
            self._reason,
            p.get_http_version(),
            self._headers,
            framing,
            length,
            keep,
            connection=connection_names(connection),
        )
        self.events.append(self.head)
        if self._method == "HEAD":
            # llhttp does not know the request was HEAD: it would wait for a body.
            self._finish(keep)

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.reusable = False
            return
        self.events.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200 or self.done:
            return
        keep = self._parser.should_keep_alive() and self._framing != "close"
        self._clean = keep
        self._finish(keep)

    def _finish(self, keep: bool) -> None:
        self.done = True
        self.reusable = keep
        self.events.append(END)

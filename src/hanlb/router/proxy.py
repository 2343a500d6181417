"""The request router's data path: one ``ClientConnection`` per client connection.

Every request on a client connection is routed on its own (claim 50): rules
give its application, session affinity (cookie, application cookie, TLS
session) or the ``HostSelector`` gives its host, and it goes out on one of that
host's pooled, pre-established connections (claims 51-53, 55), modified on
the way (claim 54): hop-by-hop headers removed, ``X-Forwarded-For`` appended,
``X-Forwarded-Proto`` set, ``X-Request-Id`` added unless present, the
application's header rules applied.

Bodies stream both ways with bounded buffers: the client is read only as fast
as the backend takes the request body, and the backend only as fast as the
client takes the response. The request body is uploaded while the response is
read (a backend may answer early, or stream its answer while reading).

Failures: a connect that fails is tried on another host (nothing was sent);
a request whose backend connection dies before any response byte is retried
once on another host if it is idempotent and had no body; otherwise 502. No
host: 503. No response head within ``backend_response_timeout``: 504.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass

from ..classifier.selection import HostSelector
from ..config import Application, ClusterConfig
from ..health.tokens import TokenSelector
from ..tracker.entry import session_key
from .affinity import AffinityTable
from .config import HeaderRule, RouterSettings
from .http import (
    END,
    HOP_BY_HOP,
    LAST_CHUNK,
    BackendProtocolError,
    End,
    HttpError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    error_response,
)
from .pool import READ_SIZE, BackendConn, ConnectFailed, HostPool, Kick, Stream

PROBE_AGENT = b"hanlb-agent"
"""User-Agent of host agents' health probes (health/agent.py)."""

__all__ = ["IDEMPOTENT", "ClientConnection", "Router", "tls_session_key"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HIGH_WATER = 256 * 1024
_AFFINITY_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_FORWARD_DROP = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"expect", b"content-length"})


_RESPONSES = {n: f"responses_{n}xx" for n in range(1, 6)}


class ClientGone(ConnectionError):
    """The client closed its connection or it failed."""


class ClientTimeout(Exception):
    """The client sent nothing for too long."""


class BackendFailed(Exception):
    """The backend connection failed; ``before_response``: no response byte had come."""

    def __init__(self, detail: str, before_response: bool, timeout: bool = False) -> None:
        super().__init__(detail)
        self.before_response = before_response
        self.timeout = timeout


class _Wake:
    """``_read_head`` was woken for work the fast path left to the coroutine."""


_WAKE = _Wake()


@dataclass(slots=True)
class _Pending:
    """A request the fast path sent, whose response the backend hook is awaiting."""

    head: RequestHead
    app: str
    pool: HostPool
    conn: BackendConn
    cookie: str | None
    deadline: float
    error: BackendProtocolError | None = None


@dataclass(slots=True)
class _Choice:
    pool: HostPool
    cookie: str | None = None
    """A valid affinity cookie id the client sent that maps to this host."""


class Router:
    """What all client connections of one router instance share."""

    def __init__(
        self,
        config: ClusterConfig,
        settings: RouterSettings,
        *,
        selector: HostSelector,
        affinity: AffinityTable,
        counters: Counter[str],
        tls: bool = False,
    ) -> None:
        self.config = config
        self.settings = settings
        self.selector = selector
        self.affinity = affinity
        self.counters = counters
        self.tls = tls
        self.proto = b"https" if tls else b"http"
        self.apps: dict[str, Application] = {a.name: a for a in config.applications}
        self.default_app = settings.default_app or config.applications[0].name
        self.pools: dict[tuple[str, int], HostPool] = {}
        self.app_pools: dict[str, dict[str, HostPool]] = {}
        # Pools only for the applications requests can be routed to: the others (L4
        # applications such as a byte sink, or the routers' own VIP application, whose
        # pool is the routers themselves) must not get pre-established connections.
        routed = {self.default_app, *(r.app for r in settings.rules)}
        for app in config.applications:
            if app.name not in routed:
                continue
            port = settings.backend_ports.get(app.name, app.port)
            by_host: dict[str, HostPool] = {}
            for m in app.pool:
                if m.weight <= 0:
                    continue
                key = (m.host, port)
                pool = self.pools.get(key)
                if pool is None:
                    pool = self.pools[key] = HostPool(
                        m.host,
                        config.host(m.host).address,
                        port,
                        min_idle=settings.pool_min_idle,
                        max_idle=settings.pool_max_idle,
                        connect_timeout=settings.backend_connect_timeout,
                        down_for=settings.host_down_for,
                        counters=counters,
                    )
                by_host[m.host] = pool
            self.app_pools[app.name] = by_host
        self.header_rules: dict[str, list[HeaderRule]] = {
            a: [r for r in settings.header_rules if r.app in ("*", a)] for a in self.apps
        }
        # Per application: the request / response header names always dropped, and the
        # rendered header lines its rules set.
        self.request_drop: dict[str, frozenset[bytes]] = {}
        self.request_set: dict[str, bytes] = {}
        self.response_drop: dict[str, frozenset[bytes]] = {}
        self.response_set: dict[str, bytes] = {}
        for a, rules in self.header_rules.items():
            rq = set(HOP_BY_HOP) | _FORWARD_DROP
            rs = set(HOP_BY_HOP)
            for r in rules:
                rq.update(n.lower().encode() for n in r.request_remove)
                rq.update(n.lower().encode() for n in r.request_set)
                rs.update(n.lower().encode() for n in r.response_remove)
                rs.update(n.lower().encode() for n in r.response_set)
            self.request_drop[a] = frozenset(rq)
            self.response_drop[a] = frozenset(rs)
            self.request_set[a] = b"".join(
                b"%b: %b\r\n" % (n.encode(), v.encode())
                for r in rules
                for n, v in r.request_set.items()
            )
            self.response_set[a] = b"".join(
                b"%b: %b\r\n" % (n.encode(), v.encode())
                for r in rules
                for n, v in r.response_set.items()
            )
        self.proto_line = b"X-Forwarded-Proto: " + self.proto + b"\r\n"
        self.app_cookie = settings.app_cookie.encode() if settings.app_cookie is not None else None
        self.cookie_start = f"Set-Cookie: {settings.affinity_cookie}=".encode()
        self.strip_cookie = (
            settings.affinity_cookie.encode()
            if settings.affinity and not settings.forward_affinity_cookie
            else None
        )
        attrs = "; Path=/; HttpOnly"
        if tls:
            attrs += "; Secure"
        if settings.affinity_max_age is not None:
            attrs += f"; Max-Age={settings.affinity_max_age}"
        self.cookie_attrs = attrs.encode() + b"\r\n"
        self.cookie_key = affinity.key("http-cookie", "")
        """``affinity.key("http-cookie", id)`` is this + id (ids are short and plain)."""
        self._rid_prefix = secrets.token_hex(6)
        self._rid_head = b"X-Request-Id: " + self._rid_prefix.encode() + b"-%x\r\n"
        self.status_lines: dict[tuple[int, bytes], bytes] = {}
        self._rid = itertools.count(1)
        self.connections: set[ClientConnection] = set()

    # -- routing -----------------------------------------------------------------------

    def route(self, head: RequestHead) -> str:
        for rule in self.settings.rules:
            if rule.matches(head.host, head.path):
                return rule.app
        return self.default_app

    def alive(self, app: str, host: str, now: float) -> bool:
        pool = self.app_pools[app].get(host)
        if pool is None or not pool.up(now):
            return False
        if isinstance(self.selector, TokenSelector):
            st = self.selector.apps.get(app)
            latest = st.latest if st is not None else None
            if latest is not None and latest.expires > now and host not in latest.healthy:
                return False
        return True

    def pick(self, app: str, now: float, exclude: set[str]) -> HostPool | None:
        pools = self.app_pools[app]
        for _ in range(2 * len(pools) + 1):
            host = self.selector.choose(app, now)
            if host is None:
                break
            if host not in exclude and host in pools and self.alive(app, host, now):
                return pools[host]
        for host, pool in pools.items():  # the selector keeps naming dead hosts
            if host not in exclude and self.alive(app, host, now):
                self.counters["selector_overridden"] += 1
                return pool
        return None

    def request_id(self) -> bytes:
        return f"{self._rid_prefix}-{next(self._rid):x}".encode()


def _cookies(values: tuple[bytes, ...]) -> dict[str, str]:
    """The cookies of a request's Cookie header ``values``: the first value of each name."""
    out: dict[str, str] = {}
    for v in values:
        for part in v.decode("latin-1").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name not in out:
                out[name] = value.strip().strip('"')
    return out


def _without_cookie(value: bytes, name: bytes) -> bytes:
    """A Cookie header ``value`` without the pairs named ``name``."""
    if name not in value:
        return value
    kept = [
        part.strip()
        for part in value.split(b";")
        if part.strip() and part.partition(b"=")[0].strip() != name
    ]
    return b"; ".join(kept)


class ClientConnection:
    """Serves the requests of one client connection, one after another."""

    def __init__(
        self,
        router: Router,
        stream: Stream,
    ) -> None:
        self.router = router
        self.settings = router.settings
        self.counters = router.counters
        self.stream = self.writer = stream
        self.loop = stream.loop
        s = self.settings
        self.parser = RequestReader(
            max_header_bytes=s.max_header_bytes,
            max_headers=s.max_headers,
            max_body_bytes=s.max_body_bytes,
        )
        peer = stream.get_extra_info("peername")
        self.client_ip = (peer[0] if isinstance(peer, tuple) else "unknown").encode()
        self.eof = False
        self.tls_key: str | None = None
        self.tls_recorded = False
        ssl_object = stream.get_extra_info("ssl_object")
        if ssl_object is not None and s.tls_session_affinity:
            self.tls_key = tls_session_key(ssl_object)
        self.response_started = False
        # The fast path: a simple request (whole, no body, keep-alive) that arrives while
        # the coroutine waits for the next request is sent from the client's data
        # callback, and its response, when whole, answered from the backend's: the
        # coroutine does not wake. Anything else goes back to the coroutine.
        self._idle_wait = False
        """The coroutine is suspended in ``_read_head``'s read, between requests."""
        self._pending: _Pending | None = None
        self._handoff: tuple[RequestHead, str, HostPool | None, str | None] | None = None
        self._drain_due = False

    # -- the connection's life ------------------------------------------------------------

    async def serve(self) -> None:
        self.router.connections.add(self)
        self.counters["client_connections"] += 1
        try:
            while True:
                outcome: RequestHead | _Wake | HttpError | ClientTimeout | None
                try:
                    outcome = await self._read_head()
                except (HttpError, ClientTimeout) as exc:
                    outcome = exc
                if self._pending is not None or self._handoff is not None or self._drain_due:
                    was_pending = self._pending is not None
                    if not await self._catch_up():
                        break
                    if outcome is _WAKE or (was_pending and isinstance(outcome, ClientTimeout)):
                        continue  # the timeout was the backend's
                if isinstance(outcome, HttpError):
                    err = outcome
                    self.counters[f"client_errors_{err.status}"] += 1
                    self.writer.write(error_response(err.status, err.reason))
                    break
                if isinstance(outcome, ClientTimeout):
                    if self.parser.in_message:
                        self.counters["client_errors_408"] += 1
                        self.writer.write(error_response(408))
                    else:
                        self.counters["client_idle_closes"] += 1
                    break
                if outcome is None:
                    break
                if isinstance(outcome, _Wake):
                    continue
                if not await self._handle(outcome):
                    break
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()
        except (ClientGone, ConnectionError, OSError):
            self.counters["client_connections_lost"] += 1
        finally:
            self.router.connections.discard(self)
            self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    # -- reading the client ---------------------------------------------------------------

    async def _client_event(self, timeout: float) -> RequestHead | bytes | End:
        events = self.parser.events
        while not events:
            if self.eof:
                raise ClientGone("client closed")
            try:
                data = await self.stream.read(READ_SIZE, timeout)
            except TimeoutError:
                raise ClientTimeout() from None
            if data:
                self.parser.feed(data)
            else:
                self.eof = True
                self.parser.feed_eof()
        ev = events.popleft()
        if isinstance(ev, HttpError):
            raise ev
        return ev

    async def _catch_up(self) -> bool:
        """Finish what the fast path left to the coroutine; False: close the connection."""
        handoff = self._handoff
        if handoff is not None:
            self._handoff = None
            head, app, pool, cookie = handoff
            return await self._handle(head, pre=(app, pool, cookie))
        pending = self._pending
        if pending is not None:
            self._pending = None
            pending.conn.stream.hook = None
            return await self._handle(pending.head, resume=pending)
        if self._drain_due:
            self._drain_due = False
            await self.writer.drain()
        return True

    async def _read_head(self) -> RequestHead | _Wake | None:
        s = self.settings
        loop = self.loop
        deadline: float | None = None
        while True:
            if self.parser.events:
                ev = await self._client_event(1.0)
                if isinstance(ev, RequestHead):
                    return ev
                if isinstance(ev, End):
                    continue  # the end of a request without a body
                raise HttpError(400, "unexpected body")  # bodies are consumed by the upload
            if self.parser.in_message and deadline is None:
                deadline = loop.time() + s.client_header_timeout
            timeout = s.client_idle_timeout if deadline is None else deadline - loop.time()
            if timeout <= 0:
                raise ClientTimeout()
            self._idle_wait = deadline is None and not self.parser.in_message
            try:
                data = await self.stream.read(READ_SIZE, timeout)
            except Kick:
                if self._pending is not None or self._handoff is not None or self._drain_due:
                    return _WAKE
                continue  # the client's data is in the parser
            except TimeoutError:
                raise ClientTimeout() from None
            except (ConnectionError, OSError):
                return None
            finally:
                self._idle_wait = False
            if not data:
                self.eof = True
                self.parser.feed_eof()
                if not self.parser.events:
                    return None
            else:
                self.parser.feed(data)

    async def _skip_body(self) -> bool:
        """Read and drop the rest of a request body; False if the connection cannot go on."""
        try:
            while not isinstance(await self._client_event(self.settings.client_idle_timeout), End):
                pass
        except (HttpError, ClientGone, ClientTimeout, ConnectionError, OSError):
            return False
        return True

    # -- one request -------------------------------------------------------------------------

    async def _answer(self, head: RequestHead, status: int, detail: str = "") -> bool:
        """Answer a request ourselves; True if the connection goes on."""
        self.counters[f"responses_{status}"] += 1
        keep = head.keep_alive and not head.has_body
        self.writer.write(error_response(status, detail, close=not keep))
        return keep

    async def _handle(
        self,
        head: RequestHead,
        pre: tuple[str, HostPool | None, str | None] | None = None,
        resume: _Pending | None = None,
    ) -> bool:
        """Serve one request; True if the connection goes on.

        ``pre``: the fast path routed it (application, first host, cookie) and found no
        idle connection. ``resume``: the fast path sent it; its response is to be read.
        """
        router = self.router
        loop = self.loop
        choice: _Choice | None = None
        if resume is not None:
            app = resume.app
        elif pre is not None:
            app = pre[0]
        else:
            self.counters["requests"] += 1
            app = router.route(head)
            choice = (
                await self._affinity(head, app, loop.time())
                if self.settings.affinity and (head.cookies or self.tls_key is not None)
                else None  # nothing to look up
            )
        tried: set[str] = set()
        sent_once = False
        continued = False
        connect_failed = False
        self.response_started = False
        while True:
            now = loop.time()
            sent = resume
            if sent is not None:
                resume = None
                pool: HostPool | None = sent.pool
                conn = sent.conn
                cookie = sent.cookie
                tried.add(sent.pool.host)
            else:
                if pre is not None:
                    pool, cookie = pre[1], pre[2]
                    pre = None
                elif choice is not None:
                    pool = choice.pool
                    cookie = choice.cookie
                    choice = None
                else:
                    pool = router.pick(app, now, tried)
                    cookie = None
                if pool is None:
                    if connect_failed:
                        return await self._answer(head, 502, "no backend could be reached")
                    self.counters["no_host"] += 1
                    return await self._answer(head, 503, "no host available")
                tried.add(pool.host)
                try:
                    conn = pool.take() or await pool.acquire()
                except ConnectFailed:
                    connect_failed = True
                    self.counters["backend_connect_retries"] += 1
                    continue
                if head.expect_continue and head.has_body and not continued:
                    continued = True
                    self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            assert pool is not None
            try:
                if sent is not None:
                    return await self._resumed(head, sent)
                return await self._exchange(head, app, pool, conn, cookie)
            except BackendFailed as exc:
                pool.release(conn, False)
                if self.response_started:
                    self.counters["backend_failures_mid_response"] += 1
                    return False
                if exc.timeout:
                    self.counters["backend_timeouts"] += 1
                    return await self._answer(head, 504, "backend response timeout")
                self.counters["backend_failures"] += 1
                if (
                    exc.before_response
                    and not sent_once
                    and head.method in IDEMPOTENT
                    and not head.has_body
                ):
                    sent_once = True
                    self.counters["retries"] += 1
                    continue
                return await self._answer(head, 502, "backend failed")
            except _ClientAbort as abort:
                pool.release(conn, False)
                err = abort.error
                if isinstance(err, HttpError) and not self.response_started:
                    self.counters[f"client_errors_{err.status}"] += 1
                    self.writer.write(error_response(err.status, err.reason))
                elif isinstance(err, ClientTimeout) and not self.response_started:
                    self.counters["client_errors_408"] += 1
                    self.writer.write(error_response(408))
                return False

    async def _affinity(self, head: RequestHead, app: str, now: float) -> _Choice | None:
        s = self.settings
        router = self.router
        if not s.affinity:
            return None
        aff = router.affinity
        cookies = _cookies(head.cookies) if head.cookies else {}
        value = cookies.get(s.affinity_cookie)
        if value is not None and _AFFINITY_ID.match(value):
            host = await aff.lookup(aff.key("http-cookie", value))
            if host is not None and router.alive(app, host, now):
                self.counters["affinity_kept"] += 1
                return _Choice(router.app_pools[app][host], value)
            self.counters["affinity_reset"] += 1
        if s.app_cookie is not None and (app_value := cookies.get(s.app_cookie)):
            key = _app_cookie_key(s.app_cookie, app_value)
            host = await aff.lookup(key) if key is not None else None
            if host is not None and router.alive(app, host, now):
                self.counters["affinity_app_cookie"] += 1
                return _Choice(router.app_pools[app][host])
        if self.tls_key is not None:
            host = await aff.lookup(self.tls_key)
            if host is not None and router.alive(app, host, now):
                self.counters["affinity_tls_session"] += 1
                return _Choice(router.app_pools[app][host])
        return None

    def _request_bytes(self, head: RequestHead, app: str, pool: HostPool) -> bytes:
        router = self.router
        drop = router.request_drop[app]
        if head.connection and not head.connection <= drop:
            drop = drop | head.connection
        xff: list[bytes] = []
        has_rid = False
        parts = [head.method.encode(), b" ", head.target, b" HTTP/1.1\r\n"]
        for k, v in head.headers:
            lk = k.lower()
            if lk == b"x-forwarded-for":
                xff.append(v.strip())
            elif lk == b"x-request-id":
                has_rid = True
            elif lk == b"cookie" and router.strip_cookie is not None:
                v = _without_cookie(v, router.strip_cookie)
                if not v:
                    continue
            if lk not in drop:
                parts += (k, b": ", v, b"\r\n")
        if not head.host:  # HTTP/1.0 without Host: HTTP/1.1 to the backend needs one
            parts.append(f"Host: {pool.address}:{pool.port}\r\n".encode())
        if xff:
            xff.append(self.client_ip)
            parts += (b"X-Forwarded-For: ", b", ".join(x for x in xff if x), b"\r\n")
        else:
            parts += (b"X-Forwarded-For: ", self.client_ip, b"\r\n")
        parts.append(router.proto_line)
        if not has_rid:
            parts.append(router._rid_head % next(router._rid))
        parts.append(router.request_set[app])
        if head.framing == "chunked":
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif head.framing == "length":
            parts.append(b"Content-Length: %d\r\n" % head.length)
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _exchange(
        self,
        head: RequestHead,
        app: str,
        pool: HostPool,
        conn: BackendConn,
        cookie: str | None,
    ) -> bool:
        if conn.parser is None:
            conn.parser = ResponseReader()
        rparser = conn.parser
        rparser.start(head.method)
        rparser.bytes_seen = 0
        upload: asyncio.Task[None] | None = None
        try:
            conn.stream.write(self._request_bytes(head, app, pool))
        except (ConnectionError, OSError) as exc:
            raise BackendFailed(str(exc), True) from exc
        if head.has_body:
            upload = asyncio.create_task(self._upload(conn, head.framing == "chunked"))
        try:
            return await self._respond(head, app, pool, conn, rparser, upload, cookie)
        finally:
            if upload is not None and not upload.done():
                upload.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await upload

    async def _backend_event(
        self, conn: BackendConn, rparser: ResponseReader, upload: asyncio.Task[None] | None
    ) -> ResponseHead | bytes | End:
        events = rparser.events
        while not events:
            try:
                data = await conn.stream.read(READ_SIZE, self.settings.backend_response_timeout)
            except TimeoutError:
                self._check_upload(upload)
                raise BackendFailed("timeout", rparser.bytes_seen == 0, timeout=True) from None
            except (ConnectionError, OSError) as exc:
                self._check_upload(upload)
                raise BackendFailed(str(exc), rparser.bytes_seen == 0) from exc
            try:
                if data:
                    rparser.feed(data)
                else:
                    rparser.feed_eof()
            except BackendProtocolError as exc:
                self._check_upload(upload)
                raise BackendFailed(str(exc), rparser.bytes_seen == 0) from exc
        return events.popleft()

    def _check_upload(self, upload: asyncio.Task[None] | None) -> None:
        """A backend failure caused by the client's body: report the client's error."""
        if upload is not None and upload.done() and not upload.cancelled():
            exc = upload.exception()
            if isinstance(exc, _ClientAbort):
                raise exc

    async def _upload(self, conn: BackendConn, chunked: bool) -> None:
        timeout = self.settings.client_idle_timeout
        writer = conn.stream
        try:
            while True:
                ev = await self._client_event(timeout)
                if isinstance(ev, End):
                    if chunked:
                        writer.write(LAST_CHUNK)
                    return
                if not isinstance(ev, bytes) or not ev:
                    continue
                writer.write(chunk(ev) if chunked else ev)
                if writer.buffered() > HIGH_WATER:
                    await writer.drain()
        except (HttpError, ClientTimeout, ClientGone) as exc:
            conn.close()
            raise _ClientAbort(exc) from exc
        except (ConnectionError, OSError):
            return  # the backend went away: the response side reports it

    async def _respond(
        self,
        head: RequestHead,
        app: str,
        pool: HostPool,
        conn: BackendConn,
        rparser: ResponseReader,
        upload: asyncio.Task[None] | None,
        cookie: str | None,
    ) -> bool:
        ev = await self._backend_event(conn, rparser, upload)
        if not isinstance(ev, ResponseHead):
            raise BackendFailed("no response head", False)
        rendered, client_keep, chunked_out = self._render_head(head, app, pool, ev, upload, cookie)
        buf = [rendered]
        writer = self.writer
        events = rparser.events
        while True:
            while events:
                ev = events.popleft()
                if isinstance(ev, End):
                    if chunked_out:
                        buf.append(LAST_CHUNK)
                    writer.write(b"".join(buf))
                    return await self._finish(head, pool, conn, rparser, upload, client_keep)
                if isinstance(ev, bytes) and ev:
                    buf.append(chunk(ev) if chunked_out else ev)
            if buf:
                writer.write(b"".join(buf))
                buf = []
                if writer.buffered() > HIGH_WATER:
                    await writer.drain()
            ev = await self._backend_event(conn, rparser, upload)
            events.appendleft(ev)

    def _render_head(
        self,
        head: RequestHead,
        app: str,
        pool: HostPool,
        rhead: ResponseHead,
        upload: asyncio.Task[None] | None,
        cookie: str | None,
    ) -> tuple[bytes, bool, bool]:
        """The response head for the client, whether the connection goes on, chunked out."""
        client_keep = head.keep_alive
        chunked_out = False
        router = self.router
        drop = router.response_drop[app]
        if rhead.connection and not rhead.connection <= drop:
            drop = drop | rhead.connection
        s = self.settings
        app_cookie = router.app_cookie
        status = rhead.status
        line_key = (status, rhead.reason)
        line = router.status_lines.get(line_key)
        if line is None:
            line = b"HTTP/1.1 %d %b\r\n" % (status, rhead.reason or b"-")
            if len(router.status_lines) < 256:
                router.status_lines[line_key] = line
        parts = [line]
        strip_length = rhead.framing in ("chunked", "close")
        for k, v in rhead.headers:
            lk = k.lower()
            if lk in drop:
                continue
            if strip_length and lk == b"content-length":
                continue
            if app_cookie is not None and lk == b"set-cookie":
                self._note_app_cookie(app_cookie, v, pool.host)
            parts += (k, b": ", v, b"\r\n")
        parts.append(router.response_set[app])
        if strip_length:
            if head.version == "1.1":
                chunked_out = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                client_keep = False
        if s.affinity and cookie is None and 200 <= status < 400 and head.user_agent != PROBE_AGENT:
            # A session starts with a successful answer to a client; health
            # probes and errors start none (each would be a tracker entry).
            new_id = _token()
            router.affinity.record(router.cookie_key + new_id, pool.host)
            parts += (router.cookie_start, new_id.encode(), router.cookie_attrs)
        if self.tls_key is not None and not self.tls_recorded:
            self.tls_recorded = True
            router.affinity.record(self.tls_key, pool.host)
        if upload is not None and not upload.done():
            # Responding before the whole body arrived: the rest of it cannot be
            # told from a next request unless we read it, so close after.
            client_keep = False
        if not client_keep:
            parts.append(b"Connection: close\r\n")
        elif head.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        key = _RESPONSES.get(status // 100)
        if key is None:
            key = f"responses_{status // 100}xx"
        self.counters[key] += 1
        self.response_started = True
        return b"".join(parts), client_keep, chunked_out

    async def _resumed(self, head: RequestHead, sent: _Pending) -> bool:
        """The response to a request the fast path sent (``_exchange``'s second half)."""
        conn = sent.conn
        rparser = conn.parser
        assert rparser is not None
        if sent.error is not None:
            raise BackendFailed(str(sent.error), rparser.bytes_seen == 0)
        stream = conn.stream
        if (
            not rparser.events
            and not stream.has_data()
            and not stream.at_eof()
            and self.loop.time() >= sent.deadline
        ):
            raise BackendFailed("timeout", rparser.bytes_seen == 0, timeout=True)
        return await self._respond(head, sent.app, sent.pool, conn, rparser, None, sent.cookie)

    # -- the fast path -----------------------------------------------------------------

    def client_data(self, data: bytes) -> bool:
        """Client bytes while the coroutine waits between requests; False: not taken."""
        stream = self.stream
        if self.eof or not stream.waiting() or stream.has_data():
            return False
        if self._pending is not None or self._handoff is not None or self._drain_due:
            stream.push(data)
            stream.kick()
            return True
        parser = self.parser
        if parser.events or parser.in_message or parser.failed:
            return False
        parser.feed(data)
        events = parser.events
        if len(events) != 2 or events[1] is not END or not self._start_fast(events[0]):
            stream.kick()  # the coroutine takes it from the parser
        return True

    def _start_fast(self, head: object) -> bool:
        """Send a whole request without a body from the callback; False: nothing done."""
        if (
            not isinstance(head, RequestHead)
            or not head.keep_alive
            or head.has_body
            or head.expect_continue
            or self.tls_key is not None
        ):
            return False
        router = self.router
        s = self.settings
        loop = self.loop
        app = router.route(head)
        now = loop.time()
        choice: _Choice | None = None
        if s.affinity and head.cookies:
            counts: list[str] = []
            ok, choice = self._affinity_nowait(head, app, now, counts)
            if not ok:
                return False
            for name in counts:
                self.counters[name] += 1
        self.parser.events.clear()  # the head and its END
        self.counters["requests"] += 1
        self.response_started = False
        if choice is not None:
            pool: HostPool | None = choice.pool
            cookie = choice.cookie
        else:
            pool = router.pick(app, now, set())
            cookie = None
        conn = pool.take() if pool is not None else None
        if pool is None or conn is None:
            self._handoff = (head, app, pool, cookie)
            self.stream.kick()
            return True
        if conn.parser is None:
            conn.parser = ResponseReader()
        rparser = conn.parser
        rparser.start(head.method)
        rparser.bytes_seen = 0
        deadline = now + s.backend_response_timeout
        self._pending = _Pending(head, app, pool, conn, cookie, deadline)
        conn.stream.hook = self._backend_data
        self.stream.set_deadline(deadline)
        conn.stream.write(self._request_bytes(head, app, pool))
        return True

    def _affinity_nowait(
        self, head: RequestHead, app: str, now: float, counts: list[str]
    ) -> tuple[bool, _Choice | None]:
        """``_affinity`` from the cache alone (no TLS key); (False, None): needs the tracker.

        The counters it would bump go to ``counts``, to be applied only on success.
        """
        s = self.settings
        router = self.router
        cookies = _cookies(head.cookies)
        value = cookies.get(s.affinity_cookie)
        if value is not None and _AFFINITY_ID.match(value):
            ok, host = self._lookup_nowait(router.cookie_key + value, counts)
            if not ok:
                return False, None
            if host is not None and router.alive(app, host, now):
                counts.append("affinity_kept")
                return True, _Choice(router.app_pools[app][host], value)
            counts.append("affinity_reset")
        if s.app_cookie is not None and (app_value := cookies.get(s.app_cookie)):
            key = _app_cookie_key(s.app_cookie, app_value)
            host = None
            if key is not None:
                ok, host = self._lookup_nowait(key, counts)
                if not ok:
                    return False, None
            if host is not None and router.alive(app, host, now):
                counts.append("affinity_app_cookie")
                return True, _Choice(router.app_pools[app][host])
        return True, None

    def _lookup_nowait(self, key: str, counts: list[str]) -> tuple[bool, str | None]:
        """``AffinityTable.lookup`` without the tracker; (False, None): it needs the tracker."""
        aff = self.router.affinity
        host = aff.cached(key)
        if host is not None:
            counts.append("affinity_cache_hits")
            return True, host
        if aff.tracker is None:
            counts.append("affinity_unknown")
            return True, None
        return False, None

    def _backend_data(self, data: bytes | None) -> None:
        """The backend hook of a fast-path request: answer a whole response at once."""
        p = self._pending
        if p is None:
            return
        conn = p.conn
        if data is None:  # EOF or lost: the coroutine reads what happened
            self._fall_back(p)
            return
        rparser = conn.parser
        assert rparser is not None
        try:
            rparser.feed(data)
        except BackendProtocolError as exc:
            p.error = exc
            self._fall_back(p)
            return
        events = rparser.events
        if not events or not isinstance(events[-1], End):
            if rparser.bytes_seen > HIGH_WATER:
                self._fall_back(p)
            else:
                p.deadline = self.loop.time() + self.settings.backend_response_timeout
                self.stream.set_deadline(p.deadline)
            return
        rhead = events[0]
        head = p.head
        if not isinstance(rhead, ResponseHead) or (
            rhead.framing in ("chunked", "close") and head.version != "1.1"
        ):
            self._fall_back(p)
            return
        self._pending = None
        conn.stream.hook = None
        events.popleft()
        rendered, _, chunked_out = self._render_head(head, p.app, p.pool, rhead, None, p.cookie)
        buf = [rendered]
        for ev in events:
            if isinstance(ev, bytes) and ev:
                buf.append(chunk(ev) if chunked_out else ev)
        if chunked_out:
            buf.append(LAST_CHUNK)
        events.clear()
        writer = self.writer
        writer.write(b"".join(buf))
        p.pool.release(conn, rparser.reusable)
        self.stream.set_deadline(self.loop.time() + self.settings.client_idle_timeout)
        if writer.buffered() > HIGH_WATER:
            self._drain_due = True
            self.stream.kick()

    def _fall_back(self, p: _Pending) -> None:
        p.conn.stream.hook = None
        self.stream.kick()  # not waiting: the coroutine is on its way to ``_catch_up``

    async def _finish(
        self,
        head: RequestHead,
        pool: HostPool,
        conn: BackendConn,
        rparser: ResponseReader,
        upload: asyncio.Task[None] | None,
        client_keep: bool,
    ) -> bool:
        reusable = rparser.reusable
        if upload is not None:
            if upload.done():
                exc = upload.exception() if not upload.cancelled() else None
                if exc is not None:
                    reusable = client_keep = False
            else:
                upload.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await upload
                reusable = client_keep = False
        pool.release(conn, reusable)
        if self.writer.buffered() > HIGH_WATER:
            await self.writer.drain()
        return client_keep

    def _note_app_cookie(self, name: bytes, set_cookie: bytes, host: str) -> None:
        first = set_cookie.split(b";", 1)[0]
        cname, sep, value = first.partition(b"=")
        if sep and cname.strip() == name and value.strip():
            key = _app_cookie_key(name.decode("latin-1"), value.strip().decode("latin-1"))
            if key is not None:
                self.router.affinity.record(key, host)


def tls_session_key(ssl_object: object) -> str | None:
    """The tracker key of a connection's TLS session, or None when it has no stable id.

    Python exposes the server side's session id (``SSLObject.session.id``). Under
    TLS 1.2 a resumed session keeps the id the client offered, so it identifies
    the session across connections (not the first, ticket-based handshake: its
    id is empty). Under TLS 1.3 OpenSSL makes up a new id for every handshake,
    resumed or not, so it is not used: the affinity cookie carries the session.
    """
    version = getattr(ssl_object, "version", lambda: None)()
    if version not in ("TLSv1.2", "TLSv1.1", "TLSv1"):
        return None
    session = getattr(ssl_object, "session", None)
    sid = getattr(session, "id", b"") if session is not None else b""
    if not isinstance(sid, bytes) or not sid:
        return None
    return session_key("tls-session", sid.hex())


class _ClientAbort(Exception):
    """The client broke off while its request body was being uploaded."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_TOKENS: list[str] = []
os.register_at_fork(after_in_child=_TOKENS.clear)


def _token() -> str:
    """``secrets.token_urlsafe(18)``, from ``os.urandom`` read in bulk (one syscall per 512)."""
    if not _TOKENS:
        # 18 bytes encode to 24 characters without "=": the batch's encoding is the
        # tokens' encodings one after another.
        text = base64.urlsafe_b64encode(os.urandom(18 * 512)).decode("ascii")
        _TOKENS.extend(text[i : i + 24] for i in range(0, len(text), 24))
    return _TOKENS.pop()


def _app_cookie_key(name: str, value: str) -> str | None:
    """The tracker key of an application session cookie, None for an unusable value."""
    if not value or len(value) > 256 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        return None
    return session_key("http-cookie", f"{name}={value}")

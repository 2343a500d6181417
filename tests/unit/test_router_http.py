"""The router's HTTP framing without I/O: a malformed-request corpus and Hypothesis fuzzing.

Invariant (h11's): any input, whole or split anywhere, either parses into
requests or ends in one ``HttpError`` event with a 4xx/5xx status; never any
other exception; nothing after the error.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hanlb.config import parse_config
from hanlb.router.affinity import AffinityTable
from hanlb.router.config import RouterSettings, RouteRule
from hanlb.router.http import (
    END,
    HttpError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    error_response,
    hop_by_hop_names,
)
from hanlb.router.proxy import _without_cookie, tls_session_key

GOOD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"

# (name, raw request, statuses accepted)
CORPUS: list[tuple[str, bytes, set[int]]] = [
    ("bad request line", b"GARBAGE\r\n\r\n", {400}),
    ("no version", b"GET /\r\nHost: a\r\n\r\n", {400, 505}),
    ("bad version", b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", {400}),
    ("lower-case method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", {400}),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", {400}),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", {400}),
    ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n", {400}),
    ("bare CR", b"GET / HTTP/1.1\rHost: a\r\r", {400}),
    ("NUL in header", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", {400}),
    ("NUL in target", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("no host", b"GET / HTTP/1.1\r\n\r\n", {400}),
    ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    (
        "CL and TE (smuggling)",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        {400},
    ),
    (
        "TE and CL (smuggling)",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"0\r\n\r\n",
        {400},
    ),
    (
        "two different CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        {400},
    ),
    ("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nab", {400}),
    ("negative CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", {400}),
    ("CL with sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", {400}),
    (
        "huge CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        {400, 413},
    ),
    ("hex CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", {400}),
    (
        "TE not chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        {400, 501},
    ),
    (
        "TE chunked twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        {400, 501},
    ),
    (
        "TE obfuscated",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
        {400, 501},
    ),
    (
        "invalid chunk size",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        {400},
    ),
    (
        "negative chunk size",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
        {400},
    ),
    (
        "huge chunk size",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffffffff\r\nab\r\n",
        {400, 413},
    ),
    (
        "chunk without CRLF",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
        {400},
    ),
    ("expect unknown", b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", {417}),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", {400, 501}),
    ("oversize header", b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000 + b"\r\n\r\n", {431}),
    ("oversize target", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", {431}),
    (
        "too many headers",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 200 + b"\r\n",
        {431},
    ),
    ("too large body", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999\r\n\r\n", {413}),
    ("absolute target, bad scheme", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("control char in header name", b"GET / HTTP/1.1\r\nHost: a\r\nX\x01: 1\r\n\r\n", {400}),
    ("high bytes in method", b"G\xffT / HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
]


def reader() -> RequestReader:
    return RequestReader(max_header_bytes=16384, max_headers=100, max_body_bytes=1 << 20)


def drain(r: RequestReader) -> list[object]:
    out: list[object] = []
    while r.events:
        out.append(r.events.popleft())
    return out


@pytest.mark.parametrize(("name", "raw", "statuses"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_requests_are_refused(name: str, raw: bytes, statuses: set[int]) -> None:
    for split in (None, 1):
        r = reader()
        if split is None:
            r.feed(raw)
        else:
            for i in range(len(raw)):
                r.feed(raw[i : i + 1])
        r.feed_eof()
        events = drain(r)
        errors = [e for e in events if isinstance(e, HttpError)]
        assert errors, f"{name}: accepted as {events!r}"
        assert errors[0].status in statuses, f"{name}: {errors[0]}"
        assert events[-1] is errors[0], "nothing after the error"


def test_good_requests_parse_whole_and_byte_by_byte() -> None:
    raw = (
        GOOD
        + b"POST /p?q=1 HTTP/1.1\r\nHost: b:80\r\nContent-Length: 3\r\n\r\nabc"
        + b"PUT /c HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n"
        + b"Expect: 100-continue\r\n\r\n"
        + b"2;ext=1\r\nab\r\n1\r\nc\r\n0\r\nTrailer: x\r\n\r\n"
        + b"GET http://abs.example/x/y?z HTTP/1.1\r\nHost: ignored\r\n\r\n"
        + b"GET /old HTTP/1.0\r\n\r\n"
    )
    for step in (len(raw), 1, 7):
        r = reader()
        for i in range(0, len(raw), step):
            r.feed(raw[i : i + step])
        events = drain(r)
        heads = [e for e in events if isinstance(e, RequestHead)]
        assert [h.method for h in heads] == ["GET", "POST", "PUT", "GET", "GET"]
        assert [h.host for h in heads] == ["a", "b", "c", "abs.example", ""]
        assert [h.path for h in heads] == ["/", "/p", "/c", "/x/y", "/old"]
        assert heads[1].framing == "length" and heads[1].length == 3
        assert heads[2].framing == "chunked" and heads[2].expect_continue
        assert not heads[4].keep_alive and heads[0].keep_alive
        body = b"".join(e for e in events if isinstance(e, bytes))
        assert body == b"abcabc"
        assert sum(1 for e in events if e is END) == 5
        assert not any(isinstance(e, HttpError) for e in events)


def test_cut_short_request_is_an_error_at_eof() -> None:
    r = reader()
    r.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    r.feed_eof()
    assert isinstance(drain(r)[-1], HttpError)
    r = reader()
    r.feed(GOOD)
    r.feed_eof()
    assert drain(r)[-1] is END


def test_body_limit_counts_chunked_bodies() -> None:
    r = RequestReader(max_body_bytes=5)
    r.feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n4\r\nefgh\r\n"
    )
    err = drain(r)[-1]
    assert isinstance(err, HttpError) and err.status == 413


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes(data: bytes, step: int) -> None:
    r = reader()
    for i in range(0, len(data), step):
        r.feed(data[i : i + step])
    r.feed_eof()
    events = drain(r)
    errors = [e for e in events if isinstance(e, HttpError)]
    assert len(errors) <= 1
    if errors:
        assert events[-1] is errors[0]
        assert 400 <= errors[0].status < 600


_tokens = st.sampled_from(
    [
        b"GET ", b"POST ", b"/", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"\r", b": ",
        b"Host", b"Content-Length", b"Transfer-Encoding", b"chunked", b"0", b"5", b"-1",
        b"ffffffffff", b"\x00", b"abc", b" ", b";", b",", b"Expect", b"100-continue",
        b"Connection", b"close", b"Upgrade", b"h2c", b"\t",
    ]
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(st.lists(_tokens, max_size=60), st.integers(min_value=1, max_value=16))
def test_fuzz_http_shaped_input(parts: list[bytes], step: int) -> None:
    data = GOOD + b"".join(parts)
    r = reader()
    for i in range(0, len(data), step):
        r.feed(data[i : i + step])
    r.feed_eof()
    events = drain(r)
    assert isinstance(events[0], RequestHead)
    errors = [e for e in events if isinstance(e, HttpError)]
    assert len(errors) <= 1 and (not errors or events[-1] is errors[0])
    for e in events:
        if isinstance(e, RequestHead) and e.framing == "length":
            assert e.length <= 1 << 20


def test_response_reader_framing() -> None:
    r = ResponseReader()
    r.start("GET")
    r.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    events = list(r.events)
    assert isinstance(events[0], ResponseHead) and events[0].status == 200
    assert events[0].framing == "chunked" and events[1:] == [b"abc", END]
    assert r.reusable
    r.start("HEAD")
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    events = list(r.events)
    assert events[-1] is END and r.reusable
    r.start("GET")
    r.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    r.feed_eof()
    events = list(r.events)
    assert events[1:] == [b"until close", END] and not r.reusable
    r = ResponseReader()
    r.start("GET")
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(Exception, match="closed"):
        r.feed_eof()


def test_hop_by_hop_and_error_response() -> None:
    names = hop_by_hop_names([(b"Connection", b"close, X-Foo"), (b"X-Foo", b"1")])
    assert b"x-foo" in names and b"keep-alive" in names and b"transfer-encoding" in names
    assert error_response(431).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_settings_validation() -> None:
    with pytest.raises(ValidationError):
        RouterSettings(tls_cert="/a")
    with pytest.raises(ValidationError):
        RouterSettings(affinity_cookie="bad cookie")
    with pytest.raises(ValidationError):
        RouteRule(app="web", path_prefix="nope")
    rule = RouteRule(app="web", host="*.example.com", path_prefix="/api")
    assert rule.matches("a.example.com", "/api/x") and not rule.matches("example.org", "/api")
    config = parse_config(
        {
            "cluster": {"key": "k" * 32},
            "hosts": [{"name": "h1", "address": "10.0.0.1", "mac": "02:00:00:00:00:01"}],
            "applications": [
                {"name": "web", "vip": "10.1.0.1", "port": 80, "pool": [{"host": "h1"}]}
            ],
        }
    )
    s = RouterSettings.model_validate(
        {"default_app": "nope", "rules": [{"app": "x"}], "backend_ports": {"web": 8080}}
    )
    fields = {f for f, _ in s.problems(config)}
    assert fields == {"router.default_app", "router.rules[0].app"}


class _FakeSession:
    def __init__(self, sid: bytes) -> None:
        self.id = sid


class _FakeSSL:
    def __init__(self, version: str, sid: bytes) -> None:
        self._version, self.session = version, _FakeSession(sid)

    def version(self) -> str:
        return self._version


def test_tls_session_key_only_for_stable_ids() -> None:
    assert tls_session_key(_FakeSSL("TLSv1.2", b"\x01\x02")) == "s|tls-session|0102"
    assert tls_session_key(_FakeSSL("TLSv1.2", b"")) is None  # first, ticket-based handshake
    assert tls_session_key(_FakeSSL("TLSv1.3", b"\x01")) is None  # a new id every handshake


def test_affinity_table_is_a_bounded_local_cache_without_tracker() -> None:
    async def scenario() -> None:
        counters: Counter[str] = Counter()
        table = AffinityTable(None, counters, cache_size=2)
        table.record("s|http-cookie|a", "h1")
        table.record("s|http-cookie|b", "h2")
        assert await table.lookup("s|http-cookie|a") == "h1"
        table.record("s|http-cookie|c", "h3")  # evicts b, the least recently used
        assert await table.lookup("s|http-cookie|b") is None
        assert await table.lookup("s|http-cookie|c") == "h3"
        assert counters["affinity_cache_hits"] == 2 and counters["affinity_unknown"] == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("value", "left"),
    [
        (b"A=1; B=2; C=3", b"A=1; C=3"),
        (b"B=2", b""),
        (b"B=2;B=3; A=x=y", b"A=x=y"),
        (b"XB=1; BX=2; A=1", b"XB=1; BX=2; A=1"),  # other names that contain it stay
        (b" A=1 ;  B = 2 ; ", b"A=1"),
    ],
)
def test_without_cookie_takes_out_only_that_name(value: bytes, left: bytes) -> None:
    assert _without_cookie(value, b"B") == left

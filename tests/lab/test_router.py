"""The L7 request routers in the namespace lab (claims 2, 12, 50-55).

The lab puts request routers ``rt<k>`` (``hl-rt<k>``) behind the second VIP,
10.93.0.2 (application ``web-l7``, mode http): the L4 tier (forwarders and
classifier) spreads client connections over the routers, and each router
routes every request on its own to application ``web`` on the hosts h1..h4.

Real-time bounds are generous on purpose (shared 2-core machines) and written
at each check: host agents probe every 0.2 s and mark an endpoint down after
2 failed probes, heartbeats go every 0.2 s, so a handler knows of a dead
endpoint well within 2 s.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from functools import partial
from typing import Any

import pytest

from hanlb.lab.topology import L7_APP, L7_VIP, TLS_NAME, Lab, hanlb_command
from hanlb.tracker.entry import session_key
from tests.lab.helpers import LabFactory, ctl, in_background, result_of, wait_for, wait_plumbed

COOKIE = "HANLB_AFFINITY"
BACKENDS = {"h1", "h2", "h3", "h4"}

# A small HTTP/1.1 client run inside a client namespace. Argument: a JSON object with
# host, port, cafile (None: plain HTTP), timeout, fresh (a new TCP connection for every
# request), cookie ("NAME=value" sent with every request, or None), keep_cookie (send
# the affinity cookie of the first response with the later requests) and requests
# ([method, path] pairs). Prints one JSON list: per request its status, X-Served-By,
# Set-Cookie, body length, the client's local port (one port = one TCP connection),
# the response headers, or its error.
CLIENT = r"""
import http.client, json, ssl, sys, time
a = json.loads(sys.argv[1])
ctx = ssl.create_default_context(cafile=a["cafile"]) if a["cafile"] else None

def connect():
    if ctx is not None:
        return http.client.HTTPSConnection(a["host"], a["port"], timeout=a["timeout"], context=ctx)
    return http.client.HTTPConnection(a["host"], a["port"], timeout=a["timeout"])

out, conn, cookie = [], None, a["cookie"]
for method, path in a["requests"]:
    if conn is not None and a["fresh"]:
        conn.close()
        conn = None
    if conn is None:
        conn = connect()
    rec = {"method": method, "path": path, "start": time.time()}
    try:
        conn.request(method, path, headers={"Cookie": cookie} if cookie else {})
        rec["port"] = conn.sock.getsockname()[1]
        resp = conn.getresponse()
        body = resp.read()
        rec.update(
            status=resp.status,
            served_by=resp.getheader("X-Served-By"),
            set_cookie=resp.getheader("Set-Cookie"),
            bytes=len(body),
            headers={k.lower(): v for k, v in resp.getheaders()},
            seconds=time.time() - rec["start"],
        )
        if a["keep_cookie"] and cookie is None and rec["set_cookie"]:
            cookie = rec["set_cookie"].split(";")[0]
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        conn.close()
        conn = None
    out.append(rec)
print(json.dumps(out))
"""


def http_client(
    lab: Lab,
    requests: list[tuple[str, str]],
    *,
    host: str = L7_VIP,
    port: int = 80,
    cafile: str | None = None,
    fresh: bool = False,
    cookie: str | None = None,
    keep_cookie: bool = False,
    timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """Run ``CLIENT`` in hl-c1 and return its records (see ``CLIENT``)."""
    args = {
        "host": host,
        "port": port,
        "cafile": cafile,
        "timeout": timeout,
        "fresh": fresh,
        "cookie": cookie,
        "keep_cookie": keep_cookie,
        "requests": [list(r) for r in requests],
    }
    proc = lab.netns_exec(
        "hl-c1",
        [sys.executable, "-c", CLIENT, json.dumps(args)],
        timeout=timeout * len(requests) + 30,
    )
    assert proc.returncode == 0, proc.stderr
    records: list[dict[str, Any]] = json.loads(proc.stdout)
    return records


def gets(n: int, path: str = "/") -> list[tuple[str, str]]:
    return [("GET", path)] * n


def all_ok(records: list[dict[str, Any]]) -> bool:
    return all(r.get("status") == 200 and r.get("served_by") in BACKENDS for r in records)


def summary(records: list[dict[str, Any]]) -> list[Any]:
    return [(r.get("status"), r.get("served_by"), r.get("error")) for r in records]


def routers_of(lab: Lab) -> list[str]:
    return [n.name for n in lab.nodes if n.role == "l7"]


def endpoint_up(handler: str, host: str, app: str) -> bool | None:
    """Whether ``handler`` has ``host``'s endpoint of ``app`` up (None: not known yet)."""
    ep = ctl(handler, "/hosts").get(host, {}).get("endpoints", {}).get(app)
    return None if ep is None else bool(ep["up"])


def handlers_agree(lab: Lab, host: str, app: str, up: bool) -> bool:
    handlers = [c["name"] for c in lab.components if c["role"] == "handler"]
    return all(endpoint_up(h, host, app) is up for h in handlers)


def wait_l7_ready(lab: Lab, port: int = 80, cafile: str | None = None) -> None:
    """Every router's and host's endpoint is up at every handler, and ten new
    connections to the L7 VIP in a row are answered by a backend host."""
    wait_plumbed(lab)
    for rt in routers_of(lab):
        wait_for(partial(handlers_agree, lab, rt, L7_APP, True), 20, f"{rt} up")
    for h in sorted(BACKENDS):
        wait_for(partial(handlers_agree, lab, h, "web", True), 20, f"{h} up")
    wait_for(
        lambda: all_ok(http_client(lab, gets(10), port=port, cafile=cafile, fresh=True)),
        20,
        "the L7 VIP answers new connections",
        step=0.5,
    )


def tracked(lab: Lab, host: str, key: str) -> bool:
    """Whether the session tracker holds ``key -> host`` (a bulk query from hl-cl1)."""
    proc = lab.netns_exec("hl-cl1", [*hanlb_command(), "ctl", "sessions", "--host", host, "--json"])
    assert proc.returncode == 0, proc.stderr
    return any(e["key"] == key and not e["deleted"] for e in json.loads(proc.stdout)["entries"])


def tracker_links(router: str) -> bool:
    links: list[str] | None = ctl(router)["tracker"]
    return links == ["tr1", "tr2"]


@pytest.mark.lab
def test_every_request_on_one_connection_is_routed_on_its_own(lab_factory: LabFactory) -> None:
    """Claim 50: one keep-alive client connection, 20 requests without cookies; the
    router balances each request, so several hosts answer, over one TCP connection."""
    lab = lab_factory(clients=1, forwarders=2, classifiers=1, hosts=4, handlers=2, routers=2)
    lab.wait_ready()
    wait_l7_ready(lab)

    records = http_client(lab, gets(20))
    assert all_ok(records), summary(records)
    ports = {r["port"] for r in records}
    assert len(ports) == 1, f"{len(ports)} TCP connections were used: {sorted(ports)}"
    served = Counter(r["served_by"] for r in records)
    print(f"20 requests on one connection served by {dict(served)}")
    # Token round robin over 4 healthy hosts: all 4 answer; 3 leaves room for a token
    # allotment being replaced in the middle of the run.
    assert len(served) >= 3, served
    assert max(served.values()) <= 10, served
    # Every response without a cookie in its request starts a new affinity session.
    assert all(r["set_cookie"].startswith(f"{COOKIE}=") for r in records)

    # The same with curl: 20 URLs in one invocation reuse one connection.
    urls = [arg for _ in range(20) for arg in ("-o", "/dev/null", f"http://{L7_VIP}/")]
    out = "%{num_connects} %{http_code} %header{x-served-by}\\n"
    proc = lab.netns_exec("hl-c1", ["curl", "-sS", "-m", "10", "-w", out, *urls])
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert len(lines) == 20 and all(code == "200" for _, code, _ in lines), proc.stdout
    assert sum(int(n) for n, _, _ in lines) == 1, proc.stdout
    assert len({host for _, _, host in lines}) >= 3, proc.stdout


@pytest.mark.lab
def test_affinity_survives_the_death_of_its_router(lab_factory: LabFactory) -> None:
    """Claims 31-32, 50: a client's affinity cookie pins its backend host; the router
    that issued it dies; the L4 tier moves new connections to the other router, which
    finds the cookie in the session tracker and keeps the client on the same host."""
    lab = lab_factory(
        clients=1, forwarders=2, classifiers=1, hosts=4, trackers=2, handlers=2, routers=2
    )
    lab.wait_ready()
    wait_l7_ready(lab)
    for rt in routers_of(lab):
        wait_for(partial(tracker_links, rt), 10, f"{rt} linked to both tracker nodes")

    # One connection: the first response sets the cookie, the next 5 requests send it.
    # Only requests with an affinity cookie count as affinity_kept (the host agents'
    # probes carry none), so the router whose count grew is the one that served the
    # connection and issued the cookie.
    before = {rt: ctl(rt)["counters"] for rt in routers_of(lab)}
    records = http_client(lab, gets(6), keep_cookie=True)
    assert all_ok(records), summary(records)
    assert len({r["port"] for r in records}) == 1
    cookie = records[0]["set_cookie"].split(";")[0]
    assert cookie.startswith(f"{COOKIE}=")
    pinned = records[0]["served_by"]
    assert {r["served_by"] for r in records} == {pinned}
    assert all(r["set_cookie"] is None for r in records[1:]), "a kept cookie is not reissued"
    kept = {
        rt: ctl(rt)["counters"].get("affinity_kept", 0) - before[rt].get("affinity_kept", 0)
        for rt in routers_of(lab)
    }
    issuer = [rt for rt, n in kept.items() if n == 5]
    assert len(issuer) == 1 and sum(kept.values()) == 5, kept
    dead = issuer[0]
    (survivor,) = (rt for rt in routers_of(lab) if rt != dead)
    # The router wrote the session to the tracker in the background.
    key = session_key("http-cookie", cookie.partition("=")[2])
    wait_for(lambda: tracked(lab, pinned, key), 5, "the cookie's session is in the tracker")
    print(f"cookie issued by {dead}, pinned to {pinned}")

    lab.kill(dead)
    killed = time.monotonic()
    # Its host agent's probes of the L7 VIP fail: every handler marks it down (2 failed
    # probes of 0.2 s, one heartbeat; bound 5 s), and the classifier gets allotments
    # without it. Then new connections all reach the survivor.
    wait_for(lambda: handlers_agree(lab, dead, L7_APP, False), 5, f"handlers mark {dead} down")
    marked = time.monotonic() - killed
    wait_for(
        lambda: all_ok(http_client(lab, gets(10), fresh=True)),
        10,
        f"new connections no longer sent to {dead}",
        step=0.2,
    )
    print(f"{dead} marked down {marked:.2f} s after it died")

    base = ctl(survivor)["counters"]
    records = http_client(lab, gets(10), fresh=True, cookie=cookie)
    assert all_ok(records), summary(records)
    assert len({r["port"] for r in records}) == 10
    assert {r["served_by"] for r in records} == {pinned}, summary(records)
    assert all(r["set_cookie"] is None for r in records)
    counters = ctl(survivor)["counters"]
    assert counters.get("affinity_kept", 0) - base.get("affinity_kept", 0) == 10
    # The survivor never saw the cookie before: it came from the session tracker.
    assert counters.get("affinity_tracker_hits", 0) > base.get("affinity_tracker_hits", 0)


@pytest.mark.lab
def test_tls_is_terminated_with_the_lab_certificate(lab_factory: LabFactory) -> None:
    """With ``router_tls`` the routers terminate TLS on 10.93.0.2:443 with the lab's
    self-signed certificate; a client that trusts only that certificate gets 200s."""
    lab = lab_factory(
        clients=1, forwarders=1, classifiers=1, hosts=4, handlers=2, routers=2, router_tls=True
    )
    tls = lab.state["tls"]
    cert = tls["cert"]
    vips = {(v["address"], v["port"], v["mode"]) for v in lab.status()["vips"]}
    assert (L7_VIP, 443, "http") in vips
    lab.wait_ready()
    wait_l7_ready(lab, port=443, cafile=cert)

    proc = lab.netns_exec(
        "hl-c1",
        [
            "curl",
            "-sS",
            "-m",
            "10",
            "-v",
            "--cacert",
            cert,
            "-D",
            "-",
            "-w",
            "\\nverify=%{ssl_verify_result} code=%{http_code}\\n",
            f"https://{L7_VIP}/",
        ],
    )
    assert proc.returncode == 0, proc.stderr
    assert "verify=0 code=200" in proc.stdout, proc.stdout
    served = [ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines() if ":" in ln]
    assert any(s in BACKENDS for s in served), proc.stdout
    assert f"CN={TLS_NAME}" in proc.stderr.replace(" = ", "="), proc.stderr
    cookie_lines = [ln for ln in proc.stdout.splitlines() if ln.lower().startswith("set-cookie")]
    assert cookie_lines and "Secure" in cookie_lines[0], proc.stdout

    # Plain HTTP on the TLS port is refused by the TLS layer, never proxied.
    plain = lab.netns_exec("hl-c1", ["curl", "-sS", "-m", "5", f"http://{L7_VIP}:443/"])
    assert plain.returncode != 0

    # Keep-alive over TLS: per-request routing on one connection too.
    records = http_client(lab, gets(12), port=443, cafile=cert)
    assert all_ok(records), summary(records)
    assert len({r["port"] for r in records}) == 1
    assert len({r["served_by"] for r in records}) >= 3
    for rt in routers_of(lab):
        assert ctl(rt)["tls"] is True


@pytest.mark.lab
def test_streaming_and_head_through_the_router(lab_factory: LabFactory) -> None:
    """A chunked response streams through the router as it is produced (not buffered
    to the end), and HEAD responses carry no body and keep the connection usable."""
    lab = lab_factory(clients=1, forwarders=1, classifiers=1, hosts=4, handlers=2, routers=2)
    lab.wait_ready()
    wait_l7_ready(lab)

    # 4 streams of 2 s: 1 KiB every 10 ms from the host, i.e. 200 KiB each. Buffered to
    # the end, the first byte would come after 2 s; streamed, no gap tops 0.5 s.
    result = lab.load("hl-c1", "stream", address=L7_VIP, connections=4, seconds=2, timeout=10)
    assert result["complete"] == 4, result["errors"]
    for rec in result["connections"]:
        assert rec["status"] == 200 and rec["host"] in BACKENDS
        assert rec["bytes"] == 200 * 1024, rec
        assert 1.9 <= rec["duration"] < 6.0, rec
        assert rec["max_stall"] < 0.5, rec
    print(f"streams: {result['served_by']}, max stall {result['stall']['max']:.3f} s")

    records = http_client(
        lab,
        [
            ("HEAD", "/"),
            ("HEAD", "/stream?seconds=2"),
            ("GET", "/"),
            ("GET", "/stream?seconds=0.3"),
            ("HEAD", "/"),
            ("GET", "/"),
        ],
    )
    assert [r.get("status") for r in records] == [200] * 6, summary(records)
    assert len({r["port"] for r in records}) == 1, "HEAD broke the keep-alive connection"
    head, head_stream, get, stream, _, last = records
    assert head["bytes"] == 0 and head["headers"]["content-length"] == "3"
    assert head_stream["bytes"] == 0 and head_stream["seconds"] < 1.5
    assert get["bytes"] == 3 and last["bytes"] == 3
    assert stream["bytes"] == 30 * 1024
    assert stream["headers"]["transfer-encoding"] == "chunked"


@pytest.mark.lab
def test_dead_backend_is_skipped(lab_factory: LabFactory) -> None:
    """h2's HTTP server dies under load through the routers: requests that meet it are
    retried on another host (GET is idempotent), the handlers mark h2 down within 2 s,
    and after that no request fails or reaches h2."""
    lab = lab_factory(clients=1, forwarders=1, classifiers=1, hosts=4, handlers=2, routers=2)
    lab.wait_ready()
    wait_l7_ready(lab)

    thread, out = in_background(
        lambda: lab.load(
            "hl-c1",
            "http",
            address=L7_VIP,
            duration=7,
            concurrency=4,
            timeout=5,
            timeline=True,
        )
    )
    time.sleep(2.0)
    lab.kill("h2")
    killed = time.time()
    wait_for(lambda: handlers_agree(lab, "h2", "web", False), 5, "handlers mark h2 down")
    marked = time.time()
    result = result_of(thread, out, 60)
    timeline: list[tuple[float, str | None, str]] = [
        (float(t), host, str(kind)) for t, host, kind in result["timeline"]
    ]

    before = [host for t, host, _ in timeline if t < killed]
    failures = [(round(t - killed, 3), kind) for t, _, kind in timeline if kind != "ok"]
    late = [(t, host, kind) for t, host, kind in timeline if t > marked]
    counters = Counter[str]()
    for rt in routers_of(lab):
        counters.update(ctl(rt)["counters"])
    print(
        f"h2 marked down {marked - killed:.2f} s after its server died; "
        f"{len(timeline)} requests, {len(failures)} failed: {failures[:10]}; router "
        f"retries {counters['retries']}, connect retries {counters['backend_connect_retries']}"
    )
    assert marked - killed <= 2.0
    assert "h2" in before, "h2 served nothing before it died"
    assert len(late) > 50, "too few requests after h2 was marked down"
    bad = [(round(t - killed, 3), host, kind) for t, host, kind in late if kind != "ok"]
    assert not bad, bad
    assert not any(host == "h2" for _, host, _ in late)
    # Requests that met h2 were retried, not failed: no 5xx at all, before or after.
    assert not any(kind.startswith("status_5") for _, _, kind in timeline), failures
    assert result["failed"] == 0, result["errors"]

"""Request router benchmark in the namespace lab: our router vs HAProxy, per CPU core.

One lab run (1 client, 1 forwarder, 1 classifier, 2 hosts, 1 request router
``rt1``). ``wrk`` runs in hl-c1 for ``--seconds`` at a fixed ``--connections``
(keep-alive, small ``GET /``: the lab httpd answers 3 bytes) against:

a. one host directly (10.92.0.101:80): the baseline for added latency;
b. our router ``rt1`` at its own LAN address (10.92.0.61:80, not through the
   L4 tier, so only the router is measured), as the lab configures it
   (round robin over h1 and h2, affinity on): wrk sends no cookie, so every
   response starts a new affinity session (``Set-Cookie``, a new id);
b'. the same router with wrk sending a valid affinity cookie on every request
   (a returning browser: a cache hit, no ``Set-Cookie``; one host answers);
c. HAProxy (``nbthread 1``, mode http, ``http-reuse always``, round robin over
   the same hosts, adding ``X-Forwarded-For``, ``X-Forwarded-Proto`` and
   ``X-Request-Id`` as our router does), started by this script inside hl-rt1
   on port 8080.

For each: requests/s, p50/p99 latency and the added latency vs (a); for the
proxies also the requests served per CPU core-second of the proxy process
(utime+stime from /proc/PID/stat before and after the run) and the ratio of
ours to HAProxy's (target >= 0.5). wrk, the proxy and the backends share the
machine's cores: compare numbers from the same run only.

Usage: ``python bench/router.py [--seconds 10] [--connections 16] [--json]``
(root; needs ``wrk`` and ``haproxy``). Exits non-zero only when something
failed (lab, tools, request errors), never for missing the target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hanlb.lab.topology import LAB_DIR, LOG_DIR, Lab, LabError, down

CLIENT_NS = "hl-c1"
ROUTER = "rt1"
HAPROXY_PORT = 8080
TARGET_RATIO = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not run or a run had request errors."""


@dataclass
class Run:
    name: str
    url: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_seconds: float | None = None
    """utime+stime of the proxy process during the run; None for the direct run."""

    @property
    def per_core(self) -> float | None:
        if self.cpu_seconds is None or self.cpu_seconds <= 0:
            return None
        return self.requests / self.cpu_seconds


# -- wrk -------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if m is None:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> tuple[int, float, float, float, int]:
    """(requests, seconds, p50 ms, p99 ms, errors) from ``wrk --latency`` output."""
    total = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m)", out, re.M)
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    if total is None or p50 is None or p99 is None:
        raise BenchError(f"cannot read wrk output:\n{out}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock is not None:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx is not None:
        errors += int(non2xx.group(1))
    seconds = _ms(total.group(2) + total.group(3)) / 1000.0
    return int(total.group(1)), seconds, _ms(p50.group(1)), _ms(p99.group(1)), errors


def wrk(
    url: str, seconds: float, connections: int, headers: tuple[str, ...] = ()
) -> tuple[int, float, float, float, int]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    proc = subprocess.run(
        ["ip", "netns", "exec", CLIENT_NS, *argv],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"wrk {url} failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_wrk(proc.stdout)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"process {pid} is gone: {exc}") from None
    fields = stat.rpartition(")")[2].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(
    name: str,
    url: str,
    seconds: float,
    connections: int,
    pid: int | None,
    headers: tuple[str, ...] = (),
) -> Run:
    wrk(url, 1.0, connections, headers)  # warm-up: connections, pools, caches
    before = cpu_seconds(pid) if pid is not None else 0.0
    requests, took, p50, p99, errors = wrk(url, seconds, connections, headers)
    used = cpu_seconds(pid) - before if pid is not None else None
    return Run(name, url, requests, took, requests / took, p50, p99, errors, used)


# -- HAProxy ---------------------------------------------------------------------------


def haproxy_config(listen: str, backends: list[tuple[str, str]]) -> str:
    servers = "\n".join(f"    server {name} {addr}:80" for name, addr in backends)
    return f"""global
    nbthread 1
    maxconn 4000

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 30s
    option http-keep-alive
    option forwardfor
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt
    unique-id-header X-Request-Id

frontend bench
    bind {listen}:{HAPROXY_PORT}
    http-request set-header X-Forwarded-Proto http
    default_backend hosts

backend hosts
    balance roundrobin
    http-reuse always
{servers}
"""


def start_haproxy(lab: Lab) -> subprocess.Popen[bytes]:
    rt = lab.node(ROUTER)
    backends = [(n.name, n.address) for n in lab.nodes if n.role == "host"]
    cfg = LAB_DIR / "bench-haproxy.cfg"
    cfg.write_text(haproxy_config(rt.address, backends))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"haproxy config invalid: {check.stdout} {check.stderr}")
    log = open(LOG_DIR / "bench-haproxy.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        ["ip", "netns", "exec", rt.netns, "haproxy", "-db", "-f", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_http(lab: Lab, target: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        res = lab.load(CLIENT_NS, "probe", targets=target, path="/", timeout=1.0)
        last = res["results"][target]
        if isinstance(last, dict) and last.get("status") == 200:
            return
        time.sleep(0.2)
    raise BenchError(f"{target} does not answer: {last}")


def affinity_cookie(lab: Lab, address: str) -> str:
    proc = lab.netns_exec(
        CLIENT_NS, ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-D", "-", f"http://{address}/"]
    )
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "set-cookie":
            return value.strip().split(";")[0]
    raise BenchError(f"the router set no affinity cookie: {proc.stdout} {proc.stderr}")


# -- report ----------------------------------------------------------------------------


def report(runs: list[Run], base: Run, ratios: dict[str, float | None]) -> str:
    lines = [
        f"{'target':<34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
        f"{'+p99 ms':>8} {'cpu s':>6} {'req/core-s':>11} {'errors':>6}",
    ]
    for r in runs:
        cpu = f"{r.cpu_seconds:6.2f}" if r.cpu_seconds is not None else f"{'-':>6}"
        per_core = f"{r.per_core:11.0f}" if r.per_core is not None else f"{'-':>11}"
        added = (
            f"{r.p50_ms - base.p50_ms:8.3f} {r.p99_ms - base.p99_ms:8.3f}"
            if r is not base
            else f"{'-':>8} {'-':>8}"
        )
        lines.append(
            f"{r.name:<34} {r.rps:9.0f} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {added} "
            f"{cpu} {per_core} {r.errors:6d}"
        )
    for name, ratio in ratios.items():
        verdict = (
            "n/a"
            if ratio is None
            else f"{ratio:.2f} of HAProxy per core "
            + ("(meets" if ratio >= TARGET_RATIO else "(misses")
            + f" the {TARGET_RATIO} target)"
        )
        lines.append(f"{name}: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured run")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (one thread)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    for tool in ("wrk", "haproxy", "curl"):
        if shutil.which(tool) is None:
            print(f"bench/router.py needs {tool!r} on PATH", file=sys.stderr)
            return 1

    haproxy: subprocess.Popen[bytes] | None = None
    try:
        lab = Lab.up(clients=1, forwarders=1, classifiers=1, hosts=2, routers=1)
        lab.wait_ready(30)
        rt = lab.node(ROUTER)
        host = lab.node("h1")
        wait_http(lab, f"{rt.address}:80")
        cookie = affinity_cookie(lab, rt.address)
        haproxy = start_haproxy(lab)
        wait_http(lab, f"{rt.address}:{HAPROXY_PORT}")
        router_pid: int = lab.component(ROUTER)["pid"]
        if not lab.alive(ROUTER):
            raise BenchError("the router is not running")

        s, c = args.seconds, args.connections
        print(
            f"wrk from {CLIENT_NS}: 1 thread, {c} keep-alive connections, {s:g} s per run, "
            f"GET / (3-byte body); {os.cpu_count()} CPUs shared by client, proxy and hosts",
            flush=True,
        )
        base = measure("a. direct to h1", f"http://{host.address}/", s, c, None)
        ours = measure(
            "b. hanlb router (new cookie each)", f"http://{rt.address}/", s, c, router_pid
        )
        kept = measure(
            "b'. hanlb router (cookie kept)",
            f"http://{rt.address}/",
            s,
            c,
            router_pid,
            headers=(f"Cookie: {cookie}",),
        )
        theirs = measure(
            "c. haproxy nbthread 1",
            f"http://{rt.address}:{HAPROXY_PORT}/",
            s,
            c,
            haproxy.pid,
        )
        runs = [base, ours, kept, theirs]
        ratios: dict[str, float | None] = {}
        for r in (ours, kept):
            if r.per_core is not None and theirs.per_core is not None:
                ratios[f"ratio {r.name[: r.name.index('.')]}/c"] = r.per_core / theirs.per_core
            else:
                ratios[f"ratio {r.name[: r.name.index('.')]}/c"] = None
        print(report(runs, base, ratios))
        if args.json:
            print(
                json.dumps(
                    {
                        "runs": [asdict(r) | {"per_core": r.per_core} for r in runs],
                        "ratios": ratios,
                        "target": TARGET_RATIO,
                    }
                )
            )
        errors = sum(r.errors for r in runs)
        if errors:
            print(f"{errors} request errors", file=sys.stderr)
            return 1
        return 0
    except (LabError, BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench/router.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if haproxy is not None:
            stop(haproxy)
        try:
            down()
        except LabError as exc:
            print(f"lab down: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

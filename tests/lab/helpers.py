"""Helpers shared by lab tests: polling, admin queries, parallel load."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hanlb import admin
from hanlb.lab import topology
from hanlb.lab.topology import Lab

SOCK_DIR = str(topology.LAB_DIR / "sock")
LabFactory = Callable[..., Lab]


def ctl(name: str, path: str = "/status") -> Any:
    return admin.query(SOCK_DIR, name, path)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(step)
    raise AssertionError(f"{what}: not true after {timeout}s (last: {last!r})")


def wait_plumbed(lab: Lab, timeout: float = 20.0) -> None:
    """Every forwarder is up and connected to a classifier."""
    for comp in lab.components:
        if comp["role"] == "forwarder":
            wait_for(
                lambda c=comp: ctl(c["name"]).get("classifier"),
                timeout,
                f"{comp['name']} connected to a classifier",
            )


def parallel_load(lab: Lab, per_client: int, **opts: Any) -> dict[str, Any]:
    """Run the HTTP load generator in every client namespace at once; sum the results."""
    with ThreadPoolExecutor(len(lab.clients)) as pool:
        results = list(
            pool.map(lambda ns: lab.load(ns, "http", connections=per_client, **opts), lab.clients)
        )
    served: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        served.update(r["served_by"])
        errors.update(r["errors"])
    return {
        "ok": sum(r["ok"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "served_by": dict(served),
        "errors": dict(errors),
        "per_client": results,
    }


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` (a load generator, say) in a thread; ``result_of`` joins it."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test by result_of
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def result_of(thread: threading.Thread, out: list[Any], timeout: float = 120) -> Any:
    """``fn``'s result; its exception is raised here."""
    thread.join(timeout)
    assert not thread.is_alive(), "background job did not finish"
    assert out, "background job returned nothing"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]

"""Fixtures for lab tests (tests marked ``lab``; see tests/conftest.py for the policy)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from hanlb.lab import topology
from hanlb.lab.topology import Lab


def _log_tails(lines: int = 20) -> str:
    if not topology.LOG_DIR.is_dir():
        return "(no lab logs)"
    out: list[str] = []
    for log in sorted(topology.LOG_DIR.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"----- {log.name} (last {len(tail)} lines)")
        out.extend(tail)
    return "\n".join(out) or "(no lab logs)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that built a lab shows the lab's component logs."""
    report = yield
    if report.failed and "lab_factory" in getattr(item, "fixturenames", ()):
        report.sections.append(("lab logs", _log_tails()))
    return report


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(clients=2, forwarders=2, classifiers=1, hosts=4, datapath="kernel",
    start_components=True) -> Lab``. The lab is always torn down after the test, also when
    building it or the test failed."""
    used = False

    def make(**kwargs: Any) -> Lab:
        nonlocal used
        used = True
        return Lab.up(**kwargs)

    try:
        yield make
    finally:
        if used:
            topology.down()

"""Session-wide test policy.

Tests marked ``lab`` need root and ``ip netns``. Without them they are skipped, unless
``HANLB_REQUIRE_LAB=1``: then they fail, and the session fails as well if no lab test ran
at all or any lab test was skipped (so ``make test`` cannot pass without the lab).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache

import pytest

REQUIRE_LAB = os.environ.get("HANLB_REQUIRE_LAB") == "1"


@cache
def lab_unavailable_reason() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root"
    for tool in ("ip", "ethtool", "sysctl"):
        if shutil.which(tool) is None:
            return f"the lab needs {tool!r} on PATH"
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"`ip netns list` failed: {proc.stderr.strip()}"
    return None


class _LabTally:
    """Counts what happened to tests marked ``lab``."""

    def __init__(self) -> None:
        self.executed: set[str] = set()
        self.skipped: set[str] = set()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "lab" not in report.keywords:
            return
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.add(report.nodeid)
        elif report.when == "call" or report.failed:
            self.executed.add(report.nodeid)

    def problem(self) -> str | None:
        if self.skipped:
            return f"{len(self.skipped)} lab test(s) skipped: " + ", ".join(sorted(self.skipped))
        if not self.executed:
            return "no test marked `lab` was executed"
        return None


_TALLY = _LabTally()


def pytest_configure(config: pytest.Config) -> None:
    if REQUIRE_LAB:
        config.pluginmanager.register(_TALLY, "hanlb-lab-tally")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is None:
        return
    reason = lab_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_LAB:
        pytest.fail(f"lab test cannot run: {reason} (HANLB_REQUIRE_LAB=1)", pytrace=False)
    # Outside `make test` (say, a developer without root running the unit
    # tests) lab tests are skipped; under HANLB_REQUIRE_LAB=1, which `make test`
    # and CI set, the fail() above runs instead and the session also fails if
    # no lab test ran at all (pytest_sessionfinish).
    pytest.skip(reason)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REQUIRE_LAB or session.config.option.collectonly:
        return
    if _TALLY.problem() is not None and session.exitstatus in (
        pytest.ExitCode.OK,
        pytest.ExitCode.NO_TESTS_COLLECTED,
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    if not REQUIRE_LAB or config.option.collectonly:
        return
    problem = _TALLY.problem()
    if problem is not None:
        terminalreporter.section("HANLB_REQUIRE_LAB=1", red=True)
        terminalreporter.write_line(f"session marked failed: {problem}", red=True)

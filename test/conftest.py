"""
Suite-wide rules.

In CI (CI=true) a skipped test is a failure: `make test` installs every
tool the tests use (qemu-utils, nbdkit, curl, openssl, the reference in
.refvenv) and CI runs as root, so a skip there means a missing install
step, never "nothing to check".
"""

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("CI") == "true" and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[-1] if isinstance(
            report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI: {reason}"

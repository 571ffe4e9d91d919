"""Test-session settings shared by every test module."""

import os


def pytest_configure(config):
    # The default run leaves out @pytest.mark.slow tests (pyproject's addopts); CI (CI=true) has the time
    # budget for them, so there the same command runs them too.
    if os.environ.get("CI") == "true" and config.option.markexpr == "not slow":
        config.option.markexpr = ""

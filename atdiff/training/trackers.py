"""The experiment tracker (``training.log_with``): Accelerate's trackers, checked and given images.

Accelerate drops a tracker whose package is missing with only a warning, so a run would train to the
end and log nothing; ``check_tracker_installed`` refuses it before any step. Accelerate's trackers
log scalars alike but take images in their own forms: ``log_image`` speaks TensorBoard's and wandb's.
"""

from __future__ import annotations

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from PIL import Image

from ..errors import UsageError

# How to install a tracker's package where it is not the tracker's own name.
INSTALL = {"wandb": "'atdiff[wandb]'"}


def check_tracker_installed(log_with: str) -> None:
    """Refuse a tracker whose package this environment lacks (what Accelerate would silently drop)."""
    if log_with != "none" and log_with not in {tracker.value for tracker in get_available_trackers()}:
        raise UsageError(
            f"training.log_with={log_with} needs the {log_with} package, which is not installed; "
            f"pip install {INSTALL.get(log_with, log_with)} (or set training.log_with=tensorboard)"
        )


def log_image(accelerator: Accelerator, tag: str, image: Image.Image, step: int) -> None:
    """Log ``image`` at ``step`` to the TensorBoard and wandb trackers (the others stay scalar-only)."""
    pixels = np.asarray(image.convert("RGB"))  # one channel layout for every tracker, grayscale included
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [pixels]}, step=step)

"""diffusers pipelines for atdiff models (installed as ``atdiff.pipelines``)."""

from .image_diffusion import ImageDiffusionPipeline, num_classes_of
from .schedulers import SCHEDULER_NAMES, check_scheduler_fits, fitting_scheduler_names, scheduler_by_name

__all__ = [
    "ImageDiffusionPipeline",
    "SCHEDULER_NAMES",
    "check_scheduler_fits",
    "fitting_scheduler_names",
    "num_classes_of",
    "scheduler_by_name",
]

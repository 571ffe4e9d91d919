"""diffusers pipelines for atdiff models (installed as ``atdiff.pipelines``)."""

from .flow_samplers import FlowMatchDopri5Scheduler, FlowMatchEulerMaruyamaScheduler
from .image_diffusion import ImageDiffusionPipeline, NonFiniteSamples, num_classes_of
from .schedulers import SCHEDULER_NAMES, check_scheduler_fits, fitting_scheduler_names, scheduler_by_name

__all__ = [
    "FlowMatchDopri5Scheduler",
    "FlowMatchEulerMaruyamaScheduler",
    "ImageDiffusionPipeline",
    "NonFiniteSamples",
    "SCHEDULER_NAMES",
    "check_scheduler_fits",
    "fitting_scheduler_names",
    "num_classes_of",
    "scheduler_by_name",
]

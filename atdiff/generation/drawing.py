"""The call that draws images: image ``i`` depends only on (seed, i, its label).

Every image has its own noise generator, seeded from ``(seed, i)``, and its own class label, so an
image is the same whatever the batch it is drawn in, the order of the batches, or the process that
draws it: a samples folder can be filled in any order, by any number of processes, and resumed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import UsageError, one_line
from ..pipelines import ImageDiffusionPipeline
from .settings import SamplingConfig


def image_generator(seed: int, index: int) -> torch.Generator:
    # SeedSequence mixes (seed, index) into independent streams; seed + index would make the runs of
    # seeds 0 and 1 share all but one image.
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def labels_of(indices: Sequence[int], class_labels: Sequence[int] | None, num_classes: int) -> list[int] | None:
    """Class label of each image index (None for an unconditional model): ``class_labels`` cycled, else balanced."""
    if not num_classes:
        return None
    return [class_labels[i % len(class_labels)] if class_labels else i % num_classes for i in indices]


def check_drawable(pipe: ImageDiffusionPipeline, sampling: SamplingConfig, class_labels: Sequence[int] | None = None) -> None:
    """Refuse, before any image, settings ``pipe`` cannot sample with (``pipe`` already has the scheduler)."""
    try:
        pipe.check_guidance(sampling.guidance_scale)
        pipe.check_guidance_channels(sampling.guidance_channels)
        if class_labels is not None:
            pipe.check_class_labels(torch.tensor(class_labels))
        # Some schedulers take at most num_train_timesteps steps; ask on a copy.
        copy.deepcopy(pipe.scheduler).set_timesteps(sampling.num_inference_steps)
    except ValueError as err:
        raise UsageError(one_line(str(err))) from None


@contextlib.contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """TF32 (or not) for CUDA matmuls and convolutions inside the block; the process's setting after
    it (training keeps its own, ``training.tf32``)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def draw(pipe: ImageDiffusionPipeline, sampling: SamplingConfig, indices: Sequence[int],
         class_labels: Sequence[int] | None = None) -> np.ndarray:
    """Images ``indices`` as uint8 (N, H, W, C), in one model call per step. ``pipe`` carries the
    scheduler ``sampling.scheduler`` names (``use_scheduler``); ``class_labels`` are cycled over the
    indices (None: index % num_classes). Raises ``NonFiniteSamples`` for NaN or infinite samples."""
    with matmul_precision(sampling.tf32):
        images = pipe(
            batch_size=len(indices),
            class_labels=labels_of(indices, class_labels, pipe.num_classes),
            generator=[image_generator(sampling.seed, i) for i in indices],
            output_type="np",
            **sampling.call_arguments(),
        ).images
    return (images * 255).round().astype(np.uint8)

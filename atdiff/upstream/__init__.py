"""Checkpoints of the upstream codebases in and out of atdiff: facebookresearch/DiT, willisma/SiT,
the ATConv authors' SiT-ATConv(-Hybrid), and diffusers' ``DiTTransformer2DModel`` / ``DiTPipeline``.

``import_checkpoint(path)`` returns an ``ImageDiffusionPipeline`` whose ``DiTModel`` computes what the
original computes; ``export_pipeline(pipe, to, path)`` writes one back in an upstream layout. The
command-line forms are ``atdiff import`` and ``atdiff export``.
"""

from .exporting import TARGETS, export_pipeline
from .importing import ImportOptions, import_checkpoint

__all__ = ["ImportOptions", "TARGETS", "export_pipeline", "import_checkpoint"]

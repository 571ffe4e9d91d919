"""atdiff: diffusion models in which ATConv (Attentive Convolution) replaces self-attention."""

__version__ = "0.1.0"

from . import nn
from .models import DIT_SIZES, DiTModel, dit_size
from .nn import ATConv

__all__ = ["ATConv", "DIT_SIZES", "DiTModel", "dit_size", "nn", "__version__"]

"""diffusers model classes whose token mixer is attention, ATConv or a hybrid."""

from .dit import DIT_SIZES, DiTModel, dit_size

__all__ = ["DIT_SIZES", "DiTModel", "dit_size"]

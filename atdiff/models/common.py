"""What every atdiff model class adds to a diffusers ``ModelMixin``."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..nn import ATConv, MixerSpec

CPU_ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator guarantees


@torch.no_grad()
def realign_cpu_tensors_(model: nn.Module) -> nn.Module:
    """Give every CPU parameter and buffer that does not start on a 64-byte boundary its own storage.

    diffusers loads safetensors weights as views into one file buffer, at 4-byte-aligned offsets.
    CPU matmul kernels take different (differently rounding) paths for unaligned operands, so a
    loaded model's outputs differ from the saved model's in the last bits (~1e-6) -- stock
    ``UNet2DModel`` included. Copies made by the allocator are aligned like freshly built weights.
    The Parameter objects stay the same, so optimizers holding them are unaffected.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()
    return model


class AtdiffModelMixin:
    """Mixed in before ``ModelMixin``: bit-exact reloads, the weight-decay exclusions, the mixer spec."""

    @property
    def mixer_spec(self) -> MixerSpec:
        """Which token mixers this model's layers have, from its config."""
        return MixerSpec.from_config(self.config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``ModelMixin.from_pretrained``, with CPU tensors in aligned storage so that the loaded model
        computes bit-identically to the one that was saved (see ``realign_cpu_tensors_``)."""
        loaded = super().from_pretrained(*args, **kwargs)
        realign_cpu_tensors_(loaded[0] if isinstance(loaded, tuple) else loaded)  # tuple: output_loading_info
        return loaded

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay (ATConv's ``difference_control``)."""
        return {
            f"{module_name}.{name}"
            for module_name, module in self.named_modules()
            if isinstance(module, ATConv)
            for name in module.no_weight_decay()
        }

"""Functional pieces of ATConv: the per-sample depthwise convolution in several layouts.

ATConv convolves every (sample, channel) plane with its own k x k kernel. PyTorch has no such
primitive, so there are several equivalent ways to express it; which is fastest depends on the
device, the dtype and the sizes (see ``eval/bench.py``). All of them take the values in token
layout ``(B, H, W, C)`` (what the linear projections produce, no transpose needed) and kernels
``(B, C, k, k)``, and return ``(B, H, W, C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_IMPLS = ("shift", "grouped", "unfold")


def per_sample_depthwise_conv2d_shift(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Sum of k*k shifted copies of the zero-padded values, each scaled per (sample, channel).

    Works directly on channels-last tokens, so it needs no layout change; memory-bound but the
    cheapest choice on CPU for k = 3.
    """
    B, H, W, C = v.shape
    k = kernels.shape[-1]
    p = k // 2
    padded = F.pad(v, (0, 0, p, p, p, p))
    taps = kernels.permute(0, 2, 3, 1).reshape(B, k * k, 1, 1, C)
    out = padded[:, :H, :W] * taps[:, 0]
    for idx in range(1, k * k):
        i, j = divmod(idx, k)
        out = out.addcmul(padded[:, i : i + H, j : j + W], taps[:, idx])
    return out


def per_sample_depthwise_conv2d_grouped(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """One grouped convolution with B*C groups, as the authors do (fast cuDNN path on GPU)."""
    B, H, W, C = v.shape
    k = kernels.shape[-1]
    planes = v.permute(0, 3, 1, 2).reshape(1, B * C, H, W)
    out = F.conv2d(planes, kernels.reshape(B * C, 1, k, k), padding=k // 2, groups=B * C)
    return out.view(B, C, H, W).permute(0, 2, 3, 1)


def per_sample_depthwise_conv2d_unfold(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """im2col then a weighted sum over the k*k taps (the authors' alternative)."""
    B, H, W, C = v.shape
    k = kernels.shape[-1]
    cols = F.unfold(v.permute(0, 3, 1, 2), kernel_size=k, padding=k // 2)  # (B, C*k*k, H*W)
    out = (cols.view(B, C, k * k, H * W) * kernels.reshape(B, C, k * k, 1)).sum(dim=2)
    return out.view(B, C, H, W).permute(0, 2, 3, 1)


_IMPLS = {
    "shift": per_sample_depthwise_conv2d_shift,
    "grouped": per_sample_depthwise_conv2d_grouped,
    "unfold": per_sample_depthwise_conv2d_unfold,
}

# Fastest implementation per device type, measured by `atdiff bench` (eval/results/bench-*.md).
DEFAULT_CONV_IMPL = {"cpu": "shift", "cuda": "grouped"}


def per_sample_depthwise_conv2d(v: torch.Tensor, kernels: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Convolve each (sample, channel) plane of ``v`` (B, H, W, C) with ``kernels`` (B, C, k, k).

    Zero padding ``k // 2``, stride 1, so the output has the input's shape. ``impl`` is one of
    ``CONV_IMPLS`` or ``"auto"`` (fastest measured for the device).
    """
    if impl == "auto":
        impl = DEFAULT_CONV_IMPL.get(v.device.type, "shift")
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {('auto',) + CONV_IMPLS}") from None
    return fn(v, kernels)

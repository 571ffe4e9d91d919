"""Functional pieces of ATConv: the per-sample depthwise convolution in several layouts.

ATConv convolves every (sample, channel) plane with its own k x k kernel. PyTorch has no such
primitive, so there are several equivalent ways to express it; which is fastest depends on the
device, the dtype and the sizes (``atdiff bench`` measures them; results in eval/results/). All of
them take the values in token layout ``(B, H, W, C)`` (what the linear projections produce, no
transpose needed) and kernels ``(B, C, k, k)``, and return ``(B, H, W, C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_IMPLS = ("depthwise", "shift", "grouped", "unfold")


def _depthwise_per_sample(v: torch.Tensor, kernels: torch.Tensor, padding: int) -> torch.Tensor:
    """Cross-correlate sample b of ``v`` (B, H, W, C) with ``kernels[b]`` (C, kh, kw), channel by channel.

    ``v[b]`` permuted to (1, C, H, W) is already channels-last, the layout in which oneDNN (CPU) and
    cuDNN run a depthwise conv as one vectorised pass, so no copy goes in and the output comes back
    in token layout. One backend call per sample: B calls are cheap next to the B*C tiny groups of
    the grouped form.
    """
    C = v.shape[-1]
    return torch.stack(
        [
            F.conv2d(v[b : b + 1].permute(0, 3, 1, 2), kernels[b].unsqueeze(1), padding=padding, groups=C)[0].permute(1, 2, 0)
            for b in range(v.shape[0])
        ]
    )


class _PerSampleDepthwiseConv(torch.autograd.Function):
    """The ``depthwise`` impl: per-sample channels-last forward, grouped backward.

    Autograd through per-sample ``conv2d`` would run the backend's depthwise backward per sample,
    which is slow on CPU (about 2x the grouped form). The backward of the grouped form (B*C
    single-channel planes) was the fastest we measured, so the gradients come from it: one
    ``convolution_backward`` call.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, kernels)
        return _depthwise_per_sample(v, kernels, kernels.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        v, kernels = ctx.saved_tensors
        B, H, W, C = v.shape
        k = kernels.shape[-1]

        def planes(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (1, B*C, H, W)
            return t.permute(0, 3, 1, 2).reshape(1, B * C, H, W)

        # Under autocast the forward ran in low precision but backward runs outside it: compute
        # in the saved tensors' dtype (autograd casts each gradient to its input's dtype).
        grad_planes, grad_k, _ = torch.ops.aten.convolution_backward(
            planes(grad_out.to(v.dtype)), planes(v), kernels.reshape(B * C, 1, k, k), None,
            [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], B * C,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )  # fmt: skip
        grad_v = grad_planes.view(B, C, H, W).permute(0, 2, 3, 1) if grad_planes is not None else None
        return grad_v, grad_k.view(B, C, k, k) if grad_k is not None else None


def per_sample_depthwise_conv2d_depthwise(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """One channels-last depthwise conv per sample (oneDNN/cuDNN): the fastest on CPU from 32x32 planes."""
    return _PerSampleDepthwiseConv.apply(v, kernels)


def per_sample_depthwise_conv2d_shift(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Sum of k*k shifted copies of the zero-padded values, each scaled per (sample, channel).

    Plain elementwise ops on channels-last tokens: runs on any device and is the form
    ``torch.compile`` fuses into a single pass.
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
    """One grouped convolution with B*C groups, as the authors do (one cuDNN call on GPU)."""
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


# name -> function(v, kernels), for callers that compare the implementations.
IMPL_FUNCTIONS = {
    "depthwise": per_sample_depthwise_conv2d_depthwise,
    "shift": per_sample_depthwise_conv2d_shift,
    "grouped": per_sample_depthwise_conv2d_grouped,
    "unfold": per_sample_depthwise_conv2d_unfold,
}

# "auto" on the CPU, measured with `atdiff bench` (eval/results/bench-cpu.md) and inside the
# mixer, where layout copies count: one depthwise call per sample wins from 32x32 planes up
# (forward and backward); on smaller planes the B backend calls cost more than they save and the
# single grouped call wins.
MIN_DEPTHWISE_PLANE = 1024


def auto_conv_impl(v: torch.Tensor) -> str:
    """The implementation "auto" runs for values ``v`` (B, H, W, C): by device type, dtype and plane size."""
    if v.device.type == "cpu":
        if v.dtype == torch.float64:  # oneDNN has no float64 convs: PyTorch's fallback loops over the groups
            return "shift"
        return "depthwise" if v.shape[1] * v.shape[2] >= MIN_DEPTHWISE_PLANE else "grouped"
    if v.device.type == "cuda":
        return "grouped"  # one cuDNN call, as the authors do (not yet measured against "depthwise")
    return "shift"  # plain elementwise ops run on any backend


def resolve_conv_impl(impl: str, v: torch.Tensor) -> str:
    """The implementation ``impl`` names for values ``v`` ("auto" -> ``auto_conv_impl(v)``)."""
    if impl == "auto":
        return auto_conv_impl(v)
    if impl not in IMPL_FUNCTIONS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {('auto',) + CONV_IMPLS}")
    return impl


def per_sample_depthwise_conv2d(v: torch.Tensor, kernels: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Convolve each (sample, channel) plane of ``v`` (B, H, W, C) with ``kernels`` (B, C, k, k).

    Zero padding ``k // 2``, stride 1, so the output has the input's shape and dtype. ``impl`` is
    one of ``CONV_IMPLS`` or ``"auto"`` (the fastest measured for the device and plane size).
    """
    return IMPL_FUNCTIONS[resolve_conv_impl(impl, v)](v, kernels.to(v.dtype))

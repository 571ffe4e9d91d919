"""Every per-sample depthwise conv implementation computes the same thing, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from atdiff.nn.functional import CONV_IMPLS, IMPL_FUNCTIONS, MIN_DEPTHWISE_PLANE, auto_conv_impl, per_sample_depthwise_conv2d


def reference(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """The definition: one single-channel conv2d per (sample, channel) plane, zero padding k // 2."""
    B, H, W, C = v.shape
    p = kernels.shape[-1] // 2
    planes = [
        [F.conv2d(v[b, :, :, c][None, None], kernels[b, c][None, None], padding=p)[0, 0] for c in range(C)]
        for b in range(B)
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in planes])


def inputs(B, H, W, C, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, H, W, C, generator=g).to(dtype)
    kernels = torch.randn(B, C, k, k, generator=g).to(dtype)
    grad_out = torch.randn(B, H, W, C, generator=g).to(dtype)
    return v, kernels, grad_out


def forward_backward(fn, v, kernels, grad_out):
    v, kernels = v.detach().requires_grad_(), kernels.detach().requires_grad_()
    out = fn(v, kernels)
    grad_v, grad_k = torch.autograd.grad(out, (v, kernels), grad_out)
    return out, grad_v, grad_k


SHAPES = [  # (B, H, W, C, k): odd sizes, non-square grids, planes smaller than the kernel
    (2, 5, 7, 3, 3),
    (3, 8, 4, 5, 3),
    (1, 9, 9, 4, 5),
    (2, 2, 3, 6, 5),
    (2, 6, 5, 7, 1),
]


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}W{}C{}k{}".format(*s))
def test_matches_reference_float32(impl, shape):
    v, kernels, grad_out = inputs(*shape)
    expected = forward_backward(reference, v, kernels, grad_out)
    got = forward_backward(IMPL_FUNCTIONS[impl], v, kernels, grad_out)
    for name, a, b in zip(("output", "grad of values", "grad of kernels"), got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{impl} {name}: {m}")


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_matches_reference_bfloat16(impl):
    v, kernels, grad_out = inputs(2, 6, 5, 8, 3, dtype=torch.bfloat16)
    expected = forward_backward(reference, v.double(), kernels.double(), grad_out.double())
    got = forward_backward(IMPL_FUNCTIONS[impl], v, kernels, grad_out)
    for name, a, b in zip(("output", "grad of values", "grad of kernels"), got, expected):
        assert a.dtype == torch.bfloat16, name
        # bf16 keeps 8 bits of mantissa; the grad of a kernel tap sums 30 products
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=0.02, atol=0.02 * scale, msg=lambda m: f"{impl} {name}: {m}")


def test_depthwise_hand_written_backward_passes_gradcheck():
    v, kernels, _ = inputs(2, 3, 4, 2, 3, dtype=torch.float64)
    v.requires_grad_()
    kernels.requires_grad_()
    assert torch.autograd.gradcheck(IMPL_FUNCTIONS["depthwise"], (v, kernels))


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_depthwise_gradient_of_one_input(needs):
    v, kernels, grad_out = inputs(2, 5, 4, 3, 3)
    v.requires_grad_(needs[0])
    kernels.requires_grad_(needs[1])
    target = v if needs[0] else kernels
    (got,) = torch.autograd.grad(IMPL_FUNCTIONS["depthwise"](v, kernels), target, grad_out)
    (expected,) = torch.autograd.grad(reference(v, kernels), target, grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_depthwise_under_autocast_gives_float32_gradients():
    v, kernels, grad_out = inputs(2, 6, 6, 4, 3)
    v.requires_grad_()
    kernels.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = IMPL_FUNCTIONS["depthwise"](v, kernels)
    assert out.dtype == torch.bfloat16
    out.float().backward(grad_out)
    assert v.grad.dtype == kernels.grad.dtype == torch.float32
    torch.testing.assert_close(v.grad, torch.autograd.grad(reference(v, kernels), v, grad_out)[0], rtol=0.05, atol=0.05)


def test_kernels_of_another_dtype_follow_the_values():
    v, kernels, _ = inputs(2, 4, 4, 3, 3)
    for impl in CONV_IMPLS:
        out = per_sample_depthwise_conv2d(v, kernels.double(), impl)
        assert out.dtype == torch.float32, impl


def test_auto_picks_by_device_and_plane_size():
    small, large = torch.empty(2, 16, 16, 4), torch.empty(2, 32, 32, 4)
    assert 16 * 16 < MIN_DEPTHWISE_PLANE <= 32 * 32
    assert auto_conv_impl(small) == "grouped" and auto_conv_impl(large) == "depthwise"
    assert auto_conv_impl(large.double()) == "shift"  # no oneDNN float64 convs
    assert auto_conv_impl(large.to("meta")) == "shift"  # a backend without measurements: plain elementwise ops
    for shape in [(1, 4, 4, 2), (2, 32, 33, 3)]:
        v, kernels, grad_out = inputs(*shape, 3)
        got = forward_backward(per_sample_depthwise_conv2d, v, kernels, grad_out)
        for a, b in zip(got, forward_backward(reference, v, kernels, grad_out)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_impl_names_the_choices():
    v, kernels, _ = inputs(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match="depthwise"):
        per_sample_depthwise_conv2d(v, kernels, "fft")

"""ATConv against a slow reference written the way the paper and the authors' code describe it."""

import pytest
import torch
import torch.nn.functional as F

from atdiff import ATConv
from atdiff.nn.functional import CONV_IMPLS


def reference_atconv(m: ATConv, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Project all N tokens, then pool (the authors' order); one conv2d per (sample, channel)."""
    B, N, _ = x.shape
    k = m.kernel_size
    t = m.kernel_proj(x).transpose(1, 2)  # (B, C, N)
    if m.pooling == "1d":
        t = F.adaptive_avg_pool1d(t, k * k)
    else:
        t = F.adaptive_avg_pool2d(t.reshape(B, -1, H, W), k).flatten(2)
    kernels = m.kernel_gen(F.gelu(t, approximate="tanh")).reshape(B, -1, k, k)
    if m.inhibition:
        kernels = kernels - torch.sigmoid(m.difference_control).view(1, -1, 1, 1) * kernels.mean((2, 3), keepdim=True)
    v = m.x_proj(x).transpose(1, 2).reshape(B, -1, H, W)
    out = torch.empty_like(v)
    for b in range(B):
        for c in range(v.shape[1]):
            out[b, c] = F.conv2d(v[b, c][None, None], kernels[b, c][None, None], padding=k // 2)[0, 0]
    return m.proj(out.flatten(2).transpose(1, 2))


def make(dim=16, **kwargs) -> ATConv:
    torch.manual_seed(0)
    m = ATConv(dim, **kwargs)
    with torch.no_grad():  # non-zero so the inhibition term is exercised per channel
        m.difference_control.normal_()
    return m


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("pooling", ["1d", "2d"])
@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (12, 4)])
def test_matches_reference(impl, pooling, grid):
    m = make(pooling=pooling, conv_impl=impl)
    x = torch.randn(3, grid[0] * grid[1], 16)
    torch.testing.assert_close(m(x, grid), reference_atconv(m, x, *grid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 5])
def test_other_kernel_sizes_and_widths(kernel_size):
    m = make(kernel_size=kernel_size, inner_dim=24, out_dim=8)
    x = torch.randn(2, 6 * 6, 16)
    y = m(x)
    assert y.shape == (2, 36, 8)
    torch.testing.assert_close(y, reference_atconv(m, x, 6, 6), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    m = make(dim=4).double()
    x = torch.randn(2, 3 * 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: m(inp, (3, 5)), (x,))
    # and through the parameters
    params = [p for p in m.parameters()]
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x.detach(), (3, 5))),
        tuple(p.detach().requires_grad_() for p in params),
    )


def test_lateral_inhibition_formula():
    m = make()
    x = torch.randn(2, 64, 16)
    kernels = m.generate_kernels(x, 8, 8)
    m.inhibition = False
    raw = m.generate_kernels(x, 8, 8)
    factor = torch.sigmoid(m.difference_control).view(1, -1, 1, 1)
    torch.testing.assert_close(kernels, raw - factor * raw.mean((2, 3), keepdim=True))
    # the surviving mean is (1 - sigmoid(dc)) of the raw mean: taps compete for weight
    torch.testing.assert_close(kernels.mean((2, 3)), (1 - factor[..., 0, 0]) * raw.mean((2, 3)))


def test_difference_control_starts_at_zero_and_is_excluded_from_decay():
    m = ATConv(8)
    assert torch.equal(m.difference_control, torch.zeros(8))
    assert ATConv.no_weight_decay() == {"difference_control"}


def test_parameter_names_match_authors_checkpoints():
    names = set(ATConv(8).state_dict())
    assert names == {
        "kernel_proj.weight", "kernel_proj.bias", "kernel_gen.weight", "kernel_gen.bias",
        "x_proj.weight", "x_proj.bias", "proj.weight", "proj.bias", "difference_control",
    }


def test_feature_map_equals_tokens():
    m = make()
    fmap = torch.randn(2, 16, 5, 7)
    tokens = fmap.flatten(2).transpose(1, 2)
    out = m(fmap)
    assert out.shape == fmap.shape
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), m(tokens, (5, 7)))


def test_square_grid_is_inferred():
    m = make()
    x = torch.randn(1, 36, 16)
    torch.testing.assert_close(m(x), m(x, (6, 6)))


def test_bad_grid_names_both_numbers():
    m = make()
    with pytest.raises(ValueError, match=r"H\*W = 42.*N = 40"):
        m(torch.randn(1, 40, 16), (6, 7))
    with pytest.raises(ValueError, match="40 tokens"):
        m(torch.randn(1, 40, 16))


def test_bad_options():
    with pytest.raises(ValueError, match="pooling"):
        ATConv(8, pooling="3d")
    with pytest.raises(ValueError, match="odd"):
        ATConv(8, kernel_size=4)
    with pytest.raises(ValueError, match="conv_impl"):
        ATConv(8, conv_impl="fft")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    m = make()
    x = torch.randn(2, 64, 16)
    ref = m(x)
    out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_torch_compile():
    m = make()
    x = torch.randn(2, 48, 16)
    compiled = torch.compile(m)
    torch.testing.assert_close(compiled(x, (6, 8)), m(x, (6, 8)), rtol=1e-5, atol=1e-5)


def reference_attnet_atconv(m: ATConv, fmap: torch.Tensor) -> torch.Tensor:
    """The authors' ImageNet AttNet ATConv on a feature map: 1x1 convs, exact GELU, one grouped conv."""
    B, C, H, W = fmap.shape
    k = m.kernel_size
    t = F.conv2d(fmap, m.kernel_proj.weight, m.kernel_proj.bias).view(B, C, H * W)
    kernels = m.kernel_gen(F.gelu(F.adaptive_avg_pool1d(t, k * k))).reshape(B, C, k, k)
    kernels = kernels - torch.sigmoid(m.difference_control).view(1, -1, 1, 1) * kernels.mean((2, 3), keepdim=True)
    v = F.conv2d(fmap, m.x_proj.weight, m.x_proj.bias).reshape(1, B * C, H, W)
    out = F.conv2d(v, kernels.reshape(B * C, 1, k, k), padding=k // 2, groups=B * C).reshape(B, C, H, W)
    return F.conv2d(out, m.proj.weight, m.proj.bias)


def test_attnet_layout_loads_and_matches_the_authors_computation():
    """AttNet stores kernel_proj/x_proj/proj as 1x1 convs and uses exact GELU: both are options."""
    m = make(weight_layout="conv1x1", activation="gelu")
    shapes = {name: tuple(p.shape) for name, p in m.state_dict().items()}
    assert shapes["kernel_proj.weight"] == shapes["x_proj.weight"] == shapes["proj.weight"] == (16, 16, 1, 1)
    assert shapes["kernel_gen.weight"] == (9, 9)
    fmap = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(m(fmap), reference_attnet_atconv(m, fmap), rtol=1e-5, atol=1e-5)


def test_weight_layouts_compute_the_same_and_activations_differ():
    conv = make(weight_layout="conv1x1")
    linear = ATConv(16)
    linear.load_state_dict({k: v.flatten(1) if v.dim() == 4 else v for k, v in conv.state_dict().items()})
    x = torch.randn(2, 36, 16)
    assert torch.equal(conv(x), linear(x))
    exact = make(weight_layout="conv1x1", activation="gelu")
    assert not torch.equal(exact(x), conv(x))


def test_bad_layout_and_activation():
    with pytest.raises(ValueError, match="weight_layout"):
        ATConv(8, weight_layout="conv3x3")
    with pytest.raises(ValueError, match="activation"):
        ATConv(8, activation="relu")

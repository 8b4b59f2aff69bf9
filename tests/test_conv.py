"""The torch causal conv equals nn.Conv1d's (zero-padded, cut to the input's length): values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from harness.models.conv import causal_conv


@pytest.mark.parametrize("b, d, l, k, bias, activation", [
    (2, 6, 9, 4, True, "silu"),
    (1, 3, 2, 4, False, None),  # shorter than the kernel
    (2, 5, 1, 4, True, None),  # one step
    (2, 4, 7, 1, True, "silu"),  # a one-tap kernel
])
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_causal_conv_matches_conv1d(b, d, l, k, bias, activation, layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=bias)
    # The mixers pass the transposed view of a (b, l, d) projection; a cache continuation passes (b, d, l).
    shape = (b, l, d) if layout == "transposed" else (b, d, l)
    leaf = torch.randn(shape, requires_grad=True)
    x = leaf.transpose(1, 2) if layout == "transposed" else leaf
    y = causal_conv(x, conv, activation)
    out_grad = torch.randn_like(y)
    grads = torch.autograd.grad((y * out_grad).sum(), [leaf, *conv.parameters()])

    ref = conv(x)[..., :l]
    ref = F.silu(ref) if activation else ref
    ref_grads = torch.autograd.grad((ref * out_grad).sum(), [leaf, *conv.parameters()])
    assert y.shape == ref.shape == (b, d, l)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_frozen_conv_weight_gets_no_gradient():
    conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3).requires_grad_(False)
    x = torch.randn(1, 4, 6, requires_grad=True)
    causal_conv(x, conv, "silu").sum().backward()
    assert x.grad is not None and conv.weight.grad is None


def test_a_bf16_input_through_an_fp32_conv_stays_bf16_as_with_the_kernel():
    """causal_conv1d's kernel returns x's dtype; under autocast the projection is bf16 and the conv weight fp32,
    and an fp32 result here would run every later layer (SSD, attention) in fp32 on CUDA without the kernel."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3)
    x = torch.randn(2, 4, 9)
    y = causal_conv(x.bfloat16(), conv, "silu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), causal_conv(x.bfloat16().float(), conv, "silu"), atol=1e-2, rtol=1e-2)

"""Attention over a union of key sets merged by log-sum-exp: the fused CPU kernel and the plain path both equal
one softmax over all the keys, outputs and gradients."""

import pytest
import torch

from harness.attention import merge

VISIBLE = {"all": lambda m, n: torch.ones(m, n, dtype=torch.bool),
           "causal": lambda m, n: torch.ones(m, n, dtype=torch.bool).tril(),
           "anticausal": lambda m, n: torch.ones(m, n, dtype=torch.bool).triu()}


def _dense(q, sets, scale):
    keys, values = torch.cat([k for k, _, _ in sets], 2), torch.cat([v for _, v, _ in sets], 2)
    mask = torch.cat([VISIBLE[p](q.shape[2], k.shape[2]) for k, _, p in sets], 1)
    scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("patterns,sizes", [(["causal", "anticausal", "all"], [9, 9, 5]), (["causal", "all"], [1, 3]),
                                            (["all"], [7])])
def test_union_equals_one_softmax_over_all_keys(monkeypatch, fused, dtype, tol, patterns, sizes):
    monkeypatch.setattr(merge, "_fused", lambda q: fused)
    g = torch.Generator().manual_seed(0)
    m = sizes[0] if patterns[0] != "all" else 4

    def rand(n):
        return torch.randn(2, 3, n, 8, generator=g, dtype=dtype).requires_grad_()

    q = rand(m)
    sets = [(rand(n), rand(n), p) for p, n in zip(patterns, sizes, strict=True)]
    out, ref = merge.attend_sets(q, sets, 0.4), _dense(q, sets, 0.4)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    inputs = [q, *(t for k, v, _ in sets for t in (k, v))]
    up = torch.randn(out.shape, generator=g, dtype=dtype)
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_bf16_union_is_close_to_the_float32_one():
    g = torch.Generator().manual_seed(1)
    q, k, v, kr, vr = (torch.randn(1, 2, n, 16, generator=g) for n in (12, 12, 12, 8, 8))
    sets = [(k, v, "causal"), (kr, vr, "all")]
    out = merge.attend_sets(q.bfloat16(), [(a.bfloat16(), b.bfloat16(), p) for a, b, p in sets], 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _dense(q, sets, 0.25), atol=2e-2, rtol=2e-2)


def test_a_set_that_does_not_fit_its_pattern_is_an_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="pattern 'causal'"):
        merge.attend_sets(q, [(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), "causal")], 1.0)

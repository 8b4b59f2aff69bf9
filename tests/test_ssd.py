"""The chunked SSD scan equals the step-by-step recurrence; its memory is linear in the length."""

import pytest
import torch

from harness.models import ssd
from harness.models.ssd import ssd_chunked, ssd_kernel_name, ssd_recurrent


def _inputs(b, l, h, p, g, n, dtype, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, l, h, p, generator=gen), "dt": torch.rand(b, l, h, generator=gen) * 0.5 + 0.01,
        "A": -torch.rand(h, generator=gen) * 2 - 0.1, "B": torch.randn(b, l, g, n, generator=gen),
        "C": torch.randn(b, l, g, n, generator=gen), "D": torch.randn(h, generator=gen),
        "initial_states": torch.randn(b, h, p, n, generator=gen),
    }
    return {k: v.to(dtype).requires_grad_(requires_grad) for k, v in t.items()}


SHAPES = [  # b, l, h, p, g, n, chunk
    (2, 64, 4, 8, 1, 16, 16),
    (2, 37, 4, 8, 2, 5, 8),  # l not divisible by chunk, ngroups > 1
    (1, 5, 2, 4, 1, 3, 16),  # l < chunk
    (3, 50, 6, 4, 3, 8, 32),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_recurrent(shape, dtype, tol):
    *dims, chunk = shape
    t = _inputs(*dims, dtype)
    y1, s1 = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, t["D"], t["initial_states"], True)
    y2, s2 = ssd_recurrent(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["initial_states"], True)
    assert y1.dtype == dtype and s1.shape == t["initial_states"].shape
    torch.testing.assert_close(y1, y2, atol=tol, rtol=tol)
    torch.testing.assert_close(s1, s2, atol=tol, rtol=tol)


def test_no_initial_state_and_headwise_D():
    t = _inputs(2, 20, 4, 8, 2, 6, torch.float64)
    D = torch.randn(4, 8, dtype=torch.float64)
    y1 = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D)
    y2 = ssd_recurrent(t["x"], t["dt"], t["A"], t["B"], t["C"], D)
    torch.testing.assert_close(y1, y2)


def test_split_sequence_continues_from_final_state():
    t = _inputs(1, 40, 2, 4, 1, 8, torch.float64)
    args = [t[k] for k in ("x", "dt", "A", "B", "C")]
    full = ssd_chunked(*args, 16, t["D"])
    head = [a[:, :23] if a.dim() > 1 else a for a in args]
    tail = [a[:, 23:] if a.dim() > 1 else a for a in args]
    y1, state = ssd_chunked(*head, 16, t["D"], return_final_states=True)
    y2 = ssd_chunked(*tail, 16, t["D"], initial_states=state)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), full)


def test_gradients_match_recurrent_fp64():
    names = ("x", "dt", "A", "B", "C", "D", "initial_states")
    grads = []
    for fn in ("chunked", "recurrent"):
        t = _inputs(2, 29, 4, 4, 2, 5, torch.float64, requires_grad=True)
        args = [t[k] for k in names]
        if fn == "chunked":
            y, s = ssd_chunked(*args[:5], 8, *args[5:], return_final_states=True)
        else:
            y, s = ssd_recurrent(*args, return_final_states=True)
        (y.sin().sum() + s.cos().sum()).backward()
        grads.append([t[k].grad for k in names])
    for name, g1, g2 in zip(names, *grads, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-9, rtol=1e-9, msg=name)


def test_memory_is_linear_in_length():
    """No intermediate grows faster than L: profile every allocation at L = 4096 and bound the largest."""
    b, l, h, p, n, chunk = 1, 4096, 4, 16, 16, 64
    t = _inputs(b, l, h, p, 1, n, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        y = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, t["D"])
    assert y.shape == (b, l, h, p)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest >= 4 * l * h * p  # the profiler saw at least the output-sized tensors
    per_token = largest / 4 / l  # floats per token of the largest single allocation
    # Linear terms: chunk * h (intra-chunk decay), h * p * n / chunk (states); an L^2 term would be >= 4096 * h.
    assert per_token <= 2 * max(chunk * h, h * p, h * p * n / chunk), per_token


def test_kernel_name_on_cpu():
    assert ssd_kernel_name("cpu") == ssd.TORCH_SSD


@pytest.mark.gpu
def test_mamba_ssm_kernel_matches_chunked_bf16():
    pytest.importorskip("mamba_ssm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert ssd_kernel_name("cuda") == ssd.TRITON_SSD
    t = {k: v.cuda() for k, v in _inputs(2, 300, 8, 64, 2, 64, torch.float32).items()}
    ref, ref_state = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 64, t["D"], t["initial_states"], True)
    bf = {k: (v.bfloat16() if k in ("x", "B", "C") else v) for k, v in t.items()}
    y, state = ssd.ssd_scan(bf["x"], bf["dt"], bf["A"], bf["B"], bf["C"], 64, bf["D"], bf["initial_states"], True)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(state.float(), ref_state, atol=5e-2, rtol=5e-2)

"""Attention over a union of key sets merged by log-sum-exp (merge.attend_calls, sets given as slices or
positions of one k, v): each kernel equals one softmax over all the keys, outputs and gradients; the CUDA
kernel's calls fit torch's signatures (on meta tensors here), and a kernel that fails or disagrees on a machine
is not used."""

import warnings

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


def _union(q, sets, scale, positions=False):
    """attend_calls of all of q over `sets` [(k, v, pattern)] given as one k, v (their concatenation), each set a
    slice of it, or with `positions` each "all" set its positions (B, H, n) to gather."""
    k, v = torch.cat([k for k, _, _ in sets], 2), torch.cat([v for _, v, _ in sets], 2)
    keys, end = [], 0
    for set_k, _, pattern in sets:
        n = set_k.shape[2]
        gather = positions and pattern == "all"
        at = torch.arange(end, end + n, device=k.device).expand(*k.shape[:2], n) if gather else slice(end, end + n)
        keys.append((at, pattern))
        end += n
    return merge.attend_calls(q, k, v, [(slice(0, q.shape[2]), keys)], scale)


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("kernel", ["cpu_flash", "plain"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("patterns,sizes", [(["causal", "anticausal", "all"], [9, 9, 5]), (["causal", "all"], [1, 3]),
                                            (["all"], [7])])
def test_union_equals_one_softmax_over_all_keys(monkeypatch, kernel, dtype, tol, patterns, sizes, positions):
    monkeypatch.setattr(merge, "_kernel", lambda q: kernel)
    g = torch.Generator().manual_seed(0)
    m = sizes[0] if patterns[0] != "all" else 4

    def rand(n):
        return torch.randn(2, 3, n, 8, generator=g, dtype=dtype).requires_grad_()

    q = rand(m)
    sets = [(rand(n), rand(n), p) for p, n in zip(patterns, sizes, strict=True)]
    out, ref = _union(q, sets, 0.4, positions), _dense(q, sets, 0.4)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    inputs = [q, *(t for k, v, _ in sets for t in (k, v))]
    up = torch.randn(out.shape, generator=g, dtype=dtype)
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_bf16_union_is_close_to_the_float32_one():
    g = torch.Generator().manual_seed(1)
    q, k, v, kr, vr = (torch.randn(1, 2, n, 16, generator=g) for n in (12, 12, 12, 8, 8))
    sets = [(k, v, "causal"), (kr, vr, "all")]
    out = _union(q.bfloat16(), [(a.bfloat16(), b.bfloat16(), p) for a, b, p in sets], 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _dense(q, sets, 0.25), atol=2e-2, rtol=2e-2)



def test_bf16_gradients_summed_over_many_sets_keep_float32_sums():
    """A query's gradient is the sum of its 32 sets' shares: summed in bf16 it would take a rounding per set (8x
    the error here); in float32 it stays within about one bf16 rounding of the exact one."""
    g = torch.Generator().manual_seed(0)
    q, k, v, up = (torch.randn(1, 2, n, 16, generator=g).bfloat16() for n in (8, 128, 128, 8))
    calls = [(slice(0, 8), [(slice(i, i + 4), "all") for i in range(0, 128, 4)])]

    def grads(dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(merge.attend_calls(*inputs, calls, 0.25), inputs, up.to(dtype))

    for got, exact in zip(grads(torch.bfloat16), grads(torch.float64), strict=True):
        assert got.dtype == torch.bfloat16
        assert (got.double() - exact).abs().max() < 2 ** -7 * exact.abs().max()


@pytest.mark.parametrize("kernel", ["cpu_flash", "plain"])
def test_autocast_around_the_union_changes_nothing(monkeypatch, kernel):
    """A fine-tune's forward runs under autocast and its backward outside: the union's output and gradients must
    be what they are without autocast (the plain kernel's lse came from bf16 scores, its backward from fp32)."""
    monkeypatch.setattr(merge, "_kernel", lambda q: kernel)
    g = torch.Generator().manual_seed(2)
    q, k, v, kr, vr = (torch.randn(1, 2, n, 16, generator=g).mul(3).requires_grad_() for n in (12, 12, 12, 8, 8))
    sets, up = [(k, v, "causal"), (kr, vr, "all")], torch.randn(1, 2, 12, 16, generator=g)
    want = _union(q, sets, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _union(q, sets, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    inputs = [q, k, v, kr, vr]
    for a, b in zip(torch.autograd.grad(got, inputs, up), torch.autograd.grad(want, inputs, up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_set_that_does_not_fit_its_pattern_or_is_empty_is_an_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="pattern 'causal', 5 keys for 4 queries"):
        _union(q, [(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), "causal")], 1.0)
    with pytest.raises(ValueError, match="pattern 'anticausal', 3 keys for 2 queries"):
        merge.attend_calls(q, q, q, [(slice(2, 4), [(slice(0, 3), "anticausal")])], 1.0)
    with pytest.raises(ValueError, match="pattern 'all', 0 keys for 4 queries"):  # not a dead process (SIGFPE)
        merge.attend_calls(q, q, q, [(slice(0, 4), [(slice(0, 4), "causal"), (slice(2, 2), "all")])], 1.0)
    with pytest.raises(ValueError, match="pattern 'all', 4 keys for 0 queries"):
        merge.attend_calls(q, q, q, [(slice(4, 4), [(slice(0, 4), "all")])], 1.0)
    with pytest.raises(ValueError, match="pattern 'none'"):
        _union(q, [(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), "none")], 1.0)


def test_the_cuda_kernel_calls_fit_torch_signatures_and_shapes():
    """On meta tensors, which check each aten call against its schema and give its output shapes."""
    def meta(n):
        return torch.empty(2, 3, n, 64, device="meta", dtype=torch.bfloat16).requires_grad_()

    q, k, v = meta(37), meta(107), meta(107)  # keys: 37 causal, then 70 all
    calls = [(slice(0, 37), [(slice(0, 37), "causal"), (slice(37, 107), "all")])]
    out = merge._Calls.apply(q, k, v, 0.1, calls, "cuda_flash")
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    o, lse, state = merge._cuda_flash(q, k[:, :, 37:], v[:, :, 37:], 0.1, False)
    assert o.shape == q.shape and lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out, [q, k, v], torch.empty_like(out))
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v)]


def test_a_kernel_that_fails_or_disagrees_on_this_machine_is_not_used(monkeypatch):
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert merge._agrees("cpu_flash", cpu, torch.float32, 8)
        assert merge._agrees("cpu_flash", cpu, torch.bfloat16, 16)  # the 16-bit tolerance passes a right kernel
        with torch.inference_mode():  # a first call from evaluation
            assert merge._agrees("cpu_flash", cpu, torch.float32, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # or from training
            assert merge._agrees("cpu_flash", cpu, torch.float32, 32)

    def leaky(q, k, v, scale, causal):  # a kernel that ignores the causal mask: later keys leak into earlier rows
        return merge._cpu_flash(q, k, v, scale, False)

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    monkeypatch.setitem(merge.KERNELS, "leaky", (leaky, merge._cpu_flash_backward))
    monkeypatch.setitem(merge.KERNELS, "broken", (broken, broken))
    with pytest.warns(UserWarning, match=r"'leaky' is not used on cpu .* are [0-9.]+ from the reference"):
        assert not merge._agrees("leaky", cpu, torch.float32, 8)
    with pytest.warns(UserWarning, match="'broken' is not used .* RuntimeError: no kernel image is available for "
                                         "execution on the device. SE-Attn"):
        assert not merge._agrees("broken", cpu, torch.float32, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_union_runs_the_flash_kernel_and_equals_one_softmax(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 4, n, 128, generator=g) for n in (300, 300, 300, 300, 300, 77, 77)]
    up = torch.randn(2, 4, 300, 128, generator=g)

    def union(q, k, v, ka, va, kr, vr):
        return [(k, v, "causal"), (ka, va, "anticausal"), (kr, vr, "all")]

    cuda = [x.cuda().to(dtype).requires_grad_() for x in xs]
    ref_inputs = [x.double().requires_grad_() for x in xs]
    assert merge._kernel(cuda[0]) == "cuda_flash"
    out, ref = _union(cuda[0], union(*cuda), 0.1), _dense(ref_inputs[0], union(*ref_inputs), 0.1)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out, cuda, up.cuda().to(dtype))
    for a, b in zip(grads, torch.autograd.grad(ref, ref_inputs, up.double()), strict=True):
        torch.testing.assert_close(a.double().cpu(), b, atol=5e-2, rtol=5e-2)

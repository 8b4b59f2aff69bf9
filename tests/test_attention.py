"""Attention backends on tensors: every kernel equals its dense-mask reference (outputs and gradients),
exact pattern boundaries, SE-Attn retrieval and causality, decode, option validation, kernel reporting."""

import os

import pytest
import torch

from harness.attention import Backend, attend, available, kernel_log, merge, recording
from harness.attention.blockwise import se_attn_select, valid_counts
from harness.attention.reference import s2_mask, se_attn_retrieval
from harness.errors import UserError

# (batch, q heads, kv heads, length, head dim)
SHAPES = [(1, 2, 2, 1, 8), (2, 4, 2, 37, 8), (1, 3, 1, 64, 16), (2, 2, 2, 5, 4), (1, 4, 4, 100, 8)]
CASES = [
    ("full", {}),
    ("sliding_window", {"window": 1}),
    ("sliding_window", {"window": 3}),
    ("sliding_window", {"window": 16, }),
    ("sliding_window", {"window": 200}),
    ("s2_attn", {}),
    ("s2_attn", {"group_ratio": 0.5}),
    ("s2_attn", {"group_ratio": 1 / 3}),
    ("s2_attn", {"group_ratio": 1.0}),
    ("se_attn", {"chunk_size": 8, "block_size": 4, "top_k": 2}),
    ("se_attn", {"chunk_size": 16, "block_size": 3, "top_k": 1, "per_head": False}),
    ("se_attn", {"chunk_size": 6, "block_size": 6, "top_k": 5}),
    ("se_attn", {"chunk_size": 10, "block_size": 4, "top_k": 100}),  # fewer past blocks than top_k
    ("se_attn", {"chunk_size": 64, "block_size": 8, "top_k": 3}),  # longer than some sequences
    # top_k >= the complete blocks and L not a multiple of S (lengths 5 and 37): the last chunk reads every
    # complete block, so counting one block too few (or the partial last one) shows
    ("se_attn", {"chunk_size": 4, "block_size": 4, "top_k": 10}),
    ("se_attn", {"chunk_size": 8, "block_size": 4, "top_k": 2, "selection": "previous"}),
    ("se_attn", {"chunk_size": 16, "block_size": 3, "top_k": 1, "per_head": False, "selection": "previous"}),
    ("se_attn_random", {"chunk_size": 8, "block_size": 2, "top_k": 3, "seed": 5}),
    ("se_attn_random", {"chunk_size": 12, "block_size": 4, "top_k": 2, "per_head": False}),
    ("se_attn_nomem", {"chunk_size": 7, "block_size": 7}),
]


def _qkv(shape, seed=0, grad=False):
    b, hq, hkv, length, d = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).requires_grad_(grad) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("backend,options", CASES, ids=[f"{b}-{o}" for b, o in CASES])
def test_kernel_equals_reference_outputs_and_gradients(backend, options):
    for i, shape in enumerate(SHAPES):
        q, k, v = _qkv(shape, seed=i, grad=True)
        scale = 0.7 if i % 2 else None  # a model's own scale, or the default d ** -0.5
        out, kernel = attend(q, k, v, backend, scale=scale, return_kernel=True, **options)
        assert kernel.endswith(" via sdpa") or kernel.endswith(" via blockwise")
        ref, ref_kernel = attend(q, k, v, backend, scale=scale, kernel="reference", return_kernel=True, **options)
        assert ref_kernel.endswith(" via reference")
        assert out.shape == q.shape
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        up = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), up)
        ref_grads = torch.autograd.grad(ref, (q, k, v), up)
        for a, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,options", CASES + [("se_attn", {"chunk_size": [8, 12], "block_size": 4, "top_k": 2})])
def test_pairs_count_what_the_reference_mask_lets_through(backend, options):
    impl = Backend(backend, **options)
    sizes = impl.options.get("chunk_size")
    for length, heads in [(1, 1), (5, 3), (37, 4), (64, 1), (100, 3)]:
        q = torch.randn(1, heads, length, 8)
        plans = [impl.plan(False)] if sizes is None or isinstance(sizes, int) else \
            [{"chunk_size": m, "call_seed": 0} for m in sizes]  # training draws each size alike
        masks = [impl.spec.mask(q, q, q, 1.0, impl.options, plan).expand(1, heads, length, length) for plan in plans]
        assert impl.spec.pairs(impl.options, length, heads) == sum(int(m.sum()) for m in masks) / len(masks)


@pytest.mark.parametrize("backend,options", [c for c in CASES if c[0] != "full"], ids=[f"{b}-{o}" for b, o in CASES
                                                                                        if b != "full"])
def test_kernels_hand_no_mask_to_attention(monkeypatch, backend, options):
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        calls.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    fused, (forward, backward) = [], merge.KERNELS["cpu_flash"]  # merge.py's fused calls take none by construction
    monkeypatch.setitem(merge.KERNELS, "cpu_flash", (lambda *a: fused.append(a) or forward(*a), backward))
    q, k, v = _qkv(SHAPES[1])
    attend(q, k, v, backend, **options)
    assert (calls or fused) and all(m is None for m in calls)


def _visibility(backend, length, heads=1, **options):
    """Which keys each query sees, read off the kernel: q = 0 gives uniform weights over visible keys and
    v = identity returns them."""
    q = torch.zeros(1, heads, length, length)
    v = torch.eye(length).expand(1, heads, length, length)
    return attend(q, v, v, backend, **options) > 0


def test_sliding_window_sees_exactly_window_keys_including_itself():
    seen = _visibility("sliding_window", 10, window=3)[0, 0]
    for i in range(10):
        assert seen[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
    assert _visibility("sliding_window", 6, window=1)[0, 0].equal(torch.eye(6, dtype=torch.bool))


def test_s2_groups_and_shift_without_wraparound():
    seen = _visibility("s2_attn", 16, heads=2)  # G = 4, shift 2
    plain, shifted = seen[0, 0], seen[0, 1]
    assert plain[5].nonzero().flatten().tolist() == [4, 5]
    assert plain[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert shifted[1].nonzero().flatten().tolist() == [0, 1]  # first shifted group [0, 2)
    assert shifted[5].nonzero().flatten().tolist() == [2, 3, 4, 5]  # [2, 6)
    assert shifted[15].nonzero().flatten().tolist() == [14, 15]  # last group [14, 16): no wrap to 0
    assert torch.equal(seen[0], s2_mask(16, 2, 0.25)[0])
    # length not divisible: G = ceil(10/4) = 3, the last group is shorter
    odd = _visibility("s2_attn", 10, heads=2)
    assert odd[0, 0, 9].nonzero().flatten().tolist() == [9]
    assert odd[0, 1, 9].nonzero().flatten().tolist() == [7, 8, 9]  # shifted groups [0,1), [1,4), [4,7), [7,10)


def _planted(length=64, d=8, value=5.0):
    """Chunk 3 (M=16) queries point along e0; block 5 (S=4, tokens 20..23) carries v = value * e0, every other
    token small values with no e0 component: block 5's summary is by construction the most relevant."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, length, d, generator=g) * 0.1
    k = torch.randn(1, 1, length, d, generator=g) * 0.1
    v = torch.randn(1, 1, length, d, generator=g) * 0.1
    v[..., 0] = 0
    q[:, :, 48:64] = 0
    q[:, :, 48:64, 0] = 1.0
    v[:, :, 20:24, 0] = value
    return q, k, v


def test_fp16_relevancy_that_overflows_fp16_still_retrieves_only_candidates():
    # the sum of a chunk's 128 fp16 queries dotted with a summary exceeds fp16's 65504: ranked in fp16, overflowed
    # candidates tied with the masked non-candidates, and a chunk read future blocks
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    q[..., 0] += 40.0
    v[:, :, :64, 0] = -20.0
    index, valid = se_attn_select(q.half(), k.half(), v.half(), 0.25, 128, 16, 8, "relevancy", True, 0)
    assert valid[0, 0].sum(-1).tolist() == [0, 8, 8, 8]
    assert all(((index[0, h, i][valid[0, h, i]] + 1) * 16 <= i * 128).all() for h in range(2) for i in range(4))


def test_relevancy_that_overflows_float32_still_retrieves_only_candidates():
    # bf16 holds values float32's relevancy overflows: every score is -inf, and unclamped the candidates tied with
    # the masked non-candidates, so chunks 1 and 2 read blocks 10 and 11, after them
    q, v = torch.full((1, 1, 64, 4), 1e37).bfloat16(), torch.full((1, 1, 64, 4), -1e37).bfloat16()
    index, valid = se_attn_select(q, torch.zeros_like(q), v, 0.5, 16, 4, 2, "relevancy", True, 0)
    assert valid[0, 0].sum(-1).tolist() == valid_counts(64, 16, 4, 2) == [0, 2, 2, 2]
    assert all(((index[0, 0, i] + 1) * 4 <= i * 16).all() for i in range(1, 4))

@pytest.mark.parametrize("length,chunk,block,top_k", [(512, 128, 16, 8), (300, 64, 16, 3), (250, 64, 32, 8),
                                                     (257, 100, 7, 2), (64, 64, 8, 4), (96, 16, 32, 1)])
def test_the_valid_blocks_counted_on_the_host_are_the_ones_selected(length, chunk, block, top_k):
    q, k, v = _qkv((1, 2, 2, length, 8))
    for retrieval in ("relevancy", "random"):
        index, valid = se_attn_select(q, k, v, 8 ** -0.5, chunk, block, top_k, retrieval, True, 0)
        assert (valid.sum(-1) == torch.tensor(valid_counts(length, chunk, block, index.shape[-1]))).all()


def test_a_fine_tune_under_autocast_retrieves_the_blocks_an_evaluation_retrieves():
    # the relevancy is ranked in fp32: under bf16 autocast its matmul ran in bf16, and at this seed chose others
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g).bfloat16() for _ in range(3))
    want = se_attn_select(q, k, v, 0.25, 64, 8, 4, "relevancy", True, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = se_attn_select(q, k, v, 0.25, 64, 8, 4, "relevancy", True, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_planted_block_is_retrieved_and_used():
    q, k, v = _planted()
    opts = dict(chunk_size=16, block_size=4, top_k=1)
    index, valid = se_attn_select(q, k, v, 8**-0.5, 16, 4, 1, "relevancy", True, 0)
    assert index[0, 0, 3].tolist() == [5] and valid[0, 0, 3].all()
    assert se_attn_retrieval(q, k, v, 8**-0.5, 16, 4, 1, "relevancy", True)[0, 0, 3].nonzero().flatten().tolist() == [5]
    out = attend(q, k, v, "se_attn", **opts)
    assert out[0, 0, 48:, 0].min() > 0.5  # the planted values flow into chunk 3
    changed = v.clone()
    changed[:, :, 20:24, 1] += 3.0  # same block, another coordinate: the selection is unchanged
    diff = (attend(q, k, changed, "se_attn", **opts) - out)[0, 0]
    assert diff[48:, 1].abs().min() > 1e-3  # chunk 3 reads block 5
    assert diff[:20].abs().max() == 0  # before the block: chunk 0 retrieves nothing, chunk 1 starts causally
    if 5 not in index[0, 0, 2].tolist():  # chunk 2 reads block 5 only if it retrieved it
        assert diff[32:48].abs().max() == 0
    assert (attend(q, k, changed, "se_attn_nomem", chunk_size=16, block_size=4) -
            attend(q, k, v, "se_attn_nomem", chunk_size=16, block_size=4))[0, 0, 48:].abs().max() == 0


@pytest.mark.parametrize("options", [dict(chunk_size=8, block_size=4, top_k=2),
                                     dict(chunk_size=8, block_size=2, top_k=3, per_head=False),
                                     dict(chunk_size=8, block_size=4, top_k=2, retrieval="random")])
def test_se_attn_never_sees_the_future(options):
    q, k, v = _qkv((2, 4, 2, 45, 8), seed=3)
    out = attend(q, k, v, "se_attn", **options)
    for start in (8, 16, 40):  # chunk boundaries: everything from here on is the future of earlier chunks
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, start:] = torch.randn_like(x[:, :, start:]) * 10
        torch.testing.assert_close(attend(q2, k2, v2, "se_attn", **options)[:, :, :start], out[:, :, :start],
                                   atol=0, rtol=0)
    for p in (3, 13, 30):  # keys/values after any position are invisible to it (queries: see the note below)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, p + 1:] += 5
        v2[:, :, p + 1:] -= 5
        torch.testing.assert_close(attend(q, k2, v2, "se_attn", **options)[:, :, :p + 1], out[:, :, :p + 1],
                                   atol=0, rtol=0)
    # Note: by the paper's definition a chunk's relevancy sums ALL its queries, so which blocks a query's chunk
    # retrieves can depend on later queries of the same chunk (selection only; no value from the future).


@pytest.mark.parametrize("per_head", [True, False])
def test_previous_chunk_selection_is_strictly_causal_and_the_papers_is_not(per_head):
    """With selection="previous" no output depends on any later token, queries included; with the paper's
    "chunk" a later query of a chunk changes what its earlier positions see."""
    q, k, v = _qkv((1, 4, 2, 64, 8), seed=5)
    opts = dict(chunk_size=16, block_size=4, top_k=1, per_head=per_head)
    moved = {"chunk": 0.0, "previous": 0.0}
    for selection in moved:
        for kernel in ("blockwise", "reference"):
            out = attend(q, k, v, "se_attn", selection=selection, kernel=kernel, **opts)
            for p in (20, 37, 50):  # inside chunks 1-3: tokens after p, of p's own chunk and later
                q2, k2, v2 = (x.clone() for x in (q, k, v))
                for x in (q2, k2, v2):
                    x[:, :, p + 1:] = torch.randn_like(x[:, :, p + 1:]) * 10
                diff = (attend(q2, k2, v2, "se_attn", selection=selection, kernel=kernel, **opts) - out)[:, :, :p + 1]
                moved[selection] = max(moved[selection], diff.abs().max().item())
    assert moved["previous"] == 0
    assert moved["chunk"] > 1e-3


def test_random_chunk_size_in_training_is_seeded_and_eval_uses_largest():
    a, b = Backend("se_attn", chunk_size=[4, 8, 16], block_size=2, top_k=1, seed=7), Backend(
        "se_attn", chunk_size=[4, 8, 16], block_size=2, top_k=1, seed=7)
    draws_a = [a.plan(training=True)["chunk_size"] for _ in range(30)]
    assert draws_a == [b.plan(training=True)["chunk_size"] for _ in range(30)]
    assert set(draws_a) == {4, 8, 16}
    assert a.plan(training=False)["chunk_size"] == 16
    c = Backend("se_attn", chunk_size=[4, 8, 16], block_size=2, top_k=1, seed=8)
    assert [c.plan(training=True)["chunk_size"] for _ in range(30)] != draws_a
    q, k, v = _qkv((1, 2, 2, 33, 8))
    torch.testing.assert_close(attend(q, k, v, "se_attn", chunk_size=[4, 16], block_size=2),
                               attend(q, k, v, "se_attn", chunk_size=16, block_size=2))


def test_decode_is_full_attention_and_reported():
    """SE-Attn and S²-Attn have no rule for one query at a time (their patterns depend on later queries)."""
    q, k, v = _qkv((2, 4, 2, 12, 8))
    full = attend(q, k, v, "full")
    for backend, opts in [("se_attn", dict(chunk_size=4, block_size=2)), ("s2_attn", {}), ("se_attn_nomem", {})]:
        with recording() as kernels:
            out = attend(q[:, :, -3:], k, v, backend, **opts)
        assert kernels == {"full via sdpa (decode)"}
        torch.testing.assert_close(out, full[:, :, -3:], atol=1e-6, rtol=1e-5)
    assert kernel_log()["full via sdpa (decode)"] >= 3


@pytest.mark.parametrize("window", [1, 2, 5, 12, 40])
def test_decode_under_a_sliding_window_sees_the_window_as_the_prompt_does(window):
    """A token decoded on the cache sees its `window` most recent keys: the rows of a cache-free forward."""
    q, k, v = _qkv((2, 4, 2, 12, 8))
    whole = attend(q, k, v, "sliding_window", window=window)
    for new in (1, 3):
        with recording() as kernels:
            out = attend(q[:, :, -new:], k, v, "sliding_window", window=window)
        assert kernels == {"sliding_window via sdpa (decode)"}
        torch.testing.assert_close(out, whole[:, :, -new:], atol=1e-6, rtol=1e-5)
    # a padding mask (left padding of the first sequence) narrows it further
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., :4] = False
    out, _ = Backend("sliding_window", window=window)(q[:, :, -1:], k, v, mask=mask)
    keys = [j for j in range(max(4, 12 - window), 12)]
    torch.testing.assert_close(out[0], attend(q[:1, :, -1:], k[:1, :, keys], v[:1, :, keys], "full")[0],
                               atol=1e-6, rtol=1e-5)


def test_padding_mask_is_an_error_except_for_full():
    q, k, v = _qkv((2, 2, 2, 6, 4))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    Backend("se_attn", chunk_size=4, block_size=2)(q, k, v, mask=mask)  # plain causal mask: accepted
    mask[0, :, :, 0] = False
    with pytest.raises(UserError, match="padding"):
        Backend("se_attn", chunk_size=4, block_size=2)(q, k, v, mask=mask)
    out, kernel = Backend("full")(q, k, v, mask=mask)
    assert kernel == "full via sdpa" and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend,options,match", [
    ("se_atn", {}, "did you mean 'se_attn'"),
    ("se_attn", {"top_k": -1}, "top_k"),
    ("se_attn", {"chunk_size": 8, "block_size": 16}, "block_size"),
    ("se_attn", {"chunk_size": [2, 8], "block_size": 4}, "block_size"),  # longer than the smallest chunk
    ("se_attn", {"chunk_size": [8, 0]}, "chunk_size"),
    ("se_attn", {"retrieval": "relevance"}, "retrieval"),
    ("se_attn", {"per_head": 1}, "per_head"),
    ("se_attn", {"seed": 2**64}, "seed"),  # torch's generator would refuse it with a ValueError
    ("se_attn", {"seed": 2**63}, "seed"),  # seeds end where the suite's do (spec.SEED_END)
    ("se_attn", {"seed": -1}, "seed"),  # the same generator as 2**64 - 1
    ("se_attn", {"chunk_sizes": 8}, "chunk_size"),
    ("sliding_window", {"window": 0}, "window"),
    ("sliding_window", {"window": 2.5}, "window"),
    ("s2_attn", {"group_ratio": 0}, "group_ratio"),
    ("s2_attn", {"window": 4}, "no option 'window'"),
    ("full", {"kernel": "flex"}, "kernel"),
    ("se_attn_nomem", {"retrieval": "relevancy"}, "retrieval"),
])
def test_bad_input_is_a_user_error(backend, options, match):
    q, k, v = _qkv((1, 2, 2, 8, 4))
    with pytest.raises(UserError, match=f"(?i){match}"):
        attend(q, k, v, backend, **options)


def test_unknown_backend_lists_available_ones_and_shapes_are_checked():
    with pytest.raises(UserError, match="available: full, sliding_window, s2_attn, se_attn"):
        attend(*_qkv((1, 2, 2, 8, 4)), "bogus")
    q, k, v = _qkv((1, 3, 2, 8, 4))
    with pytest.raises(UserError, match="multiple"):
        attend(q, k, v, "full")


def test_unavailable_fast_path_is_an_error_unless_fallback_allowed():
    q, k, v = _qkv((1, 2, 2, 8, 4))
    with pytest.raises(UserError, match="not available"):
        attend(q, k, v, "full", kernel="flash")
    with pytest.raises(UserError, match="not available"):
        attend(q, k, v, "se_attn", kernel="flex", chunk_size=4, block_size=2)
    out, kernel = attend(q, k, v, "sliding_window", window=3, kernel="flash", fallback=True, return_kernel=True)
    assert kernel == "sliding_window via blockwise"


def test_available_lists_backends_options_kernels():
    info = available()
    assert {"full", "sliding_window", "s2_attn", "se_attn", "se_attn_nomem", "se_attn_random"} <= set(info)
    assert set(info["se_attn"]["options"]) >= {"chunk_size", "block_size", "top_k", "retrieval", "per_head", "seed"}
    assert info["se_attn"]["options"]["per_head"]["default"] is True
    assert "flash" in info["full"]["kernels"] and "decode" in info["s2_attn"]["capabilities"]
    assert info["se_attn_nomem"]["options"]["retrieval"]["default"] == "none"  # aliases show what they fix
    assert info["se_attn_random"]["options"]["retrieval"]["default"] == "random"


def test_every_registered_backend_is_tested_and_runs_on_cpu():
    from harness.attention.backends import SPECS
    from harness.attention.options import ALIASES

    assert set(SPECS) | set(ALIASES) <= {b for b, _ in CASES}  # a new backend joins CASES, so the equivalence runs
    for spec in SPECS.values():
        assert spec.auto[-1] in spec.kernels and set(spec.auto) <= set(spec.kernels)
        assert set(spec.defaults) == set(spec.allowed)
        q = torch.zeros(1, 1, 4, 8)
        out, kernel = Backend(spec.name)(q, q, q)
        assert kernel == f"{spec.name} via {spec.auto[-1]}" and out.shape == q.shape


def test_flex_is_not_offered_for_head_dims_its_cuda_lowering_refuses(monkeypatch):
    from types import SimpleNamespace

    from harness.attention import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_cuda = [SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 2, 64, d)) for d in (8, 16, 128)]
    assert [gpu.available("flex", q) for q in on_cuda] == [False, True, True]


def test_a_flash_attn_that_fails_to_import_is_not_offered(monkeypatch):
    """An installed flash-attn built for another torch fails at import; "auto" must then take the next kernel."""
    import importlib.machinery
    import sys
    import types
    from types import SimpleNamespace

    from harness.attention import gpu

    broken = types.ModuleType("flash_attn")  # found on the path, but without its compiled kernel
    broken.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu._flash_attn_func.cache_clear()
    try:
        assert not gpu.available("flash", SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 2, 64, 64)))
    finally:
        gpu._flash_attn_func.cache_clear()


def test_se_attn_calls_fit_a_cuda_grid_at_64k(monkeypatch):
    """CUDA's attention kernels launch a grid of (query blocks, batch, heads), batch and heads at most 65535 each:
    the block summaries ran as one call of 32 x 2048 = 65536 "heads" at 64K tokens (gpu-check's longest cell)."""
    from harness.attention import blockwise

    shapes, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(blockwise.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: shapes.append(tuple(q.shape)) or sdpa(q, *a, **k))
    q = torch.empty(1, 32, 65536, 128, device="meta", dtype=torch.bfloat16)
    blockwise.se_attn(q, q, q, 128 ** -0.5, 2048, 32, 8, "relevancy", True, 0)
    assert shapes and max(max(shape[:2]) for shape in shapes) <= 65535, shapes


def test_bench_rows_have_kernel_and_times():
    from harness.attention.bench import bench_attention

    rows = bench_attention([("full", {}), ("se_attn", {"chunk_size": 16, "block_size": 4, "top_k": 2})], [32],
                           heads=2, head_dim=8, repeats=2, warmup=1)
    assert [r["kernel"] for r in rows] == ["full via sdpa", "se_attn via blockwise"]
    assert all(r["time_ms"] > 0 for r in rows)


def test_bench_counts_peak_memory_on_the_cpu_too():
    """Inputs plus what a forward+backward holds at once: at least the output and three gradients beside q, k, v
    for the fused kernel, and the L x L scores too for the dense reference."""
    from harness.attention.bench import bench_attention

    rows = bench_attention([("full", {}), ("full", {"kernel": "reference"})], [512], heads=2, head_dim=16,
                           repeats=1, warmup=1)
    tensor, scores = 2 * 512 * 16 * 4 / 2**30, 2 * 512 * 512 * 4 / 2**30  # one of q, k, v; the scores (fp32)
    fused, dense = (r["peak_gib"] for r in rows)
    assert 7 * tensor <= fused < dense and dense >= 3 * tensor + scores


def test_blockwise_kernels_hold_less_at_their_peak_than_dense_attention():
    """The sliding window and SE-Attn hold at once only the output and the three gradients at full length (beside
    what every backend holds: q, k, v and the output's gradient) and one call's temporaries: at least half a q-sized
    tensor less than the fused dense kernel's peak (10 to 11 q-sized tensors here, theirs 9.0 to 9.4). Slices of q, k, v
    in the autograd graph (a full-length zero gradient in each one's backward), copies of reshaped blocks or
    flipped full-length tensors would each add one."""
    from harness.attention.bench import bench_attention

    backends = [("full", {}), ("sliding_window", {"window": 320}),
                ("se_attn", {"chunk_size": 512, "block_size": 16, "top_k": 4})]
    full, window, se = (r["peak_gib"] for r in bench_attention(backends, [2048], heads=4, head_dim=32, repeats=1,
                                                                   warmup=1))
    tensor = 4 * 2048 * 32 * 4 / 2**30  # one of q, k, v
    assert window < full - tensor / 2 and se < full - tensor / 2, (full / tensor, window / tensor, se / tensor)


def _reference_of_bf16(q, k, v, backend, options):
    """The fp32 reference of bf16 inputs; for SE-Attn with the blocks the kernels rank from those inputs: bf16 block
    summaries order near-tied relevancies otherwise than fp32 ones (1 to 6 of 300-400 selections at the shapes
    below), and another block is another output. Which blocks win is tested in fp32 above."""
    from harness.attention.gpu import se_attn_retrieved
    from harness.attention.reference import dense_attention, se_attn_mask

    impl = Backend(backend, **options)
    if impl.name != "se_attn":
        return attend(q.float(), k.float(), v.float(), backend, kernel="reference", **options)
    o, plan = impl.options, impl.plan(False)
    m, s, scale = min(plan["chunk_size"], q.shape[2]), o["block_size"], q.shape[-1] ** -0.5
    index, valid = se_attn_select(q.detach(), k.detach(), v.detach(), scale, m, s, o["top_k"], o["retrieval"],
                                  o["per_head"], plan["call_seed"], o["selection"])
    mask = se_attn_mask(se_attn_retrieved(q, index, valid, m, s), q.shape[2], m, s)
    return dense_attention(q.float(), k.float(), v.float(), mask, scale)


@pytest.mark.parametrize("backend,options", [("sliding_window", {"window": 16}),
                                             ("se_attn", {"chunk_size": 8, "block_size": 4, "top_k": 2})])
def test_bf16_kernels_on_the_cpu_are_within_bf16_rounding_of_the_fp32_reference(backend, options):
    """Outputs and gradients, each within 2% of its largest value: a few bf16 roundings (an lse kept in bf16 would
    weigh the merged calls off by more)."""
    q, k, v = (x.bfloat16().requires_grad_() for x in _qkv((2, 4, 2, 37, 8), seed=1))
    up = torch.randn(2, 4, 37, 8, generator=torch.Generator().manual_seed(2))
    out = attend(q, k, v, backend, **options)
    ref = _reference_of_bf16(q, k, v, backend, options)
    for a, b in zip((out, *torch.autograd.grad(out, (q, k, v), up.bfloat16())),
                    (ref, *torch.autograd.grad(ref, (q, k, v), up)), strict=True):
        assert a.dtype == torch.bfloat16 and (a.float() - b.float()).abs().max() < 2e-2 * b.float().abs().max()

@pytest.mark.gpu
@pytest.mark.parametrize("backend,options", [c for c in CASES if c[0] != "full"] + [("full", {})])
def test_cuda_kernels_equal_reference_bf16(backend, options):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    info = available()[backend]
    for kernel in [k for k in info["kernels"] if k not in ("auto", "reference")]:
        for i, shape in enumerate(SHAPES[1:] + [(2, 4, 2, 300, 64)]):  # flex needs a head dim of 16 or more
            q, k, v = (x.cuda().bfloat16().requires_grad_() for x in _qkv(shape, seed=i))
            try:
                out = attend(q, k, v, backend, kernel=kernel, **options)
            except UserError:  # e.g. flash-attn not installed
                continue
            ref = _reference_of_bf16(q, k, v, backend, options)
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
            out.float().sum().backward()
            assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_flex_kernels_equal_reference_forward_on_cpu():
    """The CUDA flex paths (block masks from the retrieval index or the window, mask functions, grouped kv heads) run
    on the CPU too, forward only (FlexAttention has no CPU backward): the same values as the dense reference. About
    20 s, mostly inductor compiling."""
    import shutil

    from harness.attention import gpu

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("compiled FlexAttention on the CPU needs a C++ compiler (g++ or $CXX)")
    q, k, v = _qkv((2, 4, 2, 700, 16))  # 700: chunks, blocks and 128-token tiles all straddle
    torch.testing.assert_close(gpu.sliding_window_flex(q, k, v, 0.25, 100),
                               attend(q, k, v, "sliding_window", kernel="reference", window=100))
    for per_head, selection in ((True, "chunk"), (False, "previous")):
        options = {"chunk_size": 160, "block_size": 24, "top_k": 3, "per_head": per_head, "selection": selection}
        torch.testing.assert_close(gpu.se_attn_flex(q, k, v, 0.25, 160, 24, 3, "relevancy", per_head, 0, selection),
                                   attend(q, k, v, "se_attn", kernel="reference", **options))


@pytest.mark.parametrize("length,chunk,block,top_k,tile,per_head", [
    (512, 256, 32, 3, 64, True),  # everything divides
    (700, 160, 24, 4, 32, True),  # nothing does: chunks and blocks straddle tiles, a ragged last tile
    (300, 64, 16, 2, 32, False),
    (256, 300, 16, 2, 64, True),  # one chunk: no retrieval
    (384, 96, 128, 2, 32, True),  # blocks longer than tiles
])
def test_se_attn_block_mask_from_the_retrieval_is_the_one_flex_builds_from_the_dense_mask(
        length, chunk, block, top_k, tile, per_head):
    from torch.nn.attention.flex_attention import create_block_mask

    from harness.attention.gpu import se_attn_block_mask, se_attn_retrieved

    q, k, v = _qkv((2, 3, 3, length, 8))
    m = min(chunk, length)
    index, valid = se_attn_select(q, k, v, 8 ** -0.5, m, block, top_k, "attention", per_head, 0)
    retrieved = se_attn_retrieved(q, index, valid, m, block)

    def mask_mod(bi, h, qi, kj):
        return ((kj // m == qi // m) & (kj <= qi)) | retrieved[bi, h, qi // m, kj // block]

    assert_same_block_mask(se_attn_block_mask(retrieved, length, m, block, mask_mod, tile=tile),
                           create_block_mask(mask_mod, 2, 3, length, length, device="cpu", BLOCK_SIZE=tile))


@pytest.mark.parametrize("length,window,tile", [(512, 128, 64), (700, 100, 32), (300, 1, 32), (200, 500, 64),
                                                (640, 64, 128)])
def test_sliding_window_block_mask_is_the_one_flex_builds_from_the_dense_mask(length, window, tile):
    from torch.nn.attention.flex_attention import create_block_mask

    from harness.attention.gpu import sliding_window_block_mask

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (kj > qi - window)

    assert_same_block_mask(sliding_window_block_mask(length, window, mask_mod, tile=tile),
                           create_block_mask(mask_mod, None, None, length, length, device="cpu", BLOCK_SIZE=tile),
                           full=window > tile)


def assert_same_block_mask(mine, theirs, full=True):
    for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                  "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
    assert mine.kv_num_blocks.sum() > 0 and (mine.full_kv_num_blocks.sum() > 0) == full  # partial tiles, full ones
    assert mine.seq_lengths == theirs.seq_lengths


def test_a_recording_nested_in_one_that_saw_the_same_kernels_leaves_the_outer_one_recording():
    """A fine-tune's recording inside a cell's: both sets equal when the inner one closes."""
    q, k, v = _qkv((1, 2, 2, 8, 4))
    with recording() as outer:
        with recording() as inner:
            attend(q, k, v, "s2_attn")
        attend(q, k, v)
    assert inner == {"s2_attn via blockwise"} and outer == {"s2_attn via blockwise", "full via sdpa"}
def test_a_backend_without_options_runs_the_papers_setting():
    """The defaults are the paper's (Mamba-2-Hybrid at 8192, what suites/paper.yaml spells out)."""
    from pathlib import Path

    import yaml

    from harness.attention.options import resolve

    given = yaml.safe_load(Path("suites/paper.yaml").read_text())["backends"]
    for entry in given:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
        assert resolve(name, {}) == resolve(name, options)
    assert resolve("se_attn", {})[1] == {"chunk_size": (2048, 4096), "block_size": 32, "top_k": 8, "kernel": "auto",
                                          "fallback": False, "retrieval": "relevancy", "per_head": True, "seed": 0,
                                          "selection": "chunk"}


@pytest.mark.parametrize("backend,options,match", [
    ("full", {"fallback": 1}, "fallback"),
    ("sliding_window", {"window": True}, "window"),
    ("se_attn", {"chunk_size": True}, "chunk_size"),
    ("se_attn", {"chunk_size": 8, "block_size": True}, "block_size"),
    ("se_attn", {"top_k": False}, "top_k"),
    ("se_attn", {"seed": True}, "seed"),
])
def test_bools_are_not_ints_or_flags_given_as_ints(backend, options, match):
    with pytest.raises(UserError, match=f"option {match}=.* is invalid"):
        Backend(backend, **options)


def test_options_that_mean_the_same_resolve_and_register_alike():
    """Chunk sizes are a sorted set (one size is an int), a group ratio a float, an alias the options it fixes: the
    implementation name (a cache key) does not depend on how they were written."""
    from harness.attention import implementation_name
    from harness.attention.options import resolve

    assert resolve("se_attn", {"chunk_size": [4096, 2048, 4096]})[1]["chunk_size"] == (2048, 4096)
    assert resolve("se_attn", {"chunk_size": [8, 8], "block_size": 4})[1]["chunk_size"] == 8
    assert type(resolve("s2_attn", {"group_ratio": 1})[1]["group_ratio"]) is float
    same = [[("se_attn", {"chunk_size": [4096, 2048]}), ("se_attn", {"chunk_size": (2048, 4096)}),
             ("se_attn", {"chunk_size": {2048, 4096}}), ("se_attn", {})],
            [("se_attn", {"chunk_size": 8, "block_size": 4}), ("se_attn", {"chunk_size": [8], "block_size": 4})],
            [("s2_attn", {"group_ratio": 1}), ("s2_attn", {"group_ratio": 1.0})],
            [("se_attn_nomem", {}), ("se_attn", {"retrieval": "none"})],
            [("sliding_window", {"window": 4096}), ("sliding_window", {"kernel": "auto", "fallback": False})]]
    names = [{implementation_name(b, **o) for b, o in group} for group in same]
    assert all(len(n) == 1 for n in names) and len(set.union(*names)) == len(same)
    assert names[3] == {implementation_name("se_attn", retrieval="none")}
    assert next(iter(names[3])).startswith("harness_se_attn_")


def test_random_retrieval_is_seeded_by_the_seed_in_eval_and_drawn_anew_per_training_call():
    q, k, v = _qkv((1, 2, 2, 48, 8))
    opts = dict(chunk_size=16, block_size=4, top_k=1)
    one, again, other = (attend(q, k, v, "se_attn_random", seed=s, **opts) for s in (1, 1, 2))
    assert torch.equal(one, again) and not torch.equal(one, other)
    trained = [attend(q, k, v, "se_attn_random", seed=1, training=True, **opts) for _ in range(3)]
    assert not torch.equal(trained[0], trained[1]) or not torch.equal(trained[1], trained[2])


def test_auto_takes_the_fastest_kernel_that_can_run(monkeypatch):
    """On CUDA (every kernel available): flash-attn for full, sliding_window and s2_attn, blockwise for se_attn
    (flex is opt-in); without flash-attn, flex for sliding_window. flash-attn takes no padding mask."""
    from harness.attention import gpu

    q = torch.zeros(1, 2, 8, 16)
    have = {"flash", "flex"}
    monkeypatch.setattr(gpu, "available", lambda kernel, q: kernel in have or kernel not in ("flash", "flex"))
    chosen = {name: Backend(name).kernel_for(q) for name in ("full", "sliding_window", "s2_attn", "se_attn")}
    assert chosen == {"full": "flash", "sliding_window": "flash", "s2_attn": "flash", "se_attn": "blockwise"}
    assert Backend("full").kernel_for(q, masked=True) == "sdpa"
    assert Backend("se_attn", kernel="flex").kernel_for(q) == "flex"
    have = {"flex"}
    chosen = {name: Backend(name).kernel_for(q) for name in ("full", "sliding_window", "s2_attn", "se_attn")}
    assert chosen == {"full": "sdpa", "sliding_window": "flex", "s2_attn": "blockwise", "se_attn": "blockwise"}


def test_a_padding_mask_never_reaches_flash_attn(monkeypatch):
    from harness.attention import gpu

    monkeypatch.setattr(gpu, "available", lambda kernel, q: True)  # flash-attn "installed" (it would fail on CPU)
    q, k, v = _qkv((2, 2, 2, 6, 4))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False
    want, _ = Backend("full", kernel="sdpa")(q, k, v, mask=mask)
    for options in ({}, {"kernel": "flash", "fallback": True}):
        out, kernel = Backend("full", **options)(q, k, v, mask=mask)
        assert kernel == "full via sdpa" and torch.equal(out, want)
    with pytest.raises(UserError, match="kernel 'flash' cannot take a padding mask"):  # installed: the mask is why
        Backend("full", kernel="flash")(q, k, v, mask=mask)
    monkeypatch.setattr(gpu, "available", lambda kernel, q: kernel != "flash")
    with pytest.raises(UserError, match="kernel 'flash' is not available here"):
        Backend("full", kernel="flash")(q, k, v, mask=mask)


def test_additive_float_masks_mean_what_boolean_ones_do():
    q, k, v = _qkv((2, 2, 2, 6, 4))
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    keep[0, :, :, 0] = False
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(Backend("full")(q, k, v, mask=additive)[0], Backend("full")(q, k, v, mask=keep)[0])
    causal = torch.zeros(1, 1, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    se = Backend("se_attn", chunk_size=4, block_size=2)
    torch.testing.assert_close(se(q, k, v, mask=causal)[0], se(q, k, v)[0])  # plain causal: accepted


def test_the_reference_kernel_keeps_a_key_padding_mask_causal():
    q, k, v = _qkv((2, 2, 2, 7, 4))
    keys = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keys[1, :, :, 2:4] = False  # two padded keys in the second sequence
    ref = Backend("full", kernel="reference")(q, k, v, mask=keys)[0]
    torch.testing.assert_close(ref, Backend("full")(q, k, v, mask=keys)[0])
    torch.testing.assert_close(ref[0], attend(q, k, v)[0])


def _draws(seed, step, micro_batch, calls=20, warm=0):
    from harness.attention.backend import training_call

    b = Backend("se_attn", chunk_size=[4, 8, 16], block_size=2, top_k=1, seed=seed)
    for _ in range(warm):  # calls outside the loop draw from the backend's own generator
        b.plan(training=True)
    with training_call(step, micro_batch):
        return [b.plan(training=True)["chunk_size"] for _ in range(calls)]


def test_in_the_training_loop_draws_follow_seed_step_micro_batch_and_call():
    draws = _draws(3, 5, 1)
    assert len(set(draws)) > 1  # the n-th call of a micro-batch draws anew
    assert draws == _draws(3, 5, 1, warm=7)  # ... whatever ran before (a resumed fine-tune draws the same)
    assert all(_draws(*other) != draws for other in [(4, 5, 1), (3, 6, 1), (3, 5, 2)])


def test_recomputation_reuses_the_seeds_of_the_forward_calls_last_in_first_out():
    """Two checkpointed calls of one module before one backward (the second is recomputed first): each
    recomputation draws the chunk size its forward drew."""
    from torch.utils.checkpoint import checkpoint

    b, module = Backend("se_attn", chunk_size=[4, 16], block_size=2, top_k=1, seed=3), torch.nn.Module()
    assert len({b.plan(training=True, module=torch.nn.Module())["chunk_size"] for _ in range(2)}) == 2
    inputs = [_qkv((1, 2, 2, 33, 8), seed=s, grad=True) for s in (0, 1)]

    def grads(checkpointed):
        b.reset()

        def run(q, k, v):
            return b(q, k, v, training=True, module=module)[0]

        outs = [checkpoint(run, *x, use_reentrant=False) if checkpointed else run(*x) for x in inputs]
        loss = sum((o * torch.arange(o.numel()).reshape(o.shape).sin()).sum() for o in outs)
        return torch.autograd.grad(loss, [t for x in inputs for t in x])

    for a, c in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, c)


def test_unrecorded_leaves_the_open_recordings_out_and_open():
    from harness.attention.recording import unrecorded

    q, k, v = _qkv((1, 2, 2, 8, 4))
    with recording() as outer:
        with recording() as inner:
            attend(q, k, v, "s2_attn")
            with unrecorded():
                attend(q, k, v, "sliding_window", window=2)
        attend(q, k, v)
    assert inner == {"s2_attn via blockwise"} and outer == {"s2_attn via blockwise", "full via sdpa"}


def test_available_offers_auto_and_reference_and_says_which_take_a_padding_mask():
    info = available()
    assert all(i["kernels"][:2] == ["auto", "reference"] for i in info.values())
    assert [n for n, i in info.items() if i["capabilities"]["padding_mask"] is True] == ["full"]


def test_bench_rows_count_pairs_over_the_batch_and_the_speedup_they_allow(monkeypatch):
    import statistics

    from harness.attention import bench

    shapes, one = [], bench._one
    monkeypatch.setattr(bench, "_one", lambda b, q, k, v: shapes.append((q.shape, k.shape)) or one(b, q, k, v))
    rows = bench.bench_attention([("full", {}), ("sliding_window", {"window": 8})], [32], heads=4, kv_heads=2,
                                 head_dim=8, batch=3, repeats=3, warmup=0)
    assert {s for s in shapes} == {((3, 4, 32, 8), (3, 2, 32, 8))}
    full, window = rows
    assert full["pairs"] == 3 * 4 * 32 * 33 // 2 and full["ideal_speedup"] == 1.0
    assert window["pairs"] == 3 * 4 * (8 * 9 // 2 + 24 * 8)
    assert window["ideal_speedup"] == pytest.approx(528 / 228)
    assert all(r["time_ms"] == statistics.median(r["times_ms"]) and len(r["times_ms"]) == 3 for r in rows)


def test_top_k_zero_retrieves_nothing():
    q, k, v = _qkv((1, 2, 2, 40, 8))
    torch.testing.assert_close(attend(q, k, v, "se_attn", chunk_size=8, block_size=4, top_k=0),
                               attend(q, k, v, "se_attn_nomem", chunk_size=8, block_size=4))


def test_bench_times_every_chunk_size_se_attn_draws_among(monkeypatch):
    """se_attn with several chunk sizes draws one per training call, and its pairs (so the limit) are the mean over
    the sizes: its time is the mean of the sizes' times too (each repeat one call of each size), not the median of
    calls whose sizes fell as the draws did (which is the majority size's time); its peak is the largest size's."""
    from harness.attention import bench

    monkeypatch.setattr(bench, "_timed", lambda b, q, k, v, device: (b.plan(True)["chunk_size"] / 1e3, "k"))
    monkeypatch.setattr(bench, "_cpu_peak_gib", lambda b, q, k, v: float(b.plan(True)["chunk_size"]))
    opts = {"block_size": 4, "top_k": 2}
    (row,) = bench.bench_attention([("se_attn", {"chunk_size": [8, 16], **opts})], [32], heads=2, head_dim=8,
                                   repeats=5, warmup=1)
    assert row["times_ms"] == [12.0] * 5 and row["time_ms"] == 12.0 and row["peak_gib"] == 16.0
    assert row["options"] == {"chunk_size": [8, 16], **opts}
    each = [bench.bench_attention([("se_attn", {"chunk_size": m, **opts})], [32], heads=2, head_dim=8, repeats=1,
                                  warmup=1)[0] for m in (8, 16)]
    assert row["pairs"] == sum(r["pairs"] for r in each) / 2

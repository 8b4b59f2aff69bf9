import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from harness.errors import UserError
from harness.metrics import PROTOCOLS, evaluate_perplexity
from harness.metrics.perplexity import chunked_nll_sum, plan_windows, subset_indices

N_TOKENS = 203  # deliberately not a multiple of any step/stride used below


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (N_TOKENS,), generator=g)


@torch.no_grad()
def window_nll(model, window: torch.Tensor, first: int) -> torch.Tensor:
    """Per-token NLL of window[first:] from full logits: logits[t-1] predicts window[t]."""
    logits = model(input_ids=window[None], use_cache=False).logits[0].float()
    return F.cross_entropy(logits[first - 1:-1], window[first:], reduction="none")


def reference_longlora(model, tokens, context, step):
    losses = []
    start = 0
    while start + context <= len(tokens):
        losses.append(window_nll(model, tokens[start:start + context], 1))
        start += step
    return torch.cat(losses), len(losses)


def reference_stride(model, tokens, context, stride):
    """HF's loop, except that the last window is shifted back to keep `context` tokens."""
    losses, windows, prev_end, begin = [], 0, 0, 0
    while prev_end < len(tokens):
        end = min(begin + context, len(tokens))
        start = end - context
        first = max(1, prev_end - start)
        losses.append(window_nll(model, tokens[start:end], first))
        windows += 1
        prev_end, begin = end, begin + stride
    return torch.cat(losses), windows


@pytest.mark.parametrize("context,step", [(32, 16), (64, 50), (203, 256)])
def test_longlora_matches_direct_computation(model, tokens, context, step):
    ref, n_windows = reference_longlora(model, tokens, context, step)
    res = evaluate_perplexity(model, tokens, context, "longlora", step=step)
    assert res.windows == n_windows
    assert res.tokens_scored == n_windows * (context - 1) == ref.numel()
    assert res.nll == pytest.approx(ref.double().mean().item(), rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref.double().mean().item()), rel=1e-5)
    assert res.protocol == "longlora" and res.step_or_stride == step and res.context == context


@pytest.mark.parametrize("context,stride", [(32, 16), (48, 20), (40, 39)])
def test_stride_matches_direct_computation_and_scores_each_token_once(model, tokens, context, stride):
    ref, n_windows = reference_stride(model, tokens, context, stride)
    res = evaluate_perplexity(model, tokens, context, "stride", stride=stride)
    # every token except the first is predicted exactly once
    assert res.tokens_scored == ref.numel() == N_TOKENS - 1
    assert res.windows == n_windows == 1 + math.ceil((N_TOKENS - context) / stride)
    assert res.nll == pytest.approx(ref.double().mean().item(), rel=1e-5)


def test_stride_windows_cover_each_position_once_with_enough_history():
    for n, context, stride in [(203, 32, 16), (100, 100, 7), (101, 100, 50), (57, 10, 3), (64, 16, 16)]:
        wins = plan_windows(n, context, PROTOCOLS["stride"], stride)
        scored = [s + t for s, a, e in wins for t in range(a, e)]
        assert all(e == context for _, _, e in wins)
        assert all(0 <= s and s + context <= n for s, _, _ in wins)
        if stride < context:
            assert sorted(scored) == list(range(1, n))
        else:  # non-overlapping windows: each window's first token is unscored (as in HF's loop)
            assert len(set(scored)) == len(scored) and set(scored) <= set(range(1, n))
        for _, a, _ in wins[1:]:
            assert a >= context - stride  # history of every scored token beyond the first window


def test_a_stride_subset_scores_only_newest_tokens_in_every_window(model, tokens):
    # a subset's first window scores its newest `stride` tokens, not all context - 1 with short histories; its
    # last one a whole stride, not the stream's leftover
    context, stride = 32, 8
    wins = plan_windows(N_TOKENS, context, PROTOCOLS["stride"], stride)
    keep = [wins[i][0] for i in subset_indices(len(wins), 3)]
    ref = torch.cat([window_nll(model, tokens[s:s + context], context - stride) for s in keep]).double()
    res = evaluate_perplexity(model, tokens, context, "stride", stride=stride, max_windows=3)
    assert res.windows == 3 and res.tokens_scored == ref.numel() == 3 * stride
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-5)


def test_a_stride_subset_that_keeps_the_last_two_windows_scores_no_token_twice(model, tokens):
    context, stride = 32, 8  # (203 - 32) % 8 = 3: the last candidate ends 3 tokens after the one before
    wins = plan_windows(N_TOKENS, context, PROTOCOLS["stride"], stride)
    keep = subset_indices(len(wins), len(wins) - 1)
    assert keep[-2:] == [len(wins) - 2, len(wins) - 1]
    res = evaluate_perplexity(model, tokens, context, "stride", stride=stride, max_windows=len(wins) - 1)
    starts = [wins[i][0] for i in keep]
    ref = torch.cat([window_nll(model, tokens[s:s + context], context - stride) for s in starts[:-1]]
                    + [window_nll(model, tokens[starts[-1]:starts[-1] + context], context - 3)]).double()
    assert res.tokens_scored == ref.numel() == stride * (len(keep) - 1) + 3
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-5)


def test_default_hops(model, tokens):
    assert evaluate_perplexity(model, tokens, 32, "longlora", max_windows=2).step_or_stride == 256
    res = evaluate_perplexity(model, tokens, 32, "stride", max_windows=2)
    assert res.step_or_stride == 16
    assert res.as_settings() == {"protocol": "stride", "stride": 16}


def test_max_windows_subset_is_even_deterministic_and_spans_the_stream(model, tokens):
    idx = subset_indices(100, 5)
    assert idx == [0, 25, 50, 74, 99]  # round(i * 99 / 4); Python rounds half to even
    assert subset_indices(100, 5) == idx
    assert subset_indices(7, 10) == list(range(7))
    assert subset_indices(7, 1) == [0]
    for n, m in [(10, 9), (1000, 7), (3, 2)]:
        got = subset_indices(n, m)
        assert got[0] == 0 and got[-1] == n - 1 and len(set(got)) == m
        gaps = [b - a for a, b in zip(got, got[1:], strict=False)]
        assert max(gaps) - min(gaps) <= 1

    # the evaluation uses exactly those windows
    step, context = 8, 32
    starts = list(range(0, N_TOKENS - context + 1, step))
    keep = [starts[i] for i in subset_indices(len(starts), 4)]
    assert keep[0] == 0 and keep[-1] + context > N_TOKENS - step  # ends near the end of the stream
    direct = torch.cat([window_nll(model, tokens[s:s + context], 1) for s in keep]).double().mean().item()
    res = evaluate_perplexity(model, tokens, context, "longlora", step=step, max_windows=4)
    assert res.windows == 4 and res.windows_total == len(starts)
    assert res.tokens_scored == 4 * (context - 1)
    assert res.nll == pytest.approx(direct, rel=1e-5)
    again = evaluate_perplexity(model, tokens, context, "longlora", step=step, max_windows=4)
    assert again.nll == res.nll


@pytest.mark.parametrize("protocol", ["longlora", "stride"])
def test_batching_does_not_change_the_result(model, tokens, protocol):
    hop = {"step": 24} if protocol == "longlora" else {"stride": 24}
    one = evaluate_perplexity(model, tokens, 48, protocol, batch_size=1, **hop)
    three = evaluate_perplexity(model, tokens, 48, protocol, batch_size=3, **hop)
    assert one.tokens_scored == three.tokens_scored and one.windows == three.windows
    assert three.nll == pytest.approx(one.nll, rel=1e-6)


def test_chunked_logits_equal_full_logits_loss(model, tokens):
    x = tokens[:150]
    with torch.no_grad():
        out = model(input_ids=x[None], output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][0, :-1]
        full = F.cross_entropy(out.logits[0, :-1].float(), x[1:], reduction="sum").item()
        head = model.get_output_embeddings()
        for rows in (7, 64, 512):
            assert chunked_nll_sum(head, hidden, x[1:], chunk_rows=rows) == pytest.approx(full, rel=1e-5)


def test_restores_training_mode_and_reports_units(model, tokens):
    model.train()
    try:
        res = evaluate_perplexity(model, tokens, 64, max_windows=2, progress=True)
        assert model.training
    finally:
        model.eval()
    values, units = res.as_values(), res.units()
    assert set(values) == set(units) and values["perplexity"] == res.perplexity
    assert units["nll"] == "nats/token"


def test_errors(model, tokens):
    with pytest.raises(UserError, match="did you mean 'stride'"):
        evaluate_perplexity(model, tokens, 32, "strided")
    with pytest.raises(UserError, match="203 tokens.*context 256"):
        evaluate_perplexity(model, tokens, 256)
    with pytest.raises(UserError, match="exceeds the context"):
        evaluate_perplexity(model, tokens, 32, "stride", stride=33)
    with pytest.raises(UserError, match="takes step=, not stride="):
        evaluate_perplexity(model, tokens, 32, "longlora", stride=8)
    with pytest.raises(UserError, match="max_windows"):
        evaluate_perplexity(model, tokens, 32, max_windows=0)
    with pytest.raises(UserError, match="1-D"):
        evaluate_perplexity(model, tokens[None], 32)


def test_a_stride_may_equal_the_context_but_not_exceed_it():
    # stride == context is documented as allowed (non-overlapping windows); one token more would leave tokens unscored
    stride = PROTOCOLS["stride"]
    assert stride.resolve_hop(32, 32) == 32
    with pytest.raises(UserError, match="stride 33 exceeds the context 32"):
        stride.resolve_hop(32, 33)


class _Altered(torch.nn.Module):
    """`inner` with its outputs changed by `alter`, and no decoder to hook."""

    def __init__(self, inner, alter):
        super().__init__()
        self.inner, self.alter = inner, alter

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        self.alter(out)
        return out


def test_a_model_whose_head_does_not_give_its_logits_is_scored_from_its_logits(model, tokens):
    def unnormed(out):  # hidden_states[-1] before the final norm
        out.hidden_states = out.hidden_states[:-1] if out.hidden_states else None

    def scaled(out):  # logits scaled after the head, as Falcon-H1's lm_head_multiplier and Granite's logits_scaling
        out.logits = out.logits * 0.5

    plain = evaluate_perplexity(model, tokens, 32, max_windows=3)
    assert evaluate_perplexity(_Altered(model, unnormed), tokens, 32, max_windows=3).nll == \
        pytest.approx(plain.nll, rel=1e-6)
    res = evaluate_perplexity(_Altered(model, scaled), tokens, 32, max_windows=1)
    with torch.no_grad():
        logits = model(input_ids=tokens[None, :32], use_cache=False).logits[0, :-1]
        expected = F.cross_entropy(0.5 * logits.float(), tokens[1:32]).item()
    assert res.tokens_scored == 31 and res.nll == pytest.approx(expected, rel=1e-6)


def test_a_model_that_soft_caps_its_logits_is_scored_from_its_logits(tokens):
    """Gemma-2's final soft-cap moves small logits too little for the head check (last position, bf16 tolerance) to
    see: here the head path was 0.07% off. A config that declares one sends every window to the model's logits."""
    torch.manual_seed(0)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0)).eval()
    with torch.no_grad():
        gemma.get_output_embeddings().weight.mul_(3)  # logits up to about 1.2: the cap bends them a little
    res = evaluate_perplexity(gemma, tokens, 32, max_windows=1)
    with torch.no_grad():
        logits = gemma(input_ids=tokens[None, :32], use_cache=False).logits[0, :-1]
    assert res.nll == pytest.approx(F.cross_entropy(logits.float(), tokens[1:32]).item(), rel=1e-6)


def test_decoder_hook_path_is_used_and_falls_back_to_hidden_states(model, tokens):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        res = evaluate_perplexity(model, tokens, 32, "stride", stride=16)
    finally:
        handle.remove()
    assert seen and not any(kw.get("output_hidden_states") for kw in seen)  # per-layer states never kept
    assert all(kw.get("logits_to_keep") == 1 for kw in seen)

    class Probe(torch.nn.Module):
        def forward(self, h):
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=h)

    class PreNormDecoder(torch.nn.Module):  # get_decoder() output lacks the final norm
        def __init__(self, inner):
            super().__init__()
            self.inner, self.probe = inner, Probe()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def get_decoder(self):
            return self.probe

        def forward(self, input_ids, **kw):
            want = kw.pop("output_hidden_states", False)
            out = self.inner(input_ids=input_ids, output_hidden_states=True, **kw)
            self.probe(out.hidden_states[-2])
            if not want:
                out.hidden_states = None
            return out

    fallback = evaluate_perplexity(PreNormDecoder(model), tokens, 32, "stride", stride=16)
    assert fallback.nll == pytest.approx(res.nll, rel=1e-6)


def test_a_perplexity_to_read_with_care_says_why():
    """Too few windows for tokens_per_length (a short stream), or worse than guessing uniformly: a warning each."""
    from harness.metrics.plugins.perplexity import PerplexityConfig, suspect

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1,
                                                                 n_head=2)).eval()
    config = PerplexityConfig(contexts=[16], tokens_per_length=64)
    tokens = torch.randint(0, 50, (40,))
    short = evaluate_perplexity(model, tokens, 16, "stride", max_windows=4, stride=16)
    assert short.windows == 3 < 4
    (few,) = suspect(short, 4, config, vocab_size=60)
    assert few.startswith("scored 38 tokens in 3 window(s) of the 4 that tokens_per_length 64 asks for at 16")
    assert suspect(short, 3, config, vocab_size=60) == []
    (worse,) = suspect(short, 3, config, vocab_size=int(short.perplexity) - 1)
    assert "worse than guessing uniformly" in worse


def test_the_default_stride_is_half_the_context_rounded_down(model, tokens):
    # "Default stride: context // 2": an odd context rounds down, so no token loses its promised history
    assert PROTOCOLS["stride"].resolve_hop(33, None) == 16
    assert evaluate_perplexity(model, tokens, 33, "stride", max_windows=1).step_or_stride == 16


@pytest.mark.parametrize("protocol", ["longlora", "stride"])
def test_two_ranks_score_every_other_window_and_add_up_to_one_process(model, tokens, protocol):
    from harness.metrics.base import Ranks

    model.eval()  # (a wrapper around it, which another test evaluated, left it in training mode)
    hop = {"step": 24} if protocol == "longlora" else {"stride": 24}
    one = evaluate_perplexity(model, tokens, 48, protocol, **hop)
    sent = []
    second = evaluate_perplexity(model, tokens, 48, protocol, **hop,  # rank 1: what it sends, not the result
                                 ranks=Ranks(1, 2, gather=lambda part: sent.append(part) or [(0.0, 0), part]))
    assert second.windows == one.windows > 2
    both = evaluate_perplexity(model, tokens, 48, protocol, **hop, ranks=Ranks(0, 2, gather=lambda part: [part, *sent]))
    assert 0 < sent[0][1] < one.tokens_scored  # rank 1 scored some of the tokens, not all
    assert (both.tokens_scored, both.windows, both.windows_total) == (one.tokens_scored, one.windows, one.windows_total)
    assert both.nll == pytest.approx(one.nll, rel=1e-9)
    assert not model.training  # an eval-mode model stays in eval mode


class _Bytes:
    """A tokenizer's decode: token t is 1 + t % 3 bytes of text, or none (special) where `silent`."""

    def __init__(self, silent=False):
        self.silent = silent

    def decode(self, ids, skip_special_tokens):
        assert skip_special_tokens
        return "" if self.silent else "".join("x" * (1 + t % 3) for t in ids)


def test_the_perplexity_cell_records_bits_per_byte_and_its_window_budget(model, tokens):
    """The plugin's measure: max(1, tokens_per_length // context) windows; bits per byte = the NLL in bits over the
    bytes of the scored tokens' text (not the stream's bytes per token); no per-byte values where that text is
    empty."""
    from harness.metrics.base import ONE
    from harness.metrics.plugins.perplexity import Perplexity, PerplexityConfig

    class Ctx:
        ranks, pretrain_context, seed = ONE, 64, 3

        def __init__(self, tok):
            self.tok = tok

        def model(self):
            return model, {"preset": "llama"}

        def tokenizer(self):
            return self.tok

        def use_attention(self, which):
            self.attention = which

        def eval_stream(self, max_tokens):  # the stream's 700 bytes are 3.5 per token: not what its windows hold
            return tokens[:max_tokens], {"name": "toy", "tokens": min(max_tokens, N_TOKENS), "bytes": 700}

    config = PerplexityConfig(contexts=[32], tokens_per_length=100, max_tokens=200)
    ctx = Ctx(_Bytes())
    m = Perplexity().measure(ctx, {"length": 32, "eval_attention": "full"}, config)
    res = evaluate_perplexity(model, tokens[:200], 32, "longlora", max_windows=3)
    assert ctx.attention == "full" and m.settings["max_windows"] == 3 and m.values["windows"] == res.windows
    assert m.settings == {"protocol": "longlora", "step": 256, "max_windows": 3, "eval_attention": "full",
                          "pretrain_context": 64, "seed": 3}
    assert set(m.values) == {"perplexity", "nll", "tokens_scored", "windows", "windows_total", "bits_per_byte",
                             "bytes_per_token"} == set(m.units)
    assert (m.values["nll"], m.values["tokens_scored"], m.values["windows_total"]) == (res.nll, res.tokens_scored,
                                                                                      res.windows_total)
    scored = sum(1 + int(t) % 3 for t in tokens[1:32])  # one window (a step of 256 > 200 tokens): 1..31 scored
    assert m.values["bits_per_byte"] == pytest.approx(res.nll / math.log(2) * 31 / scored, rel=1e-12)
    assert m.values["bytes_per_token"] == scored / 31 != 3.5 and m.units["bits_per_byte"] == "bits/byte"
    config = PerplexityConfig(contexts=[128], tokens_per_length=100, max_tokens=200)
    m = Perplexity().measure(Ctx(_Bytes(silent=True)), {"length": 128, "eval_attention": "full"}, config)
    assert m.settings["max_windows"] == 1 and m.values["windows"] == 1  # at least one window, however long
    assert "bits_per_byte" not in m.values and "bits_per_byte" not in m.units
    # on two ranks, each measures its share of the windows and the cell adds them up (here rank 1 sends nothing)
    from harness.metrics.base import Ranks

    ctx = Ctx(_Bytes())
    ctx.ranks = Ranks(0, 2, gather=lambda part: [part, (0.0, 0)])
    config = PerplexityConfig(protocol="stride", contexts=[32], tokens_per_length=100, max_tokens=200)
    m = Perplexity().measure(ctx, {"length": 32, "eval_attention": "full"}, config)
    assert (m.values["windows"], m.values["tokens_scored"]) == (3, 2 * 16)  # windows 0 and 2 of 3, 16 tokens each


def test_the_scored_spans_are_the_windows_scored_tokens_in_the_stream(model, tokens):
    """Byte counts (bits per byte) read the spans: under stride with a budget, each kept window's newest tokens
    (windows 0, 6 and 11 of 12 candidates)."""
    res = evaluate_perplexity(model, tokens, 32, "stride", max_windows=3)
    assert res.scored_spans == [(16, 32), (112, 128), (187, 203)] and res.tokens_scored == 48
    res = evaluate_perplexity(model, tokens, 32, "longlora", step=64)
    assert res.scored_spans == [(1, 32), (65, 96), (129, 160)] and res.tokens_scored == 3 * 31


def test_a_context_below_two_is_a_config_error():
    from pydantic import ValidationError

    from harness.metrics.plugins.perplexity import PerplexityConfig

    assert PerplexityConfig(contexts=[2]).contexts == [2]
    with pytest.raises(ValidationError, match="every context must be >= 2"):
        PerplexityConfig(contexts=[64, 1])


def test_a_model_in_training_mode_is_evaluated_without_dropout():
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1,
                                                               n_head=2, resid_pdrop=0.5, embd_pdrop=0.5))
    stream = torch.randint(0, 50, (80,))
    evaluated = evaluate_perplexity(gpt.eval(), stream, 32, "stride").nll
    gpt.train()
    assert evaluate_perplexity(gpt, stream, 32, "stride").nll == evaluated and gpt.training

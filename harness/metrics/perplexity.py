"""Token-level perplexity of a causal LM over a long token stream, under two named protocols.

The stream is a 1-D LongTensor (documents already concatenated with EOS). Every window
the model sees is exactly ``context`` tokens long, so windows batch without padding.
A "scored position" t of a window is the prediction of ``window[t]`` from ``window[:t]``.

Protocols (``PROTOCOLS``):

``longlora``  LongLoRA's evaluation. Window starts every ``step`` tokens (default 256):
              0, step, 2*step, ... while the window fits in the stream. Every prediction of a
              window is scored (context - 1 per window). ppl = exp(mean NLL over all scored
              tokens pooled). Tokens overlap heavily between windows; most scored tokens have
              far less than ``context`` tokens of history. Differences from LongLoRA's
              eval.py, kept deliberately: it reads context + 1 tokens per window (context
              predictions) and drops the last start; it averages per-batch means (identical to
              the pooled mean except for a ragged last batch). Up to step - 1 tokens at the
              end of the stream fall in no window.

``stride``    The sliding-window protocol of HF's "Perplexity of fixed-length models".
              Windows start at 0, stride, 2*stride, ...; each scores only its newest
              ``stride`` tokens, the first window scores all its context - 1 predictions, and
              the last window is aligned to end exactly at the stream's end, scoring only the
              tokens not scored yet. Every token but the first is scored exactly once
              (tokens_scored == len(tokens) - 1 without ``max_windows``), each with at least
              context - stride tokens of history (fewer only inside the first window).
              Default stride: context // 2 (HF's example: 512 for 1024). Unlike HF's loop,
              the last window is not shortened but shifted back, so all windows have
              ``context`` tokens. stride == context is allowed (non-overlapping windows):
              then, as in HF's loop, the first token of each window is not scored.

Budget (``max_windows``): when a protocol yields n > max_windows windows, windows
``round(i * (n - 1) / (max_windows - 1))`` for i = 0..max_windows-1 are evaluated: an evenly
spaced, deterministic subset that contains the first and the last window, so it spans the
whole stream at every context length (a prefix would make short contexts see only the
stream's beginning). Each kept window keeps its own scored positions, except under ``stride``,
where every kept window scores its newest ``stride`` tokens: the first window's context - 1
would be as many as several windows' worth, each with less history than the protocol
promises (a bias that grows with the context, as the budget keeps fewer windows), and the
last one's leftover would be a few tokens.

Model contract. The model is called as
``model(input_ids=x, output_hidden_states=True, logits_to_keep=1, use_cache=False)`` and
``outputs.hidden_states[-1]`` must be the final hidden state AFTER the final norm, so that
``model.get_output_embeddings()(hidden) == logits``: true for transformers' Llama (5.23) and
every model whose head is a plain linear layer over the last normed state. Models that
scale or soft-cap logits after the head (Falcon-H1's lm_head_multiplier, Granite's
logits_scaling, Gemma-2, Cohere) break it: the first batch is checked against the model's own
last-position logits, and on a mismatch every window is scored from the model's own logits at
every position (``model(input_ids=x, use_cache=False).logits``: context x vocabulary of them
per window, which costs memory but stays exact). So is a model whose config sets
``final_logit_softcapping``: a soft-cap moves small logits too little for the check to see.
Cheaper equivalent tried first: when ``model.get_decoder()`` returns a module whose output
has ``last_hidden_state`` (HF models, PEFT-wrapped too), a forward hook takes that tensor and
``output_hidden_states`` is not requested, so the per-layer hidden states (n_layers x L x d,
~10 GiB for a 64-layer d=2560 model at 32K in bf16) are never kept. The same logits check
decides on the first batch; on a mismatch the ``hidden_states[-1]`` path is used.
``logits_to_keep`` is passed only when ``forward`` accepts it (else full logits are built
by the model once per window, which costs memory but stays correct). Full-vocabulary
logits are only ever built for ``CHUNK_ROWS`` positions at a time; NLL is accumulated
in float64.

On several processes (``ranks``, harness.metrics.base.Ranks) each evaluates every n-th of
the windows and the NLL sums and token counts are added up: the same windows and the
same value, up to the order of a float64 sum.
"""

from __future__ import annotations

import difflib
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import UserError
from harness.metrics.base import ONE, Ranks

CHUNK_ROWS = 512  # positions per output-embedding + cross-entropy chunk


@dataclass(frozen=True)
class Protocol:
    """A named perplexity protocol.

    ``hop`` is the name of the window-spacing parameter (``step`` or ``stride``), with
    either a fixed default in tokens or a default as a fraction of the context.
    """

    name: str
    hop: str  # "step" or "stride"
    score_newest_only: bool  # False: every prediction of a window; True: its newest `hop` tokens
    default_hop_tokens: int | None = None
    default_hop_fraction: float | None = None
    description: str = ""

    def resolve_hop(self, context: int, value: int | None) -> int:
        if value is None:
            if self.default_hop_tokens is not None:
                value = self.default_hop_tokens
            else:
                value = max(1, int(context * (self.default_hop_fraction or 1.0)))
        if not isinstance(value, int) or value < 1:
            raise UserError(f"perplexity protocol {self.name!r}: {self.hop} must be a positive int, got {value!r}")
        if self.score_newest_only and value > context:
            raise UserError(
                f"perplexity protocol {self.name!r}: stride {value} exceeds the context {context}; "
                f"tokens between windows would never be scored (use stride <= {context})"
            )
        return value


PROTOCOLS: dict[str, Protocol] = {
    "longlora": Protocol(
        name="longlora", hop="step", score_newest_only=False, default_hop_tokens=256,
        description="LongLoRA: windows of the context length every `step` tokens, every position scored",
    ),
    "stride": Protocol(
        name="stride", hop="stride", score_newest_only=True, default_hop_fraction=0.5,
        description="HF sliding window: windows move by `stride`, only the newest `stride` tokens scored",
    ),
}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per scored token
    tokens_scored: int
    windows: int  # windows evaluated (after any max_windows subset)
    context: int
    protocol: str
    step_or_stride: int
    windows_total: int = 0  # candidate windows before the max_windows subset
    # [start, end) in the stream of each evaluated window's scored tokens (all ranks'), to count their text's bytes
    scored_spans: list[tuple[int, int]] = field(default_factory=list)

    UNITS = {
        "perplexity": "",
        "nll": "nats/token",
        "tokens_scored": "tokens",
        "windows": "windows",
        "windows_total": "windows",
    }

    def as_values(self) -> dict[str, Any]:
        """The measurements, for ``Record.values``."""
        return {k: getattr(self, k) for k in self.UNITS}

    def units(self) -> dict[str, str]:
        """Units of ``as_values()``, for ``Record.units``."""
        return dict(self.UNITS)

    def as_settings(self) -> dict[str, Any]:
        """How it was measured, for ``Record.settings``."""
        return {"protocol": self.protocol, PROTOCOLS[self.protocol].hop: self.step_or_stride}


# ----------------------------------------------------------------------------- windows


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(str(name), PROTOCOLS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown perplexity protocol {name!r}{hint} (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def plan_windows(n_tokens: int, context: int, protocol: Protocol, hop: int) -> list[tuple[int, int, int]]:
    """All candidate windows as (start, first_scored, end_scored): the window is
    tokens[start:start+context]; positions first_scored <= t < end_scored (window-relative,
    t >= 1) are scored, i.e. window[t] is predicted from window[:t]."""
    if not protocol.score_newest_only:
        return [(s, 1, context) for s in range(0, n_tokens - context + 1, hop)]
    windows = [(0, 1, context)]
    scored_to = context  # absolute index of the first token not scored yet
    while scored_to < n_tokens:
        end = min(scored_to + hop, n_tokens)
        start = end - context
        windows.append((start, max(1, scored_to - start), context))
        scored_to = end
    return windows


def subset_indices(n: int, max_windows: int | None) -> list[int]:
    """Evenly spaced, deterministic indices of ``max_windows`` out of ``n`` (first and last included)."""
    if max_windows is None or n <= max_windows:
        return list(range(n))
    if max_windows == 1:
        return [0]
    return [round(i * (n - 1) / (max_windows - 1)) for i in range(max_windows)]


# ----------------------------------------------------------------------------- model calls


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def chunked_nll_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    chunk_rows: int = CHUNK_ROWS) -> float:
    """Sum of token NLLs of ``targets`` (N,) given final hidden states (N, d), building
    full-vocabulary logits for at most ``chunk_rows`` rows at a time; summed in float32 within a chunk, in float64
    across chunks."""
    total = 0.0
    for i in range(0, hidden.shape[0], chunk_rows):
        logits = head(hidden[i:i + chunk_rows]).float()
        total += F.cross_entropy(logits, targets[i:i + chunk_rows], reduction="sum").double().item()
    return total


def _matches_logits(model, out, hidden: torch.Tensor | None) -> bool:
    """Does output_embeddings(hidden) reproduce the model's own (last-position) logits?"""
    if hidden is None:
        return False
    logits = getattr(out, "logits", None)
    if logits is None:
        return True  # nothing to check against
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        mine = model.get_output_embeddings()(hidden[:, -1:]).float()
    theirs = logits[:, -1:].float()
    return mine.shape == theirs.shape and torch.allclose(
        mine, theirs, rtol=2e-2, atol=2e-2 * (1 + theirs.abs().max().item()))


class _DecoderOutput:
    """Captures ``last_hidden_state`` of ``model.get_decoder()`` with a forward hook.

    Cheaper than ``output_hidden_states=True``, which keeps every layer's hidden state
    (n_layers x L x d) alive until the forward returns. Works through PEFT wrappers.
    """

    def __init__(self, model) -> None:
        self.value: torch.Tensor | None = None
        self.handle = None
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            decoder = None
        if isinstance(decoder, torch.nn.Module) and decoder is not model:
            self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        h = getattr(output, "last_hidden_state", None)
        self.value = h if isinstance(h, torch.Tensor) else None

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


# ----------------------------------------------------------------------------- evaluation


def evaluate_perplexity(
    model,
    tokens: torch.Tensor,
    context: int,
    protocol: str = "longlora",
    *,
    max_windows: int | None = None,
    step: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
    ranks: Ranks = ONE,
) -> PerplexityResult:
    """Perplexity of ``model`` over the token stream ``tokens`` at window length ``context``.

    ``step`` belongs to the ``longlora`` protocol and ``stride`` to ``stride``; ``None``
    takes the protocol default (256 tokens; context // 2). ``ranks``: the processes that
    share the windows. See the module docstring.
    """
    proto = get_protocol(protocol)
    other = "stride" if proto.hop == "step" else "step"
    if (stride if other == "stride" else step) is not None:
        raise UserError(f"perplexity protocol {proto.name!r} takes {proto.hop}=, not {other}=")
    try:
        context = operator.index(context)
    except TypeError:
        raise UserError(f"perplexity context must be an int, got {context!r}") from None
    if context < 2:
        raise UserError(f"perplexity context must be >= 2, got {context}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise UserError(f"max_windows must be a positive int or None, got {max_windows!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise UserError(f"perplexity expects a 1-D token stream, got shape {tuple(tokens.shape)}")
    n = tokens.numel()
    if n < context:
        raise UserError(
            f"token stream has {n} tokens, shorter than the evaluation context {context}; "
            "use a longer corpus (or more documents) or a shorter context"
        )
    hop = proto.resolve_hop(context, step if proto.hop == "step" else stride)

    candidates = plan_windows(n, context, proto, hop)
    windows = [candidates[i] for i in subset_indices(len(candidates), max_windows)]
    if proto.score_newest_only and len(windows) < len(candidates):  # a subset: each scores its newest `hop` tokens,
        # less any the window before scored (the last candidate ends at the stream's end, less than a hop after it)
        windows = [(start, max(1, context - hop, prev + context - start), context)
                   for (prev, _, _), (start, _, _) in zip([(-context, 0, 0), *windows], windows, strict=False)]

    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    tokens = tokens.to(torch.long)
    head = model.get_output_embeddings()
    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts(model.forward, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1

    mine = ranks.share(windows)
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if progress and ranks.rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"ppl {proto.name} @ {context}", unit="batch")

    nll_sum, scored = 0.0, 0
    was_training = model.training
    model.eval()
    decoder = _DecoderOutput(model)
    # "decoder", "hidden_states" or "logits", settled (and checked) on the first batch. A soft-cap (Gemma-2's
    # 30 tanh(x / 30)) moves small logits too little for that check: with logits up to 16 it passed while the
    # perplexity was 19% off. A model whose config declares one is scored from its own logits.
    source = "logits" if getattr(getattr(model, "config", None), "final_logit_softcapping", None) else None
    try:
        with torch.inference_mode():
            for batch in batches:
                x = torch.stack([tokens[s:s + context] for s, _, _ in batch]).to(device)
                hidden = None
                if source in (None, "decoder") and decoder.handle is not None:
                    out = model(input_ids=x, **kwargs)
                    hidden = decoder.take()
                    if source is None and _matches_logits(model, out, hidden):
                        source = "decoder"
                if source in (None, "hidden_states"):
                    decoder.close()
                    out = model(input_ids=x, output_hidden_states=True, **kwargs)
                    states = getattr(out, "hidden_states", None)
                    hidden = states[-1] if states else None
                    if source is None:
                        source = "hidden_states" if _matches_logits(model, out, hidden) else "logits"
                if source == "logits":  # the head does not give the logits: the model's own, at every position
                    decoder.close()
                    out = hidden = None  # the checking forward's per-layer states go before this one runs
                    out = model(input_ids=x, use_cache=False)
                    for b, (_, a, e) in enumerate(batch):  # logits[b, t-1] predicts x[b, t]
                        nll_sum += chunked_nll_sum(torch.nn.Identity(), out.logits[b, a - 1:e - 1], x[b, a:e])
                        scored += e - a
                    del out
                    continue
                del out
                # hidden[b, t-1] predicts x[b, t] for the scored positions t of window b
                h = torch.cat([hidden[b, a - 1:e - 1] for b, (_, a, e) in enumerate(batch)])
                y = torch.cat([x[b, a:e] for b, (_, a, e) in enumerate(batch)])
                nll_sum += chunked_nll_sum(head, h, y)
                scored += y.numel()
                del hidden, h
    finally:
        decoder.close()
        model.train(was_training)

    parts = ranks.gather((nll_sum, scored))
    nll_sum, scored = sum(n for n, _ in parts), sum(k for _, k in parts)
    nll = nll_sum / scored
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, tokens_scored=scored, windows=len(windows), context=context,
        protocol=proto.name, step_or_stride=hop, windows_total=len(candidates),
        scored_spans=[(start + a, start + e) for start, a, e in windows],
    )

"""The paper's numbers, transcribed: the tables the report's paper section shows and its claims are judged against.

Source: Nunez, Zancato, Bowman, Golatkar, Xia, Soatto, "Expansion Span: Combining Fading Memory
and Retrieval in Hybrid State Space Models", NeuS 2025 (PMLR 288). Printed in its tables: Table 1 (PG-19
validation perplexity after fine-tuning on the paper's natural-language dataset, which it does not name) and
Table 7 (the same after fine-tuning on PG-19, Appendix E.2). Drawn only as plots, and read off them in the
team's ``../shared/docs/METHODS.md`` ("Headline numbers to compare against"), so approximate: the RULER
averages over the eleven tasks (Figure 2), the SE-Attn ablations (Section 4.3, Figure 3) and the
attention-layer runtime at 32K tokens (Figure 4; the paper's experiments ran on A100s, Appendix G). Setting:
Mamba-2-Hybrid 2.7B (``mamba2attn-2.7b``) pretrained at 2048, fine-tuned with HyLoRA at 8192 (1000 steps of
64 x 8192 tokens: 8 GPUs x 8 accumulation steps), evaluated with full attention.
"""

from __future__ import annotations

SOURCE = ("Nunez et al., \u201cExpansion Span: Combining Fading Memory and Retrieval in Hybrid State Space "
          "Models\u201d, NeuS 2025 (PMLR 288). Perplexities as printed in its Table 1 (fine-tuned on its "
          "natural-language dataset) and Table 7 (fine-tuned on PG-19); RULER averages (Figure 2), ablations "
          "(Figure 3) and runtimes (Figure 4) read off its plots, so approximate (transcribed into "
          "harness/report/paper_numbers.py).")
PAPER_MODEL = "mamba2attn-2.7b"
PAPER_FINETUNE_CONTEXT = 8192

PPL_CONTEXTS = (2048, 8192, 16384, 32768)
RULER_LENGTHS = (2048, 8192, 16384)

#: (row label, backend name of the fine-tuning attention or None for the pretrained model,
#:  PG-19 perplexity by context, RULER average accuracy (%) by length). Fine-tuning method: HyLoRA.
MAIN: list[tuple[str, str | None, dict[int, float], dict[int, float]]] = [
    ("not fine-tuned", None, {2048: 10.72, 8192: 14.99, 16384: 19.35, 32768: 26.37},
     {2048: 64.9, 8192: 5.5, 16384: 0.2}),
    ("Full-Attn", "full", {2048: 10.99, 8192: 10.28, 16384: 10.39, 32768: 11.14},
     {2048: 59.9, 8192: 39.2, 16384: 35.3}),
    ("SW-Attn", "sliding_window", {2048: 10.98, 8192: 10.80, 16384: 11.82, 32768: 13.45},
     {2048: 54.9, 8192: 21.0, 16384: 17.4}),
    ("S\u00b2-Attn", "s2_attn", {2048: 10.87, 8192: 12.89, 16384: 14.67, 32768: 16.37},
     {2048: 65.8, 8192: 24.6, 16384: 11.9}),
    ("SE-Attn", "se_attn", {2048: 10.99, 8192: 10.45, 16384: 11.14, 32768: 12.64},
     {2048: 71.9, 8192: 40.5, 16384: 28.2}),
]

#: Table 7 (Appendix E.2): PG-19 validation perplexity by context after fine-tuning on PG-19 (as MAIN: the
#: backend of the fine-tuning attention, None for the pretrained model).
PG19_FINETUNED: dict[str | None, dict[int, float]] = {
    None: {2048: 10.72, 8192: 14.99, 16384: 19.35, 32768: 26.37},
    "full": {2048: 10.73, 8192: 10.04, 16384: 10.14, 32768: 10.91},
    "sliding_window": {2048: 10.72, 8192: 10.59, 16384: 11.64, 32768: 13.25},
    "s2_attn": {2048: 10.78, 8192: 12.74, 16384: 14.42, 32768: 16.11},
    "se_attn": {2048: 10.73, 8192: 10.22, 16384: 10.84, 32768: 12.28},
}

#: RULER average at 8K: (label, method, backend as the paper names it (common.attention_kind), value).
ABLATIONS: list[tuple[str, str, str, float]] = [
    ("SE-Attn, no retrieval", "hylora", "se_attn_nomem", 26.1),
    ("SE-Attn, random blocks", "hylora", "se_attn_random", 32.5),
    ("SE-Attn", "hylora", "se_attn", 40.5),
    ("LoRA (SE-Attn)", "lora", "se_attn", 31.6),
    ("LoRA+ (SE-Attn)", "lora_plus", "se_attn", 33.1),
    ("HyLoRA (SE-Attn)", "hylora", "se_attn", 40.5),
]
ABLATION_LENGTH = 8192

#: One attention layer, forward + backward, at RUNTIME_LENGTH tokens on RUNTIME_DEVICE (ms).
RUNTIME_MS: dict[str, float] = {"full": 182.0, "sliding_window": 69.0, "s2_attn": 81.0, "se_attn": 71.0}
RUNTIME_LABELS = {"full": "Full-Attn", "sliding_window": "SW-Attn", "s2_attn": "S\u00b2-Attn", "se_attn": "SE-Attn"}
RUNTIME_LENGTH = 32768
RUNTIME_DEVICE = "A100"
#: Figure 4's settings: a window of 4096; SE-Attn's chunk alternating between 2048 and 4096, blocks of 32, top-8.
RUNTIME_OPTIONS: dict[str, dict] = {"sliding_window": {"window": 4096},
                                    "se_attn": {"chunk_size": [2048, 4096], "block_size": 32, "top_k": 8}}


def ruler(method: str, kind: str | None, n: int) -> float | None:
    """The paper's RULER average (%) at n tokens after `method` fine-tuning with attention `kind` (a backend, or an
    ablation's alias such as 'se_attn_nomem'; None: the pretrained model): the ablations, else Figure 2's rows."""
    if n == ABLATION_LENGTH:
        for _, m, k, value in ABLATIONS:
            if (m, k) == (method, kind):
                return value
    if kind is not None and method != "hylora":
        return None
    return next((values.get(n) for _, backend, _, values in MAIN if backend == kind), None)


def perplexity(kind: str | None, n: int, pg19: bool = False) -> float | None:
    """The paper's perplexity at n tokens after HyLoRA fine-tuning with `kind` (None: the pretrained model), from
    Table 7 (fine-tuned on PG-19) when `pg19`, else Table 1."""
    if pg19:
        return PG19_FINETUNED.get(kind, {}).get(n)
    return next((values.get(n) for _, backend, values, _ in MAIN if backend == kind), None)

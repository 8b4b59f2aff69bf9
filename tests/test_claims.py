"""The paper's claims judged on a report's records: pairing, the tests, and the three verdicts."""

from harness.report.claims import CLAIMS, claims_blocks
from harness.results import Record

SE = "se_attn(chunk_size=256)"


def _record(metric, method, backend, n, seed, values, task=None):
    pre = method == "none"
    tail = "pretrained" if pre else f"{method}/{backend}"
    return Record(suite="s", cell=f"m/seed{seed}/{tail}/{metric}@{n}{task or ''}", metric=metric,
                  variant={"model": "m", "seed": seed}, stage="pretrained" if pre else "finetuned",
                  model={"preset": "tiny-hybrid"}, method=method, backend="full" if pre else backend,
                  finetune_context=None if pre else 2048, eval_context=n, values=values,
                  settings={"task": task, "eval_attention": "full"} if task else {})


def _ruler(method, backend, seed, right, n=2048, task="niah_single_1"):
    return _record("ruler", method, backend, n, seed,
                   {"accuracy": 5.0 * right, "per_sample": {f"{seed}-{i}": float(i < right) for i in range(20)}},
                   task)


def _rows(records):
    blocks = claims_blocks(records)
    return {(r[0]["text"], r[1]["text"].split(" → ")[0]): r for r in blocks[1]["rows"]} if blocks else {}


def test_verdicts_follow_the_paired_tests():
    recs = []
    for seed in (0, 1, 2):
        recs += [_ruler("none", "", seed, 2), _ruler("hylora", SE, seed, 15), _ruler("hylora", "s2_attn", seed, 3)]
        # perplexity at 2F: SE-Attn consistently worse than S2 (not reproduced); at F, noisy against the base
        recs += [_record("perplexity", "hylora", SE, 4096, seed, {"perplexity": [30.0, 31.1, 32.0][seed]}),
                 _record("perplexity", "hylora", "s2_attn", 4096, seed, {"perplexity": 29.0 + seed}),
                 _record("perplexity", "hylora", SE, 2048, seed, {"perplexity": [30.0, 33.0, 31.0][seed]}),
                 _record("perplexity", "none", "", 2048, seed, {"perplexity": [31.0, 31.0, 32.5][seed]})]
    rows = _rows(recs)
    s2 = rows[("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert s2[2]["text"] == "RULER @ 2K (2048)" and s2[4]["text"] == "15.0 → 75.0" and s2[4]["note"] == "60 samples"
    assert s2[5]["text"].startswith("+60.0 pts [") and s2[-1]["text"] == "reproduced"
    lift = rows[("fine-tuning with SE-Attn lifts RULER at the fine-tuning context", "pretrained")]
    assert lift[-1]["text"] == "reproduced"
    extra = rows[("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert extra[5]["text"].startswith("+1.03 [") and extra[-1]["text"] == "not reproduced"
    ppl = rows[("fine-tuning with SE-Attn lowers perplexity at the fine-tuning context", "pretrained")]
    assert ppl[4]["note"] == "3 seed(s)" and ppl[-1]["text"] == "inconclusive"
    # a claim whose baseline was not run has no row; one not measured at its length says so
    assert not any(text.startswith("SE-Attn retrieves better than a sliding") for text, _ in rows)
    recs.append(_record("perplexity", "hylora", "sliding_window", 2048, 0, {"perplexity": 31.0}))
    sw = _rows(recs)[("SE-Attn extrapolates better than a sliding window",
                      "finetuned: hylora / sliding_window @ 2048")]
    assert sw[-1]["text"] == "not measured" and "not measured at 2F = 4096" in sw[4]["note"]


def test_a_claim_whose_cells_failed_says_so_not_not_measured():
    """A claim whose variant's cells at the length failed (OOM, timeout, NaN) read "not measured", as one never
    run there; a variant whose every cell failed had no row at all. Cells failed beside judged ones are counted."""
    from dataclasses import replace

    pre = _record("perplexity", "none", "", 2048, 0, {"perplexity": 31.0})
    oom = replace(_record("perplexity", "hylora", SE, 2048, 0, {}), status="oom", error="CUDA out of memory")
    key = ("fine-tuning with SE-Attn lowers perplexity at the fine-tuning context", "pretrained")
    row = _rows([pre, oom])[key]  # the SE-Attn fine-tune has no ok record at all
    assert row[-1]["text"] == "failed" and "failed: B: 1 cell OOM" in row[4]["note"]
    assert "not measured" not in row[4]["note"]
    nan = _record("perplexity", "hylora", SE, 2048, 0, {"perplexity": float("nan")})
    row = _rows([pre, nan, _record("perplexity", "hylora", SE, 4096, 0, {"perplexity": 30.0})])[key]
    assert row[-1]["text"] == "failed" and "B: 1 cell ERROR" in row[4]["note"]
    recs = [_ruler("none", "", 0, 2), _ruler("hylora", SE, 0, 15),
            replace(_ruler("hylora", SE, 0, 15, task="vt"), status="timeout", values={})]
    row = _rows(recs)[("fine-tuning with SE-Attn lifts RULER at the fine-tuning context", "pretrained")]
    assert row[-1]["text"] == "reproduced" and row[4]["note"] == "20 samples; B: 1 cell TIMEOUT, left out"


def test_one_seed_gives_no_interval_and_no_verdict():
    recs = [_record("perplexity", "hylora", SE, 4096, 0, {"perplexity": 20.0}),
            _record("perplexity", "hylora", "s2_attn", 4096, 0, {"perplexity": 40.0})]
    row = _rows(recs)[("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[5]["text"] == "-20.00" and row[-1]["text"] == "inconclusive"


def test_seeds_that_change_nothing_and_nan_perplexity_give_no_verdict():
    recs = [_record("perplexity", "hylora", b, 4096, seed, {"perplexity": p + seed})
            for seed in (0, 1, 2) for b, p in ((SE, 20.0), ("s2_attn", 40.0))]
    row = _rows(recs)[("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[5]["text"] == "-20.00" and "same difference" in row[5]["note"]
    assert (row[6]["text"], row[-1]["text"]) == ("1", "inconclusive")
    # a diverged seed (NaN, ok status) is a failure, as in the rest of the report: the pair rests on two seeds
    recs[0] = _record("perplexity", "hylora", SE, 4096, 0, {"perplexity": float("nan")})
    recs[2] = _record("perplexity", "hylora", SE, 4096, 1, {"perplexity": 22.0})
    row = _rows(recs)[("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[4]["note"] == "2 seed(s); B: 1 cell ERROR, left out" and row[4]["text"] == "41.50 → 22.00"


def test_claims_name_the_paper_numbers():
    assert len({c.text for c in CLAIMS}) == len(CLAIMS)
    # each claim's pair, looked up in the paper's tables (Table 1, Figures 2-3; Table 7 for PG-19 fine-tunes)
    assert [c.paper() for c in CLAIMS] == [(21.0, 40.5), (24.6, 40.5), (5.5, 40.5), (31.6, 40.5), (33.1, 40.5),
                                            (26.1, 40.5), (32.5, 40.5), (14.99, 10.45), (14.67, 11.14),
                                            (11.82, 11.14)]
    assert [c.paper(pg19=True) for c in CLAIMS if c.metric == "perplexity"] == [(14.99, 10.22), (14.42, 10.84),
                                                                                 (11.64, 10.84)]
    for c in CLAIMS:  # the paper's own numbers go the claimed way, in both settings
        for a, b in (c.paper(), c.paper(pg19=True)):
            assert b > a if c.metric == "ruler" else b < a, c.text
    assert claims_blocks([]) == []


def test_fine_tunes_on_pg19_show_the_papers_pg19_numbers():
    from harness.report import paper_numbers

    recs = [_record("perplexity", "hylora", SE, 4096, 0, {"perplexity": 20.0}),
            _record("perplexity", "hylora", "s2_attn", 4096, 0, {"perplexity": 40.0})]
    key = ("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")
    assert _rows(recs)[key][3]["text"] == "14.67 → 11.14"  # Table 1
    (row,) = [r for r in claims_blocks(recs, pg19=True)[1]["rows"] if r[0]["text"] == key[0]]
    table7 = paper_numbers.PG19_FINETUNED
    assert row[3]["text"] == f"{table7['s2_attn'][16384]:g} → {table7['se_attn'][16384]:g}" == "14.42 → 10.84"


def test_ablations_are_found_by_their_options_or_aliases():
    # SE-Attn without retrieval or with random blocks is the ablation's baseline, never the SE-Attn side
    for none, random in (("se_attn(retrieval=none)", "se_attn(retrieval=random)"), ("se_attn_nomem", "se_attn_random")):
        recs = [r for seed in (0, 1) for r in (_ruler("hylora", none, seed, 2), _ruler("hylora", random, seed, 5),
                                                 _ruler("hylora", SE, seed, 15))]
        rows = _rows(recs)
        sides = {text: (a, row[1]["text"].split(" → ")[1]) for (text, a), row in rows.items()}
        se = f"finetuned: hylora / {SE} @ 2048"
        assert sides == {"retrieved blocks beat no retrieval": (f"finetuned: hylora / {none} @ 2048", se),
                         "top-k blocks beat random blocks": (f"finetuned: hylora / {random} @ 2048", se)}


def test_a_length_without_shared_samples_is_not_measured():
    # each side's other task failed: RULER records at 2048 on both sides, but no sample in common
    recs = [_ruler("hylora", SE, 0, 15, task="niah_single_1"), _ruler("hylora", "s2_attn", 0, 3, task="vt")]
    row = _rows(recs)[("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[-1]["text"] == "not measured"


def test_only_the_base_run_same_model_context_full_attention_evaluation_is_judged():
    from dataclasses import replace

    recs = [_record("perplexity", "hylora", SE, 4096, s, {"perplexity": 20.0 + s}) for s in (0, 1)]
    recs += [_record("perplexity", "hylora", "s2_attn", 4096, s, {"perplexity": 40.0 + s}) for s in (0, 1)]
    key = ("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")
    alone = _rows(recs)
    assert alone[key][4]["note"] == "2 seed(s)" and len(alone) == 2  # and the RULER claim: not measured
    # a later run, another model, a fine-tune at another context or an evaluation with the fine-tuning attention
    # adds no row
    extra = [replace(r, run="b", run_index=1) for r in recs]
    extra += [replace(r, model={"preset": "other"}) for r in recs if r.backend == "s2_attn"]
    extra += [replace(r, settings={"eval_attention": "finetune"}) for r in recs if r.backend == "s2_attn"]
    extra += [replace(r, finetune_context=4096) for r in recs if r.backend == "s2_attn"]  # another suite's
    assert claims_blocks(recs + extra) == claims_blocks(recs)


def test_ruler_pools_the_tasks_at_the_length_even_where_sample_ids_repeat():
    # two tasks whose sample ids coincide: 40 samples, not 20; SE 15 + 5 right of 40, S2 3 + 3
    recs = [_ruler("hylora", SE, 0, 15), _ruler("hylora", SE, 0, 5, task="vt"),
            _ruler("hylora", "s2_attn", 0, 3), _ruler("hylora", "s2_attn", 0, 3, task="vt")]
    row = _rows(recs)[("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[4]["text"] == "15.0 → 50.0" and row[4]["note"] == "40 samples"


def test_ruler_pools_the_seeds_even_where_two_seeds_drew_the_same_prompts():
    # a task whose prompts do not depend on the seed: 2 seeds x 20 samples are 40, not 20 overwritten by the last
    def same(method, backend, seed, right):
        return _record("ruler", method, backend, 2048, seed,
                       {"accuracy": 5.0 * right, "per_sample": {f"p{i}": float(i < right) for i in range(20)}},
                       "niah_single_1")

    recs = [same("hylora", SE, 0, 15), same("hylora", SE, 1, 5), same("hylora", "s2_attn", 0, 3),
            same("hylora", "s2_attn", 1, 3)]
    row = _rows(recs)[("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[4]["text"] == "15.0 → 50.0" and row[4]["note"] == "40 samples"


def test_the_verdict_follows_mcnemars_p_where_the_normal_interval_excludes_zero():
    # SE right on 8 of 20, S2 on 3, the same 3: five discordant samples all SE's way, McNemar p = 2 / 2**5 = 0.0625;
    # d = [1] * 5 + [0] * 15: +25 pts, sample sd sqrt(5 * 0.75**2 + 15 * 0.25**2) / sqrt(19) = 0.4443, so the normal
    # interval 25 +- 100 * 1.96 * 0.4443 / sqrt(20) = [+5.5, +44.5] excludes zero; still inconclusive
    row = _rows([_ruler("hylora", SE, 0, 8), _ruler("hylora", "s2_attn", 0, 3)])[
        ("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[5]["text"] == "+25.0 pts [+5.5, +44.5]" and row[6]["text"] == "0.062"
    assert row[-1]["text"] == "inconclusive"


def test_ruler_means_are_over_the_samples_both_variants_scored():
    # S2 also ran vt (all right), which SE did not: the means are over niah_single_1's 20 samples only
    recs = [_ruler("hylora", SE, 0, 15), _ruler("hylora", "s2_attn", 0, 3),
            _ruler("hylora", "s2_attn", 0, 20, task="vt")]
    row = _rows(recs)[("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[4]["text"] == "15.0 → 75.0" and row[4]["note"] == "20 samples"


def test_a_length_where_the_variants_share_no_seed_is_not_measured():
    # each side's other seed failed: perplexity at 2F on both sides, but no seed in common to pair
    recs = [_record("perplexity", "hylora", SE, 4096, 0, {"perplexity": 20.0}),
            _record("perplexity", "hylora", "s2_attn", 4096, 1, {"perplexity": 40.0})]
    row = _rows(recs)[("SE-Attn extrapolates better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[-1]["text"] == "not measured"


def test_a_sign_test_that_goes_against_the_mean_is_inconclusive():
    # partial scores: SE gains 0.1 on ten samples and loses 0.9 on two; McNemar's sign test favours SE (10 of 12,
    # p = 0.039), the mean difference goes against it (-6.7 pts): neither way is reproduced
    scores = {"hylora": [0.1] * 12, "s2": [0.0] * 10 + [1.0] * 2}
    recs = [_record("ruler", "hylora", b, 2048, 0, {"per_sample": dict(enumerate(scores[k]))}, "niah_multikey_1")
            for k, b in (("hylora", SE), ("s2", "s2_attn"))]
    row = _rows(recs)[("SE-Attn retrieves better than S\u00b2-Attn", "finetuned: hylora / s2_attn @ 2048")]
    assert row[5]["text"].startswith("-6.7 pts") and row[6]["text"] == "0.039" and row[-1]["text"] == "inconclusive"

from dataclasses import replace

import pytest

from harness import results
from harness.cli import main
from harness.report.compare import Finding, Thresholds, compare, judge_accuracy, markdown, permutation_p
from harness.report.significance import fisher_exact, mcnemar_exact


def rec(cell, values, status="ok", device="cpu", metric="perplexity", config_hash="h"):
    return results.Record(suite="s", cell=cell, metric=metric, status=status, values=values, config_hash=config_hash,
                          env={"device": device, "cpu": "x86_64"})


def verdicts(base, head, **th):
    return [(f.metric, f.verdict) for f in compare(base, head, Thresholds(**th))]


def test_perplexity_tolerance():
    base = [rec("a", {"perplexity": 10.0})]
    assert verdicts(base, [rec("a", {"perplexity": 10.04})]) == [("perplexity", "ok")]
    assert verdicts(base, [rec("a", {"perplexity": 10.06})]) == [("perplexity", "regression")]
    assert verdicts(base, [rec("a", {"perplexity": 9.9})]) == [("perplexity", "improvement")]


def test_failed_missing_and_changed_settings():
    base = [rec("a", {"perplexity": 10.0}), rec("b", {"perplexity": 5.0}), rec("c", {"perplexity": 1.0})]
    head = [rec("a", {}, status="oom"), rec("c", {"perplexity": 1.0}, config_hash="other")]
    assert verdicts(base, head) == [("perplexity", "regression"), ("perplexity", "regression"),
                                    ("perplexity", "skipped")]


def test_timings_from_other_hardware_are_skipped_saying_so():
    base = rec("e", {"times_ms": [1.0]}, metric="efficiency", config_hash="on-a")
    head = rec("e", {"times_ms": [9.0]}, metric="efficiency", config_hash="on-b")
    base.settings["hardware"], head.settings["hardware"] = "cuda: NVIDIA A100", "cuda: NVIDIA H100 80GB HBM3"
    (finding,) = compare([base], [head])
    assert (finding.verdict, finding.why) == ("skipped", "hardware differs: cuda: NVIDIA A100 vs cuda: NVIDIA H100 "
                                                         "80GB HBM3")
    del base.settings["hardware"]  # a baseline recorded before records named their hardware
    (finding,) = compare([base], [head])
    assert finding.why == "no hardware in base's record (recorded before records named it): re-make base"


def test_only_current_records_are_judged():
    # base: a cell that failed, then was rerun and worked; head: a good record superseded by a regression
    base = [rec("a", {}, status="oom"), rec("a", {"perplexity": 10.0})]
    head = [rec("a", {"perplexity": 10.0}), rec("a", {"perplexity": 12.0})]
    assert verdicts(base, head) == [("perplexity", "regression")]
    assert verdicts(head, base) == [("perplexity", "improvement")]


def test_accuracy_is_paired_over_shared_samples():
    base = {f"s{i}": 1 for i in range(20)}
    worse = {**base, **{f"s{i}": 0 for i in range(8)}}  # 8 discordant, all against head: p = 2/256
    assert verdicts([rec("r", {"per_sample": base})], [rec("r", {"per_sample": worse})]) == [
        ("accuracy", "regression")]
    slightly = {**base, "s0": 0, "s1": 0}  # p = 0.5: not significant
    assert verdicts([rec("r", {"per_sample": base})], [rec("r", {"per_sample": slightly})]) == [("accuracy", "ok")]


def test_timing_needs_ratio_and_significance_and_same_device():
    base = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8]
    slow = [x * 1.3 for x in base]
    noisy = [5.0, 20.0, 9.0, 14.0, 11.0, 30.0, 7.0]
    assert permutation_p(base, slow) < 0.05 and permutation_p(slow, base) > 0.5  # exact: 0.017
    b = [rec("t", {"times_ms": base}, metric="efficiency")]
    assert verdicts(b, [rec("t", {"times_ms": slow}, metric="efficiency")]) == [("time (median ms)", "regression")]
    assert verdicts(b, [rec("t", {"times_ms": noisy}, metric="efficiency")]) == [("time (median ms)", "ok")]
    assert verdicts(b, [rec("t", {"times_ms": slow}, metric="efficiency", device="cuda")]) == [
        ("time (median ms)", "skipped")]


def test_timing_over_the_ratio_but_not_significant_is_ok():
    # noisy on both sides: head's median is 1.2x base's, yet the permutation p is 0.22, so not a regression
    base = [8.0, 12.0, 9.0, 11.0, 10.0, 13.0, 7.0]
    b = [rec("t", {"times_ms": base}, metric="efficiency")]
    assert verdicts(b, [rec("t", {"times_ms": [x * 1.2 for x in base]}, metric="efficiency")]) == [
        ("time (median ms)", "ok")]


def test_timing_improvement_needs_ratio_and_significance():
    # the same runs 30% faster: an improvement, with the faster side's small p (exact: 60/3432 = 0.0175) in `why`
    base = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8]
    b = [rec("t", {"times_ms": base}, metric="efficiency")]
    (finding,) = compare(b, [rec("t", {"times_ms": [x * 0.7 for x in base]}, metric="efficiency")])
    assert finding.verdict == "improvement" and "permutation p=0.0175" in finding.why
    # 5% faster is as significant, but within the 1.10 ratio: ok
    assert verdicts(b, [rec("t", {"times_ms": [x * 0.95 for x in base]}, metric="efficiency")]) == [
        ("time (median ms)", "ok")]


def test_permutation_p_counts_ties():
    # identical timings: every split ties the observed difference, so nothing is significant
    assert permutation_p([5.0] * 5, [5.0] * 5) == 1.0


def test_memory_ratio():
    b = [rec("m", {"peak_memory_gib": 10.0}, metric="efficiency")]
    assert verdicts(b, [rec("m", {"peak_memory_gib": 10.4}, metric="efficiency")]) == [("peak memory (GiB)", "ok")]
    assert verdicts(b, [rec("m", {"peak_memory_gib": 10.6}, metric="efficiency")]) == [
        ("peak memory (GiB)", "regression")]


@pytest.mark.parametrize("metric", ["train", "pretrain"])
def test_peak_memory_of_a_training_record_is_not_judged(metric):
    # a fine-tune's or a pretraining's peak memory is not compared (on a CPU, the process's noisy peak RSS)
    assert compare([rec("m", {"peak_memory_gib": 10.0}, metric=metric)],
                   [rec("m", {"peak_memory_gib": 15.0}, metric=metric)]) == []


def test_markdown_lists_regressions():
    findings = compare([rec("a", {"perplexity": 10.0})], [rec("a", {"perplexity": 11.0})])
    text = markdown(findings, "base", "head")
    assert "1 regression" in text and "| regression | `a` | perplexity | 10 | 11 | +10.00%" in text


def test_cli_exit_code_and_summary(tmp_path, capsys):
    for name, ppl in (("base", 10.0), ("same", 10.0), ("worse", 12.0)):
        results.append(tmp_path / name, results.Record(suite="s", cell="c", metric="perplexity",
                                                       values={"perplexity": ppl}, config_hash="h"))
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "same")]) == 0
    summary = tmp_path / "summary.md"
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "worse"), "--summary", str(summary)]) == 1
    assert "regression" in summary.read_text()


def test_cpu_timings_are_reported_and_gate_only_when_asked(tmp_path, capsys):
    # two stored runs of unchanged code on a CPU drift apart by more than the changes worth catching
    base = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8]
    for device, gates in (("cpu", False), ("cuda", True)):
        for name, times in (("base", base), ("slow", [x * 1.3 for x in base])):
            results.append(tmp_path / device / name, results.Record(
                suite="s", cell="t", metric="efficiency", values={"times_ms": times}, config_hash="h",
                env={"device": device, "cpu": "x86_64", "gpu": "H100" if device == "cuda" else None}))
        dirs = [str(tmp_path / device / "base"), str(tmp_path / device / "slow")]
        assert main(["compare", *dirs]) == (1 if gates else 0)
        text = capsys.readouterr().out
        assert "| regression | `t` | time (median ms)" in text
        assert ("not gating (pass --fail-on-time" in text) is not gates
        assert main(["compare", *dirs, "--fail-on-time"]) == 1
        text = capsys.readouterr().out  # the summary says what the exit code did: CPU timings gate now
        assert "not gating" not in text and ("Timed on CPU: gating (--fail-on-time)" in text) is not gates


def test_disjoint_samples_are_compared_unpaired():
    # a changed RULER generator gives new prompt hashes: no sample in common, Fisher's exact test instead
    base = {f"a{i}": 1 for i in range(20)}
    assert verdicts([rec("r", {"per_sample": base})], [rec("r", {"per_sample": {f"b{i}": 0 for i in range(20)}})]) == [
        ("accuracy", "regression")]
    same = {f"b{i}": int(i < 19) for i in range(20)}
    assert verdicts([rec("r", {"per_sample": base})], [rec("r", {"per_sample": same})]) == [("accuracy", "ok")]


def test_unpaired_accuracy_compares_rates_not_hit_counts():
    # 40 of 50 (80%) against 60 of 100 (60%), Fisher p = 0.017: head has fewer hits but the higher accuracy
    base = {f"a{i}": int(i < 60) for i in range(100)}
    head = {f"b{i}": int(i < 40) for i in range(50)}
    assert verdicts([rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})]) == [
        ("accuracy", "improvement")]
    # and the other way round: more hits, lower accuracy
    assert verdicts([rec("r", {"per_sample": head})], [rec("r", {"per_sample": base})]) == [
        ("accuracy", "regression")]


def test_a_head_value_that_is_nan_or_missing_is_a_regression():
    base = [rec("a", {"perplexity": 10.0}), rec("t", {"times_ms": [1.0, 2.0]}, metric="efficiency")]
    head = [rec("a", {"perplexity": float("nan")}), rec("t", {}, metric="efficiency")]
    findings = compare(base, head)
    assert [(f.verdict, f.why) for f in findings] == [("regression", "tolerance 0.5%"),
                                                       ("regression", "no times_ms in head")]
    # a value neither side has (peak memory of an efficiency cell on CPU) is no loss
    cpu = [rec("t", {"times_ms": [1.0, 2.0], "peak_memory_gib": None}, metric="efficiency")]
    assert verdicts(cpu, cpu) == [("time (median ms)", "ok"), ("peak memory (GiB)", "skipped")]


def test_perplexity_may_rise_by_exactly_the_tolerance():
    # "may rise by 0.5%": a head at exactly base * 1.005 is ok, a hair above is a regression
    base = [rec("a", {"perplexity": 10.0})]
    assert verdicts(base, [rec("a", {"perplexity": 10.0 * (1 + 0.005)})]) == [("perplexity", "ok")]
    assert verdicts(base, [rec("a", {"perplexity": 10.0 * (1 + 0.005) + 1e-9})]) == [("perplexity", "regression")]


def test_accuracy_needs_p_below_alpha_not_equal_to_it():
    # 5 discordant samples, all against head: McNemar's exact p is 2 / 2**5 = 0.0625 exactly; at alpha 0.0625 the
    # rule p < alpha is not met, just above it it is
    base = {f"s{i}": 1 for i in range(10)}
    head = {**base, **{f"s{i}": 0 for i in range(5)}}
    b, h = [rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})]
    assert verdicts(b, h, alpha=0.0625) == [("accuracy", "ok")]
    assert verdicts(b, h, alpha=0.0626) == [("accuracy", "regression")]


def test_paired_accuracy_shows_the_accuracies_of_the_shared_samples():
    # base also scored 10 samples head did not (all wrong): the accuracies shown are over the 20 both scored
    base = {**{f"s{i}": 1 for i in range(20)}, **{f"x{i}": 0 for i in range(10)}}
    head = {**{f"s{i}": 1 for i in range(20)}, **{f"s{i}": 0 for i in range(8)}}
    (f,) = compare([rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})])
    assert (f.base, f.head, f.verdict) == (100.0, 60.0, "regression")  # 20/20 and 12/20
    assert f.why == "McNemar p=0.00781 over 20 samples (10 only in base: not compared)"  # 2 / 2**8


def test_paired_accuracy_names_the_samples_it_leaves_out():
    """With prompts partly renamed, a regression confined to the renamed ones goes unseen: the finding says how
    many samples of each side it did not compare."""
    base = {f"s{i}": 1 for i in range(10)}
    head = {**{f"s{i}": 1 for i in range(7)}, **{f"t{i}": 0 for i in range(5)}}
    (f,) = compare([rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})])
    assert (f.verdict, f.why) == ("ok", "McNemar p=1 over 7 samples (3 only in base, 5 only in head: not compared)")
    (f,) = compare([rec("r", {"per_sample": base})], [rec("r", {"per_sample": base})])
    assert f.why == "McNemar p=1 over 10 samples"


def test_unpaired_accuracy_of_unequal_sizes_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    base = {f"a{i}": int(i < 9) for i in range(10)}  # 9 of 10
    head = {f"b{i}": int(i < 10) for i in range(25)}  # 10 of 25
    (f,) = compare([rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})])
    p = st.fisher_exact([[9, 1], [10, 15]]).pvalue  # 0.0094
    assert (f.base, f.head, f.verdict) == (90.0, 40.0, "regression")
    assert f"Fisher exact p={p:.3g}, 10 vs 25 samples" in f.why


def test_timing_needs_p_below_alpha_not_equal_to_it():
    # 3 timings a side, all of head's slower: of the C(6, 3) = 20 splits two reach the observed difference of
    # medians, 11 - 2 (head {10, 11, 12} and {3, 11, 12}), so the exact p is 2/20 = 0.1; at alpha 0.1, p < alpha fails
    base, head = [1.0, 2.0, 3.0], [10.0, 11.0, 12.0]
    assert permutation_p(base, head) == 2 / 20
    b = [rec("t", {"times_ms": base}, metric="efficiency")]
    h = [rec("t", {"times_ms": head}, metric="efficiency")]
    assert verdicts(b, h, alpha=0.1) == [("time (median ms)", "ok")]
    assert verdicts(b, h, alpha=0.1001) == [("time (median ms)", "regression")]


def test_a_head_that_failed_is_a_regression_saying_how_whatever_its_settings():
    # an OOM in head is a regression with its status, even where the failure record's config hash differs
    base = [rec("a", {"perplexity": 10.0}), rec("b", {"perplexity": 10.0})]
    head = [replace(rec("a", {}, status="oom"), error="CUDA out of memory"),
            replace(rec("b", {}, status="timeout", config_hash="other"), error="over 600 s")]
    assert [(f.verdict, f.why) for f in compare(base, head)] == [
        ("regression", "head status oom: CUDA out of memory"), ("regression", "head status timeout: over 600 s")]
    assert compare(base[:1], [rec("a", {}, status="oom")])[0].why == "head status oom"  # no error said: no colon


def test_empty_per_sample_in_head_is_a_lost_value():
    base = [rec("r", {"per_sample": {"s0": 1, "s1": 0}})]
    (f,) = compare(base, [rec("r", {"per_sample": {}})])
    assert (f.verdict, f.why) == ("regression", "no per_sample in head")


def test_a_cell_that_failed_in_base_is_not_judged():
    # nothing to regress from: an OOM in both runs, or one fixed in head, gives no finding
    base = [rec("a", {}, status="oom"), rec("b", {}, status="error")]
    head = [rec("a", {}, status="oom"), rec("b", {"perplexity": 10.0})]
    assert compare(base, head) == []


def test_a_base_recorded_before_cpu_peak_memory_was_counted_skips_the_memory_verdict():
    # old CPU records hold peak_memory_gib None, new ones a number: nothing to judge the head's against, not a crash
    old = [rec("t", {"times_ms": [1.0, 2.0], "peak_memory_gib": None}, metric="efficiency")]
    new = [rec("t", {"times_ms": [1.0, 2.0], "peak_memory_gib": 0.5}, metric="efficiency")]
    assert verdicts(old, new) == [("time (median ms)", "ok"), ("peak memory (GiB)", "skipped")]


def test_a_peak_memory_lost_in_head_is_a_regression():
    b = [rec("m", {"peak_memory_gib": 10.0}, metric="efficiency")]
    (f,) = compare(b, [rec("m", {"peak_memory_gib": None}, metric="efficiency")])
    assert (f.verdict, f.why) == ("regression", "no peak_memory_gib in head")


def test_peak_memory_of_another_device_is_skipped():
    # same settings hash (a Slurm request names no GPU model), but the jobs ran on different machines
    b = [rec("m", {"peak_memory_gib": 10.0}, metric="efficiency", device="cpu")]
    assert verdicts(b, [rec("m", {"peak_memory_gib": 20.0}, metric="efficiency", device="cuda")]) == [
        ("peak memory (GiB)", "skipped")]


def test_peak_memory_may_rise_by_exactly_the_ratio_and_improves_only_beyond_it():
    b = [rec("m", {"peak_memory_gib": 10.0}, metric="efficiency")]
    for head, verdict in ((10.0 * 1.05, "ok"), (10.0 * 1.05 + 1e-9, "regression"), (9.6, "ok"),
                          (10.0 / 1.05, "ok"), (10.0 / 1.05 - 1e-9, "improvement")):
        h = [rec("m", {"peak_memory_gib": head}, metric="efficiency")]
        assert verdicts(b, h) == [("peak memory (GiB)", verdict)], head


def test_perplexity_improves_only_beyond_the_tolerance():
    base = [rec("a", {"perplexity": 10.0})]
    for head, verdict in ((10.0 * (1 - 0.005), "ok"), (10.0 * (1 - 0.005) - 1e-9, "improvement"), (9.97, "ok")):
        assert verdicts(base, [rec("a", {"perplexity": head})]) == [("perplexity", verdict)], head


def test_a_perplexity_that_was_not_finite_in_base_either_is_no_regression():
    for base in (float("nan"), float("inf")):
        assert verdicts([rec("a", {"perplexity": base})], [rec("a", {"perplexity": float("nan")})]) == [
            ("perplexity", "ok")]


def test_a_perplexity_that_was_nan_in_base_and_is_measured_in_head_is_an_improvement():
    """A base NaN (a diverged run) that head measures was "ok", so the gate's summary counted it among the unchanged
    and listed it nowhere, where a base inf was an improvement; the change column read "+nan%" for a NaN head."""
    base = [rec("a", {"perplexity": float("nan")}), rec("b", {"perplexity": float("inf")})]
    head = [rec("a", {"perplexity": 30.0}), rec("b", {"perplexity": 30.0})]
    assert verdicts(base, head) == [("perplexity", "improvement")] * 2
    nan_head = compare([rec("a", {"perplexity": 30.0})], [rec("a", {"perplexity": float("nan")})])
    assert [(f.verdict, f.change) for f in nan_head] == [("regression", "")]
    assert [f.change for f in compare(head, base)] == ["", ""]  # not "+nan%", "+inf%"


def test_accuracy_without_samples_on_a_side_is_skipped():
    assert judge_accuracy({}, {"s0": 1}, Thresholds()) == ("skipped", 1.0, 0)
    empty = [rec("r", {"per_sample": {}})]
    assert [(f.verdict, f.why) for f in compare(empty, empty)] == [("skipped", "no samples")]


def test_paired_partial_scores_are_no_regression_where_the_accuracy_rose():
    # cwe scores the fraction of its 10 words found: 15 samples lose a word (0.6 -> 0.5), 5 find them all (1.0).
    # The sign test gives p = 0.041 for "worse", but the accuracy rose from 60% to 62.5%: significant neither way
    base = {f"s{i}": 0.6 for i in range(20)}
    head = {f"s{i}": 0.5 if i < 15 else 1.0 for i in range(20)}
    assert judge_accuracy(base, head, Thresholds()) == ("ok", mcnemar_exact(15, 5), 20)
    assert judge_accuracy(head, base, Thresholds()) == ("ok", mcnemar_exact(5, 15), 20)
    (f,) = compare([rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})])
    assert (f.verdict, round(f.base, 9), round(f.head, 9)) == ("ok", 60.0, 62.5)
    # where the accuracy moves the way the samples do, the verdict stands
    lower = {f"s{i}": 0.5 if i < 15 else 0.7 for i in range(20)}
    assert judge_accuracy(base, lower, Thresholds())[0] == "regression"


def test_unpaired_partial_scores_count_as_the_nearest_whole_number_of_hits():
    # RULER's string_match_all scores a sample in [0, 1]: ten samples at 0.96 are 9.6, counted as 10 hits of 10
    base = {f"a{i}": 0.96 for i in range(10)}
    head = {f"b{i}": 0 for i in range(10)}
    assert judge_accuracy(base, head, Thresholds())[1] == fisher_exact(10, 10, 0, 10)


def test_timing_improves_only_beyond_the_ratio():
    # medians 10 and 8 at a ratio of 1.25: exactly at the bound, ok; a hair faster, an improvement (exact p = 1/252)
    base = [9.8, 9.9, 10.0, 10.1, 10.2]
    b = [rec("t", {"times_ms": base}, metric="efficiency")]
    for shift, verdict in ((2.0, "ok"), (2.01, "improvement")):
        head = [rec("t", {"times_ms": [x - shift for x in base]}, metric="efficiency")]
        assert verdicts(b, head, time_ratio=1.25) == [("time (median ms)", verdict)], shift


def test_permutation_p_of_unequal_sample_sizes():
    # one head timing of 10 against five base timings 1-5: of the 6 ways to pick head's one, only {10} reaches the
    # observed difference of medians, 10 - 3
    assert permutation_p([1.0, 2.0, 3.0, 4.0, 5.0], [10.0]) == 1 / 6


def test_markdown_lists_skipped_cells_with_why():
    findings = compare([rec("t", {"times_ms": [1.0, 2.0]}, metric="efficiency")],
                       [rec("t", {"times_ms": [1.0, 2.0]}, metric="efficiency", device="cuda")])
    assert ("| skipped | `t` | time (median ms) |  |  |  | devices differ: cpu: x86_64, ? thread(s) vs cuda: "
            "unknown GPU |") in markdown(findings, "base", "head")


def test_markdown_notes_cpu_timings_only_where_one_was_flagged():
    b = [rec("t", {"times_ms": [1.0, 2.0, 3.0]}, metric="efficiency"), rec("a", {"perplexity": 10.0})]
    h = [rec("t", {"times_ms": [1.0, 2.0, 3.0]}, metric="efficiency"), rec("a", {"perplexity": 11.0})]
    text = markdown(compare(b, h), "base", "head")
    assert "| regression | `a` | perplexity" in text and "not gating" not in text


def test_a_change_from_zero_is_not_a_percentage():
    assert Finding("c", "peak memory", 0.0, 1.0, "regression").change == ""


def test_an_accuracy_changes_by_points_not_by_a_percentage_of_itself():
    assert Finding("c", "accuracy", 60.0, 62.5, "ok").change == "+2.5 pts"  # not +4.17%
    assert Finding("c", "accuracy", 0.0, 20.0, "improvement").change == "+20.0 pts"


def test_thresholds_of_one_allow_no_rise():
    th = Thresholds(time_ratio=1, memory_ratio=1)
    b = [rec("m", {"peak_memory_gib": 10.0}, metric="efficiency")]
    assert [f.verdict for f in compare(b, [rec("m", {"peak_memory_gib": 10.01}, metric="efficiency")], th)] == [
        "regression"]


def test_the_default_alpha_is_5_percent():
    # McNemar's exact p for 5 discordant samples all against head is 0.0625, for 6 it is 0.03125
    base = {f"s{i}": 1 for i in range(10)}
    for lost, verdict in ((5, "ok"), (6, "regression")):
        head = {**base, **{f"s{i}": 0 for i in range(lost)}}
        assert verdicts([rec("r", {"per_sample": base})], [rec("r", {"per_sample": head})]) == [("accuracy", verdict)]


def test_the_summary_is_appended_to_not_overwritten(tmp_path, capsys):
    # $GITHUB_STEP_SUMMARY: the job's timing gate wrote its summary there first
    for name in ("base", "head"):
        results.append(tmp_path / name, results.Record(suite="s", cell="c", metric="perplexity",
                                                       values={"perplexity": 10.0}, config_hash="h"))
    summary = tmp_path / "summary.md"
    summary.write_text("### harness compare: timing\n")
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "head"), "--summary", str(summary)]) == 0
    text = summary.read_text()
    assert text.startswith("### harness compare: timing\n") and "1 ok" in text


def test_a_skipped_cell_says_which_side_lacks_its_hardware_or_that_its_settings_differ():
    base = rec("e", {"times_ms": [1.0]}, metric="efficiency", config_hash="old")
    head = rec("e", {"times_ms": [1.0]}, metric="efficiency", config_hash="new")
    base.settings["hardware"] = "cuda: NVIDIA H100 80GB HBM3"
    (finding,) = compare([base], [head])
    assert finding.why == "no hardware in head's record (recorded before records named it): re-make head"
    (finding,) = compare([rec("a", {"perplexity": 10.0})], [rec("a", {"perplexity": 10.0}, config_hash="other")])
    assert finding.why == "settings differ (config hash)"  # a perplexity cell: no hardware on either side


def test_markdown_lists_regressions_before_improvements():
    base = [rec("a", {"perplexity": 10.0}), rec("b", {"perplexity": 10.0})]
    text = markdown(compare(base, [rec("a", {"perplexity": 9.0}), rec("b", {"perplexity": 11.0})]), "base", "head")
    assert text.index("| regression | `b`") < text.index("| improvement | `a`")


def test_a_sampled_permutation_p_is_reproducible():
    # 20 timings a side: too many splits to enumerate, so a seeded sample of them; the same records, the same p
    base = [10.0 + 0.1 * (i % 7) for i in range(20)]
    head = [x + 0.05 for x in base]
    assert permutation_p(base, head, n_random=500) == permutation_p(base, head, n_random=500)


def test_a_sampled_permutation_p_is_never_zero():
    """Sampled splits need not include one as extreme as the observed, which is one of them: p = (hits+1)/(n+1)."""
    base, head = [float(i) for i in range(20)], [100.0 + i for i in range(20)]  # head slower at every repeat
    assert permutation_p(base, head, n_random=99) == 1 / 100


def test_lm_eval_metrics_are_judged_by_their_standard_errors():
    """lm-eval records were never judged: an accuracy that fell by half passed the gate."""
    def lm(values, better=None):
        r = rec("m/seed0/pretrained/lm_eval/arc_easy", values, metric="lm_eval")
        r.settings["higher_is_better"] = {"acc": True, "word_perplexity": False} if better is None else better
        return r

    base = lm({"acc": 0.60, "acc_stderr": 0.02, "word_perplexity": 30.0, "word_perplexity_stderr": 1.0,
               "samples": 500, "samples_available": 500})

    def judged(**head):
        return [(f.metric, f.verdict) for f in compare([base], [lm({**base.values, **head})])]

    assert judged() == [("lm_eval acc", "ok"), ("lm_eval word_perplexity", "ok")]  # counts are not metrics
    # |diff| / hypot(se_b, se_h): 0.03 / 0.0283 -> p = 0.29; 0.10 / 0.0283 -> p = 0.0004
    assert judged(acc=0.57)[0] == ("lm_eval acc", "ok")
    assert judged(acc=0.50)[0] == ("lm_eval acc", "regression")
    assert judged(acc=0.70)[0] == ("lm_eval acc", "improvement")
    assert judged(word_perplexity=40.0)[1] == ("lm_eval word_perplexity", "regression")  # lower is better
    assert judged(acc=float("nan"))[0] == ("lm_eval acc", "regression")
    (gone, _) = compare([base], [lm({k: v for k, v in base.values.items() if k != "acc"})])
    assert (gone.verdict, gone.why) == ("regression", "no finite acc in head")
    (unknown, _) = compare([lm(base.values, better={})], [lm({**base.values, "acc": 0.5}, better={})])
    assert (unknown.verdict, unknown.why) == ("skipped", "changed, but lm-eval gives no direction for it")
    no_se = lm({"acc": 0.6, "acc_stderr": "N/A"})
    (f,) = compare([no_se], [lm({"acc": 0.5, "acc_stderr": "N/A"})])
    assert (f.verdict, f.why) == ("skipped", "changed, but no standard error to test with")

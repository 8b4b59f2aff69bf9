from harness import results
from harness.cli import main
from harness.report.compare import Thresholds, compare, markdown, permutation_p


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
        ("time", "skipped")]


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
    assert verdicts(b, [rec("m", {"peak_memory_gib": 10.4}, metric="efficiency")]) == [("peak memory", "ok")]
    assert verdicts(b, [rec("m", {"peak_memory_gib": 10.6}, metric="efficiency")]) == [
        ("peak memory", "regression")]


def test_peak_memory_of_a_train_record_is_not_judged():
    # training's peak memory is not compared (train records are excluded from the memory verdict)
    assert compare([rec("m", {"peak_memory_gib": 10.0}, metric="train")],
                   [rec("m", {"peak_memory_gib": 15.0}, metric="train")]) == []


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
        capsys.readouterr()


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
    assert verdicts(cpu, cpu) == [("time (median ms)", "ok"), ("peak memory", "skipped")]

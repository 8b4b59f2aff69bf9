"""The timing gate: its statistics against scipy's, its rules, and `harness compare --rev/--calibrate` end to end
on a tiny suite (the rates it achieves are a benchmark: benchmarks/gate.py)."""

import json
import os
import random
import statistics

import pytest

from harness.cli import main
from harness.timing.interleave import Settings, judge, smallest_detectable
from harness.timing.stats import mann_whitney, median_ratio_interval

scipy_stats = pytest.importorskip("scipy.stats")

rng = random.Random(0)
BASE = [10 + rng.gauss(0, 0.3) for _ in range(20)]
SLOW = [x * 1.25 for x in BASE[::-1]]
TIED = [1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 5.0]
TIED_HEAD = [2.0, 3.0, 3.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize("base,head", [(BASE, SLOW), (SLOW, BASE), (BASE, BASE[::-1]), (TIED, TIED_HEAD)],
                         ids=["slower", "faster", "same", "ties"])
def test_mann_whitney_matches_scipy(base, head):
    u, p = mann_whitney(base, head)
    ref = scipy_stats.mannwhitneyu(head, base, alternative="greater", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


def test_median_ratio_interval_agrees_with_scipys_bootstrap():
    head = [x * 1.1 + rng.gauss(0, 0.3) for x in BASE]
    lo, hi = median_ratio_interval(BASE, head)
    ref = scipy_stats.bootstrap((head, BASE), lambda h, b: statistics.median(h) / statistics.median(b),
                                vectorized=False, method="percentile", n_resamples=2000, random_state=0)
    assert lo < statistics.median(head) / statistics.median(BASE) < hi
    # within 0.002 (they agree to 1e-4): a 90% interval is 0.004 and 0.006 narrower here
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.002)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.002)


def test_a_regression_needs_both_the_ratio_and_the_rank_test():
    s = Settings()
    assert judge(BASE, SLOW, s).verdict == "regression"
    assert judge(SLOW, BASE, s).verdict == "improvement"
    assert judge(BASE, [x * 1.05 for x in BASE], s).verdict == "ok"  # significant but below the ratio
    few = [BASE[0], BASE[1], BASE[2]]
    assert judge(few, [x * 1.25 for x in few], s).verdict == "ok"  # the ratio but three samples prove nothing
    v = judge(BASE, SLOW, s)
    assert v.ratio == pytest.approx(1.25) and v.interval[0] < v.ratio < v.interval[1] and v.p < 1e-6


def test_smallest_detectable_slowdown_of_an_a_a_pair():
    quiet = [10 + rng.gauss(0, 0.05) for _ in range(20)]
    other = [10 + rng.gauss(0, 0.05) for _ in range(20)]
    assert smallest_detectable(quiet, other, Settings()) in (0.10, 0.11)  # the ratio threshold, not the noise
    noisy = [10 * rng.lognormvariate(0, 0.5) for _ in range(20)]
    noisy2 = [10 * rng.lognormvariate(0, 0.5) for _ in range(20)]
    assert smallest_detectable(noisy, noisy2, Settings()) > 0.3


TINY = """name: tiny
backends: [full, {sliding_window: {window: 16}}]
metrics:
  efficiency: {lengths: [32, 64], heads: 2, head_dim: 8}
"""


def test_calibrate_and_rev_end_to_end(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    fast = ["--suite", str(tmp_path / "tiny.yaml"), "--min-repeats", "5", "--min-seconds", "0"]
    assert main(["compare", "--calibrate", *fast]) == 0
    out = capsys.readouterr().out
    assert "A/A calibration" in out and "False positives:" in out and "Smallest slowdown" in out
    assert out.count("| `attention/") == 4
    summary = tmp_path / "summary.md"
    assert main(["compare", "--rev", "HEAD", *fast, "--summary", str(summary)]) == 0  # CPU: reported, not gating
    out = capsys.readouterr().out
    assert "HEAD → working tree" in out and "not gating" in out and "| `attention/full/efficiency@64` |" in out
    assert "HEAD → working tree" in summary.read_text()


@pytest.mark.parametrize("argv,message", [
    (["--rev", "no-such-rev"], "--rev no-such-rev: not a commit of"),
    (["--rev", "HEAD", "a", "b"], "neither takes results directories"),
    (["--rev", "HEAD", "--calibrate"], "they do not go together"),
    (["a"], "give two results directories, BASE HEAD (got 1), or --rev REV"),
    (["--calibrate", "--only", "nothing*"], "--only 'nothing*' matches none"),
    (["--calibrate", "--min-seconds", "-1"], "min_seconds (--min-seconds) = -1.0: must be >= 0"),
    (["--calibrate", "--time-ratio", "inf"], "time_ratio (--time-ratio) = inf: must be >= 1"),  # could never fail
    # the flag a bad value came from is named, not a dump of every setting
    (["--calibrate", "--min-repeats", "2"], "min_repeats (--min-repeats) = 2: must be between 3 and 400"),
    (["--calibrate", "--min-repeats", "500"], "min_repeats (--min-repeats) = 500: must be between 3 and 400"),
    (["--rev", "HEAD", "--alpha", "1.5"], "alpha (--alpha) = 1.5: must be in (0, 1)"),
])
def test_bad_timing_arguments(tmp_path, capsys, argv, message):
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert main(["compare", *argv, "--suite", str(tmp_path / "tiny.yaml")]) == 2
    assert message in capsys.readouterr().err


def test_a_suite_without_efficiency_cells(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("name: x\n")
    assert main(["compare", "--calibrate", "--suite", str(tmp_path / "s.yaml")]) == 2
    assert "no metrics.efficiency block" in capsys.readouterr().err


def test_rewarm_is_a_checked_setting():
    assert Settings().rewarm == 1  # one untimed call before each sample: the other side ran in between
    with pytest.raises(Exception, match="rewarm = -1: must be >= 0"):
        Settings(rewarm=-1)


def test_an_improvement_needs_the_ratio_below_one_over_the_threshold_and_the_rank_test_at_alpha():
    s = Settings()
    faster = [x * 0.95 for x in BASE]  # significant, but 0.95 > 1 / 1.10 = 0.909: within drift
    assert scipy_stats.mannwhitneyu(BASE, faster, alternative="greater").pvalue < s.alpha
    assert judge(BASE, faster, s).verdict == "ok"
    few = [BASE[0], BASE[1], BASE[2]]
    quick = [x * 0.75 for x in few]  # the ratio, but three samples a side: p = 0.04, not below alpha = 0.002
    p = scipy_stats.mannwhitneyu(few, quick, alternative="greater", method="asymptotic").pvalue
    assert s.alpha < p < 0.05
    assert judge(few, quick, s).verdict == "ok"


class FakeWorker:
    """Stands in for a timing worker process: logs who was asked what; each side's samples have a fixed length."""

    log: list = []
    seconds = {"base": 0.125, "head": 0.5}

    def __init__(self, tree, inject=None):
        self.side = str(tree)
        FakeWorker.log.append((self.side, f"inject {inject}"))

    def ask(self, msg):
        FakeWorker.log.append((self.side, next(iter(msg))))
        return {"kernel": f"{self.side} kernel"} if "setup" in msg else {"seconds": [self.seconds[self.side]]}

    def close(self):
        pass


class RecordingWorker(FakeWorker):
    """A FakeWorker that also keeps each message it was asked."""

    asked: list = []

    def ask(self, msg):
        self.asked.append(msg)
        return super().ask(msg)


def test_interleaving_alternates_a_b_b_a_until_both_sides_reach_the_repeats_and_seconds(monkeypatch):
    from harness.timing import interleave

    monkeypatch.setattr(interleave, "Worker", FakeWorker)
    FakeWorker.log = []
    cell = interleave.Cell("full", {}, "full", 32, 2, 8, 1)
    s = Settings(min_repeats=3, min_seconds=1.0, warmup=1)
    [t] = interleave.interleaved("base", "head", [cell], s, "slow.py", progress=lambda *a: None)
    # base needs 8 samples of 0.125 s for a second of timed work (head had it after 2, and 3 repeats after 3)
    assert t.base_s == [0.125] * 8 and t.head_s == [0.5] * 8 and t.kernels == ("base kernel", "head kernel")
    assert FakeWorker.log[:4] == [("base", "inject None"), ("head", "inject slow.py"),  # only head is slowed
                                  ("base", "setup"), ("head", "setup")]
    assert [side for side, _ in FakeWorker.log[4:]] == ["base", "head", "head", "base"] * 4
    # no seconds asked: the repeats decide; max_repeats caps what min_seconds asks for
    [t] = interleave.interleaved("base", "head", [cell], Settings(min_repeats=5, min_seconds=0), progress=print)
    assert len(t.base_s) == len(t.head_s) == 5
    [t] = interleave.interleaved("base", "head", [cell], Settings(min_repeats=3, max_repeats=4, min_seconds=100),
                                 progress=print)
    assert len(t.base_s) == len(t.head_s) == 4


def test_the_gate_times_the_rev_as_base_and_fails_on_a_regression_but_never_on_calibration(monkeypatch, tmp_path):
    from contextlib import contextmanager

    from harness.timing import gate, interleave

    cell = interleave.Cell("full", {}, "full", 32, 2, 8, 1)
    base_s = [0.010 + i * 1e-5 for i in range(20)]  # median 10.095 ms
    head_s = [x * 1.5 for x in base_s]  # median 15.14 ms: a regression of 1.5
    trees = []

    def fake_interleaved(base, head, cells, s, inject):
        trees.append((base, head))
        return [interleave.Timing(cell, list(base_s), list(head_s))]

    @contextmanager
    def fake_worktree(rev):
        yield f"worktree of {rev}"

    monkeypatch.setattr(gate, "interleaved", fake_interleaved)
    monkeypatch.setattr(gate, "worktree", fake_worktree)
    monkeypatch.setattr(gate, "suite_cells", lambda suite, only: [cell])
    summary = tmp_path / "summary.md"
    assert gate.timing_gate("v1", "suite", Settings(), fail_on_time=True, summary=str(summary)) == 1
    assert trees == [("worktree of v1", gate.REPO)]
    assert "| `attention/full/efficiency@32` | 10.1 | 15.1 | 1.500 [" in summary.read_text()
    assert "| regression |" in summary.read_text()
    assert gate.timing_gate(None, "suite", Settings(), calibrate=True, fail_on_time=True) == 0  # A/A: reported
    assert trees[-1] == (gate.REPO, gate.REPO)


def test_mann_whitney_of_all_equal_samples_is_not_significant():
    assert mann_whitney([5.0] * 4, [5.0] * 4) == (8.0, 1.0)


def test_mann_whitney_needs_samples_on_both_sides():
    with pytest.raises(ValueError, match="samples on both sides"):
        mann_whitney([], [1.0])


EVEN = [10.0 + 0.125 * i for i in range(20)]  # dyadic: scaled by 1.25 exactly, and every scaled sample is larger


def test_a_regression_needs_the_ratio_above_the_threshold_and_p_below_alpha_not_equal():
    head = [x * 1.25 for x in EVEN]
    assert judge(EVEN, head, Settings(time_ratio=1.25)).verdict == "ok"  # the ratio is exactly 1.25
    assert judge(EVEN, head, Settings(time_ratio=1.2499)).verdict == "regression"
    p = mann_whitney(EVEN, head)[1]
    assert judge(EVEN, head, Settings(alpha=p)).verdict == "ok"
    assert judge(EVEN, head, Settings(alpha=p * 1.001)).verdict == "regression"


def test_the_verdict_says_the_ratio_of_medians_and_the_p_of_its_direction():
    outlier = [*EVEN[:-1], 1000.0]  # a scheduler hiccup moves the mean, not the median
    assert judge(EVEN, outlier, Settings()).ratio == 1.0
    v = judge(SLOW, BASE, Settings())
    assert v.verdict == "improvement" and v.p < 1e-6  # the rank test's p that head is faster


def test_smallest_detectable_slowdown_can_be_one_percent():
    narrow = [10.0 + 0.001 * i for i in range(20)]  # 1% slower is slower than every sample
    assert smallest_detectable(narrow, narrow, Settings(time_ratio=1.0)) == 0.01


def test_the_workers_warm_up_and_rewarm_as_set(monkeypatch):
    from harness.timing import interleave

    asked = RecordingWorker.asked = []
    monkeypatch.setattr(interleave, "Worker", RecordingWorker)
    cell = interleave.Cell("full", {}, "full", 32, 2, 8, 1)
    interleave.interleaved("base", "head", [cell], Settings(min_repeats=3, min_seconds=0, warmup=4, rewarm=2),
                           progress=lambda *a: None)
    assert [m["setup"]["warmup"] for m in asked if "setup" in m] == [4, 4]
    assert [m for m in asked if "time" in m] == [{"time": 1, "rewarm": 2}] * 6


def test_the_workers_time_every_chunk_size_se_attn_draws_among(monkeypatch):
    """As `harness bench attention` times them (and as its records' time_ms reads): one call of each size per
    sample, not whichever sizes the draws fell on."""
    import io

    from harness.timing import interleave, worker

    asked = RecordingWorker.asked = []
    monkeypatch.setattr(interleave, "Worker", RecordingWorker)
    cells = [interleave.Cell("se_attn", {"chunk_size": [8, 16], "block_size": 4, "top_k": 2}, "se", 32, 2, 8, 1),
             interleave.Cell("full", {}, "full", 32, 2, 8, 1)]
    interleave.interleaved("base", "head", cells, Settings(min_repeats=3, min_seconds=0), progress=lambda *a: None)
    assert [m["setup"]["draws"] for m in asked if "setup" in m] == [[{"chunk_size": 8}, {"chunk_size": 16}]] * 2 + [
        [{}]] * 2

    monkeypatch.setattr(worker, "_one", lambda b, q, k, v, device: (b.plan(True)["chunk_size"] / 1e3, f"k{b}"))
    setup = {"backend": "se_attn", "options": cells[0].options, "draws": [{"chunk_size": 8}, {"chunk_size": 16}],
             "length": 32, "heads": 2, "head_dim": 8, "batch": 1, "dtype": "float32", "device": "cpu", "warmup": 1,
             "seed": 0}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"setup": setup}) + "\n" + '{"time": 2}\n'))
    monkeypatch.setattr("sys.stdout", out := io.StringIO())
    worker.main()
    assert json.loads(out.getvalue().splitlines()[1]) == {"seconds": [0.012, 0.012]}


def test_a_worker_times_n_calls_after_its_warmup_and_rewarm_untimed_and_flushes_each_reply(monkeypatch):
    import io

    import torch

    import harness.attention
    from harness.timing import worker

    calls, inputs = [], []

    class Counting:
        def __init__(self, name, **options):
            assert (name, options) == ("full", {"x": 1})

        def __call__(self, q, k, v, training):
            calls.append(q.grad)  # None: no gradient left from the call before
            inputs.append(q.detach().clone())
            return q * k * v, "counted"

    monkeypatch.setattr(harness.attention, "Backend", Counting)
    setup = {"backend": "full", "options": {"x": 1}, "length": 4, "heads": 1, "head_dim": 2, "batch": 1,
             "dtype": "float32", "device": "cpu", "warmup": 2, "seed": 0}
    lines = [{"setup": setup}, {"time": 3, "rewarm": 1}]

    class Pipe(io.StringIO):  # what the coordinator reads: only what was flushed
        sent = ""

        def flush(self):
            self.sent = self.getvalue()

    out = Pipe()
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(m) + "\n" for m in lines)))
    monkeypatch.setattr("sys.stdout", out)
    worker.main()
    replies = [json.loads(line) for line in out.sent.splitlines()]
    assert replies[0] == {"kernel": "counted"} and len(replies[1]["seconds"]) == 3
    assert len(calls) == 2 + 1 + 3 and all(g is None for g in calls)
    seeded = torch.randn(1, 1, 4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inputs[0], seeded)  # both sides time the same inputs


def test_the_workers_are_closed_when_a_timing_fails(monkeypatch):
    from harness.timing import interleave

    closed = []

    class Failing(FakeWorker):
        def ask(self, msg):
            if "time" in msg:
                raise RuntimeError("timing worker exited with code 1")
            return super().ask(msg)

        def close(self):
            closed.append(self.side)

    monkeypatch.setattr(interleave, "Worker", Failing)
    with pytest.raises(RuntimeError, match="exited"):
        interleave.interleaved("base", "head", [interleave.Cell("full", {}, "full", 32, 2, 8, 1)], Settings())
    assert closed == ["base", "head"]


def test_a_worker_runs_the_code_of_its_tree(monkeypatch, tmp_path):
    # the tree's harness ahead of any harness on PYTHONPATH (the tests' own, a CI job's checkout)
    from harness.timing import interleave

    started = []
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    monkeypatch.setattr(interleave.subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw)))
    interleave.Worker(tmp_path / "tree")
    [(cmd, kw)] = started
    assert cmd[1:] == [str(interleave.WORKER)] and kw["cwd"] == tmp_path / "tree"
    assert kw["env"]["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "tree"), "elsewhere"]


def test_timing_settings_need_three_repeats_a_cap_above_them_and_a_warm_up_call():
    # without an untimed call first, the record would name no kernel (the worker names it from the warm-up)
    for bad in ({"min_repeats": 2}, {"min_repeats": 5, "max_repeats": 4}, {"warmup": 0}):
        with pytest.raises(Exception, match="timing settings out of range"):
            Settings(**bad)
    assert Settings(min_repeats=3, max_repeats=3).max_repeats == 3


def test_the_command_line_settings_reach_the_timing_gate(monkeypatch):
    from harness.timing import gate

    given = []
    monkeypatch.setattr(gate, "timing_gate", lambda rev, suite, s, **kw: given.append((rev, suite, s, kw)) or 0)
    assert main(["compare", "--rev", "v1", "--suite", "s.yaml", "--time-ratio", "1.5", "--alpha", "0.01",
                 "--min-repeats", "7", "--min-seconds", "0.5", "--only", "x*", "--fail-on-time"]) == 0
    rev, suite, s, kw = given[-1]
    assert (rev, suite, s) == ("v1", "s.yaml", Settings(min_repeats=7, min_seconds=0.5, alpha=0.01, time_ratio=1.5))
    assert kw["only"] == "x*" and kw["fail_on_time"] and not kw["calibrate"]
    assert main(["compare", "--calibrate", "--suite", "s.yaml"]) == 0
    assert given[-1][2] == Settings()  # the timing gate's own defaults: alpha 0.002, not the stored runs' 0.05


def test_a_worker_that_dies_is_an_error_naming_its_exit_code(monkeypatch, tmp_path):
    from harness.timing import interleave

    (tmp_path / "dies.py").write_text("import sys\nsys.stdin.readline()\nsys.exit(3)\n")
    monkeypatch.setattr(interleave, "WORKER", tmp_path / "dies.py")
    w = interleave.Worker(tmp_path)
    with pytest.raises(RuntimeError, match=r"timing worker exited with code 3 \(its error is above\)"):
        w.ask({"setup": {}})


def test_a_rev_git_cannot_check_out_says_why(monkeypatch):
    """`git worktree add` failing (a full disk, a locked worktree) raised CalledProcessError with git's words hidden."""
    import subprocess

    from harness.errors import UserError
    from harness.timing import interleave

    real = subprocess.run

    def run(cmd, **kw):
        if "worktree" in cmd and "add" in cmd:
            return subprocess.CompletedProcess(cmd, 128, "", "fatal: could not create work tree dir: No space left")
        return real(cmd, **kw)

    monkeypatch.setattr(interleave.subprocess, "run", run)
    with pytest.raises(UserError, match=r"--rev HEAD: git could not check it out into .*: fatal: could not create work "
                                        r"tree dir: No space left"):
        with interleave.worktree("HEAD"):
            pass

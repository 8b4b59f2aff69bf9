import math

import pytest

from harness.report.significance import (
    fisher_exact,
    mcnemar_exact,
    mean_sd,
    paired_samples,
    paired_t,
    t_central,
    t_quantile,
    wilson,
)

st = pytest.importorskip("scipy.stats")  # the reference; not on a stock GPU image, where gpu-check collects this


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # two-sided
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(2, 9) == pytest.approx(st.binomtest(2, 11).pvalue)


@pytest.mark.parametrize("a,n_a,b,n_b", [(10, 20, 0, 20), (3, 10, 7, 10), (0, 5, 0, 5), (5, 30, 12, 30),
                                          (1, 1, 0, 1), (9, 10, 2, 25)])
def test_fisher_exact_matches_scipy(a, n_a, b, n_b):
    assert fisher_exact(a, n_a, b, n_b) == pytest.approx(st.fisher_exact([[a, n_a - a], [b, n_b - b]]).pvalue)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 60), (0.5, 3)])
def test_wilson_matches_statsmodels_formula(k, n):
    lo, hi = wilson(k, n)
    if float(k).is_integer():
        ci = st.binomtest(int(k), n).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert 0 <= lo <= k / n <= hi <= 1


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10, 30])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0])
def test_t_distribution_matches_scipy(df, t):
    assert t_central(t, df) == pytest.approx(st.t.cdf(t, df) - st.t.cdf(-t, df), abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 4, 19])
def test_t_quantile_matches_scipy(df):
    assert t_quantile(0.975, df) == pytest.approx(st.t.ppf(0.975, df), rel=1e-9)


def test_paired_t_matches_scipy():
    d = [-1.2, -1.0, -0.9]
    r = paired_t(d)
    ref = st.ttest_1samp(d, 0.0)
    ci = ref.confidence_interval(0.95)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (r.low, r.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert r.significant and r.sign == -1
    one = paired_t([0.5])
    assert one.p == 1.0 and math.isinf(one.low) and one.sign == 0
    assert paired_t([]) is None


def test_paired_samples_uses_only_shared_samples():
    a = {"s1": 1.0, "s2": 0.0, "s3": 1.0, "x": 1.0}
    b = {"s1": 1.0, "s2": 1.0, "s3": 0.0, "y": 0.0}
    r = paired_samples(a, b)
    assert r.n == 3 and r.estimate == 0 and r.p == 1.0 and r.sign == 0
    won = {f"s{i}": 1.0 for i in range(12)}
    lost = {f"s{i}": 0.0 for i in range(12)}
    r = paired_samples(lost, won)
    assert r.estimate == 1 and r.p == pytest.approx(2 / 2**12) and r.sign == 1
    assert paired_samples({"a": 1.0}, {"b": 1.0}) is None


def test_paired_samples_interval_is_normal_with_the_sample_sd():
    # d = b - a = [1, 1, 1, 0]: mean 0.75, sample sd (n - 1) 0.5, so the interval is 0.75 +- Z95 * 0.5 / sqrt(4)
    r = paired_samples({s: 0.0 for s in "wxyz"}, {"w": 1.0, "x": 1.0, "y": 1.0, "z": 0.0})
    assert r.estimate == 0.75
    assert (r.low, r.high) == pytest.approx((0.75 - 1.959963984540054 * 0.25, 0.75 + 1.959963984540054 * 0.25))


def test_mean_sd():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([4.0]) == (4.0, None)


def test_paired_samples_pairs_by_sample_id_not_by_position():
    # b scored a sample a did not ("s0", first in order): s1 and s3 must still pair with themselves,
    # d = [1 - 1, 1 - 0] = [0, 1], mean 0.5, one discordant sample won: McNemar p = 1
    r = paired_samples({"s1": 1.0, "s3": 0.0}, {"s0": 0.0, "s1": 1.0, "s3": 1.0})
    assert (r.n, r.estimate, r.p) == (2, 0.5, 1.0)


def test_mean_sd_is_the_mean_and_the_sample_sd():
    # [1, 2, 6]: mean 3 (the median is 2), squared deviations 4 + 1 + 9 = 14, sd = sqrt(14 / 2)
    assert mean_sd([1.0, 2.0, 6.0]) == (3.0, pytest.approx(math.sqrt(7)))


def test_a_sign_test_against_the_mean_marks_no_direction():
    # partial scores: b gains 0.1 on ten samples and loses 0.9 on two; the sign test favours b (10 of 12,
    # p = 0.039), the mean goes against it (-0.067): no direction is significant
    a = {f"s{i}": 0.0 for i in range(10)} | {"x": 1.0, "y": 1.0}
    b = {s: 0.1 for s in a}
    r = paired_samples(a, b)
    assert r.p == pytest.approx(mcnemar_exact(2, 10)) and r.p < 0.05 and r.estimate < 0
    assert not r.significant and r.sign == 0
    # where they agree, as 0/1 scores always do, the mark stands
    assert paired_samples({s: 0.0 for s in a}, b).sign == 1


def test_one_sample_gives_no_interval():
    r = paired_samples({"s": 0.0}, {"s": 1.0})
    assert (r.n, r.estimate, r.p) == (1, 1.0, 1.0) and (r.low, r.high) == (-math.inf, math.inf)


def test_paired_t_on_equal_differences():
    # every seed the same difference: the seeds changed nothing, one measurement repeated, so no interval, p = 1
    for diffs in ([0.5, 0.5, 0.5], [0.5, 0.5], [0.0, 0.0]):
        r = paired_t(diffs)
        assert (r.estimate, r.low, r.high, r.p, r.n, r.sign) == (diffs[0], -math.inf, math.inf, 1.0, len(diffs), 0)
    assert paired_t([0.5, 0.5, 0.5 + 1e-9]).sign == 1  # a spread, however small, is tested


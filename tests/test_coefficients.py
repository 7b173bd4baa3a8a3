"""Baseline coefficient vectors (lcsc_fast.coefficients) against independent computations.

* ema: a brute-force simulation that applies the EMA update at every training step to one-hot
  "checkpoints", the checkpoint-level recursion run directly in float64 for long runs, and the
  closed form in exact rational arithmetic for rates from the smallest subnormal to 1 - 2^-40.
* power_ema: a fine midpoint Riemann sum of EDM2's defining integral (numpy only; scipy is not a
  dependency), and invariance under scaling all steps, which the naive formula would overflow.
* sigma_rel <-> gamma, the difference parametrisation, and the errors for bad inputs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from lcsc_fast import coefficients as C

STEPS = [[0, 3, 7, 10], [5, 6, 9, 20], [2, 100, 101, 250, 400]]
EPS64 = float(np.finfo(np.float64).eps)


def assert_sums_to_one(w):
    assert all(isinstance(x, float) for x in w)
    assert all(math.isfinite(x) for x in w)
    assert abs(math.fsum(w) - 1.0) <= 1e-12
    assert abs(sum(w) - 1.0) <= 1e-12


def brute_force_ema(steps, rate):
    """The EMA of theta(tau) (theta_i on (s_{i-1}, s_i]) updated at every step s_0+1 .. s_{N-1},
    started at theta_0; checkpoints are one-hot vectors, so the result is the coefficients."""
    basis = np.eye(len(steps), dtype=np.float64)
    e = basis[0].copy()
    i = 0
    for tau in range(steps[0] + 1, steps[-1] + 1):
        while steps[i] < tau:
            i += 1
        e = rate * e + (1.0 - rate) * basis[i]
    return e


def riemann_power_ema(steps, gamma, cells_per_unit=20000):
    """int_0^S tau^gamma theta(tau) dtau / int_0^S tau^gamma dtau by the midpoint rule."""
    edges = [0, *steps]
    num = []
    for lo, hi in zip(edges, edges[1:]):
        m = max(1, int((hi - lo) * cells_per_unit))
        mid = lo + (np.arange(m, dtype=np.float64) + 0.5) * ((hi - lo) / m)
        num.append(np.sum(mid ** gamma) * ((hi - lo) / m))
    num = np.array(num)
    return num / num.sum()


# ---------------------------------------------------------------- last, uniform

@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_last_and_uniform(n):
    w = C.last(n)
    assert w == [0.0] * (n - 1) + [1.0]
    u = C.uniform(n)
    assert len(u) == n and all(x == 1.0 / n for x in u)
    assert_sums_to_one(w)
    assert_sums_to_one(u)


# ---------------------------------------------------------------- ema

@pytest.mark.parametrize("steps", STEPS, ids=lambda s: f"steps={s}")
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.9, 0.99, 0.999])
def test_ema_matches_per_step_simulation(steps, rate):
    w = C.ema(steps, rate)
    assert_sums_to_one(w)
    np.testing.assert_allclose(w, brute_force_ema(steps, rate), rtol=0, atol=1e-12)


def test_ema_closed_form():
    # steps [0, 3, 7, 10], rate 1/2: w = [2^-10, (1 - 2^-3) 2^-7, (1 - 2^-4) 2^-3, 1 - 2^-3].
    expected = [2.0 ** -10, 0.875 / 128, 0.9375 / 8, 0.875]
    np.testing.assert_allclose(C.ema([0, 3, 7, 10], 0.5), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("steps", STEPS, ids=lambda s: f"steps={s}")
def test_ema_rate_zero_is_last(steps):
    assert C.ema(steps, 0.0) == C.last(len(steps))
    assert C.ema(steps, 0) == C.last(len(steps))


def test_ema_single_checkpoint():
    assert C.ema([1234], 0.999) == [1.0]
    assert C.ema([0], 0.0) == [1.0]


@pytest.mark.parametrize("rate", C.EMA_STAR_RATES)
def test_ema_long_run_matches_recursion(rate):
    """3000 checkpoints 100 steps apart: the float64 recursion e_i = a e_{i-1} + (1 - a) theta_i
    on coefficient vectors, a = rate^100, agrees with the log-space closed form."""
    steps = list(range(1000, 1000 + 100 * 3000, 100))
    a = rate ** 100
    e = np.zeros(len(steps))
    e[0] = 1.0
    for i in range(1, len(steps)):
        e *= a
        e[i] += 1.0 - a
    w = C.ema(steps, rate)
    assert_sums_to_one(w)
    np.testing.assert_allclose(w, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.99999, 1.0 - 2.0 ** -52])
def test_ema_huge_gaps_stay_finite(rate):
    steps = [0, 10 ** 12, 10 ** 12 + 1, 3 * 10 ** 15, 3 * 10 ** 15 + 7]
    w = C.ema(steps, rate)
    assert_sums_to_one(w)
    assert all(x >= 0.0 for x in w)
    if rate <= 0.99999:  # decays over 1e12 steps wipe out everything but the last two
        assert w[:3] == [0.0, 0.0, 0.0]
        np.testing.assert_allclose(w[3:], [rate ** 7, 1.0 - rate ** 7], rtol=1e-12)


def exact_ema(steps, rate) -> list[Fraction]:
    """ema's closed form in exact rational arithmetic on the float rate: w_0 = rate^(S - s_0),
    w_i = (1 - rate^g_i) rate^(S - s_i); these sum to 1 exactly (the sum telescopes)."""
    r = Fraction(rate)
    end = steps[-1]
    w = [r ** (end - steps[0])]
    w += [(1 - r ** (s - prev)) * r ** (end - s) for prev, s in zip(steps, steps[1:])]
    assert sum(w) == 1
    return w


@pytest.mark.parametrize("rate", [5e-324, 1e-300, 1e-17, 1e-10, 0.3, 0.5, 0.999, 0.999999,
                                  1.0 - 2.0 ** -40])
def test_ema_is_accurate_over_the_whole_range_of_rates(rate):
    """Every coefficient within a few ulps of the exact value. A coefficient is exp(a) for an
    exponent a = log(w) rounded once, which alone costs |a| ulps of w; so the bound is
    8 eps (1 + |log w|) relative, plus the smallest subnormal for coefficients that underflow."""
    steps = [0, 1, 3, 6]
    w = C.ema(steps, rate)
    assert_sums_to_one(w)
    for i, (got, want) in enumerate(zip(w, exact_ema(steps, rate))):
        log_w = -1075 * math.log(2) if float(want) == 0.0 else math.log(float(want))
        bound = Fraction(8 * EPS64 * (1 + abs(log_w))) * want + Fraction(2.0 ** -1074)
        assert abs(Fraction(got) - want) <= bound, (i, got, float(want))


HUGE = 10 ** 400  # a Python int far beyond float64's range


def test_ema_steps_beyond_the_float_range():
    """Steps are Python ints of any size: only gaps enter ema, and a gap past the float range
    decays every rate < 1 to 0, so nothing overflows."""
    assert C.ema([HUGE + s for s in (0, 3, 7, 10)], 0.5) == C.ema([0, 3, 7, 10], 0.5)
    assert C.ema([1, HUGE], 0.9) == [0.0, 1.0]
    assert C.ema([0, 10 ** 300, HUGE], 1.0 - 2.0 ** -53) == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------- power_ema

@pytest.mark.parametrize("steps", STEPS[:2], ids=lambda s: f"steps={s}")
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5, 6.94, 16.97])
def test_power_ema_matches_riemann_sum(steps, gamma):
    w = C.power_ema(steps, gamma=gamma)
    assert_sums_to_one(w)
    np.testing.assert_allclose(w, riemann_power_ema(steps, gamma), rtol=1e-8, atol=1e-10)


def test_power_ema_integrable_singularity():
    # gamma in (-1, 0): tau^gamma blows up at 0, so the midpoint rule converges only as
    # sqrt(cell width); the tolerance reflects that, not the function under test.
    w = C.power_ema([4, 6, 9], gamma=-0.5)
    assert_sums_to_one(w)
    np.testing.assert_allclose(w, riemann_power_ema([4, 6, 9], -0.5), rtol=1e-3)
    # Exact: w_i = sqrt(s_i / 9) - sqrt(s_{i-1} / 9).
    np.testing.assert_allclose(w, [2 / 3, math.sqrt(6) / 3 - 2 / 3, 1 - math.sqrt(6) / 3],
                               rtol=1e-14)


def test_power_ema_gamma_zero_is_step_weighted_average():
    # A flat profile weights each checkpoint by the span it stands for: (s_i - s_{i-1}) / S.
    np.testing.assert_allclose(C.power_ema([2, 5, 10], gamma=0), [0.2, 0.3, 0.5], rtol=1e-15)


def test_power_ema_first_step_zero():
    w = C.power_ema([0, 3, 7, 10], gamma=1.0)
    assert w[0] == 0.0
    np.testing.assert_allclose(w, [0.0, 0.09, 0.4, 0.51], rtol=1e-14)


@pytest.mark.parametrize("gamma", [1.0, 16.97, 50.0, 300.0])
def test_power_ema_scale_invariant_without_overflow(gamma):
    """w depends only on s_i / s_{N-1}; at steps ~1e12 and gamma 300 the powers s^(gamma+1)
    are far beyond float64, so this only passes when they are taken in log space."""
    small = C.power_ema([1, 2, 3, 4], gamma=gamma)
    large = C.power_ema([10 ** 12 * k for k in (1, 2, 3, 4)], gamma=gamma)
    assert_sums_to_one(large)
    np.testing.assert_allclose(large, small, rtol=1e-12, atol=1e-300)


def test_power_ema_steps_beyond_the_float_range():
    """Ratios of steps whose float quotient is 1 - 1e-17 (rounds to 1), 1e-400 (0 in float64)
    or of ints beyond float64 are taken in logs of the ints: w_i = (s_i/S)^a - (s_{i-1}/S)^a."""
    np.testing.assert_allclose(C.power_ema([1, 10 ** 17], gamma=1.0), [1e-34, 1.0], rtol=1e-14)
    # a = 1/2: w_0 = (1e-400)^(1/2) = 1e-200.
    np.testing.assert_allclose(C.power_ema([1, HUGE], gamma=-0.5), [1e-200, 1.0], rtol=1e-13)
    assert C.power_ema([HUGE * k for k in (1, 2, 3, 4)], gamma=16.97) == pytest.approx(
        C.power_ema([1, 2, 3, 4], gamma=16.97), rel=1e-13)
    # The last checkpoint stands for one step in 2e400: weight 1e-400, 0 in float64.
    w = C.power_ema([HUGE, 2 * HUGE - 1, 2 * HUGE], gamma=1.0)
    assert_sums_to_one(w)
    np.testing.assert_allclose(w, [0.25, 0.75, 0.0], rtol=1e-15, atol=0)


def test_power_ema_many_checkpoints():
    steps = list(range(100, 100 * 5001, 100))
    for sigma_rel in (0.05, 0.10):
        w = C.power_ema(steps, sigma_rel=sigma_rel)
        assert_sums_to_one(w)
        assert all(x >= 0.0 for x in w)
        assert np.all(np.diff(w) > 0)  # gamma > 0: later checkpoints weigh more


def test_power_ema_single_checkpoint():
    assert C.power_ema([0], gamma=3.0) == [1.0]
    assert C.power_ema([7], sigma_rel=0.1) == [1.0]


def test_power_ema_sigma_rel_matches_gamma():
    steps = [10, 20, 40, 80]
    gamma = C.sigma_rel_to_gamma(0.05)
    assert C.power_ema(steps, sigma_rel=0.05) == C.power_ema(steps, gamma=gamma)


# ---------------------------------------------------------------- sigma_rel <-> gamma

@pytest.mark.parametrize("sigma_rel,gamma", [(0.10, 6.94), (0.05, 16.97)])
def test_sigma_rel_edm2_values(sigma_rel, gamma):
    # EDM2 quotes sigma_rel = 0.10 <-> gamma ~ 6.94 and 0.05 <-> gamma ~ 16.97 (larger gamma,
    # narrower profile).
    assert C.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=5e-3)
    assert C.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-3)


@pytest.mark.parametrize("sigma_rel", [1e-9, 1e-4, 0.01, 0.05, 0.1, 0.2, 0.29])
def test_sigma_rel_round_trip(sigma_rel):
    gamma = C.sigma_rel_to_gamma(sigma_rel)
    assert gamma > -0.382  # the branch past the peak of sigma_rel(gamma)
    assert C.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    sigma = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))  # EDM2's formula as written
    assert sigma == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("gamma", [-0.3, 0.0, 1.0, 6.94, 16.97, 1e3])
def test_gamma_round_trip(gamma):
    assert C.sigma_rel_to_gamma(C.gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)


# ---------------------------------------------------------------- baselines

def test_baselines():
    steps = [0, 3, 7, 10]
    b = C.baselines(steps)
    assert list(b) == ["last", "uniform", "ema 0.999", "ema 0.9995", "ema 0.9999", "ema 0.999943",
                       "ema 0.99995", "ema 0.99997", "ema 0.99999", "power sigma_rel=0.05",
                       "power sigma_rel=0.1"]
    assert b["power sigma_rel=0.05"] == C.power_ema(steps, sigma_rel=0.05)
    assert b["last"] == C.last(4) and b["uniform"] == C.uniform(4)
    for rate in C.EMA_STAR_RATES:
        assert b[f"ema {rate!r}"] == C.ema(steps, rate)
    for w in b.values():
        assert_sums_to_one(w)


def test_baselines_refuse_a_repeated_power_sigma_rel():
    """Results are keyed by name, so a repeated width would silently stand for one result;
    it is refused as a repeated EMA rate is (numpy scalars and plain floats are the same value)."""
    with pytest.raises(ValueError, match=r"^power_sigma_rels\[2\]: 0\.1 appears twice"):
        C.baselines([1, 2, 3], power_sigma_rels=[0.1, 0.05, np.float64(0.1)])
    with pytest.raises(TypeError, match=r"^power_sigma_rels:"):
        C.baselines([1, 2, 3], power_sigma_rels=0.1)
    b = C.baselines([1, 2, 3], ema_rates=[], power_sigma_rels=np.array([0.05, 0.1]))
    assert list(b) == ["last", "uniform", "power sigma_rel=0.05", "power sigma_rel=0.1"]


def test_baselines_custom_rates_use_float_repr():
    b = C.baselines([1, 2], ema_rates=[np.float64(0.5), 0], power_sigma_rels=[np.float64(0.2)])
    assert list(b) == ["last", "uniform", "ema 0.5", "ema 0.0", "power sigma_rel=0.2"]
    assert b["ema 0.0"] == [0.0, 1.0]


# ---------------------------------------------------------------- difference parametrisation

def test_difference_round_trip():
    w = C.ema([0, 3, 7, 10], 0.9)
    x = C.to_difference(w)
    assert x == w[1:]
    back = C.from_difference(x)
    np.testing.assert_allclose(back, w, rtol=0, atol=1e-15)
    # Coefficients outside the convex hull (LCSC finds negative ones) round-trip as well.
    x = [0.7, -1.25, 2.0, 0.125]
    assert C.to_difference(C.from_difference(x)) == x
    assert C.from_difference(np.array(x)) == C.from_difference(x)
    assert C.from_difference([]) == [1.0]
    assert C.to_difference([1.0]) == []


def test_from_difference_uses_exact_sum():
    # 1e16 + 1 - 1e16 is 0 in naive float64 summation; fsum gives the exact total 1.
    assert C.from_difference([1e16, 1.0, -1e16]) == [0.0, 1e16, 1.0, -1e16]


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call,exc,match", [
    (lambda: C.last(0), ValueError, r"^n:"),
    (lambda: C.uniform(-3), ValueError, r"^n:"),
    (lambda: C.last(2.0), TypeError, r"^n:"),
    (lambda: C.uniform(True), TypeError, r"^n:"),
    (lambda: C.ema([], 0.9), ValueError, r"^steps: empty"),
    (lambda: C.ema([0, 5, 5], 0.9), ValueError, r"^steps\[2\]: .*strictly increasing"),
    (lambda: C.ema([3, 1], 0.9), ValueError, r"^steps\[1\]: .*strictly increasing"),
    (lambda: C.ema([-1, 5], 0.9), ValueError, r"^steps\[0\]: .*non-negative"),
    (lambda: C.ema([0, 1.5], 0.9), TypeError, r"^steps\[1\]:"),
    (lambda: C.ema(7, 0.9), TypeError, r"^steps:"),
    (lambda: C.ema([0, 1], 1.0), ValueError, r"^rate: .*\[0, 1\)"),
    (lambda: C.ema([0, 1], -0.1), ValueError, r"^rate:"),
    (lambda: C.ema([0, 1], float("nan")), ValueError, r"^rate:"),
    (lambda: C.ema([0, 1], "0.9"), TypeError, r"^rate:"),
    (lambda: C.ema([5], 1.5), ValueError, r"^rate:"),  # validated even when N = 1
    (lambda: C.power_ema([1, 2], gamma=-1.0), ValueError, r"^gamma: .*> -1"),
    (lambda: C.power_ema([1, 2], gamma=-3), ValueError, r"^gamma:"),
    (lambda: C.power_ema([1, 2], gamma=float("inf")), ValueError, r"^gamma:"),
    (lambda: C.power_ema([1, 2]), ValueError, r"exactly one of gamma or sigma_rel"),
    (lambda: C.power_ema([1, 2], gamma=1.0, sigma_rel=0.1), ValueError, r"exactly one"),
    (lambda: C.power_ema([1, 2], sigma_rel=0.31), ValueError, r"^sigma_rel: .*0\.3002"),
    (lambda: C.power_ema([1, 2], sigma_rel=0.0), ValueError, r"^sigma_rel:"),
    (lambda: C.power_ema([1, 1], gamma=1.0), ValueError, r"^steps\[1\]:"),
    (lambda: C.sigma_rel_to_gamma(-0.05), ValueError, r"^sigma_rel:"),
    (lambda: C.gamma_to_sigma_rel(-1.5), ValueError, r"^gamma:"),
    (lambda: C.baselines([0, 1], ema_rates=[0.9, 0.9]), ValueError, r"^ema_rates\[1\]: .*twice"),
    (lambda: C.baselines([0, 1], ema_rates=[0.9, 1.0]), ValueError, r"^ema_rates\[1\]:"),
    (lambda: C.baselines([0, 1], ema_rates=0.9), TypeError, r"^ema_rates:"),
    (lambda: C.to_difference([]), ValueError, r"^w: empty"),
    (lambda: C.to_difference([0.5, 0.6]), ValueError, r"^w: sums to"),
    (lambda: C.to_difference([0.5, float("nan")]), ValueError, r"^w\[1\]:"),
    (lambda: C.from_difference([0.5, "a"]), TypeError, r"^x\[1\]:"),
    (lambda: C.from_difference([float("inf")]), ValueError, r"^x\[0\]:"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_inputs_accepted():
    steps = np.array([0, 3, 7, 10], dtype=np.int64)
    assert C.ema(steps, np.float64(0.9)) == C.ema([0, 3, 7, 10], 0.9)
    assert C.power_ema(steps, gamma=np.float32(2.0)) == C.power_ema([0, 3, 7, 10], gamma=2.0)

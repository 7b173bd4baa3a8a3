"""Baseline merging coefficients over saved checkpoints: last, uniform, EMA and power-EMA.

LCSC (ICLR 2025, Sec. 4) merges checkpoints theta_i saved at training steps s_0 < ... < s_{N-1}
as sum_i w_i theta_i with sum_i w_i = 1. The usual averaging schemes are such vectors too, so the
search can start from them and report them as baselines: the last checkpoint, the model soup, the
EMA rates of the paper's EMA* grid (App. E.5, Tab. 14) and EDM2's power-function EMA (Karras et
al. 2024, post-hoc EMA). Every function returns a list of N Python floats computed in float64 that
sums to 1 within 1e-12. Decays and powers are taken in log space, so rates such as 0.99999 over
gaps of 100 steps, steps of 1e12 (or of 1e400: steps are Python ints of any size) or exponents of
100 neither underflow nor overflow.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence

__all__ = [
    "EMA_STAR_RATES", "baselines", "ema", "from_difference", "gamma_to_sigma_rel", "last",
    "power_ema", "sigma_rel_to_gamma", "to_difference", "uniform",
]

# LCSC App. E.5, Tab. 14: the EMA rates of the EMA* grid search.
EMA_STAR_RATES = (0.999, 0.9995, 0.9999, 0.999943, 0.99995, 0.99997, 0.99999)
# EDM2's usual power-function EMA widths (relative standard deviation of the averaging profile).
POWER_SIGMA_RELS = (0.05, 0.10)

# sigma_rel(gamma) rises from 0 at gamma -> -1 to its peak at the root of gamma^2 + 3 gamma + 1
# (where d/dgamma log sigma_rel = 1/(g+1) - 2/(g+2) - 1/(g+3) vanishes), then falls to 0.
_GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # about -0.382
_SIGMA_REL_MAX = math.sqrt((_GAMMA_PEAK + 1) / ((_GAMMA_PEAK + 2) ** 2 * (_GAMMA_PEAK + 3)))
# Gaps between steps past the float range are taken as 2^1000 steps, which changes no result:
# rate^gap is 0 in float64 from about 7e18 steps on for every rate < 1 (|log rate| >= 2^-53).
_GAP_MAX = 2 ** 1000


# ---------------------------------------------------------------- validation helpers

def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{what}: expected an int number of checkpoints, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{what}: got {n}; there must be at least one checkpoint")
    return int(n)


def _check_real(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what}: expected a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what}: got {x}; it must be finite")
    return x


def _check_steps(steps) -> list[int]:
    """steps as Python ints: non-empty, non-negative, strictly increasing."""
    if hasattr(steps, "tolist"):  # numpy arrays, torch tensors
        steps = steps.tolist()
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"steps: expected a sequence of int training steps, got "
                        f"{type(steps).__name__}")
    if len(steps) == 0:
        raise ValueError("steps: empty; pass the training step of every saved checkpoint")
    out = []
    for i, s in enumerate(steps):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"steps[{i}]: expected an int training step, got {type(s).__name__}")
        s = int(s)
        if s < 0:
            raise ValueError(f"steps[{i}]: got {s}; training steps must be non-negative")
        if out and s <= out[-1]:
            raise ValueError(f"steps[{i}]: {s} does not exceed steps[{i - 1}] = {out[-1]}; steps "
                             "must be strictly increasing (one entry per checkpoint, in order)")
        out.append(s)
    return out


def _check_rate(rate, what: str = "rate") -> float:
    rate = _check_real(rate, what)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{what}: got {rate!r}; an EMA rate must lie in [0, 1)")
    return rate


def _check_gamma(gamma) -> float:
    gamma = _check_real(gamma, "gamma")
    if gamma <= -1.0:
        raise ValueError(f"gamma: got {gamma!r}; the power-function profile t^gamma needs "
                         "gamma > -1 to be integrable")
    return gamma


def _check_vector(v, what: str) -> list[float]:
    if hasattr(v, "tolist"):  # numpy arrays, torch tensors
        v = v.tolist()
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"{what}: expected a sequence of numbers, got {type(v).__name__}")
    return [_check_real(x, f"{what}[{i}]") for i, x in enumerate(v)]


def _gap(g: int) -> float:
    """A gap of g steps as a float exponent (see _GAP_MAX)."""
    return float(min(g, _GAP_MAX))


def _log_ratio(num: int, den: int) -> float:
    """log(num / den) for ints 0 < num <= den of any size. Near 1, log1p of the relative gap
    keeps the digits that num / den would round away; far below 1, num / den would lose digits
    under the normal floats (and be 0 under 1e-324), where the logs of the ints take over
    (math.log takes ints of any size)."""
    gap = (den - num) / den  # int / int: correctly rounded, and in [0, 1) here
    if gap <= 0.5:
        return math.log1p(-gap)
    ratio = num / den
    return math.log(ratio) if ratio >= sys.float_info.min else math.log(num) - math.log(den)


def _normalised(w: list[float]) -> list[float]:
    """w / sum(w): the formulas below sum to 1 exactly in real arithmetic, so this only removes
    the float64 rounding that accumulated over N terms."""
    total = math.fsum(w)
    return [x / total for x in w]


# ---------------------------------------------------------------- coefficient vectors

def last(n: int) -> list[float]:
    """The last checkpoint alone: the one-hot vector on checkpoint n - 1."""
    n = _check_count(n, "n")
    return [0.0] * (n - 1) + [1.0]


def uniform(n: int) -> list[float]:
    """The model soup (Wortsman et al. 2022): 1/n on each of n checkpoints."""
    n = _check_count(n, "n")
    return [1.0 / n] * n


def ema(steps: Sequence[int], rate: float) -> list[float]:
    """Coefficients of a per-training-step EMA with `rate`, reconstructed from saved checkpoints.

    The EMA starts at theta_0 (step s_0) and is updated once per training step, e <- rate e +
    (1 - rate) theta (LCSC Sec. 2, "Weight Averaging"). Only checkpoints are known, so the model
    over (s_{i-1}, s_i] is taken to be theta_i, and g_i = s_i - s_{i-1} updates collapse to
        e_i = rate^g_i e_{i-1} + (1 - rate^g_i) theta_i,    e_0 = theta_0.
    Unrolled, e_{N-1} = sum_i w_i theta_i with w_0 = rate^(s_{N-1} - s_0) and
    w_i = (1 - rate^g_i) rate^(s_{N-1} - s_i) for i >= 1.
    """
    steps = _check_steps(steps)
    rate = _check_rate(rate)
    n = len(steps)
    if n == 1:
        return [1.0]
    if rate == 0.0:
        # log(0) = -inf would give 0 * -inf = nan in the exponent of the last term.
        return last(n)
    # log rate to within an ulp over all of (0, 1): near 1, rate - 1 is exact (Sterbenz, rate in
    # [0.5, 1)) and log1p keeps every digit of it; below 1/2, rate - 1 would round rate away
    # (1e-17 - 1 == -1.0), so the plain log of rate itself.
    log_rate = math.log1p(rate - 1.0) if rate >= 0.5 else math.log(rate)
    end = steps[-1]
    w = [math.exp(_gap(end - steps[0]) * log_rate)]
    for prev, s in zip(steps, steps[1:]):
        # 1 - rate^g = -expm1(g log rate) keeps full precision when rate^g is close to 1.
        w.append(math.exp(_gap(end - s) * log_rate) * -math.expm1(_gap(s - prev) * log_rate))
    return _normalised(w)


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2's relative standard deviation of the power-function profile t^gamma (Karras et al.
    2024, post-hoc EMA): sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    gamma = _check_gamma(gamma)
    # In logs, so that gamma near -1 or beyond 1e100 stays accurate and finite.
    return math.exp(0.5 * (math.log1p(gamma) - 2.0 * math.log(gamma + 2.0)
                           - math.log(gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of EDM2's power-function EMA profile with relative width sigma_rel.

    Inverts gamma_to_sigma_rel numerically. sigma_rel(gamma) is not
    monotonic on gamma > -1: it peaks at about 0.3003 (gamma = (sqrt(5) - 3)/2, about -0.382), so
    every smaller value has two solutions. This returns the larger one, the branch on which EDM2
    works (sigma_rel = 0.10 -> gamma ~ 6.94, 0.05 -> gamma ~ 16.97).
    """
    sigma_rel = _check_real(sigma_rel, "sigma_rel")
    if not 0.0 < sigma_rel <= _SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel: got {sigma_rel!r}; a power-function EMA profile has "
                         f"0 < sigma_rel <= {_SIGMA_REL_MAX:.6f}")

    def excess(g):  # log sigma_rel(g) - log sigma_rel: decreasing in g above the peak
        return (0.5 * (math.log1p(g) - 2.0 * math.log(g + 2.0) - math.log(g + 3.0))
                - math.log(sigma_rel))

    lo, hi = _GAMMA_PEAK, 1.0
    while excess(hi) > 0.0:  # sigma_rel ~ 1/gamma for large gamma, so this ends quickly
        lo, hi = hi, 2.0 * hi
    # Bisection down to adjacent floats: robust, and cheap (a few dozen halvings per binade).
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if excess(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return hi if abs(excess(hi)) <= abs(excess(lo)) else lo


def power_ema(steps: Sequence[int], gamma: float | None = None,
              sigma_rel: float | None = None) -> list[float]:
    """Coefficients of EDM2's power-function EMA at the last saved step (Karras et al. 2024,
    post-hoc EMA): theta_hat(t) = int_0^t tau^gamma theta(tau) dtau / int_0^t tau^gamma dtau.

    theta(tau) is taken piecewise constant, theta_0 on [0, s_0] and theta_i on (s_{i-1}, s_i], so
    w_i = (s_i^(gamma+1) - s_{i-1}^(gamma+1)) / s_{N-1}^(gamma+1), with s_{-1} = 0. Give exactly
    one of gamma (> -1) or sigma_rel (EDM2's relative width, e.g. 0.05 or 0.10; see
    sigma_rel_to_gamma).
    """
    steps = _check_steps(steps)
    if (gamma is None) == (sigma_rel is None):
        raise ValueError("power_ema: give exactly one of gamma or sigma_rel (got "
                         f"gamma={gamma!r}, sigma_rel={sigma_rel!r})")
    gamma = sigma_rel_to_gamma(sigma_rel) if gamma is None else _check_gamma(gamma)
    if len(steps) == 1:
        return [1.0]  # also covers steps == [0], where the integral is empty
    a = gamma + 1.0  # exact and > 0 for every float gamma > -1
    end = steps[-1]
    w = []
    prev = 0
    for s in steps:
        if s == 0:
            w.append(0.0)  # only steps[0] can be 0: theta_0 then holds on a null set
        elif prev == 0:
            w.append(math.exp(a * _log_ratio(s, end)))
        else:
            # (s/end)^a (1 - (prev/s)^a), each power taken from its log.
            w.append(math.exp(a * _log_ratio(s, end)) * -math.expm1(a * _log_ratio(prev, s)))
        prev = s
    return _normalised(w)


def baselines(steps: Sequence[int], ema_rates: Sequence[float] = EMA_STAR_RATES,
              power_sigma_rels: Sequence[float] = POWER_SIGMA_RELS) -> dict[str, list[float]]:
    """The baseline coefficient vectors of LCSC's comparisons (Sec. 5, App. E.5): "last",
    "uniform", one "ema <rate>" per rate (the paper's EMA* grid by default), and one
    "power sigma_rel=<s>" per EDM2 power-function EMA width (EDM2's 0.05 and 0.10 by
    default). Each rate and width is listed once: a repeated one is refused, since its name
    would stand for one result only."""
    steps = _check_steps(steps)
    if isinstance(ema_rates, (str, bytes)) or not isinstance(ema_rates, Sequence):
        raise TypeError(f"ema_rates: expected a sequence of EMA rates, got "
                        f"{type(ema_rates).__name__}")
    out = {"last": last(len(steps)), "uniform": uniform(len(steps))}
    for i, rate in enumerate(ema_rates):
        # float() first: numpy scalars' repr would otherwise leak into the name.
        rate = _check_rate(rate, f"ema_rates[{i}]")
        name = f"ema {rate!r}"
        if name in out:
            raise ValueError(f"ema_rates[{i}]: {rate!r} appears twice; list each rate once")
        out[name] = ema(steps, rate)
    for i, sigma_rel in enumerate(_check_vector(power_sigma_rels, "power_sigma_rels")):
        name = f"power sigma_rel={sigma_rel!r}"
        if name in out:  # one name per value: a second result would replace the first
            raise ValueError(f"power_sigma_rels[{i}]: {sigma_rel!r} appears twice; list each "
                             "sigma_rel once")
        out[name] = power_ema(steps, sigma_rel=sigma_rel)
    return out


# ---------------------------------------------------------------- difference parametrisation

def to_difference(w: Sequence[float]) -> list[float]:
    """The difference coordinates x of coefficients w (LCSC Sec. 4.2 (a), App. E.6):
    theta = theta_0 + sum_{i>=1} x_i (theta_i - theta_0), i.e. x = w[1:]. w must sum to 1
    (within 1e-6, relative to sum |w_i|), since x cannot express any other total."""
    w = _check_vector(w, "w")
    if not w:
        raise ValueError("w: empty; there must be one coefficient per checkpoint")
    total = math.fsum(w)
    # Loose enough for coefficients that went through float32; tight enough to catch a vector
    # that was never normalised, whose first entry x would silently drop.
    if abs(total - 1.0) > 1e-6 * max(1.0, math.fsum(abs(x) for x in w)):
        raise ValueError(f"w: sums to {total!r}, not 1; the difference parametrisation only "
                         "represents coefficients that sum to 1, so normalise w first")
    return w[1:]


def from_difference(x: Sequence[float]) -> list[float]:
    """Coefficients w from difference coordinates x (inverse of to_difference):
    w = [1 - sum(x)] + x, N = len(x) + 1; empty x gives [1.0]."""
    x = _check_vector(x, "x")
    return [1.0 - math.fsum(x)] + x

"""lcsc_fast.search: the LCSC coefficient search (paper Sec. 4, App. E).

* The synthetic problem: N = 12 checkpoints approaching the minimum theta* of a mildly
  ill-conditioned quadratic bowl U(theta) = sum_j a_j (theta_j - theta*_j)^2 without reaching
  it, so the best merge lies outside their convex hull. The best value over the affine hull is
  computed exactly (weighted least squares in the difference parametrisation, float64); both
  algorithms must beat every baseline, close at least 90% of the best baseline's gap to that
  optimum, and return a coefficient vector with a negative entry.
* Determinism for a seed (and independence from the global RNGs); different seeds differ.
* A search killed mid-way (by an exception from the objective, or KeyboardInterrupt) and
  restarted with the same state_path ends with exactly the uninterrupted result, history file
  included; a state file of a search with other arguments is refused and left untouched.
* NaN / infinite scores count as the worst and are logged; an objective that is never finite
  still completes (all candidates worst: a finite coefficient vector with a non-finite score).
* Baselines: last, uniform, the paper's EMA* grid, "ema*" and EDM2's power-function EMA at
  two widths, each scored by the objective.
* Inputs: a list of state dicts or a lcsc_fast.Trajectory (safetensors files, a recorded
  directory with its steps); the target an nn.Module or a dict of tensors. Bad arguments raise
  before the objective is ever called.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import lcsc_fast
from conftest import generator, param, randn
from lcsc_fast import Trajectory, merge_into, reference

ALGORITHMS = ("lcsc", "cmaes")
EMA_GRID = (0.999, 0.9995, 0.9999, 0.999943, 0.99995, 0.99997, 0.99999)  # App. E.5, Tab. 14
EPS32 = float(torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------- the synthetic problem

class Bowl:
    """N float32 checkpoints theta_i = theta* + u_i d1 + u_i^2 d2 + noise_i with
    u_i = 1 - i/(N+3), and U(theta) = sum_j a_j (theta_j - theta*_j)^2, a_j in [1/5, 5].

    The checkpoints move towards theta* but stop short of it (u > 0), along a curved path (the
    u^2 term), with a little noise, like a training run that has not converged: the best merge
    extrapolates past the last checkpoint, out of the convex hull. The curved path and the
    noise make the affine-hull optimum a fit of several directions, not a 1-D extrapolation.
    Steps are 1000, 2000, ...: the EMA rates of the paper's grid then span "nearly the last
    checkpoint" (0.999) to "nearly uniform" (0.99999).
    """

    SHAPES: ClassVar[dict] = {"w": (16, 24), "b": (24,), "s": (5, 7)}  # 443 elements in all

    def __init__(self, n: int = 12, seed: int = 0, noise: float = 0.05, kappa: float = 25.0):
        rng = np.random.default_rng(seed)
        size = sum(math.prod(s) for s in self.SHAPES.values())
        star = rng.standard_normal(size)
        self.a_np = np.exp(rng.uniform(-0.5 * math.log(kappa), 0.5 * math.log(kappa), size))
        d1, d2 = rng.standard_normal(size), rng.standard_normal(size)
        flats = []
        for i in range(n):
            u = 1.0 - i / (n + 3)
            flats.append((star + u * d1 + u * u * d2
                          + noise * rng.standard_normal(size)).astype(np.float32))
        self.n = n
        self.steps = [1000 * (i + 1) for i in range(n)]
        self.checkpoints = [self._unflatten(torch.from_numpy(f)) for f in flats]
        self.star_np = star
        self.star = torch.from_numpy(star)
        self.a = torch.from_numpy(self.a_np)
        self.calls = 0
        # The exact optimum over the affine hull, from the checkpoints as stored (float32).
        th = np.stack(flats).astype(np.float64)
        diffs = (th[1:] - th[0]).T  # [size, N-1]
        sqrt_a = np.sqrt(self.a_np)
        x, *_ = np.linalg.lstsq(sqrt_a[:, None] * diffs, sqrt_a * (star - th[0]), rcond=None)
        self.optimum_coefficients = [1.0 - float(x.sum()), *map(float, x)]
        self.optimum = self.value(th[0] + diffs @ x)

    def _unflatten(self, flat: torch.Tensor) -> dict:
        out, k = {}, 0
        for name, shape in self.SHAPES.items():
            m = math.prod(shape)
            out[name] = flat[k:k + m].reshape(shape).clone()
            k += m
        return out

    def value(self, theta: np.ndarray) -> float:
        return float((self.a_np * (theta - self.star_np) ** 2).sum())

    def objective(self, target) -> float:
        self.calls += 1
        flat = torch.cat([target[k].detach().reshape(-1) for k in self.SHAPES]).double()
        return float((self.a * (flat - self.star) ** 2).sum())

    def target(self) -> dict:
        return {k: torch.zeros(s) for k, s in self.SHAPES.items()}


def run(bowl: Bowl, target=None, objective=None, **kwargs):
    """lcsc_fast.search on the bowl (its steps, progress off), returning (result, target)."""
    target = bowl.target() if target is None else target
    kwargs.setdefault("steps", bowl.steps)
    kwargs.setdefault("progress", False)
    result = lcsc_fast.search(bowl.checkpoints, objective or bowl.objective, target, **kwargs)
    return result, target


def as_json(result) -> str:
    """Everything a result holds, as exact text (floats by repr, NaN and inf included)."""
    return json.dumps({"coefficients": result.coefficients, "score": result.score,
                       "history": result.history, "baselines": result.baselines,
                       "baseline_coefficients": result.baseline_coefficients,
                       "evaluations": result.evaluations}, sort_keys=True)


def evaluations_to_reach(history, threshold: float):
    """The first evaluation whose best_score is <= threshold (None if never)."""
    for entry in history:
        if entry["best_score"] <= threshold:
            return entry["evaluation"]
    return None


def assert_well_formed(result, budget: int, n: int) -> None:
    """The invariants every result satisfies, whatever the objective."""
    assert result.evaluations == budget
    assert len(result.history) == budget
    assert [e["evaluation"] for e in result.history] == list(range(1, budget + 1))
    w = result.coefficients
    assert len(w) == n and all(isinstance(c, float) and math.isfinite(c) for c in w)
    assert abs(math.fsum(w) - 1.0) <= 1e-9
    assert isinstance(result.score, float)
    # best_score is the running minimum of the scores (non-finite ones counting as the worst),
    # and the result's score is the last best_score.
    best = math.inf
    for e in result.history:
        s = e["score"]
        if math.isfinite(s):
            best = min(best, s)
            assert e["best_score"] == best, e
        elif math.isfinite(best):
            assert e["best_score"] == best, e
        else:
            assert not math.isfinite(e["best_score"]), e
    assert json.dumps(result.score) == json.dumps(result.history[-1]["best_score"])
    json.dumps(result.history)  # plain JSON types only


def assert_holds_merge(target, checkpoints, coeffs) -> None:
    """target's floating tensors equal sum_i coeffs[i] theta_i within the a-priori bound of a
    float32 accumulation over N terms: (N + 2) eps32 sum_i |coeffs[i]| |theta_i| per element."""
    state = target.state_dict() if isinstance(target, nn.Module) else target
    ref = reference.merge(checkpoints, coeffs)
    for name, t in state.items():
        mag = sum(abs(c) * ck[name].double().abs() for c, ck in zip(coeffs, checkpoints))
        bound = (len(coeffs) + 2) * EPS32 * mag + 1e-30
        err = (t.detach().double() - ref[name]).abs()
        assert bool((err <= bound).all()), f"{name}: error {float(err.max()):.3e}"


@pytest.fixture(scope="module")
def bowl() -> Bowl:
    return Bowl()


# ---------------------------------------------------------------- 1. the synthetic problem

def test_the_bowl_optimum_lies_outside_the_convex_hull(bowl):
    """The problem is what it claims: the affine-hull optimum has negative coefficients and is
    far better than any checkpoint."""
    w = bowl.optimum_coefficients
    assert abs(math.fsum(w) - 1.0) < 1e-9
    assert min(w) < -0.1
    merged = sum(c * ck_flat for c, ck_flat in zip(
        w, (np.concatenate([ck[k].double().numpy().reshape(-1) for k in Bowl.SHAPES])
            for ck in bowl.checkpoints)))
    assert bowl.value(merged) == pytest.approx(bowl.optimum, rel=1e-9)
    best_checkpoint = min(bowl.objective(ck) for ck in bowl.checkpoints)
    assert bowl.optimum < 0.2 * best_checkpoint


SYNTHETIC_BUDGET = 1500


@pytest.mark.parametrize("seed", param("seed", range(3)))
@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_search_beats_every_baseline_and_approaches_the_optimum(bowl, algorithm, seed):
    result, target = run(bowl, budget=SYNTHETIC_BUDGET, algorithm=algorithm, seed=seed)
    assert_well_formed(result, SYNTHETIC_BUDGET, bowl.n)
    best_baseline = min(result.baselines.values())
    gap = best_baseline - bowl.optimum
    summary = (f"{algorithm} seed {seed}: score {result.score:.4f}, optimum {bowl.optimum:.4f}, "
               f"best baseline {best_baseline:.4f}")
    # (a) better than every baseline, last checkpoint and EMA* included
    assert result.score < best_baseline, summary
    # no better than the exact optimum, up to float32 rounding of the merge
    assert result.score >= bowl.optimum * (1 - 1e-5), summary
    # (b) at least 90% of the way from the best baseline to the optimum
    assert result.score - bowl.optimum <= 0.1 * gap, summary
    # (c) outside the convex hull of the checkpoints
    assert min(result.coefficients) < 0, result.coefficients
    # the target holds the best merge, and scores what the result says
    assert_holds_merge(target, bowl.checkpoints, result.coefficients)
    assert bowl.objective(target) == pytest.approx(result.score, rel=1e-6)


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_two_checkpoints(algorithm):
    """N = 2, the smallest search: one difference coefficient, the optimum far outside [0, 1]."""
    bowl = Bowl(n=2)
    assert min(bowl.optimum_coefficients) < -1
    result, target = run(bowl, budget=400, algorithm=algorithm, seed=0)
    assert_well_formed(result, 400, 2)
    gap = min(result.baselines.values()) - bowl.optimum
    assert result.score - bowl.optimum <= 0.01 * gap
    assert_holds_merge(target, bowl.checkpoints, result.coefficients)


# ---------------------------------------------------------------- 2. determinism

@pytest.fixture
def restore_global_rngs():
    """The global torch, numpy and random states are put back after the test."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


@pytest.mark.usefixtures("restore_global_rngs")
@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_same_seed_same_result_different_seed_different_result(bowl, algorithm):
    runs = []
    for global_seed in (1, 2):  # the global RNGs must not matter
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        random.seed(global_seed)
        result, target = run(bowl, budget=150, algorithm=algorithm, seed=7)
        runs.append((as_json(result), [t.clone() for t in target.values()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    other, _ = run(bowl, budget=150, algorithm=algorithm, seed=8)
    first = json.loads(runs[0][0])
    assert other.coefficients != first["coefficients"]
    assert [e["score"] for e in other.history] != [e["score"] for e in first["history"]]
    # the baselines do not depend on the seed
    assert other.baselines == first["baselines"]


def test_the_algorithms_differ(bowl):
    lcsc, _ = run(bowl, budget=60, algorithm="lcsc", seed=0)
    cma, _ = run(bowl, budget=60, algorithm="cmaes", seed=0)
    assert lcsc.baselines == cma.baselines
    assert [e["score"] for e in lcsc.history] != [e["score"] for e in cma.history]


# ---------------------------------------------------------------- history and budget

@pytest.mark.parametrize("budget", param("budget", (1, 5, 17, 40)))
@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_budget_counts_the_search_evaluations(bowl, algorithm, budget):
    """Exactly `budget` evaluations, whether or not it is a whole number of generations; the
    baselines are scored once each, on top."""
    bowl.calls = 0
    result, target = run(bowl, budget=budget, algorithm=algorithm, seed=3)
    assert_well_formed(result, budget, bowl.n)
    baseline_evaluations = bowl.calls - budget
    assert 1 <= baseline_evaluations <= len(result.baselines)
    assert result.score == min(e["score"] for e in result.history)
    assert_holds_merge(target, bowl.checkpoints, result.coefficients)


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_history_file_holds_the_history(bowl, tmp_path, algorithm):
    path = tmp_path / "history.jsonl"
    path.write_text('{"stale": "line from an earlier run"}\n')  # replaced, not appended to
    result, _ = run(bowl, budget=50, algorithm=algorithm, seed=0, history_path=path)
    lines = path.read_text().splitlines()
    assert len(lines) == 50
    assert json.dumps([json.loads(line) for line in lines]) == json.dumps(result.history)
    for entry in result.history:
        assert {"evaluation", "score", "best_score"} <= entry.keys()


def test_progress_bar(bowl, capsys):
    quiet, _ = run(bowl, budget=30, seed=0)
    assert capsys.readouterr().err == ""
    shown, _ = run(bowl, budget=30, seed=0, progress=True)
    assert capsys.readouterr().err != ""
    assert as_json(shown) == as_json(quiet)


def test_progress_bar_by_default_and_off_on_request(bowl, capsys):
    """A search shows a tqdm bar (evaluations, best score, rate) unless progress=False."""
    result = lcsc_fast.search(bowl.checkpoints, bowl.objective, bowl.target(), budget=20,
                              steps=bowl.steps)
    assert result.evaluations == 20
    assert "LCSC search" in capsys.readouterr().err
    lcsc_fast.search(bowl.checkpoints, bowl.objective, bowl.target(), budget=20,
                     steps=bowl.steps, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 3. resuming

class Killed(Exception):
    """Stands in for the process dying in the middle of an evaluation."""


def dies_after(objective, calls: int, exc=Killed):
    """objective for `calls` calls, then raises exc on every call."""
    count = 0

    def wrapped(target):
        nonlocal count
        count += 1
        if count > calls:
            raise exc()
        return objective(target)

    return wrapped


RESUME_BUDGET = 100


LARGEST_GENERATION = 16  # lcsc's default population; cmaes's default for N = 12 is 11


@pytest.fixture(scope="module")
def uninterrupted(bowl, tmp_path_factory):
    """algorithm -> (result as JSON, history file text, objective calls) of an uninterrupted
    run, seed 5."""
    out = {}
    for algorithm in ALGORITHMS:
        path = tmp_path_factory.mktemp("reference") / "history.jsonl"
        bowl.calls = 0
        result, _ = run(bowl, budget=RESUME_BUDGET, algorithm=algorithm, seed=5,
                        history_path=path)
        out[algorithm] = (as_json(result), path.read_text(), bowl.calls)
    return out


def resume_args(tmp_path, algorithm):
    return {"budget": RESUME_BUDGET, "algorithm": algorithm, "seed": 5,
            "state_path": tmp_path / "search.state", "history_path": tmp_path / "history.jsonl"}


def assert_matches_uninterrupted(result, args, reference_run) -> None:
    ref_json, ref_text, _ = reference_run
    assert as_json(result) == ref_json
    assert args["history_path"].read_text() == ref_text


# Calls of the killed run: 9 baselines come first (last, uniform, 7 EMA rates), then the search.
# 3: during the baselines (no state yet); 30: in the second generation; 41 and 42: at the ends of
# two whole generations of lcsc (16 each) and cmaes (11 each: 4 + floor(3 ln 11)) respectively,
# if the baselines take 9 calls; 95: in the last generation.
@pytest.mark.parametrize("kill_at", param("kill_at", (3, 30, 41, 42, 95)))
@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_killed_search_resumes_to_the_uninterrupted_result(bowl, tmp_path, uninterrupted,
                                                           algorithm, kill_at):
    args = resume_args(tmp_path, algorithm)
    with pytest.raises(Killed):
        run(bowl, objective=dies_after(bowl.objective, kill_at), **args)
    # The state was written through a temporary file and renamed: nothing else is left behind.
    assert set(os.listdir(tmp_path)) <= {"search.state", "history.jsonl"}
    bowl.calls = 0
    result, target = run(bowl, **args)
    assert_matches_uninterrupted(result, args, uninterrupted[algorithm])
    assert_holds_merge(target, bowl.checkpoints, result.coefficients)
    # The restart continued from the state saved after the last whole generation: it redid at
    # most one generation's evaluations, not the whole search.
    total = uninterrupted[algorithm][2]
    searched = max(0, kill_at - (total - RESUME_BUDGET))  # search evaluations before the kill
    assert bowl.calls <= total - searched + LARGEST_GENERATION, (bowl.calls, total, searched)


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_keyboard_interrupt_then_resume(bowl, tmp_path, uninterrupted, algorithm):
    args = resume_args(tmp_path, algorithm)
    with pytest.raises(KeyboardInterrupt):
        run(bowl, objective=dies_after(bowl.objective, 60, KeyboardInterrupt), **args)
    result, _ = run(bowl, **args)
    assert_matches_uninterrupted(result, args, uninterrupted[algorithm])


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_killed_twice_then_resume(bowl, tmp_path, uninterrupted, algorithm):
    args = resume_args(tmp_path, algorithm)
    for kill_at in (37, 29):
        with pytest.raises(Killed):
            run(bowl, objective=dies_after(bowl.objective, kill_at), **args)
    result, _ = run(bowl, **args)
    assert_matches_uninterrupted(result, args, uninterrupted[algorithm])


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_restarting_a_finished_search_gives_its_result(bowl, tmp_path, uninterrupted,
                                                       algorithm):
    args = resume_args(tmp_path, algorithm)
    first, _ = run(bowl, **args)
    assert_matches_uninterrupted(first, args, uninterrupted[algorithm])
    again, _ = run(bowl, **args)
    assert_matches_uninterrupted(again, args, uninterrupted[algorithm])


def _other_seed(bowl, args):
    args["seed"] = 6


def _other_algorithm(bowl, args):
    args["algorithm"] = "cmaes"


def _other_option(bowl, args):
    args["sigma"] = 0.2


def _other_steps(bowl, args):
    args["steps"] = [s + 1 for s in bowl.steps]


MISMATCHES = {"seed": _other_seed, "algorithm": _other_algorithm, "option": _other_option,
              "steps": _other_steps, "checkpoints": None}


@pytest.mark.parametrize("mismatch", param("mismatch", MISMATCHES))
def test_state_of_another_search_is_refused(bowl, tmp_path, uninterrupted, mismatch):
    args = resume_args(tmp_path, "lcsc")
    with pytest.raises(Killed):
        run(bowl, objective=dies_after(bowl.objective, 50), **args)
    state_bytes = args["state_path"].read_bytes()
    history_bytes = args["history_path"].read_bytes()

    other = dict(args)
    bowl.calls = 0
    if mismatch == "checkpoints":  # 11 of the 12 checkpoints
        call = lambda: lcsc_fast.search(bowl.checkpoints[1:], bowl.objective, bowl.target(),
                                        steps=bowl.steps[1:], progress=False, **other)
    else:
        MISMATCHES[mismatch](bowl, other)
        call = lambda: run(bowl, **other)
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert re.search(r"(?i)state", message), message
    assert re.search(r"(?i)other|different|differ|mismatch|match", message), message
    assert bowl.calls == 0, "the objective was called before the state file was checked"
    assert args["state_path"].read_bytes() == state_bytes
    assert args["history_path"].read_bytes() == history_bytes

    # The refused attempt changed nothing: the original search still resumes correctly.
    result, _ = run(bowl, **args)
    assert_matches_uninterrupted(result, args, uninterrupted["lcsc"])


def test_a_file_that_is_no_state_is_refused(bowl, tmp_path):
    path = tmp_path / "search.state"
    path.write_bytes(b"these are not the bytes of a search state\n")
    bowl.calls = 0
    with pytest.raises(ValueError, match=re.escape(str(path))):
        run(bowl, budget=20, state_path=path)
    assert path.read_bytes() == b"these are not the bytes of a search state\n"
    assert bowl.calls == 0


# ---------------------------------------------------------------- 4. NaN and infinite scores

def sometimes(objective, value: float, every: int = 5):
    """objective, except that every `every`-th call returns `value`."""
    count = 0

    def wrapped(target):
        nonlocal count
        count += 1
        score = objective(target)
        return value if count % every == 0 else score

    return wrapped


@pytest.mark.parametrize("bad", param("bad", (math.nan, math.inf, -math.inf)))
@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_non_finite_scores_are_the_worst_and_logged(bowl, caplog, algorithm, bad):
    caplog.set_level(logging.DEBUG, logger="lcsc_fast.search")
    result, target = run(bowl, objective=sometimes(bowl.objective, bad), budget=200,
                         algorithm=algorithm, seed=0)
    assert_well_formed(result, 200, bowl.n)
    bad_entries = [e for e in result.history if not math.isfinite(e["score"])]
    assert 30 <= len(bad_entries) <= 50  # every 5th of 200 + baselines calls
    # never the best, -inf included
    assert math.isfinite(result.score)
    assert all(math.isfinite(e["best_score"]) for e in result.history[1:])
    assert result.score == min(e["score"] for e in result.history if math.isfinite(e["score"]))
    assert bowl.objective(target) == pytest.approx(result.score, rel=1e-6)
    records = [r for r in caplog.records if r.name == "lcsc_fast.search"]
    word = "nan" if math.isnan(bad) else "inf"
    assert any(word in r.getMessage().lower() for r in records), [r.getMessage() for r in records]


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_an_objective_that_is_never_finite(bowl, caplog, algorithm):
    """Every candidate is the worst: the search still spends its budget and returns a finite
    coefficient vector (summing to 1, merged into the target) whose score is not finite."""
    caplog.set_level(logging.DEBUG, logger="lcsc_fast.search")
    result, target = run(bowl, objective=lambda t: math.nan, budget=40, algorithm=algorithm,
                         seed=0)
    assert_well_formed(result, 40, bowl.n)
    assert not math.isfinite(result.score)
    assert all(not math.isfinite(v) for v in result.baselines.values())
    assert all(not math.isfinite(e["score"]) for e in result.history)
    assert_holds_merge(target, bowl.checkpoints, result.coefficients)
    assert any(r.name == "lcsc_fast.search" for r in caplog.records)


# ---------------------------------------------------------------- 5. baselines

def test_baselines_are_the_papers_and_scored_by_the_objective(bowl):
    result, _ = run(bowl, budget=10, seed=0)
    names = set(result.baselines)
    assert set(result.baseline_coefficients) == names
    ema_names = {k for k in names if k.startswith("ema ")}
    assert {"last", "uniform", "ema*"} <= names
    assert names == {"last", "uniform", "ema*", "power sigma_rel=0.05",
                     "power sigma_rel=0.1"} | ema_names
    assert sorted(float(k[4:]) for k in ema_names) == sorted(EMA_GRID)

    n = bowl.n
    w = result.baseline_coefficients
    assert w["last"] == [0.0] * (n - 1) + [1.0]
    assert w["uniform"] == pytest.approx([1.0 / n] * n, rel=1e-12)
    for name, coeffs in w.items():
        assert len(coeffs) == n and abs(math.fsum(coeffs) - 1.0) <= 1e-9, name
    by_rate = sorted(ema_names, key=lambda k: float(k[4:]))
    for name in by_rate:
        coeffs = w[name]
        assert min(coeffs) >= 0, name
        assert coeffs[-1] == max(coeffs[1:]), name  # the newest checkpoint weighs most
    # a slower EMA spreads its weight: the last checkpoint's share falls as the rate rises
    lasts = [w[k][-1] for k in by_rate]
    assert all(a > b for a, b in itertools.pairwise(lasts)), lasts
    # ema* is the best of the grid
    best = min(ema_names, key=lambda k: result.baselines[k])
    assert result.baselines["ema*"] == result.baselines[best]
    assert w["ema*"] == w[best]

    # Every score is the objective's value of that merge.
    for name in ("last", "uniform", by_rate[0], by_rate[-1], "ema*"):
        target = bowl.target()
        merge_into(target, bowl.checkpoints, w[name])
        assert result.baselines[name] == pytest.approx(bowl.objective(target), rel=1e-6), name
    assert result.baselines["last"] == pytest.approx(bowl.objective(bowl.checkpoints[-1]),
                                                     rel=1e-6)


def test_steps_shape_the_ema_baselines(bowl):
    default, _ = run(bowl, budget=5, steps=None)
    counted, _ = run(bowl, budget=5, steps=list(range(bowl.n)))
    spaced, _ = run(bowl, budget=5)  # 1000, 2000, ...
    assert counted.baseline_coefficients == default.baseline_coefficients
    assert spaced.baseline_coefficients["ema 0.999"] != default.baseline_coefficients["ema 0.999"]
    assert spaced.baseline_coefficients["last"] == default.baseline_coefficients["last"]


# ---------------------------------------------------------------- 6. trajectories and targets

class Tiny:
    """A tiny Linear(4, 3) regression: checkpoints theta_i = theta* + (1 - i/(N+3)) d + noise."""

    N = 6

    def __init__(self):
        g = generator("search", "tiny")
        self.x = randn((16, 4), torch.float32, g)
        teacher = {"weight": randn((3, 4), torch.float32, g), "bias": randn(3, torch.float32, g)}
        self.y = F.linear(self.x, teacher["weight"], teacher["bias"])
        d = {k: randn(v.shape, torch.float32, g) for k, v in teacher.items()}
        self.checkpoints = [
            {k: v + (1 - i / (self.N + 3)) * d[k] + randn(v.shape, torch.float32, g, scale=0.05)
             for k, v in teacher.items()}
            for i in range(self.N)]
        self.seen = set()

    def objective(self, target) -> float:
        self.seen.add(id(target))
        with torch.no_grad():
            if isinstance(target, nn.Module):
                out = target(self.x)
            else:
                out = F.linear(self.x, target["weight"], target["bias"])
        return float(((out - self.y) ** 2).mean())

    def target(self, kind: str):
        if kind == "module":
            net = nn.Linear(4, 3)
            with torch.no_grad():
                net.weight.zero_()
                net.bias.zero_()
            return net
        return {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}

    def write(self, folder) -> list[str]:
        paths = []
        for i, ck in enumerate(self.checkpoints):
            path = os.path.join(folder, f"ck{i}.safetensors")
            save_file(ck, path)
            paths.append(path)
        return paths


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_trajectory_and_state_dicts_module_and_dict_targets(tmp_path, algorithm):
    tiny = Tiny()
    paths = tiny.write(tmp_path)
    results = {}
    with Trajectory.open(paths) as traj:
        assert len(traj) == Tiny.N
        for source in ("list", "trajectory"):
            for kind in ("dict", "module"):
                checkpoints = traj if source == "trajectory" else tiny.checkpoints
                target = tiny.target(kind)
                tiny.seen.clear()
                result = lcsc_fast.search(checkpoints, tiny.objective, target, budget=60,
                                          algorithm=algorithm, seed=1, progress=False)
                assert tiny.seen == {id(target)}, "the objective must be given the target"
                assert_well_formed(result, 60, Tiny.N)
                assert result.score < min(result.baselines.values())
                assert_holds_merge(target, tiny.checkpoints, result.coefficients)
                assert tiny.objective(target) == pytest.approx(result.score, rel=1e-6)
                results[source, kind] = as_json(result)
    # Merges from the files equal merges of the loaded state dicts, and a module scores as its
    # state dict does: the four searches are the same search.
    assert len(set(results.values())) == 1, results.keys()


def test_module_target_keeps_its_storage(tmp_path):
    tiny = Tiny()
    net = tiny.target("module")
    before = {k: (v, v.data_ptr()) for k, v in net.state_dict(keep_vars=True).items()}
    lcsc_fast.search(tiny.checkpoints, tiny.objective, net, budget=20, progress=False)
    after = net.state_dict(keep_vars=True)
    for k, (t, ptr) in before.items():
        assert after[k] is t and after[k].data_ptr() == ptr, k


def test_a_recorded_trajectory_brings_its_steps(tmp_path):
    """steps default to trajectory.steps: a recorded run's EMA baselines follow its steps."""
    tiny = Tiny()
    steps = [500 * (i + 1) for i in range(Tiny.N)]
    snapshots = []
    for step, ck in zip(steps, tiny.checkpoints):
        name = f"step-{step:08d}.safetensors"
        save_file(ck, str(tmp_path / name), metadata={"step": str(step),
                                                      "format": "lcsc_fast.snapshot"})
        snapshots.append({"step": step, "file": name,
                          "nbytes": (tmp_path / name).stat().st_size})
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "lcsc_fast.trajectory", "version": 1, "every": 500, "snapshots": snapshots}))
    with Trajectory.open(tmp_path) as traj:
        assert list(traj.steps) == steps
        recorded = lcsc_fast.search(traj, tiny.objective, tiny.target("dict"), budget=20,
                                    progress=False)
    listed = lcsc_fast.search(tiny.checkpoints, tiny.objective, tiny.target("dict"), budget=20,
                              steps=steps, progress=False)
    unspaced = lcsc_fast.search(tiny.checkpoints, tiny.objective, tiny.target("dict"),
                                budget=20, progress=False)
    assert as_json(recorded) == as_json(listed)
    assert recorded.baseline_coefficients != unspaced.baseline_coefficients


# ---------------------------------------------------------------- 7. bad inputs

def _search_with(**changes):
    """A call of search on the bowl with `changes` to its arguments (checkpoints included)."""
    def call(bowl, target, tmp_path):
        args = {"trajectory": bowl.checkpoints, "objective": bowl.objective, "target": target,
                "budget": 20, "algorithm": "lcsc", "seed": 0, "progress": False,
                "steps": bowl.steps, "state_path": tmp_path / "search.state",
                "history_path": tmp_path / "h.jsonl"}
        args.update(changes)
        if callable(args["trajectory"]):
            args["trajectory"] = args["trajectory"](bowl)
        if callable(args["steps"]):
            args["steps"] = args["steps"](bowl)
        return lcsc_fast.search(**args)
    return call


BAD_INPUTS = [
    ("budget 0", ValueError, r"budget", _search_with(budget=0)),
    ("budget -3", ValueError, r"budget", _search_with(budget=-3)),
    ("unknown algorithm", ValueError, r"algorithm|'ga'", _search_with(algorithm="ga")),
    ("one checkpoint", ValueError, r"checkpoint|2",
     _search_with(trajectory=lambda b: b.checkpoints[:1], steps=lambda b: b.steps[:1])),
    ("no checkpoints", ValueError, r"checkpoint|2",
     _search_with(trajectory=[], steps=[])),
    ("unknown option", (TypeError, ValueError), r"populaton", _search_with(populaton=16)),
    ("cmaes option for lcsc", (TypeError, ValueError), r"sigma0", _search_with(sigma0=0.1)),
    ("lcsc option for cmaes", (TypeError, ValueError), r"mix_prob",
     _search_with(algorithm="cmaes", mix_prob=0.5)),
    ("steps of another length", ValueError, r"steps",
     _search_with(steps=lambda b: b.steps[:-1])),
    ("no parents", ValueError, r"parents", _search_with(parents=0)),
    ("more parents than population", ValueError, r"parents",
     _search_with(population=4, parents=5)),
    # Steps are training steps: a float is not silently truncated, a bool or string not taken.
    ("steps not integers", TypeError, r"^steps\[0\]: .*int",
     _search_with(steps=lambda b: [s - 0.1 for s in b.steps])),
    ("steps bools", TypeError, r"^steps\[0\]: .*bool",
     _search_with(steps=lambda b: [False, True, *b.steps[2:]])),
    ("steps strings", TypeError, r"^steps\[0\]: .*str",
     _search_with(steps=lambda b: [str(s) for s in b.steps])),
    ("negative seed", ValueError, r"^seed: -1 ", _search_with(seed=-1)),
    ("fractional seed", TypeError, r"^seed: .*float", _search_with(seed=1.5)),
    ("string seed", TypeError, r"^seed: .*str", _search_with(seed="abc")),
    ("bool seed", TypeError, r"^seed: .*bool", _search_with(seed=True)),
    ("cmaes seed of 2^32", ValueError, r"^seed: .*2\*\*32",
     _search_with(algorithm="cmaes", seed=2 ** 32)),
    ("target without floating-point tensors", ValueError,
     r"^target: no floating-point tensors to merge",
     _search_with(trajectory=[{"n": torch.tensor(i)} for i in range(3)], steps=[0, 1, 2],
                  target={"n": torch.tensor(0)})),
]


@pytest.mark.parametrize("exc,match,call", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUTS])
def test_bad_inputs_are_refused_before_any_evaluation(bowl, tmp_path, exc, match, call):
    target = bowl.target()
    bowl.calls = 0
    with pytest.raises(exc, match=match):
        call(bowl, target, tmp_path)
    assert bowl.calls == 0, "the objective was called before the arguments were checked"
    assert all(not t.any() for t in target.values()), "the target was written"
    assert os.listdir(tmp_path) == [], "files were written"


@pytest.mark.parametrize("algorithm,option,value,exc", [
    ("lcsc", "population", 0, ValueError), ("lcsc", "parents", 0, ValueError),
    ("lcsc", "sigma", 0.0, ValueError), ("lcsc", "mix_prob", 1.5, ValueError),
    ("cmaes", "population", 1, ValueError), ("cmaes", "sigma0", -1.0, ValueError),
    ("lcsc", "population", True, TypeError), ("lcsc", "population", 16.0, TypeError),
    ("lcsc", "parents", True, TypeError), ("lcsc", "sigma", True, TypeError),
    ("lcsc", "sigma", "0.1", TypeError), ("lcsc", "mix_prob", True, TypeError),
    ("lcsc", "sigma", math.inf, ValueError), ("lcsc", "sigma", math.nan, ValueError),
    ("lcsc", "mix_prob", math.nan, ValueError), ("cmaes", "population", True, TypeError),
    ("cmaes", "sigma0", True, TypeError), ("cmaes", "sigma0", math.inf, ValueError),
    ("cmaes", "sigma0", math.nan, ValueError)])
def test_bad_option_values_are_refused_before_any_evaluation(bowl, algorithm, option, value,
                                                            exc):
    """A bad option value is named before the objective (possibly FID) is called at all. True
    is an int and inf compares above 0, yet neither is a population or a noise scale (sigma=inf
    used to fail generations later, naming x[0])."""
    calls = []

    def objective(target):
        calls.append(1)
        return bowl.objective(target)

    with pytest.raises(exc, match=rf"^{option}: "):
        lcsc_fast.search(bowl.checkpoints, objective, bowl.target(), budget=40,
                         algorithm=algorithm, progress=False, **{option: value})
    assert calls == []


@pytest.mark.parametrize("algorithm", param("algorithm", ALGORITHMS))
def test_numpy_integers_and_floats_are_taken_as_python_numbers(bowl, algorithm):
    """Integral numpy scalars and arrays (budget, seed, steps, options) give the same search
    as the equal Python numbers."""
    options = ({"population": 8, "parents": 3, "sigma": 0.25} if algorithm == "lcsc"
               else {"population": 6, "sigma0": 0.25})
    as_numpy = {k: np.int32(v) if isinstance(v, int) else np.float32(v)
                for k, v in options.items()}
    plain, _ = run(bowl, budget=20, algorithm=algorithm, seed=3, **options)
    numpy, _ = run(bowl, budget=np.int64(20), algorithm=algorithm, seed=np.uint32(3),
                   steps=np.array(bowl.steps), **as_numpy)
    assert as_json(numpy) == as_json(plain)


@pytest.mark.parametrize("algorithm", ["lcsc", "cmaes"])
def test_generations_merged_in_one_pass_give_the_same_search(bowl, algorithm):
    """Merging a generation in one batched pass (the default when memory allows) gives the
    same candidates bit for bit, so the same search as merging one candidate at a time."""
    kw = dict(budget=80, algorithm=algorithm, seed=3, progress=False, steps=bowl.steps)
    batched = lcsc_fast.search(bowl.checkpoints, bowl.objective, bowl.target(), **kw)
    single = lcsc_fast.search(bowl.checkpoints, bowl.objective, bowl.target(), batch_nbytes=0,
                              **kw)
    assert batched.history == single.history
    assert batched.coefficients == single.coefficients

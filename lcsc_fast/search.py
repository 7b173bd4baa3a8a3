"""The LCSC search: coefficients over saved checkpoints that minimise an objective.

LCSC (Sec. 4 and Alg. 1 of the paper) looks for w with sum 1, negative entries allowed, that
minimises U(sum_i w_i theta_i). The search runs in the difference parametrisation against the
first checkpoint, theta = theta_0 + sum_{i>=1} x_i (theta_i - theta_0), so every candidate x in
R^(N-1) sums to 1 in direct form, and every candidate is merged into the caller's model in place
by the engine before the objective scores it.

Two algorithms:
- "lcsc", the paper's evolutionary search: a population initialised with EMA coefficients at
  several rates; each generation the best individuals are parents; a child mixes two parents
  coefficient-wise or copies one whole, then every coefficient gets Gaussian noise; the whole
  population is replaced by the children; the best individual ever seen is returned. The paper
  gives no population size, parent count or noise scale. Defaults: population 16 and 4 parents
  (about 125 generations in the paper's 2K evaluations, and selection strong enough to make
  progress in each); noise sigma = 0.1 x the child's RMS coefficient, so that the step follows the
  scale of the coefficients whether they are ~1/N (long windows) or large and signed.
- "cmaes", CMA-ES from the cmaes package, started at the best baseline.

Deterministic for a seed. With state_path the search state is written atomically after every
generation, and a killed search restarted with the same arguments continues where it stopped and
ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import pickle
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import coefficients as coeffs_mod
from ._io import write_atomically
from .engine import MergePlan, _target_tensors, merge_into

__all__ = ["search", "SearchResult"]

log = logging.getLogger("lcsc_fast.search")

_OPTIONS = {"lcsc": {"population": 16, "parents": 4, "sigma": 0.1, "mix_prob": 0.5},
            "cmaes": {"population": None, "sigma0": None}}
# Merging a generation in one pass needs a copy of the model per candidate: allowed up to this
# many bytes (None: a quarter of the memory available on the target's device; 0: never).
_COMMON_OPTIONS = {"batch_nbytes": None}
_STATE_VERSION = 1


@dataclass
class SearchResult:
    coefficients: list[float]  # the best, direct form, sums to 1
    score: float
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    baselines: dict[str, float] = field(default_factory=dict)
    baseline_coefficients: dict[str, list[float]] = field(default_factory=dict)
    evaluations: int = 0


def search(trajectory, objective, target, budget: int = 2000, algorithm: str = "lcsc",
           seed: int = 0, state_path=None, history_path=None, progress: bool = True,
           steps=None, **options) -> SearchResult:
    """Search LCSC coefficients for trajectory that minimise objective(target).

    trajectory: a lcsc_fast.Trajectory or a list of N >= 2 state dicts; target: the model (or
    dict of tensors) each candidate is merged into before objective(target) -> float scores it,
    lower being better. budget counts the search's objective evaluations (the baselines, scored
    first, come on top). seed: an int >= 0 (below 2^32 for "cmaes"). steps: the checkpoints'
    training steps, ints, for the EMA baselines (default: trajectory.steps, else 0..N-1).
    Options: see the module docstring and _OPTIONS.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget: {budget!r} is not a positive number of evaluations")
    budget = int(budget)
    if algorithm not in _OPTIONS:
        raise ValueError(f"algorithm: {algorithm!r} is not one of {', '.join(_OPTIONS)}")
    seed = _check_seed(seed, algorithm)
    known = {**_OPTIONS[algorithm], **_COMMON_OPTIONS}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for algorithm {algorithm!r}; "
                        f"known: {', '.join(known)}")
    batch_nbytes = options.pop("batch_nbytes", None)
    opts = _check_options(algorithm, {**_OPTIONS[algorithm], **options})
    n = len(trajectory)
    if n < 2:
        raise ValueError(f"trajectory: {n} checkpoint(s); a search needs at least 2")
    if steps is None:
        steps = list(getattr(trajectory, "steps", range(n)))
    # Integers, non-negative and increasing, or an error naming steps[i]: a float step would
    # otherwise be truncated silently into the EMA baselines.
    steps = coeffs_mod._check_steps(steps)
    if len(steps) != n:
        raise ValueError(f"steps: {len(steps)} steps for {n} checkpoints")

    evaluate = _Evaluator(trajectory, objective, target, batch_nbytes)
    signature = {"version": _STATE_VERSION, "algorithm": algorithm, "seed": seed,
                 "checkpoints": n, "steps": steps, "options": opts}
    state = _load_state(state_path, signature)
    if state is None:
        baseline_coefficients = coeffs_mod.baselines(steps)
        baselines = {name: evaluate(w) for name, w in baseline_coefficients.items()}
        ema_names = [k for k in baselines if k.startswith("ema ")]
        best_ema = min(ema_names, key=lambda k: (baselines[k], ema_names.index(k)))
        baselines["ema*"] = baselines[best_ema]
        baseline_coefficients["ema*"] = baseline_coefficients[best_ema]
        rng = np.random.default_rng(seed)
        algo = (_Genetic(steps, opts, rng) if algorithm == "lcsc"
                else _Cmaes(baseline_coefficients, baselines, opts, seed))
        state = {"signature": signature, "baselines": baselines,
                 "baseline_coefficients": baseline_coefficients, "history": [],
                 "best_x": None, "best_score": math.inf, "algo": algo, "rng": rng}
    history = state["history"]
    _rewrite_history(history_path, history)

    bar = _progress_bar(budget, len(history), progress)
    try:
        while len(history) < budget:
            generation = state["algo"].ask(state["rng"])[:budget - len(history)]
            scores = []
            for x, score in zip(generation, evaluate.many(
                    [coeffs_mod.from_difference(list(x)) for x in generation])):
                scores.append(score)
                if score < state["best_score"] or state["best_x"] is None:
                    state["best_x"], state["best_score"] = np.array(x), score
                entry = {"evaluation": len(history) + 1, "generation": state["algo"].generation,
                         "score": score, "best_score": state["best_score"]}
                history.append(entry)
                _append_history(history_path, entry)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{state['best_score']:.6g}")
            if len(scores) == state["algo"].size:  # a whole generation: learn, then save
                state["algo"].tell(generation, scores)
                _save_state(state_path, state)
    finally:
        if bar is not None:
            bar.close()

    best = coeffs_mod.from_difference(list(state["best_x"]))
    evaluate.merge(best)
    return SearchResult(coefficients=best, score=state["best_score"], history=list(history),
                        baselines=dict(state["baselines"]),
                        baseline_coefficients=dict(state["baseline_coefficients"]),
                        evaluations=len(history))


def _check_seed(seed, algorithm: str) -> int:
    """The seed as an int, checked before anything is evaluated: numpy's generators take
    integers >= 0, and the cmaes package's (a RandomState) only those below 2^32."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if seed < 0 or (algorithm == "cmaes" and seed >= 2 ** 32):
        bound = ", below 2**32 for algorithm 'cmaes'" if algorithm == "cmaes" else ""
        raise ValueError(f"seed: {seed} is out of range; seeds are integers >= 0{bound}")
    return seed


def _check_options(algorithm: str, opts: dict) -> dict:
    """Option values, checked before anything is evaluated (an objective can be expensive):
    opts with integers as int and reals as float, or an error naming the option."""
    def fail(exc, name: str, what: str):
        raise exc(f"{name}: {opts[name]!r} {what} (algorithm {algorithm!r})")

    # bool is an int subclass, but True is no population size or noise scale.
    # kind: int or float, what the value is returned as (floats must also be finite).
    def number(kind: type, name: str, ok, what: str, none_ok: bool = False):
        value = opts[name]
        if value is None and none_ok:
            return None
        abc, noun = ((numbers.Integral, "an integer") if kind is int
                     else (numbers.Real, "a real number"))
        if isinstance(value, bool) or not isinstance(value, abc):
            fail(TypeError, name, f"is not {noun}; it {what}")
        if not ((kind is int or math.isfinite(value)) and ok(value)):
            fail(ValueError, name, what)
        return kind(value)

    out = dict(opts)
    if algorithm == "lcsc":
        population = out["population"] = number(int, "population", lambda v: v >= 1,
                                                 "must be a positive integer")
        out["parents"] = number(int, "parents", lambda v: 1 <= v <= population,
                                f"must be between 1 and population ({population})")
        out["sigma"] = number(float, "sigma", lambda v: v > 0, "must be positive and finite")
        out["mix_prob"] = number(float, "mix_prob", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    else:
        out["population"] = number(int, "population", lambda v: v >= 2,
                                   "must be None or an integer >= 2", none_ok=True)
        out["sigma0"] = number(float, "sigma0", lambda v: v > 0,
                               "must be None or positive and finite", none_ok=True)
    return out


class _Evaluator:
    """Merges candidates (direct coefficients) into the target and scores them."""

    def __init__(self, trajectory, objective, target, batch_nbytes):
        self.objective, self.target = objective, target
        tensors = _target_tensors(target)
        self.floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
        if not self.floats:
            raise ValueError(f"target: no floating-point tensors to merge (it holds "
                             f"{len(tensors)} tensor(s), none floating point); the search "
                             "merges the checkpoints' floating-point weights into the target, "
                             "so pass the model they belong to")
        if hasattr(trajectory, "_lcsc_merge_into"):
            self.merge = lambda w: merge_into(target, trajectory, w)
            self.merge_batched = trajectory.merge_batched
        else:
            self.merge = MergePlan(target, trajectory)
            self.merge_batched = self.merge.merge_batched
        storages = {(v.data_ptr(), v.numel()) for v in self.floats.values() if v.numel()}
        self.tied = len(storages) < sum(1 for v in self.floats.values() if v.numel())
        self.batch_nbytes = batch_nbytes
        self.scratch = []  # per candidate, a dict of the target's float tensors

    def __call__(self, w: list[float]) -> float:
        self.merge(w)
        return self._score()

    # Scores are finite or +inf (a NaN from the objective becomes +inf), so plain comparisons
    # rank the worst last everywhere.

    def _score(self) -> float:
        score = float(self.objective(self.target))
        if not math.isfinite(score):
            log.warning("objective returned %s; the candidate counts as the worst", score)
            return math.inf
        return score

    def many(self, ws: list[list[float]]):
        """Scores of candidates ws, yielded in order. A generation is merged in one pass over
        the checkpoints into scratch copies of the model when memory allows (same bits as one
        merge at a time), each copied into the target before it is scored."""
        if len(ws) < 2 or self.tied or not self._scratch_for(len(ws)):
            for w in ws:
                yield self(w)
            return
        outs = self.scratch[:len(ws)]
        self.merge_batched(ws, outs)
        for out in outs:
            with torch.no_grad():
                for name, t in self.floats.items():
                    t.copy_(out[name])
            yield self._score()

    def _scratch_for(self, k: int) -> bool:
        if len(self.scratch) >= k:
            return True
        model_nbytes = sum(t.numel() * t.element_size() for t in self.floats.values())
        limit = self.batch_nbytes
        if limit is None:
            limit = _available_nbytes(next(iter(self.floats.values())).device) // 4
        if model_nbytes * k > limit:
            return False
        while len(self.scratch) < k:
            self.scratch.append({name: torch.empty_like(t) for name, t in self.floats.items()})
        return True


def _available_nbytes(device) -> int:
    """Memory available on device for scratch copies (0 when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class _Genetic:
    """The paper's evolutionary search over difference coefficients x (Alg. 1)."""

    def __init__(self, steps, opts, rng):
        self.size, self.parents = int(opts["population"]), int(opts["parents"])
        self.sigma, self.mix_prob = float(opts["sigma"]), float(opts["mix_prob"])
        # The initial population: EMA at horizons spread geometrically from one checkpoint gap
        # to four times the trajectory's span, so short and long windows are both represented.
        gaps = np.diff(steps)
        span = max(steps[-1] - steps[0], 1)
        horizons = np.geomspace(max(float(gaps.min()), 1.0), 4.0 * span, self.size)
        self.population = [np.array(coeffs_mod.to_difference(coeffs_mod.ema(steps, 1 - 1 / h)))
                           for h in horizons]
        self.scores = None
        self.generation = 0

    def ask(self, rng) -> list[np.ndarray]:
        if self.scores is None:  # generation 0: the EMA-initialised population itself
            return [x.copy() for x in self.population]
        order = sorted(range(self.size), key=lambda i: (self.scores[i], i))
        parents = [self.population[i] for i in order[:self.parents]]
        children = []
        for _ in range(self.size):
            a, b = rng.integers(self.parents, size=2)
            if rng.random() < self.mix_prob:
                child = np.where(rng.random(parents[a].shape) < 0.5, parents[a], parents[b])
            else:
                child = parents[a].copy()
            scale = math.sqrt(float(np.mean(child ** 2))) or 1.0 / (len(child) + 1)
            children.append(child + rng.normal(0.0, self.sigma * scale, child.shape))
        return children

    def tell(self, xs, scores) -> None:
        self.population, self.scores = [np.array(x) for x in xs], list(scores)
        self.generation += 1


class _Cmaes:
    """CMA-ES (the cmaes package) over difference coefficients, from the best baseline."""

    def __init__(self, baseline_coefficients, baselines, opts, seed):
        from cmaes import CMA

        start = min(baselines, key=lambda k: (baselines[k], k))
        mean = np.array(coeffs_mod.to_difference(baseline_coefficients[start]))
        rms = math.sqrt(float(np.mean(mean ** 2))) or 1.0 / (len(mean) + 1)
        sigma0 = opts["sigma0"] if opts["sigma0"] is not None else 0.5 * rms
        self.optimizer = CMA(mean=mean, sigma=float(sigma0), seed=seed,
                             population_size=opts["population"])
        self.size = self.optimizer.population_size
        self.generation = 0

    def ask(self, rng) -> list[np.ndarray]:
        return [self.optimizer.ask() for _ in range(self.size)]

    def tell(self, xs, scores) -> None:
        # CMA-ES ranks solutions; the worst stand-in must be finite for it.
        worst = sys.float_info.max
        self.optimizer.tell([(x, s if math.isfinite(s) else worst) for x, s in zip(xs, scores)])
        self.generation += 1

    # The cmaes package pickles its optimizer without its random generator (a new, unseeded one
    # comes back) and with only the upper triangle of C, which is not exactly symmetric: a
    # resumed search would then neither repeat itself nor continue the original. Both are kept.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_rng_state"] = self.optimizer._rng.get_state()
        state["_covariance"] = self.optimizer._C.copy()
        return state

    def __setstate__(self, state):
        rng_state, covariance = state.pop("_rng_state"), state.pop("_covariance")
        self.__dict__.update(state)
        self.optimizer._rng.set_state(rng_state)
        self.optimizer._C = covariance


def _progress_bar(budget: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=budget, initial=done, desc="LCSC search", unit="eval")


def _atomic_write(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically(path, write)


def _save_state(path, state) -> None:
    if path is not None:
        _atomic_write(path, pickle.dumps(state))


def _load_state(path, signature):
    if path is None or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        try:
            state = pickle.load(f)
        except Exception as e:
            raise ValueError(f"{path}: not a search state file ({e})") from None
    if not isinstance(state, dict) or state.get("signature") != signature:
        raise ValueError(f"{path} holds the state of a search with other arguments (algorithm, "
                         "seed, checkpoints, steps or options); pass another state_path or the "
                         "same arguments")
    return state


def _rewrite_history(path, history) -> None:
    """The JSONL history as of the loaded state (a killed run may have written more)."""
    if path is not None:
        _atomic_write(path, "".join(json.dumps(e) + "\n" for e in history).encode())


def _append_history(path, entry) -> None:
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

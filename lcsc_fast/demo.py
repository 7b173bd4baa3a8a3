"""`lcsc-fast demo`: LCSC against EMA, end to end, on scikit-learn's 8x8 digits.

The LCSC paper's claims in miniature (Tab. 1-4): a consistency model is trained while a
Recorder saves its checkpoints; the LCSC search finds merge coefficients with FID on fixed
noise; then other noise and more samples score the last checkpoint, the EMA kept during
training, EMA* (the best EMA of the same checkpoints), LCSC over the whole run and LCSC over the
first quarter only (the paper's training speed-up claim). FID uses a small digits classifier's
features (lcsc_fast.trainers.classifier), whose weights ship with the package.

The report folder holds summary.md, results.json, one sample grid per method, the coefficient
patterns and the search curve; run/ holds the training run (config, trajectory, weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import torch

from . import coefficients as coeffs_mod
from . import plots
from ._io import write_atomically
from .engine import merge_into
from .metrics import FIDObjective
from .search import search
from .trajectory import Trajectory

TRAINERS = ("ct", "cd", "ect", "dm")
# EMA* is the best of these per-step EMA rates (and EDM2's power EMAs) on the search's FID:
# the paper's grid (coefficients.EMA_STAR_RATES) is made for runs of ~10^5-10^6 steps, so the
# faster rates a run of a few thousand steps needs are added in front of it.
DEMO_EMA_RATES = (0.99, 0.995, 0.998) + coeffs_mod.EMA_STAR_RATES
DM_NFES = (15, 9)  # diffusion models: Heun NFE evaluated (the search uses the smallest)


@dataclasses.dataclass
class DemoConfig:
    out: str = "lcsc-demo"
    trainer: str = "ct"  # "ct", "cd", "ect" or "dm"
    seed: int = 0
    train_steps: int = 4000  # of the model whose trajectory is searched
    teacher_steps: int | None = None  # cd/ect: the diffusion teacher's (None: dm's default)
    checkpoints: int = 100  # snapshots recorded over train_steps
    budget: int = 1000  # search evaluations, per search (full run; first quarter)
    search_samples: int = 1000  # samples per FID during the search (fixed noise)
    eval_samples: int = 5000  # samples per FID in the final evaluation (other noise)
    sample_steps: int = 1  # consistency models: 1- or 2-step sampling (dm: unused, stays 1)
    lora: bool = False  # then LoRA fine-tuning of the final model, and LCSC over its adapters
    lora_steps: int = 2000
    lora_rank: int = 8
    lora_ema_rate: float = 0.99
    progress: bool = True

    def check(self) -> None:
        """ValueError naming the first setting the demo cannot run with."""
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer: {self.trainer!r} is not one of {', '.join(TRAINERS)}")
        if self.trainer == "dm" and self.sample_steps != 1:
            raise ValueError(f"sample_steps: {self.sample_steps!r} is for consistency models (ct, "
                             "cd, ect); trainer dm samples with EDM's Heun sampler at NFE "
                             f"{' and '.join(map(str, DM_NFES))}: leave sample_steps at 1")
        if self.sample_steps not in (1, 2):
            raise ValueError(f"sample_steps: {self.sample_steps!r}; consistency models sample in 1 "
                             "or 2 steps")
        if self.checkpoints < 8 or self.train_steps % self.checkpoints:
            raise ValueError(f"checkpoints: {self.checkpoints} must be >= 8 and divide "
                             f"train_steps ({self.train_steps})")
        if self.lora and self.lora_steps % self.checkpoints:
            raise ValueError(f"checkpoints: {self.checkpoints} must divide lora_steps "
                             f"({self.lora_steps})")
        if os.path.isdir(self.out) and os.listdir(self.out):
            raise ValueError(f"{self.out} is not empty (a demo ran there before?); the demo "
                             "writes its run folders and report there: choose another --out "
                             "(nothing there is overwritten)")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """The same pipeline, small enough for under 2 minutes on two CPU cores."""
        return cls(**{"train_steps": 600, "teacher_steps": 400, "checkpoints": 40,
                      "budget": 64, "search_samples": 400, "eval_samples": 1000,
                      "lora_steps": 320,
                      **overrides})


@dataclasses.dataclass
class Row:
    """One method of the final table: a merge of a trajectory, or a model of its own."""

    method: str
    training_steps: int
    trajectory: object | None  # merged from: a Trajectory, or None (then `load` gives it)
    coefficients: list[float] | None
    search_fid: float | None = None  # on the search's noise and sample count
    load: object = None  # () -> the model, when it is not a merge (the training's EMA)
    fid: dict = dataclasses.field(default_factory=dict)  # NFE or sampling steps -> FID


@dataclasses.dataclass
class _Searched:
    """One LCSC search and EMA* over the same checkpoints."""

    label: str  # "" for the whole run, else a suffix for file names ("first-quarter", "lora")
    steps: list[int]
    result: object  # lcsc_fast.SearchResult
    scores: dict  # baseline name -> search FID, the extra EMA rates included
    coefficients: dict  # baseline name -> coefficients
    ema_star: str  # the name of the best EMA rate

    def rows(self, traj, prefix: str, training_steps: int) -> list[Row]:
        star = self.ema_star
        return [Row(f"{prefix}EMA* ({star})", training_steps, traj, self.coefficients[star],
                    self.scores[star]),
                Row(f"{prefix}LCSC", training_steps, traj, self.result.coefficients,
                    self.result.score)]


class _Clock:
    def __init__(self, progress: bool):
        self.start, self.progress = time.perf_counter(), progress

    def say(self, text: str) -> None:
        if self.progress:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", flush=True)


def run(config: DemoConfig) -> dict:
    """Train, search, evaluate and write the report folder; returns results.json's content."""
    from .trainers import classifier, common

    config.check()
    clock = _Clock(config.progress)
    os.makedirs(config.out, exist_ok=True)
    torch.manual_seed(config.seed)

    trained = _train(config, clock)
    tuned = _train_lora(config, trained, clock) if config.lora else None
    nfes = DM_NFES if config.trainer == "dm" else (config.sample_steps,)
    sampler, noise_shape = _sampler(config, min(nfes))
    objective = FIDObjective(sampler, classifier.feature_extractor(),
                             classifier.reference_statistics(), config.search_samples,
                             noise_shape, seed=config.seed + 1)
    target = common.load_model(trained.directory, "model")  # every merge is written here
    ema_rate = common.read_config(trained.directory)["config"]["ema_rate"]

    with contextlib.ExitStack() as stack:
        traj = stack.enter_context(Trajectory.open(trained.trajectory_dir))
        steps = list(traj.steps)
        clock.say(f"{len(traj)} checkpoints recorded, steps {steps[0]}..{steps[-1]} "
                  f"({trained.seconds:.0f} s of training)")
        clock.say(f"LCSC search over all {len(traj)} checkpoints ({config.budget} evaluations)")
        searches = [_search("", traj, steps, objective, target, config)]
        rows = [Row("last checkpoint", steps[-1], traj, coeffs_mod.last(len(traj)),
                    searches[0].scores["last"]),
                Row(f"EMA {ema_rate} (training)", steps[-1], None, None,
                    load=lambda: common.load_model(trained.directory, "ema")),
                *searches[0].rows(traj, "", steps[-1])]
        if tuned is None:
            quarter = len(traj) // 4
            head = stack.enter_context(Trajectory.open(
                _snapshot_files(trained.trajectory_dir)[:quarter]))
            clock.say(f"LCSC search over the first {quarter} checkpoints (up to step "
                      f"{steps[quarter - 1]})")
            searches.append(_search("first-quarter", head, steps[:quarter], objective, target,
                                    config))
            rows += searches[1].rows(head, "first 25%: ", steps[quarter - 1])
        else:
            from .trainers import lora

            adapters = stack.enter_context(lora.open_trajectory(tuned.directory))
            lora_steps = list(adapters.steps)
            total = steps[-1] + lora_steps[-1]
            clock.say(f"LCSC search over {len(adapters)} LoRA checkpoints")
            searches.append(_search("lora", adapters, lora_steps, objective, target, config))
            rows += [Row("LoRA: last checkpoint", total, adapters,
                         coeffs_mod.last(len(adapters)), searches[1].scores["last"]),
                     Row(f"LoRA: EMA {config.lora_ema_rate} (training)", total, None, None,
                         load=lambda: _lora_ema(tuned.directory)),
                     *searches[1].rows(adapters, "LoRA: ", total)]
        clock.say(f"final evaluation: FID of {config.eval_samples} samples from held-out noise")
        grids = _evaluate(rows, config, objective, target, nfes)
    return _report(config, rows, nfes, searches, grids, trained, clock)


def _search(label, traj, steps, objective, target, config: DemoConfig) -> _Searched:
    """The LCSC search over traj, and EMA* over DEMO_EMA_RATES on the same objective."""
    result = search(traj, objective, target, budget=config.budget, seed=config.seed,
                    steps=steps, progress=config.progress)
    scores, coefficients = dict(result.baselines), dict(result.baseline_coefficients)
    for rate in DEMO_EMA_RATES:
        name = f"ema {rate!r}"
        if name not in scores:
            coefficients[name] = coeffs_mod.ema(steps, rate)
            merge_into(target, traj, coefficients[name])
            scores[name] = float(objective(target))
    emas = [f"ema {rate!r}" for rate in DEMO_EMA_RATES]
    best = min(emas, key=lambda k: (scores[k], emas.index(k)))
    return _Searched(label, steps, result, scores, coefficients, best)


def _train(config: DemoConfig, clock: _Clock):
    run_dir = os.path.join(config.out, "run")
    every = config.train_steps // config.checkpoints
    shared = {"seed": config.seed, "steps": config.train_steps, "every": every,
              "progress": config.progress}
    if config.trainer == "ct":
        from .trainers import ct

        clock.say(f"consistency training (iCT-style), {config.train_steps} steps")
        return ct.train(ct.CTConfig(out=run_dir, **shared))
    if config.trainer == "dm":
        from .trainers import dm

        clock.say(f"diffusion training (EDM), {config.train_steps} steps")
        return dm.train(dm.DMConfig(out=run_dir, **shared))
    from .trainers import dm

    teacher_dir = os.path.join(config.out, "teacher")
    teacher = dm.DMConfig(out=teacher_dir, seed=config.seed, progress=config.progress)
    if config.teacher_steps is not None:
        teacher = dataclasses.replace(teacher, steps=config.teacher_steps,
                                      every=max(config.teacher_steps // 10, 1))
    clock.say(f"diffusion teacher (EDM), {teacher.steps} steps")
    dm.train(teacher)
    if config.trainer == "cd":
        from .trainers import cd

        clock.say(f"consistency distillation, {config.train_steps} steps")
        return cd.train(cd.CDConfig(out=run_dir, teacher=teacher_dir, **shared))
    from .trainers import ect

    clock.say(f"consistency tuning (ECT), {config.train_steps} steps")
    return ect.train(ect.ECTConfig(out=run_dir, teacher=teacher_dir, **shared))


def _train_lora(config: DemoConfig, trained, clock: _Clock):
    from .trainers import lora

    clock.say(f"LoRA fine-tuning (rank {config.lora_rank}) of the final model, "
              f"{config.lora_steps} steps")
    return lora.train(lora.LoRAConfig(
        out=os.path.join(config.out, "lora"), base=trained.directory, seed=config.seed,
        steps=config.lora_steps, every=config.lora_steps // config.checkpoints,
        rank=config.lora_rank, alpha=float(config.lora_rank), ema_rate=config.lora_ema_rate,
        progress=config.progress))


def _lora_ema(run_dir: str):
    """The LoRA run's EMA model: the EMA of its factors (not of their products) on W0."""
    from safetensors.torch import load_file

    from .trainers import common, lora

    recorded = common.read_config(run_dir)
    model = common.load_model(recorded["lora"]["base"], "model")
    lora.add_lora(model, recorded["config"]["rank"], recorded["config"]["alpha"])
    model.load_state_dict(load_file(os.path.join(run_dir, common.EMA_FILE)))
    return model.eval()


def _sampler(config: DemoConfig, nfe: int):
    """sampler(model, noise) -> images and one sample's noise shape; nfe is the Heun NFE of a
    diffusion model, or the number of consistency steps."""
    from .trainers import sampling

    if config.trainer == "dm":
        return (lambda model, noise: sampling.edm_sample(model, noise, nfe)), (1, 8, 8)
    steps = config.sample_steps
    return ((lambda model, noise: sampling.consistency_sample(model, noise, steps)),
            sampling.noise_shape(steps))


def _snapshot_files(trajectory_dir: str) -> list[str]:
    """The Recorder's snapshot files in step order, from its manifest."""
    with open(os.path.join(trajectory_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return [os.path.join(trajectory_dir, s["file"]) for s in manifest["snapshots"]]


GRID_SAMPLES = 64


def _evaluate(rows: list[Row], config: DemoConfig, search_objective, target, nfes) -> dict:
    """FID of every row on held-out noise (seed + 2) at every NFE; returns method -> a grid of
    samples (the first GRID_SAMPLES of the held-out noise, at the search's NFE)."""
    objectives = {}
    for nfe in nfes:
        sampler, shape = _sampler(config, nfe)
        objectives[nfe] = FIDObjective(sampler, search_objective.extractor,
                                       (search_objective.mu, search_objective.sigma),
                                       GRID_SAMPLES, shape, seed=config.seed + 2)
    grids = {}
    for row in rows:
        if row.trajectory is None:
            model = row.load()
            row.search_fid = float(search_objective(model))
        else:
            merge_into(target, row.trajectory, row.coefficients)
            model = target
        for nfe, objective in objectives.items():
            row.fid[nfe] = objective.evaluate(model, config.eval_samples, seed=config.seed + 2)
        first = objectives[min(nfes)]
        grids[row.method] = first.sampler(model, first.noise)
    return grids


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(part for part in keep.split("-") if part)


def _nfe_label(config: DemoConfig, nfe: int) -> str:
    return f"NFE {nfe}" if config.trainer == "dm" else f"{nfe}-step"


def _table(config: DemoConfig, rows: list[Row], nfes) -> list[str]:
    """The results as markdown table lines."""
    head = ["method", "training steps"] + [f"FID ({_nfe_label(config, n)})" for n in nfes]
    head.append("search FID")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.method, str(row.training_steps)]
        cells += [f"{row.fid[n]:.3f}" for n in nfes]
        cells.append("" if row.search_fid is None else f"{row.search_fid:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _report(config: DemoConfig, rows: list[Row], nfes, searches: list[_Searched],
            grids: dict, trained, clock: _Clock) -> dict:
    from .engine import build_info

    out = config.out
    figures = {}
    for row in rows:
        name = f"samples-{_slug(row.method)}.png"
        plots.plot_image_grid(grids[row.method], os.path.join(out, name),
                              title=f"{row.method}: FID {row.fid[min(nfes)]:.2f}")
        figures[row.method] = name
    plot_names = []
    for s in searches:
        suffix = f"-{s.label}" if s.label else ""
        star = s.ema_star
        plots.plot_coefficients(s.steps, s.result.coefficients,
                                os.path.join(out, f"coefficients{suffix}.png"),
                                baselines={f"EMA* ({star})": s.coefficients[star]})
        plots.plot_search(s.result.history, {"last": s.scores["last"],
                                             "uniform": s.scores["uniform"],
                                             "ema*": s.scores[star]},
                          os.path.join(out, f"search{suffix}.png"))
        plot_names += [f"search{suffix}.png", f"coefficients{suffix}.png"]

    seconds = time.perf_counter() - clock.start
    results = {
        "config": dataclasses.asdict(config),
        "trainer": config.trainer,
        "seed": config.seed,
        "sampling": ("EDM Heun, NFE " + "/".join(map(str, nfes)) if config.trainer == "dm"
                     else f"consistency, {config.sample_steps} step(s)"),
        "methods": [{
            "method": row.method, "training_steps": row.training_steps,
            "nfe": min(nfes), "fid": row.fid[min(nfes)],
            "fid_by_nfe": {str(n): row.fid[n] for n in nfes},
            "samples": config.eval_samples, "search_fid": row.search_fid,
            "search_samples": config.search_samples, "coefficients": row.coefficients,
            "samples_png": figures[row.method]} for row in rows],
        "searches": [{"label": s.label or "full", "checkpoint_steps": s.steps,
                      "evaluations": s.result.evaluations, "best": s.result.score,
                      "ema_star": s.ema_star, "baselines": s.scores} for s in searches],
        "checkpoint_steps": searches[0].steps,
        "training_seconds": trained.seconds,
        "seconds": seconds,
        "lcsc_fast": build_info()["version"],
        "torch": torch.__version__,
    }
    _write_json(os.path.join(out, "results.json"), results)
    table = _table(config, rows, nfes)
    second = ("\"LoRA\" rows merge the adapters of a LoRA fine-tuning of the final model "
              f"({config.lora_steps} more steps), onto its weights." if config.lora else
              "\"first 25%\" rows use only the checkpoints of the first quarter of training.")
    summary = [
        f"# LCSC demo: {config.trainer} on 8x8 digits (seed {config.seed})", "",
        (f"{len(searches[0].steps)} checkpoints over {searches[0].steps[-1]} training steps; "
         f"each search used {config.budget} evaluations of FID on {config.search_samples} "
         f"samples from fixed noise; the table's FID is of {config.eval_samples} samples from "
         "other noise (features: the shipped digits classifier's)."), "", *table, "",
        ("EMA* is the best of the EMA rates " + ", ".join(map(str, DEMO_EMA_RATES))
         + " on the search's FID, merged from the same checkpoints. " + second), "",
        *[f"![{name}]({name})" for name in plot_names], "",
        *[f"![{row.method}]({figures[row.method]})" for row in rows], "",
        f"Run time {seconds:.0f} s (training {trained.seconds:.0f} s).", "",
    ]
    _write_text(os.path.join(out, "summary.md"), "\n".join(summary))
    print("\n".join(table))
    print(f"\nreport: {os.path.join(out, 'summary.md')} (and results.json, PNGs); "
          f"{seconds:.0f} s in all")
    return results


def _write_json(path: str, data) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    _write_text(path, json.dumps(clean(data), indent=1) + "\n")


def _write_text(path: str, text: str) -> None:
    """path holds its old content or all of text, never a part."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)

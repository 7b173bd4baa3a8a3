"""What the consistency trainers (ct, cd, ect) share: iCT's distance, discretisation curriculum,
noise-level sampling and weighting; a student/target forward pair with the same dropout masks;
the 1- and 2-step samplers; and the FID figures their command lines print.

Papers: Song et al. 2023, "Consistency Models" (CM); Song & Dhariwal 2023, "Improved Techniques
for Training Consistency Models" (iCT); Geng et al. 2024, "Consistency Models Made Easy" (ECT).
Noise levels are EDM's: x_sigma = x + sigma z, sigma in [SIGMA_MIN, SIGMA_MAX].
"""

from __future__ import annotations

import functools
import math
import time

import torch

from . import common
from .networks import SIGMA_MAX, SIGMA_MIN
from .sampling import RHO, consistency_sample, noise_shape

# iCT's choices (Sec. 3.3-3.5): the lognormal over noise levels and the curriculum's ends.
P_MEAN, P_STD = -1.1, 2.0
ICT_S0, ICT_S1 = 10, 1280
HUBER_C_PER_SQRT_DIM = 0.00054
FID_SAMPLES, FID_SEED = 2000, 0


# iCT Sec. 3.3: c = 0.00054 sqrt(d) for data of d dimensions (0.0043 for 8x8 digits).
def pseudo_huber_c(dim: int) -> float:
    return HUBER_C_PER_SQRT_DIM * math.sqrt(dim)


# iCT Eq. 8: d(x, y) = sqrt(||x - y||_2^2 + c^2) - c, per sample. x, y: [n, ...] -> [n].
def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    if c is None:
        c = pseudo_huber_c(x[0].numel())
    squared = (x - y).flatten(1).square().sum(dim=1)
    return (squared + c * c).sqrt() - c


# iCT Eq. 9: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)):
# s0 + 1 levels at first, doubling the intervals log2(s1 / s0) times at even spacing in k.
def discretization_steps(k: int, total_steps: int, s0: int = ICT_S0, s1: int = ICT_S1) -> int:
    """The number of noise levels N(k) at training step k (0-based) of total_steps (K)."""
    if not 1 <= s0 <= s1:
        raise ValueError(f"s0, s1: {s0}, {s1}; the curriculum needs 1 <= s0 <= s1")
    stage_steps = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)  # K'
    return min(s0 * 2 ** (k // stage_steps), s1) + 1


# iCT Eq. 3 (EDM's Eq. 5, ascending): sigma_i = (sigma_min^(1/rho) + (i - 1) / (N - 1)
# (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho for i = 1..N.
def karras_boundaries(num_levels: int, sigma_min: float = SIGMA_MIN,
                      sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """The N noise levels of the discretisation, ascending. [N], float64."""
    if num_levels < 2:
        raise ValueError(f"num_levels: {num_levels}; a discretisation needs at least 2 levels")
    ramp = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


# iCT Eq. 10: p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std))
#                   - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)),
# the lognormal's mass between adjacent levels, for the pairs i = 1..N-1.
def lognormal_level_probabilities(boundaries: torch.Tensor, p_mean: float = P_MEAN,
                                  p_std: float = P_STD) -> torch.Tensor:
    """The probability of each adjacent pair (sigma_i, sigma_{i+1}). [N - 1], float64."""
    cdf = torch.erf((boundaries.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


@functools.lru_cache(maxsize=16)
def _levels(num_levels: int, p_mean: float, p_std: float):
    boundaries = karras_boundaries(num_levels)
    return boundaries.float(), lognormal_level_probabilities(boundaries, p_mean, p_std)


def sample_level_pairs(num_levels: int, n: int, p_mean: float = P_MEAN, p_std: float = P_STD,
                       generator: torch.Generator | None = None):
    """n adjacent pairs (sigma_i, sigma_{i+1}) of the N-level Karras discretisation, i drawn
    by iCT's discrete lognormal (Eq. 10). Returns (sigma_lo [n], sigma_hi [n]), float32."""
    boundaries, probabilities = _levels(num_levels, p_mean, p_std)
    i = torch.multinomial(probabilities, n, replacement=True, generator=generator)
    return boundaries[i], boundaries[i + 1]


# iCT Sec. 3.1: lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), more weight at low noise.
def ict_weighting(sigma_lo: torch.Tensor, sigma_hi: torch.Tensor) -> torch.Tensor:
    return 1.0 / (sigma_hi - sigma_lo)


@functools.lru_cache(maxsize=16)
def mean_ict_weighting(num_levels: int, p_mean: float = P_MEAN, p_std: float = P_STD) -> float:
    """E[lambda(sigma_i)] under iCT's level sampling (Eq. 10) at N levels: it about doubles
    with N, so dividing by it keeps iCT's relative weighting but holds the loss's scale (and the
    gradient's, which Adam's second moment follows only over ~1/(1 - beta2) steps) level as the
    curriculum doubles N."""
    boundaries = karras_boundaries(num_levels)
    p = lognormal_level_probabilities(boundaries, p_mean, p_std)
    return float((p / (boundaries[1:] - boundaries[:-1])).sum())


def paired_forward(model, x_student, sigma_student, x_target, sigma_target, target_model=None):
    """(f_theta(x_student, sigma_student), stopgrad f_target(x_target, sigma_target)): the
    student with gradients, the target (the model itself unless target_model is given) without,
    both drawing the same dropout masks, as iCT (Sec. 3.1) and ECT (Sec. 3.1) synchronise the
    dropout of student and teacher, so only the noise levels differ between the two."""
    cuda = x_student.is_cuda
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(x_student.device) if cuda else None
    with torch.no_grad():
        target = (target_model or model)(x_target, sigma_target)
    torch.set_rng_state(cpu_state)
    if cuda:
        torch.cuda.set_rng_state(cuda_state, x_student.device)
    return model(x_student, sigma_student), target


def sampler(steps: int):
    """callable(model, noise [n, steps, 1, 8, 8]) -> images [n, 1, 8, 8]: 1- or 2-step
    consistency sampling (CM Alg. 1; iCT's sigma_mid for 2 steps), for metrics.FIDObjective
    with noise_shape(steps)."""
    if steps not in (1, 2):
        raise ValueError(f"steps: {steps}; consistency sampling here takes 1 or 2 steps")

    def sample(model, noise: torch.Tensor) -> torch.Tensor:
        return consistency_sample(model, noise, steps)

    return sample


def fid_objective(steps: int, num_samples: int = FID_SAMPLES, seed: int = FID_SEED):
    """A metrics.FIDObjective of `steps`-step samples from fixed noise (seed) against the
    digits, with the shipped classifier's features (trainers.classifier)."""
    from lcsc_fast.metrics import FIDObjective

    from .classifier import feature_extractor, reference_statistics

    return FIDObjective(sampler(steps), feature_extractor(), reference_statistics(),
                        num_samples=num_samples, noise_shape=noise_shape(steps), seed=seed)


def fid_figures(run, num_samples: int = FID_SAMPLES, seed: int = FID_SEED) -> dict:
    """{(which, steps): FID} for which in ("model", "ema") and steps in (1, 2): the run's final
    and EMA models on num_samples samples from the same fixed noise."""
    figures = {}
    for steps in (1, 2):
        objective = fid_objective(steps, num_samples, seed)
        for which in ("model", "ema"):
            model = getattr(run, which).eval()
            figures[which, steps] = objective(model)
    return figures


def print_report(run, num_samples: int = FID_SAMPLES) -> dict:
    """Prints the training time and (num_samples > 0) the FIDs of fid_figures; returns them."""
    print(f"trained in {run.seconds:.1f} s; run folder {run.directory}")
    if num_samples <= 0:
        return {}
    start = time.perf_counter()
    figures = fid_figures(run, num_samples)
    print(f"FID on {num_samples} samples ({time.perf_counter() - start:.1f} s):")
    for (which, steps), value in figures.items():
        print(f"  {which:5s} {steps}-step  {value:8.3f}")
    return figures


def main_for(config_cls, train, description: str, examples: str, argv=None) -> common.Run:
    """The command line of a consistency trainer: one --option per config field plus
    --fid-samples; trains, then prints the report (print_report)."""
    p = common.parser_for(config_cls, description, examples)
    p.add_argument("--fid-samples", type=int, default=FID_SAMPLES,
                   help="samples per FID at the end (0: no FID)")
    args = p.parse_args(argv)
    run = train(common.config_for_new_run(config_cls, p, args))
    print_report(run, args.fid_samples)
    return run

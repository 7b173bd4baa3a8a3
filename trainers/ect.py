"""Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy") of a trained EDM
diffusion model (a trainers.dm run folder) into a consistency model, on the 8x8 digits.

The diffusion model's weights are copied into a kind="consistency" model (the preconditioning
differs only by the sigma_min shift), then trained on continuous-time pairs t > r that share the
noise direction z (ECT Eq. 12):

    t ~ lognormal(P_mean, P_std),  r = t (1 - n(t) / q^a),  a = floor(step / d)    (ECT Eq. 18)
    n(t) = 1 + k sigmoid(-b t)
    loss = d(f_theta(x + t z, t), stopgrad f_theta(x + r z, r)) / (t - r)

so the step dt = t - r shrinks by q every d steps, from dt = t (r = 0: diffusion-style pairs
(x_t, x), ECT's starting point) towards consistency between nearby levels. Details:
- r is clamped at 0 (ECT App. A); where r < sigma_min, below which the consistency model is not
  defined, the target is the clean image x (the boundary f(x, 0) = x, what ECT's r = 0 means)
  and the weight uses r = 0. t is clamped to [sigma_min, sigma_max].
- d is the pseudo-Huber distance (iCT Eq. 8): ECT (Sec. 3.3, App. A) reads it as the squared L2
  with an adaptive per-sample weight 1 / sqrt(||.||^2 + c^2), and keeps it.
- The weighting is ECT's w(t, r) = 1 / (t - r) (Sec. 3.3; its regular weighting w(t) = 1),
  divided by q^a (normalize_weighting): dt shrinks by q at every stage, so 1 / (t - r) and with
  it the gradient (the pseudo-Huber's is about unit-norm per sample) grow by q at each stage,
  faster than Adam's second moment follows in stages of a few hundred steps. The constant per
  stage leaves the relative weights within a stage as ECT has them.
- Student and target draw the same dropout masks (ECT Sec. 3.1); no EMA target.
"""

from __future__ import annotations

import dataclasses

import torch

from . import common
from .cd import load_teacher, student_config, student_from
from .consistency import P_MEAN, P_STD, main_for, paired_forward, pseudo_huber
from .networks import SIGMA_MAX, SIGMA_MIN

EXAMPLES = """examples:
  python -m lcsc_fast.trainers.dm --out runs/dm                            # the teacher first
  python -m lcsc_fast.trainers.ect --teacher runs/dm --out runs/ect        # the default run
  python -m lcsc_fast.trainers.ect --teacher runs/dm --out runs/ect-long --steps 4000 \\
      --stage-steps 500
  python -m lcsc_fast.trainers.ect --teacher runs/dm --out /tmp/ect-smoke --steps 20 --every 10 \\
      --fid-samples 0
"""


@dataclasses.dataclass
class ECTConfig(common.TrainConfig):
    out: str = "runs/ect"
    teacher: str = ""  # the diffusion model's run folder (trainers.dm); its EMA weights
    steps: int = 1500
    every: int = 50
    lr: float = 2e-4
    warmup_steps: int = 50
    dropout: float = 0.1
    ema_rate: float = 0.999
    stage_steps: int = 250  # d: dt shrinks by q every d steps
    q: float = 2.0  # ECT Eq. 18
    k: float = 8.0
    b: float = 1.0
    p_mean: float = P_MEAN  # t ~ lognormal
    p_std: float = P_STD
    huber_c: float | None = None  # None: 0.00054 sqrt(64)
    normalize_weighting: bool = True  # w(t, r) / q^a: the same relative weights at a stage


# ECT Eq. 18 (App. A): r / t = 1 - n(t) / q^a, n(t) = 1 + k sigmoid(-b t), a = floor(step / d),
# r clamped at 0. t: [n] -> r: [n].
def ect_r(t: torch.Tensor, step: int, stage_steps: int, q: float = 2.0, k: float = 8.0,
          b: float = 1.0) -> torch.Tensor:
    a = step // stage_steps
    return (t * (1 - (1 + k * torch.sigmoid(-b * t)) / q ** a)).clamp(min=0)


class ECTLoss:
    """loss_fn(model, batch, step) for common.train: the ECT loss of the module docstring."""

    def __init__(self, config: ECTConfig):
        self.config = config

    def __call__(self, model, x: torch.Tensor, step: int) -> torch.Tensor:
        c = self.config
        t = (c.p_mean + c.p_std * torch.randn(len(x))).exp().clamp(SIGMA_MIN, SIGMA_MAX)
        r = ect_r(t, step, c.stage_steps, c.q, c.k, c.b)
        boundary = r < SIGMA_MIN
        r = torch.where(boundary, torch.zeros_like(r), r)
        z = torch.randn_like(x)
        x_t = x + t[:, None, None, None] * z
        if boundary.all():  # diffusion-style pairs only: no target evaluation needed
            student, target = model(x_t, t), x
        else:
            r_eval = r.clamp(min=SIGMA_MIN)
            student, target = paired_forward(model, x_t, t, x + r_eval[:, None, None, None] * z,
                                             r_eval)
            target = torch.where(boundary[:, None, None, None], x, target)
        weight = 1 / (t - r)
        if c.normalize_weighting:
            weight = weight / c.q ** (step // c.stage_steps)
        return (weight * pseudo_huber(student, target, c.huber_c)).mean()


def train(config: ECTConfig) -> common.Run:
    """Tunes config.teacher's EMA model into a consistency model."""
    if not config.teacher:
        raise ValueError("ECTConfig.teacher: empty; give the run folder of a trained diffusion "
                         "model (--teacher runs/dm)")
    teacher, spec = load_teacher(config.teacher)
    config = student_config(config, spec)
    model = student_from(config, teacher, "teacher")
    return common.train(config, "ect", model, ECTLoss(config))


def main(argv=None) -> common.Run:
    return main_for(ECTConfig, train, (
        "Easy Consistency Tuning (ECT) of a trained EDM diffusion model on the 8x8 digits; prints"
        " the FIDs of the final and EMA models at 1 and 2 steps."), EXAMPLES, argv)


if __name__ == "__main__":
    main()

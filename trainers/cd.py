"""Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2) of a trained EDM
diffusion model (a trainers.dm run folder, its EMA weights) on the 8x8 digits.

For a pair of adjacent Karras levels sigma_n < sigma_{n+1}:

    x_{n+1} = x + sigma_{n+1} z
    x_hat_n = one Heun step of the teacher's PF-ODE from sigma_{n+1} to sigma_n   (CM Eq. 6)
    loss    = lambda d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n))   (CM Eq. 7)

Choices, and why:
- Target theta-: the stop-gradient of the current student (target_ema = 0), not CM's EMA target
  (mu = 0.95 on CIFAR-10). iCT (Sec. 3.2) shows that an EMA target biases the objective; with a
  fixed teacher the bias is smaller than in CT, but the EMA only slows the propagation of the
  boundary condition down the levels, which short runs cannot afford. --target-ema 0.95 gives
  CM's target for comparison (measured on the digits: see the issue's report).
- Student initialised from the teacher's weights. The consistency preconditioning differs from
  EDM's only by the sigma_min shift in c_skip and c_out, so the teacher's network is already a
  good consistency function near sigma_min and the distillation only has to teach it to jump
  far; from scratch it would first relearn denoising. The student therefore takes the teacher's
  architecture (arch, width, depth, channels): those options of the config are overwritten by
  the teacher's.
- iCT's improvements carry over to the student's loss: pseudo-Huber d (iCT Eq. 8), lambda =
  1 / (sigma_{n+1} - sigma_n) (Sec. 3.1), pairs drawn from the discrete lognormal (Eq. 10), and a
  fixed number of levels (CM's CD uses N = 18 with Heun on CIFAR-10: the teacher's ODE error is
  what limits N from above, not a curriculum).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from . import common
from .consistency import (P_MEAN, P_STD, ict_weighting, main_for, paired_forward,
                          pseudo_huber, sample_level_pairs)

EXAMPLES = """examples:
  python -m lcsc_fast.trainers.dm --out runs/dm                           # the teacher first
  python -m lcsc_fast.trainers.cd --teacher runs/dm --out runs/cd         # the default run
  python -m lcsc_fast.trainers.cd --teacher runs/dm --out runs/cd-ema --target-ema 0.95
  python -m lcsc_fast.trainers.cd --teacher runs/dm --out runs/cd-40 --num-levels 40
  python -m lcsc_fast.trainers.cd --teacher runs/dm --out /tmp/cd-smoke --steps 20 --every 10 \\
      --fid-samples 0
"""

ARCH_FIELDS = ("arch", "width", "depth", "channels")


@dataclasses.dataclass
class CDConfig(common.TrainConfig):
    out: str = "runs/cd"
    teacher: str = ""  # the teacher's run folder (trainers.dm); its EMA weights are used
    steps: int = 2000
    every: int = 50
    lr: float = 5e-4
    warmup_steps: int = 50
    dropout: float = 0.0  # the teacher's networks are trained without
    ema_rate: float = 0.995  # the EMA starts at the teacher's weights: forget them in ~1K steps
    num_levels: int = 18  # N Karras levels (CM: 18 with Heun)
    target_ema: float = 0.0  # 0: theta- = stopgrad(theta) (iCT); CM: 0.95
    init: str = "teacher"  # "teacher" (its weights) or "scratch"
    p_mean: float = P_MEAN  # the lognormal over level pairs (iCT Eq. 10)
    p_std: float = P_STD
    huber_c: float | None = None  # None: 0.00054 sqrt(64)


# One step of EDM's 2nd-order Heun solver for the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma
# (Karras et al. 2022, Alg. 1 lines 5-8): CM Eq. 6's x_hat with Phi = Heun. x: [n, ...];
# sigma_from, sigma_to: [n] (or scalars), both > 0.
@torch.no_grad()
def heun_step(denoiser, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """x at noise level sigma_from moved along the teacher's ODE to sigma_to."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s_from = torch.as_tensor(sigma_from, dtype=x.dtype).expand(x.shape[0])
    s_to = torch.as_tensor(sigma_to, dtype=x.dtype).expand(x.shape[0])
    h = (s_to - s_from).view(shape)
    d_from = (x - denoiser(x, s_from)) / s_from.view(shape)
    x_euler = x + h * d_from
    d_to = (x_euler - denoiser(x_euler, s_to)) / s_to.view(shape)
    return x + h * (0.5 * d_from + 0.5 * d_to)


class CDLoss:
    """loss_fn(model, batch, step) for common.train: the distillation loss of the module
    docstring, the target kept as an EMA of the student when target_ema > 0."""

    def __init__(self, config: CDConfig, teacher: torch.nn.Module, student: torch.nn.Module):
        self.config, self.teacher = config, teacher
        self.target = (copy.deepcopy(student).requires_grad_(False)
                       if config.target_ema > 0 else None)

    def __call__(self, model, x: torch.Tensor, step: int) -> torch.Tensor:
        c = self.config
        if self.target is not None and step > 1:  # theta- after the previous update (CM Eq. 8)
            common.update_ema(self.target, model, c.target_ema)
        sigma_lo, sigma_hi = sample_level_pairs(c.num_levels, len(x), c.p_mean, c.p_std)
        x_hi = x + sigma_hi[:, None, None, None] * torch.randn_like(x)
        x_hat = heun_step(self.teacher, x_hi, sigma_hi, sigma_lo)
        student, target = paired_forward(model, x_hi, sigma_hi, x_hat, sigma_lo, self.target)
        return (ict_weighting(sigma_lo, sigma_hi) * pseudo_huber(student, target,
                                                                 c.huber_c)).mean()


def load_teacher(run_dir) -> tuple[torch.nn.Module, dict]:
    """The teacher's EMA model (eval, no gradients) and its build_model spec."""
    spec = common.read_config(run_dir)["model"]
    if spec.get("kind") != "edm":
        raise ValueError(f"{run_dir}: the teacher's model is of kind {spec.get('kind')!r}; "
                         "distillation and ECT start from a diffusion model (kind 'edm'), "
                         "e.g. a `python -m lcsc_fast.trainers.dm` run")
    return common.load_model(run_dir, "ema"), spec


def student_config(config, teacher_spec: dict):
    """config with the teacher's architecture (the student copies the teacher's network)."""
    return dataclasses.replace(config, **{k: teacher_spec[k] for k in ARCH_FIELDS
                                          if k in teacher_spec})


def student_from(config, teacher: torch.nn.Module, init: str = "teacher") -> torch.nn.Module:
    """A consistency model of config's spec, with the teacher's weights (init "teacher")."""
    student = common.new_model(common.model_spec(config, "consistency"))
    if init == "teacher":
        student.load_state_dict(teacher.state_dict())
    elif init != "scratch":
        raise ValueError(f"init: {init!r} is not 'teacher' or 'scratch'")
    return student


def train(config: CDConfig) -> common.Run:
    """Distils config.teacher's EMA model into a consistency model."""
    if not config.teacher:
        raise ValueError("CDConfig.teacher: empty; give the run folder of a trained diffusion "
                         "model (--teacher runs/dm)")
    teacher, spec = load_teacher(config.teacher)
    config = student_config(config, spec)
    student = student_from(config, teacher, config.init)
    return common.train(config, "cd", student, CDLoss(config, teacher, student))


def main(argv=None) -> common.Run:
    return main_for(CDConfig, train, (
        "Consistency distillation of a trained EDM diffusion model on the 8x8 digits; prints the "
        "FIDs of the final and EMA models at 1 and 2 steps."), EXAMPLES, argv)


if __name__ == "__main__":
    main()

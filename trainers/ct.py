"""Consistency training from scratch, iCT-style (Song & Dhariwal 2023), on the 8x8 digits.

The loss (iCT Eq. 4 with the improvements of its Sec. 3):

    lambda(sigma_i) d(f_theta(x + sigma_{i+1} z, sigma_{i+1}), stopgrad f_theta(x + sigma_i z, sigma_i))

with d the pseudo-Huber distance (Eq. 8), lambda = 1 / (sigma_{i+1} - sigma_i) (Sec. 3.1), the
pair i drawn from the discrete lognormal (Eq. 10) over N(k) Karras levels, N(k) doubling along
training (Eq. 9). The target is the current model itself under stop-gradient, no EMA teacher
(iCT Sec. 3.2: an EMA teacher makes the loss inconsistent as N grows), evaluated in training mode
with the student's dropout masks (Sec. 3.1). The standard EMA that common.train keeps is only for
sampling.

Short runs. iCT ramps N from s0 + 1 = 11 to s1 + 1 = 1281 levels over 400K iterations. At a few
thousand steps, doubling up to 1281 leaves each stage a few hundred steps, too few for the model
to follow the finer grid, so the default ends at s1 = 160 (N up to 161, 5 stages, each a fifth
of the run); --s1 1280 gives iCT's schedule.
"""

from __future__ import annotations

import dataclasses

import torch

from . import common
from .consistency import (ICT_S0, P_MEAN, P_STD, discretization_steps, ict_weighting,
                          main_for, mean_ict_weighting, paired_forward, pseudo_huber,
                          sample_level_pairs)

EXAMPLES = """examples:
  python -m lcsc_fast.trainers.ct --out runs/ct                        # the default run
  python -m lcsc_fast.trainers.ct --out runs/ct-long --steps 8000 --every 100
  python -m lcsc_fast.trainers.ct --out runs/ct-ict --s1 1280          # iCT's full curriculum
  python -m lcsc_fast.trainers.ct --out runs/ct-unet --arch unet --channels 32 --dropout 0.1
  python -m lcsc_fast.trainers.ct --out /tmp/ct-smoke --steps 20 --every 10 --fid-samples 0
"""


@dataclasses.dataclass
class CTConfig(common.TrainConfig):
    out: str = "runs/ct"
    steps: int = 3000
    every: int = 50
    lr: float = 1e-3
    dropout: float = 0.1  # iCT uses 0.3 on CIFAR-10; this MLP does best with less
    ema_rate: float = 0.999
    s0: int = ICT_S0  # the curriculum's first N is s0 + 1
    s1: int = 160  # ... and its last s1 + 1 (iCT: 1280; see the module docstring)
    p_mean: float = P_MEAN  # the lognormal over noise levels (iCT Eq. 10)
    p_std: float = P_STD
    huber_c: float | None = None  # None: 0.00054 sqrt(64)
    normalize_weighting: bool = True  # lambda / E[lambda] at the current N (see consistency)


class CTLoss:
    """loss_fn(model, batch, step) for common.train: the iCT loss at step's N(k)."""

    def __init__(self, config: CTConfig):
        self.config = config

    def num_levels(self, step: int) -> int:
        c = self.config
        return discretization_steps(step - 1, c.steps, c.s0, c.s1)  # steps count from 1

    def __call__(self, model, x: torch.Tensor, step: int) -> torch.Tensor:
        c = self.config
        num_levels = self.num_levels(step)
        sigma_lo, sigma_hi = sample_level_pairs(num_levels, len(x), c.p_mean, c.p_std)
        s_lo, s_hi = sigma_lo[:, None, None, None], sigma_hi[:, None, None, None]
        z = torch.randn_like(x)
        student, target = paired_forward(model, x + s_hi * z, sigma_hi, x + s_lo * z, sigma_lo)
        weight = ict_weighting(sigma_lo, sigma_hi)
        if c.normalize_weighting:
            weight = weight / mean_ict_weighting(num_levels, c.p_mean, c.p_std)
        return (weight * pseudo_huber(student, target, c.huber_c)).mean()


def train(config: CTConfig) -> common.Run:
    """Trains a consistency model (networks.build_model(kind="consistency")) from scratch."""
    model = common.new_model(common.model_spec(config, "consistency"))
    return common.train(config, "ct", model, CTLoss(config))


def main(argv=None) -> common.Run:
    return main_for(CTConfig, train, (
        "Consistency training (iCT-style) on the 8x8 digits; prints the FIDs of the final and EMA"
        " models at 1 and 2 steps."), EXAMPLES, argv)


if __name__ == "__main__":
    main()

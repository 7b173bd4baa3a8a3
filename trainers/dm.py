"""EDM diffusion training on 8x8 digits (Karras et al. 2022), recording an LCSC trajectory.

The loss is EDM's (their Eq. 2 with Tab. 1's choices): ln sigma ~ N(P_mean, P_std^2), weight
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, on ||D(x + sigma n, sigma) - x||^2
with D the preconditioned denoiser of networks.Denoiser (kind "edm"). Samples are drawn with
EDM's deterministic Heun sampler (sampling.edm_sample) at a chosen NFE.

    python -m lcsc_fast.trainers.dm --out runs/dm
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import common
from .networks import SIGMA_DATA, Denoiser, build_model
from .sampling import edm_sample

EVAL_SEED = 1  # the noise of the FIDs main() prints (a search's own noise is seed 0)
EVAL_NFES = (15, 9)


@dataclasses.dataclass
class DMConfig(common.TrainConfig):
    """TrainConfig plus EDM's noise-level distribution; the defaults train the MLP (923K
    parameters) in about a minute on two idle CPU cores (12 ms a step)."""

    out: str = "runs/dm"
    steps: int = 4000
    lr: float = 2e-3
    ema_rate: float = 0.999
    p_mean: float = -1.2  # ln sigma ~ N(p_mean, p_std^2) (EDM, Tab. 1)
    p_std: float = 1.2


def edm_loss(model: Denoiser, images: torch.Tensor, p_mean: float = -1.2,
             p_std: float = 1.2) -> torch.Tensor:
    """EDM's training loss (Karras et al. 2022, Eq. 2 and Tab. 1), averaged over pixels and
    the batch: lambda(sigma) ||D(x + sigma n, sigma) - x||^2 with ln sigma ~ N(p_mean, p_std^2).
    The weight makes the effective target of F unit-variance at every sigma."""
    n = images.shape[0]
    sigma = (p_mean + p_std * torch.randn(n, device=images.device)).exp()  # [n]
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    noisy = images + sigma[:, None, None, None] * torch.randn_like(images)
    error = (model(noisy, sigma) - images).square().mean(dim=(1, 2, 3))  # [n]
    return (weight * error).mean()


def train(config: DMConfig) -> common.Run:
    """Train a diffusion model per config; the run folder is config.out (see common)."""
    spec = common.model_spec(config, "edm")
    torch.manual_seed(config.seed)  # the initial weights
    model = build_model(**spec)

    def loss_fn(model, images, step):
        return edm_loss(model, images, config.p_mean, config.p_std)

    return common.train(config, "dm", model, loss_fn)


def sampler(nfe: int) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """sampler(model, noise [n, 1, 8, 8]) -> images: EDM's Heun sampler with nfe evaluations,
    the `sampler` of a metrics.FIDObjective."""
    def sample(model, noise):
        return edm_sample(model, noise, nfe)

    sample.__name__ = f"edm_sample_nfe{nfe}"
    return sample


def fid(model: torch.nn.Module, nfe: int, num_samples: int = 2000,
        seed: int = EVAL_SEED) -> float:
    """FID (the digits classifier's features, against all 1,797 digits) of num_samples images
    sampled by edm_sample with nfe evaluations from the noise of `seed`."""
    from lcsc_fast import metrics

    from . import classifier

    objective = metrics.FIDObjective(sampler(nfe), classifier.feature_extractor(),
                                     classifier.reference_statistics(), num_samples,
                                     noise_shape=(1, 8, 8), seed=seed)
    return objective(model)


EXAMPLES = """\
examples:
  python -m lcsc_fast.trainers.dm --out runs/dm                  # MLP, the defaults (~1 min)
  python -m lcsc_fast.trainers.dm --out runs/dm --steps 3000 --threads 1   # on a busy machine
  python -m lcsc_fast.trainers.dm --out runs/dm-unet --arch unet --steps 1000
  python -m lcsc_fast.trainers.dm --out runs/dm --every 100 --fid-samples 0  # no FID

then search the trajectory it recorded:
  lcsc-fast inspect runs/dm/trajectory
"""


def main(argv=None) -> common.Run:
    p = common.parser_for(DMConfig, "Train an EDM diffusion model on 8x8 digits, recording "
                                    "its checkpoints for LCSC.", EXAMPLES)
    p.prog = "python -m lcsc_fast.trainers.dm"
    p.add_argument("--fid-samples", type=int, default=2000,
                   help="samples per FID at the end (0: no FID); default 2000")
    args = p.parse_args(argv)
    config = common.config_for_new_run(DMConfig, p, args)
    run = train(config)
    print(f"trained {config.steps} steps in {run.seconds:.1f} s; run folder: {run.directory}, "
          f"trajectory: {run.trajectory_dir}")
    if args.fid_samples:
        for nfe in EVAL_NFES:
            final, ema = (fid(m, nfe, args.fid_samples) for m in (run.model, run.ema))
            print(f"FID (NFE {nfe}, {args.fid_samples} samples): final {final:.3f}, "
                  f"EMA {ema:.3f}")
    return run


if __name__ == "__main__":
    main()

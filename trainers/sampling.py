"""Deterministic samplers: EDM's Heun sampler for diffusion models (NFE settable) and 1- or
2-step sampling for consistency models. Each maps fixed noise to images, so two models sampled
from the same noise differ only by their weights (what an LCSC search compares)."""

from __future__ import annotations

import itertools

import torch

from .networks import SIGMA_MAX, SIGMA_MIN

RHO = 7.0
# iCT's intermediate noise level for 2-step sampling (Song & Dhariwal 2023, Sec. 5).
SIGMA_MID = 0.821


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """EDM's noise levels (Karras et al. 2022, Eq. 5): num_steps levels from sigma_max down to
    sigma_min, spaced uniformly in sigma^(1/rho), then a final 0. [num_steps + 1], float64."""
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv ** rho, torch.zeros(1, dtype=torch.float64)])


def heun_steps_for_nfe(nfe: int) -> int:
    """Heun with n levels evaluates the network 2n - 1 times (the last step is Euler): the
    number of levels for an odd NFE."""
    if nfe < 1 or nfe % 2 == 0:
        raise ValueError(f"nfe: {nfe}; Heun sampling takes an odd number of evaluations "
                         "(2 * steps - 1)")
    return (nfe + 1) // 2


@torch.no_grad()
def edm_sample(model, noise: torch.Tensor, nfe: int = 15) -> torch.Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1 with S_churn = 0)
    from noise [n, ...] ~ N(0, I) with nfe network evaluations; images in about [-1, 1]."""
    sigmas = karras_sigmas(heun_steps_for_nfe(nfe)).tolist()
    x = noise.to(torch.float32) * sigmas[0]
    for s_cur, s_next in itertools.pairwise(sigmas):
        d_cur = (x - model(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:  # the 2nd-order correction
            d_next = (x_next - model(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def consistency_sample(model, noise: torch.Tensor, steps: int = 1,
                       sigma_mid: float = SIGMA_MID) -> torch.Tensor:
    """Consistency-model sampling (Song et al. 2023, Alg. 1): x = f(sigma_max z_0, sigma_max);
    with steps = 2, x = f(x + sqrt(sigma_mid^2 - sigma_min^2) z_1, sigma_mid).

    noise: [n, steps, *image], one standard normal draw per step (noise_shape(steps) gives
    the per-sample shape to ask a FIDObjective for)."""
    if steps not in (1, 2):
        raise ValueError(f"steps: {steps}; consistency sampling here takes 1 or 2 steps")
    if noise.dim() < 2 or noise.shape[1] != steps:
        raise ValueError(f"noise: shape {tuple(noise.shape)}; {steps}-step sampling takes "
                         f"[n, {steps}, *image]")
    noise = noise.to(torch.float32)
    x = model(noise[:, 0] * SIGMA_MAX, SIGMA_MAX)
    if steps == 2:
        x = model(x + (sigma_mid ** 2 - SIGMA_MIN ** 2) ** 0.5 * noise[:, 1], sigma_mid)
    return x


def noise_shape(steps: int, image_shape=(1, 8, 8)) -> tuple:
    """One sample's noise for consistency_sample with `steps` steps."""
    return (steps, *image_shape)

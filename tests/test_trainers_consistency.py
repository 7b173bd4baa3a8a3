"""The consistency trainers (lcsc_fast.trainers: consistency, ct, cd, ect): iCT's curriculum,
distance and noise-level sampling, ECT's mapping, the teacher's Heun step on denoisers whose
ODE is known exactly, 1/2-step sampling, and a few-step smoke run of each trainer."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sklearn", reason="the trainers need scikit-learn's digits")

import lcsc_fast  # noqa: E402
from lcsc_fast.trainers import cd, common, consistency, ct, ect, sampling  # noqa: E402
from lcsc_fast.trainers.networks import SIGMA_MAX, SIGMA_MIN, build_model  # noqa: E402

TINY = dict(width=32, depth=1, batch_size=16, warmup_steps=2, threads=1, progress=False)


# ---------------------------------------------------------------- iCT's pieces

@pytest.mark.parametrize("k, expected", [
    (0, 11), (99, 11), (100, 21), (199, 21), (200, 41), (300, 81), (400, 161), (500, 321),
    (600, 641), (699, 641), (700, 1281), (799, 1281), (10_000, 1281)])
def test_curriculum_doubles_from_s0_to_s1(k, expected):
    # s1 / s0 = 128: K' = floor(800 / (7 + 1)) = 100 steps per stage.
    assert consistency.discretization_steps(k, 800, 10, 1280) == expected


def test_curriculum_with_a_ratio_that_is_not_a_power_of_two():
    # floor(s1 / s0) = 17: K' = floor(100 / (log2(17) + 1)) = floor(19.66) = 19, and the
    # sixth stage's 10 * 2^5 = 320 is capped at s1 = 170.
    ks = (0, 18, 19, 38, 57, 76, 95, 99)
    n = [consistency.discretization_steps(k, 100, 10, 170) for k in ks]
    assert n == [11, 11, 21, 41, 81, 161, 171, 171]
    # log2(floor(1000 / 10)) = 6.64: K' = floor(766 / 7.64) = 100.
    assert consistency.discretization_steps(99, 766, 10, 1000) == 11
    assert consistency.discretization_steps(100, 766, 10, 1000) == 21
    assert consistency.discretization_steps(10**6, 766, 10, 1000) == 1001


def test_pseudo_huber_against_a_hand_computation():
    x = torch.zeros(2, 1, 8, 8)
    y = torch.zeros(2, 1, 8, 8)
    y[0, 0, 0, 0], y[0, 0, 3, 5] = 3.0, 4.0  # ||x - y|| = 5
    y[1, 0, 7, 7] = 1e-4  # far below c: d ~ ||x - y||^2 / (2c)
    c = 0.00054 * 8.0  # sqrt(64) = 8
    assert consistency.pseudo_huber_c(64) == pytest.approx(c)
    d = consistency.pseudo_huber(x, y).double()
    assert d[0].item() == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-6)
    assert d[1].item() == pytest.approx(1e-8 / (2 * c), rel=1e-3)
    assert consistency.pseudo_huber(x, y, c=0.0)[0].item() == pytest.approx(5.0)


def test_karras_boundaries_are_the_sampler_levels_ascending():
    b = consistency.karras_boundaries(18)
    assert b[0].item() == pytest.approx(SIGMA_MIN) and b[-1].item() == pytest.approx(SIGMA_MAX)
    assert bool((b[1:] > b[:-1]).all())
    torch.testing.assert_close(b, sampling.karras_sigmas(18)[:-1].flip(0))


@pytest.mark.parametrize("num_levels", [11, 161, 1281])
def test_lognormal_level_probabilities_sum_to_one_and_favour_the_middle(num_levels):
    b = consistency.karras_boundaries(num_levels)
    p = consistency.lognormal_level_probabilities(b)
    assert p.shape == (num_levels - 1,) and bool((p > 0).all())
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    top = int(p.argmax())
    assert 0 < top < num_levels - 2 and p[top] > 3 * p[0] and p[top] > 3 * p[-1]
    # The most likely pair is near the lognormal's median exp(P_mean) = 0.33 ...
    assert b[top] < 1.0 and b[top + 1] > 0.05
    # ... and half the mass lies below it, as for the continuous lognormal.
    below = p[b[1:] <= math.exp(consistency.P_MEAN)].sum().item()
    assert abs(below - 0.5) < 0.1


def test_sampled_level_pairs_are_adjacent_and_follow_the_probabilities():
    g = torch.Generator().manual_seed(0)
    lo, hi = consistency.sample_level_pairs(11, 20_000, generator=g)
    b = consistency.karras_boundaries(11).float()
    i = torch.searchsorted(b, lo)
    torch.testing.assert_close(b[i], lo)
    torch.testing.assert_close(b[i + 1], hi)
    frequencies = torch.bincount(i, minlength=10).double() / len(i)
    expected = consistency.lognormal_level_probabilities(consistency.karras_boundaries(11))
    assert (frequencies - expected).abs().max().item() < 0.015


def test_mean_ict_weighting_is_the_sampled_mean_and_doubles_with_n():
    g = torch.Generator().manual_seed(1)
    lo, hi = consistency.sample_level_pairs(41, 200_000, generator=g)
    empirical = consistency.ict_weighting(lo, hi).double().mean().item()
    assert consistency.mean_ict_weighting(41) == pytest.approx(empirical, rel=0.02)
    ratios = [consistency.mean_ict_weighting(2 * n + 1) / consistency.mean_ict_weighting(n + 1)
              for n in (10, 20, 40, 80, 160, 320, 640)]
    assert all(1.8 < r < 2.2 for r in ratios), ratios


def test_paired_forward_shares_the_dropout_masks():
    model = build_model("mlp", "consistency", dropout=0.5, width=32, depth=1).train()
    x, sigma = torch.randn(8, 1, 8, 8), torch.full((8,), 1.0)
    student, target = consistency.paired_forward(model, x, sigma, x, sigma)
    assert student.requires_grad and not target.requires_grad
    torch.testing.assert_close(student.detach(), target, rtol=0, atol=0)
    assert not torch.equal(model(x, sigma), model(x, sigma))  # dropout is on


# ---------------------------------------------------------------- ECT's mapping

def test_ect_r_is_below_t_and_dt_shrinks_with_the_stage():
    t = torch.logspace(-2.5, math.log10(80.0), 200)
    previous = t.clone()  # dt = t - r at the previous stage
    for stage in range(8):
        r = ect.ect_r(t, step=stage * 100 + 50, stage_steps=100)
        assert bool((r >= 0).all()) and bool((r < t).all())
        dt = t - r
        assert bool((dt <= previous).all())
        if stage == 0:  # n(t) >= 1 = q^0: diffusion-style pairs (x_t, x)
            assert bool((r == 0).all())
        if stage >= 4:  # q^a = 16 > n(t) <= 5: strictly inside, and halving
            assert bool((r > 0).all()) and bool((dt < previous).all())
            ratio = (1 + 8 * torch.sigmoid(-t)) / 2 ** stage
            torch.testing.assert_close(dt / t, ratio, rtol=1e-5, atol=1e-7)
        previous = dt


def test_ect_loss_uses_the_clean_image_below_sigma_min():
    model = build_model("mlp", "consistency", width=16, depth=1)
    config = ect.ECTConfig(stage_steps=1)
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    loss = ect.ECTLoss(config)(model, x, step=0)  # stage 0: r = 0, target x
    torch.manual_seed(0)
    t = (config.p_mean + config.p_std * torch.randn(4)).exp().clamp(SIGMA_MIN, SIGMA_MAX)
    z = torch.randn_like(x)
    want = consistency.pseudo_huber(model(x + t[:, None, None, None] * z, t), x) / t
    torch.testing.assert_close(loss, want.mean())


# ---------------------------------------------------------------- the teacher's Heun step

def test_heun_step_is_exact_for_a_point_mass():
    # Data = a point xi: D(x, sigma) = xi, the ODE's solution is x(s) = xi + (x0 - xi) s / s0.
    xi = torch.randn(1, 1, 8, 8)
    x = xi + 3.0 * torch.randn(5, 1, 8, 8)
    out = cd.heun_step(lambda x, s: xi.expand_as(x), x, 3.0, 0.7)
    torch.testing.assert_close(out, xi + (x - xi) * (0.7 / 3.0))


def _gaussian_denoiser(mu: float, s: float):
    """E[x | x + sigma z] for data ~ N(mu, s^2) per pixel."""
    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])[:, None, None, None]
        return mu + s * s / (s * s + sigma * sigma) * (x - mu)
    return denoise


def test_heun_step_is_second_order_on_gaussian_data():
    # The ODE's exact flow for N(mu, s^2) data: x(b) = mu + (x(a) - mu) sqrt(s^2 + b^2) /
    # sqrt(s^2 + a^2). Heun's local error shrinks as h^3 (Euler's as h^2).
    mu, s = 0.3, 0.5
    denoise = _gaussian_denoiser(mu, s)
    x = (mu + 2.0 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))).double()

    def errors(a, b):
        exact = mu + (x - mu) * math.sqrt(s * s + b * b) / math.sqrt(s * s + a * a)
        heun = cd.heun_step(denoise, x, a, b)
        euler = x + (b - a) * (x - denoise(x, a)) / a
        return (heun - exact).abs().max().item(), (euler - exact).abs().max().item()

    a = 1.0
    (heun_h, euler_h), (heun_h2, _) = errors(a, a - 0.1), errors(a, a - 0.05)
    assert heun_h < euler_h / 10
    assert 6.0 < heun_h / heun_h2 < 10.0  # ~2^3


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_shapes(steps):
    model = build_model("mlp", "consistency", width=16, depth=1).eval()
    noise = torch.randn(5, *sampling.noise_shape(steps))
    images = consistency.sampler(steps)(model, noise)
    assert images.shape == (5, 1, 8, 8) and bool(images.isfinite().all())
    with pytest.raises(ValueError, match="1 or 2 steps"):
        consistency.sampler(3)


def test_a_consistency_model_is_the_identity_at_sigma_min():
    model = build_model("mlp", "consistency", width=16, depth=1).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x, SIGMA_MIN), x)


# ---------------------------------------------------------------- smoke runs

def _check_run(run, steps=(3, 6)):
    for sub in ("", "ema"):
        trajectory = lcsc_fast.Trajectory.open(f"{run.trajectory_dir}/{sub}".rstrip("/"))
        assert trajectory.steps == list(steps)
    assert run.model.kind == "consistency" and not run.model.training
    noise = torch.randn(4, *sampling.noise_shape(2))
    assert bool(consistency.sampler(2)(run.ema, noise).isfinite().all())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny EDM run folder (a few steps: only its format and weights matter here)."""
    out = tmp_path_factory.mktemp("dm")
    config = common.TrainConfig(out=str(out), steps=3, every=3, **TINY)
    model = build_model("mlp", "edm", width=32, depth=1)
    common.train(config, "dm", model, lambda m, x, step: (m(x, 1.0) - x).square().mean())
    return str(out)


def test_ct_smoke(tmp_path):
    config = ct.CTConfig(out=str(tmp_path / "ct"), steps=6, every=3, dropout=0.1, **TINY)
    run = ct.train(config)
    _check_run(run)
    assert common.read_config(run.directory)["trainer"] == "ct"
    figures = consistency.fid_figures(run, num_samples=50)
    assert sorted(figures) == [("ema", 1), ("ema", 2), ("model", 1), ("model", 2)]
    assert all(math.isfinite(v) and v > 0 for v in figures.values())


def test_ct_main_prints_the_training_time(tmp_path, capsys):
    ct.main(["--out", str(tmp_path / "ct"), "--steps", "3", "--every", "3", "--width", "16",
             "--depth", "1", "--threads", "1", "--no-progress", "--fid-samples", "0"])
    assert "trained in" in capsys.readouterr().out


@pytest.mark.parametrize("target_ema", [0.0, 0.9], ids=["target=stopgrad", "target=ema"])
def test_cd_smoke(tmp_path, teacher, target_ema):
    config = cd.CDConfig(out=str(tmp_path / "cd"), teacher=teacher, steps=6, every=3,
                         target_ema=target_ema, **{**TINY, "width": 64})
    run = cd.train(config)
    _check_run(run)
    recorded = common.read_config(run.directory)
    assert recorded["model"]["width"] == 32  # the teacher's architecture, not the config's
    assert recorded["config"]["teacher"] == teacher


def test_cd_student_starts_from_the_teacher(teacher):
    t, spec = cd.load_teacher(teacher)
    student = cd.student_from(cd.student_config(cd.CDConfig(), spec), t)
    for (name, a), b in zip(student.state_dict().items(), t.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 1, 8, 8)
    # Same network, preconditionings that differ only by the sigma_min shift.
    torch.testing.assert_close(student(x, 40.0), t(x, 40.0), rtol=1e-3, atol=1e-4)


def test_ect_smoke(tmp_path, teacher):
    config = ect.ECTConfig(out=str(tmp_path / "ect"), teacher=teacher, steps=6, every=3,
                           stage_steps=2, **TINY)
    _check_run(ect.train(config))


def test_cd_and_ect_refuse_a_missing_or_consistency_teacher(tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        cd.train(cd.CDConfig(out=str(tmp_path / "cd")))
    config = ct.CTConfig(out=str(tmp_path / "ct"), steps=3, every=3, **TINY)
    ct.train(config)
    with pytest.raises(ValueError, match="kind 'edm'"):
        ect.train(ect.ECTConfig(out=str(tmp_path / "ect"), teacher=config.out, **TINY))

"""Conditional sampling against exact answers: the exact denoisers and posteriors of posterior_calibration.py checked
against Monte Carlo and importance sampling, the Tweedie guidance against the closed-form E[x0 | x, y] of a Gaussian,
the default sampler's calibration on the 2-pixel Gaussian, the SMC sampler's proposal, resampling and gain with K,
and the bench end to end."""
import json
import math
import os

import pytest
import torch

import edm_mnist
import edm_posterior
import posterior_calibration as pc
from conftest import run_in_process


def random_gaussian(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return pc.GaussianPrior(torch.randn(d, generator=g, dtype=torch.float64) * 0.3, 0.1 * A @ A.T / d + 0.05 * torch.eye(d))


# ----------------------------------------------------------------------------- the exact priors
def test_gaussian_denoiser_is_the_closed_form_conditional_mean():
    """D(x, sigma) = mu + C (C + sigma^2 I)^-1 (x - mu), here by a linear solve rather than the eigenbasis."""
    prior = random_gaussian(6, 0)
    x = torch.randn(5, 6, dtype=torch.float64)
    for sigma in (0.01, 0.3, 5.0):
        want = prior.mu + torch.linalg.solve(prior.C + sigma ** 2 * torch.eye(6, dtype=torch.float64),
                                             (x - prior.mu).T).T @ prior.C.T
        torch.testing.assert_close(prior(x, sigma), want)


@pytest.mark.parametrize("make", [pc.gauss2, pc.gmm2])
def test_denoisers_match_a_monte_carlo_estimate_of_the_conditional_mean(make):
    """E[x0 | x] at a few points x, estimated from prior draws weighted by N(x; x0, sigma^2) (self-normalised)."""
    prior, g = make(), torch.Generator().manual_seed(1)
    x0 = prior.sample(400_000, g)
    for sigma in (0.2, 1.0):
        for point in ([0.5, 0.3], [-0.4, 0.9]):
            x = torch.tensor([point], dtype=torch.float64)
            w = torch.softmax(-((x0 - x) ** 2).sum(1) / (2 * sigma ** 2), 0)
            torch.testing.assert_close(prior(x, sigma)[0], (w[:, None] * x0).sum(0), atol=0.01, rtol=0)


@pytest.mark.parametrize("make", [pc.gauss2, pc.gmm2])
def test_exact_posteriors_match_importance_sampling(make):
    """Observe pixel 0 as y = x0[0] + 0.1 n: the posterior's mean, variance and mixture weights, from prior draws
    weighted by the likelihood."""
    prior, g = make(), torch.Generator().manual_seed(2)
    x0 = prior.sample(400_000, g)
    obs, y = torch.tensor([True, False]), torch.tensor([0.5])
    w = torch.softmax(-((x0[:, 0] - 0.5) / 0.1) ** 2 / 2, 0)[:, None]
    mean, cov = pc.mixture_moments(*prior.posterior(obs, y, 0.1)) if make is pc.gmm2 else prior.posterior(obs, y, 0.1)
    torch.testing.assert_close(mean, (w * x0).sum(0), atol=0.01, rtol=0)
    torch.testing.assert_close(cov.diagonal(), (w * (x0 - mean) ** 2).sum(0), atol=0.01, rtol=0.02)
    if make is pc.gmm2:
        weights, _ = prior.posterior(obs, y, 0.1)
        labels = prior.responsibilities(x0, 0.0)  # soft assignment of each draw to its component
        torch.testing.assert_close(weights, (w * labels).sum(0), atol=0.02, rtol=0)


def test_noiseless_gaussian_posterior_is_the_conditional_gaussian():
    m, C = pc.gauss2().posterior(torch.tensor([True, False]), torch.tensor([0.8]))
    assert m[1].item() == pytest.approx(0.72) and C[1, 1].sqrt().item() == pytest.approx(0.5 * math.sqrt(1 - 0.81))
    assert m[0].item() == pytest.approx(0.8) and C[0, 0].item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- the samplers
def test_tweedie_denoiser_is_exact_for_a_gaussian_prior():
    """With a Gaussian prior, D + J^T m v is E[x0 | x_sigma = x, y] exactly once CG has as many steps as pixels are
    observed: here against the joint Gaussian of (x0, x = x0 + sigma eps, y = x0[obs] + noise n), conditioned."""
    d, prior = 6, random_gaussian(6, 3)
    obs = torch.tensor([True, False, True, False, False, True])
    mask = obs.double()[None]
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, d, generator=g, dtype=torch.float64), mask * torch.randn(1, d, generator=g, dtype=torch.float64)
    for sigma, noise in ((0.05, 0.0), (0.7, 0.0), (3.0, 0.2)):
        H = torch.cat([torch.eye(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)[obs]])  # (x, y) = H x0 + ...
        R = torch.diag(torch.cat([torch.full((d,), sigma ** 2), torch.full((int(obs.sum()),), noise ** 2)])).double()
        gain = prior.C @ H.T @ torch.linalg.inv(H @ prior.C @ H.T + R)
        want = prior.mu + (torch.cat([x, y[:, obs].expand(4, -1)], 1) - H @ prior.mu) @ gain.T
        got = edm_posterior.tweedie_denoiser(prior, x, sigma, y, mask, noise, cg_iters=int(obs.sum()))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_default_sampler_is_calibrated_on_the_two_pixel_gaussian():
    """The issue's case: std 0.5, correlation 0.9, pixel 0 seen exactly at 0.8; p(x1 | y) = N(0.72, 0.218^2). The
    default --guidance, at 18 and at 80 steps, within 0.05 of both."""
    default = pc.sampler_args("tweedie", 18).guidance
    mask, y, _ = pc.observation("gauss2", 0.5, None)
    for steps in (18, 80):
        args = pc.sampler_args("tweedie", steps, guidance=default)
        x = edm_posterior.draw(pc.gauss2(), y, mask, 3000, args, 0, torch.device("cpu"), batch=3000, clamp=False)
        assert abs(x[:, 1].mean().item() - 0.72) < 0.05 and abs(x[:, 1].std().item() - 0.218) < 0.05, steps
        assert torch.equal(x[:, 0], torch.full((3000,), 0.8))


def guided_ancestral_reference(prior, latents, sigmas, y, mask, gen, sigma_data):
    """The SMC sampler's proposal chain, written from its equations with the Gaussian prior's Jacobian in closed form
    (J = U diag(lambda / (lambda + sigma^2)) U^T) instead of autograd."""
    x, s_min = latents * float(sigmas[0]), float(sigmas[-2])
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        x0 = prior(x, s).double()
        J = prior.U @ torch.diag(prior.lam / (prior.lam + s ** 2)) @ prior.U.T
        s2 = s_min ** 2 + max(s ** 2 * sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s ** 2 - sn ** 2)
        grad = (mask * (y - x0)) @ J / s2  # J^T m (y - x0) / s^2, J symmetric
        if sn == 0:
            x = x0
            break
        mu, v = x0 + (sn / s) ** 2 * (x - x0), sn ** 2 * (1 - sn ** 2 / s ** 2)
        x = mu + (s ** 2 - sn ** 2) * grad + math.sqrt(v) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return torch.where(mask.bool(), y, x)


def test_smc_with_one_particle_is_its_proposal_draw_for_draw():
    prior, sigmas = pc.gauss2(), edm_mnist.karras_sigmas(12)
    mask, y, _ = pc.observation("gauss2", 0.5, None)
    mask, y = mask.double(), y.double()
    latents = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = edm_posterior.smc_sampler(prior, latents, sigmas, y, mask, particles=1, sigma_data=0.5,
                                    gen=torch.Generator().manual_seed(6))
    want = guided_ancestral_reference(prior, latents, sigmas, y, mask, torch.Generator().manual_seed(6), 0.5)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_resampling_keeps_each_rows_weight_and_is_systematic():
    g = torch.Generator().manual_seed(7)
    logw = torch.randn(5, 8, generator=g, dtype=torch.float64) * 2
    keep, new = edm_posterior.resample(logw, g)
    torch.testing.assert_close(torch.logsumexp(new, 1), torch.logsumexp(logw, 1))  # the total weight of each row
    assert (new == new[:, :1]).all()  # equal weights after resampling
    w = torch.softmax(logw, 1)
    for row in range(5):  # systematic: particle k is kept floor(K w_k) or ceil(K w_k) times
        counts = torch.bincount(keep[row], minlength=8).double()
        assert ((counts - 8 * w[row]).abs() < 1 + 1e-9).all(), (counts, 8 * w[row])


def test_smc_error_falls_with_the_number_of_particles():
    mask, y, _ = pc.observation("gauss2", 0.5, None)
    err = {}
    for K in (1, 16):
        x = edm_posterior.draw(pc.gauss2(), y, mask, 2000, pc.sampler_args("smc", 80, particles=K), 0,
                               torch.device("cpu"), batch=2000, clamp=False)
        err[K] = abs(x[:, 1].mean().item() - 0.72)
    assert err[16] < 0.02 < err[1], err  # measured: 0.04 at K = 1, about 0.005 at K = 16 (MC error 0.005)


# ----------------------------------------------------------------------------- the bench end to end
def test_bench_quick_writes_the_table_and_figures(tmp_path):
    r = run_in_process(pc, "--quick", "--priors", "gauss2,gmm2", "--samplers", "tweedie,masked,smc",
                       "--n-small", "200", "--sample-steps", "18", "--particles", "1,4", "--out", str(tmp_path),
                       "--run-id", "q")
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "posterior_calibration" / "q"
    rows = json.load(open(d / "calibration.json"))
    assert {(r["prior"], r["sampler"]) for r in rows} == {(p, s) for p in ("gauss2", "gmm2")
                                                        for s in ("tweedie", "masked", "smc", "smc-K")}
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("mean_error", "std_error", "var_error", "mc_mean_error"))
        assert ("mode_tv" in row) == (row["prior"] == "gmm2")
    assert "| 50% | tweedie | 18 |" in open(d / "calibration.md").read()
    for f in ("calibration.png", "smc_particles.png"):
        assert os.path.getsize(d / f) > 1000


def test_bench_refuses_an_unknown_prior(tmp_path):
    r = run_in_process(pc, "--priors", "gauss3", "--out", str(tmp_path))
    assert r.returncode == 2 and "gauss3" in r.stderr and len(r.stderr.strip().splitlines()) == 1

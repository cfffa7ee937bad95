"""edm_posterior.py and svd_posterior.py: data consistency, the guidance schedule, the SVD statistics on known spectra,
resuming an ensemble, smoke runs on a tiny checkpoint and bad input."""
import argparse
import json
import math
import os

import pytest
import torch

import common
import edm_mnist
import evaluate
import edm_posterior as P
import svd_posterior as S
from conftest import run_script

S2 = 0.36  # variance of the toy Gaussian "data" N(0, S2 I)


def gaussian_denoiser(x, sigma):
    """The ideal denoiser E[x0 | x] for x0 ~ N(0, S2 I): x S2 / (S2 + sigma^2)."""
    return x * S2 / (S2 + sigma ** 2)


def sampler_kw(guidance):
    return dict(guidance=guidance, lambda_max=1.5, lambda_min=0.25, power=1.5, sigma_y=0.1, c=0.05, zeta=0.5)


def observation(frac=0.5, seed=0):
    mask = P.make_mask("random", frac, seed)
    x_true = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 1)).clamp(-1, 1)
    return mask, P.observe(x_true, mask, 0.0, seed)


# ----------------------------------------------------------------------------- masks and the guidance schedule
@pytest.mark.parametrize("frac", [0.2, 0.7, 1.0])
def test_masks_observe_the_requested_fraction(frac):
    m = P.make_mask("random", frac, 3)
    assert m.shape == (1, 1, 28, 28) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert int(m.sum()) == round(frac * 784)
    assert torch.equal(m, P.make_mask("random", frac, 3)) and (frac == 1.0 or not torch.equal(m, P.make_mask("random", frac, 4)))
    half = P.make_mask("half", 0.5, 0)
    assert half[..., :14, :].all() and not half[..., 14:, :].any()
    box = P.make_mask("box", 0.75, 0)  # a 14 x 14 hidden square in the middle
    assert int((box == 0).sum()) == 196 and box[..., 14, 14] == 0 and box[..., 0, 0] == 1


def test_observation_is_zero_off_the_mask():
    mask, y = observation()
    assert (y[mask == 0] == 0).all() and (y[mask == 1] != 0).any()


def test_lambda_schedule_closed_form():
    N, lmax, lmin, p = 11, 1.5, 0.25, 1.5
    assert P.lambda_schedule(0, N, lmax, lmin, p) == pytest.approx(lmax * lmin)
    assert P.lambda_schedule(N - 1, N, lmax, lmin, p) == pytest.approx(lmax)
    assert P.lambda_schedule(5, N, lmax, lmin, p) == pytest.approx(lmax * (lmin + (1 - lmin) * 0.5 ** 1.5))


# ----------------------------------------------------------------------------- data consistency
@pytest.mark.parametrize("guidance", ["masked", "dps", "none"])
def test_projection_keeps_observed_pixels_exactly(guidance):
    mask, y = observation(0.5)
    latents = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = P.posterior_sampler(gaussian_denoiser, latents, edm_mnist.karras_sigmas(8), y, mask,
                            gen=torch.Generator().manual_seed(1), **sampler_kw(guidance))
    assert torch.isfinite(x).all()
    assert torch.equal(x[:, mask[0].bool()], y[:, mask[0].bool()].expand(6, -1))  # bit for bit, every draw
    assert x[:, (mask[0] == 0)].std() > 0.1  # the hidden pixels are sampled, not copied


@pytest.mark.parametrize("guidance", ["masked", "dps", "none"])
def test_mask_all_ones_returns_y(guidance):
    mask, y = observation(1.0)
    x = P.posterior_sampler(gaussian_denoiser, torch.randn(3, 1, 28, 28), edm_mnist.karras_sigmas(5), y, mask,
                            **sampler_kw(guidance))
    assert torch.equal(x, y.expand(3, -1, -1, -1))


def test_mask_all_zeros_without_guidance_is_the_unconditional_edm_sampler():
    torch.manual_seed(0)
    D = edm_mnist.build_denoiser({"channels": [8, 16, 32], "sigma_data": 0.5}).eval()
    mask, y = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    latents, sigmas = torch.randn(4, 1, 28, 28), edm_mnist.karras_sigmas(6)
    ref = edm_mnist.edm_sampler(D, latents, sigmas)
    for guidance in ("none", "masked"):  # with nothing observed the masked likelihood's g is 0
        x = P.posterior_sampler(D, latents, sigmas, y, mask, gen=torch.Generator().manual_seed(5), **sampler_kw(guidance))
        assert torch.equal(x, ref)


def test_hidden_pixels_of_independent_gaussian_data_keep_the_prior():
    """For x0 ~ N(0, S2 I) the pixels are independent, so the posterior of a hidden pixel is the prior N(0, S2):
    observing other pixels must neither shift nor shrink it."""
    mask, y = observation(0.5)
    x = P.posterior_sampler(gaussian_denoiser, torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(2)),
                            edm_mnist.karras_sigmas(40), y, mask, gen=torch.Generator().manual_seed(3),
                            **sampler_kw("none"))
    hidden = x[:, mask[0] == 0]
    assert hidden.mean().abs() < 0.01 and hidden.var().item() == pytest.approx(S2, rel=0.03)


def test_dps_gradient_is_per_sample_and_unit_norm_for_identity_denoiser():
    """With D(x) = x, grad_x ||m (y - x)|| = -m (y - x) / ||m (y - x)||: unit norm, and sample 2 does not see sample 1."""
    mask, y = observation(0.5)
    x = torch.randn(2, 1, 28, 28)
    _, g = P.dps_gradient(lambda v, s: v, x, 1.0, y, mask)
    r = mask * (y - x)
    assert torch.allclose(g, -r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-6)
    x2 = x.clone()
    x2[0] += 1.0
    _, g2 = P.dps_gradient(lambda v, s: v, x2, 1.0, y, mask)
    assert torch.allclose(g2[1], g[1])


def test_posterior_metrics_psnr_on_hidden_pixels():
    x_true = torch.full((1, 1, 28, 28), -1.0)
    mask = P.make_mask("half", 0.5, 0)
    draws = x_true.repeat(4, 1, 1, 1)
    draws[:, :, 14:, :] += 0.2  # hidden rows off by 0.2 on [-1, 1], i.e. 0.1 on [0, 1]: PSNR 20 dB
    judge = evaluate.Judge(10)  # untrained: only the PSNR and error figures are checked here
    m, mean, std = P.posterior_metrics(draws, x_true, mask * x_true, mask, 7, judge)
    assert m["psnr_unobserved"] == pytest.approx(20.0) and m["mse_unobserved"] == pytest.approx(0.01)
    assert m["observed_max_abs_error"] == 0.0 and m["mean_posterior_std"] == 0.0 and m["n_observed_pixels"] == 392


# ----------------------------------------------------------------------------- SVD statistics on known spectra
def test_rank_one_matrix():
    X = torch.outer(torch.rand(784, dtype=torch.float64) + 0.1, torch.rand(50, dtype=torch.float64) + 0.1)
    st = S.spectrum_stats(torch.linalg.svdvals(X))
    assert st["k95"] == 1 and st["k99"] == 1 and st["participation_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_identity_like_matrix():
    st = S.spectrum_stats(torch.linalg.svdvals(torch.eye(100, dtype=torch.float64) * 3))
    assert (st["k95"], st["k99"]) == (95, 99) and st["participation_ratio"] == pytest.approx(100.0)


def test_two_value_spectrum():
    st = S.spectrum_stats([1.0, 3.0])  # energies 9 and 1: E_1 = 0.9
    assert (st["k95"], st["k99"]) == (2, 2)
    assert st["participation_ratio"] == pytest.approx(100 / 82) and st["first_direction_energy"] == pytest.approx(0.9)


def test_snapshot_svd_raw_and_centered():
    base = torch.rand(1, 1, 28, 28) * 2 - 1
    draws = base.repeat(10, 1, 1, 1)
    X, s_raw, s_c, _ = S.snapshot_svd(draws)
    assert X.shape == (784, 10) and X.min() >= 0 and X.max() <= 1  # columns are draws on the [0, 1] scale
    assert S.spectrum_stats(s_raw)["k95"] == 1 and s_c.max() < 1e-10  # identical draws: no spread at all


def test_ensemble_resumes_to_the_same_draws(tmp_path):
    mask, y = observation(0.5)
    args = argparse.Namespace(n_samples=6, batch=3, steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance="none",
                              lambda_max=1.5, lambda_min=0.25, power=1.5, likelihood_sigma=0.1, noise_aware_c=0.05,
                              zeta=1.0)
    full = S.ensemble(gaussian_denoiser, y, mask, args, 10, str(tmp_path / "a.pt"), "k", torch.device("cpu"),
                      lambda b, n: None)
    assert torch.equal(full, P.draw(gaussian_denoiser, y, mask, 6, args, 10, torch.device("cpu"), batch=3))
    torch.save({"key": "k", "batches": [full[:3]]}, tmp_path / "b.pt")  # as if stopped after the first batch
    calls = []
    resumed = S.ensemble(gaussian_denoiser, y, mask, args, 10, str(tmp_path / "b.pt"), "k", torch.device("cpu"),
                         lambda b, n: calls.append(b))
    assert calls == [2] and torch.equal(resumed, full)
    with pytest.raises(common.UsageError):
        S.ensemble(gaussian_denoiser, y, mask, args, 10, str(tmp_path / "b.pt"), "other", torch.device("cpu"), print)


# ----------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained edm_mnist checkpoint: the scripts must run end to end on any prior."""
    torch.manual_seed(0)
    config = {"dataset": "mnist", "channels": [8, 16, 32], "sigma_data": 0.5, "P_mean": -1.2, "P_std": 1.2,
              "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    D = edm_mnist.build_denoiser(config)
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")
    torch.save({"script": "edm_mnist", "kind": "model", "config": config, "model": D.state_dict(),
                "ema": D.state_dict(), "epoch": 0, "step": 0, "history": {}}, path)
    return path


def test_edm_posterior_quick(tiny_checkpoint, tiny_mnist, tmp_path):
    out = str(tmp_path / "out")
    r = run_script("edm_posterior.py", "--quick", "--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist,
                   "--out", out, "--run-id", "smoke", "--digit", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    d = os.path.join(out, "edm_posterior", "smoke")
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    for name in ("obs70", "obs20"):
        m = metrics["experiments"][name]
        assert m["n_draws"] == 16 and math.isfinite(m["psnr_unobserved"]) and 0 <= m["judge_accuracy"] <= 1
        assert m["observed_max_abs_error"] == 0.0 and m["mean_posterior_std"] > 0
        assert m["n_observed_pixels"] == round(int(name[3:]) / 100 * 784)
        saved = torch.load(os.path.join(d, f"draws_{name}.pt"))
        x, mask, y = saved["draws"], saved["mask"].bool(), saved["y"]
        assert x.shape == (16, 1, 28, 28) and torch.isfinite(x).all() and x.std(0).max() > 0
        assert torch.equal(x[:, mask[0]], y[:, mask[0]].expand(16, -1))
        for fig in (f"setup_{name}.png", f"samples_{name}.png", f"mean_std_{name}.png"):
            assert os.path.getsize(os.path.join(d, fig)) > 1000


def test_svd_posterior_quick(tiny_checkpoint, tiny_mnist, tmp_path):
    out = str(tmp_path / "out")
    args = ("svd_posterior.py", "--quick", "--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist, "--out", out,
            "--run-id", "smoke", "--n-samples", "12", "--batch", "5")
    r = run_script(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    d = os.path.join(out, "svd_posterior", "smoke")
    table = json.load(open(os.path.join(d, "svd_table.json")))
    assert [(row["setting"], row["matrix"]) for row in table["rows"]] == [
        ("obs70", "raw"), ("obs70", "centered"), ("obs20", "raw"), ("obs20", "centered")]
    for row in table["rows"]:
        assert 1 <= row["k95"] <= row["k99"] <= 12 and 1 <= row["participation_ratio"] <= 12
    snap = torch.load(os.path.join(d, "snapshots_obs20.pt"))
    assert snap["X"].shape == (784, 12) and len(snap["s_raw"]) == 12 and snap["X"].std(1).max() > 0
    assert not os.path.exists(os.path.join(d, "partial_obs20.pt"))
    assert "| obs20 | centered |" in open(os.path.join(d, "svd_table.md")).read()
    assert os.path.getsize(os.path.join(d, "svd_spectrum.png")) > 1000 and os.path.isfile(os.path.join(d, "modes_obs70.png"))
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert metrics["posterior"]["obs70"]["n_draws"] == 12
    # a rerun of a finished run reuses its snapshots' draws instead of sampling again: give it identical draws under
    # the same key, and the rerun's centred spectrum must be all zero (fresh draws would spread)
    snap["draws"] = snap["draws"][:1].repeat(12, 1, 1, 1)
    torch.save(snap, os.path.join(d, "snapshots_obs20.pt"))
    r2 = run_script(*args)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert torch.load(os.path.join(d, "snapshots_obs20.pt"))["s_centered"].max() < 1e-10


@pytest.mark.parametrize("script", ["edm_posterior.py", "svd_posterior.py"])
@pytest.mark.parametrize("case", ["observed0", "observed_big", "n0", "foreign", "nodata"])
def test_bad_input_is_one_line_exit_2(script, case, tiny_checkpoint, tiny_mnist, tmp_path):
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"script": "ddpm_mnist_cfg", "kind": "model"}, foreign)
    args = {"observed0": ["--observed", "0"], "observed_big": ["--observed", "0.7,1.5"], "n0": ["--n-samples", "0"],
            "foreign": ["--checkpoint", foreign], "nodata": ["--data-root", str(tmp_path / "nowhere")]}[case]
    base = ["--quick", "--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist]
    out = str(tmp_path / "out")
    r = run_script(script, *base, *args, "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(out, script[:-3]))  # nothing half-written

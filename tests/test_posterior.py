"""edm_posterior.py and svd_posterior.py: data consistency, the guidance schedule, the SVD statistics on known spectra,
the cores alone, resuming an ensemble, smoke runs on a tiny checkpoint, corrupt files and bad input."""
import argparse
import json
import math
import os
import shutil

import pytest
import torch

import common
import harness
import edm_mnist
import edm_posterior
import evaluate
import svd_posterior
from conftest import run_in_process, run_script

S2 = 0.36  # variance of the toy Gaussian "data" N(0, S2 I)


def gaussian_denoiser(x, sigma):
    """The ideal denoiser E[x0 | x] for x0 ~ N(0, S2 I): x S2 / (S2 + sigma^2)."""
    return x * S2 / (S2 + sigma ** 2)


def sampler_kw(guidance):
    return dict(guidance=guidance, lambda_max=1.5, lambda_min=0.25, power=1.5, sigma_y=0.1, c=0.05, zeta=0.5)


def observation(frac=0.5, seed=0, make_mask=edm_posterior.make_mask, observe=edm_posterior.observe):
    mask = make_mask("random", frac, seed)
    x_true = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 1)).clamp(-1, 1)
    return mask, observe(x_true, mask, 0.0, seed)


# ----------------------------------------------------------------------------- masks, tags, the guidance schedule
@pytest.mark.parametrize("frac", [0.2, 0.7, 1.0])
def test_masks_observe_the_requested_fraction(frac):
    m = edm_posterior.make_mask("random", frac, 3)
    assert m.shape == (1, 1, 28, 28) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert int(m.sum()) == round(frac * 784)
    assert torch.equal(m, edm_posterior.make_mask("random", frac, 3))
    assert frac == 1.0 or not torch.equal(m, edm_posterior.make_mask("random", frac, 4))
    half = edm_posterior.make_mask("half", 0.5, 0)
    assert half[..., :14, :].all() and not half[..., 14:, :].any()
    box = edm_posterior.make_mask("box", 0.75, 0)  # a 14 x 14 hidden square in the middle
    assert int((box == 0).sum()) == 196 and box[..., 14, 14] == 0 and box[..., 0, 0] == 1


def test_observation_is_zero_off_the_mask():
    mask, y = observation()
    assert (y[mask == 0] == 0).all() and (y[mask == 1] != 0).any()


def test_tags_are_unique_per_fraction():
    assert [edm_posterior.tag(f) for f in (0.7, 0.2, 0.05, 1.0)] == ["obs70", "obs20", "obs05", "obs100"]
    assert edm_posterior.tag(0.701) == "obs70p1" and edm_posterior.tag(0.704) == "obs70p4"
    args = edm_posterior.parse_args(["--checkpoint", "c.pt", "--observed", "0.701,0.704"])
    assert args.observed == (0.701, 0.704)


def test_lambda_schedule_closed_form():
    N, lmax, lmin, p = 11, 1.5, 0.25, 1.5
    assert edm_posterior.lambda_schedule(0, N, lmax, lmin, p) == pytest.approx(lmax * lmin)
    assert edm_posterior.lambda_schedule(N - 1, N, lmax, lmin, p) == pytest.approx(lmax)
    assert edm_posterior.lambda_schedule(5, N, lmax, lmin, p) == pytest.approx(lmax * (lmin + (1 - lmin) * 0.5 ** 1.5))


# ----------------------------------------------------------------------------- data consistency
@pytest.mark.parametrize("guidance", ["masked", "dps", "none"])
def test_projection_keeps_observed_pixels_exactly(guidance):
    mask, y = observation(0.5)
    latents = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = edm_posterior.posterior_sampler(gaussian_denoiser, latents, edm_mnist.karras_sigmas(8), y, mask,
                                        gen=torch.Generator().manual_seed(1), **sampler_kw(guidance))
    assert torch.isfinite(x).all()
    assert torch.equal(x[:, mask[0].bool()], y[:, mask[0].bool()].expand(6, -1))  # bit for bit, every draw
    assert x[:, (mask[0] == 0)].std() > 0.1  # the hidden pixels are sampled, not copied


@pytest.mark.parametrize("guidance", ["masked", "dps", "none"])
def test_mask_all_ones_returns_y(guidance):
    mask, y = observation(1.0)
    x = edm_posterior.posterior_sampler(gaussian_denoiser, torch.randn(3, 1, 28, 28), edm_mnist.karras_sigmas(5), y,
                                        mask, **sampler_kw(guidance))
    assert torch.equal(x, y.expand(3, -1, -1, -1))


def test_mask_all_zeros_without_guidance_is_the_unconditional_edm_sampler():
    torch.manual_seed(0)
    D = edm_mnist.Denoiser(edm_mnist.UNet((8, 16, 32)), 0.5).eval()
    mask, y = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    latents, sigmas = torch.randn(4, 1, 28, 28), edm_mnist.karras_sigmas(6)
    ref = edm_mnist.edm_sampler(D, latents, sigmas)
    for guidance in ("none", "masked"):  # with nothing observed the masked likelihood's g is 0
        x = edm_posterior.posterior_sampler(D, latents, sigmas, y, mask, gen=torch.Generator().manual_seed(5),
                                            **sampler_kw(guidance))
        assert torch.equal(x, ref)


def test_hidden_pixels_of_independent_gaussian_data_keep_the_prior():
    """For x0 ~ N(0, S2 I) the pixels are independent, so the posterior of a hidden pixel is the prior N(0, S2):
    observing other pixels must neither shift nor shrink it."""
    mask, y = observation(0.5)
    latents = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    x = edm_posterior.posterior_sampler(gaussian_denoiser, latents, edm_mnist.karras_sigmas(40), y, mask,
                                        gen=torch.Generator().manual_seed(3), **sampler_kw("none"))
    hidden = x[:, mask[0] == 0]
    assert hidden.mean().abs() < 0.01 and hidden.var().item() == pytest.approx(S2, rel=0.03)


def test_dps_gradient_is_per_sample_and_unit_norm_for_identity_denoiser():
    """With D(x) = x, grad_x ||m (y - x)|| = -m (y - x) / ||m (y - x)||: unit norm, and sample 2 does not see sample 1."""
    mask, y = observation(0.5)
    x = torch.randn(2, 1, 28, 28)
    _, g = edm_posterior.dps_gradient(lambda v, s: v, x, 1.0, y, mask)
    r = mask * (y - x)
    assert torch.allclose(g, -r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-6)
    x2 = x.clone()
    x2[0] += 1.0
    _, g2 = edm_posterior.dps_gradient(lambda v, s: v, x2, 1.0, y, mask)
    assert torch.allclose(g2[1], g[1])


def test_posterior_metrics_psnr_on_hidden_pixels():
    x_true = torch.full((1, 1, 28, 28), -1.0)
    mask = edm_posterior.make_mask("half", 0.5, 0)
    draws = x_true.repeat(4, 1, 1, 1)
    draws[:, :, 14:, :] += 0.2  # hidden rows off by 0.2 on [-1, 1], i.e. 0.1 on [0, 1]: PSNR 20 dB
    judge = evaluate.Judge(10)  # untrained: only the PSNR and error figures are checked here
    m, mean, std = edm_posterior.posterior_metrics(draws, x_true, mask * x_true, mask, 7, judge)
    assert m["psnr_unobserved"] == pytest.approx(20.0) and m["mse_unobserved"] == pytest.approx(0.01)
    assert m["mean_draw_psnr_unobserved"] == pytest.approx(20.0)
    assert m["observed_max_abs_error"] == 0.0 and m["mean_posterior_std"] == 0.0 and m["n_observed_pixels"] == 392


# ----------------------------------------------------------------------------- SVD statistics on known spectra
def test_rank_one_matrix():
    X = torch.outer(torch.rand(784, dtype=torch.float64) + 0.1, torch.rand(50, dtype=torch.float64) + 0.1)
    st = svd_posterior.spectrum_stats(torch.linalg.svdvals(X))
    assert st["k95"] == 1 and st["k99"] == 1 and st["participation_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_identity_like_matrix():
    st = svd_posterior.spectrum_stats(torch.linalg.svdvals(torch.eye(100, dtype=torch.float64) * 3))
    assert (st["k95"], st["k99"]) == (95, 99) and st["participation_ratio"] == pytest.approx(100.0)


def test_two_value_spectrum():
    st = svd_posterior.spectrum_stats([1.0, 3.0])  # energies 9 and 1: E_1 = 0.9
    assert (st["k95"], st["k99"]) == (2, 2)
    assert st["participation_ratio"] == pytest.approx(100 / 82) and st["first_direction_energy"] == pytest.approx(0.9)


def test_snapshot_svd_raw_and_centered():
    base = torch.rand(1, 1, 28, 28) * 2 - 1
    draws = base.repeat(10, 1, 1, 1)
    X, s_raw, s_c, _ = svd_posterior.snapshot_svd(draws)
    assert X.shape == (784, 10) and X.min() >= 0 and X.max() <= 1  # columns are draws on the [0, 1] scale
    assert svd_posterior.spectrum_stats(s_raw)["k95"] == 1 and s_c.max() < 1e-10  # identical draws: no spread at all


# ----------------------------------------------------------------------------- the cores alone


# ----------------------------------------------------------------------------- resuming an ensemble, saved files
def ensemble_args():
    return argparse.Namespace(n_samples=6, sample_batch=3, sample_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                              guidance="none", lambda_max=1.5, lambda_min=0.25, power=1.5, likelihood_sigma=0.1,
                              noise_aware_c=0.05, zeta=1.0, measurement_noise=0.0, cg_iters=5, particles=4,
                              exact_prior=None)


def test_ensemble_resumes_to_the_same_draws(tmp_path):
    mask, y = observation(0.5)
    args, cpu, settings = ensemble_args(), torch.device("cpu"), {"guidance": "none"}
    full = svd_posterior.ensemble(gaussian_denoiser, y, mask, args, 10, str(tmp_path / "a.pt"), settings, [], cpu,
                                  lambda b, n: None)
    assert torch.equal(full, edm_posterior.draw(gaussian_denoiser, y, mask, 6, args, 10, cpu, batch=3))
    saved = svd_posterior.load_saved(str(tmp_path / "a.pt"), settings)
    assert len(saved["batches"]) == 2 and saved["settings"] == settings
    calls = []  # as if stopped after the first batch
    resumed = svd_posterior.ensemble(gaussian_denoiser, y, mask, args, 10, str(tmp_path / "b.pt"), settings,
                                     [full[:3]], cpu, lambda b, n: calls.append(b))
    assert calls == [2] and torch.equal(resumed, full)


def test_saved_draws_of_other_settings_or_corrupt_are_named(tmp_path):
    path = str(tmp_path / "partial_obs20.pt")
    harness.save_atomic({"settings": {"guidance": "dps", "zeta": 4.0}, "batches": []}, path)
    with pytest.raises(common.UsageError, match=r"partial_obs20.pt holds draws of other settings \(guidance differ"):
        svd_posterior.load_saved(path, {"guidance": "masked", "zeta": 4.0})
    open(path, "wb").write(b"not a torch file")
    with pytest.raises(common.UsageError, match="cannot read .*partial_obs20.pt"):
        svd_posterior.load_saved(path, {})
    assert svd_posterior.load_saved(str(tmp_path / "none.pt"), {}) is None


# ----------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_mnist, tmp_path_factory):
    """A barely trained edm_mnist checkpoint (2 steps, written by edm_mnist.py itself): the scripts must run end to
    end on any prior."""
    out = str(tmp_path_factory.mktemp("ckpt"))
    r = run_in_process(edm_mnist, "--quick", "--train-steps", "2", "--no-eval", "--n-samples", "2", "--sample-steps",
                       "2", "--data-root", tiny_mnist, "--out", out, "--run-id", "prior")
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(out, "edm_mnist", "prior", "checkpoint.pt")


def test_edm_posterior_quick(tiny_checkpoint, tiny_mnist, tmp_path):
    out = str(tmp_path / "out")
    r = run_script("edm_posterior.py", "--quick", "--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist,
                   "--out", out, "--run-id", "smoke", "--digit", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    d = os.path.join(out, "edm_posterior", "smoke")
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    assert metrics["sample_steps"] == 10 and metrics["evaluations"] == 19
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


def test_close_fractions_get_their_own_files(tiny_checkpoint, tiny_mnist, tmp_path):
    r = run_in_process(edm_posterior, "--quick", "--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist,
                       "--observed", "0.701,0.704", "--n-samples", "2", "--sample-steps", "2", "--out", str(tmp_path),
                       "--run-id", "close")
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "edm_posterior" / "close"
    assert set(json.load(open(d / "metrics.json"))["experiments"]) == {"obs70p1", "obs70p4"}
    assert int(torch.load(d / "draws_obs70p1.pt")["mask"].sum()) == 550
    assert int(torch.load(d / "draws_obs70p4.pt")["mask"].sum()) == 552


SVD_ARGS = ["--quick", "--n-samples", "12", "--sample-batch", "5"]


@pytest.fixture(scope="module")
def svd_run(tiny_checkpoint, tiny_mnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("svd"))
    args = ["--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist, *SVD_ARGS]
    r = run_script("svd_posterior.py", *args, "--out", out, "--run-id", "smoke")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, args


def test_svd_posterior_quick(svd_run):
    out, _ = svd_run
    d = os.path.join(out, "svd_posterior", "smoke")
    table = json.load(open(os.path.join(d, "svd_table.json")))
    assert [(row["setting"], row["matrix"]) for row in table["rows"]] == [
        ("obs70", "raw"), ("obs70", "centered"), ("obs20", "raw"), ("obs20", "centered")]
    for row in table["rows"]:
        assert 1 <= row["k95"] <= row["k99"] <= 12 and 1 <= row["participation_ratio"] <= 12
    snap = torch.load(os.path.join(d, "snapshots_obs20.pt"))
    assert snap["X"].shape == (784, 12) and len(snap["s_raw"]) == 12 and snap["X"].std(1).max() > 0
    assert snap["settings"]["n_samples"] == 12 and snap["settings"]["observed"] == 0.2
    assert not os.path.exists(os.path.join(d, "partial_obs20.pt"))
    assert "| obs20 | centered |" in open(os.path.join(d, "svd_table.md")).read()
    assert os.path.getsize(os.path.join(d, "svd_spectrum.png")) > 1000
    assert os.path.isfile(os.path.join(d, "modes_obs70.png"))
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert metrics["posterior"]["obs70"]["n_draws"] == 12 and metrics["sample_steps"] == 8


def copy_run(svd_run, tmp_path):
    """A copy of the smoke run's folder (and the judge it trained) to rerun in."""
    out, args = svd_run
    shutil.copytree(os.path.join(out, "svd_posterior", "smoke"), tmp_path / "svd_posterior" / "smoke")
    shutil.copytree(os.path.join(out, "judges"), tmp_path / "judges")
    return tmp_path / "svd_posterior" / "smoke", [*args, "--out", str(tmp_path), "--run-id", "smoke"]


def test_svd_rerun_reuses_the_snapshots_draws(svd_run, tmp_path):
    """A rerun of a finished run reuses its snapshots' draws instead of sampling again: give it identical draws under
    the same settings, and the rerun's centred spectrum must be all zero (fresh draws would spread)."""
    d, args = copy_run(svd_run, tmp_path)
    snap = torch.load(d / "snapshots_obs20.pt")
    snap["draws"] = snap["draws"][:1].repeat(12, 1, 1, 1)
    torch.save(snap, d / "snapshots_obs20.pt")
    r = run_in_process(svd_posterior, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(d / "snapshots_obs20.pt")["s_centered"].max() < 1e-10


def test_svd_rerun_continues_a_partial_ensemble(svd_run, tmp_path):
    """A partial file with the first batch of obs20 (as left by a stopped run): the rerun draws the other two batches
    and ends with the same 12 draws as the finished run."""
    d, args = copy_run(svd_run, tmp_path)
    snap = torch.load(d / "snapshots_obs20.pt")
    os.remove(d / "snapshots_obs20.pt")
    harness.save_atomic({"settings": snap["settings"], "batches": [snap["draws"][:5]]}, d / "partial_obs20.pt")
    r = run_in_process(svd_posterior, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(torch.load(d / "snapshots_obs20.pt")["draws"], snap["draws"])
    assert not (d / "partial_obs20.pt").exists()


@pytest.mark.parametrize("name", ["partial_obs20.pt", "snapshots_obs70.pt"])
def test_svd_corrupt_saved_file_is_named_in_one_line(svd_run, tmp_path, name):
    d, args = copy_run(svd_run, tmp_path)
    data = open(d / "snapshots_obs20.pt", "rb").read()
    open(d / name, "wb").write(data[:len(data) // 3])  # truncated
    r = run_in_process(svd_posterior, *args)
    assert r.returncode == 2 and str(d / name) in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_svd_rerun_with_other_settings_is_refused(svd_run, tmp_path):
    d, args = copy_run(svd_run, tmp_path)
    r = run_in_process(svd_posterior, *args, "--guidance", "none")
    assert r.returncode == 2 and "holds draws of other settings (guidance differ)" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", [edm_posterior, svd_posterior])
@pytest.mark.parametrize("case", ["observed0", "observed_big", "observed_twice", "n0", "steps1", "lambda_min",
                                  "foreign", "old_format", "truncated", "nodata"])
def test_bad_input_is_one_line_exit_2(script, case, tiny_checkpoint, tiny_mnist, tmp_path):
    foreign, old, truncated = (str(tmp_path / f) for f in ("foreign.pt", "old.pt", "truncated.pt"))
    torch.save({"script": "ddpm_mnist_cfg", "kind": "model"}, foreign)
    torch.save({"script": "edm_mnist", "kind": "model", "config": {}, "ema": {}, "step": 0}, old)
    data = open(tiny_checkpoint, "rb").read()
    open(truncated, "wb").write(data[:len(data) // 2])
    args = {"observed0": ["--observed", "0"], "observed_big": ["--observed", "0.7,1.5"],
            "observed_twice": ["--observed", "0.7,0.2,0.70"], "n0": ["--n-samples", "0"],
            "steps1": ["--sample-steps", "1"], "lambda_min": ["--lambda-min", "2"], "foreign": ["--checkpoint", foreign],
            "old_format": ["--checkpoint", old], "truncated": ["--checkpoint", truncated],
            "nodata": ["--data-root", str(tmp_path / "nowhere")]}[case]
    out = str(tmp_path / "out")
    r = run_in_process(script, "--quick", "--checkpoint", tiny_checkpoint, "--data-root", tiny_mnist, *args,
                       "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(os.path.join(out, script.SCRIPT))  # nothing half-written

"""edm_mnist.py: preconditioning and schedule against closed forms, Heun on Gaussian data, a smoke run, bad input."""
import json
import math
import os

import pytest
import torch

import edm_mnist as E
from conftest import run_script

SD = 0.5  # sigma_data


# ----------------------------------------------------------------------------- preconditioning
def test_preconditioning_limits_and_denoiser_tends_to_identity():
    sigma = torch.tensor([1e-6, 1e-4, 1e-3], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = E.precond(sigma, SD)
    assert torch.allclose(c_skip, torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert (c_out <= 1.01 * sigma).all() and c_out[0] < 1e-5
    assert torch.allclose(c_noise, sigma.log() / 4)
    torch.manual_seed(0)
    D = E.build_denoiser({"channels": (8, 16, 32), "sigma_data": SD}).eval()
    for m in D.net.modules():  # make F non-trivial (the zero-initialised convs get weights)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.2)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (D(x, 1.0) - x).abs().max() > 1e-2  # the test means something
        assert torch.allclose(D(x, 1e-6), x, atol=1e-4)


def test_c_in_gives_unit_variance_input():
    gen = torch.Generator().manual_seed(0)
    x0 = SD * torch.randn(400_000, generator=gen)  # Var(x0) = sigma_data^2
    for s in (0.01, 0.5, 3.0, 80.0):
        sigma = torch.tensor(s)
        _, _, c_in, _ = E.precond(sigma, SD)
        v = (c_in * (x0 + s * torch.randn(x0.shape, generator=gen))).var().item()
        assert v == pytest.approx(1.0, rel=0.01), s


def test_loss_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    lam = E.loss_weight(sigma, SD)
    _, c_out, _, _ = E.precond(sigma, SD)
    assert torch.allclose(lam, (sigma ** 2 + SD ** 2) / (sigma * SD) ** 2)
    assert torch.allclose(c_out, sigma * SD / (sigma ** 2 + SD ** 2).sqrt())
    assert torch.allclose(lam * c_out ** 2, torch.ones_like(sigma))


# ----------------------------------------------------------------------------- schedule
def test_karras_schedule():
    s = E.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    i = 5
    closed = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(closed, rel=1e-12)
    lin = E.karras_sigmas(5, 1.0, 9.0, 1.0)
    assert torch.allclose(lin, torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        E.karras_sigmas(1)


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("steps, tol", [(40, 0.03), (80, 0.015)])
def test_heun_on_gaussian_data_recovers_variance(steps, tol):
    s = 0.7  # data N(0, s^2): the ideal denoiser is E[x0 | x] = x s^2 / (s^2 + sigma^2)
    ideal = lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2)  # noqa: E731
    latents = torch.randn(100_000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = E.edm_sampler(ideal, latents, E.karras_sigmas(steps))
    # the ODE starts from N(0, sigma_max^2) instead of N(0, sigma_max^2 + s^2): a relative error of ~4e-5
    assert x.var().item() == pytest.approx(s ** 2, rel=tol)
    assert abs(x.mean().item()) < 0.01


def test_heun_is_second_order():
    """The Gaussian ODE is linear: x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2) exactly; Heun's error in the
    final variance must fall about 4x per doubling of N (Euler's would fall 2x)."""
    s = 0.7
    ideal = lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2)  # noqa: E731
    exact = 80.0 ** 2 * s ** 2 / (s ** 2 + 80.0 ** 2)  # x(sigma_max) = sigma_max z with z = 1
    err = [abs(E.edm_sampler(ideal, torch.ones(1, dtype=torch.float64), E.karras_sigmas(n)).item() ** 2 / exact - 1)
           for n in (40, 80, 160)]
    assert 3.0 < err[0] / err[1] < 5.5 and 3.0 < err[1] / err[2] < 5.5, err


def test_heun_with_churn_still_recovers_variance():
    s = 0.7
    ideal = lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(100_000, 1, 1, 1, generator=gen, dtype=torch.float64)
    x = E.edm_sampler(ideal, latents, E.karras_sigmas(80), S_churn=10, S_min=0.05, S_max=50, gen=gen)
    assert x.var().item() == pytest.approx(s ** 2, rel=0.03)
    assert not torch.allclose(x, E.edm_sampler(ideal, latents, E.karras_sigmas(80)))  # churn did something


@pytest.mark.parametrize("steps", [2, 5, 18])
def test_heun_costs_2n_minus_1_evaluations(steps):
    calls = []

    def D(x, sigma):
        calls.append(sigma)
        return 0.5 * x

    E.edm_sampler(D, torch.randn(4, 1, 2, 2), E.karras_sigmas(steps))
    assert len(calls) == 2 * steps - 1
    assert min(calls) > 0  # D is never asked about sigma = 0


def test_unet_shapes_and_layer_list():
    net = E.UNet((8, 16, 32))
    out = net(torch.randn(2, 1, 28, 28), torch.zeros(2))
    assert out.shape == (2, 1, 28, 28)
    rows = E.unet_layers(net)
    assert [r[4] for r in rows] == [28, 28, 14, 14, 7, 7, 7, 14, 14, 28, 28, 28]
    assert sum(r[5] for r in rows) == sum(r[6] for r in rows) == 2  # two skips out, two in


# ----------------------------------------------------------------------------- smoke run and bad input
QUICK = ["--quick", "--max-steps", "20", "--n-eval", "24", "--study-steps", "3,5", "--study-n", "16",
         "--judge-epochs", "5"]


@pytest.fixture(scope="module")
def quick_run(tiny_mnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    r = run_script("edm_mnist.py", *QUICK, "--data-root", tiny_mnist, "--out", out, "--run-id", "smoke")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, os.path.join(out, "edm_mnist", "smoke")


def test_quick_run_writes_checkpoint_samples_metrics_and_figures(quick_run):
    _, d = quick_run
    x = torch.load(os.path.join(d, "samples.pt"))
    assert x.shape == (24, 1, 28, 28) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std(0).mean() > 1e-3  # samples are not all equal
    m = json.load(open(os.path.join(d, "metrics.json")))
    for k in ("fid", "fid_floor", "mean_top_prob", "class_entropy", "n"):
        assert k in m["eval"]
    assert m["eval"]["n"] == 24 and m["total_steps"] == 20 and m["device"] == "cpu"
    assert math.isfinite(m["final_mean_loss_last_100_steps"]) and m["wall_time_s"] > 0
    assert [r["steps"] for r in m["steps_study"]] == [3, 5] and [r["nfe"] for r in m["steps_study"]] == [5, 9]
    assert all(r["seconds_per_sample"] > 0 and math.isfinite(r["fid"]) for r in m["steps_study"])
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert ck["script"] == "edm_mnist" and ck["kind"] == "model" and ck["step"] == 20
    assert {"model", "ema", "optimizer", "config", "epoch", "step", "history"} <= set(ck)
    assert ck["config"]["sigma_data"] == 0.5 and ck["config"]["channels"] == [8, 16, 32]
    for fig in ("samples_grid", "loss_steps", "unet", "sigma_schedule", "steps_study"):
        assert os.path.getsize(os.path.join(d, fig + ".png")) > 1000


def test_load_denoiser_and_sample_from_checkpoint(quick_run):
    _, d = quick_run
    D, cfg = E.load_denoiser(os.path.join(d, "checkpoint.pt"))
    assert not D.training and cfg["sigma_min"] == 0.002
    x = E.edm_sampler(D, torch.randn(3, 1, 28, 28), E.karras_sigmas(4))
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()


def test_measured_sigma_data_and_resume(quick_run, tiny_mnist):
    out, d = quick_run
    r = run_script("edm_mnist.py", "--quick", "--max-steps", "25", "--resume", os.path.join(d, "checkpoint.pt"),
                   "--no-eval", "--n-eval", "4", "--data-root", tiny_mnist, "--out", out, "--run-id", "resumed")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(os.path.join(out, "edm_mnist", "resumed", "checkpoint.pt"), weights_only=False)
    assert ck["step"] == 25 and len(ck["history"]["step_loss"]) == 25
    r = run_script("edm_mnist.py", "--quick", "--max-steps", "2", "--sigma-data", "measured", "--no-eval",
                   "--n-eval", "4", "--data-root", tiny_mnist, "--out", out, "--run-id", "measured")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = torch.load(os.path.join(out, "edm_mnist", "measured", "checkpoint.pt"), weights_only=False)["config"]
    assert 0.2 < cfg["sigma_data"] < 1.0 and cfg["sigma_data"] != 0.5


def test_nan_loss_stops_with_step_and_exit_1(tiny_mnist, tmp_path):
    r = run_script("edm_mnist.py", "--quick", "--lr", "1e30", "--warmup-steps", "1", "--max-steps", "30",
                   "--log-every", "1", "--no-eval", "--data-root", tiny_mnist, "--out", str(tmp_path), "--run-id", "nan")
    assert r.returncode == 1, r.stderr[-1000:]
    status = json.load(open(tmp_path / "edm_mnist" / "nan" / "status.json"))
    assert status["state"] == "failed" and "at step" in status["message"]


def other_checkpoint(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"script": "ddpm_mnist_cfg", "kind": "model", "config": {}}, path)
    return path


@pytest.mark.parametrize("case", ["missing_data", "checkpoint_other", "resume_other", "sigma_order", "neg_steps",
                                  "one_step", "bad_study", "bad_sigma_data"])
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    out = str(tmp_path / "out")
    args = {"missing_data": ["--quick", "--data-root", str(tmp_path / "nowhere")],
            "checkpoint_other": ["--checkpoint", other_checkpoint(tmp_path)],
            "resume_other": ["--quick", "--resume", other_checkpoint(tmp_path)],
            "sigma_order": ["--quick", "--sigma-min", "5", "--sigma-max", "1"],
            "neg_steps": ["--quick", "--sample-steps", "-3"],
            "one_step": ["--quick", "--sample-steps", "1"],
            "bad_study": ["--quick", "--study-steps", "5,x"],
            "bad_sigma_data": ["--quick", "--sigma-data", "-1"]}[case]
    r = run_script("edm_mnist.py", *args, "--out", out)
    assert r.returncode == 2, r.stderr[-1000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert not os.path.exists(out)  # nothing written

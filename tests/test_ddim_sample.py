"""ddim_sample.py: step subsequences, the DDIM step against DDPM's closed-form posterior, determinism, marginals,
inversion, model calls per sample, the core copied alone (with ddpm_mnist_cfg's), a smoke run on a tiny checkpoint,
--quick's own tiny model, bad input."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import common
import harness
import ddim_sample
import ddpm_mnist_cfg
from conftest import digit_images, run_in_process, run_script


@pytest.fixture(autouse=True)
def no_leftover_harness_state():
    """Run.active / TrainLoop.active are process-wide; harness.main installs signal handlers: restore all three."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    harness.Run.active = harness.TrainLoop.active = None
    for s, h in handlers.items():
        signal.signal(s, h)


def perturbed_unet(seed=0, channels=(8, 16, 32)):
    """A random tiny U-Net with its conditioning switched on (the zero-initialised injections get weights)."""
    torch.manual_seed(seed)
    m = ddpm_mnist_cfg.UNet(channels)
    for mod in m.modules():
        if isinstance(mod, ddpm_mnist_cfg.ScaleShift):
            torch.nn.init.normal_(mod.proj[1].weight, std=0.3)
    return m.eval().requires_grad_(False)


def schedule(kind, T):
    return ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.BETAS[kind](T))


def closed_alpha_bar(kind, T):
    """alpha_bar_t for t = 0..T (index t) in float64 numpy from the betas, independently of the Schedule's float32."""
    return np.concatenate([[1.0], np.cumprod(1 - ddpm_mnist_cfg.BETAS[kind](T).numpy())])


# ----------------------------------------------------------------------------- step subsequences
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_timesteps_strictly_decreasing_from_T_to_0(spacing):
    for T in (1, 20, 50, 250, 1000):
        for S in (1, 2, 7, 10, 20, 50, 100, 999, T):
            if S > T:
                continue
            tau = ddim_sample.timesteps(T, S, spacing)
            assert len(tau) == S + 1 and tau[0] == T and tau[-1] == 0, (T, S)
            assert all(a > b for a, b in zip(tau, tau[1:])), (T, S, tau)
        assert ddim_sample.timesteps(T, T, spacing) == list(range(T, -1, -1))  # every step: consecutive
    with pytest.raises(ValueError):
        ddim_sample.timesteps(20, 21, spacing)


def test_spacing_formulas():
    assert ddim_sample.timesteps(100, 10) == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert ddim_sample.timesteps(1000, 3) == [1000, 666, 333, 0]  # floor(k T / S)
    q = ddim_sample.timesteps(1000, 10, "quadratic")[::-1]
    assert q == [k + (990 * k * k) // 100 for k in range(11)]
    gaps = np.diff(q)
    assert gaps[0] < gaps[-1] and (np.diff(gaps) >= 0).all()  # denser at low noise


def test_alpha_bar_at_indexes_t_minus_1_and_is_1_at_t0():
    s = schedule("cosine", 30)
    ab = closed_alpha_bar("cosine", 30)
    assert ddim_sample.alpha_bar_at(s, 0) == 1.0
    for t in (1, 2, 17, 30):
        assert ddim_sample.alpha_bar_at(s, t) == pytest.approx(ab[t], rel=1e-6)


# ----------------------------------------------------------------------------- the DDIM step
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_eta1_every_step_is_ddpm_posterior(kind):
    """eta = 1, t' = t - 1: mean = mu_tilde(x_t, x0_hat), sigma^2 = beta_tilde_t, both from the closed forms (float64;
    the sampler's alpha_bar is float32, so 1 - alpha_bar_t / alpha_bar_{t-1} carries a relative error near 1e-5)."""
    T, w = 30, 2.0
    model, ab, sched = perturbed_unet(), closed_alpha_bar(kind, T), schedule(kind, T)
    beta = 1 - ab[1:] / ab[:-1]  # beta_t at index t - 1
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 4, 7])
    for t in (T, T - 1, 17, 5, 2, 1):
        x = 1.3 * torch.randn((3, 1, 28, 28), generator=gen)
        z = torch.randn(x.shape, generator=gen)
        x_prev, mean, sigma = ddim_sample.ddim_step(model, x, t, t - 1, y, w, 1.0, sched, z)
        eps = ddpm_mnist_cfg.guided_eps(model, x, torch.full_like(y, t - 1), y, w).double()
        xd, b, a_t, a_p = x.double(), beta[t - 1], ab[t], ab[t - 1]
        x0_hat = ((xd - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        mu = math.sqrt(a_p) * b / (1 - a_t) * x0_hat + math.sqrt(1 - b) * (1 - a_p) / (1 - a_t) * xd
        beta_tilde = (1 - a_p) / (1 - a_t) * b
        assert sigma ** 2 == pytest.approx(beta_tilde, rel=1e-4, abs=1e-12), t
        assert torch.allclose(mean.double(), mu, atol=1e-4), (t, (mean.double() - mu).abs().max())
        assert torch.allclose(x_prev, mean + sigma * z, atol=1e-6)
    assert sigma == 0 and torch.allclose(mean.double(), x0_hat, atol=1e-6)  # t = 1: x_0 = x0_hat, no noise


def test_eta1_every_step_repeats_the_ddpm_sampler_draw_for_draw():
    T, model, y = 25, perturbed_unet(1), torch.arange(6)
    sched = schedule("cosine", T)
    ddpm, _ = ddpm_mnist_cfg.sample(model, sched, y, 2.0, gen=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((6, 1, 28, 28), generator=g)  # first draw, as ddpm_mnist_cfg.sample takes it
    ddim = ddim_sample.ddim_sample(model, sched, ddim_sample.timesteps(T, T), y, 2.0, 1.0, x_T, g)
    assert torch.allclose(ddim, ddpm, atol=1e-4), (ddim - ddpm).abs().max()


def test_eta0_is_deterministic_and_eta1_is_not():
    T, model, y = 20, perturbed_unet(2), torch.arange(4)
    sched, tau = schedule("cosine", T), ddim_sample.timesteps(T, 7)
    x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    runs = [ddim_sample.ddim_sample(model, sched, tau, y, 2.0, eta, x_T, torch.Generator().manual_seed(s))
            for eta in (0.0, 1.0) for s in (1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[2] - runs[3]).abs().max() > 1e-2


class CountingEps(torch.nn.Module):
    """Wraps a noise predictor and counts its forward calls and the rows they carry."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.null_class, self.calls, self.rows = inner, inner.null_class, 0, 0

    def forward(self, x, i, y):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        return self.inner(x, i, y)


@pytest.mark.parametrize("S", [1, 4, 10])
def test_model_calls_S_guided_calls_for_ddim_and_T_for_ddpm(S):
    """Cost is counted, not timed: S DDIM steps are S guided calls per batch (each on the conditional and the
    unconditional copy of the batch); the ancestral sampler takes T."""
    T, y = 10, torch.arange(3)
    sched, model = schedule("cosine", T), CountingEps(perturbed_unet(4))
    x_T = torch.randn((3, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    for eta in (0.0, 1.0):
        model.calls = model.rows = 0
        ddim_sample.ddim_sample(model, sched, ddim_sample.timesteps(T, S), y, 2.0, eta, x_T,
                                torch.Generator().manual_seed(1))
        assert (model.calls, model.rows) == (S, 2 * 3 * S)
    model.calls = model.rows = 0
    ddpm_mnist_cfg.sample(model, sched, y, 2.0, gen=torch.Generator().manual_seed(1))
    assert (model.calls, model.rows) == (T, 2 * 3 * T)


class OracleEps(torch.nn.Module):
    """eps_theta that knows x_0: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), so x0_hat = x_0."""
    null_class = 10

    def __init__(self, x0, sched):
        super().__init__()
        self.x0, self.ab = x0, sched.alpha_bar  # x0: a number (guided_eps doubles the batch)

    def forward(self, x, i, y):
        ab = self.ab[i].view(-1, 1, 1, 1)  # the model is called with the index i = t - 1
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_keeps_the_marginals_q_xt_given_x0(eta):
    """From x_t ~ q(x_t | x_0) with x0_hat = x_0, a jump t -> t' lands on q(x_t' | x_0) for any eta (Song et al.
    2021)."""
    T, t, t_prev, n = 100, 80, 30, 40_000
    ab, sched = closed_alpha_bar("linear", T), schedule("linear", T)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1, 1, 1), 0.6)
    x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * torch.randn(x0.shape, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    x_prev, _, sigma = ddim_sample.ddim_step(OracleEps(0.6, sched), x_t, t, t_prev, torch.zeros(n, dtype=torch.long),
                                             1.0, eta, sched, z)
    assert x_prev.mean().item() == pytest.approx(math.sqrt(ab[t_prev]) * 0.6, abs=0.01)
    assert x_prev.var().item() == pytest.approx(1 - ab[t_prev], rel=0.03)
    assert sigma == pytest.approx(eta * math.sqrt((1 - ab[t_prev]) / (1 - ab[t]) * (1 - ab[t] / ab[t_prev])), rel=1e-4)


# ----------------------------------------------------------------------------- inversion, slerp
class GaussEps(torch.nn.Module):
    """The exact eps for data N(mu, s^2) per pixel, E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
    plus `scale` times a random tiny U-Net: a smooth, nonlinear, class-dependent stand-in for a trained model."""
    null_class = 10

    def __init__(self, sched, scale, s=0.5, mu=-0.5):
        super().__init__()
        self.ab, self.scale, self.s, self.mu, self.net = sched.alpha_bar, scale, s, mu, perturbed_unet(3)

    def forward(self, x, i, y):
        ab = self.ab[i].view(-1, 1, 1, 1)
        exact = (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s ** 2 + 1 - ab)
        return exact + self.scale * self.net(x, i, y)


def test_inversion_then_decoding_returns_the_input_on_a_tiny_model():
    T = 40
    sched = schedule("linear", T)
    model = GaussEps(sched, scale=0.05)
    y = torch.arange(6)
    x0 = torch.tensor(digit_images(y.numpy())).float().div(127.5).sub(1).unsqueeze(1)
    psnr = {}
    for S in (5, 10, T):
        tau = ddim_sample.timesteps(T, S)
        x_T = ddim_sample.ddim_invert(model, sched, tau, x0, y, 1.0)
        rec = ddim_sample.ddim_sample(model, sched, tau, y, 1.0, 0.0, x_T)
        psnr[S] = 10 * math.log10(4 / (rec - x0).square().mean().item())  # dB, images in [-1, 1]
        assert 0.8 < x_T.std() < 1.2 and (x_T - x0).abs().max() > 1  # a unit-scale latent, not x_0 again
    assert psnr[T] > 30 and psnr[5] < psnr[10] < psnr[T], psnr  # measured 15.8, 21.6, 32.8 dB


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(784, generator=g), torch.randn(784, generator=g)
    b = b * a.norm() / b.norm()
    assert torch.allclose(ddim_sample.slerp(a, b, torch.tensor(0.0)), a, atol=1e-5)
    assert torch.allclose(ddim_sample.slerp(a, b, torch.tensor(1.0)), b, atol=1e-5)
    mid = ddim_sample.slerp(a, b, torch.tensor(0.5))
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)  # a straight line would shrink to ~0.71


# ----------------------------------------------------------------------------- the core, copied alone


# ----------------------------------------------------------------------------- smoke run, --quick's model, bad input
@pytest.fixture(scope="module")
def tiny_ckpt(tiny_mnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    r = run_in_process(ddpm_mnist_cfg, "--quick", "--T", "20", "--train-steps", "40", "--eval-every", "20",
                       "--n-samples", "10", "--sweep-n", "10", "--sweep-w", "2", "--no-eval", "--data-root", tiny_mnist,
                       "--out", out, "--run-id", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, os.path.join(out, "ddpm_mnist_cfg", "tiny", "checkpoint.pt")


@pytest.fixture(scope="module")
def smoke(tiny_ckpt, tiny_mnist):
    out, ckpt = tiny_ckpt
    r = run_script("ddim_sample.py", "--quick", "--checkpoint", ckpt, "--data-root", tiny_mnist, "--out", out,
                   "--run-id", "smoke", "--n-samples", "20", "--sample-batch", "10", "--n-mse", "8", "--n-inv", "6",
                   "--judge-epochs", "5")  # a judge that learns something in seconds
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(out, "ddim_sample", "smoke")


def test_smoke_study_table_and_report(smoke):
    m = json.load(open(os.path.join(smoke, "metrics.json")))
    assert m["T"] == 20 and m["steps"] == [10, 20] and m["etas"] == [0.0, 1.0]  # 50 and 100 left out: above T
    rows = {r["name"]: r for r in m["study"]}
    assert list(rows) == ["ddpm_T20", "ddim_eta0_S10", "ddim_eta0_S20", "ddim_eta1_S10", "ddim_eta1_S20"]
    for r in rows.values():
        assert r["n"] == 20 and math.isfinite(r["fid"]) and 0 <= r["class_accuracy"] <= 1 and r["s_per_batch"] > 0
        assert r["s_per_sample"] == pytest.approx(r["s_per_batch"] / 10, rel=1e-6)
        assert r["model_calls"] == r["steps"] and r["speedup"] > 0  # counted, not timed: 10 steps, 10 guided calls
    assert rows["ddpm_T20"]["speedup"] == 1.0 and rows["ddpm_T20"]["model_calls"] == 20
    assert m["tau"]["10"] == list(range(20, -1, -2))
    assert m["headline"] == {"speedup_50": None, "psnr_100": None, "fid_ratio_50": None}  # no 50 or 100 at T = 20
    report = open(os.path.join(smoke, "analysis_report.md")).read()
    assert "| DDPM | 1 | 20 | 20 |" in report and "| DDIM | 0 | 10 | 10 |" in report and "## What it shows" in report
    assert f"{rows['ddim_eta1_S20']['fid']:.2f}" in report and "Inversion" in report
    assert not any(word in report.lower() for word in ("target", " met", "not met"))  # figures, no grades
    assert json.load(open(os.path.join(smoke, "status.json")))["state"] == "completed"


def test_smoke_mse_inversion_and_figures(smoke):
    m = json.load(open(os.path.join(smoke, "metrics.json")))
    mse = m["mse_vs_t"]
    assert mse["t"] == list(range(1, 21)) and all(v > 0 and math.isfinite(v) for v in mse["eps_cond"])
    assert mse["hardest_t_eps"] in mse["t"] and mse["x0_cond"][0] < mse["x0_cond"][-1]
    inv = m["inversion"]
    assert [r["steps"] for r in inv] == [10, 20] and all(math.isfinite(r["psnr_db"]) for r in inv)
    assert inv[-1]["psnr_db"] > 15, inv
    for name in ("grid_ddpm_T20", "grid_ddim_eta0_S10", "grid_ddim_eta1_S20", "study_grid", "quality", "interp_ddim",
                 "interp_ddpm", "mse_vs_t", "inversion", "inversion_psnr"):
        assert os.path.getsize(os.path.join(smoke, name + ".png")) > 1000, name


def test_quick_trains_its_tiny_model_with_ddpm_mnist_cfgs_own_functions(tiny_mnist, tmp_path):
    """--quick without --checkpoint: ddpm_mnist_cfg's parser (its quick preset, T = 50) and training loop; the
    checkpoint lands in this run and is a ddpm_mnist_cfg checkpoint that --checkpoint reads."""
    targs = ddpm_mnist_cfg.parse_args(ddim_sample.QUICK_TRAIN + ["--data-root", tiny_mnist, "--out", str(tmp_path),
                                                                 "--train-steps", "2"])
    assert targs.T == 50 and targs.channels == (8, 16, 32) and targs.p_uncond == 0.1
    quick_steps = ddpm_mnist_cfg.PRESETS["quick"]["train_steps"]
    assert ddpm_mnist_cfg.parse_args(ddim_sample.QUICK_TRAIN).train_steps == quick_steps
    data = common.load_image_dataset(targs.dataset, targs.data_root, train=True, val_size=targs.val_size)
    run = harness.Run(ddim_sample.SCRIPT, targs)
    eps_model, sched = ddim_sample.train_tiny(targs, data, run, torch.device("cpu"))
    assert sched.T == 50 and not any(p.requires_grad for p in eps_model.parameters())
    loaded, _, cfg = ddpm_mnist_cfg.load_eps_model(run.path("checkpoint.pt"), "cpu")
    assert cfg["T"] == 50 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                    eps_model.state_dict().values()))
    assert run.metrics["trained_tiny_model"]["train_steps"] == 2


@pytest.mark.parametrize("case", ["other_checkpoint", "steps_over_T", "negative_eta", "no_checkpoint", "no_eta",
                                  "bad_steps"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, tiny_ckpt):
    other = str(tmp_path / "other.pt")
    torch.save({"script": "edm_mnist", "kind": "model", "config": {}}, other)
    ck = ["--checkpoint", tiny_ckpt[1]]
    args = {"other_checkpoint": ["--checkpoint", other], "steps_over_T": ck + ["--sample-steps", "10,50"],
            "negative_eta": ck + ["--etas=-0.5"], "no_checkpoint": [], "no_eta": ck + ["--etas="],
            "bad_steps": ck + ["--sample-steps", "10,x"]}[case]
    out = str(tmp_path / "out")
    r = run_in_process(ddim_sample, *args, "--out", out, "--data-root", str(tmp_path / "nowhere"))
    assert r.returncode == 2, r.stderr[-1000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    want = {"other_checkpoint": "not a ddpm_mnist_cfg model checkpoint", "steps_over_T": "T = 20",
            "negative_eta": "[0, 1]", "no_checkpoint": "--checkpoint", "no_eta": "--etas", "bad_steps": "10,x"}
    assert want[case] in r.stderr
    assert not os.path.exists(os.path.join(out, "ddim_sample"))  # nothing half-written

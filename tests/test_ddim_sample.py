"""ddim_sample.py: step subsequences, the DDIM step against DDPM's closed-form posterior, determinism, marginals,
inversion, a smoke run on a tiny checkpoint, bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch

import ddim_sample as M
import ddpm_mnist_cfg as D
from conftest import run_script


def perturbed_unet(seed=0, channels=(8, 16, 32)):
    """A random tiny U-Net with its conditioning switched on (the zero-initialised injections get weights)."""
    torch.manual_seed(seed)
    m = D.UNet(channels)
    for mod in m.modules():
        if isinstance(mod, D.ScaleShift):
            torch.nn.init.normal_(mod.proj[1].weight, std=0.3)
    return m.eval().requires_grad_(False)


def closed_alpha_bar(kind, T):
    """alpha_bar_t for t = 0..T from the betas in float64 numpy, independently of the script's table."""
    return np.concatenate([[1.0], np.cumprod(1 - D.make_betas(kind, T).numpy())])


# ----------------------------------------------------------------------------- step subsequences
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_timesteps_strictly_decreasing_from_T_to_0(spacing):
    for T in (1, 20, 50, 250, 1000):
        for S in (1, 2, 7, 10, 20, 50, 100, 999, T):
            if S > T:
                continue
            tau = M.timesteps(T, S, spacing)
            assert len(tau) == S + 1 and tau[0] == T and tau[-1] == 0, (T, S)
            assert all(a > b for a, b in zip(tau, tau[1:])), (T, S, tau)
        assert M.timesteps(T, T, spacing) == list(range(T, -1, -1))  # every step: consecutive
    with pytest.raises(ValueError):
        M.timesteps(20, 21, spacing)


def test_spacing_formulas():
    assert M.timesteps(100, 10) == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert M.timesteps(1000, 3) == [1000, 666, 333, 0]  # floor(k T / S)
    q = M.timesteps(1000, 10, "quadratic")[::-1]
    assert q == [k + (990 * k * k) // 100 for k in range(11)]
    gaps = np.diff(q)
    assert gaps[0] < gaps[-1] and (np.diff(gaps) >= 0).all()  # denser at low noise


# ----------------------------------------------------------------------------- the DDIM step
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_eta1_every_step_is_ddpm_posterior(kind):
    """eta = 1, t' = t - 1: mean = mu_tilde(x_t, x0_hat), sigma^2 = beta_tilde_t, both from the closed forms."""
    T, w = 30, 2.0
    model, ab = perturbed_unet(), closed_alpha_bar(kind, T)
    beta = 1 - ab[1:] / ab[:-1]  # beta_t at index t - 1
    alpha_bar = M.alpha_bar_table(kind, T)
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 4, 7])
    for t in (T, T - 1, 17, 5, 2, 1):
        x = 1.3 * torch.randn((3, 1, 28, 28), generator=gen)
        z = torch.randn(x.shape, generator=gen)
        x_prev, mean, sigma = M.ddim_step(model, x, t, t - 1, y, w, 1.0, alpha_bar, z)
        eps = D.guided_eps(model, x, torch.full_like(y, t - 1), y, w).double()
        xd, b, a_t, a_p = x.double(), beta[t - 1], ab[t], ab[t - 1]
        x0_hat = ((xd - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        mu = math.sqrt(a_p) * b / (1 - a_t) * x0_hat + math.sqrt(1 - b) * (1 - a_p) / (1 - a_t) * xd
        beta_tilde = (1 - a_p) / (1 - a_t) * b
        assert sigma ** 2 == pytest.approx(beta_tilde, rel=1e-9, abs=1e-15), t
        assert torch.allclose(mean.double(), mu, atol=2e-5), (t, (mean.double() - mu).abs().max())
        assert torch.allclose(x_prev, mean + sigma * z, atol=1e-6)
    assert sigma == 0 and torch.allclose(mean.double(), x0_hat, atol=1e-6)  # t = 1: x_0 = x0_hat, no noise


def test_eta1_every_step_repeats_the_ddpm_sampler_draw_for_draw():
    T, model, y = 25, perturbed_unet(1), torch.arange(6)
    ddpm, _ = D.sample(model, D.make_schedule("cosine", T), y, 2.0, gen=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((6, 1, 28, 28), generator=g)  # first draw, as ddpm_mnist_cfg.sample takes it
    ddim = M.ddim_sample(model, M.alpha_bar_table("cosine", T), M.timesteps(T, T), y, 2.0, 1.0, x_T, g)
    assert torch.allclose(ddim, ddpm, atol=1e-4), (ddim - ddpm).abs().max()


def test_eta0_is_deterministic_and_eta1_is_not():
    T, model, y = 20, perturbed_unet(2), torch.arange(4)
    ab, tau = M.alpha_bar_table("cosine", T), M.timesteps(T, 7)
    x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    runs = [M.ddim_sample(model, ab, tau, y, 2.0, eta, x_T, torch.Generator().manual_seed(s))
            for eta in (0.0, 1.0) for s in (1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[2] - runs[3]).abs().max() > 1e-2


class OracleEps(torch.nn.Module):
    """eps_theta that knows x_0: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), so x0_hat = x_0."""
    null_class = 10

    def __init__(self, x0, alpha_bar):
        super().__init__()
        self.x0, self.ab = x0, alpha_bar.float()  # x0: a number (guided_eps doubles the batch)

    def forward(self, x, t, y):
        ab = self.ab[t + 1].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_keeps_the_marginals_q_xt_given_x0(eta):
    """From x_t ~ q(x_t | x_0) with x0_hat = x_0, a jump t -> t' lands on q(x_t' | x_0) for any eta (Song et al. 2021)."""
    T, t, t_prev, n = 100, 80, 30, 40_000
    ab = M.alpha_bar_table("linear", T)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1, 1, 1), 0.6)
    x_t = ab[t].sqrt().float() * x0 + (1 - ab[t]).sqrt().float() * torch.randn(x0.shape, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    x_prev, _, sigma = M.ddim_step(OracleEps(0.6, ab), x_t, t, t_prev, torch.zeros(n, dtype=torch.long), 1.0, eta, ab, z)
    assert x_prev.mean().item() == pytest.approx(math.sqrt(ab[t_prev]) * 0.6, abs=0.01)
    assert x_prev.var().item() == pytest.approx(1 - ab[t_prev].item(), rel=0.03)
    assert sigma == pytest.approx(eta * math.sqrt((1 - ab[t_prev]) / (1 - ab[t]) * (1 - ab[t] / ab[t_prev])))


# ----------------------------------------------------------------------------- inversion, slerp
class GaussEps(torch.nn.Module):
    """The exact eps for data N(mu, s^2) per pixel, E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
    plus `scale` times a random tiny U-Net: a smooth, nonlinear, class-dependent stand-in for a trained model."""
    null_class = 10

    def __init__(self, alpha_bar, scale, s=0.5, mu=-0.5):
        super().__init__()
        self.ab, self.scale, self.s, self.mu, self.net = alpha_bar.float(), scale, s, mu, perturbed_unet(3)

    def forward(self, x, t, y):
        ab = self.ab[t + 1].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s ** 2 + 1 - ab) + self.scale * self.net(x, t, y)


def test_inversion_then_decoding_returns_the_input_on_a_tiny_model():
    from conftest import digit_images
    T = 40
    ab = M.alpha_bar_table("linear", T)
    model = GaussEps(ab, scale=0.05)
    y = torch.arange(6)
    x0 = torch.tensor(digit_images(y.numpy())).float().div(127.5).sub(1).unsqueeze(1)
    psnr = {}
    for S in (5, 10, T):
        tau = M.timesteps(T, S)
        x_T = M.ddim_invert(model, ab, tau, x0, y, 1.0)
        rec = M.ddim_sample(model, ab, tau, y, 1.0, 0.0, x_T)
        psnr[S] = 10 * math.log10(4 / (rec - x0).square().mean().item())  # dB, images in [-1, 1]
        assert 0.8 < x_T.std() < 1.2 and (x_T - x0).abs().max() > 1  # a unit-scale latent, not x_0 again
    assert psnr[T] > 30 and psnr[5] < psnr[10] < psnr[T], psnr  # measured 15.8, 21.6, 32.8 dB


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(784, generator=g), torch.randn(784, generator=g)
    b = b * a.norm() / b.norm()
    assert torch.allclose(M.slerp(a, b, torch.tensor(0.0)), a, atol=1e-5)
    assert torch.allclose(M.slerp(a, b, torch.tensor(1.0)), b, atol=1e-5)
    mid = M.slerp(a, b, torch.tensor(0.5))
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)  # a straight line would shrink to ~0.71


def test_quick_training_args_come_from_ddpm_parser():
    class A:
        data_root, seed, out = "somewhere", 3, "o"
    targs = M.quick_train_args(A)
    assert targs.T == 50 and targs.channels == (8, 16, 32) and targs.data_root == "somewhere" and targs.seed == 3
    assert targs.steps == D.PRESETS["quick"]["steps"] and targs.p_uncond == 0.1


# ----------------------------------------------------------------------------- smoke run and bad input
@pytest.fixture(scope="module")
def tiny_ckpt(tiny_mnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    r = run_script("ddpm_mnist_cfg.py", "--quick", "--T", "20", "--steps", "40", "--eval-every", "20", "--n-eval", "10",
                   "--sweep-n", "10", "--sweep-w", "2", "--no-eval", "--data-root", tiny_mnist, "--out", out,
                   "--run-id", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, os.path.join(out, "ddpm_mnist_cfg", "tiny", "checkpoint.pt")


@pytest.fixture(scope="module")
def smoke(tiny_ckpt, tiny_mnist):
    out, ckpt = tiny_ckpt
    r = run_script("ddim_sample.py", "--quick", "--checkpoint", ckpt, "--data-root", tiny_mnist, "--out", out,
                   "--run-id", "smoke", "--n-eval", "40", "--sample-batch", "20", "--n-mse", "16", "--n-inv", "8",
                   "--judge-epochs", "5")  # a judge that learns something in seconds
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(out, "ddim_sample", "smoke")


def test_smoke_study_table_and_report(smoke):
    m = json.load(open(os.path.join(smoke, "metrics.json")))
    assert m["T"] == 20 and m["steps"] == [10, 20] and m["etas"] == [0.0, 1.0]  # 50 and 100 left out: above T
    rows = {r["name"]: r for r in m["study"]}
    assert list(rows) == ["ddpm_T20", "ddim_eta0_S10", "ddim_eta0_S20", "ddim_eta1_S10", "ddim_eta1_S20"]
    for r in rows.values():
        assert r["n"] == 40 and math.isfinite(r["fid"]) and 0 <= r["class_accuracy"] <= 1 and r["s_per_batch"] > 0
        assert r["s_per_sample"] == pytest.approx(r["s_per_batch"] / 20, rel=1e-6)
    assert rows["ddpm_T20"]["speedup"] == 1.0 and rows["ddim_eta0_S10"]["speedup"] > 1.2  # half the model calls
    assert m["tau"]["10"] == list(range(20, -1, -2))
    report = open(os.path.join(smoke, "analysis_report.md")).read()
    assert "| DDPM | 1 | 20 |" in report and "| DDIM | 0 | 10 |" in report and "## What it shows" in report
    assert f"{rows['ddim_eta1_S20']['fid']:.2f}" in report and "Inversion" in report
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


@pytest.mark.parametrize("case", ["other_checkpoint", "steps_over_T", "negative_eta", "no_checkpoint"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, tiny_ckpt):
    other = str(tmp_path / "other.pt")
    torch.save({"script": "edm_mnist", "kind": "model", "config": {}}, other)
    ck = ["--checkpoint", tiny_ckpt[1]]
    args = {"other_checkpoint": ["--checkpoint", other], "steps_over_T": ck + ["--steps-list", "10,50"],
            "negative_eta": ck + ["--etas=-0.5"], "no_checkpoint": []}[case]
    out = str(tmp_path / "out")
    r = run_script("ddim_sample.py", *args, "--out", out, "--data-root", str(tmp_path / "nowhere"))
    assert r.returncode == 2, r.stderr[-1000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    want = {"other_checkpoint": "not a ddpm_mnist_cfg model checkpoint", "steps_over_T": "T = 20",
            "negative_eta": "[0, 1]", "no_checkpoint": "--checkpoint"}
    assert want[case] in r.stderr
    assert not os.path.exists(os.path.join(out, "ddim_sample"))  # nothing half-written

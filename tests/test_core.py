"""The copy-paste test: the core of every method script (the span between its two core markers) runs alone in a
fresh namespace holding only math, numpy, torch, torch.nn and torch.nn.functional (and, for a script that samples a
model trained elsewhere, that script's core under its module name), trains a few steps on tiny tensors and samples.
This is what a reader who copies a core into another project gets."""
import copy
import math

import pytest
import torch

from conftest import core_namespace


def test_core_of_ddpm_states_trains_and_samples_alone():
    ns = core_namespace("ddpm_states.py")
    sched, model = ns["Schedule"](ns["linear_beta"](50)), ns["EpsMLP"](32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, gen = torch.randn(128, 2), torch.Generator().manual_seed(0)
    for _ in range(5):
        i, eps = torch.randint(0, 50, (128,), generator=gen), torch.randn(128, 2, generator=gen)
        loss = ns["ddpm_loss"](model, x0, i, eps, sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, traj = ns["sample"](model, sched, 16, gen, "beta_tilde", record_every=10)
    assert math.isfinite(loss.item()) and x.shape == (16, 2) and torch.isfinite(x).all() and len(traj) == 6


def test_core_of_classifier_guidance_trains_and_samples_alone():
    ns = core_namespace("classifier_guidance_states.py", ddpm_states=core_namespace("ddpm_states.py"))
    sched = ns["ddpm_states"].Schedule(ns["ddpm_states"].linear_beta(30))
    clf, eps_model = ns["Classifier"](3), ns["ddpm_states"].EpsMLP(16, 2)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x0, y = torch.randn(96, 2), torch.arange(96) % 3
    for _ in range(5):
        loss = ns["classifier_loss"](clf, x0, y, torch.randint(0, 30, (96,)), torch.randn(96, 2), sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = ns["guided_sample"](eps_model, clf, sched, torch.tensor([0, 1, 2, 2]), torch.Generator().manual_seed(0), 2.0)
    assert math.isfinite(loss.item()) and x.shape == (4, 2) and torch.isfinite(x).all()


def test_core_of_evaluate_trains_a_judge_and_scores_alone():
    """The copy-paste test: the core runs with only torch, numpy and math; a few steps on tiny tensors."""
    ns = core_namespace("evaluate.py")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28) * 2 - 1, torch.arange(16) % 3
    judge = ns["Judge"](3)
    opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(judge(ns["augment"](x, gen)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    feats, probs = ns["judge_outputs"](judge, x, "cpu", batch=10)
    assert feats.shape == (16, 128) and feats.dtype == torch.float64 and probs.shape == (16, 3)
    assert torch.allclose(probs.sum(1), torch.ones(16))
    fid = ns["frechet_distance"](*ns["gaussian_stats"](feats[:8]), *ns["gaussian_stats"](feats[8:]))
    assert math.isfinite(fid) and fid >= 0
    assert ns["frechet_distance"](*ns["gaussian_stats"](feats), *ns["gaussian_stats"](feats)) == \
        pytest.approx(0, abs=1e-8)


def test_core_of_ddpm_mnist_cfg_trains_and_samples_alone():
    ns = core_namespace("ddpm_mnist_cfg.py")
    torch.manual_seed(0)
    eps_model, sched = ns["UNet"]((8, 16, 32)), ns["Schedule"](ns["cosine_beta"](10))
    ema, opt = copy.deepcopy(eps_model).requires_grad_(False), torch.optim.AdamW(eps_model.parameters(), lr=1e-3)
    for step in range(3):
        x0, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (4,))
        loss = ns["ddpm_loss"](eps_model, x0, y, torch.randint(0, 10, (4,)), torch.randn_like(x0), sched,
                               torch.rand(4), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ns["ema_update"](ema, eps_model, step, 0.99)
        assert math.isfinite(loss.item())
    x, traj = ns["sample"](ema.eval(), sched, torch.arange(4), 2.0, record_every=5,
                           gen=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all() and len(traj) == 3


def test_core_of_ddim_sample_samples_inverts_and_interpolates_alone():
    """ddim_sample's core with ddpm_mnist_cfg's core as its only module: train the U-Net a few steps with that core's
    loss, then sample (eta 0 and 1), invert and slerp."""
    trainer = core_namespace("ddpm_mnist_cfg.py")
    ns = core_namespace("ddim_sample.py", ddpm_mnist_cfg=trainer)
    torch.manual_seed(0)
    eps_model, sched = trainer["UNet"]((8, 16, 32)), trainer["Schedule"](trainer["cosine_beta"](10))
    opt = torch.optim.Adam(eps_model.parameters(), lr=1e-3)
    for _ in range(2):
        x0 = torch.rand(4, 1, 28, 28) * 2 - 1
        loss = trainer["ddpm_loss"](eps_model, x0, torch.randint(0, 10, (4,)), torch.randint(0, 10, (4,)),
                                    torch.randn_like(x0), sched, torch.rand(4), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    eps_model.eval()
    y, tau = torch.arange(3), ns["timesteps"](10, 4, "quadratic")
    x_T = ns["slerp"](torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.tensor(0.3))
    for eta in (0.0, 1.0):
        x = ns["ddim_sample"](eps_model, sched, tau, y, 2.0, eta, x_T, torch.Generator().manual_seed(0))
        assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all() and x.abs().max() <= 1
    latent = ns["ddim_invert"](eps_model, sched, tau, x, y, 1.0)
    assert latent.shape == x.shape and torch.isfinite(latent).all()


def test_core_of_edm_mnist_trains_and_samples_alone():
    ns = core_namespace("edm_mnist.py")
    torch.manual_seed(0)
    D = ns["Denoiser"](ns["UNet"]((4, 8, 8)), 0.5)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3)
    x0, gen = torch.rand(8, 1, 28, 28) * 2 - 1, torch.Generator().manual_seed(0)
    for _ in range(3):
        loss = ns["edm_loss"](D, x0, -1.2, 1.2, gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    x = ns["edm_sampler"](D.eval(), torch.randn(2, 1, 28, 28), ns["karras_sigmas"](3), S_churn=1.0, gen=gen)
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


def test_core_of_edm_posterior_samples_alone():
    """The posterior sampler copied with only torch and the EDM core: a few steps of EDM training on tiny tensors,
    then posterior draws in every mode keep the observed pixels and stay finite."""
    edm = core_namespace("edm_mnist.py")
    ns = core_namespace("edm_posterior.py", edm_mnist=edm)
    torch.manual_seed(0)
    D = edm["Denoiser"](edm["UNet"]((4, 8, 8)), 0.5)
    opt, gen = torch.optim.Adam(D.parameters(), lr=1e-3), torch.Generator().manual_seed(0)
    for _ in range(2):
        loss = edm["edm_loss"](D, torch.rand(4, 1, 28, 28) * 2 - 1, -1.2, 1.2, gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mask = ns["make_mask"]("random", 0.5, 0)
    y = ns["observe"](torch.rand(1, 1, 28, 28) * 2 - 1, mask, 0.0, 0)
    for guidance in ("tweedie", "masked", "dps", "none", "smc"):
        latents, sigmas = torch.randn(4, 1, 28, 28), edm["karras_sigmas"](3)
        x = ns["smc_sampler"](D.eval(), latents, sigmas, y, mask, particles=2, gen=gen) if guidance == "smc" else \
            ns["posterior_sampler"](D.eval(), latents, sigmas, y, mask, guidance=guidance, gen=gen, cg_iters=2)
        n = 2 if guidance == "smc" else 4
        assert x.shape == (n, 1, 28, 28) and torch.isfinite(x).all()
        assert torch.equal(x[:, mask[0].bool()], y[:, mask[0].bool()].expand(n, -1))


def test_core_of_svd_posterior_runs_alone():
    edm = core_namespace("edm_mnist.py")
    posterior = core_namespace("edm_posterior.py", edm_mnist=edm)
    ns = core_namespace("svd_posterior.py", edm_posterior=posterior, edm_mnist=edm)
    mask = posterior["make_mask"]("random", 0.5, 0)
    y = posterior["observe"](torch.rand(1, 1, 28, 28) * 2 - 1, mask, 0.0, 0)
    draws = posterior["posterior_sampler"](lambda x, sigma: x * 0.36 / (0.36 + sigma ** 2), torch.randn(12, 1, 28, 28), edm["karras_sigmas"](6), y,
                                           mask, guidance="none", gen=torch.Generator().manual_seed(0))
    X, s_raw, s_c, U = ns["snapshot_svd"](draws)
    st = ns["spectrum_stats"](s_c)
    assert X.shape == (784, 12) and U.shape == (784, 12) and 1 <= st["k95"] <= st["k99"] <= 12
    assert math.isfinite(st["participation_ratio"]) and ns["spectrum_stats"](s_raw)["k95"] >= 1


"""STATES pair: the DDPM math against closed forms, the dataset, the KDE score, guidance, and the scripts end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch

import classifier_guidance_states as cg
import common
import ddpm_states as ddpm
from conftest import run_script


# ----------------------------------------------------------------------------- DDPM math
def test_alpha_bar_closed_form():
    T, b0, b1 = 500, 1e-4, 0.02
    s = ddpm.Schedule(T, b0, b1)
    beta = b0 + (b1 - b0) * np.arange(T) / (T - 1)  # linear, endpoints included
    alpha_bar = np.exp(np.cumsum(np.log1p(-beta)))
    np.testing.assert_allclose(s.alpha_bar.numpy(), alpha_bar, rtol=1e-5)
    assert 0.005 < s.alpha_bar[-1] < 0.008  # about exp(-sum beta) = exp(-5.0): x_T keeps 8% of the signal
    np.testing.assert_allclose(s.beta_tilde[0].item(), 0.0, atol=1e-12)  # q(x_0 | x_1, x_0) is a point mass


def test_q_sample_moments_monte_carlo():
    s = ddpm.Schedule(500)
    x0 = torch.tensor([[1.5, -0.5]]).repeat(200_000, 1)
    for i in (0, 100, 499):
        t = torch.full((len(x0),), i)
        xt = ddpm.q_sample(s, x0, t, torch.randn_like(x0))
        ab = float(np.prod(1 - np.linspace(1e-4, 0.02, 500)[: i + 1]))
        np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(ab) * x0[0].numpy(), atol=0.01)
        np.testing.assert_allclose(xt.var(0).numpy(), [1 - ab, 1 - ab], atol=0.01)


@pytest.mark.parametrize("i", [1, 50, 499])
def test_reverse_step_is_the_posterior_q_xtm1_given_xt_x0(i):
    """With the true eps, the sampler's mean is E[x_{t-1} | x_t, x_0] and beta_tilde is its variance, both computed
    here by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0 (float64, from the betas alone)."""
    beta = np.linspace(1e-4, 0.02, 500)
    ab_prev, ab_t = np.prod(1 - beta[:i]), np.prod(1 - beta[: i + 1])
    # x_{t-1} = sqrt(ab_prev) x0 + sqrt(1-ab_prev) e1;  x_t = sqrt(1-beta_t) x_{t-1} + sqrt(beta_t) e2
    var_prev, var_t, cov = 1 - ab_prev, 1 - ab_t, math.sqrt(1 - beta[i]) * (1 - ab_prev)
    x0, xt = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.3, 0.9]])
    mean = math.sqrt(ab_prev) * x0 + cov / var_t * (xt - math.sqrt(ab_t) * x0)
    var = var_prev - cov ** 2 / var_t
    s = ddpm.Schedule(500)
    eps = (xt - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    got = ddpm.reverse_mean(s, xt, torch.tensor([i]), eps)
    torch.testing.assert_close(got, mean.float(), atol=2e-5, rtol=1e-4)
    assert s.beta_tilde[i].item() == pytest.approx(var, rel=1e-4)


def test_sampler_with_exact_denoiser_of_a_gaussian_returns_that_gaussian():
    """For data N(m, c^2 I) the optimal eps is known in closed form; ancestral sampling must return N(m, c^2 I)."""
    m, c = torch.tensor([1.0, -2.0]), 0.5
    s = ddpm.Schedule(500)

    def eps_star(x, tb):  # E[eps | x_t] for Gaussian data
        i = torch.round(tb * 250 + 250).long()
        ab = s.alpha_bar[i][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * c ** 2 + 1 - ab)

    for sigma in ("beta", "beta_tilde"):
        x, _ = ddpm.sample(eps_star, s, 20_000, torch.Generator().manual_seed(0), sigma)
        torch.testing.assert_close(x.mean(0), m, atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), c), atol=0.03, rtol=0)


def test_guided_step_raises_log_p_y():
    """A classifier with logits linear in x: the guided step must end with a higher log p(y | x) than the
    unguided one from the same x_t, and s = 0 must be plain DDIM."""
    torch.manual_seed(0)
    s = ddpm.Schedule(500)
    w = torch.randn(5, 2)
    clf = lambda x, tb: x @ w.T  # noqa: E731
    model = lambda x, tb: 0.1 * x  # noqa: E731
    x, y = torch.randn(256, 2), torch.randint(0, 5, (256,))
    log_p = lambda z: torch.log_softmax(clf(z, None), 1)[torch.arange(len(z)), y]  # noqa: E731
    for i in (10, 250, 499):
        plain = cg.guided_step(model, clf, s, x, i, y, 0.0)
        guided = cg.guided_step(model, clf, s, x, i, y, 0.5)
        assert (log_p(guided) > log_p(plain)).float().mean() > 0.99
        ab, abp = s.alpha_bar[i], s.alpha_bar_prev[i]
        x0 = (x - (1 - ab).sqrt() * model(x, None)) / ab.sqrt()
        torch.testing.assert_close(plain, abp.sqrt() * x0 + (1 - abp).sqrt() * model(x, None))


# ----------------------------------------------------------------------------- data and score
def test_states_balanced_standardized_deterministic():
    x, y = common.make_states(1000, seed=3)
    assert x.shape == (5000, 2) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [1000] * 5
    assert x.mean(0).abs().max() < 0.03 and (x.std(0) - 1).abs().max() < 0.03
    x2, _ = common.make_states(1000, seed=3)
    xv, _ = common.make_states(1000, seed=3, split="val")
    assert torch.equal(x, x2) and not torch.allclose(x, xv)
    # clockwise from the top: Ohio (label 2) highest; Wisconsin (4) to the right; Michigan (0) to the left
    centre = torch.stack([x[y == k].mean(0) for k in range(5)])
    assert centre[:, 1].argmax() == 2 and centre[4, 0] > 0 > centre[0, 0]


def test_nll_score_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 2)) @ np.array([[1.0, 0.4], [0.0, 0.6]]) + [0.5, -1]
    pts = rng.normal(size=(300, 2)) * 1.5
    expected = -np.mean(stats.gaussian_kde(ref.T).logpdf(pts.T))
    assert common.nll_score(torch.tensor(pts), torch.tensor(ref)) == pytest.approx(expected, abs=1e-6)


def test_data_flag_round_trip(tmp_path):
    x, y = common.make_states(50, seed=0)
    path = tmp_path / "course.pt"
    torch.save({"data": x, "labels": y}, path)
    x2, y2 = common.load_points(str(path))
    assert torch.equal(x, x2) and torch.equal(y, y2)


# ----------------------------------------------------------------------------- end to end
def read(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = run_script("ddpm_states.py", "--quick", "--out", str(out), "--run-id", "t")
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(out, "ddpm_states", "t")


def test_ddpm_states_quick_outputs(ddpm_run):
    samples = torch.load(os.path.join(ddpm_run, "uncond_gen_samples.pt"))
    assert samples.shape == (1000, 2) and torch.isfinite(samples).all()
    assert samples.std(0).min() > 0.3  # not collapsed, not all equal
    m = read(ddpm_run, "metrics.json")
    for k in ("nll", "nll_floor", "reverse_nll", "reverse_nll_floor", "wall_time_s", "final_val_loss"):
        assert math.isfinite(m[k]), k
    assert m["nll"] < 4.0  # even 200 steps put samples near the outlines (noise would score ~5)
    assert read(ddpm_run, "status.json")["state"] == "completed"
    for f in ("denoiser.pt", "samples.png", "loss.png", "forward_process.png", "reverse_process.png", "config.json"):
        assert os.path.getsize(os.path.join(ddpm_run, f)) > 0, f


def test_classifier_guidance_quick_outputs(ddpm_run, tmp_path):
    r = run_script("classifier_guidance_states.py", "--quick", "--denoiser", os.path.join(ddpm_run, "denoiser.pt"),
                   "--out", str(tmp_path), "--run-id", "t")
    assert r.returncode == 0, r.stderr[-2000:]
    d = os.path.join(tmp_path, "classifier_guidance_states", "t")
    means = []
    for k in range(5):
        sk = torch.load(os.path.join(d, f"cond_gen_samples_{k}.pt"))
        assert sk.shape == (300, 2) and torch.isfinite(sk).all() and sk.std(0).min() > 0.01
        means.append(sk.mean(0))
    assert torch.cdist(torch.stack(means), torch.stack(means)).fill_diagonal_(9).min() > 0.5  # distinct states
    m = read(d, "metrics.json")
    assert set(m["per_state"]) == set(common.STATE_NAMES)
    for v in m["per_state"].values():
        assert {"nll", "nll_floor", "reverse_nll", "reverse_nll_floor", "on_state"} <= set(v)
        assert 0 <= v["on_state"] <= 1
    assert m["min_on_state"] > 0.5  # guidance works even with the quick budgets
    for f in ("classifier.pt", "guided_samples.png", "prediction_maps.png", "classifier_loss.png"):
        assert os.path.getsize(os.path.join(d, f)) > 0, f


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("script,args,needle", [
    ("ddpm_states.py", ["--device", "tpu"], "--device"),
    ("ddpm_states.py", ["--n-per-state", "-5"], "--n-per-state"),
    ("ddpm_states.py", ["--steps", "0"], "--steps"),
    ("ddpm_states.py", ["--data", "nope.pt"], "no such file"),
    ("classifier_guidance_states.py", ["--denoiser", "missing.pt"], "checkpoint not found"),
    ("classifier_guidance_states.py", ["--n-samples", "-1"], "--n-samples"),
])
def test_bad_input_one_line_exit_2(tmp_path, script, args, needle):
    r = run_script(script, *args, "--quick", "--out", str(tmp_path))
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_malformed_data_and_foreign_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"data": torch.randn(10, 3), "labels": torch.zeros(10, dtype=torch.long)}, bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"script": "edm_mnist", "kind": "model", "model": {}}, foreign)
    out = tmp_path / "out"
    for script, args, needle in [("ddpm_states.py", ["--data", str(bad)], "N x 2"),
                                 ("classifier_guidance_states.py", ["--denoiser", str(foreign)], "edm_mnist")]:
        r = run_script(script, *args, "--quick", "--out", str(out))
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_weights(tmp_path, monkeypatch):
    """The denoiser's output turns NaN from the 61st training step on: the run must stop naming step 60
    (0-based), mark itself failed, and leave the weights of the evaluation at step 50 in denoiser.pt."""
    calls = {"n": 0}
    forward = ddpm.Denoiser.forward

    def poisoned(self, x, tb):
        out = forward(self, x, tb)
        if torch.is_grad_enabled():  # a training step, not a validation pass
            calls["n"] += 1
            if calls["n"] > 60:
                out = out * float("nan")
        return out

    monkeypatch.setattr(ddpm.Denoiser, "forward", poisoned)
    monkeypatch.setattr("sys.argv", ["ddpm_states.py", "--quick", "--out", str(tmp_path), "--run-id", "nan"])
    with pytest.raises(SystemExit) as e:
        ddpm.main()
    assert "at step 60" in str(e.value.code) and "last good weights" in str(e.value.code)
    d = tmp_path / "ddpm_states" / "nan"
    status = read(d, "status.json")
    assert status["state"] == "failed" and "step 60" in status["message"]
    model, _ = ddpm.load_denoiser(str(d / "denoiser.pt"), "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (d / "uncond_gen_samples.pt").exists()


def test_quick_sets_defaults_and_explicit_flags_win(monkeypatch):
    p = common.make_parser("test")
    ddpm.add_denoiser_args(p)
    monkeypatch.setattr("sys.argv", ["ddpm_states.py", "--quick", "--steps", "7"])
    args = ddpm.parse_with_quick(p, T=100, steps=200)
    assert args.steps == 7 and args.T == 100  # the explicit flag wins; the rest take the quick value
    monkeypatch.setattr("sys.argv", ["ddpm_states.py", "--steps", "7"])
    p = common.make_parser("test")
    ddpm.add_denoiser_args(p)
    args = ddpm.parse_with_quick(p, T=100, steps=200)
    assert args.steps == 7 and args.T == 500  # without --quick the quick values do not apply


def test_classifier_nan_stops_with_the_step_and_keeps_the_last_good_classifier(ddpm_run, tmp_path, monkeypatch):
    """The classifier's logits turn NaN from its 61st training step on: the run stops naming step 60 (0-based),
    is marked failed, and classifier.pt holds the finite weights of the evaluation at step 50."""
    calls = {"n": 0}
    forward = cg.Classifier.forward

    def poisoned(self, *a):
        out = forward(self, *a)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 60:
                out = out * float("nan")
        return out

    monkeypatch.setattr(cg.Classifier, "forward", poisoned)
    monkeypatch.setattr("sys.argv", ["classifier_guidance_states.py", "--quick", "--denoiser",
                                     os.path.join(ddpm_run, "denoiser.pt"), "--out", str(tmp_path), "--run-id", "nan"])
    with pytest.raises(SystemExit) as e:
        cg.main()
    assert "at step 60" in str(e.value.code) and "last good classifier" in str(e.value.code)
    d = tmp_path / "classifier_guidance_states" / "nan"
    assert read(d, "status.json")["state"] == "failed"
    ck = torch.load(d / "classifier.pt", weights_only=False)
    assert ck["kind"] == "classifier" and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not list(d.glob("cond_gen_samples_*.pt"))

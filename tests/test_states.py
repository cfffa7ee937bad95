"""STATES pair: the DDPM math against closed forms, the dataset, the KDE score, guidance, the cores copied alone, the
scripts end to end, faults (bad input, NaN, Ctrl-C / SIGTERM and exact resume)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import classifier_guidance_states
import harness
import ddpm_states
from conftest import interrupt, run_in_process, run_script


# ----------------------------------------------------------------------------- DDPM math
def test_alpha_bar_closed_form():
    T, b0, b1 = 500, 1e-4, 0.02
    s = ddpm_states.Schedule(ddpm_states.linear_beta(T, b0, b1))
    beta = b0 + (b1 - b0) * np.arange(T) / (T - 1)  # linear, endpoints included
    alpha_bar = np.exp(np.cumsum(np.log1p(-beta)))
    np.testing.assert_allclose(s.alpha_bar.numpy(), alpha_bar, rtol=1e-5)
    assert 0.005 < s.alpha_bar[-1] < 0.008  # about exp(-sum beta) = exp(-5.0): x_T keeps 8% of the signal
    np.testing.assert_allclose(s.beta_tilde[0].item(), 0.0, atol=1e-12)  # q(x_0 | x_1, x_0) is a point mass


def test_q_sample_moments_monte_carlo():
    s = ddpm_states.Schedule(ddpm_states.linear_beta(500))
    x0 = torch.tensor([[1.5, -0.5]]).repeat(200_000, 1)
    for i in (0, 100, 499):
        t = torch.full((len(x0),), i)
        xt = ddpm_states.q_sample(x0, t, torch.randn_like(x0), s)
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
    s = ddpm_states.Schedule(ddpm_states.linear_beta(500))
    eps = (xt - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    got = ddpm_states.reverse_mean(xt, i, eps, s)
    torch.testing.assert_close(got, mean.float(), atol=2e-5, rtol=1e-4)
    assert s.beta_tilde[i].item() == pytest.approx(var, rel=1e-4)


def test_sampler_with_exact_denoiser_of_a_gaussian_returns_that_gaussian():
    """For data N(m, c^2 I) the optimal eps is known in closed form; ancestral sampling must return N(m, c^2 I)."""
    m, c = torch.tensor([1.0, -2.0]), 0.5
    s = ddpm_states.Schedule(ddpm_states.linear_beta(500))

    def eps_star(x, tb):  # E[eps | x_t] for Gaussian data
        i = torch.round(tb * 250 + 250).long()
        ab = s.alpha_bar[i][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * c ** 2 + 1 - ab)

    for sigma in ("beta", "beta_tilde"):
        x, _ = ddpm_states.sample(eps_star, s, 20_000, torch.Generator().manual_seed(0), sigma)
        torch.testing.assert_close(x.mean(0), m, atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), c), atol=0.03, rtol=0)


def test_guided_step_raises_log_p_y():
    """A classifier with logits linear in x: the guided step must end with a higher log p(y | x) than the
    unguided one from the same x_t, and s = 0 must be plain DDIM."""
    torch.manual_seed(0)
    s = ddpm_states.Schedule(ddpm_states.linear_beta(500))
    w = torch.randn(5, 2)
    clf = lambda x, tb: x @ w.T  # noqa: E731
    model = lambda x, tb: 0.1 * x  # noqa: E731
    x, y = torch.randn(256, 2), torch.randint(0, 5, (256,))
    log_p = lambda z: torch.log_softmax(clf(z, None), 1)[torch.arange(len(z)), y]  # noqa: E731
    for i in (10, 250, 499):
        plain = classifier_guidance_states.guided_step(model, clf, s, x, i, y, 0.0)
        guided = classifier_guidance_states.guided_step(model, clf, s, x, i, y, 0.5)
        assert (log_p(guided) > log_p(plain)).float().mean() > 0.99
        ab, abp = s.alpha_bar[i], s.alpha_bar_prev[i]
        x0 = (x - (1 - ab).sqrt() * model(x, None)) / ab.sqrt()
        torch.testing.assert_close(plain, abp.sqrt() * x0 + (1 - abp).sqrt() * model(x, None))


# ----------------------------------------------------------------------------- data and score
def test_states_balanced_standardized_deterministic():
    x, y = ddpm_states.make_states(1000, seed=3)
    assert x.shape == (5000, 2) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [1000] * 5
    assert x.mean(0).abs().max() < 0.03 and (x.std(0) - 1).abs().max() < 0.03
    x2, _ = ddpm_states.make_states(1000, seed=3)
    xv, _ = ddpm_states.make_states(1000, seed=3, split="val")
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
    assert ddpm_states.nll_score(torch.tensor(pts), torch.tensor(ref)) == pytest.approx(expected, abs=1e-6)


def test_data_flag_round_trip(tmp_path):
    x, y = ddpm_states.make_states(50, seed=0)
    path = tmp_path / "course.pt"
    torch.save({"data": x, "labels": y}, path)
    x2, y2 = ddpm_states.load_points(str(path))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_reverse_nll_floor_covers_every_state():
    """The reverse floor's KDE must be built from points of every state, not the first len(samples) points (the
    training set is sorted by state): with as many samples as one state holds, the floor stays near the NLL floor."""
    x, _ = ddpm_states.make_states(400, seed=1)
    xv, _ = ddpm_states.make_states(400, seed=1, split="val")
    m = ddpm_states.score_samples(x[torch.randperm(len(x))[:400]], x, xv)
    assert abs(m["reverse_nll_floor"] - m["nll_floor"]) < 0.5, m  # the first 400 points alone: far above (~300)


def test_kde_refuses_non_finite_or_degenerate_points():
    ref = torch.randn(50, 2)
    with pytest.raises(harness.RunError, match="not finite"):
        ddpm_states.nll_score(torch.tensor([[0.0, float("nan")]]), ref)
    with pytest.raises(harness.RunError, match="singular"):
        ddpm_states.nll_score(ref, torch.zeros(50, 2))


# ----------------------------------------------------------------------------- the cores, copied alone


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
    for k in ("nll", "nll_floor", "reverse_nll", "reverse_nll_floor", "nn_dist", "nn_dist_floor", "wall_time_s",
              "final_train_loss", "final_val_loss", "train_steps_per_s", "sample_time_s"):
        assert math.isfinite(m[k]), k
    assert m["nll"] < 4.0 and m["train_steps"] == 200  # even 200 steps put samples near the outlines (noise: ~5)
    assert read(ddpm_run, "status.json")["state"] == "completed"
    ck = torch.load(os.path.join(ddpm_run, "denoiser.pt"), weights_only=False)
    assert ck["script"] == "ddpm_states" and ck["loop"]["step"] == 200 and len(ck["loop"]["losses"]) == 200
    for f in ("samples.png", "loss.png", "forward_process.png", "reverse_process.png", "config.json"):
        assert os.path.getsize(os.path.join(ddpm_run, f)) > 0, f


def test_classifier_guidance_quick_outputs(ddpm_run, tmp_path):
    r = run_script("classifier_guidance_states.py", "--quick", "--checkpoint", os.path.join(ddpm_run, "denoiser.pt"),
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
    assert set(m["per_state"]) == set(ddpm_states.STATE_NAMES) and m["worst_state"] in m["per_state"]
    for v in m["per_state"].values():
        assert {"nll", "nll_floor", "reverse_nll", "reverse_nll_floor", "nn_dist", "on_state"} <= set(v)
        assert 0 <= v["on_state"] <= 1
    assert m["min_on_state"] > 0.5  # guidance works even with the quick budgets
    for f in ("classifier.pt", "guided_samples.png", "prediction_maps.png", "classifier_loss.png"):
        assert os.path.getsize(os.path.join(d, f)) > 0, f


def test_course_format_file_end_to_end(tmp_path):
    """A point set in the course's file format (another draw of the outlines, more jitter) through both scripts at
    their defaults (quick budgets): a share on target and a finite NLL and floor for each of the file's five states,
    and even the worst state mostly on target."""
    x, y = ddpm_states.make_states(200, seed=7, jitter=0.03)
    path = tmp_path / "course.pt"
    torch.save({"data": x, "labels": y}, path)
    out = str(tmp_path / "out")
    r = run_script("ddpm_states.py", "--quick", "--data", str(path), "--out", out, "--run-id", "c")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("classifier_guidance_states.py", "--quick", "--data", str(path), "--out", out, "--run-id", "c",
                   "--checkpoint", os.path.join(out, "ddpm_states", "c", "denoiser.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = read(os.path.join(out, "classifier_guidance_states", "c"), "metrics.json")
    assert len(m["per_state"]) == 5 and m["w"] == 1.1  # the default scale
    for v in m["per_state"].values():
        assert 0 <= v["on_state"] <= 1 and math.isfinite(v["nll"]) and math.isfinite(v["nll_floor"])
    assert m["min_on_state"] > 0.5


# ----------------------------------------------------------------------------- bad input
MODULES = {"ddpm_states.py": ddpm_states, "classifier_guidance_states.py": classifier_guidance_states}


@pytest.mark.parametrize("script,args,needle", [
    ("ddpm_states.py", ["--device", "tpu"], "--device"),
    ("ddpm_states.py", ["--n-per-state", "-5"], "--n-per-state"),
    ("ddpm_states.py", ["--train-steps", "0"], "--train-steps"),
    ("ddpm_states.py", ["--train-steps", "1000000000000"], "10000000]"),  # a limit, not a 4 TB buffer
    ("ddpm_states.py", ["--batch-size", "100000000"], "1000000]"),
    ("ddpm_states.py", ["--lr", "nan"], "--lr"),
    ("ddpm_states.py", ["--data", "nope.pt"], "no such file"),
    ("ddpm_states.py", ["--resume", "nope.pt"], "checkpoint not found"),
    ("classifier_guidance_states.py", ["--checkpoint", "missing.pt"], "checkpoint not found"),
    ("classifier_guidance_states.py", ["--n-samples", "-1"], "--n-samples"),
    ("classifier_guidance_states.py", ["--w", "inf"], "--w"),
])
def test_bad_input_one_line_exit_2(tmp_path, script, args, needle):
    r = run_in_process(MODULES[script], *args, "--quick", "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("case", ["one_point", "label_gap", "dict_of_lists", "garbage", "nan"])
def test_malformed_point_files_are_named_in_one_line(tmp_path, case):
    path = tmp_path / "course.pt"
    x, y = ddpm_states.make_states(20, seed=0)
    obj = {"one_point": {"data": x[:1], "labels": y[:1]}, "label_gap": {"data": x, "labels": torch.where(y > 0, 3, 0)},
           "dict_of_lists": {"data": x.tolist(), "labels": y.tolist()}, "nan": {"data": x * float("nan"), "labels": y},
           "garbage": None}[case]
    path.write_bytes(b"not a torch file") if obj is None else torch.save(obj, path)
    want = {"one_point": "1 points", "label_gap": "every class present", "dict_of_lists": "expected",
            "garbage": "cannot read", "nan": "NaN"}[case]
    for script in ("ddpm_states.py", "classifier_guidance_states.py"):
        r = run_in_process(MODULES[script], "--quick", "--data", str(path), "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and want in r.stderr and str(path) in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_foreign_and_corrupt_checkpoints(tmp_path):
    foreign, corrupt = tmp_path / "foreign.pt", tmp_path / "corrupt.pt"
    torch.save({"script": "edm_mnist", "kind": "model", "model": {}}, foreign)
    corrupt.write_bytes(open(os.path.join(os.path.dirname(__file__), "..", "assets", "states_outlines.json"),
                             "rb").read()[:200])
    out = tmp_path / "out"
    for script, flag, path, needle in [("classifier_guidance_states.py", "--checkpoint", foreign, "edm_mnist"),
                                       ("classifier_guidance_states.py", "--checkpoint", corrupt, "cannot read"),
                                       ("ddpm_states.py", "--resume", corrupt, "cannot read")]:
        r = run_in_process(MODULES[script], flag, str(path), "--quick", "--out", str(out))
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_unusable_out_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_in_process(ddpm_states, "--quick", "--out", str(tmp_path / "afile" / "sub"))
    assert r.returncode == 2 and "--out" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------- NaN, Ctrl-C, SIGTERM, resume
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_weights(tmp_path, monkeypatch):
    """The noise predictor's output turns NaN from the 61st training step on: the run must stop naming step 61,
    mark itself failed, keep the weights of the evaluation at step 50, and write no samples; the message is the
    last line on stderr."""
    calls = {"n": 0}
    forward = ddpm_states.EpsMLP.forward

    def poisoned(self, x, tb):
        out = forward(self, x, tb)
        if torch.is_grad_enabled():  # a training step, not a validation pass
            calls["n"] += 1
            if calls["n"] > 60:
                out = out * float("nan")
        return out

    monkeypatch.setattr(ddpm_states.EpsMLP, "forward", poisoned)
    monkeypatch.setattr("sys.argv", ["ddpm_states.py", "--quick", "--out", str(tmp_path), "--run-id", "nan"])
    with pytest.raises(SystemExit) as e:
        harness.main(ddpm_states.main)
    assert e.value.code == 1
    d = tmp_path / "ddpm_states" / "nan"
    status = read(d, "status.json")
    assert status["state"] == "failed" and "loss is nan at step 61" in status["message"]
    assert "last good checkpoint is kept" in status["message"]
    ck = torch.load(d / "denoiser.pt", weights_only=False)
    assert ck["loop"]["step"] == 50 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (d / "uncond_gen_samples.pt").exists()


def test_classifier_nan_stops_with_the_step_and_keeps_the_last_good_classifier(ddpm_run, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = classifier_guidance_states.Classifier.forward

    def poisoned(self, *a):
        out = forward(self, *a)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 60:
                out = out * float("nan")
        return out

    monkeypatch.setattr(classifier_guidance_states.Classifier, "forward", poisoned)
    monkeypatch.setattr("sys.argv", ["classifier_guidance_states.py", "--quick", "--checkpoint",
                                     os.path.join(ddpm_run, "denoiser.pt"), "--out", str(tmp_path), "--run-id", "nan"])
    with pytest.raises(SystemExit):
        harness.main(classifier_guidance_states.main)
    d = tmp_path / "classifier_guidance_states" / "nan"
    status = read(d, "status.json")
    assert status["state"] == "failed" and "at step 61" in status["message"]
    ck = torch.load(d / "classifier.pt", weights_only=False)
    assert ck["kind"] == "classifier" and ck["loop"]["step"] == 50
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not list(d.glob("cond_gen_samples_*.pt"))


STATES_SHORT = ["--quick", "--train-steps", "400", "--batch-size", "500", "--eval-every", "20", "--n-samples", "50",
                "--sweep-w", ""]


@pytest.mark.parametrize("script,ckpt,sig,code", [("ddpm_states.py", "denoiser.pt", "SIGINT", 130),
                                                  ("classifier_guidance_states.py", "classifier.pt", "SIGTERM", 143)])
def test_signal_leaves_an_interrupted_run_that_resumes_exactly(ddpm_run, tmp_path, script, ckpt, sig, code):
    """Stopped by a signal mid-training (a real process), then resumed: the same final weights and per-step losses
    as an unbroken run (both of these in this process)."""
    extra = ["--checkpoint", os.path.join(ddpm_run, "denoiser.pt")] if "classifier" in script else []
    name, out, module = script[:-3], str(tmp_path), MODULES[script]
    flags = [*STATES_SHORT, *extra] if "classifier" in script else STATES_SHORT[:-2]
    cut_dir = os.path.join(out, name, "cut")
    r = interrupt([script, *flags, "--out", out, "--run-id", "cut"], os.path.join(cut_dir, ckpt), sig)
    assert r.returncode == code, r.stderr[-2000:]
    status = read(cut_dir, "status.json")
    assert status["state"] == "interrupted" and f"interrupted by {sig}" in status["message"]
    assert r.stderr.strip().splitlines()[-1].startswith(f"{script}: interrupted by {sig} at step")
    cut = torch.load(os.path.join(cut_dir, ckpt), weights_only=False)
    assert 0 < cut["loop"]["step"] < 400, cut["loop"]["step"]
    r = run_in_process(module, "--resume", os.path.join(cut_dir, ckpt), "--out", out, "--run-id", "resumed")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_in_process(module, *flags, "--out", out, "--run-id", "whole")
    assert r.returncode == 0, r.stderr[-2000:]
    whole, resumed = (torch.load(os.path.join(out, name, d, ckpt), weights_only=False) for d in ("whole", "resumed"))
    assert resumed["loop"]["step"] == whole["loop"]["step"] == 400
    assert resumed["loop"]["losses"] == whole["loop"]["losses"]  # every step's loss, bit for bit
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert read(os.path.join(out, name, "resumed"), "status.json")["state"] == "completed"


def test_resume_refuses_a_changed_setting(ddpm_run, tmp_path):
    r = run_in_process(ddpm_states, "--resume", os.path.join(ddpm_run, "denoiser.pt"), "--lr", "0.5",
                       "--out", str(tmp_path))
    assert r.returncode == 2 and "--lr 0.5" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

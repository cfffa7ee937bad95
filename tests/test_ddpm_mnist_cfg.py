"""ddpm_mnist_cfg.py: schedules, embedding and sampler math against closed forms, sampler stability, the core copied
alone, a smoke run, sampling a checkpoint, faults (bad flags, NaN, SIGTERM) and exact resume."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import harness
import ddpm_mnist_cfg
from conftest import ROOT, run_in_process, run_script

S = 0.008


@pytest.fixture(autouse=True)
def no_leftover_harness_state():
    """Run.active / TrainLoop.active are process-wide; harness.main installs signal handlers: restore all three."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    harness.Run.active = harness.TrainLoop.active = None
    for s, h in handlers.items():
        signal.signal(s, h)


def cosine_alpha_bar_closed(T):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), for t = 1..T."""
    f = lambda t: math.cos(((t / T) + S) / (1 + S) * math.pi / 2) ** 2  # noqa: E731
    return np.array([f(t) / f(0) for t in range(1, T + 1)])


def perturbed_unet(seed=0, channels=(8, 16, 32)):
    """A random tiny U-Net whose conditioning is switched on (the zero-initialised injections get random
    weights), so conditional and unconditional predictions differ."""
    torch.manual_seed(seed)
    m = ddpm_mnist_cfg.UNet(channels)
    for mod in m.modules():
        if isinstance(mod, ddpm_mnist_cfg.ScaleShift):
            torch.nn.init.normal_(mod.proj[1].weight, std=0.3)
    return m.eval()


class BiasedEps(torch.nn.Module):
    """A poor noise predictor: eps_cond = 0.5 x + 1, eps_uncond = 0.5 x - 1 (guidance amplifies the bias)."""
    null_class = 10

    def forward(self, x, i, y):
        sign = torch.where(y == self.null_class, -1.0, 1.0).view(-1, 1, 1, 1)
        return 0.5 * x + sign


class OracleEps(torch.nn.Module):
    """The eps that makes x0_hat = c exactly: eps = (x_t - sqrt(alpha_bar_t) c) / sqrt(1 - alpha_bar_t), with
    alpha_bar from a float64 closed form (so every class and the null class agree, whatever w)."""
    null_class = 10

    def __init__(self, alpha_bar, c):
        super().__init__()
        self.ab, self.c = torch.tensor(alpha_bar), c

    def forward(self, x, i, y):
        ab = self.ab[i].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * self.c) / (1 - ab).sqrt()).float()


# ----------------------------------------------------------------------------- schedule and embedding math
def test_cosine_alpha_bar_matches_closed_form_and_beta_is_capped():
    T = 50
    betas = ddpm_mnist_cfg.cosine_beta(T).numpy()
    alpha_bar = np.cumprod(1 - betas)
    closed = cosine_alpha_bar_closed(T)
    assert np.allclose(alpha_bar[:-1], closed[:-1], rtol=1e-10, atol=0)  # the cap only bites at t = T
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    assert 1 - closed[-1] / closed[-2] > 0.999  # ... where the uncapped beta would exceed it
    assert alpha_bar[-1] == pytest.approx(closed[-2] * 0.001)
    sched = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.cosine_beta(T))  # the float32 copy the model uses
    assert np.allclose(sched.alpha_bar[:-1].numpy(), closed[:-1], rtol=1e-5) and sched.T == T


def test_linear_schedule_endpoints():
    betas = ddpm_mnist_cfg.linear_beta(1000).numpy()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    b100 = ddpm_mnist_cfg.linear_beta(100).numpy()  # scaled by 1000/T
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)
    assert ddpm_mnist_cfg.linear_beta(10).numpy()[-1] == pytest.approx(0.999)  # 2.0 capped


def test_posterior_coefficients_closed_form():
    T = 40
    s = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.linear_beta(T))
    b = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    ab = np.cumprod(1 - b)
    abp = np.concatenate([[1.0], ab[:-1]])
    assert np.allclose(s.alpha_bar_prev.numpy(), abp, rtol=1e-6) and s.alpha_bar_prev[0] == 1
    assert np.allclose(s.beta_tilde.numpy(), (1 - abp) / (1 - ab) * b, rtol=1e-5)
    assert np.allclose(s.coef_x0.numpy(), np.sqrt(abp) * b / (1 - ab), rtol=1e-6)
    assert np.allclose(s.coef_xt.numpy(), np.sqrt(1 - b) * (1 - abp) / (1 - ab), rtol=1e-6)
    # with x0_hat unclipped, the posterior mean equals the raw form (x_t - beta/sqrt(1-ab) eps) / sqrt(alpha)
    x, eps = torch.randn(5), torch.randn(5)
    for i in (0, 7, T - 1):
        x0_hat = (x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])
        mean = s.coef_x0[i] * x0_hat + s.coef_xt[i] * x
        raw = (x - b[i] / math.sqrt(1 - ab[i]) * eps) / math.sqrt(1 - b[i])
        assert torch.allclose(mean, raw.float(), atol=1e-4)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_every_sampler_step_is_the_posterior_mean_plus_sigma_z(clip, variance):
    """With an eps that makes x0_hat = c, each step must be x_{t-1} = mu_tilde(x_t, c) + sigma_t z, computed here in
    float64 from the betas, with the sampler's own z (drawn from gen after x_T, one per step but the last)."""
    T, c = 40, 0.3
    b = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    ab = np.cumprod(1 - b)
    abp = np.concatenate([[1.0], ab[:-1]])
    y = torch.arange(3)
    _, traj = ddpm_mnist_cfg.sample(OracleEps(ab, c), ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.linear_beta(T)), y, 3.0,
                                    clip, variance, record_every=1, gen=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x = torch.randn((3, 1, 28, 28), generator=g).double()
    assert torch.equal(traj[0], x.float()) and len(traj) == T + 1
    for k, i in enumerate(reversed(range(T))):
        mu = math.sqrt(abp[i]) * b[i] / (1 - ab[i]) * c + math.sqrt(1 - b[i]) * (1 - abp[i]) / (1 - ab[i]) * x
        var = (1 - abp[i]) / (1 - ab[i]) * b[i] if variance == "beta_tilde" else b[i]
        x = mu + math.sqrt(var) * torch.randn((3, 1, 28, 28), generator=g).double() if i > 0 else mu
        assert torch.allclose(traj[k + 1].double(), x, atol=1e-4), (i, (traj[k + 1].double() - x).abs().max())
    assert torch.allclose(traj[-1], torch.full_like(traj[-1], c), atol=1e-4)  # t = 1: the mean, x0_hat = c


def test_q_sample_monte_carlo():
    T, i = 100, 30
    sched = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.linear_beta(T))
    ab = np.prod(1 - np.linspace(1e-3, 0.2, T)[: i + 1])  # alpha_bar at step t = i + 1, closed form
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    xt = ddpm_mnist_cfg.q_sample(x0, torch.full((len(x0),), i),
                                 torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), sched)
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


def test_timestep_embedding_is_sin_then_cos():
    e = ddpm_mnist_cfg.timestep_embedding(torch.tensor([0, 1, 7]), 8)  # w_k = 10000^(-k/4), k = 0..3
    w = [10000 ** (-k / 4) for k in range(4)]
    for row, t in zip(e, (0, 1, 7)):
        assert np.allclose(row.numpy(), [math.sin(t * v) for v in w] + [math.cos(t * v) for v in w], atol=1e-6)


# ----------------------------------------------------------------------------- loss, guidance, EMA
def test_label_dropout_sends_the_null_class_where_u_is_below_p():
    seen = {}

    class Recorder(torch.nn.Module):
        null_class = 10

        def forward(self, x, i, y):
            seen["y"] = y.clone()
            return torch.zeros_like(x)

    sched = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.cosine_beta(10))
    x0, eps = torch.zeros(4, 1, 28, 28), torch.ones(4, 1, 28, 28)
    loss = ddpm_mnist_cfg.ddpm_loss(Recorder(), x0, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3, 5, 9]), eps, sched,
                                    torch.tensor([0.05, 0.5, 0.099, 0.1]), 0.1)
    assert seen["y"].tolist() == [10, 2, 10, 4] and loss.item() == pytest.approx(1.0)  # ||1 - 0||^2 per pixel


def test_guidance_w0_is_unconditional_and_w1_conditional():
    m = perturbed_unet()
    x, i, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 5, 10, 19]), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        cond, uncond = m(x, i, y), m(x, i, torch.full_like(y, 10))
    assert (cond - uncond).abs().max() > 1e-3  # the test means something
    assert torch.allclose(ddpm_mnist_cfg.guided_eps(m, x, i, y, 0.0), uncond, atol=1e-5)
    assert torch.allclose(ddpm_mnist_cfg.guided_eps(m, x, i, y, 1.0), cond, atol=1e-5)
    assert torch.allclose(ddpm_mnist_cfg.guided_eps(m, x, i, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


def test_ema_update_with_warmup():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in a.parameters()]
    d = ddpm_mnist_cfg.ema_update(a, b, 0, 0.999)
    assert d == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    for pe, p0, p in zip(a.parameters(), e0, b.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p)
    assert ddpm_mnist_cfg.ema_update(a, b, 10**6, 0.999) == pytest.approx(0.999)  # after warm-up: the decay


# ----------------------------------------------------------------------------- sampler stability
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("model_name", ["unet", "biased"])
def test_sampler_stays_bounded_up_to_w9(schedule, model_name):
    model = perturbed_unet() if model_name == "unet" else BiasedEps()
    sched = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.BETAS[schedule](25))
    y = torch.arange(4) * 3
    for w in (0.0, 1.0, 3.0, 9.0):
        x0, traj = ddpm_mnist_cfg.sample(model, sched, y, w, record_every=1, gen=torch.Generator().manual_seed(0))
        xs = torch.stack(traj)
        assert len(traj) == 26  # x_T and every x_t down to x_0
        assert torch.isfinite(xs).all()
        assert xs.abs().max() < 6, (w, xs.abs().max())
        assert x0.abs().max() <= 1 + 1e-5  # the last step returns x0_hat, clipped


def test_no_clip_is_the_form_that_drifts():
    sched = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.cosine_beta(40))
    y = torch.arange(8) % 10
    _, clipped = ddpm_mnist_cfg.sample(BiasedEps(), sched, y, 9.0, clip=True, record_every=1,
                                       gen=torch.Generator().manual_seed(0))
    _, raw = ddpm_mnist_cfg.sample(BiasedEps(), sched, y, 9.0, clip=False, record_every=1,
                                   gen=torch.Generator().manual_seed(0))
    assert torch.stack(clipped).abs().max() < 6
    assert torch.stack(raw).abs().max() > 50  # 1 / sqrt(alpha_T) = 31.6 amplifies the biased eps at once


# ----------------------------------------------------------------------------- the core, copied alone


# ----------------------------------------------------------------------------- smoke run, sampling a checkpoint
QUICK = ["--quick", "--train-steps", "30", "--eval-every", "15", "--n-samples", "30", "--sweep-n", "10", "--sweep-w",
         "0,3", "--judge-epochs", "5", "--T", "15"]


@pytest.fixture(scope="module")
def quick_run(tiny_mnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    r = run_script("ddpm_mnist_cfg.py", *QUICK, "--data-root", tiny_mnist, "--out", out, "--run-id", "smoke")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, os.path.join(out, "ddpm_mnist_cfg", "smoke")


def test_quick_run_writes_samples_checkpoint_metrics_and_figures(quick_run):
    _, d = quick_run
    x, y = torch.load(os.path.join(d, "samples.pt")), torch.load(os.path.join(d, "labels.pt"))
    assert x.shape == (30, 1, 28, 28) and y.shape == (30,)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std(0).mean() > 1e-3  # samples are not all equal
    assert torch.equal(y, torch.arange(30) % 10)
    m = json.load(open(os.path.join(d, "metrics.json")))
    for k in ("fid", "fid_floor", "class_accuracy", "mean_top_prob", "class_entropy", "n"):
        assert k in m["eval"]
    assert m["eval"]["n"] == 30 and [r["w"] for r in m["guidance_sweep"]] == [0.0, 3.0]
    assert m["train_steps"] == 30 and m["stop_reason"] == "steps" and math.isfinite(m["val_loss"])
    assert m["train_images_per_s"] > 0 and m["sample_image_steps_per_s"] > 0 and m["best_val_loss"] <= m["val_loss"]
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert ck["script"] == "ddpm_mnist_cfg" and ck["kind"] == "model" and ck["config"]["T"] == 15
    assert {"model", "ema", "optimizer", "plateau"} <= set(ck) and ck["loop"]["step"] == 30
    assert len(ck["loop"]["losses"]) == 30 and ck["loop"]["history"]["step"] == [15, 30]
    for fig in ("forward_noising", "schedules", "samples_grid", "denoising", "guidance_sweep", "guidance_metrics",
                "loss"):
        assert os.path.getsize(os.path.join(d, fig + ".png")) > 1000


def test_generate_from_checkpoint(quick_run):
    out, d = quick_run
    r = run_in_process(ddpm_mnist_cfg, "--generate", "7", "--n-samples", "6", "--checkpoint",
                       os.path.join(d, "checkpoint.pt"), "--out", out, "--run-id", "gen")
    assert r.returncode == 0, r.stderr[-2000:]
    g = os.path.join(out, "ddpm_mnist_cfg", "gen")
    x, y = torch.load(os.path.join(g, "samples.pt")), torch.load(os.path.join(g, "labels.pt"))
    assert x.shape == (6, 1, 28, 28) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert (y == 7).all() and x.std(0).mean() > 1e-3
    assert os.path.getsize(os.path.join(g, "generate.png")) > 1000
    assert json.load(open(os.path.join(g, "metrics.json")))["digit"] == 7
    assert ddpm_mnist_cfg.parse_args(["--generate", "7", "--checkpoint", "c.pt"]).n_samples == 64  # --generate's N


def older_checkpoint(quick_run, tmp_path):
    """The quick run's weights in the format written before the redesign: a config of five keys, no loop state."""
    ck, path = torch.load(os.path.join(quick_run[1], "checkpoint.pt"), weights_only=False), str(tmp_path / "old.pt")
    config = {"dataset": "mnist", "channels": [8, 16, 32], "T": 15, "schedule": "cosine", "p_uncond": 0.1}
    torch.save({"script": "ddpm_mnist_cfg", "kind": "model", "config": config, "model": ck["model"], "ema": ck["ema"],
                "step": 30}, path)
    return path


def test_checkpoint_alone_samples_and_scores_without_training(quick_run, tiny_mnist, tmp_path):
    """--checkpoint alone: no training, the checkpoint's architecture and T, samples, sweep and scores; here with a
    checkpoint of the older format, which must still be sampled."""
    out = quick_run[0]  # where the quick run's judge is cached
    r = run_in_process(ddpm_mnist_cfg, "--checkpoint", older_checkpoint(quick_run, tmp_path), "--n-samples", "10",
                       "--sweep-w", "1", "--sweep-n", "4", "--judge-epochs", "5", "--data-root", tiny_mnist,
                       "--out", out, "--run-id", "scored")
    assert r.returncode == 0, r.stderr[-2000:]
    s = os.path.join(out, "ddpm_mnist_cfg", "scored")
    m = json.load(open(os.path.join(s, "metrics.json")))
    assert m["eval"]["n"] == 10 and [r["w"] for r in m["guidance_sweep"]] == [1.0]
    assert "train_steps" not in m and not os.path.exists(os.path.join(s, "loss.png"))
    assert json.load(open(os.path.join(s, "config.json")))["T"] == 15  # the checkpoint's, not the preset's 30
    x = torch.load(os.path.join(s, "samples.pt"))
    assert x.shape == (10, 1, 28, 28) and torch.isfinite(x).all() and x.std(0).mean() > 1e-3


def test_older_checkpoint_format_does_not_resume(quick_run, tiny_mnist, tmp_path):
    r = run_in_process(ddpm_mnist_cfg, "--resume", older_checkpoint(quick_run, tmp_path), "--quick", "--data-root",
                       tiny_mnist, "--out", str(tmp_path))
    assert r.returncode == 2 and "older format" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------- faults
def other_checkpoint(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"script": "ddpm_states", "kind": "model", "config": {}}, path)
    return path


@pytest.mark.parametrize("case", ["missing_data", "other_checkpoint", "resume_other", "unknown_dataset", "bad_digit",
                                  "sweep_w_nan", "sweep_w_negative", "p_uncond", "generate_alone", "two_channels",
                                  "huge_batch"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, quick_run):
    out = str(tmp_path / "out")
    args = {"missing_data": ["--quick", "--data-root", str(tmp_path / "nowhere")],
            "other_checkpoint": ["--generate", "3", "--checkpoint", other_checkpoint(tmp_path)],
            "resume_other": ["--quick", "--resume", other_checkpoint(tmp_path)],
            "unknown_dataset": ["--quick", "--dataset", "imagenet"],
            "bad_digit": ["--generate", "12", "--checkpoint", os.path.join(quick_run[1], "checkpoint.pt")],
            "sweep_w_nan": ["--quick", "--sweep-w", "0,nan"], "sweep_w_negative": ["--quick", "--sweep-w=-1"],
            "p_uncond": ["--quick", "--p-uncond", "1.5"], "generate_alone": ["--generate", "3"],
            "two_channels": ["--quick", "--channels", "8,16"],
            "huge_batch": ["--quick", "--batch-size", "100000000"]}[case]
    r = run_in_process(ddpm_mnist_cfg, *args, "--out", out)
    assert r.returncode == 2, r.stderr[-1000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(out, "ddpm_mnist_cfg"))  # nothing half-written


def test_bad_flag_from_the_command_line(tmp_path):
    r = run_script("ddpm_mnist_cfg.py", "--quick", "--sweep-w", "0,inf", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "--sweep-w" in r.stderr
    assert not os.listdir(tmp_path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    """The U-Net's output turns NaN from the 6th training step on: the run stops naming step 6, is marked failed,
    keeps the checkpoint of step 4 and writes no samples; the message is the last line on stderr."""
    calls, forward = {"n": 0}, ddpm_mnist_cfg.UNet.forward

    def poisoned(self, x, i, y):
        out = forward(self, x, i, y)
        if next(self.parameters()).requires_grad:  # the trained model, not the EMA's validation
            calls["n"] += 1
            out = out * float("nan") if calls["n"] >= 6 else out
        return out

    monkeypatch.setattr(ddpm_mnist_cfg.UNet, "forward", poisoned)
    r = run_in_process(ddpm_mnist_cfg, "--quick", "--train-steps", "20", "--eval-every", "2", "--no-eval",
                       "--data-root", tiny_mnist, "--out", str(tmp_path), "--run-id", "nan")
    d = tmp_path / "ddpm_mnist_cfg" / "nan"
    assert r.returncode == 1
    status = json.load(open(d / "status.json"))
    assert status["state"] == "failed" and "loss is nan at step 6" in status["message"]
    assert "last good checkpoint is kept" in r.stderr.strip().splitlines()[-1]
    ck = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ck["loop"]["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (d / "samples.pt").exists()


# ----------------------------------------------------------------------------- SIGTERM, time budget, exact resume
RESUME = ["--quick", "--T", "3", "--batch-size", "8", "--eval-every", "4", "--val-n", "32", "--patience", "0",
          "--n-samples", "2", "--sweep-w", "0", "--sweep-n", "2", "--no-eval"]


def sigterm_when_training(args, status_path, timeout=300):
    """Start ddpm_mnist_cfg.py, wait until status.json shows a training step, send SIGTERM; (returncode, stderr)."""
    p = subprocess.Popen([sys.executable, "ddpm_mnist_cfg.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0, status = time.time(), {}
    while p.poll() is None and time.time() - t0 < timeout and not (status.get("phase") == "train" and status["step"]):
        time.sleep(0.1)
        status = json.load(open(status_path)) if os.path.exists(status_path) else {}
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    return p.wait(timeout), p.stderr.read()


def test_sigterm_and_time_budget_stops_resume_exactly(tiny_mnist, tmp_path):
    """A run stopped by SIGTERM (exit 143, "interrupted") and one stopped by its time budget, each resumed to K steps,
    end with the weights and per-step losses of an unbroken K-step run. The SIGTERM run is set to 10,000 steps, and
    K is picked after it stopped (train_steps may change on resume), so the test holds however fast the machine is."""
    out, base = str(tmp_path), [*RESUME, "--data-root", tiny_mnist, "--out", str(tmp_path)]
    cut = os.path.join(out, "ddpm_mnist_cfg", "cut")
    code, err = sigterm_when_training([*base, "--train-steps", "10000", "--run-id", "cut"],
                                      os.path.join(cut, "status.json"))
    assert code == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("ddpm_mnist_cfg.py: interrupted by SIGTERM at step")
    status = json.load(open(os.path.join(cut, "status.json")))
    assert status["state"] == "interrupted" and "interrupted by SIGTERM" in status["message"]
    s = torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=False)["loop"]["step"]
    K = s + 6  # a window the signal cut, then more
    runs = {"whole": [*base, "--train-steps", str(K)],
            "budget": [*base, "--train-steps", str(K), "--max-minutes", "1e-5"],
            "cut-resumed": ["--resume", os.path.join(cut, "checkpoint.pt"), "--train-steps", str(K), "--out", out],
            "budget-resumed": ["--resume", os.path.join(out, "ddpm_mnist_cfg", "budget", "checkpoint.pt"),
                               "--max-minutes", "0", "--out", out]}
    for run_id, args in runs.items():
        r = run_in_process(ddpm_mnist_cfg, *args, "--run-id", run_id)
        assert r.returncode == 0, (run_id, r.stderr[-2000:])
    ck = {k: torch.load(os.path.join(out, "ddpm_mnist_cfg", k, "checkpoint.pt"), weights_only=False) for k in runs}
    budget = json.load(open(os.path.join(out, "ddpm_mnist_cfg", "budget", "metrics.json")))
    assert budget["stop_reason"] == "time budget" and 0 < ck["budget"]["loop"]["step"] < K
    for k in ("cut-resumed", "budget-resumed"):
        assert ck[k]["loop"]["step"] == K and ck[k]["loop"]["losses"] == pytest.approx(ck["whole"]["loop"]["losses"],
                                                                                        rel=1e-5, abs=1e-7), k
        for part in ("model", "ema"):
            for name, v in ck["whole"][part].items():
                assert torch.allclose(ck[k][part][name], v, rtol=1e-5, atol=1e-6), (k, part, name)

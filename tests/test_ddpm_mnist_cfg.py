"""ddpm_mnist_cfg.py: schedules and sampler math against closed forms, sampler stability, a smoke run, bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import ddpm_mnist_cfg as D
from conftest import run_script

S = 0.008


def cosine_alpha_bar_closed(T):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), for t = 1..T."""
    f = lambda t: math.cos(((t / T) + S) / (1 + S) * math.pi / 2) ** 2  # noqa: E731
    return np.array([f(t) / f(0) for t in range(1, T + 1)])


def perturbed_unet(seed=0, channels=(8, 16, 32)):
    """A random tiny U-Net whose conditioning is switched on (the zero-initialised injections get random
    weights), so conditional and unconditional predictions differ."""
    torch.manual_seed(seed)
    m = D.UNet(channels)
    for mod in m.modules():
        if isinstance(mod, D.ScaleShift):
            torch.nn.init.normal_(mod.proj[1].weight, std=0.3)
    return m.eval()


class BiasedEps(torch.nn.Module):
    """A poor noise predictor: eps_cond = 0.5 x + 1, eps_uncond = 0.5 x - 1 (guidance amplifies the bias)."""
    null_class = 10

    def forward(self, x, t, y):
        sign = torch.where(y == self.null_class, -1.0, 1.0).view(-1, 1, 1, 1)
        return 0.5 * x + sign


# ----------------------------------------------------------------------------- schedule math
def test_cosine_alpha_bar_matches_closed_form_and_beta_is_capped():
    T = 50
    betas = D.make_betas("cosine", T).numpy()
    alpha_bar = np.cumprod(1 - betas)
    closed = cosine_alpha_bar_closed(T)
    assert np.allclose(alpha_bar[:-1], closed[:-1], rtol=1e-10, atol=0)  # the cap only bites at t = T
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    assert 1 - closed[-1] / closed[-2] > 0.999  # ... where the uncapped beta would exceed it
    assert alpha_bar[-1] == pytest.approx(closed[-2] * 0.001)
    sched = D.make_schedule("cosine", T)  # the float32 copy the model uses
    assert np.allclose(sched["alpha_bars"][:-1].numpy(), closed[:-1], rtol=1e-5)


def test_linear_schedule_endpoints():
    betas = D.make_betas("linear", 1000).numpy()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    b100 = D.make_betas("linear", 100).numpy()  # scaled by 1000/T
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_posterior_coefficients_closed_form():
    T = 40
    s = D.make_schedule("linear", T)
    b = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    ab = np.cumprod(1 - b)
    abp = np.concatenate([[1.0], ab[:-1]])
    assert np.allclose(s["beta_tilde"].numpy(), (1 - abp) / (1 - ab) * b, rtol=1e-5)
    # with x0_hat unclipped, the posterior mean equals the raw form (x_t - beta/sqrt(1-ab) eps) / sqrt(alpha)
    x, eps = torch.randn(5), torch.randn(5)
    for i in (0, 7, T - 1):
        x0_hat = (x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])
        mean = s["coef_x0"][i] * x0_hat + s["coef_xt"][i] * x
        raw = (x - b[i] / math.sqrt(1 - ab[i]) * eps) / math.sqrt(1 - b[i])
        assert torch.allclose(mean, raw.float(), atol=1e-4)


def test_q_sample_monte_carlo():
    T, t = 100, 30
    sched = D.make_schedule("linear", T)
    ab = np.prod(1 - np.linspace(1e-3, 0.2, T)[: t + 1])  # alpha_bar at step t+1 (index t), closed form
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    xt = D.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)),
                    sched)
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


# ----------------------------------------------------------------------------- guidance, EMA
def test_guidance_w0_is_unconditional_and_w1_conditional():
    m = perturbed_unet()
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 5, 10, 19]), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 10))
    assert (cond - uncond).abs().max() > 1e-3  # the test means something
    assert torch.allclose(D.guided_eps(m, x, t, y, 0.0), uncond, atol=1e-5)
    assert torch.allclose(D.guided_eps(m, x, t, y, 1.0), cond, atol=1e-5)
    assert torch.allclose(D.guided_eps(m, x, t, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


def test_ema_update_with_warmup():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in a.parameters()]
    d = D.ema_update(a, b, 0, 0.999)
    assert d == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    for pe, p0, p in zip(a.parameters(), e0, b.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p)
    assert D.ema_update(a, b, 10**6, 0.999) == pytest.approx(0.999)  # after warm-up: the decay


# ----------------------------------------------------------------------------- sampler stability
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("model_name", ["unet", "biased"])
def test_sampler_stays_bounded_up_to_w9(schedule, model_name):
    model = perturbed_unet() if model_name == "unet" else BiasedEps()
    sched = D.make_schedule(schedule, 25)
    y = torch.arange(4) * 3
    for w in (0.0, 1.0, 3.0, 9.0):
        x0, traj = D.sample(model, sched, y, w, record_every=1, gen=torch.Generator().manual_seed(0))
        xs = torch.stack(traj)
        assert len(traj) == 26  # x_T and every x_t down to x_0
        assert torch.isfinite(xs).all()
        assert xs.abs().max() < 6, (w, xs.abs().max())
        assert x0.abs().max() <= 1 + 1e-5  # the last step returns x0_hat, clipped


def test_no_clip_is_the_form_that_drifts():
    sched = D.make_schedule("cosine", 40)
    y = torch.arange(8) % 10
    _, clipped = D.sample(BiasedEps(), sched, y, 9.0, clip=True, record_every=1, gen=torch.Generator().manual_seed(0))
    _, raw = D.sample(BiasedEps(), sched, y, 9.0, clip=False, record_every=1, gen=torch.Generator().manual_seed(0))
    assert torch.stack(clipped).abs().max() < 6
    assert torch.stack(raw).abs().max() > 50  # 1 / sqrt(alpha_T) = 31.6 amplifies the biased eps at once


# ----------------------------------------------------------------------------- smoke run and bad input
QUICK = ["--quick", "--steps", "30", "--eval-every", "15", "--n-eval", "30", "--sweep-n", "10", "--sweep-w", "0,3",
         "--judge-epochs", "5", "--T", "15"]


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
    assert m["train_steps"] == 30 and math.isfinite(m["val_loss"]) and m["train_images_per_s"] > 0
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert ck["script"] == "ddpm_mnist_cfg" and ck["step"] == 30 and ck["config"]["T"] == 15
    assert {"model", "ema", "optimizer", "schedule"} <= set(ck) and len(ck["schedule"]["betas"]) == 15
    for fig in ("forward_noising", "schedules", "samples_grid", "denoising", "guidance_sweep", "guidance_metrics", "loss"):
        assert os.path.getsize(os.path.join(d, fig + ".png")) > 1000


def test_generate_from_checkpoint(quick_run):
    out, d = quick_run
    r = run_script("ddpm_mnist_cfg.py", "--generate", "7", "--n", "6", "--checkpoint", os.path.join(d, "checkpoint.pt"),
                   "--out", out, "--run-id", "gen")
    assert r.returncode == 0, r.stderr[-2000:]
    g = os.path.join(out, "ddpm_mnist_cfg", "gen")
    x, y = torch.load(os.path.join(g, "samples.pt")), torch.load(os.path.join(g, "labels.pt"))
    assert x.shape == (6, 1, 28, 28) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert (y == 7).all() and x.std(0).mean() > 1e-3


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_mnist, tmp_path):
    r = run_script("ddpm_mnist_cfg.py", "--quick", "--lr", "1e30", "--steps", "20", "--eval-every", "1", "--no-eval",
                   "--data-root", tiny_mnist, "--out", str(tmp_path), "--run-id", "nan")
    d = tmp_path / "ddpm_mnist_cfg" / "nan"
    assert r.returncode == 1
    status = json.load(open(d / "status.json"))
    assert status["state"] == "failed" and "at step" in status["message"]
    assert torch.load(d / "checkpoint.pt", weights_only=False)["script"] == "ddpm_mnist_cfg"


def other_checkpoint(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"script": "ddpm_states", "kind": "model", "config": {}}, path)
    return path


@pytest.mark.parametrize("case", ["missing_data", "other_checkpoint", "resume_other", "unknown_dataset", "bad_digit"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, quick_run):
    out = str(tmp_path / "out")
    args = {"missing_data": ["--quick", "--data-root", str(tmp_path / "nowhere")],
            "other_checkpoint": ["--generate", "3", "--checkpoint", other_checkpoint(tmp_path)],
            "resume_other": ["--quick", "--resume", other_checkpoint(tmp_path)],
            "unknown_dataset": ["--quick", "--dataset", "imagenet"],
            "bad_digit": ["--generate", "12", "--checkpoint", os.path.join(quick_run[1], "checkpoint.pt")]}[case]
    r = run_script("ddpm_mnist_cfg.py", *args, "--out", out)
    assert r.returncode == 2, r.stderr[-1000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert not os.path.exists(os.path.join(out, "ddpm_mnist_cfg"))  # nothing half-written


def test_resume_continues_the_data_stream(tmp_path):
    """Training 10 steps at once, or 6 steps and a resume to 10, ends with the same weights: the checkpoint carries
    the generator of batches, dropped labels, t and noise, so the resumed run does not replay the first batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (64,), generator=g)
    data = (x[:48], y[:48], x[48:], y[48:])

    def train(steps, run_id, resume=None):
        p = D.build_parser()
        p.set_defaults(**D.PRESETS["quick"])
        args = p.parse_args(["--steps", str(steps), "--eval-every", "3", "--T", "15", "--val-n", "16",
                             "--out", str(tmp_path), "--run-id", run_id])
        args.channels = D.channels_arg(args.channels) if isinstance(args.channels, str) else args.channels
        run = common.Run(D.SCRIPT, args)
        common.seed_everything(0)  # the initial weights, as main() seeds them
        ema, history, _ = D.train(args, run, data, torch.device("cpu"), resume)
        return ema, history, torch.load(run.path("checkpoint.pt"), weights_only=False)

    ema_straight, hist_straight, ck_straight = train(10, "straight")
    _, _, ck_half = train(6, "half")
    assert ck_half["step"] == 6 and "rng" in ck_half
    ema_resumed, hist_resumed, ck_resumed = train(10, "resumed", resume=ck_half)
    assert ck_resumed["step"] == 10 and hist_resumed["step"] == hist_straight["step"] == [3, 6, 9, 10]
    assert hist_resumed["train"] == pytest.approx(hist_straight["train"], rel=1e-6)
    for k, v in ema_straight.state_dict().items():
        assert torch.allclose(ema_resumed.state_dict()[k], v, atol=1e-6), k
    for k, v in ck_straight["model"].items():
        assert torch.allclose(ck_resumed["model"][k], v, atol=1e-6), k

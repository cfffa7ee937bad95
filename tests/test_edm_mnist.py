"""edm_mnist.py: preconditioning, loss and schedule against closed forms, Heun on Gaussian data, the core alone, a smoke
run, exact resume after Ctrl-C and after the time budget, NaN and bad input."""
import json
import math
import os

import pytest
import torch

import common
import edm_mnist
from conftest import interrupt, run_in_process, run_script

SD = 0.5  # sigma_data


# ----------------------------------------------------------------------------- preconditioning, loss, embedding
def test_preconditioning_limits_and_denoiser_tends_to_identity():
    sigma = torch.tensor([1e-6, 1e-4, 1e-3], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_mnist.precond(sigma, SD)
    assert torch.allclose(c_skip, torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert (c_out <= 1.01 * sigma).all() and c_out[0] < 1e-5
    assert torch.allclose(c_noise, sigma.log() / 4)
    torch.manual_seed(0)
    D = edm_mnist.Denoiser(edm_mnist.UNet((8, 16, 32)), SD).eval()
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
        _, _, c_in, _ = edm_mnist.precond(sigma, SD)
        v = (c_in * (x0 + s * torch.randn(x0.shape, generator=gen))).var().item()
        assert v == pytest.approx(1.0, rel=0.01), s


def test_loss_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    lam = edm_mnist.loss_weight(sigma, SD)
    _, c_out, _, _ = edm_mnist.precond(sigma, SD)
    assert torch.allclose(lam, (sigma ** 2 + SD ** 2) / (sigma * SD) ** 2)
    assert torch.allclose(c_out, sigma * SD / (sigma ** 2 + SD ** 2).sqrt())
    assert torch.allclose(lam * c_out ** 2, torch.ones_like(sigma))


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser E[x0 | x] = x s^2 / (s^2 + sigma^2) of data x0 ~ N(0, s^2), with sigma_data = s."""
    sigma_data = SD

    def forward(self, x, sigma):
        return x * SD ** 2 / (SD ** 2 + sigma ** 2)


def test_edm_loss_of_the_exact_denoiser_is_one_and_its_noise_comes_from_the_generator():
    """With sigma_data the data's std, lambda(sigma) times the posterior variance s^2 sigma^2 / (s^2 + sigma^2) is 1
    at every sigma: the exact denoiser's loss has mean 1. The same generator state gives the same loss whatever the
    global RNG does (resume depends on it)."""
    x0 = SD * torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    D = GaussianDenoiser()
    loss = edm_mnist.edm_loss(D, x0, -1.2, 1.2, torch.Generator().manual_seed(2))
    assert loss.shape == x0.shape and loss.mean().item() == pytest.approx(1.0, abs=0.03)
    torch.manual_seed(123)
    again = edm_mnist.edm_loss(D, x0, -1.2, 1.2, torch.Generator().manual_seed(2))
    assert torch.equal(loss, again)


def test_timestep_embedding_is_sin_then_cos():
    t = torch.tensor([0.0, 1.0, -1.5])
    e = edm_mnist.timestep_embedding(t, 4)  # w = 10000^(-k/2): 1 and 0.01
    w = torch.tensor([1.0, 0.01])
    assert torch.allclose(e, torch.cat([(t[:, None] * w).sin(), (t[:, None] * w).cos()], 1))
    assert torch.equal(e[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- schedule
def test_karras_schedule():
    s = edm_mnist.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    i = 5
    closed = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(closed, rel=1e-12)
    lin = edm_mnist.karras_sigmas(5, 1.0, 9.0, 1.0)
    assert torch.allclose(lin, torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        edm_mnist.karras_sigmas(1)


# ----------------------------------------------------------------------------- sampler
def ideal(x, sigma, s=0.7):  # data N(0, s^2): the ideal denoiser is E[x0 | x] = x s^2 / (s^2 + sigma^2)
    return x * s ** 2 / (s ** 2 + sigma ** 2)


@pytest.mark.parametrize("steps, tol", [(40, 0.03), (80, 0.015)])
def test_heun_on_gaussian_data_recovers_variance(steps, tol):
    latents = torch.randn(100_000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = edm_mnist.edm_sampler(ideal, latents, edm_mnist.karras_sigmas(steps))
    # the ODE starts from N(0, sigma_max^2) instead of N(0, sigma_max^2 + s^2): a relative error of ~4e-5
    assert x.var().item() == pytest.approx(0.7 ** 2, rel=tol)
    assert abs(x.mean().item()) < 0.01


def test_heun_is_second_order():
    """The Gaussian ODE is linear: x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2) exactly; Heun's error in the
    final variance must fall about 4x per doubling of N (Euler's would fall 2x)."""
    exact = 80.0 ** 2 * 0.7 ** 2 / (0.7 ** 2 + 80.0 ** 2)  # x(sigma_max) = sigma_max z with z = 1
    err = [abs(edm_mnist.edm_sampler(ideal, torch.ones(1, dtype=torch.float64), edm_mnist.karras_sigmas(n)).item()
               ** 2 / exact - 1) for n in (40, 80, 160)]
    assert 3.0 < err[0] / err[1] < 5.5 and 3.0 < err[1] / err[2] < 5.5, err


def test_heun_with_churn_still_recovers_variance():
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(100_000, 1, 1, 1, generator=gen, dtype=torch.float64)
    x = edm_mnist.edm_sampler(ideal, latents, edm_mnist.karras_sigmas(80), S_churn=10, S_min=0.05, S_max=50, gen=gen)
    assert x.var().item() == pytest.approx(0.7 ** 2, rel=0.03)
    assert not torch.allclose(x, edm_mnist.edm_sampler(ideal, latents, edm_mnist.karras_sigmas(80)))  # churn acted


@pytest.mark.parametrize("steps", [2, 5, 18])
def test_heun_costs_2n_minus_1_evaluations(steps):
    calls = []

    def D(x, sigma):
        calls.append(sigma)
        return 0.5 * x

    edm_mnist.edm_sampler(D, torch.randn(4, 1, 2, 2), edm_mnist.karras_sigmas(steps))
    assert len(calls) == 2 * steps - 1
    assert min(calls) > 0  # D is never asked about sigma = 0


def test_unet_shapes_and_the_figure_drawn_from_the_plain_module(tmp_path):
    net = edm_mnist.UNet((8, 16, 32))
    assert net(torch.randn(2, 1, 28, 28), torch.zeros(2)).shape == (2, 1, 28, 28)
    rows = common.figure_network(str(tmp_path / "unet.png"), net, (torch.randn(1, 1, 28, 28), torch.zeros(1)), "F")
    assert [r[0] for r in rows] == ["stem", "enc28", "down14", "enc14", "down7", "mid1", "mid2", "up14", "dec14",
                                    "up28", "dec28", "out"]
    assert [r[4] for r in rows] == [28, 28, 14, 14, 7, 7, 7, 14, 14, 28, 28, 28]
    assert {r[0]: rows[r[5]][0] for r in rows if r[5] is not None} == {"dec14": "enc14", "dec28": "enc28"}
    assert os.path.getsize(tmp_path / "unet.png") > 1000


# ----------------------------------------------------------------------------- smoke run
QUICK = ["--quick", "--train-steps", "20", "--n-samples", "24", "--study-steps", "3,5", "--study-n", "16",
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
    assert m["eval"]["n"] == 24 and m["total_steps"] == 20 and m["device"] == "cpu" and m["stop_reason"] == "steps"
    assert m["epochs_done"] == 2 and m["partial_epoch_loss"] is None  # 600 images at batch 64: 10 steps per epoch
    for k in ("final_epoch_loss", "best_epoch_loss", "final_mean_loss_last_100_steps", "train_steps_per_s"):
        assert math.isfinite(m[k]), k
    assert m["wall_time_s"] > 0 and m["train_seconds"] >= 0
    assert [r["steps"] for r in m["steps_study"]] == [3, 5] and [r["nfe"] for r in m["steps_study"]] == [5, 9]
    assert all(r["seconds_per_sample"] > 0 and math.isfinite(r["fid"]) for r in m["steps_study"])
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert ck["script"] == "edm_mnist" and ck["kind"] == "model" and ck["loop"]["step"] == 20
    assert {"model", "ema", "optimizer", "config", "loop"} <= set(ck) and len(ck["loop"]["losses"]) == 20
    assert ck["config"]["sigma_data"] == 0.5 and tuple(ck["config"]["channels"]) == (8, 16, 32)
    for fig in ("samples_grid", "loss_steps", "loss_epochs", "unet", "sigma_schedule", "steps_study"):
        assert os.path.getsize(os.path.join(d, fig + ".png")) > 1000


def test_load_denoiser_and_sample_from_checkpoint(quick_run, tiny_mnist):
    out, d = quick_run
    D, ckpt = edm_mnist.load_denoiser(os.path.join(d, "checkpoint.pt"))
    assert not D.training and ckpt["config"]["sigma_min"] == 0.002
    x = edm_mnist.edm_sampler(D, torch.randn(3, 1, 28, 28), edm_mnist.karras_sigmas(4))
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()
    r = run_in_process(edm_mnist, "--checkpoint", os.path.join(d, "checkpoint.pt"), "--quick", "--no-eval",
                       "--n-samples", "5", "--sample-steps", "3", "--out", out, "--run-id", "sampled")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(os.path.join(out, "edm_mnist", "sampled", "samples.pt")).shape == (5, 1, 28, 28)
    assert not os.path.exists(os.path.join(out, "edm_mnist", "sampled", "checkpoint.pt"))  # nothing trained


# ----------------------------------------------------------------------------- exact resume
TINY = ["--quick", "--channels", "4,8,8", "--batch-size", "16", "--eval-every", "5", "--no-eval", "--n-samples", "4",
        "--sample-steps", "2"]  # 600 images at batch 16: 38 steps per epoch


def final(out, run_id):
    ck = torch.load(os.path.join(out, "edm_mnist", run_id, "checkpoint.pt"), weights_only=False)
    return ck, json.load(open(os.path.join(out, "edm_mnist", run_id, "metrics.json")))


def assert_same_run(a, b):
    """Bit for bit: every step's loss, the weights, the EMA and the generator."""
    assert a["loop"]["step"] == b["loop"]["step"] and a["loop"]["losses"] == b["loop"]["losses"]
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), (part, k)
    assert torch.equal(a["loop"]["gen"], b["loop"]["gen"])


def test_sigint_mid_epoch_then_resume_is_exact(tiny_mnist, tmp_path):
    """Stopped by Ctrl-C a few steps into training (status 'interrupted', exit 130, a checkpoint), then resumed with
    --resume: the same weights and per-step losses as a run that was never stopped."""
    out, common_args = str(tmp_path), [*TINY, "--data-root", tiny_mnist, "--out", str(tmp_path)]
    cut_ckpt = os.path.join(out, "edm_mnist", "cut", "checkpoint.pt")
    r = interrupt(["edm_mnist.py", *common_args, "--train-steps", "1000000", "--run-id", "cut"], cut_ckpt, "SIGINT")
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("edm_mnist.py: interrupted by SIGINT at step")
    status = json.load(open(os.path.join(out, "edm_mnist", "cut", "status.json")))
    assert status["state"] == "interrupted" and "--resume" in status["message"]
    k = torch.load(cut_ckpt, weights_only=False)["loop"]["step"]
    assert 5 <= k < 1000000
    total = str(k + 12)  # past the cut, across a window the checkpoint cut and (often) an epoch boundary
    r = run_in_process(edm_mnist, "--resume", cut_ckpt, "--train-steps", total, "--out", out, "--run-id", "resumed")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_in_process(edm_mnist, *common_args, "--train-steps", total, "--run-id", "whole")
    assert r.returncode == 0, r.stderr[-2000:]
    (whole, _), (resumed, m) = final(out, "whole"), final(out, "resumed")
    assert_same_run(whole, resumed)
    assert m["total_steps"] == k + 12 and len(resumed["loop"]["losses"]) == k + 12


def test_time_budget_stop_then_resume_is_exact(tiny_mnist, tmp_path):
    """--max-minutes ends training after a step or two (mid-epoch), the run completes (it samples), and --resume
    continues to the same weights and losses as an unbroken run; the metrics keep the cut epoch's mean apart."""
    out, common_args = str(tmp_path), [*TINY, "--data-root", tiny_mnist, "--out", str(tmp_path), "--train-steps", "45"]
    r = run_in_process(edm_mnist, *common_args, "--max-minutes", "1e-6", "--run-id", "cut")
    assert r.returncode == 0, r.stderr[-2000:]
    cut, m = final(out, "cut")
    assert m["stop_reason"] == "time budget" and 1 <= m["total_steps"] <= 2 and m["partial_epoch_loss"] is not None
    assert m["epochs_done"] == 0 and m["final_epoch_loss"] is None
    r = run_in_process(edm_mnist, "--resume", os.path.join(out, "edm_mnist", "cut", "checkpoint.pt"),
                       "--max-minutes", "0", "--out", out, "--run-id", "resumed")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_in_process(edm_mnist, *common_args, "--run-id", "whole")
    assert r.returncode == 0, r.stderr[-2000:]
    (whole, mw), (resumed, mr) = final(out, "whole"), final(out, "resumed")
    assert_same_run(whole, resumed)
    assert mr["total_steps"] == 45 and mr["epochs_done"] == 1 and mr["final_epoch_loss"] == mw["final_epoch_loss"]
    assert mr["partial_epoch_loss"] == pytest.approx(sum(whole["loop"]["losses"][38:]) / 7)


def test_resume_refuses_a_changed_setting(quick_run):
    out, d = quick_run
    r = run_in_process(edm_mnist, "--resume", os.path.join(d, "checkpoint.pt"), "--lr", "0.5", "--out", out)
    assert r.returncode == 2 and "--lr 0.5" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_measured_sigma_data(tiny_mnist, tmp_path):
    r = run_in_process(edm_mnist, *TINY, "--train-steps", "2", "--sigma-data", "measured", "--data-root", tiny_mnist,
                       "--out", str(tmp_path), "--run-id", "measured")
    assert r.returncode == 0, r.stderr[-2000:]
    ck, m = final(str(tmp_path), "measured")
    assert 0.2 < ck["config"]["sigma_data"] < 1.0 and ck["config"]["sigma_data"] != 0.5
    assert m["sigma_data"] == ck["config"]["sigma_data"]


# ----------------------------------------------------------------------------- NaN and bad input
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_weights(tiny_mnist, tmp_path, monkeypatch):
    """F's output turns NaN from the 13th training step on: the run fails naming step 13 (the message is the last
    line on stderr), keeps the checkpoint of step 10 and writes no samples."""
    calls, forward = {"n": 0}, edm_mnist.UNet.forward

    def poisoned(self, x, c_noise):
        out = forward(self, x, c_noise)
        if torch.is_grad_enabled():  # a training step, not sampling
            calls["n"] += 1
            out = out * float("nan") if calls["n"] > 12 else out
        return out

    monkeypatch.setattr(edm_mnist.UNet, "forward", poisoned)
    r = run_in_process(edm_mnist, *TINY, "--train-steps", "30", "--data-root", tiny_mnist, "--out", str(tmp_path),
                       "--run-id", "nan")
    assert r.returncode == 1, r.stderr[-1000:]
    assert r.stderr.strip().splitlines()[-1].startswith("edm_mnist.py: error: loss is nan at step 13; the last good")
    d = tmp_path / "edm_mnist" / "nan"
    status = json.load(open(d / "status.json"))
    assert status["state"] == "failed" and "at step 13" in status["message"]
    ck = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ck["loop"]["step"] == 10 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (d / "samples.pt").exists()


def test_bad_flag_on_the_command_line_is_one_line_exit_2(tmp_path):
    r = run_script("edm_mnist.py", "--quick", "--P-mean", "nan", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "--P-mean" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "out")


def checkpoint_file(tmp_path, case, quick_run):
    path = str(tmp_path / f"{case}.pt")
    if case == "other":
        torch.save({"script": "ddpm_mnist_cfg", "kind": "model", "config": {}}, path)
    elif case == "old":  # the format before the training loop moved to harness.TrainLoop
        torch.save({"script": "edm_mnist", "kind": "model", "config": {}, "model": {}, "ema": {}, "step": 3}, path)
    else:  # truncated
        data = open(os.path.join(quick_run[1], "checkpoint.pt"), "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("case", ["missing_data", "checkpoint_other", "resume_other", "checkpoint_old",
                                  "checkpoint_truncated", "resume_truncated", "sigma_order", "neg_steps", "one_step",
                                  "bad_study", "bad_sigma_data", "P_mean_inf", "P_std_0", "huge_batch", "channels_2",
                                  "resume_and_checkpoint"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, quick_run):
    out = str(tmp_path / "out")
    ckpt = {k: lambda kind=k: checkpoint_file(tmp_path, kind, quick_run) for k in ("other", "old", "truncated")}
    args = {"missing_data": lambda: ["--quick", "--data-root", str(tmp_path / "nowhere")],
            "checkpoint_other": lambda: ["--checkpoint", ckpt["other"]()],
            "resume_other": lambda: ["--quick", "--resume", ckpt["other"]()],
            "checkpoint_old": lambda: ["--checkpoint", ckpt["old"]()],
            "checkpoint_truncated": lambda: ["--checkpoint", ckpt["truncated"]()],
            "resume_truncated": lambda: ["--resume", ckpt["truncated"]()],
            "sigma_order": lambda: ["--quick", "--sigma-min", "5", "--sigma-max", "1"],
            "neg_steps": lambda: ["--quick", "--sample-steps", "-3"],
            "one_step": lambda: ["--quick", "--sample-steps", "1"],
            "bad_study": lambda: ["--quick", "--study-steps", "5,x"],
            "bad_sigma_data": lambda: ["--quick", "--sigma-data", "-1"],
            "P_mean_inf": lambda: ["--quick", "--P-mean", "inf"],
            "P_std_0": lambda: ["--quick", "--P-std", "0"],
            "huge_batch": lambda: ["--quick", "--batch-size", "100000000"],
            "channels_2": lambda: ["--quick", "--channels", "8,16"],
            "resume_and_checkpoint": lambda: ["--resume", "a.pt", "--checkpoint", "b.pt"]}[case]()
    r = run_in_process(edm_mnist, *args, "--out", out)
    assert r.returncode == 2, r.stderr[-1000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, r.stderr
    if "truncated" in case or "old" in case:
        assert str(tmp_path) in r.stderr  # the file is named
    assert not os.path.exists(out)  # nothing written

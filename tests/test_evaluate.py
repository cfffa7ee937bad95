"""evaluate.py: the Frechet formula against scipy, the judge on tiny synthetic MNIST, the CLI and its bad input."""
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import common
import evaluate
from conftest import run_script

JUDGE_EPOCHS = 10  # 600 tiny images: a few seconds, and the synthetic classes are easy


@pytest.fixture(scope="module")
def judged(tiny_mnist, tmp_path_factory):
    """A judge trained once on the tiny data, cached in a temporary out root."""
    out = str(tmp_path_factory.mktemp("judge_out"))
    kw = dict(dataset="mnist", data_root=tiny_mnist, out_root=out, device="cpu", judge_epochs=JUDGE_EPOCHS)
    return kw, evaluate.get_judge(**{k: v for k, v in kw.items() if k != "judge_epochs"}, epochs=JUDGE_EPOCHS)


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 1.0
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)
    ours = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
    # two Gaussians with equal covariance: FID is the squared distance of the means
    s = np.eye(4) * 2.0
    assert evaluate.frechet_distance(np.zeros(4), s, np.full(4, 3.0), s) == pytest.approx(36.0, abs=1e-9)


def test_gaussian_stats_are_mean_and_unbiased_covariance():
    f = torch.randn(300, 5, dtype=torch.float64)
    mu, sigma = evaluate.gaussian_stats(f)
    assert torch.allclose(mu, f.mean(0))
    assert np.allclose(sigma.numpy(), np.cov(f.numpy().T), atol=1e-12)


def test_judge_is_cached_with_its_accuracy(judged):
    kw, judge = judged
    assert judge["test_accuracy"] > 0.9
    assert os.path.isfile(judge["path"])
    with open(judge["path"][:-3] + ".json") as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(judge["test_accuracy"])
    again = evaluate.get_judge(kw["dataset"], kw["data_root"], kw["out_root"], "cpu", JUDGE_EPOCHS)
    assert again["train_seconds"] == judge["train_seconds"]  # loaded, not retrained


def test_fid_of_the_reference_set_is_zero_and_grows_with_noise(judged, tiny_mnist):
    kw, _ = judged
    x, y = common.load_image_dataset("mnist", tiny_mnist, train=False)  # the reference itself
    fids = []
    for sigma in (0.0, 0.2, 0.5, 1.0):
        noisy = (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
        fids.append(evaluate.score(noisy, y, floor=False, **kw)["fid"])
    assert abs(fids[0]) < 1e-6
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


def test_score_metrics_on_real_images(judged, tiny_mnist):
    kw, _ = judged
    x, y = common.load_image_dataset("mnist", tiny_mnist, train=False)
    good = evaluate.score(x, y, **kw)
    assert set(good) >= {"n", "fid", "fid_floor", "class_accuracy", "mean_top_prob", "class_entropy"}
    assert good["n"] == len(x) == 200
    assert good["class_accuracy"] > 0.9 and good["mean_top_prob"] > 0.5
    assert good["class_entropy"] == pytest.approx(math.log(10), abs=0.05)  # balanced labels, good judge
    assert good["fid_floor"] is not None and good["fid_floor"] >= 0
    wrong = evaluate.score(x, (y + 1) % 10, floor=False, **kw)
    assert wrong["class_accuracy"] < 0.1
    one_class = evaluate.score(x[y == 3], None, floor=False, **kw)  # mode collapse: a low entropy
    assert "class_accuracy" not in one_class and one_class["class_entropy"] < 0.5


def test_cli_prints_one_json_line(judged, tiny_mnist, tmp_path):
    kw, _ = judged
    x, y = common.load_image_dataset("mnist", tiny_mnist, train=False)
    torch.save(x[:50], tmp_path / "s.pt")
    torch.save(y[:50], tmp_path / "l.pt")
    r = run_script("evaluate.py", str(tmp_path / "s.pt"), "--labels", str(tmp_path / "l.pt"), "--data-root",
                   tiny_mnist, "--out", kw["out_root"], "--judge-epochs", str(JUDGE_EPOCHS))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["n"] == 50 and res["class_accuracy"] > 0.8 and res["fid_floor"] is not None


@pytest.mark.parametrize("case", ["missing", "shape", "range", "dataset"])
def test_cli_bad_input_is_one_line_exit_2(case, tmp_path, tiny_mnist):
    path = str(tmp_path / "s.pt")
    args = [path, "--data-root", tiny_mnist, "--out", str(tmp_path)]
    if case == "shape":
        torch.save(torch.zeros(4, 3, 32, 32), path)
    elif case == "range":
        torch.save(torch.full((4, 1, 28, 28), 5.0), path)
    elif case == "dataset":
        torch.save(torch.zeros(4, 1, 28, 28), path)
        args += ["--dataset", "cifar100"]
    r = run_script("evaluate.py", *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert not os.path.exists(tmp_path / "judges")  # nothing trained or written

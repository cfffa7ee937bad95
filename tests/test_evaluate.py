"""evaluate.py: the Frechet formula against closed forms and scipy, the core alone, the judge on tiny synthetic MNIST,
the CLI and its bad input (one line, exit 2, nothing trained)."""
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import common
import harness
import evaluate
from conftest import run_script

JUDGE_EPOCHS = 10  # 600 tiny images: a few seconds, and the synthetic classes are easy


@pytest.fixture(scope="module")
def judged(tiny_mnist, tmp_path_factory):
    """A judge trained once on the tiny data, cached in a temporary out root."""
    out = str(tmp_path_factory.mktemp("judge_out"))
    kw = dict(dataset="mnist", data_root=tiny_mnist, out_root=out, device="cpu", judge_epochs=JUDGE_EPOCHS)
    return kw, evaluate.get_judge(**{k: v for k, v in kw.items() if k != "judge_epochs"}, epochs=JUDGE_EPOCHS)


@pytest.fixture(scope="module")
def files(tiny_mnist, tmp_path_factory):
    """Sample and label files of the tiny test split: s.pt (50 images), l.pt (their 50 labels)."""
    d = tmp_path_factory.mktemp("files")
    x, y = common.load_image_dataset("mnist", tiny_mnist, train=False)
    torch.save(x[:50], d / "s.pt")
    torch.save(y[:50], d / "l.pt")
    return d, x[:50], y[:50]


# ----------------------------------------------------------------------------- the math
def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_closed_forms_and_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 1.0
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
    # equal covariances: FID is the squared distance of the means
    s = np.eye(4) * 2.0
    assert evaluate.frechet_distance(np.zeros(4), s, np.full(4, 3.0), s) == pytest.approx(36.0, abs=1e-9)
    # diagonal covariances a_k, b_k: FID = |mu1 - mu2|^2 + sum_k (sqrt(a_k) - sqrt(b_k))^2
    va, vb = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    expected = 1.0 + 4.0 + (1 + 1 + 0 + 0.25)
    assert evaluate.frechet_distance(np.zeros(4), np.diag(va), np.array([1.0, 2, 0, 0]), np.diag(vb)) == \
        pytest.approx(expected, abs=1e-9)
    # a rotated covariance against its own rotation: the same Gaussian up to the mean
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    sig = q @ np.diag(va) @ q.T
    assert evaluate.frechet_distance(np.ones(4), sig, np.ones(4), sig) == pytest.approx(0.0, abs=1e-9)


def test_sqrtm_psd_squares_back_and_clamps_rounding():
    rng = np.random.default_rng(1)
    m = torch.tensor(rng.normal(size=(6, 3)), dtype=torch.float64)
    a = m @ m.T  # rank 3: half its eigenvalues are 0 up to rounding
    r = evaluate.sqrtm_psd(a)
    assert torch.allclose(r @ r, a, atol=1e-10) and torch.allclose(r, r.T) and torch.isfinite(r).all()


def test_gaussian_stats_are_mean_and_unbiased_covariance():
    f = torch.randn(300, 5, dtype=torch.float64)
    mu, sigma = evaluate.gaussian_stats(f)
    assert torch.allclose(mu, f.mean(0))
    assert np.allclose(sigma.numpy(), np.cov(f.numpy().T), atol=1e-12)
    two = torch.tensor([[0.0, 1.0], [2.0, 5.0]])  # two points, d = their difference: covariance d d^T / 2
    assert torch.allclose(evaluate.gaussian_stats(two)[1], torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.gaussian_stats(torch.zeros(1, 5))


def test_augment_keeps_shape_range_and_background():
    x = -torch.ones(5, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1
    out = evaluate.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    assert torch.allclose(out[:, :, :3], -torch.ones(5, 1, 3, 28))  # the border stays background


# ----------------------------------------------------------------------------- the judge
def test_judge_is_cached_with_its_accuracy(judged):
    kw, judge = judged
    assert judge["test_accuracy"] > 0.9
    assert judge["path"] == os.path.join(kw["out_root"], "judges", f"mnist-e{JUDGE_EPOCHS}.pt")
    with open(judge["path"][:-3] + ".json") as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(judge["test_accuracy"])
    again = evaluate.get_judge(kw["dataset"], kw["data_root"], kw["out_root"], "cpu", JUDGE_EPOCHS)
    assert again["train_seconds"] == judge["train_seconds"]  # loaded, not retrained
    assert not [f for f in os.listdir(os.path.dirname(judge["path"])) if ".tmp" in f]


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
    assert set(good) >= {"n", "fid", "fid_floor", "class_accuracy", "mean_top_prob", "class_entropy",
                         "judge_test_accuracy"}
    assert good["n"] == len(x) == 200
    assert good["class_accuracy"] > 0.9 and good["mean_top_prob"] > 0.5
    assert good["class_entropy"] == pytest.approx(math.log(10), abs=0.05)  # balanced labels, good judge
    assert good["fid_floor"] is not None and good["fid_floor"] >= 0
    assert evaluate.get_judge("mnist", kw["data_root"], kw["out_root"], "cpu", JUDGE_EPOCHS)["floors"]["200"] == \
        good["fid_floor"]  # the floor is cached with the judge
    wrong = evaluate.score(x, ((y + 1) % 10).tolist(), floor=False, **kw)  # a list of labels is fine from Python
    assert wrong["class_accuracy"] < 0.1
    one_class = evaluate.score(x[y == 3], None, floor=False, **kw)  # mode collapse: a low entropy
    assert "class_accuracy" not in one_class and one_class["class_entropy"] < 0.5
    two = evaluate.score(x[:2], y[:2], floor=False, **kw)  # the smallest N with a covariance
    assert two["n"] == 2 and math.isfinite(two["fid"])


def test_score_checks_its_input_before_training_a_judge(tmp_path, tiny_mnist):
    kw = dict(dataset="mnist", data_root=tiny_mnist, out_root=str(tmp_path), device="cpu", judge_epochs=0.05)
    x = torch.zeros(4, 1, 28, 28)
    cases = [(x[:1], None, common.UsageError, "FID needs at least 2 samples"),
             (torch.full((4, 1, 28, 28), float("nan")), None, harness.RunError, "4 of 4 images hold NaN or inf"),
             (x, torch.tensor([0, 1, 2]), common.UsageError, "labels: 3 labels for 4 samples"),
             (x, torch.tensor([0, 1, 2, 12]), common.UsageError, r"labels must be integers in \[0, 10\), got max 12"),
             (x, {"labels": 1}, common.UsageError, "got a dict")]
    for samples, labels, error, message in cases:
        with pytest.raises(error, match=message):
            evaluate.score(samples, labels, **kw)
    assert not os.path.exists(tmp_path / "judges")


def test_check_labels_names_the_problem():
    ok = evaluate.check_labels(torch.tensor([0, 9, 3], dtype=torch.int32), 3, 10)
    assert ok.dtype == torch.int64 and ok.tolist() == [0, 9, 3]
    cases = [({"a": 1}, "expected a 1-D integer tensor of labels, got a dict"),
             (torch.tensor([0.0, 1.0, 2.0]), "labels are floats (torch.float32), expected integers"),
             (torch.tensor([True, False, True]), "labels are bool, expected integers"),
             (torch.zeros(3, 1, dtype=torch.long), "labels must be 1-D, got shape (3, 1)"),
             (torch.tensor([0, 1]), "2 labels for 3 samples"),
             (torch.tensor([0, -1, 2]), "labels must be integers in [0, 10), got min -1"),
             (torch.tensor([0, 12, 2]), "labels must be integers in [0, 10), got max 12")]
    for y, message in cases:
        with pytest.raises(common.UsageError) as e:
            evaluate.check_labels(y, 3, 10, "--labels l.pt")
        assert str(e.value) == f"--labels l.pt: {message}"


def test_a_corrupt_judge_cache_is_named(tmp_path, tiny_mnist):
    os.makedirs(tmp_path / "judges")
    path = tmp_path / "judges" / "mnist.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(common.UsageError, match=f"cannot read {path}.*delete it") as e:
        evaluate.get_judge("mnist", tiny_mnist, str(tmp_path), "cpu")
    assert "\n" not in str(e.value)
    torch.save({"script": "evaluate", "kind": "judge", "config": {"n_classes": 10}, "model": {"x": torch.zeros(1)}},
               path)
    with pytest.raises(common.UsageError, match=f"judge cache {path}: not a judge"):
        evaluate.get_judge("mnist", tiny_mnist, str(tmp_path), "cpu")


# ----------------------------------------------------------------------------- the command line
def test_cli_prints_one_json_line(judged, files, tiny_mnist):
    kw, _ = judged
    d, _, _ = files
    r = run_script("evaluate.py", str(d / "s.pt"), "--labels", str(d / "l.pt"), "--data-root", tiny_mnist,
                   "--out", kw["out_root"], "--judge-epochs", str(JUDGE_EPOCHS))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["n"] == 50 and res["class_accuracy"] > 0.8 and res["fid_floor"] is not None


def test_cli_in_process_reads_a_dict_of_samples_and_labels(judged, files, tiny_mnist, capsys):
    kw, _ = judged
    d, x, y = files
    torch.save({"samples": x, "labels": y}, d / "both.pt")
    evaluate.main([str(d / "both.pt"), "--data-root", tiny_mnist, "--out", kw["out_root"], "--judge-epochs",
                   str(JUDGE_EPOCHS), "--no-floor"])
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 50 and "class_accuracy" in res and "fid_floor" not in res


def test_quick_preset_and_explicit_judge_epochs():
    assert evaluate.parse_args(["s.pt"]).judge_epochs == evaluate.DEFAULT_EPOCHS
    assert evaluate.parse_args(["s.pt", "--quick"]).judge_epochs == 0.05
    assert evaluate.parse_args(["s.pt", "--quick", "--judge-epochs", "2"]).judge_epochs == 2.0


@pytest.mark.parametrize("case", ["missing", "shape", "range", "one", "garbage", "truncated", "dict_without_samples",
                                  "labels_dict", "labels_count", "labels_max", "labels_float", "labels_corrupt",
                                  "dict_labels_bad"])
def test_bad_input_is_one_line_naming_the_file(case, files, tmp_path, tiny_mnist):
    """In process (fast): the UsageError main() raises, before any judge is trained."""
    d, x, y = files
    s, lab = str(tmp_path / "s.pt"), str(tmp_path / "l.pt")
    torch.save(x, s)
    args, want = [s, "--data-root", tiny_mnist, "--out", str(tmp_path)], None
    if case == "missing":
        os.remove(s)
        want = f"samples {s}: no such file"
    elif case == "shape":
        torch.save(torch.zeros(4, 3, 32, 32), s)
        want = f"samples {s}: expected a tensor N x 1 x 28 x 28, got (4, 3, 32, 32)"
    elif case == "range":
        torch.save(torch.full((4, 1, 28, 28), 5.0), s)
        want = f"samples {s}: values must be in [-1, 1], got range [5, 5]"
    elif case == "one":
        torch.save(x[:1], s)
        want = f"samples {s}: FID needs at least 2 samples (a covariance), got 1"
    elif case == "garbage":
        open(s, "wb").write(b"\x00garbage" * 10)
        want = f"samples {s}: cannot read it: truncated or not a torch file"
    elif case == "truncated":
        data = open(d / "s.pt", "rb").read()
        open(s, "wb").write(data[:len(data) // 2])
        want = f"samples {s}: cannot read it: truncated or not a torch file"
    elif case == "dict_without_samples":
        torch.save({"images": x}, s)
        want = f"samples {s}: a dict without a 'samples' entry (keys: images)"
    elif case == "dict_labels_bad":
        torch.save({"samples": x, "labels": y[:3]}, s)
        want = f"samples {s}['labels']: 3 labels for 50 samples"
    else:
        args += ["--labels", lab]
        obj = {"labels_dict": {"labels": y}, "labels_count": y[:3], "labels_max": torch.full((50,), 12),
               "labels_float": y.float(), "labels_corrupt": None}[case]
        torch.save(obj, lab) if obj is not None else open(lab, "wb").write(b"PK\x03\x04 half a zip")
        want = f"--labels {lab}: " + {
            "labels_dict": "expected a 1-D integer tensor of labels, got a dict",
            "labels_count": "3 labels for 50 samples", "labels_max": "labels must be integers in [0, 10), got max 12",
            "labels_float": "labels are floats (torch.float32), expected integers",
            "labels_corrupt": "cannot read it: truncated or not a torch file"}[case]
    with pytest.raises(common.UsageError) as e:
        evaluate.main(args)
    assert str(e.value).startswith(want) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "judges")  # nothing trained or written


@pytest.mark.parametrize("case", ["one", "labels_dict", "out_file", "dataset"])
def test_cli_bad_input_is_one_line_exit_2(case, files, tmp_path, tiny_mnist):
    """As a user sees it: the reason as the one line on stderr, exit code 2, no judge trained."""
    d, x, y = files
    s = str(tmp_path / "s.pt")
    torch.save(x[:1] if case == "one" else x, s)
    args, want = [s, "--data-root", tiny_mnist, "--out", str(tmp_path)], None
    if case == "one":
        want = "FID needs at least 2 samples"
    elif case == "labels_dict":
        torch.save({"labels": y}, tmp_path / "l.pt")
        args += ["--labels", str(tmp_path / "l.pt")]
        want = f"--labels {tmp_path / 'l.pt'}: expected a 1-D integer tensor of labels, got a dict"
    elif case == "out_file":  # the judge is not cached there: the old script trained it first, then failed
        (tmp_path / "taken").write_text("a file")
        args += ["--out", str(tmp_path / "taken" / "sub")]
        want = f"--out {tmp_path / 'taken' / 'sub'}: cannot write there ({tmp_path / 'taken'} is a file)"
    elif case == "dataset":
        args += ["--dataset", "cifar100"]
        want = "argument --dataset: invalid choice"
    r = run_script("evaluate.py", *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and want in r.stderr, r.stderr
    assert r.stdout == "" and not os.path.exists(tmp_path / "judges")

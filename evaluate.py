"""evaluate.py: the judge. Scores generated 28x28 images with a small CNN classifier per dataset.

The judge is a 3-layer CNN trained once (seed 0) on the dataset's training split and cached at
OUT/judges/<dataset>.pt with its test accuracy (MNIST: 99.46% after 3 epochs, 6 minutes on 2 CPU cores).
score(samples, labels) reports, for N >= 2 samples x_i with requested labels y_i:

  fid            Frechet distance between Gaussians fitted to the judge's penultimate features
                 (128-d) of the samples (mu_g, Sigma_g) and of the real test split (mu_r, Sigma_r):
                 FID = ||mu_g - mu_r||^2 + tr(Sigma_g + Sigma_r - 2 (Sigma_g^1/2 Sigma_r Sigma_g^1/2)^1/2)
                 (Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."; the usual
                 Inception features replaced by the judge's, as is customary for MNIST). The trace
                 term uses tr((Sigma_g Sigma_r)^1/2) = tr((Sigma_g^1/2 Sigma_r Sigma_g^1/2)^1/2),
                 both roots by a symmetric eigendecomposition in float64. The covariances are unbiased
                 (1/(N-1)), so FID needs at least 2 samples.
  fid_floor      the same FID for N real training images: what a perfect generator would get at this
                 N. FID is biased upwards at small N, so always compare FID with the floor at equal N
                 (use N = 10,000 for headline figures).
  class_accuracy share of samples with argmax_k p(k | x_i) = y_i (only when labels are given).
  mean_top_prob  mean_i max_k p(k | x_i): how confidently the judge recognises the samples.
  class_entropy  H(h) = -sum_k h_k log h_k (nats) of the histogram h of predicted classes;
                 log(10) = 2.303 when all ten classes are equally frequent (no mode collapse).
  n              N, the number of samples.

Usage: python evaluate.py SAMPLES.pt [--labels LABELS.pt] [--dataset mnist] [--data-root ./data]
       python evaluate.py SAMPLES.pt --quick    (a 0.05-epoch judge when no full judge is cached)
SAMPLES.pt holds a float tensor N x 1 x 28 x 28 in [-1, 1], or a dict with 'samples' (and 'labels').
Prints one JSON line. Method scripts call score() at the end of a run.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

SCRIPT = "evaluate"
N_CLASSES = {"mnist": 10, "fashion-mnist": 10, "emnist-balanced": 47}  # 1 x 28 x 28, read by common.load_image_dataset
JUDGE_DATASETS = tuple(N_CLASSES)
DEFAULT_EPOCHS = 3.0
PRESETS = {"default": dict(judge_epochs=DEFAULT_EPOCHS), "quick": dict(judge_epochs=0.05)}


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
def augment(x, gen):
    """Light random affine jitter (rotation +-8 deg, shift +-1.4 px, scale 0.9-1.1): digits drawn by
    generators are rarely perfectly centred, and the judge should not punish that."""
    u = torch.rand(len(x), 4, generator=gen) * 2 - 1
    ang, scale = u[:, 0] * math.radians(8), 1 + 0.1 * u[:, 1]
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.1 * u[:, 2]], 1), torch.stack([sin, cos, 0.1 * u[:, 3]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with background -1


class Judge(nn.Module):
    """conv(16)@28 -> pool -> conv(64)@14 -> pool -> conv(128)@7 -> pool -> fc(128) = features -> fc(classes)."""

    def __init__(self, n_classes=10):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.conv = nn.Sequential(block(1, 16), block(16, 64), block(64, 128), nn.Flatten())  # 128 x 3 x 3
        self.fc = nn.Sequential(nn.Linear(128 * 9, 128), nn.BatchNorm1d(128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, n_classes))

    def features(self, x):
        return self.fc(self.conv(x))

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def judge_outputs(judge, x, device, batch=1000):
    """Penultimate features (float64, N x 128) and class probabilities (N x classes)."""
    judge.eval()
    feats, probs = [], []
    for xb in x.split(batch):
        f = judge.features(xb.to(device).float())
        feats.append(f.double().cpu())
        probs.append(F.softmax(judge.head(f), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def gaussian_stats(feats):
    """Mean and covariance (unbiased, 1/(N-1)) of N x d features, in float64."""
    if len(feats) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(feats)}")
    f = feats.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def sqrtm_psd(a):
    """Symmetric square root of a positive semi-definite matrix by eigendecomposition (rounding's small negative
    eigenvalues clamped to 0)."""
    lam, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1^1/2 Sigma2 Sigma1^1/2)^1/2), in float64."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    s1 = sqrtm_psd(sigma1)
    tr_covmean = torch.linalg.eigvalsh(s1 @ sigma2 @ s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean)
# ==== end of core ====


# ----------------------------------------------------------------------------- input checks
def check_dataset(dataset):
    if dataset not in N_CLASSES:
        raise common.UsageError(f"unknown dataset {dataset!r} for the judge; choose one of {', '.join(JUDGE_DATASETS)}")


def check_images(x, what="samples", error=common.UsageError):
    """A float tensor N x 1 x 28 x 28 with N >= 2, finite, in [-1, 1] (a rounding slack of 1e-3 is clamped away).
    `error`: the exception for values that are not finite or out of range (score() passes RunError: a generator
    that made them has failed, not its caller)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise common.UsageError(f"{what}: expected a tensor N x 1 x 28 x 28, got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else 'a ' + type(x).__name__}")
    if len(x) < 2:
        raise common.UsageError(f"{what}: FID needs at least 2 samples (a covariance), got {len(x)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise common.UsageError(f"{what}: expected real pixel values, got {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise error(f"{what}: {int((~torch.isfinite(x)).flatten(1).any(1).sum())} of {len(x)} images hold NaN or inf")
    if x.abs().max() > 1 + 1e-3:
        raise error(f"{what}: values must be in [-1, 1], got range [{x.min():.3g}, {x.max():.3g}]")
    return x.clamp(-1, 1)


def check_labels(y, n, n_classes, what="labels"):
    """N integer labels in [0, n_classes) (a tensor, or a list from Python); the error names the problem."""
    if isinstance(y, (list, tuple, np.ndarray)):
        y = torch.as_tensor(np.asarray(y))
    problem = (f"expected a 1-D integer tensor of labels, got a {type(y).__name__}" if not isinstance(y, torch.Tensor)
               else f"labels are floats ({y.dtype}), expected integers" if y.is_floating_point() or y.is_complex()
               else "labels are bool, expected integers" if y.dtype == torch.bool
               else f"labels must be 1-D, got shape {tuple(y.shape)}" if y.ndim != 1
               else f"{len(y)} labels for {n} samples" if len(y) != n
               else f"labels must be integers in [0, {n_classes}), got min {int(y.min())}" if int(y.min()) < 0
               else f"labels must be integers in [0, {n_classes}), got max {int(y.max())}" if int(y.max()) >= n_classes
               else None)
    if problem:
        raise common.UsageError(f"{what}: {problem}")
    return y.long()


def load_tensor_file(path, what):
    """torch.load a file of tensors (no code: weights_only), or a one-line UsageError naming it."""
    if not os.path.isfile(path):
        raise common.UsageError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise common.UsageError(f"{what} {path}: cannot read it: truncated or not a torch file of tensors "
                                f"({type(e).__name__})") from None


# ----------------------------------------------------------------------------- training
def train_judge(dataset, data_root, device, epochs=DEFAULT_EPOCHS, batch=128, lr=3e-3):
    """Train the judge deterministically (seed 0) with AdamW and a one-cycle learning rate; returns (judge, test
    accuracy, seconds). The caller's random state is left untouched; a NaN loss is a RunError naming its step."""
    x, y, _, _ = common.load_image_dataset(dataset, data_root, train=True, val_size=0)
    x_test, y_test = common.load_image_dataset(dataset, data_root, train=False)
    steps = max(10, math.ceil(epochs * len(x) / batch))  # OneCycleLR needs a few steps per phase
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # every generator comes back as it was
        torch.manual_seed(0)  # the initial weights and dropout
        judge = Judge(int(y.max()) + 1).to(device)
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
        loop = harness.TrainLoop(None, steps, 100, {"model": judge, "optimizer": opt}, seed=0)  # no run: no checkpoints
        perm, pos = torch.randperm(len(x), generator=loop.gen), 0
        judge.train()
        for _ in common.progress_bar(loop, total=steps, desc=f"judge {dataset}", leave=False):
            if pos + batch > len(perm):  # a new epoch: reshuffle
                perm, pos = torch.randperm(len(x), generator=loop.gen), 0
            idx, pos = perm[pos:pos + batch], pos + batch
            loss = F.cross_entropy(judge(augment(x[idx], loop.gen).to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if loop.record(loss):
                loop.evaluate()
    _, probs = judge_outputs(judge, x_test, device)
    return judge, float((probs.argmax(1) == y_test).float().mean()), loop.seconds


def judge_path(out_root, dataset, epochs):
    """The default judge lives at judges/<dataset>.pt; a reduced budget (quick runs, tests) gets its own
    file so it never stands in for the real judge."""
    suffix = "" if epochs == DEFAULT_EPOCHS else f"-e{epochs:g}"
    return os.path.join(out_root, "judges", f"{dataset}{suffix}.pt")


def load_judge(path, device):
    """The cached judge dict, or a one-line UsageError naming the file (deleting it trains the judge again)."""
    try:
        ckpt = harness.load_checkpoint(path, SCRIPT, "judge")
        judge = Judge(ckpt["config"]["n_classes"])
        judge.load_state_dict(ckpt["model"])
    except common.UsageError as e:
        raise common.UsageError(f"judge cache: {e}; delete it and the judge is trained again") from None
    except (KeyError, TypeError, RuntimeError) as e:
        raise common.UsageError(f"judge cache {path}: not a judge this script can load ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:80]}); delete it and the judge is trained again") from None
    return {**ckpt, "model": judge.to(device).eval(), "path": path}


def get_judge(dataset="mnist", data_root="./data", out_root="outputs", device="cpu", epochs=None):
    """The cached judge dict {'model', 'test_accuracy', 'ref_mu', 'ref_sigma', ...}; trains it on first use.
    epochs=None means the default budget; with a smaller budget the default judge is still used if cached."""
    check_dataset(dataset)
    device = torch.device(device)
    path = judge_path(out_root, dataset, DEFAULT_EPOCHS)
    if epochs is not None and epochs != DEFAULT_EPOCHS and not os.path.isfile(path):
        path = judge_path(out_root, dataset, epochs)
    if os.path.isfile(path):
        return load_judge(path, device)
    judge, acc, secs = train_judge(dataset, data_root, device, epochs or DEFAULT_EPOCHS)
    x_test, _ = common.load_image_dataset(dataset, data_root, train=False)
    mu, sigma = gaussian_stats(judge_outputs(judge, x_test, device)[0])  # the FID reference: the whole test split
    ckpt = {"script": SCRIPT, "kind": "judge", "config": {"dataset": dataset, "epochs": epochs or DEFAULT_EPOCHS,
            "n_classes": judge.head[-1].out_features}, "model": judge.state_dict(), "test_accuracy": acc,
            "train_seconds": secs, "ref_mu": mu, "ref_sigma": sigma, "n_ref": len(x_test), "floors": {}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_judge(ckpt, path)
    return {**ckpt, "model": judge.eval(), "path": path}


def save_judge(ckpt, path):
    """Write the cache atomically, plus a small JSON beside it for humans and dashboards (also atomically)."""
    harness.save_atomic(ckpt, path)
    info = {k: ckpt[k] for k in ("config", "test_accuracy", "train_seconds", "n_ref", "floors")}
    harness.write_atomic(path[:-3] + ".json", info)


# ----------------------------------------------------------------------------- evaluation
def fid_floor(judge, n, dataset="mnist", data_root="./data", device="cpu"):
    """FID of n real training images (a fixed draw, seed 0) against the test split: the floor at this N."""
    x, _, _, _ = common.load_image_dataset(dataset, data_root, train=True, val_size=0)
    if n > len(x):  # no floor at this N: too few real images
        return None
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    feats, _ = judge_outputs(judge["model"], x[idx], device)
    return frechet_distance(*gaussian_stats(feats), judge["ref_mu"], judge["ref_sigma"])


def score(samples, labels=None, dataset="mnist", data_root="./data", out_root="outputs", device="cpu",
          judge_epochs=None, floor=True):
    """Judge N >= 2 samples (N x 1 x 28 x 28 in [-1, 1]); see the module docstring for the metrics. Inputs are
    checked before a judge is trained. The floor is computed once per N and cached with the judge."""
    check_dataset(dataset)
    x = check_images(samples, error=harness.RunError)
    y = None if labels is None else check_labels(labels, len(x), N_CLASSES[dataset])
    device = torch.device(device)
    judge = get_judge(dataset, data_root, out_root, device, judge_epochs)
    feats, probs = judge_outputs(judge["model"], x, device)
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=judge["config"]["n_classes"]).double() / len(pred)
    out = {"n": len(x), "fid": frechet_distance(*gaussian_stats(feats), judge["ref_mu"], judge["ref_sigma"]),
           "mean_top_prob": float(probs.max(1).values.mean()),
           "class_entropy": float(-(hist[hist > 0] * hist[hist > 0].log()).sum()) + 0.0,  # no -0.0
           "judge_test_accuracy": judge["test_accuracy"]}
    if y is not None:
        out["class_accuracy"] = float((pred == y).float().mean())
    if floor:
        floors = judge["floors"]
        if str(len(x)) not in floors:
            floors[str(len(x))] = fid_floor(judge, len(x), dataset, data_root, device)
            save_judge({**{k: v for k, v in judge.items() if k != "path"}, "model": judge["model"].state_dict()},
                       judge["path"])
        out["fid_floor"] = floors[str(len(x))]
    return out


def load_samples(args):
    """(samples, labels or None) from the command line's files, checked (a one-line UsageError naming the file)."""
    obj = load_tensor_file(args.samples, "samples")
    samples, labels, labels_from = obj, None, None
    if isinstance(obj, dict):
        if "samples" not in obj:
            raise common.UsageError(f"samples {args.samples}: a dict without a 'samples' entry "
                                    f"(keys: {', '.join(map(str, list(obj)[:8])) or 'none'})")
        samples, labels, labels_from = obj["samples"], obj.get("labels"), f"samples {args.samples}['labels']"
    x = check_images(samples, f"samples {args.samples}")
    if args.labels:
        labels, labels_from = load_tensor_file(args.labels, "--labels"), f"--labels {args.labels}"
    return x, None if labels is None else check_labels(labels, len(x), N_CLASSES[args.dataset], labels_from)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    p.add_argument("samples", help="a .pt file: tensor N x 1 x 28 x 28 in [-1, 1], or a dict with 'samples' (and "
                                   "'labels')")
    p.add_argument("--labels", default=None, help="a .pt file with the N requested labels (1-D int tensor)")
    p.add_argument("--dataset", default="mnist", choices=JUDGE_DATASETS, help="which judge (and real data) to use")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/ (etc.): trains the judge, the floor")
    p.add_argument("--judge-epochs", type=common.num(float, 0, 1000, open_lo=True),
                   help="judge training budget in epochs when no judge is cached (a full judge, when cached, is used)")
    p.add_argument("--no-floor", action="store_true", help="skip the real-data FID floor at this N")
    return common.parse(p, argv)  # --out is checked here, before any judge is trained


def main(argv=None):
    args = parse_args(argv)
    x, labels = load_samples(args)  # every input is checked before the judge is trained
    device = common.get_device(args.device)
    print(json.dumps(score(x, labels, args.dataset, args.data_root, args.out, device, args.judge_epochs,
                           floor=not args.no_floor)))


if __name__ == "__main__":
    harness.main(main)

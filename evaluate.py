"""evaluate.py: the judge. Scores generated 28x28 images with a small CNN classifier per dataset.

The judge is a 3-layer CNN trained once (seed 0) on the dataset's training split and cached at
OUT/judges/<dataset>.pt with its test accuracy (MNIST: >= 99.3% after 3 epochs, a few minutes on 2
CPU cores). score(samples, labels) reports, for N samples x_i with requested labels y_i:

  fid            Frechet distance between Gaussians fitted to the judge's penultimate features
                 (128-d) of the samples (mu_g, Sigma_g) and of the real test split (mu_r, Sigma_r):
                 FID = ||mu_g - mu_r||^2 + tr(Sigma_g + Sigma_r - 2 (Sigma_g^1/2 Sigma_r Sigma_g^1/2)^1/2)
                 (Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."; the usual
                 Inception features replaced by the judge's, as is customary for MNIST). The trace
                 term uses tr((Sigma_g Sigma_r)^1/2) = tr((Sigma_g^1/2 Sigma_r Sigma_g^1/2)^1/2),
                 both roots by a symmetric eigendecomposition in float64.
  fid_floor      the same FID for N real training images: what a perfect generator would get at this
                 N. FID is biased upwards at small N, so always compare FID with the floor at equal N
                 (use N = 10,000 for headline figures).
  class_accuracy share of samples with argmax_k p(k | x_i) = y_i (only when labels are given).
  mean_top_prob  mean_i max_k p(k | x_i): how confidently the judge recognises the samples.
  class_entropy  H(h) = -sum_k h_k log h_k (nats) of the histogram h of predicted classes;
                 log(10) = 2.303 when all ten classes are equally frequent (no mode collapse).
  n              N, the number of samples.

Usage: python evaluate.py SAMPLES.pt [--labels LABELS.pt] [--dataset mnist] [--data-root ./data]
SAMPLES.pt holds a float tensor N x 1 x 28 x 28 in [-1, 1], or a dict with 'samples' (and 'labels').
Prints one JSON line. Method scripts call score() at the end of a run.
"""
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

JUDGE_DATASETS = ("mnist", "fashion-mnist", "emnist-balanced")  # 1 x 28 x 28 datasets that common.load_image_dataset knows
DEFAULT_EPOCHS = 3.0
SHAPE = (1, 28, 28)


# ----------------------------------------------------------------------------- data
def _check_dataset(dataset):
    if dataset not in JUDGE_DATASETS:
        raise common.UsageError(f"unknown dataset {dataset!r} for the judge; choose one of {', '.join(JUDGE_DATASETS)}")


def check_images(x, what="samples"):
    """A float tensor N x 1 x 28 x 28, finite, in [-1, 1] (a rounding slack of 1e-3 is clamped away)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != SHAPE or len(x) == 0:
        raise common.UsageError(f"{what}: expected a tensor N x 1 x 28 x 28, got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    x = x.float()
    if not bool(torch.isfinite(x).all()) or x.abs().max() > 1 + 1e-3:
        raise common.UsageError(f"{what}: values must be finite and in [-1, 1] "
                                f"(got range [{x.min():.3g}, {x.max():.3g}])")
    return x.clamp(-1, 1)


def check_labels(y, n, n_classes=10, what="labels"):
    if (not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != n or y.is_floating_point()
            or int(y.min()) < 0 or int(y.max()) >= n_classes):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise common.UsageError(f"{what}: expected {n} integer labels in [0, {n_classes}), got {shape}")
    return y.long()


def load_tensor_file(path, what):
    if not os.path.isfile(path):
        raise common.UsageError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise common.UsageError(f"{what} {path}: cannot read it ({type(e).__name__})") from None


def augment(x, gen):
    """Light random affine jitter (rotation +-8 deg, shift +-1.4 px, scale 0.9-1.1): digits drawn by
    generators are rarely perfectly centred, and the judge should not punish that."""
    n = len(x)
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    ang, scale = u[:, 0] * math.radians(8), 1 + 0.1 * u[:, 1]
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.1 * u[:, 2]], 1), torch.stack([sin, cos, 0.1 * u[:, 3]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with background -1


# ----------------------------------------------------------------------------- model
class Judge(nn.Module):
    """conv(16)@28 -> pool -> conv(64)@14 -> pool -> conv(128)@7 -> pool -> fc(128) = features -> fc(classes)."""

    def __init__(self, n_classes=10):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

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


# ----------------------------------------------------------------------------- training
def train_judge(dataset, data_root, device, epochs=DEFAULT_EPOCHS, batch=128, lr=3e-3):
    """Train the judge deterministically (seed 0) with AdamW and a one-cycle learning rate; returns
    (judge, test accuracy, seconds). The caller's random state is left untouched."""
    x, y, _, _ = common.load_image_dataset(dataset, data_root, train=True, val_size=0)
    x_test, y_test = common.load_image_dataset(dataset, data_root, train=False)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        judge = Judge(int(y.max()) + 1).to(device)
        steps = max(10, math.ceil(epochs * len(x) / batch))  # OneCycleLR needs a few steps per phase
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
        judge.train()
        perm, pos = torch.randperm(len(x), generator=gen), 0
        for _ in common.progress_bar(range(steps), desc=f"judge {dataset}", leave=False):
            if pos + batch > len(perm):  # a new epoch: reshuffle
                perm, pos = torch.randperm(len(x), generator=gen), 0
            idx = perm[pos:pos + batch]
            pos += batch
            loss = F.cross_entropy(judge(augment(x[idx], gen).to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    _, probs = judge_outputs(judge, x_test, device)
    acc = float((probs.argmax(1) == y_test).float().mean())
    return judge, acc, time.time() - t0


def _judge_path(out_root, dataset, epochs):
    """The default judge lives at judges/<dataset>.pt; a reduced budget (quick runs, tests) gets its own
    file so it never stands in for the real judge."""
    suffix = "" if epochs == DEFAULT_EPOCHS else f"-e{epochs:g}"
    return os.path.join(out_root, "judges", f"{dataset}{suffix}.pt")


def get_judge(dataset="mnist", data_root="./data", out_root="outputs", device="cpu", epochs=None):
    """The cached judge dict {'model', 'test_accuracy', 'ref_mu', 'ref_sigma', ...}; trains it on first use.
    epochs=None means the default budget; with a smaller budget the default judge is still used if cached."""
    _check_dataset(dataset)
    device = torch.device(device)
    path = _judge_path(out_root, dataset, DEFAULT_EPOCHS)
    if epochs is not None and epochs != DEFAULT_EPOCHS and not os.path.isfile(path):
        path = _judge_path(out_root, dataset, epochs)
    if os.path.isfile(path):
        ckpt = common.load_checkpoint(path, "evaluate", "judge")
        judge = Judge(ckpt["config"]["n_classes"]).to(device)
        judge.load_state_dict(ckpt["model"])
        return {**ckpt, "model": judge.eval(), "path": path}
    judge, acc, secs = train_judge(dataset, data_root, device, epochs or DEFAULT_EPOCHS)
    x_test, _ = common.load_image_dataset(dataset, data_root, train=False)
    feats, _ = judge_outputs(judge, x_test, device)  # the FID reference: the whole test split
    mu, sigma = gaussian_stats(feats)
    ckpt = {"script": "evaluate", "kind": "judge", "config": {"dataset": dataset, "epochs": epochs or DEFAULT_EPOCHS,
            "n_classes": judge.head[-1].out_features}, "model": judge.state_dict(), "test_accuracy": acc,
            "train_seconds": secs, "ref_mu": mu, "ref_sigma": sigma, "n_ref": len(x_test), "floors": {}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _save(ckpt, path)
    return {**ckpt, "model": judge.eval(), "path": path}


def _save(ckpt, path):
    """Write the cache atomically, plus a small JSON beside it for humans and dashboards."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    info = {k: ckpt[k] for k in ("config", "test_accuracy", "train_seconds", "n_ref", "floors")}
    with open(path[:-3] + ".json", "w") as f:
        json.dump(info, f, indent=2)


# ----------------------------------------------------------------------------- evaluation
def gaussian_stats(feats):
    """Mean and covariance (unbiased, 1/(N-1)) of N x d features, in float64."""
    f = feats.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a):
    """Symmetric square root of a positive semi-definite matrix by eigendecomposition."""
    lam, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1^1/2 Sigma2 Sigma1^1/2)^1/2), in float64."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    s1 = _sqrtm_psd(sigma1)
    lam = torch.linalg.eigvalsh(s1 @ sigma2 @ s1)
    tr_covmean = lam.clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean)


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
    """Judge N samples (N x 1 x 28 x 28 in [-1, 1]); see the module docstring for the metrics.
    The floor is computed once per N and cached with the judge."""
    device = torch.device(device)
    x = check_images(samples)
    judge = get_judge(dataset, data_root, out_root, device, judge_epochs)
    n_classes = judge["config"]["n_classes"]
    feats, probs = judge_outputs(judge["model"], x, device)
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=n_classes).double() / len(pred)
    out = {"n": len(x), "fid": frechet_distance(*gaussian_stats(feats), judge["ref_mu"], judge["ref_sigma"]),
           "mean_top_prob": float(probs.max(1).values.mean()),
           "class_entropy": float(-(hist[hist > 0] * hist[hist > 0].log()).sum()) + 0.0,  # no -0.0
           "judge_test_accuracy": judge["test_accuracy"]}
    if labels is not None:
        y = check_labels(torch.as_tensor(labels), len(x), n_classes)
        out["class_accuracy"] = float((pred == y).float().mean())
    if floor:
        floors = judge["floors"]
        if str(len(x)) not in floors:
            floors[str(len(x))] = fid_floor(judge, len(x), dataset, data_root, device)
            _save({**{k: v for k, v in judge.items() if k != "path"}, "model": judge["model"].state_dict()},
                  judge["path"])
        out["fid_floor"] = floors[str(len(x))]
    return out


# ----------------------------------------------------------------------------- main
def main():
    p = common.make_parser(__doc__)
    p.add_argument("samples", help="a .pt file: tensor N x 1 x 28 x 28 in [-1, 1], or a dict with 'samples' (and 'labels')")
    p.add_argument("--labels", default=None, help="a .pt file with the N requested labels (int tensor)")
    p.add_argument("--dataset", default="mnist", choices=JUDGE_DATASETS, help="which judge (and real data) to use")
    p.add_argument("--data-root", default="./data", help="torchvision data root, needed to train the judge once")
    p.add_argument("--judge-epochs", type=common.positive_float, default=None,
                   help=f"judge training budget in epochs if not cached (default {DEFAULT_EPOCHS:g}; --quick: 0.05)")
    p.add_argument("--no-floor", action="store_true", help="skip the real-data FID floor at this N")
    args = p.parse_args()
    obj = load_tensor_file(args.samples, "samples")
    samples, labels = (obj.get("samples"), obj.get("labels")) if isinstance(obj, dict) else (obj, None)
    check_images(samples)
    if args.labels:
        labels = load_tensor_file(args.labels, "--labels")
    common.seed_everything(args.seed)
    epochs = args.judge_epochs or (0.05 if args.quick else None)
    result = score(samples, labels, args.dataset, args.data_root, args.out, common.get_device(args.device),
                   epochs, floor=not args.no_floor)
    print(json.dumps(result))


if __name__ == "__main__":
    common.run_main(main)

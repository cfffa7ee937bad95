"""common.py: the thin layer the method scripts share. No models, no samplers.

What lives here and why:
  * command line: an argparse parser whose errors are one line and exit code 2, the flags every
    script has (--seed, --device, --out, --run-id, --quick), and `UsageError` for bad input found later;
  * seeding and device choice (auto -> cuda, then mps, then cpu);
  * the run folder outputs/<script>/<run-id>/ with config.json, metrics.json and status.json
    (state, progress, timing), written atomically so a dashboard can poll it mid-run;
  * progress bars (tqdm) and plotting helpers that save PNGs (scatter, curves, image grids);
  * datasets: STATES (2-D outlines of five US states) and its KDE negative log-likelihood score,
    and the torchvision image datasets (MNIST family) with a clear error when they are missing offline.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from datetime import datetime

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")  # scripts run headless: write PNGs, never open windows
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- command line
class UsageError(Exception):
    """Bad input found after parsing (missing data, wrong checkpoint, malformed file): exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is a single line (not usage + error) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(doc, default_seed=0):
    """A parser with the flags every script shares; `doc` is the script's module docstring."""
    p = Parser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=default_seed, help="random seed (torch, numpy, python)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to compute; auto picks cuda, then mps, then cpu")
    p.add_argument("--out", default="outputs", help="root folder; the run goes to OUT/<script>/<run-id>/")
    p.add_argument("--run-id", default=None, help="name of the run folder (default: a timestamp)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds on a CPU")
    return p


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_float(s):
    v = float(s)
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def int_list(count=None, least=1):
    """An argparse type for comma-separated positive integers such as U-Net widths "64,128,256":
    exactly `count` of them when given, else at least `least`."""
    def parse(s):
        try:
            vals = tuple(int(c) for c in str(s).split(","))
        except ValueError:
            vals = ()
        n_ok = len(vals) == count if count else len(vals) >= least
        if not n_ok or min(vals, default=0) <= 0:
            want = f"{count}" if count else f"{least} or more"
            raise argparse.ArgumentTypeError(f"expected {want} positive integers like 64,128,256, got {s!r}")
        return vals
    return parse


def positive_float(s):
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def decay(s):
    """An EMA decay: a number in [0, 1) (1 would freeze the average at its initial weights)."""
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def run_main(main):
    """Call main(); turn a UsageError into one line on stderr and exit code 2."""
    try:
        main()
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- seeding, device
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine (try --device auto)")
    return torch.device(name)


def load_checkpoint(path, script, kind=None):
    """torch.load a checkpoint written by `script` (and of `kind`), or raise a one-line UsageError."""
    if not path or not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file, or not a torch file at all
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script or (kind and ckpt.get("kind") != kind):
        found = ckpt.get("script") if isinstance(ckpt, dict) else type(ckpt).__name__
        want = f"{script} {kind}" if kind else script
        raise UsageError(f"{path} is not a {want} checkpoint (it was written by {found})")
    return ckpt


# ----------------------------------------------------------------------------- run folder
def _write_atomic(path, text):
    """Write to a temp file, then rename: a reader (the dashboard polls these files) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_json(path, obj):
    _write_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (torch.Tensor, np.ndarray, np.generic)):
        return o.tolist()
    if isinstance(o, torch.device):
        return str(o)
    return str(o)


class Run:
    """outputs/<script>/<run-id>/ with config.json, metrics.json and status.json.

    status.json holds state (running/completed/failed), phase, progress in [0, 1], step/total,
    elapsed and estimated remaining seconds, and the figures written so far; `progress()` rewrites it
    at most every `every` seconds so a tight loop can call it freely.
    """

    def __init__(self, script, args, every=2.0):
        self.script = script
        self.run_id = args.run_id or datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
        self.dir = os.path.join(args.out, script, self.run_id)
        os.makedirs(self.dir, exist_ok=True)
        self.t0, self.every, self._last = time.time(), every, 0.0
        self.metrics = {}
        self.status = {"script": script, "run_id": self.run_id, "state": "running", "phase": "start",
                       "progress": 0.0, "step": 0, "total": 0, "started": datetime.now().isoformat(timespec="seconds")}
        _write_json(self.path("config.json"), {"script": script, **vars(args)})
        self._write_status()
        self._mark_latest(args.out)

    def path(self, name):
        return os.path.join(self.dir, name)

    def _mark_latest(self, root):
        """outputs/LATEST_RUN.txt and the outputs/current symlink name the newest run; outputs/dashboard.html
        (a copy of assets/dashboard.html, refreshed when it differs) shows it live."""
        with contextlib.suppress(OSError):
            _write_atomic(os.path.join(root, "LATEST_RUN.txt"), os.path.join(self.script, self.run_id) + "\n")
            link = os.path.join(root, "current")
            tmp = link + f".tmp{os.getpid()}"
            os.symlink(os.path.join(self.script, self.run_id), tmp)
            os.replace(tmp, link)
        with contextlib.suppress(OSError):
            page = _read(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "dashboard.html"))
            dest = os.path.join(root, "dashboard.html")
            if not os.path.isfile(dest) or _read(dest) != page:
                _write_atomic(dest, page)

    def _write_status(self):
        elapsed = time.time() - self.t0
        p = self.status["progress"]
        self.status.update(elapsed_s=round(elapsed, 1), updated=datetime.now().isoformat(timespec="seconds"),
                           remaining_s=round(elapsed * (1 - p) / p, 1) if 0 < p < 1 else None,
                           figures=sorted(f for f in os.listdir(self.dir) if f.endswith(".png")))
        _write_json(self.path("status.json"), self.status)

    def progress(self, phase, step, total, force=False):
        self.status.update(phase=phase, step=int(step), total=int(total), progress=round(step / max(total, 1), 4))
        if force or time.time() - self._last >= self.every:
            self._last = time.time()
            self._write_status()

    def log(self, **metrics):
        """Merge metrics into metrics.json (rewritten whole each call)."""
        self.metrics.update(metrics)
        _write_json(self.path("metrics.json"), self.metrics)

    def finish(self, state="completed", message=None):
        self.status.update(state=state, progress=1.0 if state == "completed" else self.status["progress"])
        if message:
            self.status["message"] = message
        self.log(wall_time_s=round(time.time() - self.t0, 2))
        self._write_status()


def progress_bar(iterable=None, **kw):
    """tqdm with a steady refresh rate, so logs of long runs stay short."""
    return tqdm(iterable, mininterval=1.0, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- plotting
def save_fig(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter(path, points, labels=None, background=None, title="", names=None, lim=3.0):
    """Points (N x 2), coloured by label, over an optional grey background set (the data)."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    pts = np.asarray(points)
    if labels is None:
        ax.scatter(*pts.T, s=1, c="C0", alpha=0.5, label="samples")
    else:
        labels = np.asarray(labels)
        for k in np.unique(labels):
            ax.scatter(*pts[labels == k].T, s=1, c=f"C{k}", alpha=0.5, label=names[k] if names else str(k))
    if background is not None:  # the data on top, thin, so samples off the outline show
        ax.scatter(*np.asarray(background).T, s=0.2, c="k", alpha=0.5, label="data")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.legend(loc="lower right", markerscale=8, fontsize=7)
    save_fig(fig, path)


def plot_curves(path, curves, xlabel="step", ylabel="loss", title="", logy=True):
    """curves: {name: (xs, ys)} on one axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    save_fig(fig, path)


def image_grid(path, images, nrow, title="", row_labels=None):
    """images: (N, C, H, W) in [-1, 1], laid out nrow per row."""
    import torchvision.utils as vutils
    grid = vutils.make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True,
                            value_range=(-1, 1), padding=2, pad_value=1.0)
    rows = math.ceil(len(images) / nrow)
    fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.6, 0.5 * rows + 0.6))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    h = grid.shape[1] / rows
    ax.set_yticks([h * (i + 0.5) for i in range(rows)] if row_labels else [])
    if row_labels:
        ax.set_yticklabels(row_labels)
    ax.set_title(title)
    save_fig(fig, path)


# ----------------------------------------------------------------------------- STATES dataset
STATE_NAMES = ["Michigan", "Idaho", "Ohio", "Oklahoma", "Wisconsin"]  # labels 0..4
RING_ORDER = ["Ohio", "Wisconsin", "Oklahoma", "Idaho", "Michigan"]  # clockwise from the top
RING_RADIUS, STATE_SIZE, JITTER = 1.6, 1.0, 0.01


def _state_polylines():
    """Each state's closed outline(s), projected and scaled to a common size, placed on the ring.

    Projection: x = lon * cos(mean latitude), y = lat (locally equal-area enough at state scale).
    Each state is centred on its bounding box and scaled so its larger side is STATE_SIZE.
    """
    with open(os.path.join(HERE, "assets", "states_outlines.json")) as f:
        raw = json.load(f)["states"]
    out = {}
    for name in STATE_NAMES:
        rings = [np.asarray(r, dtype=np.float64) for r in raw[name]]
        lat0 = np.mean(np.concatenate(rings)[:, 1])
        rings = [r * [math.cos(math.radians(lat0)), 1.0] for r in rings]
        allp = np.concatenate(rings)
        lo, hi = allp.min(0), allp.max(0)
        scale = STATE_SIZE / (hi - lo).max()
        angle = math.pi / 2 - 2 * math.pi * RING_ORDER.index(name) / len(RING_ORDER)  # clockwise
        centre = RING_RADIUS * np.array([math.cos(angle), math.sin(angle)])
        out[name] = [(r - (lo + hi) / 2) * scale + centre for r in rings]
    return out


def _sample_outline(rings, n, gen):
    """n points uniform by arc length over all rings of one state, plus Gaussian jitter."""
    segs = np.concatenate([np.stack([r[:-1], r[1:]], 1) for r in rings])  # (S, 2, 2) segment ends
    length = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1)
    cum = np.concatenate([[0.0], np.cumsum(length)])
    s = gen.uniform(0, cum[-1], size=n)
    k = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(segs) - 1)
    u = ((s - cum[k]) / length[k])[:, None]
    pts = segs[k, 0] + u * (segs[k, 1] - segs[k, 0])
    return pts + JITTER * gen.standard_normal(pts.shape)


def _states_raw(n_per_state, seed):
    gen = np.random.default_rng(seed)
    lines = _state_polylines()
    pts = np.concatenate([_sample_outline(lines[s], n_per_state, gen) for s in STATE_NAMES])
    labels = np.repeat(np.arange(len(STATE_NAMES)), n_per_state)
    return pts, labels


_NORM = None


def _states_norm():
    """Mean and std per axis of the whole population (a large fixed draw): the same affine map for
    every draw, so train and validation sets live in the same coordinates."""
    global _NORM
    if _NORM is None:
        pts, _ = _states_raw(200_000, seed=12345)
        _NORM = (pts.mean(0), pts.std(0))
    return _NORM


def make_states(n_per_state=1000, seed=0, split="train"):
    """STATES: (points float32 N x 2, labels int64 N), N = 5 * n_per_state, standardized per axis.

    Deterministic for (seed, split); "train" and "val" are independent draws.
    """
    if n_per_state < 1:
        raise UsageError(f"n_per_state must be >= 1, got {n_per_state}")
    offset = {"train": 0, "val": 1_000_003}[split]
    pts, labels = _states_raw(n_per_state, seed + offset)
    mean, std = _states_norm()
    pts = (pts - mean) / std
    return torch.tensor(pts, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def load_points(path):
    """An external point set: a torch .pt file holding {'data': float N x 2, 'labels': int N}."""
    expected = "expected a torch .pt file holding {'data': float tensor N x 2, 'labels': int tensor N}"
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: no such file; {expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--data {path}: cannot read it ({type(e).__name__}); {expected}") from None
    if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
        raise UsageError(f"--data {path}: {expected}")
    data, labels = obj["data"], obj["labels"]
    ok = (isinstance(data, torch.Tensor) and isinstance(labels, torch.Tensor) and data.ndim == 2
          and data.shape[1] == 2 and data.is_floating_point() and labels.ndim == 1
          and not labels.is_floating_point() and len(labels) == len(data) and len(data) > 0
          and bool(torch.isfinite(data).all()) and int(labels.min()) >= 0)
    if not ok:
        shapes = f"data {tuple(getattr(data, 'shape', ()))}, labels {tuple(getattr(labels, 'shape', ()))}"
        raise UsageError(f"--data {path}: {expected}, finite, labels >= 0 (got {shapes})")
    return data.float(), labels.long()


def split_points(data, labels, val_fraction=0.2, seed=0):
    """Split an external point set into train and validation parts (fixed permutation)."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(data) * val_fraction))
    v, t = perm[:n_val], perm[n_val:]
    return data[t], labels[t], data[v], labels[v]


# ----------------------------------------------------------------------------- KDE score
def kde_logpdf(points, reference, chunk=2048):
    """log p(x) under the Gaussian KDE of `reference` exactly as scipy.stats.gaussian_kde defines it:
    p(x) = (1/n) sum_i N(x; r_i, H), H = Cov(reference) * n^(-2/(d+4)) (Scott's rule; n^(-1/3) in 2-D),
    Cov with the unbiased 1/(n-1) normalisation. Computed in float64 with a log-sum-exp."""
    x = torch.as_tensor(points, dtype=torch.float64).cpu()
    r = torch.as_tensor(reference, dtype=torch.float64).cpu()
    n, d = r.shape
    cov = torch.cov(r.T).reshape(d, d) * n ** (-2.0 / (d + 4))
    L = torch.linalg.cholesky(cov)
    rw = torch.linalg.solve_triangular(L, r.T, upper=False).T  # whitened reference
    log_norm = -torch.log(torch.diagonal(L)).sum() - 0.5 * d * math.log(2 * math.pi) - math.log(n)
    out = []
    for xc in x.split(chunk):
        xw = torch.linalg.solve_triangular(L, xc.T, upper=False).T
        sq = torch.cdist(xw, rw).square()
        out.append(torch.logsumexp(-0.5 * sq, dim=1) + log_norm)
    return torch.cat(out)


def nll_score(points, reference):
    """Mean of -log p(x) over `points`, p the Gaussian KDE (Scott's bandwidth) of `reference`."""
    return float(-kde_logpdf(points, reference).mean())


# ----------------------------------------------------------------------------- image datasets
IMAGE_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "emnist-balanced": "EMNIST"}
# EMNIST "balanced": 47 classes, index -> character as in the official emnist-balanced-mapping.txt. Upper and lower
# case letters that look alike (c, i, j, k, l, m, o, p, s, u, v, w, x, y, z) are merged into the upper-case class.
EMNIST_BALANCED_CLASSES = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("abdefghnqrt")
_RAW_FILES = {
    "EMNIST": ["emnist-balanced-train-images-idx3-ubyte", "emnist-balanced-train-labels-idx1-ubyte",
               "emnist-balanced-test-images-idx3-ubyte", "emnist-balanced-test-labels-idx1-ubyte"],
    "MNIST": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
    "FashionMNIST": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"],
    "CIFAR10": ["cifar-10-batches-py/data_batch_1..5", "cifar-10-batches-py/test_batch"],
}


def load_image_dataset(name="mnist", root="./data", train=True, val_size=5000, seed=0):
    """Images as a float tensor in [-1, 1] (N, C, H, W) and int64 labels, loaded through torchvision.
    name: mnist, fashion-mnist, cifar10 or emnist-balanced (upright; classes in EMNIST_BALANCED_CLASSES).

    train=True returns (x_train, y_train, x_val, y_val) with `val_size` images held out of the
    training split by a fixed permutation; train=False returns (x_test, y_test).
    torchvision's download=True finds files already in root/<Name>/raw and touches no network; when
    they are missing and the network is unreachable the error names the folder and the files.
    """
    import torchvision
    if name not in IMAGE_DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    cls_name = IMAGE_DATASETS[name]
    cls = getattr(torchvision.datasets, cls_name)
    extra = {"split": "balanced"} if cls_name == "EMNIST" else {}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints download chatter to stdout
            ds = cls(root, train=train, download=True, **extra)
    except Exception as e:
        folder = os.path.join(root, cls_name, "raw") if cls_name != "CIFAR10" else root
        raise UsageError(f"{name} not found under {folder} (looked for {', '.join(_RAW_FILES[cls_name])}) "
                         f"and the download failed ({type(e).__name__}); pass --data-root to the folder "
                         f"that holds {cls_name}/") from None
    data = torch.as_tensor(np.asarray(ds.data))
    x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # CIFAR is stored N x H x W x C
    if cls_name == "EMNIST":  # EMNIST stores each image transposed (column-major): swap H and W to stand it upright
        x = x.transpose(2, 3)
    x = x.float().div(127.5).sub(1.0)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if not train:
        return x, y
    if not 0 <= val_size < len(x):
        raise UsageError(f"validation size {val_size} must be below the {len(x)} training images")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    v, t = perm[:val_size], perm[val_size:]
    return x[t], y[t], x[v], y[v]

"""common.py: the building blocks every script shares: the command line, the device, image data and plots. The
run itself (its folder, how it ends, checkpoints, what surrounds a training loop) is harness.py. No models, samplers
or metrics of one method live here."""
import argparse
import gzip
import math
import os
import struct
import sys

import torch
import matplotlib

matplotlib.use("Agg")  # scripts run headless: write PNGs, never open windows
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


# ----------------------------------------------------------------------------- command line
class UsageError(Exception):
    """Bad input found after parsing (missing data, a wrong or corrupt file): one line on stderr, exit code 2."""


def make_parser(doc, presets=None):
    """The flags every script has. `presets` maps names to flag defaults: the first is the default configuration,
    --quick selects 'quick', --preset any other; a flag given on the command line always wins."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {rank_tag()}{message} (see --help)\n")  # one line, no usage
    p.presets, named = presets or {}, [k for k in presets or {} if k != "quick"]
    if len(named) > 1:
        p.add_argument("--preset", choices=named, default=named[0], help="the configuration whose defaults apply")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds on a CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps or cpu")
    p.add_argument("--out", default="outputs", help="root folder; the run goes to OUT/<script>/<run-id>/")
    p.add_argument("--run-id", default=None, help="name of the run folder; a timestamp when not given")
    return p


def rank_tag(env=os.environ):
    """'rank N: ' in a process of a torchrun launch of several (each checks the same input: its error says which rank
    failed first), else ''."""
    return f"rank {env.get('RANK', '0')}: " if env.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") else ""


def parse(p, argv=None):
    """Parse with the chosen preset's defaults; then make sure --out can take the run, before any work is done."""
    if p.presets:
        p.set_defaults(**next(iter(p.presets.values())))
        first = p.parse_known_args(argv)[0]
        p.set_defaults(**p.presets["quick" if first.quick else getattr(first, "preset", next(iter(p.presets)))])
    args = p.parse_args(argv)
    given = {tok.split("=")[0] for tok in (sys.argv[1:] if argv is None else argv) if tok.startswith("--")}
    args.explicit = sorted(a.dest for a in p._actions if given & set(a.option_strings))  # the flags typed
    probe = os.path.abspath(args.out)
    while not os.path.exists(probe):  # the nearest folder that exists must take a new entry
        probe = os.path.dirname(probe)
    if not (os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)):
        p.error(f"--out {args.out}: cannot write there ({probe} is {'read-only' if os.path.isdir(probe) else 'a file'}"
                ")")
    return args


def num(kind=int, lo=None, hi=None, open_lo=False):
    """An argparse type: an int, or a finite float, in [lo, hi] ((lo, hi] with open_lo)."""
    def parse_num(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}")
        if not (math.isfinite(v) and (lo is None or v > lo or v == lo and not open_lo) and (hi is None or v <= hi)):
            low, high = "-inf" if lo is None else lo, "inf" if hi is None else hi
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_lo else '['}{low}, {high}], got {s}")
        return v
    return parse_num


def num_list(*bounds, **kw):
    """Comma-separated numbers, each checked as by num(*bounds): "64,128,256" -> (64, 128, 256); "" -> ()."""
    return lambda s: tuple(map(num(*bounds, **kw), s.split(","))) if s.strip() else ()


# ----------------------------------------------------------------------------- device
def get_device(name="auto"):
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if not (name == "cpu" or name == "cuda" and torch.cuda.is_available() or name == "mps" and mps):
        raise UsageError(f"--device {name}: not available on this machine (try --device auto)")
    return torch.device(name)


# ----------------------------------------------------------------------------- image data
# name -> torchvision's folder in <data-root>, and its training and test file prefixes
DATASETS = {"mnist": ("MNIST", "train", "t10k"), "fashion-mnist": ("FashionMNIST", "train", "t10k"),
            "emnist-balanced": ("EMNIST", "emnist-balanced-train", "emnist-balanced-test")}


def read_idx(path):
    """An IDX file, plain or .gz (the MNIST format: 0, 0, 0x08 for bytes, ndim, the sizes, then the bytes)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    n = raw[3] if len(raw) > 4 and raw[:3] == b"\0\0\x08" else 0
    dims = struct.unpack(f">{n}I", raw[4:4 + 4 * n]) if n and len(raw) >= 4 + 4 * n else ()
    if not dims or len(raw) != 4 + 4 * n + math.prod(dims):
        raise UsageError(f"{path} is truncated or not an IDX file of bytes")
    return torch.frombuffer(bytearray(raw[4 + 4 * n:]), dtype=torch.uint8).reshape(dims)


def load_image_dataset(name="mnist", root="./data", train=True, val_size=5000, seed=0):
    """Images (N, 1, 28, 28) in [-1, 1] and int64 labels from root/<folder>/raw in torchvision's layout (torchvision
    downloads them there once). train=True: (x, y, x_val, y_val), `val_size` images held out by a fixed permutation;
    train=False: the test split."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    folder, prefix = DATASETS[name][0], DATASETS[name][1 if train else 2]
    raw, files = os.path.join(root, folder, "raw"), [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [os.path.join(raw, f + ("" if os.path.isfile(os.path.join(raw, f)) else ".gz")) for f in files]
    if not all(map(os.path.isfile, paths)):
        raise UsageError(f"{name} not found in {raw} (looked for {' and '.join(files)}, plain or .gz); --data-root "
                         f"names the folder that holds {folder}/ (torchvision.datasets.{folder}(root, download=True) "
                         f"fetches it)")
    x, y = (read_idx(p) for p in paths)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UsageError(f"{raw}: {tuple(x.shape)} images do not match {tuple(y.shape)} labels")
    x, y = (x.transpose(1, 2) if folder == "EMNIST" else x).unsqueeze(1).float() / 127.5 - 1, y.long()  # EMNIST glyphs
    if not train:                                                                               # are stored transposed
        return x, y
    if not 0 <= val_size < len(x):
        raise UsageError(f"validation size {val_size} must be below the {len(x)} training images")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[val_size:]], y[perm[val_size:]], x[perm[:val_size]], y[perm[:val_size]]


# ----------------------------------------------------------------------------- plots
def save_fig(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panels(path, panels, ncols=None, size=(4.5, 3.5)):
    """Panels side by side, `ncols` a row (default: one row). A panel is a dict: curves {label: (xs, ys[, style])}
    (style: a format string, then a dict of keywords for plot), and optionally title, xlabel, ylabel, logx, logy,
    band (xs, lo, hi: shaded) and floor (a dashed line at that y: the real-data floor of a score)."""
    ncols = ncols or len(panels)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels):
        for label, (xs, ys, *style) in p["curves"].items():
            ax.plot(xs, ys, *style[:1], label=label, **(style[1] if len(style) > 1 else {}))
        if p.get("band") is not None:
            ax.fill_between(*p["band"], alpha=0.25, label="+- 1 sigma")
        if p.get("floor") is not None:
            ax.axhline(p["floor"], color="k", ls="--", lw=0.8, label="real-data floor")
        ax.set(title=p.get("title", ""), xlabel=p.get("xlabel", ""), ylabel=p.get("ylabel", ""),
               xscale="log" if p.get("logx") else "linear", yscale="log" if p.get("logy") else "linear")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_fig(fig, path)


def plot_curves(path, curves, xlabel="step", ylabel="loss", title="", logy=True):
    """curves: {name: (xs, ys)} on one axis."""
    plot_panels(path, [dict(curves=curves, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy)], size=(6, 4))


def image_grid(path, images, nrow, title="", row_labels=None):
    """images: (N, 1, H, W) in [-1, 1], `nrow` per row; row_labels name the rows."""
    from torchvision.utils import make_grid
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow, normalize=True, value_range=(-1, 1), pad_value=1)
    rows = math.ceil(len(images) / nrow)
    fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.6, 0.5 * rows + 0.6))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set(xticks=[], title=title, yticks=[grid.shape[1] / rows * (r + 0.5) for r in range(rows)] if row_labels else [])
    ax.set_yticklabels(row_labels or [])
    save_fig(fig, path)


def image_row(path, panels, title):
    """A row of images: (image, H x W after squeeze; caption; imshow options, where colorbar=True adds a bar)."""
    bars = [kw.get("colorbar", False) for _, _, kw in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels) + 0.4 * sum(bars), 2.1), squeeze=False)
    for ax, (img, name, kw), bar in zip(axes[0], panels, bars):
        im = ax.imshow(torch.as_tensor(img).squeeze().numpy(), interpolation="nearest",
                       **{k: v for k, v in kw.items() if k != "colorbar"})
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        if bar:
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    save_fig(fig, path)


def figure_network(path, net, inputs, title):
    """A network's layers as boxes, one row per resolution, in the order forward hooks on its named children see them
    run on `inputs`; a dashed arrow for a skip: an earlier layer's output found, tensor for tensor, in a layer's input.
    Returns the rows (name, kind, c_in, c_out, resolution, index of the skip's source or None)."""
    names, rows, outs = {m: name for name, m in net.named_children()}, [], []

    def hook(mod, inp, out):
        if out.ndim == 4:  # an image layer, not an embedding MLP
            h, c = inp[0], outs[-1].shape[1] if outs else 1
            kinds = {torch.nn.Conv2d: "conv", torch.nn.ConvTranspose2d: "convT", torch.nn.Sequential: "GN+SiLU+conv"}
            kind = kinds.get(type(mod), type(mod).__name__) + (" s2" if getattr(mod, "stride", None) == (2, 2) else "")
            src = next((j for j in reversed(range(len(outs))) if torch.equal(outs[j], h[:, c:])), None)
            rows.append((names[mod], kind, h.shape[1], out.shape[1], out.shape[-1], src))
            outs.append(out)
    hooks = [m.register_forward_hook(hook) for m in names]
    with torch.no_grad():
        net(*inputs)
    for h in hooks:
        h.remove()
    levels = sorted({r[4] for r in rows}, reverse=True)
    xy = [(1.25 * i, -1.6 * levels.index(r[4])) for i, r in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(len(rows) + 0.5, 4.6))
    for i, (name, kind, cin, cout, res, src) in enumerate(rows):
        ax.text(*xy[i], f"{name}\n{kind}\n{cin}->{cout}\n{res}x{res}", ha="center", va="center", fontsize=6.5,
                bbox=dict(boxstyle="round", ec="k", fc={"ResBlock": "#fdc", "convT s2": "#dce"}.get(kind, "#cde")))
        if i:
            ax.annotate("", xy[i], xy[i - 1], arrowprops=dict(arrowstyle="->", shrinkA=22, shrinkB=22))
        if src is not None:
            ax.annotate("", (xy[i][0], xy[i][1] + 0.45), (xy[src][0], xy[src][1] + 0.45), arrowprops=dict(
                arrowstyle="->", color="C3", connectionstyle="arc3,rad=-0.25", ls="--"))
    ax.set(xlim=(-0.8, 1.25 * len(rows) - 0.4), ylim=(-1.6 * len(levels) + 0.8, 2.9), aspect="equal")
    ax.axis("off")
    ax.set_title(f"{title} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters); dashed: skip "
                 "concatenation", fontsize=9)
    save_fig(fig, path)
    return rows


def progress_bar(iterable=None, **kw):
    return tqdm(iterable, mininterval=1.0, dynamic_ncols=True, **kw)

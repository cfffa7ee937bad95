"""Regenerate the README's pictures (docs/img/*.png, each under 150 KB) from finished runs.

Usage: python tools/readme_figures.py [--out outputs] [--run SCRIPT=RUN_ID ...] [--data-root DATA]
By default each picture comes from the newest completed run of its script under --out; --run pins one. A script with
no completed run is skipped with a note. The DDIM strip is drawn anew from the ddpm_mnist_cfg run's checkpoint
(the same x_T decoded at several step counts), which takes a few seconds on a CPU.
"""
import argparse
import glob
import json
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import matplotlib.pyplot as plt  # noqa: E402

IMG = os.path.join(ROOT, "docs", "img")


def newest(out, script, pinned):
    """The run folder of `script`: the pinned one, or the newest with status completed."""
    if script in pinned:
        return os.path.join(out, script, pinned[script])
    done = [d for d in glob.glob(os.path.join(out, script, "*")) if os.path.isfile(os.path.join(d, "status.json"))
            and json.load(open(os.path.join(d, "status.json"))).get("state") == "completed"]
    return max(done, key=os.path.getmtime) if done else None


def save(fig, name):
    path = os.path.join(IMG, name)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"{path}: {os.path.getsize(path) // 1024} KB")


def states(run_u, run_g):
    """The unconditional samples, and the guided ones coloured by requested state, over the training outline."""
    import ddpm_states
    cfg = json.load(open(os.path.join(run_u, "config.json")))
    x, _ = ddpm_states.make_states(cfg["n_per_state"], cfg["seed"]) if not cfg["data"] else ddpm_states.load_points(
        cfg["data"])
    panels = [("DDPM samples", [torch.load(os.path.join(run_u, "uncond_gen_samples.pt"))])]
    if run_g:
        panels.append(("classifier guidance, one colour per requested state",
                       [torch.load(f) for f in sorted(glob.glob(os.path.join(run_g, "cond_gen_samples_*.pt")))]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4))
    for ax, (title, sets) in zip(axes if len(panels) > 1 else [axes], panels):
        for k, s in enumerate(sets):
            ax.scatter(*s[:1500].T, s=0.6, c="C0" if len(sets) == 1 else f"C{k}", alpha=0.5, rasterized=True)
        ax.scatter(*x.T, s=0.1, c="k", alpha=0.3, rasterized=True)
        ax.set(xlim=(-2.8, 2.8), ylim=(-2.8, 2.8), aspect="equal", xticks=[], yticks=[], title=title)
        ax.title.set_fontsize(8)
    save(fig, "states.png")


def image_rows(rows, titles, name, title, scale=0.45):
    """Rows of 28 x 28 images (tensors N x 1 x 28 x 28 in [-1, 1]) with a label per row."""
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(scale * n + 0.8, scale * len(rows) + 0.4), squeeze=False)
    for i, (r, t) in enumerate(zip(rows, titles)):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(r[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axes[i][0].text(-4, 14, t, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save(fig, name)


def mnist_grid(run):
    x, y = torch.load(os.path.join(run, "samples.pt")), torch.load(os.path.join(run, "labels.pt"))
    w = json.load(open(os.path.join(run, "metrics.json"))).get("w", 2)
    image_rows([x[y == k][:10] for k in range(10)], [str(k) for k in range(10)], "mnist_grid.png",
               f"ddpm_mnist_cfg.py: one row per requested digit, w = {w:g}")


def ddim_strip(run):
    """The same ten x_T (digits 0..9) decoded by DDIM (eta 0) at several step counts, and by the T-step DDPM."""
    import ddim_sample
    import ddpm_mnist_cfg
    model, sched, cfg = ddpm_mnist_cfg.load_eps_model(os.path.join(run, "checkpoint.pt"), "cpu")
    T = cfg["T"]
    gen, y = torch.Generator().manual_seed(0), torch.arange(10)
    x_T = torch.randn((10, 1, 28, 28), generator=gen)
    rows, titles = [], []
    for S in [s for s in (10, 20, 50, 100) if s < T] + [T]:
        rows.append(ddim_sample.ddim_sample(model, sched, ddim_sample.timesteps(T, S), y, 2.0, 0.0, x_T).clamp(-1, 1))
        titles.append(f"DDIM {S}")
    rows.append(ddim_sample.ddim_sample(model, sched, ddim_sample.timesteps(T, T), y, 2.0, 1.0, x_T,
                                        torch.Generator().manual_seed(1)).clamp(-1, 1))
    titles.append(f"DDPM {T}")
    image_rows(rows, titles, "ddim_strip.png", "ddim_sample.py: the same x_T per column, decoded with more steps")


def posterior(run):
    rows, titles = [], []
    for f in sorted(glob.glob(os.path.join(run, "draws_obs*.pt")), reverse=True):
        d = torch.load(f)
        seen = torch.where(d["mask"].bool(), d["y"], torch.zeros_like(d["y"]))
        rows.append(torch.cat([d["x_true"], seen, d["draws"][:8]]))
        titles.append(f"{100 * float(d['mask'].mean()):.0f}% seen")
    cfg = json.load(open(os.path.join(run, "config.json")))
    image_rows(rows, titles, "posterior.png", f"edm_posterior.py ({cfg['guidance']}): the digit, what is seen "
               f"(grey: hidden), eight posterior draws")


def emnist(run):
    import emnist_ddp
    x, y = torch.load(os.path.join(run, "samples.pt")), torch.load(os.path.join(run, "labels.pt"))
    classes = emnist_ddp.CLASSES
    rows = [torch.cat([x[y == k][:1] for k in range(i, min(i + 16, len(classes)))]) for i in range(0, len(classes), 16)]
    image_rows(rows, ["" for _ in rows], "emnist_chars.png", "emnist_ddp.py: one sample per class, in class order "
               f"({''.join(classes)})", scale=0.4)
    if os.path.isfile(os.path.join(run, "chars.png")):  # the run's --chars grid, as it drew it
        shutil.copyfile(os.path.join(run, "chars.png"), os.path.join(IMG, "emnist_string.png"))
        print(f"{os.path.join(IMG, 'emnist_string.png')}: copied from {run}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "outputs"), help="the runs' root folder")
    p.add_argument("--run", action="append", default=[], help="SCRIPT=RUN_ID: use this run of SCRIPT")
    args = p.parse_args()
    pinned = dict(r.split("=", 1) for r in args.run)
    os.makedirs(IMG, exist_ok=True)
    jobs = [("ddpm_states", lambda r: states(r, newest(args.out, "classifier_guidance_states", pinned))),
            ("ddpm_mnist_cfg", mnist_grid), ("ddpm_mnist_cfg", ddim_strip), ("edm_posterior", posterior),
            ("emnist_ddp", emnist)]
    for script, fn in jobs:
        run = newest(args.out, script, pinned)
        if run is None:
            print(f"{script}: no completed run under {args.out}; its picture is left as it is")
            continue
        fn(run)


if __name__ == "__main__":
    main()

"""svd_posterior.py: the intrinsic dimension of a diffusion posterior, from the SVD of an ensemble of its draws.

For each observed fraction (--observed 0.7,0.2) edm_posterior.py's sampler draws N = --n-samples posterior samples of
the same masked test digit. On the [0, 1] pixel scale they are the columns of the snapshot matrix
  X = [x_1 ... x_N] in R^(784 x N),   X = U S V^T,   s_1 >= s_2 >= ... >= 0,
and we report
  normalised spectrum  s_i / s_1
  cumulative energy    E_k = sum_{i<=k} s_i^2 / sum_i s_i^2
  k95, k99             the smallest k with E_k >= 0.95 (0.99)
  participation ratio  PR = (sum_i s_i^2)^2 / sum_i s_i^4    (1 for rank one, n for n equal singular values)
for two matrices: the raw X, as the analysis this reproduces did, and the mean-subtracted X - mean_j(x_j) 1^T. The raw
X is dominated by its mean (every draw is the same digit), so its first direction is the posterior mean and PR stays
near 1; only the centred matrix measures how the draws differ from each other, i.e. the posterior's own spread:
that is the intrinsic dimension. The top left singular vectors of the centred X are the posterior's main modes of
variation (figure modes_*.png).

Draws are made in batches, each from its own seed, and saved after every batch: rerunning with the same --run-id
resumes where it stopped. Writes snapshots_<tag>.pt (X, raw and centred singular values, the draws), svd_table.md,
svd_table.json, svd_spectrum.png, modes_<tag>.png and the usual config/metrics/status.json.

Usage: python svd_posterior.py --checkpoint outputs/edm_mnist/RUN/checkpoint.pt [--n-samples 1024] [--observed 0.7,0.2]
       (every flag of edm_posterior.py's observation and sampler applies)
"""
import json
import os
import time

import torch

import common
import edm_posterior as P
import evaluate

SCRIPT = "svd_posterior"
PRESETS = {"full": dict(n_samples=1024, steps=80, judge_epochs=None),
           "quick": dict(n_samples=32, steps=8, judge_epochs=0.05)}
REFERENCE = {"obs70": {"k95": "1-3", "k99": None, "participation_ratio": "~1"},  # the reference analysis (raw X)
             "obs20": {"k95": 45, "k99": 152, "participation_ratio": 1.72}}


# ----------------------------------------------------------------------------- sampling (batched, resumable)
def ensemble(D, y, mask, args, seed, path, key, device, progress):
    """args.n_samples draws; `path` keeps the finished batches so an interrupted run continues. Batch b has seed + b, the
    same as one call of edm_posterior.draw with all of them, so a resumed ensemble equals an uninterrupted one."""
    done = []
    if os.path.isfile(path):
        part = torch.load(path, weights_only=False)
        if part.get("key") != key:
            raise common.UsageError(f"{path} holds draws of another configuration; use a new --run-id")
        done = list(part["batches"])
    sizes = [min(args.batch, args.n_samples - i) for i in range(0, args.n_samples, args.batch)]
    if len(done) > len(sizes) or any(len(b) != s for b, s in zip(done, sizes)):
        raise common.UsageError(f"{path} holds batches of another size; use a new --run-id")
    for b in range(len(done), len(sizes)):
        done.append(P.draw(D, y, mask, sizes[b], args, seed + b, device, sizes[b], f"batch {b + 1}/{len(sizes)}"))
        torch.save({"key": key, "batches": done}, path + ".tmp")
        os.replace(path + ".tmp", path)
        progress(b + 1, len(sizes))
    return torch.cat(done)


# ----------------------------------------------------------------------------- evaluation
def spectrum_stats(s):
    """k95, k99 and the participation ratio of singular values s (any order), plus the normalised spectrum."""
    s = torch.sort(torch.as_tensor(s, dtype=torch.float64), descending=True).values
    e = s ** 2
    energy = torch.cumsum(e, 0) / e.sum()

    def k_at(q):  # smallest k with E_k >= q (a hair of slack for round-off in sums of equal values)
        return int((energy < q - 1e-12).sum()) + 1
    return {"k95": k_at(0.95), "k99": k_at(0.99), "participation_ratio": float(e.sum() ** 2 / (e ** 2).sum()),
            "first_direction_energy": float(energy[0]), "normalized_top10": [round(float(v), 5) for v in s[:10] / s[0]]}


def snapshot_svd(draws):
    """X (784 x N, [0, 1] scale), the singular values of X and of Xc = X minus its column mean, and Xc's left
    singular vectors U (the posterior's principal modes)."""
    X = ((draws.reshape(len(draws), -1).double() + 1) / 2).T
    Xc = X - X.mean(1, keepdim=True)
    U, s_c, _ = torch.linalg.svd(Xc, full_matrices=False)
    return X, torch.linalg.svdvals(X), s_c, U


def figure_spectra(path, spectra):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (name, kind), s in spectra.items():
        e = s ** 2
        style = dict(ls="-" if kind == "raw" else "--", label=f"{name} {kind}")
        axes[0].plot(range(1, len(s) + 1), (s / s[0]).numpy(), **style)
        axes[1].plot(range(1, len(s) + 1), (torch.cumsum(e, 0) / e.sum()).numpy(), **style)
    axes[0].set(xscale="log", yscale="log", xlabel="index i", ylabel="s_i / s_1", title="normalised singular values",
                ylim=(1e-6, 1.5))  # below ~1e-6 only round-off: pixels equal in every draw give exact zeros
    axes[1].set(xscale="log", xlabel="k", ylabel="E_k", title="cumulative energy", ylim=(0, 1.02))
    for q in (0.95, 0.99):
        axes[1].axhline(q, color="grey", lw=0.7)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common.save_fig(fig, path)


def figure_modes(path, mean, U, s, title, k=8):
    """The posterior mean and the top-k principal directions of the centred draws (red +, blue -)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, k + 1, figsize=(1.5 * (k + 1), 2.0))
    axes[0].imshow(mean.reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("mean", fontsize=8)
    energy = s ** 2 / (s ** 2).sum()
    for i, ax in enumerate(axes[1:]):
        u = U[:, i].reshape(28, 28).numpy()
        lim = abs(u).max()
        ax.imshow(u, cmap="bwr", vmin=-lim, vmax=lim)
        ax.set_title(f"u{i + 1} ({100 * float(energy[i]):.0f}%)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    common.save_fig(fig, path)


def markdown_table(rows):
    head = ("| setting | matrix | k95 | k99 | participation ratio | first direction's energy | reference (raw) |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ref = REFERENCE.get(r["setting"], {})
        ref_s = ", ".join(f"{k} {v}" for k, v in ref.items() if v is not None) if r["matrix"] == "raw" else ""
        lines.append(f"| {r['setting']} | {r['matrix']} | {r['k95']} | {r['k99']} | {r['participation_ratio']:.3f} | "
                     f"{r['first_direction_energy']:.4f} | {ref_s} |")
    return head + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args():
    p = common.make_parser(__doc__)
    P.add_posterior_args(p)
    p.add_argument("--n-samples", type=common.positive_int, help="posterior draws N per setting (columns of X)")
    first, _ = p.parse_known_args()
    p.set_defaults(**PRESETS["quick" if first.quick else "full"])
    args = p.parse_args()
    P.check_args(p, args)
    return args


def main():
    args = parse_args()
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    D = P.load_prior(args, device)
    x_true = P.ground_truth(args.dataset, args.data_root, args.digit, args.index)
    run = common.Run(SCRIPT, args)
    judge = evaluate.get_judge(args.dataset, args.data_root, args.out, "cpu", args.judge_epochs)["model"]
    run.log(device=str(device), digit=args.digit, guidance=args.guidance, steps=args.steps, n_samples=args.n_samples)
    rows, spectra, posterior = [], {}, {}
    for e, observed in enumerate(args.observed):
        name = P.tag(observed)
        mask = P.make_mask(args.mask, observed, args.mask_seed)
        y = P.observe(x_true, mask, args.measurement_noise, args.mask_seed)
        key = json.dumps({k: getattr(args, k) for k in ("checkpoint", "mask", "mask_seed", "digit", "index", "seed",
                          "measurement_noise", "guidance", "lambda_max", "lambda_min", "power", "likelihood_sigma",
                          "noise_aware_c", "zeta", "steps", "batch")} | {"observed": observed})
        t0, nb, snap = time.time(), -(-args.n_samples // args.batch), run.path(f"snapshots_{name}.pt")
        done = torch.load(snap, weights_only=False) if os.path.isfile(snap) else {}
        if done.get("key") == key:  # this setting finished in an earlier run: reuse its draws
            draws = done["draws"]
        else:
            draws = ensemble(D, y, mask, args, args.seed + 1000 * e, run.path(f"partial_{name}.pt"), key, device,
                             lambda b, _: run.progress(f"draws {name}", e * nb + b, len(args.observed) * nb, True))
        secs = time.time() - t0
        X, s_raw, s_c, U = snapshot_svd(draws)
        torch.save({"key": key, "X": X.float(), "s_raw": s_raw, "s_centered": s_c, "draws": draws, "x_true": x_true,
                    "mask": mask}, snap)
        if os.path.isfile(run.path(f"partial_{name}.pt")):
            os.remove(run.path(f"partial_{name}.pt"))  # the snapshots file now holds every draw
        for kind, s in (("raw", s_raw), ("centered", s_c)):
            spectra[(name, kind)] = s
            rows.append({"setting": name, "observed_fraction": observed, "matrix": kind, **spectrum_stats(s)})
        m, _, _ = P.posterior_metrics(draws, x_true, y, mask, args.digit, judge)
        posterior[name] = {**m, "seconds": round(secs, 1)}
        run.log(svd=rows, posterior=posterior, reference=REFERENCE)
        figure_modes(run.path(f"modes_{name}.png"), X.mean(1), U, s_c,
                     f"{100 * observed:.0f}% observed: posterior mean and principal modes of the draws")
        figure_spectra(run.path("svd_spectrum.png"), spectra)
        print(f"{name}: " + "; ".join(f"{r['matrix']} k95 {r['k95']} k99 {r['k99']} PR {r['participation_ratio']:.3f}"
                                      for r in rows[-2:]) + f" ({secs:.0f} s for {len(draws)} draws)")
    with open(run.path("svd_table.md"), "w") as f:
        f.write(f"Posterior ensembles: N = {args.n_samples} draws, digit {args.digit}, {args.mask} mask, "
                f"{args.guidance} guidance, {args.steps} steps, [0, 1] pixel scale.\n\n" + markdown_table(rows))
    with open(run.path("svd_table.json"), "w") as f:
        json.dump({"rows": rows, "reference": REFERENCE}, f, indent=2)
    run.finish()
    print(markdown_table(rows) + f"wrote {run.dir}")


if __name__ == "__main__":
    common.run_main(main)

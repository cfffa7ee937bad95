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

Draws are made in batches, each from its own seed, and saved after every batch with the settings they were drawn
with (every flag the draws depend on): rerunning with the same --run-id resumes where it stopped, and a file of other
settings is refused. Writes snapshots_<tag>.pt (X, raw and centred singular values, the draws), svd_table.md,
svd_table.json, svd_spectrum.png, modes_<tag>.png and the usual config/metrics/status.json.

Usage: python svd_posterior.py --checkpoint outputs/edm_mnist/RUN/checkpoint.pt [--n-samples 1024] [--observed 0.7,0.2]
       (every flag of edm_posterior.py's observation and sampler applies)
"""
import json
import os
import time

import torch

import common
import harness
import edm_posterior
import evaluate

SCRIPT = "svd_posterior"
PRESETS = {"full": dict(n_samples=1024, sample_steps=18, judge_epochs=None),
           "quick": dict(n_samples=32, sample_steps=8, judge_epochs=0.05)}
REFERENCE = {"obs70": {"k95": "1-3", "k99": None, "participation_ratio": "~1"},  # the reference analysis (raw X)
             "obs20": {"k95": 45, "k99": 152, "participation_ratio": 1.72}}


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
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
# ==== end of core ====


# ----------------------------------------------------------------------------- sampling (batched, resumable)
def draw_settings(args, observed, seed):
    """What one setting's draws depend on: every flag but the run's place, the device and the judge's budget, plus
    its fraction and seed. Saved with the draws; a rerun with other settings is refused."""
    skip = ("out", "run_id", "device", "explicit", "data_root", "judge_epochs", "quick", "observed")
    return {**{k: v for k, v in vars(args).items() if k not in skip}, "observed": observed, "seed": seed}


def load_saved(path, settings):
    """What an earlier run left at `path` (a snapshots_ or partial_ file), or None when there is none. A corrupt file
    or one drawn with other settings is a one-line UsageError naming it."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise common.UsageError(f"cannot read {path}: truncated or not a torch file ({type(e).__name__}); delete it "
                                f"to draw again") from None
    if not isinstance(saved, dict) or "settings" not in saved:
        raise common.UsageError(f"{path} is not a file of this version of {SCRIPT}; delete it to draw again")
    other = sorted(k for k in {**settings, **saved["settings"]} if settings.get(k) != saved["settings"].get(k))
    if other:
        raise common.UsageError(f"{path} holds draws of other settings ({', '.join(other)} differ); use a new --run-id")
    return saved


def ensemble(D, y, mask, args, seed, path, settings, done, device, progress):
    """args.n_samples draws, continuing the finished batches `done`; after each batch `path` keeps them all. Batch b
    has seed + b, the same as one call of edm_posterior.draw with all of them, so a resumed ensemble equals an
    uninterrupted one."""
    done = list(done)
    sizes = [min(args.sample_batch, args.n_samples - i) for i in range(0, args.n_samples, args.sample_batch)]
    for b in range(len(done), len(sizes)):
        done.append(edm_posterior.draw(D, y, mask, sizes[b], args, seed + b, device, sizes[b],
                                       f"batch {b + 1}/{len(sizes)}", clamp=not args.exact_prior))
        harness.save_atomic({"settings": settings, "batches": done}, path)
        progress(b + 1, len(sizes))
    return torch.cat(done)


# ----------------------------------------------------------------------------- evaluation
def exact_spectra(prior, mask, y):
    """For the exact Gaussian prior, the spectra the draws estimate, from the exact posterior (mean m, covariance S)
    on the [0, 1] scale: raw X X^T / N -> S + m m^T, centred -> S (square roots of their eigenvalues)."""
    obs = mask.flatten().bool()
    m, S = prior.posterior(obs, y.flatten()[obs])
    m, S = (m + 1) / 2, S / 4
    return {kind: torch.linalg.eigvalsh(M).clamp(min=0).sqrt() for kind, M in
            (("raw, exact", S + torch.outer(m, m)), ("centered, exact", S))}


def figure_spectra(path, spectra):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (name, kind), s in spectra.items():
        e = s ** 2
        style = dict(ls="-" if kind.startswith("raw") else "--", lw=2.5 if "exact" in kind else 1.2,
                     alpha=0.5 if "exact" in kind else 1.0, label=f"{name} {kind}")
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
    energy, modes = s ** 2 / (s ** 2).sum(), U[:, :k].T.reshape(-1, 28, 28)
    lims = [float(u.abs().max()) for u in modes]  # a symmetric colour scale per direction: white is 0
    common.image_row(path, [(mean.reshape(28, 28), "mean", dict(cmap="gray", vmin=0, vmax=1))] + [
        (u, f"u{i + 1} ({100 * float(energy[i]):.0f}%)", dict(cmap="bwr", vmin=-lim, vmax=lim))
        for i, (u, lim) in enumerate(zip(modes, lims))], title)


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
def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    edm_posterior.add_posterior_args(p)
    p.add_argument("--n-samples", type=common.num(int, 1, 10**6), help="posterior draws N per setting (columns of X)")
    args = common.parse(p, argv)
    edm_posterior.check_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = common.get_device(args.device)
    torch.manual_seed(args.seed)
    D, x_true = edm_posterior.load_inputs(args, device)  # bad input is found before the run folder exists
    settings = [draw_settings(args, observed, args.seed + 1000 * e) for e, observed in enumerate(args.observed)]
    old = os.path.join(args.out, SCRIPT, args.run_id) if args.run_id else None  # a rerun continues what is there
    saved = [[old and load_saved(os.path.join(old, f"{kind}_{edm_posterior.tag(o)}.pt"), s)
              for kind in ("snapshots", "partial")] for o, s in zip(args.observed, settings)]
    run = harness.Run(SCRIPT, args)
    judge = evaluate.get_judge(args.dataset, args.data_root, args.out, "cpu", args.judge_epochs)["model"]
    run.log(device=str(device), digit=args.digit, guidance=args.guidance, sample_steps=args.sample_steps,
            n_samples=args.n_samples)
    rows, spectra, posterior = [], {}, {}
    for e, observed in enumerate(args.observed):
        name = edm_posterior.tag(observed)
        mask = edm_posterior.make_mask(args.mask, observed, args.mask_seed)
        y = edm_posterior.observe(x_true, mask, args.measurement_noise, args.mask_seed)
        t0, nb, (snap, part) = time.time(), -(-args.n_samples // args.sample_batch), saved[e]
        if snap:  # this setting finished in an earlier run: reuse its draws
            draws = snap["draws"]
        else:
            draws = ensemble(D, y, mask, args, settings[e]["seed"], run.path(f"partial_{name}.pt"), settings[e],
                             part["batches"] if part else [], device,
                             lambda b, _: run.progress(f"draws {name}", e * nb + b, len(args.observed) * nb, True))
        secs = time.time() - t0
        X, s_raw, s_c, U = snapshot_svd(draws)
        harness.save_atomic({"settings": settings[e], "X": X.float(), "s_raw": s_raw, "s_centered": s_c,
                             "draws": draws, "x_true": x_true, "mask": mask}, run.path(f"snapshots_{name}.pt"))
        if os.path.isfile(run.path(f"partial_{name}.pt")):
            os.remove(run.path(f"partial_{name}.pt"))  # the snapshots file now holds every draw
        spectra_e = exact_spectra(D, mask, y) if args.exact_prior else {}
        for kind, s in (("raw", s_raw), ("centered", s_c), *spectra_e.items()):
            spectra[(name, kind)] = s
            rows.append({"setting": name, "observed_fraction": observed, "matrix": kind, **spectrum_stats(s)})
        m, _, _ = edm_posterior.posterior_metrics(draws, x_true, y, mask, args.digit, judge)
        posterior[name] = {**m, "seconds": round(secs, 1)}
        run.log(svd=rows, posterior=posterior, reference=REFERENCE)
        figure_modes(run.path(f"modes_{name}.png"), X.mean(1), U, s_c,
                     f"{100 * observed:g}% observed: posterior mean and principal modes of the draws")
        figure_spectra(run.path("svd_spectrum.png"), spectra)
        print(f"{name}: " + "; ".join(f"{r['matrix']} k95 {r['k95']} k99 {r['k99']} PR {r['participation_ratio']:.3f}"
                                      for r in rows[-2:]) + f" ({secs:.0f} s for {len(draws)} draws)")
    with open(run.path("svd_table.md"), "w") as f:
        f.write(f"Posterior ensembles: N = {args.n_samples} draws, digit {args.digit}, {args.mask} mask, "
                f"{args.guidance} guidance, {args.sample_steps} steps, [0, 1] pixel scale.\n\n" + markdown_table(rows))
    with open(run.path("svd_table.json"), "w") as f:
        json.dump({"rows": rows, "reference": REFERENCE}, f, indent=2)
    run.finish()
    print(markdown_table(rows) + f"wrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

"""posterior_calibration.py: edm_posterior.py's samplers on priors whose posterior is known exactly.

A sampler of p(x | y) is only as good as the posterior it draws from, and with a trained prior nobody knows the
right answer. Here the prior is one whose denoiser and posterior are closed forms, and the samplers are
edm_posterior.py's own code, called with the exact denoiser in place of the trained one (the same D(x, sigma) call):

  Gaussian   x0 ~ N(mu, C):   D(x, sigma) = E[x0 | x0 + sigma eps = x] = mu + C (C + sigma^2 I)^-1 (x - mu)
             observing the pixels o of x0 as y = x0_o + sigma_y n (hidden pixels h):
             p(x0_h | y) = N(mu_h + C_ho S^-1 (y - mu_o), C_hh - C_ho S^-1 C_oh),   S = C_oo + sigma_y^2 I
  mixture    x0 ~ sum_k pi_k N(mu_k, C_k):
             D(x, sigma) = sum_k r_k(x) D_k(x, sigma),  r_k(x) = pi_k N(x; mu_k, C_k + sigma^2 I) / sum_j (...)
             p(x0 | y) = sum_k pi'_k p_k(x0 | y),  pi'_k = pi_k N(y; mu_k,o, C_k,oo + sigma_y^2 I) / sum_j (...)
             with p_k(x0 | y) the Gaussian posterior of component k (above): which mode, and with what probability,
             is part of the answer.
Every matrix is handled in its eigenbasis, C = U diag(lambda) U^T, so (C + sigma^2 I)^-1 costs two products.

Priors: `gauss2` (two pixels, std 0.5, correlation 0.9; pixel 0 observed), `gmm2` (two pixels, three components),
`gauss784` (the mean and covariance of the MNIST training digits, plus a ridge) and `gmm784` (one component per
digit class: its frequency, mean and covariance). For each sampler, step count and observed fraction it reports the
error of the posterior mean, of the per-pixel standard deviation, of the summed variance and, for a mixture, of
the mode weights (total variation between the share of draws nearest each component and pi'), next to the Monte
Carlo error that N exact draws would have.

Usage: python posterior_calibration.py --quick
       python posterior_calibration.py --data-root ../shared/data      (the whole bench: bench/posterior_calibration.sh)
"""
import json
import math
import time

import torch

import common
import harness
import edm_posterior

SCRIPT = "posterior_calibration"
PRESETS = {"default": dict(priors=("gauss2", "gmm2", "gauss784", "gmm784"), n_small=10000, n_large=200,
                           sample_steps=(18, 40, 80, 200), particles=(1, 4, 16, 64), smc_steps=80, smc_n_large=50),
           "quick": dict(priors=("gauss2", "gmm2", "gauss784"), n_small=400, n_large=16, sample_steps=(18, 40),
                         particles=(1, 4), smc_steps=18, smc_n_large=8)}
SAMPLERS = {"tweedie": dict(guidance="tweedie", cg_iters=5), "pigdm": dict(guidance="tweedie", cg_iters=0),
            "smc": dict(guidance="smc", particles=8), "dps": dict(guidance="dps"), "masked": dict(guidance="masked"),
            "none": dict(guidance="none")}
FRACTIONS = {"gauss2": (0.5,), "gmm2": (0.5,), "gauss784": (0.7, 0.2), "gmm784": (0.2, 0.05)}


# ---------------------------------------------------------------------------- exact priors
class GaussianPrior:
    """x0 ~ N(mu, C) over vectors of length d; called as D(x, sigma) on (B, d) with sigma a float or one per row."""

    def __init__(self, mu, C):
        self.mu, self.C = mu.double(), C.double()
        self.lam, self.U = torch.linalg.eigh(self.C)
        self.sigma_data = float(self.lam.mean().sqrt())  # the rms std of a pixel, for samplers that ask for it

    def _whiten(self, x, sigma):
        """(x - mu) in the eigenbasis, and lambda + sigma^2, per sample (any shape, flattened to d)."""
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        return (x.reshape(len(x), -1).double() - self.mu) @ self.U, self.lam + s2

    def __call__(self, x, sigma):
        z, var = self._whiten(x, sigma)
        return (self.mu + (z * self.lam / var) @ self.U.T).to(x.dtype).reshape(x.shape)

    def log_density(self, x, sigma=0.0):
        """log N(x; mu, C + sigma^2 I), per row."""
        z, var = self._whiten(x, sigma)
        return -0.5 * ((z ** 2 / var).sum(1) + var.log().sum(-1) + len(self.mu) * math.log(2 * math.pi))

    def sample(self, n, gen):
        z = torch.randn(n, len(self.mu), generator=gen, dtype=torch.float64)
        return self.mu + (z * self.lam.clamp(min=0).sqrt()) @ self.U.T

    def posterior(self, obs, y, sigma_y=0.0):
        """The exact p(x0 | y) for y = x0[obs] + sigma_y n: (mean, covariance) over all d pixels (the observed ones
        included: with sigma_y = 0 they equal y, with variance 0)."""
        S = self.C[obs][:, obs] + sigma_y ** 2 * torch.eye(int(obs.sum()), dtype=torch.float64)
        K = torch.linalg.solve(S, self.C[obs]).T  # C_:o S^-1, the gain
        return self.mu + K @ (y.double() - self.mu[obs]), self.C - K @ self.C[obs]


class MixturePrior:
    """x0 ~ sum_k pi_k N(mu_k, C_k); called as D(x, sigma) like GaussianPrior."""

    def __init__(self, weights, components):
        self.log_pi, self.parts = torch.as_tensor(weights, dtype=torch.float64).log(), components
        self.sigma_data = float(sum(w * p.sigma_data ** 2 for w, p in zip(weights, components)) ** 0.5)

    def responsibilities(self, x, sigma):
        """r_k(x) = p(component k | x0 + sigma eps = x), (B, K)."""
        return torch.softmax(self.log_pi + torch.stack([p.log_density(x, sigma) for p in self.parts], 1), 1)

    def __call__(self, x, sigma):
        r = self.responsibilities(x, sigma)
        flat = x.reshape(len(x), -1)
        mean = sum(r[:, k:k + 1] * p(flat, sigma).double() for k, p in enumerate(self.parts))
        return mean.to(x.dtype).reshape(x.shape)

    def sample(self, n, gen):
        k = torch.multinomial(self.log_pi.exp(), n, replacement=True, generator=gen)
        draws = torch.stack([p.sample(n, gen) for p in self.parts], 1)
        return draws[torch.arange(n), k]

    def posterior(self, obs, y, sigma_y=0.0):
        """The exact p(x0 | y): the weights pi'_k and each component's (mean, covariance)."""
        log_w = self.log_pi + torch.stack([GaussianPrior(p.mu[obs], p.C[obs][:, obs] + sigma_y ** 2 * torch.eye(
            int(obs.sum()), dtype=torch.float64)).log_density(y.double()[None])[0] for p in self.parts])
        return torch.softmax(log_w, 0), [p.posterior(obs, y, sigma_y) for p in self.parts]


def mixture_moments(weights, parts):
    """Mean and covariance of a Gaussian mixture given as weights and (mean, covariance) pairs."""
    mean = sum(w * m for w, (m, _) in zip(weights, parts))
    cov = sum(w * (C + torch.outer(m - mean, m - mean)) for w, (m, C) in zip(weights, parts))
    return mean, cov


def gauss2():
    """Two pixels, each with std 0.5, correlation 0.9."""
    return GaussianPrior(torch.zeros(2), 0.25 * torch.tensor([[1.0, 0.9], [0.9, 1.0]]))


def gmm2():
    """Two pixels, three components placed so that observing pixel 0 near 0.5 leaves two plausible modes for pixel 1."""
    C = lambda s, r: s ** 2 * torch.tensor([[1.0, r], [r, 1.0]])  # noqa: E731
    return MixturePrior([0.3, 0.5, 0.2], [GaussianPrior(torch.tensor([0.5, 0.8]), C(0.15, 0.5)),
                                          GaussianPrior(torch.tensor([0.5, -0.5]), C(0.2, -0.3)),
                                          GaussianPrior(torch.tensor([-0.6, 0.0]), C(0.25, 0.0))])


def mnist_priors(x, y, ridge=1e-3):
    """gauss784 and gmm784 from training digits x (N, 1, 28, 28) in [-1, 1] with labels y."""
    flat = x.reshape(len(x), -1).double()
    eye = ridge * torch.eye(flat.shape[1], dtype=torch.float64)
    gauss = GaussianPrior(flat.mean(0), torch.cov(flat.T) + eye)
    classes = sorted(set(y.tolist()))
    parts = [GaussianPrior(flat[y == k].mean(0), torch.cov(flat[y == k].T) + eye) for k in classes]
    return gauss, MixturePrior([float((y == k).double().mean()) for k in classes], parts)


# ---------------------------------------------------------------------------- the bench
def observation(prior_name, frac, mnist_digit):
    """(mask (1, d), y (1, d), obs (d,) bool): gauss2 observes pixel 0 at 0.8, gmm2 at 0.5; the MNIST-like priors
    observe a random `frac` of the first 7 of the test split's pixels (edm_posterior.make_mask, seed 0)."""
    if prior_name.endswith("2"):
        mask, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8 if prior_name == "gauss2" else 0.5, 0.0]])
    else:
        mask = edm_posterior.make_mask("random", frac, 0).reshape(1, -1)
        y = mask * mnist_digit.reshape(1, -1)
    return mask, y, mask[0].bool()


def exact_posterior(prior, obs, y):
    """Mean and per-pixel std of p(x0 | y), and the mixture's weights (None for a Gaussian)."""
    post = prior.posterior(obs, y[0, obs])
    weights, parts = post if isinstance(prior, MixturePrior) else (None, [post])
    mean, cov = mixture_moments(weights if weights is not None else [1.0], parts)
    return mean, cov.diagonal().clamp(min=0).sqrt(), weights


def errors(draws, prior, obs, mean, std, weights):
    """The draws against the exact posterior, on the hidden pixels: mean error (absolute for one hidden pixel,
    else relative to how far y moves the mean from the prior's), std error (absolute / relative), the summed
    variance's relative error, and for a mixture the total variation between the draws' modes and the weights."""
    d, h = draws.double(), ~obs
    prior_mean = sum(w * p.mu for w, p in zip(prior.log_pi.exp(), prior.parts)) if weights is not None else prior.mu
    err_m, err_s = (d.mean(0)[h] - mean[h]), (d.std(0)[h] - std[h])
    one = int(h.sum()) == 1
    scale = 1 if one else (mean[h] - prior_mean[h]).norm()  # how far the data moved the mean (1 hidden pixel: none)
    out = {"mean_error": float(err_m.abs().sum() if one else err_m.norm() / scale),
           "std_error": float(err_s.abs().sum() if one else err_s.abs().mean() / std[h].mean()),
           "var_error": float(d.var(0)[h].sum() / (std[h] ** 2).sum() - 1),
           "mc_mean_error": float((std[h] ** 2).sum().sqrt() / len(d) ** 0.5 / scale)}
    if weights is not None:
        modes = prior.responsibilities(d, 0.0).argmax(1)
        share = torch.bincount(modes, minlength=len(weights)).double() / len(d)
        out.update(mode_tv=float((share - weights).abs().sum() / 2), mode_share=share.tolist())
    return out


def sampler_args(name, steps, **over):
    """edm_posterior's flags for one sampler: its documented defaults, the Karras schedule, then `over`."""
    p = common.make_parser("", {})
    edm_posterior.add_posterior_args(p)
    args = p.parse_args(["--checkpoint", "-"])
    vars(args).update({"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sample_steps": steps, **SAMPLERS[name],
                       **over})
    return args


def run_one(prior, name, steps, mask, y, n, seed, **over):
    """n draws of one sampler through edm_posterior.draw with the exact denoiser; (draws, seconds per draw)."""
    t0 = time.time()
    draws = edm_posterior.draw(prior, y, mask, n, sampler_args(name, steps, **over), seed, torch.device("cpu"),
                               batch=min(n, 2000 if mask.shape[1] == 2 else 100), desc=f"{name} {steps}", clamp=False)
    return draws, (time.time() - t0) / n


def figure_errors(path, rows, priors):
    """Mean error against steps, one panel per (prior, fraction), one line per sampler, with the Monte Carlo floor."""
    import matplotlib.pyplot as plt
    settings = [(p, f) for p in priors for f in FRACTIONS[p]]
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.4), squeeze=False)
    for ax, (p, f) in zip(axes[0], settings):
        sel = [r for r in rows if r["prior"] == p and r["observed"] == f and r["sampler"] != "smc-K"]
        for k, name in enumerate(SAMPLERS):
            rs = [r for r in sel if r["sampler"] == name]
            if rs:
                ax.plot([r["steps"] for r in rs], [r["mean_error"] for r in rs], "o-", ms=3, color=f"C{k}", label=name)
        ax.axhline(sel[0]["mc_mean_error"], color="grey", ls=":", lw=1, label="Monte Carlo error")
        ax.set(xscale="log", yscale="log", xlabel="sampling steps", title=f"{p}, {100 * f:g}% observed",
               ylabel="posterior-mean error" if ax is axes[0][0] else None)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("error of the draws' mean against the exact posterior (2-pixel priors: absolute; 784: relative)")
    common.save_fig(fig, path)


def figure_particles(path, rows):
    import matplotlib.pyplot as plt
    sel = [r for r in rows if r["sampler"] == "smc-K"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for k, key in enumerate(sorted({(r["prior"], r["observed"]) for r in sel})):
        rs = [r for r in sel if (r["prior"], r["observed"]) == key]
        for ax, metric in zip(axes, ("mean_error", "mode_tv" if "mode_tv" in rs[0] else "std_error")):
            ax.plot([r["particles"] for r in rs], [r[metric] for r in rs], "o-", color=f"C{k}",
                    label=f"{key[0]} {100 * key[1]:g}% ({metric})")
    for ax, what in zip(axes, ("posterior-mean error", "mode weights' TV (mixtures) / std error")):
        ax.set(xscale="log", yscale="log", xlabel="particles K per draw", ylabel=what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("SMC (twisted diffusion sampler): error against the number of particles")
    common.save_fig(fig, path)


def markdown(rows):
    """One table per prior: every sampler, step count (or particle count) and fraction."""
    out = []
    for prior in dict.fromkeys(r["prior"] for r in rows):
        mixture = any("mode_tv" in r for r in rows if r["prior"] == prior)
        out += [f"### {prior}", "", "| observed | sampler | steps | particles | mean error | std error | "
                "summed-variance error |" + (" mode TV |" if mixture else "") + " ms per draw | Monte Carlo mean "
                "error |",
                "|---|---|---|---|---|---|---|" + ("---|" if mixture else "") + "---|---|"]
        for r in (r for r in rows if r["prior"] == prior):
            out.append(f"| {100 * r['observed']:g}% | {r['sampler']} | {r['steps']} | {r.get('particles', '-')} | "
                       f"{r['mean_error']:.4f} | {r['std_error']:.4f} | {r['var_error']:+.3f} |" +
                       (f" {r['mode_tv']:.3f} |" if mixture else "") +
                       f" {1000 * r['seconds_per_draw']:.2f} | {r['mc_mean_error']:.4f} |")
        out.append("")
    return "\n".join(out)


def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    p.add_argument("--data-root", default="./data", help="torchvision data root (the MNIST-like priors)")
    p.add_argument("--priors", type=lambda s: tuple(s.split(",")), help="comma-separated: gauss2,gmm2,gauss784,gmm784")
    p.add_argument("--samplers", type=lambda s: tuple(s.split(",")), default=tuple(SAMPLERS),
                   help=f"comma-separated, of {','.join(SAMPLERS)}")
    p.add_argument("--sample-steps", type=common.num_list(int, 2, 10**4), help="step counts")
    p.add_argument("--n-small", type=common.num(int, 2, 10**7), help="draws per setting, 2-pixel priors")
    p.add_argument("--n-large", type=common.num(int, 2, 10**5), help="draws per setting, 784-pixel priors")
    p.add_argument("--particles", type=common.num_list(int, 1, 4096), help="SMC particle counts of the K study")
    p.add_argument("--smc-steps", type=common.num(int, 2, 10**4), help="steps of the K study")
    p.add_argument("--smc-n-large", type=common.num(int, 2, 10**5), help="draws per K, 784-pixel priors")
    args = common.parse(p, argv)
    for flag, vals, known in (("--priors", args.priors, FRACTIONS), ("--samplers", args.samplers, SAMPLERS)):
        if not set(vals) <= set(known):
            p.error(f"{flag}: unknown {', '.join(sorted(set(vals) - set(known)))}; choose from {', '.join(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    priors = {"gauss2": gauss2(), "gmm2": gmm2()}
    digit = None
    if {"gauss784", "gmm784"} & set(args.priors):  # bad data fails here, before the run folder
        x, labels, _, _ = common.load_image_dataset("mnist", args.data_root, train=True, val_size=0)
        xt, yt = common.load_image_dataset("mnist", args.data_root, train=False)
        priors["gauss784"], priors["gmm784"] = mnist_priors(x, labels)
        digit = xt[(yt == 7).nonzero()[0, 0]]
    run = harness.Run(SCRIPT, args)
    rows = []
    settings = [(p, f) for p in args.priors for f in FRACTIONS[p]]
    for k, (name, frac) in enumerate(settings):
        prior, small = priors[name], name.endswith("2")
        mask, y, obs = observation(name, frac, digit)
        mean, std, weights = exact_posterior(prior, obs, y)
        base = {"prior": name, "observed": frac, "exact_mean_hidden": mean[~obs].tolist()[:2] if small else None,
                "exact_std_hidden": std[~obs].tolist()[:2] if small else None}
        n = args.n_small if small else args.n_large
        for sampler in args.samplers:
            for steps in args.sample_steps:
                run.progress(f"{name} {100 * frac:g}%", k, len(settings), force=True)
                draws, spd = run_one(prior, sampler, steps, mask, y, n, args.seed + steps)
                rows.append({**base, "sampler": sampler, "steps": steps, "n": n, "seconds_per_draw": spd,
                             **errors(draws, prior, obs, mean, std, weights)})
                run.log(rows=rows)
        for K in args.particles if "smc" in args.samplers else ():
            n_k = args.n_small if small else args.smc_n_large
            draws, spd = run_one(prior, "smc", args.smc_steps, mask, y, n_k, args.seed + K, particles=K)
            rows.append({**base, "sampler": "smc-K", "steps": args.smc_steps, "particles": K, "n": n_k,
                         "seconds_per_draw": spd, **errors(draws, prior, obs, mean, std, weights)})
            run.log(rows=rows)
    with open(run.path("calibration.md"), "w") as f:
        f.write(f"# Posterior calibration (seed {args.seed})\n\n" + markdown(rows))
    with open(run.path("calibration.json"), "w") as f:
        json.dump(rows, f, indent=1)
    figure_errors(run.path("calibration.png"), rows, args.priors)
    if any(r["sampler"] == "smc-K" for r in rows):
        figure_particles(run.path("smc_particles.png"), rows)
    run.finish()
    print(markdown(rows) + f"\nwrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

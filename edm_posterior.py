"""edm_posterior.py: posterior sampling from partial pixel observations with the EDM prior of edm_mnist.py.

An inverse problem: a test digit x* is seen only through a mask m in {0,1}^(28x28) (1 = observed pixel),
  y = m * (x* + sigma_y_true n),   n ~ N(0, I)   (--measurement-noise sigma_y_true, 0 by default),
and we want draws from p(x | y) proportional to p(y | x) p(x), where p(x) is the EDM prior of edm_mnist.py. The sampler
is EDM's Heun solver of the probability-flow ODE (Karras et al. 2022) in sigma-space, sigma_0 = sigma_max > ... >
sigma_{N-1} = sigma_min, sigma_N = 0 (the Karras schedule of the checkpoint), with the denoiser D(x, sigma) replaced by
a guided one and the observed pixels kept consistent with y:

--guidance masked (default): a masked Gaussian likelihood with a noise-aware variance, no backpropagation:
  x0_hat    = D(x, sigma)
  sigma_t^2 = sigma_y^2 + c sigma^2                                          (--likelihood-sigma, --noise-aware-c)
  g         = m * (y - x0_hat) / sigma_t^2
  lambda_i  = lambda_max (lambda_min + (1 - lambda_min) (i / (N - 1))^p)     (annealed: weak at high noise)
  dx/dsigma = (x - (x0_hat + lambda_i sigma g)) / sigma
--guidance dps: Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky, Ye 2023): after each Heun step
  x_{i+1} <- x_{i+1} - zeta grad_x || m * (y - D(x, sigma_i)) ||,   the unsquared norm per sample, zeta constant,
  the gradient backpropagated through the denoiser (so it reaches the unobserved pixels).
--guidance none: data consistency alone (the "replacement" method).
Data consistency, every mode: after each step to sigma_{i+1} > 0 the observed pixels are re-noised from y,
  x <- m * (y + sigma_{i+1} xi) + (1 - m) * x,   xi ~ N(0, I),
and the last step returns x0_hat, projected: x0_hat <- m * y + (1 - m) * x0_hat, so observed pixels equal y exactly.
With data consistency on, the masked guidance acts on the observed pixels only (g is zero elsewhere); it reaches the
unobserved ones only through the denoiser's Heun evaluation. DPS moves the unobserved pixels directly.

Each experiment (--observed 0.7,0.2: the observed fractions) draws --n-samples posterior samples and reports the
posterior mean's MSE and PSNR on the unobserved pixels (PSNR = 10 log10(1 / MSE) on the [0, 1] pixel scale), the
error on the observed pixels, the share of draws the judge (evaluate.py) classifies as the true digit, its
confidence, and the mean per-pixel posterior standard deviation.

Usage: python edm_posterior.py --checkpoint outputs/edm_mnist/RUN/checkpoint.pt [--observed 0.7,0.2] [--digit 7]
       [--guidance masked|dps|none] [--mask random|box|half] [--quick]
"""
import argparse
import math
import time

import torch

import common
import edm_mnist
import evaluate

SCRIPT = "edm_posterior"
PRESETS = {"full": dict(n_samples=100, steps=80, judge_epochs=None),
           "quick": dict(n_samples=16, steps=10, judge_epochs=0.05)}


# ----------------------------------------------------------------------------- data
def ground_truth(dataset, root, digit, index):
    """The index-th test image of class `digit` (1 x 1 x 28 x 28 in [-1, 1])."""
    x, y = common.load_image_dataset(dataset, root, train=False)
    idx = (y == digit).nonzero().flatten()
    if index >= len(idx):
        raise common.UsageError(f"--index {index}: the {dataset} test split has only {len(idx)} images of digit {digit}")
    return x[idx[index]].unsqueeze(0)


def make_mask(kind, observed, seed, size=28):
    """m in {0, 1}^(1 x 1 x size x size), 1 = observed. random: exactly round(observed * size^2) pixels at random;
    box: all but a centred square holding (1 - observed) of the image; half: the top round(observed * size) rows."""
    m = torch.zeros(size * size)
    if kind == "random":
        k = round(observed * size * size)
        m[torch.randperm(size * size, generator=torch.Generator().manual_seed(seed))[:k]] = 1.0
        return m.reshape(1, 1, size, size)
    m = m.reshape(1, 1, size, size)
    if kind == "box":
        side = round(size * math.sqrt(1 - observed))
        lo = (size - side) // 2
        m.fill_(1.0)
        m[..., lo:lo + side, lo:lo + side] = 0.0
    else:  # half
        m[..., :round(observed * size), :] = 1.0
    return m


def observe(x_true, mask, noise, seed):
    """y = m * (x* + noise n): the observed pixels (zero elsewhere)."""
    n = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(seed + 7))  # not the mask's own stream
    return mask * (x_true + noise * n)


# ----------------------------------------------------------------------------- sampling
def lambda_schedule(i, N, lambda_max, lambda_min, power):
    """lambda_i = lambda_max (lambda_min + (1 - lambda_min) (i / (N - 1))^p)."""
    return lambda_max * (lambda_min + (1 - lambda_min) * (i / max(N - 1, 1)) ** power)


def dps_gradient(D, x, sigma, y, mask):
    """x0_hat = D(x, sigma) and grad_x of the per-sample || m * (y - x0_hat) || (sum over the batch: the samples are
    independent, so each gets the gradient of its own norm)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        x0 = D(x, sigma)
        r = ((mask * (y - x0)) ** 2).flatten(1).sum(1).add(1e-12).sqrt()  # +eps: the norm's gradient at 0
        (grad,) = torch.autograd.grad(r.sum(), x)
    return x0.detach(), grad


@torch.no_grad()
def posterior_sampler(D, latents, sigmas, y, mask, guidance="masked", lambda_max=1.5, lambda_min=0.25, power=1.5,
                      sigma_y=0.1, c=0.05, zeta=4.0, gen=None, on_step=None):
    """Heun steps over `sigmas` (ending at 0) toward p(x | y); the equations are in the module docstring.
    With mask all zero and no guidance this is edm_mnist.edm_sampler (no churn), operation for operation.
    on_step(i + 1, N) after each step (progress reports)."""
    N, obs = len(sigmas) - 1, mask.bool()

    def drift(x, sigma, lam):  # dx/dsigma, with the masked-likelihood guidance folded into x0_hat
        x0 = D(x, sigma)
        if guidance == "masked":
            g = mask * (y - x0) / (sigma_y ** 2 + c * sigma ** 2)
            x0 = x0 + lam * sigma * g
        return (x - x0) / sigma

    x_next = latents * float(sigmas[0])
    for i in range(N):
        t_cur, t_next, x_cur = float(sigmas[i]), float(sigmas[i + 1]), x_next
        lam = lambda_schedule(i, N, lambda_max, lambda_min, power)
        if guidance == "dps":
            x0, grad = dps_gradient(D, x_cur, t_cur, y, mask)
            d_cur = (x_cur - x0) / t_cur
        else:
            d_cur = drift(x_cur, t_cur, lam)
        x_next = x_cur + (t_next - t_cur) * d_cur                       # Euler step
        if t_next > 0:                                                  # Heun correction (not on the step to 0)
            d_prime = (x_next - D(x_next, t_next)) / t_next if guidance == "dps" else drift(x_next, t_next, lam)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if guidance == "dps":
            x_next = x_next - zeta * grad
        if t_next > 0:                                                  # observed pixels: y, noised to sigma_{i+1}
            xi = torch.randn(x_next.shape, generator=gen, dtype=x_next.dtype).to(x_next.device)
            x_next = torch.where(obs, y + t_next * xi, x_next)
        if on_step:
            on_step(i + 1, N)
    return torch.where(obs, y, x_next)                                  # x0_hat <- m y + (1 - m) x0_hat


def draw(D, y, mask, n, args, seed, device, batch=256, desc="posterior", progress=None):
    """n posterior draws (CPU, clamped to [-1, 1]) in batches; batch b uses the generator seed + b, so any batch can be
    redrawn alone (svd_posterior.py resumes this way)."""
    sigmas = edm_mnist.karras_sigmas(args.steps, args.sigma_min, args.sigma_max, args.rho)
    y, mask, out = y.to(device), mask.to(device), []
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    for b, size in enumerate(common.progress_bar(sizes, desc=desc, leave=False)):
        gen = torch.Generator().manual_seed(seed + b)
        latents = torch.randn((size, 1, 28, 28), generator=gen).to(device)
        x = posterior_sampler(D, latents, sigmas, y, mask, args.guidance, args.lambda_max, args.lambda_min,
                              args.power, args.likelihood_sigma, args.noise_aware_c, args.zeta, gen,
                              on_step=progress and (lambda k, N, b=b: progress(b + k / N, len(sizes))))
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation
def psnr(mse):
    """10 log10(1 / MSE) for an MSE measured on the [0, 1] pixel scale."""
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def posterior_metrics(draws, x_true, y, mask, digit, judge):
    """The posterior mean's error on the unobserved pixels, the draws' error on the observed ones, the judge's view."""
    mean, std = draws.mean(0, keepdim=True), draws.std(0, keepdim=True) if len(draws) > 1 else torch.zeros_like(x_true)
    hidden, obs = mask == 0, mask == 1
    mse = float((((mean - x_true) / 2)[hidden] ** 2).mean()) if hidden.any() else 0.0  # /2: [-1, 1] -> [0, 1]
    per_draw = (((draws - x_true) / 2) ** 2 * hidden).flatten(1).sum(1) / hidden.sum().clamp(min=1)
    _, probs = evaluate.judge_outputs(judge, draws, "cpu")
    return {"observed_fraction": round(float(mask.mean()), 4), "n_observed_pixels": int(mask.sum()),
            "n_draws": len(draws), "mse_unobserved": mse, "psnr_unobserved": psnr(mse) if hidden.any() else None,
            "mean_draw_psnr_unobserved": sum(psnr(float(v)) for v in per_draw) / len(per_draw) if hidden.any() else None,
            "observed_max_abs_error": float((draws - y).abs().amax(dim=0, keepdim=True)[obs].max()) if obs.any() else 0.0,
            "judge_accuracy": float((probs.argmax(1) == digit).float().mean()),
            "judge_true_digit_prob": float(probs[:, digit].mean()),
            "judge_mean_top_prob": float(probs.max(1).values.mean()),
            "mean_posterior_std": float(std.mean()), "mean_posterior_std_unobserved":
                float(std[hidden].mean()) if hidden.any() else 0.0}, mean, std


def figure_setup(path, x_true, mask, y, draws, title):
    """Ground truth, mask, what is observed (grey = unknown), then posterior draws."""
    import matplotlib.pyplot as plt
    k = min(6, len(draws))
    panels = [(x_true, "ground truth"), (mask * 2 - 1, "mask (white = seen)"),
              (torch.where(mask.bool(), y, torch.zeros_like(y)), "observed y")]
    panels += [(draws[j:j + 1], f"draw {j + 1}") for j in range(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.0))
    for ax, (img, name) in zip(axes, panels):
        ax.imshow(img[0, 0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    common.save_fig(fig, path)


def figure_mean_std(path, x_true, mask, mean, std, title):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(8.4, 2.4))
    err = ((mean - x_true).abs() * (1 - mask))[0, 0]
    for ax, img, name, kw in [(axes[0], x_true[0, 0], "ground truth", dict(cmap="gray", vmin=-1, vmax=1)),
                              (axes[1], mean[0, 0], "posterior mean", dict(cmap="gray", vmin=-1, vmax=1)),
                              (axes[2], std[0, 0], "per-pixel std", dict(cmap="magma", vmin=0)),
                              (axes[3], err, "|mean - truth| (hidden)", dict(cmap="magma", vmin=0))]:
        im = ax.imshow(img.numpy(), interpolation="nearest", **kw)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        if kw["cmap"] == "magma":
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    common.save_fig(fig, path)


def tag(observed):
    return f"obs{round(100 * observed):02d}"


# ----------------------------------------------------------------------------- main
def fraction(s):
    v = float(s)
    if not 0 < v <= 1:
        raise ValueError
    return v


def fraction_list(s):
    """Comma-separated observed fractions, each in (0, 1]."""
    try:
        return [fraction(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {s!r}") from None


def add_posterior_args(p):
    """The flags shared with svd_posterior.py: the model, the observation and the sampler."""
    p.add_argument("--checkpoint", required=True, help="edm_mnist.py checkpoint.pt (its EMA denoiser is the prior)")
    p.add_argument("--data-root", default="./data", help="torchvision data root (the test digit, the judge)")
    p.add_argument("--observed", type=fraction_list, default=[0.7, 0.2],
                   help="observed fraction(s) of the pixels, each in (0, 1]: one experiment each")
    p.add_argument("--mask", choices=["random", "box", "half"], default="random",
                   help="random pixels; box: a hidden centred square; half: the top rows are seen")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the random mask and the measurement noise")
    p.add_argument("--digit", type=int, default=7, choices=range(10), metavar="0-9", help="class of the test digit")
    p.add_argument("--index", type=common.nonneg_int, default=0, help="which test image of that class")
    p.add_argument("--measurement-noise", type=common.nonneg_float, default=0.0, help="std of the noise added to y")
    p.add_argument("--guidance", choices=["masked", "dps", "none"], default="masked",
                   help="masked Gaussian likelihood, DPS through the denoiser, or data consistency alone")
    p.add_argument("--lambda-max", type=common.nonneg_float, default=1.5, help="guidance scale lambda_max (masked)")
    p.add_argument("--lambda-min", type=common.nonneg_float, default=0.25,
                   help="lambda at the first step, as a fraction of lambda_max")
    p.add_argument("--power", type=common.positive_float, default=1.5, help="annealing power p of lambda_i")
    p.add_argument("--likelihood-sigma", type=common.nonneg_float, default=0.1, help="sigma_y of the likelihood")
    p.add_argument("--noise-aware-c", type=common.nonneg_float, default=0.05, help="c in sigma_y^2 + c sigma^2")
    p.add_argument("--zeta", type=common.nonneg_float, default=4.0, help="DPS step size zeta (guidance dps)")
    p.add_argument("--steps", type=common.positive_int, help="Heun steps N (2N - 1 evaluations)")
    p.add_argument("--batch", type=common.positive_int, default=256, help="draws per sampling batch")
    p.add_argument("--judge-epochs", type=common.positive_float, help="judge budget if not cached (default: full)")


def check_args(p, args):
    if args.steps < 2:
        p.error("--steps: the Karras schedule needs at least 2 steps")
    if args.lambda_min > 1:
        p.error(f"--lambda-min ({args.lambda_min:g}) is a fraction of lambda_max: at most 1")
    if args.guidance == "masked" and args.likelihood_sigma == 0 and args.noise_aware_c == 0:
        p.error("--likelihood-sigma and --noise-aware-c are both 0: the likelihood variance would be 0")


def load_prior(args, device):
    """The EDM denoiser and its schedule settings (sigma_min, sigma_max, rho) copied onto args."""
    D, cfg = edm_mnist.load_denoiser(args.checkpoint, device)
    args.sigma_min, args.sigma_max, args.rho, args.dataset = cfg["sigma_min"], cfg["sigma_max"], cfg["rho"], cfg["dataset"]
    return D


def parse_args():
    p = common.make_parser(__doc__)
    add_posterior_args(p)
    p.add_argument("--n-samples", type=common.positive_int, help="posterior draws per experiment")
    first, _ = p.parse_known_args()
    p.set_defaults(**PRESETS["quick" if first.quick else "full"])
    args = p.parse_args()
    check_args(p, args)
    return args


def main():
    args = parse_args()
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    D = load_prior(args, device)  # bad input is found before the run folder exists
    x_true = ground_truth(args.dataset, args.data_root, args.digit, args.index)
    run = common.Run(SCRIPT, args)
    judge = evaluate.get_judge(args.dataset, args.data_root, args.out, "cpu", args.judge_epochs)["model"]
    run.log(device=str(device), digit=args.digit, guidance=args.guidance, steps=args.steps, evaluations=2 * args.steps - 1)
    results = {}
    for e, observed in enumerate(args.observed):
        name = tag(observed)
        mask = make_mask(args.mask, observed, args.mask_seed)
        y = observe(x_true, mask, args.measurement_noise, args.mask_seed)
        t0 = time.time()
        draws = draw(D, y, mask, args.n_samples, args, args.seed + 1000 * e, device, args.batch, f"{name} posterior",
                     lambda b, nb: run.progress(name, e * nb + b, len(args.observed) * nb))
        secs = time.time() - t0
        m, mean, std = posterior_metrics(draws, x_true, y, mask, args.digit, judge)
        m.update(seconds=round(secs, 2), seconds_per_draw=round(secs / len(draws), 4))
        results[name] = m
        run.log(experiments=results)
        torch.save({"draws": draws, "x_true": x_true, "y": y, "mask": mask, "digit": args.digit},
                   run.path(f"draws_{name}.pt"))
        title = f"{args.guidance} guidance, {args.mask} mask, {100 * observed:.0f}% observed, {args.steps} steps"
        figure_setup(run.path(f"setup_{name}.png"), x_true, mask, y, draws, title)
        common.image_grid(run.path(f"samples_{name}.png"), draws[:100], nrow=10, title=f"posterior draws: {title}")
        figure_mean_std(run.path(f"mean_std_{name}.png"), x_true, mask, mean, std,
                        f"{100 * observed:.0f}% observed: PSNR {m['psnr_unobserved'] or float('inf'):.1f} dB on hidden pixels, "
                        f"judge {100 * m['judge_accuracy']:.0f}% digit {args.digit}")
        print(f"{name}: PSNR(hidden) {m['psnr_unobserved'] or float('inf'):.2f} dB, judge {m['judge_accuracy']:.3f}, "
              f"std {m['mean_posterior_std']:.3f}, {secs:.1f} s")
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    common.run_main(main)

"""edm_posterior.py: posterior sampling from partial pixel observations with the EDM prior of edm_mnist.py.

An inverse problem: a test digit x* is seen only through a mask m in {0,1}^(28x28) (1 = observed pixel),
  y = m (x* + noise n),   n ~ N(0, I)   (--measurement-noise, 0 by default),
and we want draws from p(x | y) ~ p(y | x) p(x), p(x) the EDM prior. Every sampler runs EDM's Karras schedule of the
checkpoint, sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, sigma_N = 0, with the denoiser D(x, sigma).
The posterior's own denoiser is E[x0 | x, y] = D + sigma^2 grad_x log p(y | x), and its probability-flow ODE,
dx/dsigma = (x - E[x0 | x, y]) / sigma, carries N(0, sigma_max^2 I) to p(x | y). The samplers differ in how they
get E[x0 | x, y]:

--guidance smc (default): the twisted diffusion sampler (Wu, Trippe, Naesseth, Blei, Cunningham 2023), sequential
  Monte Carlo with --particles K (8) per draw over 2N - 1 ancestral moves (equations at smc_sampler). Asymptotically
  exact as K grows; K = 1 is its proposal, a guided ancestral sampler, alone.
--guidance tweedie: the likelihood's score through the denoiser. Tweedie's second moment gives
  Cov[x0 | x] = sigma^2 J, J = dD/dx; taking p(x0 | x) as the Gaussian N(D, sigma^2 J) (exact for a Gaussian prior):
    E[x0 | x, y] = D + J^T m v,   (m J m + (noise / sigma)^2 I) v = m (y - D)
  solved per draw by --cg-iters steps of conjugate gradients, each one Jacobian-vector product; --cg-iters 0 takes
  J = sigma_data^2 / (sigma^2 + sigma_data^2) I instead (PiGDM's diagonal, Song, Vahdat, Mardani, Kautz 2023).
  Heun's method on that ODE; no data consistency step is needed; the output's observed pixels are set to y.
--guidance dps: Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky, Ye 2023): after each Heun step
  x_{i+1} <- x_{i+1} - zeta grad_x || m (y - D(x, sigma_i)) ||, the unsquared norm per sample, zeta constant.
--guidance masked: the residual heuristic this script began with, kept exactly as it was:
    g = m (y - x0_hat) / (sigma_y^2 + c sigma^2),   x0_hat <- x0_hat + lambda_i sigma g,
    lambda_i = lambda_max (lambda_min + (1 - lambda_min) (i / (N - 1))^p)
  It is not a likelihood's score: g is zero off the mask and skips the denoiser's Jacobian, and the observed pixels
  it moves are overwritten by the data consistency step below, so it reaches the hidden pixels only through Heun's
  correction, an effect of the order of the step size (as the step count grows it tends to --guidance none).
--guidance none: data consistency alone (the "replacement" method).
Data consistency (dps, masked, none): after each step to sigma_{i+1} > 0 the observed pixels are re-noised from y,
  x <- m (y + sigma_{i+1} xi) + (1 - m) x,  xi ~ N(0, I); the last step returns x0_hat with m y on the mask.
How close each comes to the exact posterior is measured by posterior_calibration.py on priors whose posterior is known.

Each experiment (--observed 0.7,0.2) draws --n-samples posterior samples and reports the posterior mean's MSE and
PSNR on the unobserved pixels (PSNR = 10 log10(1 / MSE), [0, 1] pixel scale), the error on the observed pixels, the
share of draws the judge (evaluate.py) classifies as the true digit, its confidence, and the mean per-pixel posterior
standard deviation. Each fraction's files carry its tag: obs70 for 0.7, obs70p1 for 0.701.

Usage: python edm_posterior.py --checkpoint outputs/edm_mnist/RUN/checkpoint.pt [--observed 0.7,0.2] [--digit 7]
       [--guidance smc|tweedie|dps|masked|none] [--mask random|box|half] [--sample-steps 18] [--quick]
"""
import math
import time

import torch

import common
import harness
import edm_mnist
import evaluate

SCRIPT = "edm_posterior"
PRESETS = {"full": dict(n_samples=100, sample_steps=18, judge_epochs=None),
           "quick": dict(n_samples=16, sample_steps=10, judge_epochs=0.05)}
GRAY, HEAT = dict(cmap="gray", vmin=-1, vmax=1), dict(cmap="magma", vmin=0, colorbar=True)  # images, heat maps


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
def make_mask(kind, observed, seed, size=28):
    """m in {0, 1}^(1 x 1 x size x size), 1 = observed. random: exactly round(observed * size^2) pixels at random;
    box: all but a centred square holding (1 - observed) of the image; half: the top round(observed * size) rows."""
    m = torch.zeros(1, 1, size, size)
    if kind == "random":
        k = round(observed * size * size)
        m.view(-1)[torch.randperm(size * size, generator=torch.Generator().manual_seed(seed))[:k]] = 1.0
    elif kind == "box":
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


def conjugate_gradient(op, b, iters):
    """`iters` steps of conjugate gradients on op(v) = b from v = 0, one system per sample (op acts on each sample
    alone). A direction of non-positive curvature (possible for a trained denoiser's Jacobian) ends that sample's
    updates."""
    dot = lambda a, c: (a * c).flatten(1).sum(1).view(-1, *[1] * (a.ndim - 1))  # noqa: E731  per-sample <a, c>
    v, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), dot(r, r)
    for _ in range(iters):
        Ap = op(p)
        pAp = dot(p, Ap)
        alpha = torch.where(pAp > 0, rr / pAp.clamp(min=1e-30), torch.zeros_like(pAp))
        v, r = v + alpha * p, r - alpha * Ap
        rr, rr_old = dot(r, r), rr
        p = r + rr / rr_old.clamp(min=1e-30) * p
    return v


def tweedie_denoiser(D, x, sigma, y, mask, noise=0.0, cg_iters=5, sigma_data=0.5):
    """E[x0 | x, y] = D + J^T m v, v by cg_iters conjugate-gradient steps or PiGDM's diagonal J (module docstring)."""
    with torch.enable_grad():
        f = lambda z: D(z, sigma)  # noqa: E731
        x0, pullback = torch.func.vjp(f, x)
        r, lam = mask * (y - x0), (noise / sigma) ** 2
        if cg_iters:
            v = conjugate_gradient(lambda p: mask * torch.func.jvp(f, (x,), (mask * p,))[1] + lam * p, r, cg_iters)
        else:
            v = r / (sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2) + lam)
        return (x0 + pullback(mask * v)[0]).detach()


@torch.no_grad()
def posterior_sampler(D, latents, sigmas, y, mask, guidance="tweedie", lambda_max=1.5, lambda_min=0.25, power=1.5,
                      sigma_y=0.1, c=0.05, zeta=4.0, gen=None, on_step=None, noise=0.0, cg_iters=5, sigma_data=0.5):
    """Heun steps over `sigmas` (ending at 0) toward p(x | y); the equations are in the module docstring.
    With mask all zero and no guidance this is edm_mnist.edm_sampler (no churn), operation for operation."""
    N, obs = len(sigmas) - 1, mask.bool()

    def drift(x, sigma, lam):  # dx/dsigma with the guided x0_hat (dps: D's own; its guidance is a step of its own)
        if guidance == "tweedie":
            return (x - tweedie_denoiser(D, x, sigma, y, mask, noise, cg_iters, sigma_data)) / sigma
        x0 = D(x, sigma)
        if guidance == "masked":
            g = mask * (y - x0) / (sigma_y ** 2 + c * sigma ** 2)
            x0 = x0 + lam * sigma * g
        return (x - x0) / sigma

    x_next = latents * float(sigmas[0])
    for i in range(N):
        t_cur, t_next, x_cur = float(sigmas[i]), float(sigmas[i + 1]), x_next
        lam = lambda_schedule(i, N, lambda_max, lambda_min, power)
        if guidance == "dps":  # x0_hat and the gradient of the residual's norm, from one call of D
            x0, grad = dps_gradient(D, x_cur, t_cur, y, mask)
        d_cur = (x_cur - x0) / t_cur if guidance == "dps" else drift(x_cur, t_cur, lam)
        x_next = x_cur + (t_next - t_cur) * d_cur                       # Euler step
        if t_next > 0:                                                  # Heun correction (not on the step to 0)
            d_prime = drift(x_next, t_next, lam)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if guidance == "dps":
            x_next = x_next - zeta * grad
        if t_next > 0 and guidance != "tweedie":                        # observed pixels: y, noised to sigma_{i+1}
            xi = torch.randn(x_next.shape, generator=gen, dtype=x_next.dtype).to(x_next.device)
            x_next = torch.where(obs, y + t_next * xi, x_next)
        if on_step:
            on_step(i + 1, N)
    return torch.where(obs, y, x_next)                                  # x0_hat <- m y + (1 - m) x0_hat


def resample(logw, gen=None):
    """Systematic resampling of every row of log-weights (draws x particles): the particles kept (indices into the
    row) and the new log-weights, all equal to the row's mean weight, so each row's total weight is unchanged."""
    B, K = logw.shape
    u = (torch.rand(B, 1, generator=gen, dtype=torch.float64) + torch.arange(K, dtype=torch.float64)) / K
    cdf = torch.cumsum(torch.softmax(logw.double(), 1), 1)
    keep = torch.searchsorted(cdf, u.to(cdf.device)).clamp(max=K - 1)
    return keep, (torch.logsumexp(logw, 1, keepdim=True) - math.log(K)).expand(B, K)


@torch.no_grad()
def smc_sampler(D, latents, sigmas, y, mask, particles=16, noise=0.0, sigma_data=0.5, gen=None, on_step=None):
    """The twisted diffusion sampler (Wu et al. 2023): K = `particles` particles per draw (latents: draws x K), each
    moved by the ancestral kernel p(x' | x) = N(mu, v), mu = x0_hat + (sigma'/sigma)^2 (x - x0_hat),
    v = sigma'^2 (1 - sigma'^2 / sigma^2), shifted toward y by the twist's gradient:
        x' ~ N(mu + (sigma^2 - sigma'^2) grad log p~(y | x), v),   log p~(y | x) = -|m (y - D(x, sigma))|^2 / (2 s^2),
        s^2 = noise^2 + sigma_min^2 + max(sigma^2 sigma_data^2 / (sigma^2 + sigma_data^2), sigma^2 - sigma'^2)
    (PiGDM's variance of x0 given x, but never below the step's own sigma^2 - sigma'^2, so that the shift cannot
    overshoot y on a coarse grid),
    and weighted by w <- w p(x' | x) p~(y | x') / (q(x' | x) p~(y | x)); resampled (systematically) whenever a draw's
    effective sample size falls under K / 2. At sigma' = 0 the move is x' = x0_hat. Each draw returns one particle
    picked by its final weight. As K grows the draws approach p(x | y) (for a prior whose kernel is exact)."""
    K, N, s_min = particles, len(sigmas) - 1, float(sigmas[-2])
    B, obs = len(latents) // particles, mask.bool()

    def twist(x, i):  # log p~(y | x) at level i, its gradient and x0_hat
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        s2 = noise ** 2 + s_min ** 2 + max(sigma ** 2 * sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2),
                                           sigma ** 2 - sigma_next ** 2)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x0 = D(x, sigma)
            log_p = -((mask * (y - x0)) ** 2).flatten(1).sum(1) / (2 * s2)
            return log_p.detach(), torch.autograd.grad(log_p.sum(), x)[0], x0.detach()

    x = latents * float(sigmas[0])
    log_p, grad, x0 = twist(x, 0)
    logw = torch.zeros(B, K, dtype=torch.float64, device=x.device)
    for i in range(N):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next > 0:
            mu, v = x0 + (sigma_next / sigma) ** 2 * (x - x0), sigma_next ** 2 * (1 - sigma_next ** 2 / sigma ** 2)
            shift = (sigma ** 2 - sigma_next ** 2) * grad
            x = mu + shift + math.sqrt(v) * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            log_kernel = (((x - mu - shift) ** 2 - (x - mu) ** 2).flatten(1).sum(1) / (2 * v)).double()
            log_p_next, grad, x0 = twist(x, i + 1)
        else:  # the last move is x0_hat itself; its twist is the likelihood of y (variance noise^2 + sigma_min^2)
            x = x0
            log_kernel = torch.zeros(len(x), dtype=torch.float64, device=x.device)
            log_p_next = -((mask * (y - x)) ** 2).flatten(1).sum(1) / (2 * (noise ** 2 + s_min ** 2))
        logw = logw + (log_kernel + log_p_next.double() - log_p.double()).view(B, K)
        log_p = log_p_next
        ess = 1 / (torch.softmax(logw, 1) ** 2).sum(1)
        if sigma_next > 0 and (ess < K / 2).any():
            keep, logw_new = resample(logw, gen)
            rows = torch.where((ess < K / 2)[:, None], keep, torch.arange(K, device=x.device).expand(B, K))
            flat = (rows + K * torch.arange(B, device=x.device)[:, None]).flatten()
            x, log_p, grad, x0 = x[flat], log_p[flat], grad[flat], x0[flat]
            logw = torch.where((ess < K / 2)[:, None], logw_new, logw)
        if on_step:
            on_step(i + 1, N)
    pick = torch.multinomial(torch.softmax(logw, 1).cpu(), 1, generator=gen).flatten() if K > 1 else torch.zeros(B)
    return torch.where(obs, y, x.view(B, K, *x.shape[1:])[torch.arange(B), pick.long().to(x.device)])
# ==== end of core ====


# ----------------------------------------------------------------------------- sampling
def draw(D, y, mask, n, args, seed, device, batch=256, desc="posterior", progress=None, clamp=True):
    """n posterior draws on the CPU (clamped to [-1, 1] for images) with the sampler args.guidance picks, in batches;
    batch b uses the generator seed + b, so any batch can be redrawn alone (svd_posterior.py resumes this way).
    D is the trained denoiser or an exact one (posterior_calibration.py): the same D(x, sigma) call."""
    smc = args.guidance == "smc"  # 2N - 1 moves: as many calls of D as Heun's N steps
    K, steps = (args.particles, 2 * args.sample_steps - 1) if smc else (1, args.sample_steps)
    sigmas = edm_mnist.karras_sigmas(steps, args.sigma_min, args.sigma_max, args.rho)
    y, mask, out, sigma_data = y.to(device), mask.to(device), [], getattr(D, "sigma_data", 0.5)
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    for b, size in enumerate(common.progress_bar(sizes, desc=desc, leave=False)):
        gen = torch.Generator().manual_seed(seed + b)
        latents = torch.randn((size * K, *y.shape[1:]), generator=gen).to(device)
        on_step = progress and (lambda k, N, b=b: progress(b + k / N, len(sizes)))
        x = smc_sampler(D, latents, sigmas, y, mask, K, args.measurement_noise, sigma_data, gen, on_step) if smc else \
            posterior_sampler(D, latents, sigmas, y, mask, args.guidance, args.lambda_max, args.lambda_min, args.power,
                              args.likelihood_sigma, args.noise_aware_c, args.zeta, gen, on_step,
                              args.measurement_noise, args.cg_iters, sigma_data)
        out.append((x.clamp(-1, 1) if clamp else x).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation
def posterior_metrics(draws, x_true, y, mask, digit, judge):
    """The posterior mean's error on the unobserved pixels, the draws' error on the observed ones, the judge's view."""
    psnr = lambda mse: 10 * math.log10(1 / mse) if mse > 0 else float("inf")  # noqa: E731  MSE on the [0, 1] scale
    mean, std = draws.mean(0, keepdim=True), draws.std(0, keepdim=True) if len(draws) > 1 else torch.zeros_like(x_true)
    hidden, obs = mask == 0, mask == 1
    mse = float((((mean - x_true) / 2)[hidden] ** 2).mean()) if hidden.any() else 0.0  # /2: [-1, 1] -> [0, 1]
    per_draw = (((draws - x_true) / 2) ** 2 * hidden).flatten(1).sum(1) / hidden.sum().clamp(min=1)
    _, probs = evaluate.judge_outputs(judge, draws, "cpu")
    return {"observed_fraction": round(float(mask.mean()), 4), "n_observed_pixels": int(mask.sum()),
            "n_draws": len(draws), "mse_unobserved": mse, "psnr_unobserved": psnr(mse) if hidden.any() else None,
            "mean_draw_psnr_unobserved": sum(map(psnr, per_draw.tolist())) / len(per_draw) if hidden.any() else None,
            "observed_max_abs_error": float((draws - y).abs().amax(0, keepdim=True)[obs].max()) if obs.any() else 0.0,
            "judge_accuracy": float((probs.argmax(1) == digit).float().mean()),
            "judge_true_digit_prob": float(probs[:, digit].mean()),
            "judge_mean_top_prob": float(probs.max(1).values.mean()), "mean_posterior_std": float(std.mean()),
            "mean_posterior_std_unobserved": float(std[hidden].mean()) if hidden.any() else 0.0}, mean, std


def tag(observed):
    """obs70 for 0.7, obs05 for 0.05, obs70p1 for 0.701: the percentage with every digit it has (10 significant), so
    two fractions never share a file."""
    return "obs" + ("0" if 100 * observed < 10 else "") + f"{100 * observed:.10g}".replace(".", "p")


# ----------------------------------------------------------------------------- main
def add_posterior_args(p):
    """The flags shared with svd_posterior.py: the model, the observation and the sampler."""
    p.add_argument("--checkpoint", default=None, help="edm_mnist.py checkpoint.pt (its EMA denoiser is the prior)")
    p.add_argument("--exact-prior", choices=["gaussian"], default=None, help="instead of --checkpoint: the Gaussian "
                   "of the training digits' mean and covariance, whose posterior is known (posterior_calibration.py)")
    p.add_argument("--data-root", default="./data", help="torchvision data root (the test digit, the judge)")
    p.add_argument("--observed", type=common.num_list(float, 0, 1, open_lo=True), default=(0.7, 0.2),
                   help="observed fraction(s) of the pixels, each in (0, 1]: one experiment each")
    p.add_argument("--mask", choices=["random", "box", "half"], default="random",
                   help="random pixels; box: a hidden centred square; half: the top rows are seen")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the random mask and the measurement noise")
    p.add_argument("--digit", type=int, default=7, choices=range(10), metavar="0-9", help="class of the test digit")
    p.add_argument("--index", type=common.num(int, 0, 10**5), default=0, help="which test image of that class")
    p.add_argument("--measurement-noise", type=common.num(float, 0, 100), default=0.0, help="std of the noise in y")
    p.add_argument("--guidance", choices=["smc", "tweedie", "dps", "masked", "none"], default="smc",
                   help="tweedie: the likelihood's score through the denoiser with Tweedie's covariance; smc: the "
                   "twisted diffusion sampler; dps; masked: the residual heuristic; none: data consistency alone")
    p.add_argument("--cg-iters", type=common.num(int, 0, 1000), default=5,
                   help="conjugate-gradient steps of tweedie (0: PiGDM's diagonal covariance)")
    p.add_argument("--particles", type=common.num(int, 1, 4096), default=8, help="particles per draw (smc)")
    p.add_argument("--lambda-max", type=common.num(float, 0, 10**4), default=1.5, help="guidance scale lambda_max")
    p.add_argument("--lambda-min", type=common.num(float, 0, 1), default=0.25,
                   help="lambda at the first step, as a fraction of lambda_max")
    p.add_argument("--power", type=common.num(float, 0, 100, open_lo=True), default=1.5, help="annealing power p")
    p.add_argument("--likelihood-sigma", type=common.num(float, 0, 100), default=0.1, help="sigma_y of the likelihood")
    p.add_argument("--noise-aware-c", type=common.num(float, 0, 100), default=0.05, help="c in sigma_y^2 + c sigma^2")
    p.add_argument("--zeta", type=common.num(float, 0, 10**4), default=4.0, help="DPS step size zeta (guidance dps)")
    p.add_argument("--sample-steps", "--steps", type=common.num(int, 2, 10**4), help="Heun steps N (2N - 1 calls of D)")
    p.add_argument("--sample-batch", "--batch", type=common.num(int, 1, 10**5), default=256, help="draws per batch")
    p.add_argument("--judge-epochs", type=common.num(float, 0, 1000, open_lo=True), help="judge budget if not cached")


def check_args(p, args):
    if (args.checkpoint is None) == (args.exact_prior is None):
        p.error("give the prior: --checkpoint (a trained edm_mnist.py model) or --exact-prior, one of them")
    tags = [tag(o) for o in args.observed]
    if len(set(tags)) < len(tags):
        p.error(f"--observed {','.join(map(str, args.observed))}: a fraction is given twice ({', '.join(tags)})")
    if args.guidance == "masked" and args.likelihood_sigma == 0 and args.noise_aware_c == 0:
        p.error("--likelihood-sigma and --noise-aware-c are both 0: the likelihood variance would be 0")


def load_inputs(args, device):
    """The prior: the EDM denoiser (its schedule and dataset copied onto args) or the exact Gaussian prior; and x*, the
    --index-th test image of class --digit (1 x 1 x 28 x 28 in [-1, 1])."""
    if args.exact_prior:
        import posterior_calibration  # it imports this script
        x, labels, _, _ = common.load_image_dataset("mnist", args.data_root, train=True, val_size=0)
        vars(args).update(sigma_min=0.002, sigma_max=80.0, rho=7.0, dataset="mnist")
        D = posterior_calibration.mnist_priors(x, labels)[0]
    else:
        D, ckpt = edm_mnist.load_denoiser(args.checkpoint, device)
        vars(args).update({k: ckpt["config"][k] for k in ("sigma_min", "sigma_max", "rho", "dataset")})
    x, y = common.load_image_dataset(args.dataset, args.data_root, train=False)
    idx = (y == args.digit).nonzero().flatten()
    if args.index >= len(idx):
        raise common.UsageError(f"--index {args.index}: only {len(idx)} images of digit {args.digit} in the "
                                f"{args.dataset} test split")
    return D, x[idx[args.index]].unsqueeze(0)


def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    add_posterior_args(p)
    p.add_argument("--n-samples", type=common.num(int, 1, 10**6), help="posterior draws per experiment")
    args = common.parse(p, argv)
    check_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = common.get_device(args.device)
    torch.manual_seed(args.seed)
    D, x_true = load_inputs(args, device)  # bad input is found before the run folder exists
    run = harness.Run(SCRIPT, args)
    judge = evaluate.get_judge(args.dataset, args.data_root, args.out, "cpu", args.judge_epochs)["model"]
    run.log(device=str(device), digit=args.digit, guidance=args.guidance, sample_steps=args.sample_steps,
            evaluations=2 * args.sample_steps - 1)
    results = {}
    for e, observed in enumerate(args.observed):
        name = tag(observed)
        mask = make_mask(args.mask, observed, args.mask_seed)
        y = observe(x_true, mask, args.measurement_noise, args.mask_seed)
        t0 = time.time()
        draws = draw(D, y, mask, args.n_samples, args, args.seed + 1000 * e, device, args.sample_batch,
                     f"{name} posterior", lambda b, nb: run.progress(name, e * nb + b, len(args.observed) * nb))
        secs = time.time() - t0
        m, mean, std = posterior_metrics(draws, x_true, y, mask, args.digit, judge)
        results[name] = dict(m, seconds=round(secs, 2), seconds_per_draw=round(secs / len(draws), 4))
        run.log(experiments=results)
        torch.save({"draws": draws, "x_true": x_true, "y": y, "mask": mask, "digit": args.digit},
                   run.path(f"draws_{name}.pt"))
        title = f"{args.guidance} guidance, {args.mask} mask, {100 * observed:g}% observed, {args.sample_steps} steps"
        panels = [(x_true, "ground truth", GRAY), (mask * 2 - 1, "mask (white = seen)", GRAY), (y, "observed y", GRAY)]
        panels += [(d[None], f"draw {j + 1}", GRAY) for j, d in enumerate(draws[:6])]  # y is 0 (grey) off the mask
        common.image_row(run.path(f"setup_{name}.png"), panels, title)
        common.image_grid(run.path(f"samples_{name}.png"), draws[:100], nrow=10, title=f"posterior draws: {title}")
        common.image_row(run.path(f"mean_std_{name}.png"), [
            (x_true, "ground truth", GRAY), (mean, "posterior mean", GRAY), (std, "per-pixel std", HEAT),
            ((mean - x_true).abs() * (1 - mask), "|mean - truth| (hidden)", HEAT)],
            f"{100 * observed:g}% observed: PSNR {m['psnr_unobserved'] or float('inf'):.1f} dB on hidden "
            f"pixels, judge {100 * m['judge_accuracy']:.0f}% digit {args.digit}")
        print(f"{name}: PSNR(hidden) {m['psnr_unobserved'] or float('inf'):.2f} dB, judge {m['judge_accuracy']:.3f}, "
              f"std {m['mean_posterior_std']:.3f}, {secs:.1f} s")
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

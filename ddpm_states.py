"""ddpm_states.py: an unconditional DDPM (Ho, Jain and Abbeel 2020) on STATES, 2-D outlines of five US states.

Forward process, for t = 1..T with a linear beta schedule (beta_1 = 1e-4 ... beta_T = 0.02, T = 500):
    alpha_t = 1 - beta_t,   alpha_bar_t = prod_{s<=t} alpha_s
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  i.e.  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
Training: an MLP eps_theta(x_t, t_bar) predicts the noise; loss = E || eps - eps_theta(x_t, t_bar) ||^2 with t uniform,
    t_bar = 2 (t - T/2) / T rescales the step to [-1, 1] (t counted 0..T-1 in the code).
Ancestral sampling, x_T ~ N(0, I), then for t = T..1:
    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z,   z ~ N(0, I)
    sigma_t^2 = beta_t (default) or beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t  (--sigma beta_tilde),
    and no noise on the last step (x_0 is returned as the mean).
The first term is the mean of the true posterior q(x_{t-1} | x_t, x_0) with x_0 replaced by its estimate from eps_theta;
sigma_t z is that posterior's spread. A course handout writes "+ z_t" with no sigma_t: that adds unit variance at each
of the T steps, so the chain never contracts onto the data and the samples are a cloud of width ~sqrt(T)
instead of outlines. The two variance choices are Ho et al.'s upper (beta_t) and lower (beta_tilde_t) bounds.

The score is the negative log-likelihood of the samples under a Gaussian KDE of the training points
(common.nll_score), and the reverse direction (held-out real points under a KDE of the samples), which rises
when a part of an outline is missing from the samples.

Usage:  python ddpm_states.py            (default run, ~4 minutes on 2 CPU cores)
        python ddpm_states.py --quick    (seconds)
"""
import math
import time

import numpy as np
import torch
import torch.nn as nn

import common

SCRIPT = "ddpm_states"


# ----------------------------------------------------------------------------- data
def load_data(args):
    """(train points, train labels, validation points, validation labels): STATES, or a --data file split 80/20."""
    if args.data:
        return common.split_points(*common.load_points(args.data), seed=args.seed)
    x, y = common.make_states(args.n_per_state, args.seed, "train")
    xv, yv = common.make_states(args.n_per_state, args.seed, "val")
    return x, y, xv, yv


# ----------------------------------------------------------------------------- model
class Denoiser(nn.Module):
    """eps_theta(x_t, t_bar): an MLP on the 3-vector (x, y, t_bar) with `layers` hidden layers of `hidden` units."""

    def __init__(self, hidden=256, layers=4):
        super().__init__()
        dims = [3] + [hidden] * layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]  # measured: ReLU draws sharper outlines than SiLU at equal steps
        self.net = nn.Sequential(*body, nn.Linear(hidden, 2))

    def forward(self, x, t_bar):
        return self.net(torch.cat([x, t_bar[:, None]], dim=1))


def t_bar(t, T):
    """The step index t in 0..T-1 rescaled to [-1, 1): t_bar = 2 (t - T/2) / T."""
    return 2.0 * (t.float() - T / 2) / T


# ----------------------------------------------------------------------------- schedule
class Schedule:
    """Linear betas and the quantities derived from them; index i = 0..T-1 holds step t = i + 1."""

    def __init__(self, T=500, beta_start=1e-4, beta_end=0.02, device="cpu"):
        self.T = T
        self.beta = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alpha = 1.0 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t: the variance of q(x_{t-1} | x_t, x_0)
        self.beta_tilde = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * self.beta
        for k in ("beta", "alpha", "alpha_bar", "alpha_bar_prev", "beta_tilde"):  # float32 on the device
            setattr(self, k, getattr(self, k).float().to(device))


def q_sample(s, x0, t, eps):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for a batch of step indices t."""
    ab = s.alpha_bar[t][:, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def reverse_mean(s, xt, t, eps):
    """(x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t): the posterior mean with x_0 estimated from eps."""
    return (xt - s.beta[t][:, None] / (1 - s.alpha_bar[t][:, None]).sqrt() * eps) / s.alpha[t][:, None].sqrt()


# ----------------------------------------------------------------------------- training
def train_denoiser(x, xv, args, device, run=None):
    """Fit eps_theta on the whole training set held on the device, with batches of `batch_size` indices drawn
    with replacement (larger than the set: each step sees every point about batch/N times, at fresh t and eps).
    Returns (model, history). The validation loss uses fixed t and eps so its curve is not noisy."""
    s = Schedule(args.T, args.beta_start, args.beta_end, device)
    model = Denoiser(args.hidden, args.layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    x, xv = x.to(device), xv.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    tv = torch.randint(0, args.T, (len(xv),), generator=g, device=device)
    ev = torch.randn(xv.shape, generator=g, device=device)
    losses = torch.zeros(args.steps, device=device)  # kept on the device: no host sync per step
    hist = {"step": [], "train": [], "val": []}
    last_good = None
    bar = common.progress_bar(range(args.steps), desc="train denoiser")
    for step in bar:
        idx = torch.randint(0, len(x), (args.batch_size,), device=device)
        t = torch.randint(0, args.T, (args.batch_size,), device=device)
        eps = torch.randn(args.batch_size, 2, device=device)
        loss = (eps - model(q_sample(s, x[idx], t, eps), t_bar(t, args.T))).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        losses[step] = loss.detach()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            chunk = losses[max(0, step + 1 - args.eval_every): step + 1]
            if not torch.isfinite(chunk).all():  # one sync per eval interval; find the exact step
                bad = max(0, step + 1 - args.eval_every) + int((~torch.isfinite(chunk)).nonzero()[0])
                raise FloatingPointError(f"loss became {losses[bad].item()} at step {bad}", last_good)
            with torch.no_grad():
                val = (ev - model(q_sample(s, xv, tv, ev), t_bar(tv, args.T))).square().mean().item()
            hist["step"].append(step + 1)
            hist["train"].append(chunk.mean().item())
            hist["val"].append(val)
            last_good = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.set_postfix(train=f"{hist['train'][-1]:.4f}", val=f"{val:.4f}")
            if run:
                run.progress("train", step + 1, args.steps)
    return model, hist


def denoiser_checkpoint(state, args, hist):
    """The denoiser.pt dict for the weights `state` (a state_dict)."""
    return {"script": SCRIPT, "kind": "denoiser", "model": state, "history": hist,
            "config": {k: getattr(args, k) for k in ("T", "beta_start", "beta_end", "hidden", "layers")}}


def load_denoiser(path, device):
    """(model, Schedule) from a denoiser.pt written by this script; a one-line UsageError otherwise."""
    ck = common.load_checkpoint(path, SCRIPT, "denoiser")
    c = ck["config"]
    model = Denoiser(c["hidden"], c["layers"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), Schedule(c["T"], c["beta_start"], c["beta_end"], device)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, s, n, gen, sigma="beta", record_every=0):
    """Ancestral sampling (see the module docstring). Returns x_0, and the trajectory every `record_every` steps."""
    device = s.beta.device
    x = torch.randn(n, 2, generator=gen, device=device)
    traj = [(s.T, x.cpu())]
    var = s.beta if sigma == "beta" else s.beta_tilde
    for i in reversed(range(s.T)):
        t = torch.full((n,), i, device=device, dtype=torch.long)
        x = reverse_mean(s, x, t, model(x, t_bar(t, s.T)))
        if i > 0:  # no noise on the last step
            x = x + var[i].sqrt() * torch.randn(x.shape, generator=gen, device=device)
        if record_every and i % record_every == 0:
            traj.append((i, x.cpu()))
    return x, traj


# ----------------------------------------------------------------------------- evaluation
def nn_distance(points, reference):
    """Mean Euclidean distance from each point to its nearest reference point. The KDE's Scott bandwidth
    (about 0.24 here) blurs away how far samples sit off a thin outline; this does not."""
    return float(torch.cat([torch.cdist(p, reference).min(1).values for p in points.split(4096)]).mean())


def score_samples(samples, x_train, x_val):
    """Forward NLL (samples under the KDE of the training set), reverse NLL (held-out points under the KDE
    of the samples), nearest-data distance, and each one's floor (held-out real points in place of the samples)."""
    return {"nll": common.nll_score(samples, x_train), "nll_floor": common.nll_score(x_val, x_train),
            "reverse_nll": common.nll_score(x_val, samples),
            "reverse_nll_floor": common.nll_score(x_val, x_train[: len(samples)]),
            "nn_dist": nn_distance(samples, x_train), "nn_dist_floor": nn_distance(x_val, x_train)}


def plot_panels(path, panels, background, title):
    """A row of scatter plots: panels is a list of (caption, points)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (caption, pts) in zip(np.atleast_1d(axes), panels):
        ax.scatter(*background.T, s=0.5, c="0.85")
        ax.scatter(*np.asarray(pts).T, s=0.5, c="C0")
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[], title=caption)
    fig.suptitle(title)
    common.save_fig(fig, path)


# ----------------------------------------------------------------------------- main
def add_denoiser_args(p):
    """Denoiser flags, shared with classifier_guidance_states.py (which may train one itself)."""
    p.add_argument("--T", type=common.positive_int, default=500, help="number of diffusion steps")
    p.add_argument("--beta-start", type=common.positive_float, default=1e-4, help="beta_1 of the linear schedule")
    p.add_argument("--beta-end", type=common.positive_float, default=0.02, help="beta_T of the linear schedule")
    p.add_argument("--hidden", type=common.positive_int, default=256, help="units per hidden layer of the MLP")
    p.add_argument("--layers", type=common.positive_int, default=4, help="hidden layers of the MLP")
    p.add_argument("--steps", type=common.positive_int, default=2500, help="denoiser optimisation steps")
    p.add_argument("--batch-size", type=common.positive_int, default=10000, help="points per step (with replacement)")
    p.add_argument("--lr", type=common.positive_float, default=1e-2, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--eval-every", type=common.positive_int, default=100, help="steps between validation losses")
    p.add_argument("--n-per-state", type=common.positive_int, default=1000, help="STATES points per state")
    p.add_argument("--data", default=None, help="external point set: .pt dict {'data': N x 2, 'labels': N}")


def parse_with_quick(p, **quick):
    """Parse the command line; --quick makes `quick` the defaults of the settings that cost time, so a flag given
    explicitly still wins (python ddpm_states.py --quick --steps 50)."""
    if p.parse_known_args()[0].quick:
        p.set_defaults(**quick)
    return p.parse_args()


def main():
    p = common.make_parser(__doc__)
    add_denoiser_args(p)
    p.add_argument("--sigma", default="beta", choices=["beta", "beta_tilde"], help="reverse-step variance sigma_t^2")
    p.add_argument("--n-samples", type=common.positive_int, default=5000, help="samples to draw and score")
    args = parse_with_quick(p, T=100, steps=200, batch_size=2000, n_samples=1000, n_per_state=200, eval_every=50)
    if not 0 < args.beta_start < args.beta_end < 1:
        raise common.UsageError(f"need 0 < --beta-start < --beta-end < 1, got {args.beta_start}, {args.beta_end}")
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    x, y, xv, yv = load_data(args)  # bad input fails here, before a run folder exists

    run = common.Run(SCRIPT, args)
    print(f"run folder: {run.dir}  device: {device}  train {len(x)} / val {len(xv)} points")
    t0 = time.time()
    try:
        model, hist = train_denoiser(x, xv, args, device, run)
    except FloatingPointError as e:
        msg, last_good = e.args
        if last_good is not None:  # the weights of the last evaluation whose losses were all finite
            torch.save(denoiser_checkpoint(last_good, args, {}), run.path("denoiser.pt"))
            msg += f"; the last good weights are in {run.path('denoiser.pt')}"
        else:
            msg += "; it failed before the first evaluation, so no checkpoint was written"
        run.finish("failed", msg)
        raise SystemExit(f"{SCRIPT}: error: {msg}")
    train_s = time.time() - t0
    torch.save(denoiser_checkpoint(model.state_dict(), args, hist), run.path("denoiser.pt"))

    run.progress("sample", 0, 1, force=True)
    t1 = time.time()
    s = Schedule(args.T, args.beta_start, args.beta_end, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    samples, traj = sample(model.eval(), s, args.n_samples, gen, args.sigma, record_every=args.T // 5)
    samples = samples.cpu()
    sample_s = time.time() - t1
    torch.save(samples, run.path("uncond_gen_samples.pt"))

    run.progress("evaluate", 0, 1, force=True)
    metrics = score_samples(samples, x, xv)
    metrics.update(final_train_loss=hist["train"][-1], final_val_loss=hist["val"][-1], steps=args.steps,
                   train_time_s=round(train_s, 2), sample_time_s=round(sample_s, 2),
                   train_steps_per_s=round(args.steps / train_s, 2), finite_samples=bool(torch.isfinite(samples).all()),
                   device=str(device))
    run.log(**metrics)

    common.scatter(run.path("samples.png"), samples, background=x,
                   title=f"DDPM samples (NLL {metrics['nll']:.3f}, floor {metrics['nll_floor']:.3f})")
    common.plot_curves(run.path("loss.png"), {"train": (hist["step"], hist["train"]),
                                              "validation": (hist["step"], hist["val"])},
                       title="noise-prediction MSE")
    ts = [0, args.T // 10, args.T // 4, args.T // 2, args.T - 1]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    s_cpu = Schedule(args.T, args.beta_start, args.beta_end)
    plot_panels(run.path("forward_process.png"),
                [(f"t={t + 1}", q_sample(s_cpu, x, torch.full((len(x),), t), eps)) for t in ts], x,
                "forward process q(x_t | x_0)")
    plot_panels(run.path("reverse_process.png"), [(f"t={t}", pts) for t, pts in traj], x,
                "reverse process: x_t while sampling")
    run.finish()
    print(f"NLL {metrics['nll']:.3f} (floor {metrics['nll_floor']:.3f}), reverse NLL {metrics['reverse_nll']:.3f} "
          f"(floor {metrics['reverse_nll_floor']:.3f}); train {train_s:.0f}s, sample {sample_s:.0f}s -> {run.dir}")


if __name__ == "__main__":
    common.run_main(main)

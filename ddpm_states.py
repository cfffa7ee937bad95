"""ddpm_states.py: an unconditional DDPM (Ho, Jain and Abbeel 2020) on STATES, 2-D outlines of five US states.

Forward process, t = 1..T, linear betas beta_1 = 1e-4 ... beta_T = 0.02, T = 500:
    alpha_t = 1 - beta_t,   alpha_bar_t = prod_{s<=t} alpha_s
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
Training: an MLP eps_theta(x_t, t_bar) predicts the noise, L = E_{x_0, t, eps} || eps - eps_theta(x_t, t_bar) ||^2,
    t uniform, t_bar = 2 (i - T/2) / T in [-1, 1) for the index i = t - 1.
Ancestral sampling: x_T ~ N(0, I), then for t = T..1
    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t_bar)) / sqrt(alpha_t) + sigma_t z,   z ~ N(0, I)
    sigma_t^2 = beta_t (--variance beta, default) or beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t,
    with no noise on the last step (x_0 is the mean).
The first term is the mean of the true posterior q(x_{t-1} | x_t, x_0) with x_0 estimated from eps_theta; sigma_t z is
that posterior's spread (beta_t and beta_tilde_t are Ho et al.'s upper and lower bounds). A course handout writes
"+ z_t" with no sigma_t: that adds unit variance at each of the T steps, and the samples become a cloud of width
~sqrt(T) instead of outlines.

Scores: the negative log-likelihood of the samples under a Gaussian KDE of the training points, the reverse direction
(held-out points under a KDE of the samples, which rises when part of an outline is missing), and nn_dist, the mean
distance from a sample to its nearest training point; each next to its floor, held-out real points in their place.

Usage:  python ddpm_states.py                  (the default run, about 4 minutes on 2 CPU cores)
        python ddpm_states.py --quick          (seconds)
        python ddpm_states.py --resume outputs/ddpm_states/RUN/denoiser.pt   (continue an interrupted run)
"""
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

import common
import harness

SCRIPT = "ddpm_states"
PRESETS = {"default": dict(T=500, train_steps=2500, batch_size=10000, n_samples=5000, n_per_state=1000, eval_every=100),
           "quick": dict(T=100, train_steps=200, batch_size=2000, n_samples=1000, n_per_state=200, eval_every=50)}


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
class Schedule:
    """beta_t and what follows from it (float32, on `device`); index i = t - 1 holds step t = 1..T."""

    def __init__(self, beta, device="cpu"):
        beta = beta.double()
        alpha_bar = torch.cumprod(1 - beta, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta  # the variance of q(x_{t-1} | x_t, x_0)
        for name, v in dict(beta=beta, alpha=1 - beta, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                            beta_tilde=beta_tilde).items():
            setattr(self, name, v.float().to(device))
        self.T = len(beta)


def linear_beta(T=500, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def q_sample(x0, i, eps, sched):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for a batch of indices i = t - 1."""
    ab = sched.alpha_bar[i].view(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def t_bar(i, T):
    """The index i = 0..T-1 rescaled to [-1, 1): the network's time input, at the scale of the coordinates."""
    return 2.0 * (i.float() - T / 2) / T


class EpsMLP(nn.Module):
    """eps_theta(x_t, t_bar): an MLP on the 3-vector (x, y, t_bar), `layers` hidden layers of `hidden` units."""

    def __init__(self, hidden=256, layers=4):
        super().__init__()
        dims, body = [3] + [hidden] * layers, []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]  # measured: ReLU draws sharper outlines than SiLU at equal steps
        self.net = nn.Sequential(*body, nn.Linear(hidden, 2))

    def forward(self, x, t_bar):
        return self.net(torch.cat([x, t_bar[:, None]], dim=1))


def ddpm_loss(eps_model, x0, i, eps, sched):
    """|| eps - eps_theta(x_t, t_bar) ||^2, averaged over the batch and the coordinates."""
    return (eps - eps_model(q_sample(x0, i, eps, sched), t_bar(i, sched.T))).square().mean()


def reverse_mean(x, i, eps, sched):
    """(x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t): the mean of q(x_{t-1} | x_t, x_0), x_0 from eps."""
    return (x - sched.beta[i] / (1 - sched.alpha_bar[i]).sqrt() * eps) / sched.alpha[i].sqrt()


@torch.no_grad()
def sample(eps_model, sched, n, gen, variance="beta", record_every=0):
    """Ancestral sampling of n points (module docstring). gen: a torch.Generator on the schedule's device.
    Returns x_0 and [(t, x_t)] every `record_every` steps (with x_T)."""
    x = torch.randn(n, 2, generator=gen, device=sched.beta.device)
    traj, var = [(sched.T, x.cpu())], sched.beta if variance == "beta" else sched.beta_tilde
    for i in reversed(range(sched.T)):
        idx = torch.full((n,), i, device=x.device)
        x = reverse_mean(x, i, eps_model(x, t_bar(idx, sched.T)), sched)
        if i > 0:  # no noise on the last step
            x = x + var[i].sqrt() * torch.randn(x.shape, generator=gen, device=x.device)
        if record_every and i % record_every == 0:
            traj.append((i, x.cpu()))
    return x, traj
# ==== end of core ====


# ----------------------------------------------------------------------------- data: STATES
STATE_NAMES = ["Michigan", "Idaho", "Ohio", "Oklahoma", "Wisconsin"]  # labels 0..4
RING_ORDER = ["Ohio", "Wisconsin", "Oklahoma", "Idaho", "Michigan"]  # clockwise from the top
RING_RADIUS, STATE_SIZE, JITTER = 1.6, 1.0, 0.01


def state_outlines():
    """Each state's closed outline(s) from assets/states_outlines.json: projected (x = lon cos(mean lat), y = lat),
    centred on its bounding box, scaled so its larger side is STATE_SIZE, and placed on the ring."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "states_outlines.json")) as f:
        raw = json.load(f)["states"]
    out = {}
    for name in STATE_NAMES:
        rings = [np.asarray(r, dtype=np.float64) for r in raw[name]]
        lat0 = np.mean(np.concatenate(rings)[:, 1])
        rings = [r * [math.cos(math.radians(lat0)), 1.0] for r in rings]
        lo, hi = np.concatenate(rings).min(0), np.concatenate(rings).max(0)
        angle = math.pi / 2 - 2 * math.pi * RING_ORDER.index(name) / len(RING_ORDER)  # clockwise
        centre = RING_RADIUS * np.array([math.cos(angle), math.sin(angle)])
        out[name] = [(r - (lo + hi) / 2) * STATE_SIZE / (hi - lo).max() + centre for r in rings]
    return out


def states_raw(n_per_state, seed, jitter=JITTER):
    """n points per state, uniform by arc length over all of its rings, plus Gaussian jitter; labels 0..4."""
    gen, lines, pts = np.random.default_rng(seed), state_outlines(), []
    for name in STATE_NAMES:
        segs = np.concatenate([np.stack([r[:-1], r[1:]], 1) for r in lines[name]])  # (S, 2 ends, 2)
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1))])
        s = gen.uniform(0, cum[-1], size=n_per_state)
        k = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(segs) - 1)
        u = ((s - cum[k]) / (cum[k + 1] - cum[k]))[:, None]
        pts.append(segs[k, 0] + u * (segs[k, 1] - segs[k, 0]) + jitter * gen.standard_normal((n_per_state, 2)))
    return np.concatenate(pts), np.repeat(np.arange(len(STATE_NAMES)), n_per_state)


def make_states(n_per_state=1000, seed=0, split="train", jitter=JITTER):
    """STATES: (points float32 N x 2, labels int64 N), N = 5 n_per_state, standardized per axis with the mean and
    std of a large fixed draw (the same map for every split). "train" and "val" are independent draws."""
    pts, labels = states_raw(n_per_state, seed + {"train": 0, "val": 1_000_003}[split], jitter)
    ref, _ = states_raw(200_000, seed=12345)
    pts = (pts - ref.mean(0)) / ref.std(0)
    return torch.tensor(pts, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def load_points(path):
    """A point set in the course's format: a torch .pt file holding {'data': float N x 2, 'labels': int N}, finite,
    labels 0..K-1 with every class present, at least 10 points (8 to train on, 2 held out)."""
    want = "a torch .pt file holding {'data': float tensor N x 2, 'labels': int tensor N}"
    if not os.path.isfile(path):
        raise common.UsageError(f"--data {path}: no such file; expected {want}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise common.UsageError(f"--data {path}: cannot read it ({type(e).__name__}); expected {want}") from None
    data, labels = (obj.get("data"), obj.get("labels")) if isinstance(obj, dict) else (None, None)
    if not (isinstance(data, torch.Tensor) and isinstance(labels, torch.Tensor)):
        raise common.UsageError(f"--data {path}: expected {want}, got a {type(obj).__name__}")
    problem = ("data is not N x 2" if data.ndim != 2 or data.shape[1] != 2 or not data.is_floating_point() else
               "labels are not N integers" if labels.ndim != 1 or labels.is_floating_point() or len(labels) != len(data)
               else f"{len(data)} points; at least 10 are needed" if len(data) < 10 else
               "data holds NaN or inf" if not torch.isfinite(data).all() else
               f"labels must be 0..K-1 with every class present, got {sorted(set(labels.tolist()))[:10]}"
               if set(labels.tolist()) != set(range(int(labels.max()) + 1)) else None)
    if problem:
        raise common.UsageError(f"--data {path}: {problem} (data {tuple(data.shape)}, labels {tuple(labels.shape)})")
    return data.float(), labels.long()


def load_data(args):
    """(train points, labels, validation points, labels): STATES, or a --data file split 80/20 (fixed permutation)."""
    if not args.data:
        return (*make_states(args.n_per_state, args.seed, "train"), *make_states(args.n_per_state, args.seed, "val"))
    x, y = load_points(args.data)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    t, v = perm[len(x) // 5:], perm[:len(x) // 5]
    return x[t], y[t], x[v], y[v]


# ----------------------------------------------------------------------------- training
def train(eps_model, sched, x, xv, args, run, resume=None):
    """Adam, one-cycle learning rate; each step draws batch_size points with replacement from the whole set (more
    than it holds: every point is seen about batch/N times per step, at fresh t and eps). The validation loss uses
    one fixed draw of t and eps, so its curve shows the model, not the draw."""
    device = sched.beta.device
    opt = torch.optim.Adam(eps_model.parameters(), lr=args.lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.train_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed + 1)
    iv = torch.randint(0, sched.T, (len(xv),), generator=g).to(device)
    ev = torch.randn(xv.shape, generator=g).to(device)
    loop = harness.TrainLoop(run, args.train_steps, args.eval_every, {"model": eps_model, "optimizer": opt,
                             "lr_sched": lr_sched}, args.seed, vars(args), run.path("denoiser.pt"), "denoiser", resume,
                             script=SCRIPT)
    for step in loop:
        idx = torch.randint(0, len(x), (args.batch_size,), generator=loop.gen)
        i = torch.randint(0, sched.T, (args.batch_size,), generator=loop.gen).to(device)
        eps = torch.randn((args.batch_size, 2), generator=loop.gen).to(device)
        loss = ddpm_loss(eps_model, x[idx.to(device)], i, eps, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if loop.record(loss):
            with torch.no_grad():
                loop.evaluate(val_loss=ddpm_loss(eps_model, xv, iv, ev, sched).item())
    return loop


def load_denoiser(path, device):
    """(eps_model, Schedule) from a denoiser.pt written by this script (classifier_guidance_states.py reads it)."""
    ck = harness.load_checkpoint(path, SCRIPT, "denoiser")
    c = ck["config"]
    eps_model = EpsMLP(c["hidden"], c["layers"])
    eps_model.load_state_dict(ck["model"])
    return eps_model.to(device).eval(), Schedule(linear_beta(c["T"], c["beta_start"], c["beta_end"]), device)


# ----------------------------------------------------------------------------- evaluation
def kde_logpdf(points, reference, chunk=2048):
    """log p(x) under the Gaussian KDE of `reference`, exactly as scipy.stats.gaussian_kde defines it:
    p(x) = (1/n) sum_i N(x; r_i, H), H = Cov(reference) n^(-2/(d+4)) (Scott's rule), the covariance with 1/(n-1).
    Float64 and a log-sum-exp. Non-finite or degenerate (collinear, repeated) inputs are a RunError, not a traceback."""
    x, r = (torch.as_tensor(a, dtype=torch.float64).cpu() for a in (points, reference))
    n, d = r.shape
    if not (torch.isfinite(x).all() and torch.isfinite(r).all()):
        raise harness.RunError(f"cannot score: {int((~torch.isfinite(x)).any(1).sum())} of {len(x)} samples are "
                               f"not finite (the model diverged)")
    L, info = torch.linalg.cholesky_ex(torch.cov(r.T).reshape(d, d) * n ** (-2.0 / (d + 4)))
    if info:
        raise harness.RunError(f"cannot score: the {n} reference points have a singular covariance (all on a line?)")
    rw = torch.linalg.solve_triangular(L, r.T, upper=False).T  # whitened reference
    log_norm = -torch.log(torch.diagonal(L)).sum() - 0.5 * d * math.log(2 * math.pi) - math.log(n)
    out = [torch.logsumexp(-0.5 * torch.cdist(torch.linalg.solve_triangular(L, xc.T, upper=False).T, rw).square(), 1)
           for xc in x.split(chunk)]
    return torch.cat(out) + log_norm


def nll_score(points, reference):
    """Mean -log p(x) of `points` under the Gaussian KDE (Scott's bandwidth) of `reference`."""
    return float(-kde_logpdf(points, reference).mean())


def nn_distance(points, reference):
    """Mean Euclidean distance from each point to its nearest reference point: the KDE's bandwidth (about 0.24
    here) blurs away how far samples sit off a thin outline; this does not."""
    return float(torch.cat([torch.cdist(p, reference).min(1).values for p in points.split(4096)]).mean())


def score_samples(samples, x_train, x_val):
    """Forward NLL, reverse NLL, nn_dist, and each one's floor (held-out real points in the samples' place). The
    reverse floor takes a fixed random subset of the training set as large as the sample set, so both KDEs get the
    same Scott factor n^(-1/6) and every state is in it."""
    subset = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:len(samples)]]
    return {"nll": nll_score(samples, x_train), "nll_floor": nll_score(x_val, x_train),
            "reverse_nll": nll_score(x_val, samples), "reverse_nll_floor": nll_score(x_val, subset),
            "nn_dist": nn_distance(samples, x_train), "nn_dist_floor": nn_distance(x_val, x_train)}


def scatter(path, points, labels=None, background=None, title="", names=None):
    """Points coloured by label (or one colour), with the data drawn thin on top so samples off the outline show."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    labels = np.zeros(len(points), int) if labels is None else np.asarray(labels)
    for k in np.unique(labels):
        label = names[k] if names else "samples"
        ax.scatter(*np.asarray(points)[labels == k].T, s=1, c=f"C{k}", alpha=0.5, label=label)
    if background is not None:
        ax.scatter(*np.asarray(background).T, s=0.2, c="k", alpha=0.5, label="data")
    ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=title)
    ax.legend(loc="lower right", markerscale=8, fontsize=7)
    common.save_fig(fig, path)


def scatter_panels(path, panels, background, title):
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
def add_data_args(p):
    """The data flags, shared with classifier_guidance_states.py."""
    p.add_argument("--n-per-state", type=common.num(int, 1, 10**6), help="STATES points per state")
    p.add_argument("--data", default=None, help="a point set instead of STATES: .pt dict {'data': N x 2, 'labels': N}")


def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    add_data_args(p)
    p.add_argument("--T", type=common.num(int, 2, 100_000), help="number of diffusion steps")
    p.add_argument("--beta-start", type=common.num(float, 0, 1, open_lo=True), default=1e-4, help="beta_1 (linear)")
    p.add_argument("--beta-end", type=common.num(float, 0, 1, open_lo=True), default=0.02, help="beta_T (linear)")
    p.add_argument("--hidden", type=common.num(int, 1, 8192), default=256, help="units per hidden layer of the MLP")
    p.add_argument("--layers", type=common.num(int, 1, 64), default=4, help="hidden layers of the MLP")
    p.add_argument("--train-steps", type=common.num(int, 1, 10**7), help="optimizer steps")
    p.add_argument("--batch-size", type=common.num(int, 1, 10**6), help="points per step (with replacement)")
    p.add_argument("--lr", type=common.num(float, 0, 10, open_lo=True), default=1e-2, help="peak learning rate")
    p.add_argument("--eval-every", type=common.num(int, 1), help="steps between validation losses and checkpoints")
    p.add_argument("--variance", default="beta", choices=["beta", "beta_tilde"], help="reverse-step sigma_t^2")
    p.add_argument("--n-samples", type=common.num(int, 1, 10**6), help="samples drawn and scored")
    p.add_argument("--resume", default=None, help="denoiser.pt of an unfinished run: continue it exactly")
    args = common.parse(p, argv)
    if not args.beta_start < args.beta_end:
        p.error(f"need --beta-start < --beta-end, got {args.beta_start:g} and {args.beta_end:g}")
    return args


def main():
    args = parse_args()
    resume = harness.load_checkpoint(args.resume, SCRIPT, "denoiser") if args.resume else None
    args = harness.resumed(args, resume) if resume else args
    device = common.get_device(args.device)
    torch.manual_seed(args.seed)  # the initial weights
    x, y, xv, yv = load_data(args)  # bad input is found here, before the run folder exists
    sched = Schedule(linear_beta(args.T, args.beta_start, args.beta_end), device)
    eps_model = EpsMLP(args.hidden, args.layers).to(device)

    run = harness.Run(SCRIPT, args)
    print(f"run folder: {run.dir}  device: {device}  train {len(x)} / val {len(xv)} points")
    loop = train(eps_model, sched, x.to(device), xv.to(device), args, run, resume)
    run.progress("sample", 0, 1, force=True)
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    samples, traj = sample(eps_model.eval(), sched, args.n_samples, gen, args.variance, record_every=args.T // 5)
    samples = samples.cpu()
    sample_s = time.time() - t0
    torch.save(samples, run.path("uncond_gen_samples.pt"))

    run.progress("evaluate", 0, 1, force=True)
    metrics = score_samples(samples, x, xv)
    run.log(**metrics, final_train_loss=loop.history["train"][-1], final_val_loss=loop.history["val_loss"][-1],
            train_time_s=round(loop.seconds, 2),
            train_steps_per_s=round((loop.s["step"] - loop.start) / max(loop.seconds, 1e-9), 2),
            sample_time_s=round(sample_s, 2), finite_samples=bool(torch.isfinite(samples).all()), device=str(device))
    scatter(run.path("samples.png"), samples, background=x,
            title=f"DDPM samples (NLL {metrics['nll']:.3f}, floor {metrics['nll_floor']:.3f})")
    common.plot_curves(run.path("loss.png"), {"train": (loop.history["step"], loop.history["train"]),
                                              "validation": (loop.history["step"], loop.history["val_loss"])},
                       title="noise-prediction MSE")
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sched_cpu = Schedule(linear_beta(args.T, args.beta_start, args.beta_end))
    shown = (0, args.T // 10, args.T // 4, args.T // 2, args.T - 1)  # indices i = t - 1
    forward = [(f"t={i + 1}", q_sample(x, torch.full((len(x),), i), eps, sched_cpu)) for i in shown]
    scatter_panels(run.path("forward_process.png"), forward, x, "forward process q(x_t | x_0)")
    scatter_panels(run.path("reverse_process.png"), [(f"t={t}", pts) for t, pts in traj], x,
                   "reverse process: x_t while sampling")
    run.finish()
    print(f"NLL {metrics['nll']:.3f} (floor {metrics['nll_floor']:.3f}), reverse NLL {metrics['reverse_nll']:.3f} "
          f"(floor {metrics['reverse_nll_floor']:.3f}), nn_dist {metrics['nn_dist']:.4f} -> {run.dir}")


if __name__ == "__main__":
    harness.main(main)

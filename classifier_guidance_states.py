"""classifier_guidance_states.py: classifier guidance (Dhariwal and Nichol 2021) on STATES.

A trained unconditional noise predictor eps_theta (ddpm_states.py) is steered towards one state y by the gradient of
a noise-aware classifier p_phi(y | x_t, t_bar), an MLP with hidden layers 100, 200, 500 trained with cross-entropy on
noised points x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at uniformly random t.

Why it works: eps_theta estimates -sqrt(1 - alpha_bar_t) grad_x log p(x_t), and by Bayes
grad_x log p(x_t | y) = grad_x log p(x_t) + grad_x log p(y | x_t). Shifting the noise estimate by the classifier's
gradient therefore gives the noise of the conditional distribution (a scale s = --w > 1 sharpens it):
    eps_hat = eps_theta(x_t) - s sqrt(1 - alpha_bar_t) grad_{x_t} log p_phi(y | x_t)      (log-softmax of the logits)
and the deterministic (DDIM, eta = 0) step of the paper's Algorithm 2 uses it twice:
    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1}) eps_hat           (alpha_bar_0 = 1: x_0 = x0_hat)

Each state's samples are scored like ddpm_states.py's (KDE NLL against the whole training set, the reverse direction
against that state's held-out points, nn_dist), plus on_state: the share whose nearest training point has the
requested label.

Usage:  python classifier_guidance_states.py --checkpoint outputs/ddpm_states/<run-id>/denoiser.pt
        python classifier_guidance_states.py --quick        (trains a small denoiser itself; seconds)
        python classifier_guidance_states.py --resume outputs/classifier_guidance_states/<run-id>/classifier.pt
"""
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness
import ddpm_states

SCRIPT = "classifier_guidance_states"
PRESETS = {"default": dict(train_steps=2000, batch_size=10000, n_samples=5000, n_per_state=1000, eval_every=100,
                       sweep_w=(0.0, 0.5, 1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0), sweep_n=1000),
           "quick": dict(train_steps=200, batch_size=2000, n_samples=300, n_per_state=200, eval_every=50,
                         sweep_w=(0.0, 2.0), sweep_n=100)}


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
class Classifier(nn.Module):
    """p_phi(y | x_t, t_bar): an MLP on (x, y, t_bar) with hidden layers 100, 200, 500, returning logits."""

    def __init__(self, n_classes=5, hidden=(100, 200, 500)):
        super().__init__()
        dims, body = [3, *hidden], []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.SiLU()]  # smooth: its input gradient steers the sampler (ReLU's is flat)
        self.net = nn.Sequential(*body, nn.Linear(hidden[-1], n_classes))

    def forward(self, x, t_bar):
        return self.net(torch.cat([x, t_bar[:, None]], dim=1))


def classifier_loss(clf, x0, y, i, eps, sched):
    """Cross-entropy of p_phi(y | x_t, t_bar) on x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return F.cross_entropy(clf(ddpm_states.q_sample(x0, i, eps, sched), ddpm_states.t_bar(i, sched.T)), y)


def guided_step(eps_model, clf, sched, x, i, y, w):
    """One step of guided DDIM (module docstring) from index i (t = i + 1) to i - 1, guidance scale s = w."""
    idx = torch.full((len(x),), i, device=x.device)
    tb, ab, ab_prev = ddpm_states.t_bar(idx, sched.T), sched.alpha_bar[i], sched.alpha_bar_prev[i]
    with torch.no_grad():
        eps = eps_model(x, tb)
    if w:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            log_p = F.log_softmax(clf(xg, tb), dim=1)[torch.arange(len(x)), y].sum()  # rows are independent
            eps = eps - w * (1 - ab).sqrt() * torch.autograd.grad(log_p, xg)[0]
    x0_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    return ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps


def guided_sample(eps_model, clf, sched, labels, gen, w=1.0, batch=25000):
    """One sample per entry of `labels` (any mix of classes), in batches of `batch` points (the classifier's
    gradient keeps its activations, so memory grows with the batch). gen: a torch.Generator on the device."""
    out = []
    for y in labels.to(sched.beta.device).split(batch):
        x = torch.randn(len(y), 2, generator=gen, device=y.device)
        for i in reversed(range(sched.T)):
            x = guided_step(eps_model, clf, sched, x, i, y, w).detach()
        out.append(x.cpu())
    return torch.cat(out)
# ==== end of core ====


# ----------------------------------------------------------------------------- training
def train_classifier(clf, sched, x, y, xv, yv, args, run, resume=None):
    """Adam, one-cycle learning rate; batches drawn with replacement from the set on the device, each point at a
    fresh t and eps. Validation: held-out points noised once at fixed random t (so the curve shows the model)."""
    device = sched.beta.device
    opt = torch.optim.Adam(clf.parameters(), lr=args.lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.train_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed + 3)
    iv = torch.randint(0, sched.T, (len(xv),), generator=g).to(device)
    xv_t = ddpm_states.q_sample(xv, iv, torch.randn(xv.shape, generator=g).to(device), sched)
    state = {"model": clf, "optimizer": opt, "lr_sched": lr_sched}
    loop = harness.TrainLoop(run, args.train_steps, args.eval_every, state, args.seed, vars(args),
                             run.path("classifier.pt"), "classifier", resume)
    for step in loop:
        idx = torch.randint(0, len(x), (args.batch_size,), generator=loop.gen).to(device)
        i = torch.randint(0, sched.T, (args.batch_size,), generator=loop.gen).to(device)
        eps = torch.randn((args.batch_size, 2), generator=loop.gen).to(device)
        loss = classifier_loss(clf, x[idx], y[idx], i, eps, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if loop.record(loss):
            with torch.no_grad():
                logits = clf(xv_t, ddpm_states.t_bar(iv, sched.T))
            loop.evaluate(val_loss=F.cross_entropy(logits, yv).item(),
                          val_acc=(logits.argmax(1) == yv).float().mean().item())
    return loop


def denoiser(args, run, x, xv, device):
    """The noise predictor to guide: --checkpoint, or one trained here with ddpm_states.py's own defaults (its
    --quick ones under --quick) on the same points, saved as denoiser.pt in this run."""
    if args.checkpoint:
        return ddpm_states.load_denoiser(args.checkpoint, device)
    dargs = ddpm_states.parse_args(["--quick"] * args.quick + ["--seed", str(args.seed), "--out", args.out] +
                                   (["--data", args.data] if args.data else ["--n-per-state", str(args.n_per_state)]))
    sched = ddpm_states.Schedule(ddpm_states.linear_beta(dargs.T, dargs.beta_start, dargs.beta_end), device)
    eps_model = ddpm_states.EpsMLP(dargs.hidden, dargs.layers).to(device)
    ddpm_states.train(eps_model, sched, x, xv, dargs, run)
    args.checkpoint = run.path("denoiser.pt")  # a resumed classifier run guides the same denoiser
    return eps_model.eval(), sched


# ----------------------------------------------------------------------------- evaluation
def on_state_fraction(samples, label, x_train, y_train):
    """Share of samples whose nearest training point carries the requested label (the score does not trust the
    classifier that steered the samples)."""
    nearest = torch.cat([torch.cdist(s, x_train).argmin(dim=1) for s in samples.split(4096)])
    return float((y_train[nearest] == label).float().mean())


def score_states(samples, x, y, xv, yv, names):
    """Per state: NLL and its floor (held-out points of that state under the KDE of the whole training set),
    reverse NLL against that state's held-out points (a KDE of as many samples as the state has training points,
    so both KDEs of the pair get the same Scott factor), nn_dist, on_state."""
    metrics = {}
    for k, name in enumerate(names):
        sk, real_k, train_k = samples[k], xv[yv == k], x[y == k]
        metrics[name] = {"nll": ddpm_states.nll_score(sk, x), "nll_floor": ddpm_states.nll_score(real_k, x),
                         "reverse_nll": ddpm_states.nll_score(real_k, sk[:len(train_k)]),
                         "reverse_nll_floor": ddpm_states.nll_score(real_k, train_k),
                         "nn_dist": ddpm_states.nn_distance(sk, x), "nn_dist_floor": ddpm_states.nn_distance(real_k, x),
                         "on_state": on_state_fraction(sk, k, x, y)}
    return metrics


def guidance_sweep(eps_model, clf, sched, data, names, args, run):
    """The trade the scale makes: every state's on_state share and NLL gap (NLL minus its floor) at each w of
    --sweep-w, from --sweep-n samples per state; returns the rows and draws guidance_sweep.png."""
    import matplotlib.pyplot as plt
    rows, device = [], sched.beta.device
    for k, w in enumerate(args.sweep_w):
        run.progress("guidance sweep", k, len(args.sweep_w), force=True)
        labels = torch.arange(len(names)).repeat_interleave(args.sweep_n)
        gen = torch.Generator(device=device).manual_seed(args.seed + 5)
        m = score_states(guided_sample(eps_model, clf, sched, labels, gen, w, args.sample_batch).split(args.sweep_n),
                         *data, names)
        rows.append({"w": w, "on_state": {n: m[n]["on_state"] for n in names},
                     "nll_gap": {n: m[n]["nll"] - m[n]["nll_floor"] for n in names}})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, worst in ((axes[0], "on_state", min), (axes[1], "nll_gap", max)):
        for n in names:
            ax.plot(args.sweep_w, [r[key][n] for r in rows], "o-", ms=3, lw=0.8, alpha=0.6, label=n)
        ax.plot(args.sweep_w, [worst(r[key].values()) for r in rows], "k-", lw=2, label="worst state")
        ax.set(xlabel="guidance scale w", ylabel={"on_state": "share on the requested state",
                                                  "nll_gap": "NLL minus the state's floor"}[key])
        ax.grid(alpha=0.3)
    axes[0].axhline(0.99, color="grey", ls=":", lw=1)
    axes[1].axhline(0.1, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    fig.suptitle("classifier guidance: on-state share and NLL gap against the scale "
                 f"({args.sweep_n} samples per state)")
    common.save_fig(fig, run.path("guidance_sweep.png"))
    return rows


def plot_prediction_maps(path, clf, sched, x, names, device, steps):
    """The classifier's decision regions over the plane at several t: colour = argmax, opacity = confidence."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    g = torch.linspace(-3, 3, 200)
    grid = torch.stack(torch.meshgrid(g, g.flip(0), indexing="xy"), -1).reshape(-1, 2).to(device)
    colours = torch.tensor([to_rgb(f"C{k}") for k in range(len(names))])
    fig, axes = plt.subplots(1, len(steps), figsize=(2.8 * len(steps), 3.0))
    for ax, i in zip(axes, steps):
        with torch.no_grad():
            p = F.softmax(clf(grid, ddpm_states.t_bar(torch.full((len(grid),), i, device=device), sched.T)), 1).cpu()
        conf, k = p.max(1)
        img = colours[k] * conf[:, None] + (1 - conf[:, None])  # fade to white where the classifier is unsure
        ax.imshow(img.reshape(200, 200, 3).numpy(), extent=(-3, 3, -3, 3))
        ax.scatter(*x.cpu().T, s=0.2, c="k", alpha=0.3)
        ax.set(title=f"t = {i + 1}", xticks=[], yticks=[])
    fig.suptitle("classifier decision regions p_phi(y | x_t) (colour: argmax, fade: uncertainty)")
    common.save_fig(fig, path)


def plot_per_state(path, samples, x, names, metrics):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(samples), figsize=(2.8 * len(samples), 3.1))
    for k, ax in enumerate(np.atleast_1d(axes)):
        ax.scatter(*samples[k].T, s=0.5, c=f"C{k}", alpha=0.4)
        ax.scatter(*x.T, s=0.1, c="k", alpha=0.3)  # the data on top, thin, so samples off the outline show
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[],
               title=f"{names[k]}\non state {100 * metrics[names[k]]['on_state']:.1f}%")
    fig.suptitle("classifier-guided samples, one panel per requested state")
    common.save_fig(fig, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    p.add_argument("--checkpoint", default=None, help="denoiser.pt from ddpm_states.py (default: train one here)")
    ddpm_states.add_data_args(p)
    p.add_argument("--w", type=common.num(float, 0, 1000), default=1.1,
                   help="guidance scale s (0: unguided DDIM; 1.1: chosen by the sweep, "
                        "docs/classifier_guidance_states.md)")
    p.add_argument("--n-samples", type=common.num(int, 1, 10**6), help="samples per state")
    p.add_argument("--sample-batch", type=common.num(int, 1, 10**6), default=25000,
                   help="points per guided-sampling batch (lower it if memory is short)")
    p.add_argument("--sweep-w", type=common.num_list(float, 0, 1000), help="guidance scales of the sweep ('' : none)")
    p.add_argument("--sweep-n", type=common.num(int, 1, 10**6), help="samples per state at each scale of the sweep")
    p.add_argument("--train-steps", type=common.num(int, 1, 10**7), help="classifier optimizer steps")
    p.add_argument("--batch-size", type=common.num(int, 1, 10**6), help="classifier points per step")
    p.add_argument("--lr", type=common.num(float, 0, 10, open_lo=True), default=2e-3, help="classifier peak lr")
    p.add_argument("--eval-every", type=common.num(int, 1), help="steps between validation losses and checkpoints")
    p.add_argument("--resume", default=None, help="classifier.pt of an unfinished run: continue it exactly")
    return common.parse(p, argv)


def main():
    args = parse_args()
    resume = harness.load_checkpoint(args.resume, SCRIPT, "classifier") if args.resume else None
    args = harness.resumed(args, resume, ("w", "n_samples", "sample_batch", "sweep_w", "sweep_n")) if resume else args
    device = common.get_device(args.device)
    x, y, xv, yv = (v.to(device) for v in ddpm_states.load_data(args))  # bad input fails here, before the run folder
    if args.checkpoint:
        ddpm_states.load_denoiser(args.checkpoint, device)
    names = ddpm_states.STATE_NAMES if not args.data else [str(k) for k in range(int(y.max()) + 1)]

    run = harness.Run(SCRIPT, args)
    print(f"run folder: {run.dir}  device: {device}")
    t0 = time.time()
    eps_model, sched = denoiser(args, run, x, xv, device)
    torch.manual_seed(args.seed)  # the classifier's initial weights
    clf = Classifier(len(names)).to(device)
    loop = train_classifier(clf, sched, x, y, xv, yv, args, run, resume)
    train_s = time.time() - t0
    hist = loop.history
    common.plot_curves(run.path("classifier_loss.png"), {"train": (hist["step"], hist["train"]),
                                                         "validation": (hist["step"], hist["val_loss"])},
                       ylabel="cross-entropy", title=f"classifier (final val. accuracy {hist['val_acc'][-1]:.3f})")
    plot_prediction_maps(run.path("prediction_maps.png"), clf.eval(), sched, x, names, device,
                         [0, sched.T // 10, sched.T // 4, sched.T // 2, sched.T - 1])

    t1 = time.time()
    run.progress("sample", 0, 1, force=True)
    gen = torch.Generator(device=device).manual_seed(args.seed + 4)
    labels = torch.arange(len(names)).repeat_interleave(args.n_samples)  # every state in the same batches
    samples = guided_sample(eps_model, clf, sched, labels, gen, args.w, args.sample_batch).split(args.n_samples)
    for k, sk in enumerate(samples):
        torch.save(sk.clone(), run.path(f"cond_gen_samples_{k}.pt"))
    x, y, xv, yv = x.cpu(), y.cpu(), xv.cpu(), yv.cpu()
    metrics = score_states(samples, x, y, xv, yv, names)
    for name, m in metrics.items():
        print(f"{name:10s} on state {100 * m['on_state']:.2f}%  NLL {m['nll']:.3f} (floor {m['nll_floor']:.3f})")
    worst = min(metrics, key=lambda n: metrics[n]["on_state"])
    run.log(per_state=metrics, min_on_state=metrics[worst]["on_state"], worst_state=worst,
            max_nll_gap=max(m["nll"] - m["nll_floor"] for m in metrics.values()), w=args.w,
            classifier_val_acc=hist["val_acc"][-1], train_time_s=round(train_s, 2),
            sample_time_s=round(time.time() - t1, 2), device=str(device))
    if args.sweep_w:
        run.log(guidance_sweep=guidance_sweep(eps_model, clf, sched, (x, y, xv, yv), names, args, run))
    plot_per_state(run.path("guided_samples.png"), samples, x, names, metrics)
    ddpm_states.scatter(run.path("guided_samples_all.png"), torch.cat(samples), labels, background=x, names=names,
                        title=f"classifier guidance, s = {args.w:g}")
    run.finish()
    print(f"done in {time.time() - t0:.0f}s -> {run.dir}")


if __name__ == "__main__":
    harness.main(main)

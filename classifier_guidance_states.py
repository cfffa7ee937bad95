"""classifier_guidance_states.py: classifier guidance (Dhariwal and Nichol 2021) on STATES.

A trained unconditional denoiser eps_theta (ddpm_states.py) is steered towards one state y by the gradient of a
noise-aware classifier p_phi(y | x_t, t_bar), an MLP with hidden layers 100, 200, 500 trained with cross-entropy
on noised points x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at uniformly random t.

Why it works: eps_theta estimates -sqrt(1 - alpha_bar_t) grad_x log p(x_t), and by Bayes
grad_x log p(x_t | y) = grad_x log p(x_t) + grad_x log p(y | x_t). Shifting the noise estimate by the classifier's
gradient therefore gives the noise of the conditional distribution (a scale s > 1 sharpens it):
    eps_hat = eps_theta(x_t) - s sqrt(1 - alpha_bar_t) grad_{x_t} log p_phi(y | x_t)      (log-softmax of the logits)
and the deterministic (DDIM, eta = 0) step of the paper's Algorithm 2 uses it twice:
    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1}) eps_hat           (alpha_bar_0 = 1: x_0 = x0_hat)

Each state's samples are scored like ddpm_states.py's (KDE NLL against the whole training set, and the reverse
direction against that state's held-out points), plus the share whose nearest training point has the requested label.

Usage:  python classifier_guidance_states.py --denoiser outputs/ddpm_states/<run-id>/denoiser.pt
        python classifier_guidance_states.py --quick        (trains a small denoiser itself; seconds)
"""
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import ddpm_states as ddpm

SCRIPT = "classifier_guidance_states"


# ----------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """p_phi(y | x_t, t_bar): MLP on (x, y, t_bar) with hidden layers 100, 200, 500, returning logits."""

    def __init__(self, n_classes=5, hidden=(100, 200, 500)):
        super().__init__()
        dims, body = [3, *hidden], []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.SiLU()]  # smooth: its input gradient drives the sampler (ReLU's is piecewise flat)
        self.net = nn.Sequential(*body, nn.Linear(hidden[-1], n_classes))

    def forward(self, x, t_bar):
        return self.net(torch.cat([x, t_bar[:, None]], dim=1))


# ----------------------------------------------------------------------------- training
def save_classifier(path, state, hist, n_classes, T):
    torch.save({"script": SCRIPT, "kind": "classifier", "model": state, "history": hist,
                "config": {"n_classes": n_classes, "T": T}}, path)


def train_classifier(x, y, xv, yv, s, args, device, run=None):
    """Cross-entropy on noised points at random t; batches of indices drawn with replacement from the set on the
    device. Validation uses fixed t and eps. Returns (model, history with loss and accuracy curves)."""
    clf = Classifier(int(max(y.max(), yv.max())) + 1).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=args.clf_lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.clf_lr, total_steps=args.clf_steps, pct_start=0.05)
    x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed + 3)
    tv = torch.randint(0, s.T, (len(xv),), generator=g, device=device)
    xv_t = ddpm.q_sample(s, xv, tv, torch.randn(xv.shape, generator=g, device=device))
    losses = torch.zeros(args.clf_steps, device=device)
    hist = {"step": [], "train": [], "val": [], "val_acc": []}
    last_good = None  # the weights of the last evaluation whose losses were all finite
    bar = common.progress_bar(range(args.clf_steps), desc="train classifier")
    for step in bar:
        idx = torch.randint(0, len(x), (args.clf_batch_size,), device=device)
        t = torch.randint(0, s.T, (args.clf_batch_size,), device=device)
        xt = ddpm.q_sample(s, x[idx], t, torch.randn(args.clf_batch_size, 2, device=device))
        loss = F.cross_entropy(clf(xt, ddpm.t_bar(t, s.T)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        losses[step] = loss.detach()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.clf_steps:
            chunk = losses[max(0, step + 1 - args.eval_every): step + 1]
            if not torch.isfinite(chunk).all():  # one sync per eval interval; find the exact step (0-based)
                bad = max(0, step + 1 - args.eval_every) + int((~torch.isfinite(chunk)).nonzero()[0])
                raise FloatingPointError(f"loss became {losses[bad].item()} at step {bad}", last_good)
            with torch.no_grad():
                logits = clf(xv_t, ddpm.t_bar(tv, s.T))
            hist["step"].append(step + 1)
            hist["train"].append(chunk.mean().item())
            hist["val"].append(F.cross_entropy(logits, yv).item())
            hist["val_acc"].append((logits.argmax(1) == yv).float().mean().item())
            bar.set_postfix(val=f"{hist['val'][-1]:.3f}", acc=f"{hist['val_acc'][-1]:.3f}")
            last_good = {k: v.detach().clone() for k, v in clf.state_dict().items()}
            if run:
                run.progress("train classifier", step + 1, args.clf_steps)
    return clf.eval(), hist


# ----------------------------------------------------------------------------- sampling
def guided_step(model, clf, s, x, i, y, scale):
    """One step of guided DDIM (module docstring) from step index i (t = i + 1) to i - 1."""
    t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
    tb = ddpm.t_bar(t, s.T)
    ab, ab_prev = s.alpha_bar[i], s.alpha_bar_prev[i]
    with torch.no_grad():
        eps = model(x, tb)
    if scale:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            log_p = F.log_softmax(clf(xg, tb), dim=1)[torch.arange(len(x)), y].sum()  # rows are independent
            grad = torch.autograd.grad(log_p, xg)[0]
        eps = eps - scale * (1 - ab).sqrt() * grad
    x0_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    return ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps


def guided_sample(model, clf, s, labels, gen, scale=1.0, batch=25000):
    """One sample per entry of `labels` (any mix of classes), in batches of `batch` points: the classifier's
    gradient keeps its activations, so memory grows with the batch."""
    out = []
    for y in labels.to(s.beta.device).split(batch):
        x = torch.randn(len(y), 2, generator=gen, device=y.device)
        for i in reversed(range(s.T)):
            x = guided_step(model, clf, s, x, i, y, scale)
        out.append(x.detach().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation
def on_state_fraction(samples, label, x_train, y_train):
    """Share of samples whose nearest training point carries the requested label."""
    nearest = torch.cdist(samples, x_train).argmin(dim=1)
    return float((y_train[nearest] == label).float().mean())


def plot_prediction_maps(path, clf, s, x, names, device, steps):
    """The classifier's decision regions over the plane at several t: colour = argmax, opacity = confidence."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    g = torch.linspace(-3, 3, 200)
    grid = torch.stack(torch.meshgrid(g, g.flip(0), indexing="xy"), -1).reshape(-1, 2).to(device)
    colours = torch.tensor([to_rgb(f"C{k}") for k in range(len(names))])
    fig, axes = plt.subplots(1, len(steps), figsize=(2.8 * len(steps), 3.0))
    for ax, i in zip(axes, steps):
        with torch.no_grad():
            p = F.softmax(clf(grid, ddpm.t_bar(torch.full((len(grid),), i, device=device), s.T)), 1).cpu()
        conf, k = p.max(1)
        img = colours[k] * conf[:, None] + (1 - conf[:, None])  # fade to white where the classifier is unsure
        ax.imshow(img.reshape(200, 200, 3).numpy(), extent=(-3, 3, -3, 3))
        ax.scatter(*x.T, s=0.2, c="k", alpha=0.3)
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
def main():
    p = common.make_parser(__doc__)
    p.add_argument("--denoiser", default=None, help="denoiser.pt from ddpm_states.py (default: train one here)")
    p.add_argument("--scale", type=common.nonneg_float, default=1.0, help="guidance scale s (0 = unguided DDIM)")
    p.add_argument("--n-samples", type=common.positive_int, default=5000, help="samples per state")
    p.add_argument("--grad-batch", type=common.positive_int, default=25000,
                   help="points per guided-sampling batch (lower it if memory is short)")
    p.add_argument("--clf-steps", type=common.positive_int, default=2000, help="classifier optimisation steps")
    p.add_argument("--clf-batch-size", type=common.positive_int, default=10000, help="classifier points per step")
    p.add_argument("--clf-lr", type=common.positive_float, default=2e-3, help="classifier peak learning rate")
    ddpm.add_denoiser_args(p)  # used only when no --denoiser is given (and --data, --n-per-state always)
    args = ddpm.parse_with_quick(p, T=100, steps=200, batch_size=2000, clf_steps=200, clf_batch_size=2000,
                                 n_samples=300, n_per_state=200, eval_every=50)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    x, y, xv, yv = ddpm.load_data(args)  # bad input fails here, before a run folder exists
    if args.denoiser:
        model, s = ddpm.load_denoiser(args.denoiser, device)
    names = common.STATE_NAMES if not args.data else [str(k) for k in range(int(y.max()) + 1)]

    run = common.Run(SCRIPT, args)
    print(f"run folder: {run.dir}  device: {device}")
    t0 = time.time()
    stage = "denoiser"  # which network a non-finite loss belongs to
    try:
        if not args.denoiser:
            model, _ = ddpm.train_denoiser(x, xv, args, device, run)
            torch.save(ddpm.denoiser_checkpoint(model.state_dict(), args, {}), run.path("denoiser.pt"))
            model, s = model.eval(), ddpm.Schedule(args.T, args.beta_start, args.beta_end, device)
        stage = "classifier"
        clf, hist = train_classifier(x, y, xv, yv, s, args, device, run)
    except FloatingPointError as e:
        msg, last_good = e.args
        msg, path = f"{stage} {msg}", run.path(f"{stage}.pt")
        if last_good is None:
            msg += f"; it failed before its first evaluation, so no {stage} checkpoint was written"
        else:  # keep the weights of the last evaluation whose losses were all finite
            if stage == "classifier":
                save_classifier(path, last_good, {}, len(names), s.T)
            else:
                torch.save(ddpm.denoiser_checkpoint(last_good, args, {}), path)
            msg += f"; the last good {stage} weights are in {path}"
        run.finish("failed", msg)
        raise SystemExit(f"{SCRIPT}: error: {msg}")
    train_s = time.time() - t0
    save_classifier(run.path("classifier.pt"), clf.state_dict(), hist, len(names), s.T)
    common.plot_curves(run.path("classifier_loss.png"), {"train": (hist["step"], hist["train"]),
                                                         "validation": (hist["step"], hist["val"])},
                       ylabel="cross-entropy", title=f"classifier (final val. accuracy {hist['val_acc'][-1]:.3f})")
    plot_prediction_maps(run.path("prediction_maps.png"), clf, s, x, names, device,
                         [0, s.T // 10, s.T // 4, s.T // 2, s.T - 1])

    t1 = time.time()
    run.progress("sample", 0, 1, force=True)
    gen = torch.Generator(device=device).manual_seed(args.seed + 4)
    labels = torch.arange(len(names)).repeat_interleave(args.n_samples)  # every state in the same batches
    samples = guided_sample(model, clf, s, labels, gen, args.scale, args.grad_batch).split(args.n_samples)
    metrics = {}
    for k, name in enumerate(names):
        sk, real_k, train_k = samples[k], xv[yv == k], x[y == k]
        torch.save(sk.clone(), run.path(f"cond_gen_samples_{k}.pt"))
        # reverse: a KDE of as many samples as there are training points of the state, so both KDEs of the
        # pair (samples, training points) get the same Scott bandwidth factor n^(-1/6)
        metrics[name] = {"nll": common.nll_score(sk, x), "nll_floor": common.nll_score(real_k, x),
                         "reverse_nll": common.nll_score(real_k, sk[:len(train_k)]),
                         "reverse_nll_floor": common.nll_score(real_k, train_k),
                         "nn_dist": ddpm.nn_distance(sk, x), "nn_dist_floor": ddpm.nn_distance(real_k, x),
                         "on_state": on_state_fraction(sk, k, x, y)}
        print(f"{name:10s} on state {100 * metrics[name]['on_state']:.2f}%  NLL {metrics[name]['nll']:.3f} "
              f"(floor {metrics[name]['nll_floor']:.3f})")
    sample_s = time.time() - t1
    run.log(per_state=metrics, min_on_state=min(m["on_state"] for m in metrics.values()),
            max_nll_gap=max(m["nll"] - m["nll_floor"] for m in metrics.values()), scale=args.scale,
            classifier_val_acc=hist["val_acc"][-1], train_time_s=round(train_s, 2),
            sample_time_s=round(sample_s, 2), device=str(device))
    plot_per_state(run.path("guided_samples.png"), samples, x, names, metrics)
    common.scatter(run.path("guided_samples_all.png"), torch.cat(samples), labels, background=x, names=names,
                   title=f"classifier guidance, s = {args.scale}")
    run.finish()
    print(f"done in {time.time() - t0:.0f}s -> {run.dir}")


if __name__ == "__main__":
    common.run_main(main)

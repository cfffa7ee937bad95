"""ddpm_mnist_cfg.py: a class-conditional DDPM on MNIST with classifier-free guidance.

Forward process (Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"), t = 1..T:
  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s
Schedules (--schedule):
  linear  beta_t from 1e-4 to 0.02 in T steps, both ends scaled by 1000/T (as Nichol and Dhariwal's code does,
          so alpha_bar_T is near 0 for any T; exactly 1e-4..0.02 at T = 1000)
  cosine  alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), s = 0.008
          (Nichol and Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models")
  both:   beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), 0.999), then alpha_bar_t = prod_{s<=t} (1 - beta_s),
          so the cap (which only bites at the last cosine step) is reflected in alpha_bar.
Training: noise prediction, L = E_{x_0, y, t, eps} || eps - eps_theta(x_t, t, y') ||^2 with
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and y' = null class with probability 10%
  (label dropout), so one network learns both eps_theta(x_t, t, y) and eps_theta(x_t, t, null).
  AdamW, gradient norm clipped at 1.0, EMA of the weights with warm-up
  (d_n = min(decay, (1 + n) / (10 + n)), theta_ema <- d_n theta_ema + (1 - d_n) theta), the EMA is what samples;
  ReduceLROnPlateau and early stopping on the validation loss of the EMA model; bf16 autocast on CUDA.
Classifier-free guidance (Ho and Salimans 2022, "Classifier-Free Diffusion Guidance"):
  eps_hat = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null)),
  both passes in one batch. Convention: w = 0 is unconditional, w = 1 plain conditional, w > 1 guided
  (code that writes (1 + w) eps_cond - w eps_uncond uses w - 1 for our w).
Ancestral sampling, t = T..1, x_T ~ N(0, I):
  x0_hat = clip((x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), -1, 1)
  mu     = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
  x_{t-1} = mu + sigma_t z (z ~ N(0, I), no noise at t = 1), sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
  (--sigma beta: sigma_t^2 = beta_t). --no-clip uses the raw form mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t),
  equal to the above without the clip, which can drift far outside the data range under strong guidance.
Network: a small U-Net (28 -> 14 -> 7 -> 14 -> 28) of GELUConvBlocks (Conv3x3, GroupNorm, GELU), downsampling by
  PixelUnshuffle + GELUConvBlock with the skip taken before it, ConvTranspose2d upsampling with skip concatenation,
  and a sinusoidal-time MLP plus a class embedding (index 10 = learned null class) injected as scale and shift at
  the bottleneck and in every up block.
Defaults (the GPU run) follow the literature for 28x28: channels 64,128,256 and T = 1000 (Ho et al. use T = 1000;
  cosine keeps the late steps informative), w = 2, N = 10,000 scored. --preset cpu is the 2-core CPU recipe: channels
  24,48,96, cosine T = 250, batch 128, at most 20 minutes of training, N = 1,000 scored (T and the width were cut
  so that sampling the N images takes about a quarter of an hour: 932 s measured). --quick is a smoke test (under a minute).

Usage: python ddpm_mnist_cfg.py [--preset cpu] [--quick] [--w 2] ... ;
       python ddpm_mnist_cfg.py --generate 7 --n 64 --checkpoint outputs/ddpm_mnist_cfg/RUN/checkpoint.pt
"""
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluate

SCRIPT = "ddpm_mnist_cfg"
# flag defaults per preset; flags given on the command line win. "gpu" is the default run.
PRESETS = {
    "gpu": dict(channels="64,128,256", T=1000, schedule="cosine", steps=20000, batch_size=128, lr=5e-4,
                ema_decay=0.9995, eval_every=500, val_size=5000, val_n=2000, n_eval=10000, sweep_n=1000,
                sweep_w="0,1,2,3,5,7,9", sample_batch=1000, max_minutes=0.0, judge_epochs=None),
    "cpu": dict(channels="24,48,96", T=250, schedule="cosine", steps=6000, batch_size=128, lr=1e-3,
                ema_decay=0.999, eval_every=250, val_size=5000, val_n=1000, n_eval=1000, sweep_n=50,
                sweep_w="0,1,2,3,5,7,9", sample_batch=500, max_minutes=20.0, judge_epochs=None),
    "quick": dict(channels="8,16,32", T=30, schedule="cosine", steps=250, batch_size=64, lr=2e-3,
                  ema_decay=0.99, eval_every=50, val_size=256, val_n=256, n_eval=100, sweep_n=20,
                  sweep_w="0,2,5", sample_batch=200, max_minutes=0.0, judge_epochs=0.05),
}
PROGRESSION_DIGIT = 3  # the digit whose denoising is shown step by step


# ----------------------------------------------------------------------------- data
def load_data(args):
    """MNIST (or another 1 x 28 x 28 set) in [-1, 1]: train and held-out validation parts of the training split."""
    x, y, xv, yv = common.load_image_dataset(args.dataset, args.data_root, train=True, val_size=args.val_size)
    if tuple(x.shape[1:]) != (1, 28, 28):
        raise common.UsageError(f"{args.dataset}: expected 1 x 28 x 28 images, got {tuple(x.shape[1:])}")
    return x, y, xv, yv


# ----------------------------------------------------------------------------- model
def n_groups(ch):
    return 8 if ch % 8 == 0 else 1


class GELUConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(n_groups(c_out), c_out), nn.GELU())


class ScaleShift(nn.Module):
    """h * (1 + gamma(e)) + beta(e): injects the time + class embedding e. Zero-initialised, so the block starts
    as the identity and the conditioning grows in as it becomes useful."""

    def __init__(self, emb_dim, ch):
        super().__init__()
        self.proj = nn.Sequential(nn.GELU(), nn.Linear(emb_dim, 2 * ch))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, h, e):
        gamma, beta = self.proj(e)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + gamma) + beta


class DownBlock(nn.Module):
    """Two GELUConvBlocks (their output is the skip, full resolution), then PixelUnshuffle(2) moves each 2x2
    patch into channels (no information thrown away, unlike pooling) and a GELUConvBlock mixes them."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.convs = nn.Sequential(GELUConvBlock(c_in, c_out), GELUConvBlock(c_out, c_out))
        self.down = nn.Sequential(nn.PixelUnshuffle(2), GELUConvBlock(4 * c_out, c_out))

    def forward(self, x):
        skip = self.convs(x)
        return self.down(skip), skip


class UpBlock(nn.Module):
    """Inject the embedding, upsample 2x by ConvTranspose2d, concatenate the skip, two GELUConvBlocks."""

    def __init__(self, c_in, c_skip, c_out, emb_dim):
        super().__init__()
        self.inject = ScaleShift(emb_dim, c_in)
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.convs = nn.Sequential(GELUConvBlock(c_out + c_skip, c_out), GELUConvBlock(c_out, c_out))

    def forward(self, h, skip, e):
        return self.convs(torch.cat([self.up(self.inject(h, e)), skip], dim=1))


def timestep_embedding(t, dim=64):
    """Sinusoidal embedding of the step index (Vaswani et al. 2017): [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2))."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class UNet(nn.Module):
    """eps_theta(x_t, t, y) for 1 x 28 x 28 images; y = n_classes is the null class."""

    def __init__(self, channels=(64, 128, 256), n_classes=10):
        super().__init__()
        c1, c2, c3 = channels
        emb = 4 * c1
        self.null_class = n_classes
        self.time_mlp = nn.Sequential(nn.Linear(64, emb), nn.GELU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(n_classes + 1, emb)
        self.down1, self.down2 = DownBlock(1, c1), DownBlock(c1, c2)  # 28 -> 14 -> 7
        self.mid_in, self.mid_inject, self.mid_out = GELUConvBlock(c2, c3), ScaleShift(emb, c3), GELUConvBlock(c3, c3)
        self.up2, self.up1 = UpBlock(c3, c2, c2, emb), UpBlock(c2, c1, c1, emb)  # 7 -> 14 -> 28
        self.out = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, x, t, y):
        e = self.time_mlp(timestep_embedding(t)) + self.class_emb(y)
        h, s1 = self.down1(x)
        h, s2 = self.down2(h)
        h = self.mid_out(self.mid_inject(self.mid_in(h), e))
        return self.out(self.up1(self.up2(h, s2, e), s1, e))


# ----------------------------------------------------------------------------- schedule
def make_betas(kind, T, s=0.008, max_beta=0.999):
    """beta_1..beta_T (float64) for the linear or cosine schedule, capped at max_beta (see the docstring)."""
    if kind == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=max_beta)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_schedule(kind, T, device="cpu"):
    """Every per-step quantity the training and the sampler use; index i holds step t = i + 1."""
    betas = make_betas(kind, T)
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, dim=0)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    sched = {"betas": betas, "alphas": alphas, "alpha_bars": alpha_bars, "alpha_bars_prev": alpha_bars_prev,
             "beta_tilde": (1 - alpha_bars_prev) / (1 - alpha_bars) * betas,
             "coef_x0": alpha_bars_prev.sqrt() * betas / (1 - alpha_bars),
             "coef_xt": alphas.sqrt() * (1 - alpha_bars_prev) / (1 - alpha_bars)}
    return {k: v.float().to(device) for k, v in sched.items()}


def q_sample(x0, t, eps, sched):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t a tensor of step indices (0-based)."""
    ab = sched["alpha_bars"][t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# ----------------------------------------------------------------------------- training
def ema_update(ema, model, n, decay):
    """theta_ema <- d theta_ema + (1 - d) theta with d = min(decay, (1 + n) / (10 + n)); returns d.
    The warm-up keeps the EMA from averaging in the random initialisation for thousands of steps."""
    d = min(decay, (1 + n) / (10 + n))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(p.detach(), alpha=1 - d)
    return d


@torch.no_grad()
def validation_loss(model, xv, yv, sched, device, batch=500):
    """The noise-prediction loss on fixed validation images, steps and noise (seeded), so evaluations compare."""
    gen = torch.Generator().manual_seed(1234)
    t = torch.randint(0, len(sched["betas"]), (len(xv),), generator=gen)
    eps = torch.randn(xv.shape, generator=gen)
    model.eval()
    total = 0.0
    for i in range(0, len(xv), batch):
        x0, e, tb = xv[i:i + batch].to(device), eps[i:i + batch].to(device), t[i:i + batch].to(device)
        total += F.mse_loss(model(q_sample(x0, tb, e, sched), tb, yv[i:i + batch].to(device)), e, reduction="sum").item()
    return total / eps.numel()


def save_checkpoint(path, model, ema, opt, plateau, config, step, history, best_val, bad_evals, rng):
    ckpt = {"script": SCRIPT, "kind": "model", "config": config, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "plateau": plateau.state_dict(), "step": step, "history": history,
            "best_val": best_val, "bad_evals": bad_evals, "rng": rng,
            "schedule": make_schedule(config["schedule"], config["T"])}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # the previous good checkpoint survives a crash mid-write


def train(args, run, data, device, resume=None):
    """Train from scratch or from `resume`; returns (ema model, history, stats). Exits 1 on a NaN loss."""
    x, y, xv, yv = data
    xv, yv = xv[:args.val_n], yv[:args.val_n]
    config = {k: getattr(args, k) for k in ("dataset", "channels", "T", "schedule", "p_uncond")}
    sched = make_schedule(args.schedule, args.T, device)
    model = UNet(args.channels).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=args.lr_patience)
    step, history, best_val, bad_evals = 0, {"step": [], "train": [], "val": [], "lr": []}, float("inf"), 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        plateau.load_state_dict(resume["plateau"])
        step, history, best_val, bad_evals = resume["step"], resume["history"], resume["best_val"], resume["bad_evals"]
    ckpt_path = run.path("checkpoint.pt")
    gen = torch.Generator().manual_seed(args.seed)  # batches, labels dropped, t and eps: all drawn from gen
    if resume is not None and "rng" in resume:
        gen.set_state(resume["rng"])  # continue the draws where they stopped: a resumed run equals an unbroken one
    elif resume is not None:  # a checkpoint without the state: at least do not replay the first steps' batches
        gen.manual_seed(args.seed + step)
    t0, start, done, stop = time.time(), step, step, "steps"
    window = []  # this stretch's losses, kept on the device: one host copy per evaluation instead of a sync per step
    bar = common.progress_bar(range(step, args.steps), desc="train")
    for step in bar:
        model.train()
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)  # sampling with replacement: simple, unbiased
        x0, yb = x[idx].to(device), y[idx].to(device)
        drop = torch.rand(len(yb), generator=gen).to(device) < args.p_uncond
        yb = torch.where(drop, torch.full_like(yb, model.null_class), yb)
        t = torch.randint(0, args.T, (len(x0),), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(q_sample(x0, t, eps, sched), t, yb)
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step, args.ema_decay)
        window.append(loss.detach())
        done = step + 1
        run.progress("train", done, args.steps)
        out_of_time = args.max_minutes > 0 and time.time() - t0 > 60 * args.max_minutes
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps or out_of_time:
            losses, window = torch.stack(window).float().cpu(), []
            if not torch.isfinite(losses).all():  # checked before the checkpoint below can be overwritten
                first = int((~torch.isfinite(losses)).nonzero()[0])
                kept = (f"the last good checkpoint is kept at {ckpt_path}" if os.path.isfile(ckpt_path)
                        else "no checkpoint was written yet")
                msg = f"loss is {losses[first].item()} at step {step + 2 - len(losses) + first}; {kept}"
                run.finish("failed", msg)
                print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
                sys.exit(1)
            run_loss, run_n = float(losses.sum()), len(losses)
            val = validation_loss(ema, xv, yv, sched, device)
            plateau.step(val)
            for k, v in (("step", step + 1), ("train", run_loss / run_n), ("val", val), ("lr", opt.param_groups[0]["lr"])):
                history[k].append(v)
            best_val, bad_evals = (val, 0) if val < best_val else (best_val, bad_evals + 1)
            save_checkpoint(ckpt_path, model, ema, opt, plateau, config, step + 1, history, best_val, bad_evals,
                            gen.get_state())
            bar.set_postfix(train=f"{history['train'][-1]:.4f}", val=f"{val:.4f}")
            run.log(step=step + 1, train_loss=history["train"][-1], val_loss=val, best_val_loss=best_val)
            if bad_evals >= args.patience:
                stop = "early stopping"
            elif out_of_time:
                stop = "time budget"
            if bad_evals >= args.patience or out_of_time:
                break
    secs = time.time() - t0
    stats = {"train_steps": done, "stop_reason": stop, "train_seconds": round(secs, 1),
             "train_images_per_s": round((done - start) * args.batch_size / max(secs, 1e-9), 1)}
    return ema.eval(), history, stats


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def guided_eps(model, x, t, y, w):
    """eps_hat = eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null)); both passes in one batch."""
    null = torch.full_like(y, model.null_class)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return eps_u + w * (eps_c - eps_u)


@torch.no_grad()
def sample(model, sched, y, w, clip=True, sigma="beta_tilde", record_every=0, gen=None, on_step=None):
    """Ancestral sampling of len(y) images with labels y (see the docstring). Returns (x_0, trajectory) where the
    trajectory holds x_t every `record_every` steps (and x_T, x_0) when record_every > 0."""
    device = y.device
    T = len(sched["betas"])
    x = torch.randn((len(y), 1, 28, 28), generator=gen).to(device)
    traj = [x.cpu()] if record_every else []
    for i in reversed(range(T)):  # i = t - 1
        eps = guided_eps(model, x, torch.full_like(y, i), y, w)
        if clip:
            x0_hat = ((x - (1 - sched["alpha_bars"][i]).sqrt() * eps) / sched["alpha_bars"][i].sqrt()).clamp(-1, 1)
            mean = sched["coef_x0"][i] * x0_hat + sched["coef_xt"][i] * x
        else:
            mean = (x - sched["betas"][i] / (1 - sched["alpha_bars"][i]).sqrt() * eps) / sched["alphas"][i].sqrt()
        var = sched["beta_tilde"][i] if sigma == "beta_tilde" else sched["betas"][i]
        x = mean + var.sqrt() * torch.randn(x.shape, generator=gen).to(device) if i > 0 else mean
        if record_every and (i % record_every == 0):
            traj.append(x.cpu())
        if on_step:
            on_step(T - i)
    return x, traj


def generate(model, sched, labels, w, args, run, phase, device):
    """Sample many images in batches, reporting progress; returns them in [-1, 1] on the CPU and the seconds taken."""
    gen, out, t0, T = torch.Generator().manual_seed(args.seed + 1), [], time.time(), args.T
    n_batches = math.ceil(len(labels) / args.sample_batch)
    for b, yb in enumerate(common.progress_bar(labels.split(args.sample_batch), desc=phase, leave=False)):
        x, _ = sample(model, sched, yb.to(device), w, not args.no_clip, args.sigma, gen=gen,
                      on_step=lambda k: run.progress(phase, b * T + k, n_batches * T))
        out.append(x.clamp(-1, 1).cpu())  # --no-clip can leave the range: clamp only what is saved
    return torch.cat(out), time.time() - t0


def balanced_labels(n, n_classes=10):
    return torch.arange(n) % n_classes


# ----------------------------------------------------------------------------- evaluation
def figure_forward(path, x0, sched, n=8):
    """q(x_t | x_0) for one image at n evenly spaced steps, with one fixed noise draw."""
    T = len(sched["betas"])
    ts = torch.linspace(0, T - 1, n).long()
    eps = torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    xs = torch.cat([q_sample(x0[None], t[None], eps, sched) for t in ts])
    common.image_grid(path, xs.clamp(-1, 1), nrow=n, title="forward noising, t = " + ", ".join(str(int(t) + 1) for t in ts))


def figure_schedules(path, T):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind in ("linear", "cosine"):
        s = make_schedule(kind, T)
        axes[0].plot(np.arange(1, T + 1), s["betas"].numpy(), label=kind)
        axes[1].plot(np.arange(1, T + 1), s["alpha_bars"].numpy(), label=kind)
    axes[0].set(xlabel="t", ylabel="beta_t", yscale="log", title=f"beta_t (T = {T})")
    axes[1].set(xlabel="t", ylabel="alpha_bar_t", title="alpha_bar_t")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    common.save_fig(fig, path)


def evaluate_run(model, sched, args, run, device):
    """Figures (grid, denoising, guidance sweep), samples.pt / labels.pt and the judge's scores."""
    judge_kw = dict(dataset=args.dataset, data_root=args.data_root, out_root=args.out, device=device,
                    judge_epochs=args.judge_epochs)
    grid, _ = generate(model, sched, balanced_labels(100).view(10, 10).T.reshape(-1), args.w, args, run, "grid", device)
    common.image_grid(run.path("samples_grid.png"), grid, nrow=10, title=f"w = {args.w:g}",
                      row_labels=[str(k) for k in range(10)])
    y = torch.tensor([PROGRESSION_DIGIT], device=device)
    _, traj = sample(model, sched, y, args.w, not args.no_clip, args.sigma, record_every=max(1, args.T // 10),
                     gen=torch.Generator().manual_seed(args.seed))
    common.image_grid(run.path("denoising.png"), torch.cat(traj).clamp(-1, 1), nrow=len(traj),
                      title=f"denoising x_T -> x_0, digit {PROGRESSION_DIGIT}")
    labels = balanced_labels(args.n_eval)
    samples, secs = generate(model, sched, labels, args.w, args, run, "sample", device)
    torch.save(samples, run.path("samples.pt"))
    torch.save(labels, run.path("labels.pt"))
    run.log(n_samples=len(samples), sample_seconds=round(secs, 1), sample_images_per_s=round(len(samples) / secs, 2),
            sample_image_steps_per_s=round(len(samples) * args.T / secs, 1), w=args.w)
    sweep_w = [float(v) for v in args.sweep_w.split(",")]
    rows, sweep = [], []
    for w in sweep_w:
        xs, _ = generate(model, sched, balanced_labels(args.sweep_n), w, args, run, f"sweep w={w:g}", device)
        rows.append(xs[:10])
        if not args.no_eval:
            sweep.append({"w": w, **evaluate.score(xs, balanced_labels(args.sweep_n), **judge_kw)})
    common.image_grid(run.path("guidance_sweep.png"), torch.cat(rows), nrow=10, title="guidance sweep",
                      row_labels=[f"w={w:g}" for w in sweep_w])
    if args.no_eval:
        return
    run.progress("score", 0, 1, force=True)
    run.log(eval=evaluate.score(samples, labels, **judge_kw), guidance_sweep=sweep)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(sweep_w, [r["class_accuracy"] for r in sweep], "o-")
    axes[0].set(xlabel="w", ylabel="class accuracy", title=f"judge accuracy (N = {args.sweep_n})")
    axes[1].plot(sweep_w, [r["fid"] for r in sweep], "o-", label="samples")
    if sweep[0].get("fid_floor") is not None:
        axes[1].axhline(sweep[0]["fid_floor"], color="k", ls="--", label="real-data floor")
    axes[1].set(xlabel="w", ylabel="FID (judge features)", title=f"FID (N = {args.sweep_n})")
    axes[1].legend()
    common.save_fig(fig, run.path("guidance_metrics.png"))


# ----------------------------------------------------------------------------- main
channels_arg = common.int_list(3)  # U-Net widths at 28, 14 and 7 pixels


def build_parser():
    p = common.make_parser(__doc__)
    p.add_argument("--preset", choices=["gpu", "cpu"], default="gpu", help="flag defaults: gpu (the full run) or cpu "
                   "(2 CPU cores, about 20 min of training); --quick overrides both")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="1 x 28 x 28, 10-class dataset")
    p.add_argument("--data-root", default="./data", help="torchvision data root (holds MNIST/raw)")
    p.add_argument("--channels", type=channels_arg, help="U-Net widths at 28, 14 and 7 pixels")
    p.add_argument("--T", type=common.positive_int, help="number of diffusion steps")
    p.add_argument("--schedule", choices=["linear", "cosine"], help="beta schedule")
    p.add_argument("--steps", type=common.positive_int, help="maximum optimizer steps (total, when resuming)")
    p.add_argument("--batch-size", type=common.positive_int, help="images per step")
    p.add_argument("--lr", type=common.positive_float, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--ema-decay", type=common.decay, help="EMA decay (after the warm-up)")
    p.add_argument("--p-uncond", type=common.nonneg_float, default=0.1, help="label dropout probability")
    p.add_argument("--eval-every", type=common.positive_int, help="steps between validation losses and checkpoints")
    p.add_argument("--val-size", type=common.positive_int, help="images held out of the training split")
    p.add_argument("--val-n", type=common.positive_int, help="validation images used for the validation loss")
    p.add_argument("--lr-patience", type=common.positive_int, default=3, help="evaluations without gain before halving lr")
    p.add_argument("--patience", type=common.positive_int, default=8, help="evaluations without gain before stopping")
    p.add_argument("--max-minutes", type=common.nonneg_float, help="minutes of training in this invocation (0: none)")
    p.add_argument("--resume", default=None, help="checkpoint to continue training from (its architecture wins)")
    p.add_argument("--w", type=common.nonneg_float, default=2.0, help="guidance weight (0 uncond, 1 cond, >1 guided)")
    p.add_argument("--sigma", choices=["beta_tilde", "beta"], default="beta_tilde", help="sampling variance sigma_t^2")
    p.add_argument("--no-clip", action="store_true", help="raw sampler form without clipping x0_hat (for study)")
    p.add_argument("--sample-batch", type=common.positive_int, help="images per sampling batch")
    p.add_argument("--n-eval", type=common.positive_int, help="samples written to samples.pt and scored")
    p.add_argument("--sweep-w", help="comma-separated guidance weights for the sweep")
    p.add_argument("--sweep-n", type=common.positive_int, help="samples per guidance weight in the sweep")
    p.add_argument("--no-eval", action="store_true", help="skip the judge's scores")
    p.add_argument("--judge-epochs", type=common.positive_float, help="judge budget if not cached (default: full)")
    p.add_argument("--generate", type=int, default=None, metavar="DIGIT", help="only draw --n images of DIGIT")
    p.add_argument("--n", type=common.positive_int, default=64, help="images for --generate")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --generate")
    return p


def parse_args():
    p = build_parser()
    p.set_defaults(**PRESETS["gpu"])
    first, _ = p.parse_known_args()
    p.set_defaults(**PRESETS["quick" if first.quick else first.preset])
    args = p.parse_args()
    if isinstance(args.channels, str):  # a preset's default string
        args.channels = channels_arg(args.channels)
    try:
        [float(v) for v in args.sweep_w.split(",")]
    except ValueError:
        p.error(f"--sweep-w: expected comma-separated numbers, got {args.sweep_w!r}")
    if args.T < 2:
        p.error("--T must be at least 2")
    return args


def main():
    args = parse_args()
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    if args.generate is not None:  # draw one digit from a trained model, no training
        ckpt = common.load_checkpoint(args.checkpoint, SCRIPT, "model")
        cfg = ckpt["config"]
        if not 0 <= args.generate < 10:
            raise common.UsageError(f"--generate: DIGIT must be in 0..9, got {args.generate}")
        args.channels, args.T, args.schedule = tuple(cfg["channels"]), cfg["T"], cfg["schedule"]
        model = UNet(args.channels).to(device)
        model.load_state_dict(ckpt["ema"])
        run = common.Run(SCRIPT, args)
        labels = torch.full((args.n,), args.generate, dtype=torch.int64)
        x, secs = generate(model.eval(), make_schedule(args.schedule, args.T, device), labels, args.w, args, run,
                           "generate", device)
        torch.save(x, run.path("samples.pt"))
        torch.save(labels, run.path("labels.pt"))
        common.image_grid(run.path("generate.png"), x, nrow=8, title=f"digit {args.generate}, w = {args.w:g}")
        run.log(n_samples=len(x), digit=args.generate, w=args.w, sample_seconds=round(secs, 1))
        run.finish()
        print(f"wrote {run.dir}")
        return
    resume = None
    if args.resume:
        resume = common.load_checkpoint(args.resume, SCRIPT, "model")
        cfg = resume["config"]
        args.channels, args.T, args.schedule, args.dataset = tuple(cfg["channels"]), cfg["T"], cfg["schedule"], cfg["dataset"]
    data = load_data(args)  # before the run folder: a missing dataset leaves nothing half-written
    run = common.Run(SCRIPT, args)
    figure_forward(run.path("forward_noising.png"), data[0][0], make_schedule(args.schedule, args.T))
    figure_schedules(run.path("schedules.png"), args.T)
    ema, history, stats = train(args, run, data, device, resume)
    run.log(**stats)
    common.plot_curves(run.path("loss.png"), {"train": (history["step"], history["train"]),
                                              "validation (EMA)": (history["step"], history["val"])},
                       title="noise-prediction MSE")
    evaluate_run(ema, make_schedule(args.schedule, args.T, device), args, run, device)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    common.run_main(main)

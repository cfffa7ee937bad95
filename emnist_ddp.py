"""emnist_ddp.py: a class-conditional DDPM on EMNIST "balanced" (47 characters), trained with DistributedDataParallel.

Forward process (Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"), t = 1..T, T = 600:
  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s
  cosine schedule (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"; diffusers'
  squaredcos_cap_v2): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), s = 0.008,
  beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), 0.999), then alpha_bar_t = prod (1 - beta_s) (the cap is reflected).
Training: L = E || eps - eps_theta(x_t, t, y') ||^2, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, y' = the
  null class (index 47) with probability 10% (label dropout), Adam lr 1e-4, global gradient norm clipped at 1.0,
  EMA theta_ema <- d theta_ema + (1 - d) theta, d = min(0.999, (1 + n) / (10 + n)) (the warm-up matters for short runs),
  kept on the unwrapped module. A checkpoint every epoch (model, EMA, Adam, scheduler, epoch, RNG); --resume continues
  exactly, even with another world size, since the per-step randomness is a function of (seed, epoch, step).
Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"):
  eps_hat = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null)); w = 0 unconditional, 1 conditional.
Ancestral sampling, x_T ~ N(0, I): x0_hat = clip((x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), -1, 1),
  x_{t-1} = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
            + sigma_t z,  sigma_t^2 = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t  (no noise at t = 1).
Data: EMNIST balanced through torchvision: 47 classes (upper/lower-case pairs that look alike, c i j k l m o p s u v w
  x y z, are merged, hence 47 and not 62), index -> character from the official mapping, images transposed upright,
  in [-1, 1], resized on the device for the larger presets.
Distributed: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; without them this is one process. Batch sizes are GLOBAL: each
  of the W ranks takes batch/W (an error if W does not divide it). DistributedSampler (shuffle, seed, drop_last) gives
  rank r the positions r, r+W, ... of each global batch; the noise, t and label dropout are drawn for the whole global
  batch from a generator seeded by (seed, epoch, step) and rank r takes the same positions, so W ranks compute exactly
  the 1-process batch and DDP's gradient average equals its mean-loss gradient: weights agree to float rounding.
  Only rank 0 logs, writes metrics, plots and checkpoints (every epoch); after training the other ranks leave and
  rank 0 samples and scores with the judge (evaluate.py, 28 x 28; samples are resized to 28 for it).
Writes (rank 0): metrics.csv (per epoch: loss mean/std/min/max/median, lr, gradient norm, samples/s, batches/s, memory,
  EMA divergence, epoch and total time), metrics_snapshot.json, a PNG per curve + dashboard.png, report.md (model card),
  checkpoints/, class_grid.png, chars.png, progression/frame_*.png + progression.gif, samples.pt, metrics.json (scores).
Presets (global batch): small 28 px, channels 64,128,256, batch 2048; medium 64 px, 64,128,256,256, 384;
  large 96 px, 96,192,384,384, 96; xl 128 px, 128,256,512,512, 32; tiny (tests, --quick) 16 px, 8,16,32, 32, T = 20.
  Per rank: batch / W, e.g. small on 8 GPUs 256 each, xl on 8 GPUs 4 each (xl allows W in 1, 2, 4, 8, 16, 32).

Usage: python emnist_ddp.py --preset small --data-root ../shared/data
       torchrun --standalone --nproc_per_node=4 emnist_ddp.py --preset medium       (one machine, 4 GPUs or CPU procs)
       sbatch slurm/emnist_ddp.sbatch ; sbatch slurm/emnist_ddp_multinode.sbatch   (Slurm, one or several nodes)
       python emnist_ddp.py --resume outputs/emnist_ddp/RUN/checkpoints/<name>.pt --epochs 60 --chars "ABCk3"
"""
import csv
import datetime
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import common
import evaluate

SCRIPT = "emnist_ddp"
CLASSES = common.EMNIST_BALANCED_CLASSES  # index -> character (47)
COMMON = dict(T=600, epochs=50, lr=1e-4, n_per_class=100, grid_per_class=10, sample_batch=2350, frame_every=None)
PRESETS = {
    "tiny": dict(COMMON, image_size=16, channels="8,16,32", batch_size=32, T=20, epochs=2, n_per_class=2,
                 grid_per_class=2, sample_batch=512, judge_epochs=0.05),
    "small": dict(COMMON, image_size=28, channels="64,128,256", batch_size=2048),
    "medium": dict(COMMON, image_size=64, channels="64,128,256,256", batch_size=384, sample_batch=940),
    "large": dict(COMMON, image_size=96, channels="96,192,384,384", batch_size=96, sample_batch=470),
    "xl": dict(COMMON, image_size=128, channels="128,256,512,512", batch_size=32, sample_batch=235),
}
# what a checkpoint fixes: architecture, data and everything the exact continuation of training depends on
RESUME_KEYS = ("dataset", "preset", "image_size", "channels", "T", "batch_size", "seed", "p_uncond", "lr", "ema_decay",
               "warmup_steps", "grad_clip")
RANK, LOCAL_RANK, WORLD = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
DISTRIBUTED = "WORLD_SIZE" in os.environ  # launched by torchrun (or srun + torchrun)


# ----------------------------------------------------------------------------- data
def load_data(args):
    """EMNIST balanced training split in [-1, 1], 1 x 28 x 28 (resized per batch on the device, not here: a resized
    copy of the full split would take gigabytes per rank at 128 px)."""
    x, y, _, _ = common.load_image_dataset(args.dataset, args.data_root, train=True, val_size=0)
    if len(x) < args.batch_size:
        raise common.UsageError(f"--batch-size {args.batch_size} exceeds the {len(x)} training images")
    return x, y


def resize(x, size):
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                       align_corners=False)


def char_to_class(c):
    """A character -> its class; a lower-case letter merged into its capital (k -> K) maps there."""
    if c in CLASSES:
        return CLASSES.index(c)
    if c.upper() in CLASSES and c.lower() not in CLASSES:
        return CLASSES.index(c.upper())
    raise common.UsageError(f"--chars: {c!r} is not an EMNIST balanced character ({''.join(CLASSES)})")


# ----------------------------------------------------------------------------- model
def norm(ch):
    """GroupNorm, up to 8 groups of at least 2 channels. Per-sample statistics: no coupling across ranks (BatchNorm would
    need SyncBatchNorm). With 1 channel a group it is InstanceNorm, which wipes out the per-channel biases before it:
    their true gradient is 0, so Adam would blow their rounding noise up to full-size steps."""
    return nn.GroupNorm(max([g for g in range(1, 9) if ch % g == 0 and ch >= 2 * g] or [1]), ch)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, then GroupNorm * (1 + scale(e)) + shift(e), SiLU, conv; plus a (1x1) skip.
    e is the time + class embedding (Nichol & Dhariwal's scale-shift norm)."""

    def __init__(self, c_in, c_out, emb):
        super().__init__()
        # no bias: norm2 would remove it, leaving a parameter whose gradient is pure rounding noise (Adam amplifies it)
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.emb, self.norm2, self.conv2 = nn.Linear(emb, 2 * c_out), norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(e))[:, :, None, None].chunk(2, dim=1)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))


def timestep_embedding(t, dim):
    """[sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (dim/2)) (Vaswani et al. 2017)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


class UNet(nn.Module):
    """eps_theta(x_t, t, y): a ResBlock per level, stride-2 conv down, nearest-upsample + conv up with skip
    concatenation, two ResBlocks at the bottom; len(channels) levels (size / 2^(levels-1) at the bottom)."""

    def __init__(self, channels, n_classes=len(CLASSES)):
        super().__init__()
        c0, emb = channels[0], 4 * channels[0]
        self.null_class = n_classes
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(n_classes + 1, emb)  # the last row is the learned null class
        self.conv_in = nn.Conv2d(1, c0, 3, padding=1)
        self.down, self.downsample, self.up, self.upsample = (nn.ModuleList() for _ in range(4))
        c = c0
        for ch in channels[:-1]:
            self.down.append(ResBlock(c, ch, emb))
            self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            c = ch
        self.mid1, self.mid2 = ResBlock(c, channels[-1], emb), ResBlock(channels[-1], channels[-1], emb)
        c = channels[-1]
        for ch in reversed(channels[:-1]):
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, ch, 3, padding=1)))
            self.up.append(ResBlock(2 * ch, ch, emb))
            c = ch
        self.out = nn.Sequential(norm(c0), nn.SiLU(), nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x, t, y):
        e = self.time_mlp(timestep_embedding(t, self.conv_in.out_channels)) + self.class_emb(y)
        h, skips = self.conv_in(x), []
        for block, down in zip(self.down, self.downsample):
            h = block(h, e)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid1(h, e), e)
        for upsample, block in zip(self.upsample, self.up):
            h = block(torch.cat([upsample(h), skips.pop()], dim=1), e)
        return self.out(h)


# ----------------------------------------------------------------------------- schedule
def make_schedule(T, device="cpu", s=0.008, max_beta=0.999):
    """Per-step quantities (index i holds step t = i + 1) of the capped cosine schedule, computed in float64."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - (f[1:] / f[0]) / (f[:-1] / f[0])).clamp(max=max_beta)
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    abp = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    sched = {"betas": betas, "alphas": alphas, "alpha_bars": ab, "beta_tilde": (1 - abp) / (1 - ab) * betas,
             "coef_x0": abp.sqrt() * betas / (1 - ab), "coef_xt": alphas.sqrt() * (1 - abp) / (1 - ab)}
    return {k: v.float().to(device) for k, v in sched.items()}


def q_sample(x0, t, eps, sched):
    ab = sched["alpha_bars"][t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# ----------------------------------------------------------------------------- training
def ema_update(ema, model, n, decay):
    """theta_ema <- d theta_ema + (1 - d) theta, d = min(decay, (1 + n) / (10 + n)); returns d."""
    d = min(decay, (1 + n) / (10 + n))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(p.detach(), alpha=1 - d)
    return d


def step_randomness(args, epoch, i, device):
    """t, eps and the label-dropout mask for the WHOLE global batch i of `epoch`, the same on every rank and for every
    world size; each rank keeps positions rank::world, the ones DistributedSampler gave it."""
    gen = torch.Generator(device=device).manual_seed((args.seed * 1_000_003 + epoch) * 1_000_003 + i)
    B, S = args.batch_size, args.image_size
    t = torch.randint(0, args.T, (B,), generator=gen, device=device)
    eps = torch.randn((B, 1, S, S), generator=gen, device=device)
    drop = torch.rand(B, generator=gen, device=device) < args.p_uncond
    return t[RANK::WORLD], eps[RANK::WORLD], drop[RANK::WORLD]


def memory_mb(device):
    if device.type == "cuda":
        return {"cuda_allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
                "cuda_reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
                "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:  # resident set size now (Linux); elsewhere the peak from getrusage
        with open("/proc/self/statm") as f:
            return {"rss_mb": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}
    except OSError:
        import resource
        return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def barrier(device):
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def checkpoint_name(args, epoch):
    c = "-".join(str(v) for v in args.channels)
    return f"{args.dataset}_{args.preset}_{args.image_size}px_c{c}_T{args.T}_b{args.batch_size}_epoch{epoch:03d}.pt"


def train(args, data, device, run, resume):
    """Every rank runs this; rank 0 (run is not None) writes. Returns the EMA model and the per-epoch history."""
    torch.manual_seed(args.seed)  # identical initial weights everywhere (DDP also broadcasts rank 0's at wrap time)
    model = UNet(args.channels).to(device)
    ema = UNet(args.channels).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps)
                                                 if args.warmup_steps else 1.0)
    start, step, history, wall_before = 0, 0, [], 0.0
    if resume:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        sched_lr.load_state_dict(resume["scheduler"])
        start, step, history, wall_before = resume["epoch"], resume["step"], resume["history"], resume["wall_s"]
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if DISTRIBUTED else model
    ds = TensorDataset(*data)
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=RANK, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=args.batch_size // WORLD, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    sched = make_schedule(args.T, device)
    n_steps = len(loader)
    bar = common.progress_bar(total=max(0, args.epochs - start) * n_steps, desc="train", disable=RANK != 0)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on all ranks
        model.train()
        losses, gnorms, t0 = [], [], time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i, (xb, yb) in enumerate(loader):
            t, eps, drop = step_randomness(args, epoch, i, device)
            x0 = resize(xb.to(device, non_blocking=True), args.image_size)
            y = torch.where(drop, torch.full_like(t, model.null_class), yb.to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
                pred = net(q_sample(x0, t, eps, sched), t, y)
            loss = F.mse_loss(pred.float(), eps)  # the mean over this rank's batch/W; DDP averages the gradients
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorms.append(nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")).detach())
            opt.step()
            sched_lr.step()
            ema_update(ema, model, step, args.ema_decay)
            losses.append(loss.detach())
            step += 1
            bar.update()
            if run:
                run.progress("train", (epoch - start) * n_steps + i + 1, (args.epochs - start) * n_steps)
        losses = torch.stack(losses).float()
        if dist.is_initialized():  # the global-batch loss of each step: the mean of the ranks' equal-sized shards
            dist.all_reduce(losses)
            losses /= WORLD
        if not torch.isfinite(losses).all():  # checked once an epoch: a per-step check would sync every step
            bad = step - len(losses) + int((~torch.isfinite(losses)).nonzero()[0]) + 1
            kept = f"the last good checkpoint (epoch {epoch}) is kept" if epoch else "no checkpoint was written yet"
            raise NonFiniteLoss(f"non-finite loss at step {bad} (epoch {epoch + 1}); {kept}")
        secs = time.time() - t0
        if run:
            ls = losses.cpu().numpy()
            with torch.no_grad():
                div = math.sqrt(sum(float((p - pe).float().square().sum()) for p, pe in zip(model.parameters(),
                                                                                           ema.parameters())))
            row = {"epoch": epoch + 1, "step": step, "loss_mean": float(ls.mean()), "loss_std": float(ls.std()),
                   "loss_min": float(ls.min()), "loss_max": float(ls.max()), "loss_median": float(np.median(ls)),
                   "lr": opt.param_groups[0]["lr"], "grad_norm": float(torch.stack(gnorms).mean()),
                   "samples_per_s": n_steps * args.batch_size / secs, "batches_per_s": n_steps / secs,
                   **memory_mb(device), "ema_divergence": div, "epoch_s": secs,
                   "wall_s": wall_before + time.time() - run.t0}
            history.append(row)
            write_metrics(run, args, history)
            ckpt = {"script": SCRIPT, "kind": "model", "config": {**vars(args), "channels": list(args.channels)},
                    "epoch": epoch + 1, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched_lr.state_dict(), "history": history,
                    "wall_s": row["wall_s"], "rng": {"torch": torch.get_rng_state(),
                                                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
            path = os.path.join(run.dir, "checkpoints", checkpoint_name(args, epoch + 1))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(ckpt, path + ".tmp")
            os.replace(path + ".tmp", path)  # a reader (or a resume after a crash) never sees half a file
            bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss_mean']:.4f}")
        barrier(device)  # nobody runs ahead of rank 0's checkpoint
    bar.close()
    return ema.eval(), history


class NonFiniteLoss(RuntimeError):
    """A NaN or inf training loss: the run stops with the step, keeping the last good checkpoint."""


def write_metrics(run, args, history):
    """metrics.csv (a row per epoch), metrics_snapshot.json (config + rows) and the last row in metrics.json."""
    keys = list(dict.fromkeys(k for r in history for k in r))
    with open(run.path("metrics.csv") + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(run.path("metrics.csv") + ".tmp", run.path("metrics.csv"))
    common._write_json(run.path("metrics_snapshot.json"), {"config": vars(args), "world_size": WORLD, "epochs": history})
    run.log(last_epoch=history[-1], world_size=WORLD)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, sched, y, w, size, gen, record_every=0, on_step=None):
    """Guided ancestral sampling (see the docstring); returns x_0 and x_t every `record_every` steps (with x_T).
    on_step(k, T) after step k of T (progress reports)."""
    x = torch.randn((len(y), 1, size, size), generator=gen).to(y.device)
    traj = [x.cpu()] if record_every else []
    null = torch.full_like(y, model.null_class)
    for i in reversed(range(len(sched["betas"]))):  # i = t - 1
        t = torch.full_like(y, i)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
        eps = eps_u + w * (eps_c - eps_u)
        x0_hat = ((x - (1 - sched["alpha_bars"][i]).sqrt() * eps) / sched["alpha_bars"][i].sqrt()).clamp(-1, 1)
        x = sched["coef_x0"][i] * x0_hat + sched["coef_xt"][i] * x
        if i > 0:
            x = x + sched["beta_tilde"][i].sqrt() * torch.randn(x.shape, generator=gen).to(y.device)
        if record_every and (i % record_every == 0):
            traj.append(x.cpu())
        if on_step:
            on_step(len(sched["betas"]) - i, len(sched["betas"]))
    return x.clamp(-1, 1).cpu(), traj


def generate(model, sched, labels, args, device, run, phase):
    gen, out = torch.Generator().manual_seed(args.seed + 1), []
    n_batches = math.ceil(len(labels) / args.sample_batch)
    for b, yb in enumerate(labels.split(args.sample_batch)):
        run.progress(phase, b, n_batches, force=True)
        out.append(sample(model, sched, yb.to(device), args.w, args.image_size, gen,
                          on_step=lambda k, T, b=b: run.progress(phase, b * T + k, n_batches * T))[0])
    return torch.cat(out)


def progression(model, sched, args, device, run):
    """Denoising of one character every k steps: PNG frames and an animated GIF."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    k = args.frame_every or max(1, args.T // 20)
    y = torch.tensor([char_to_class(args.progress_char)], device=device)
    _, traj = sample(model, sched, y, args.w, args.image_size, torch.Generator().manual_seed(args.seed), record_every=k)
    frames = [((f[0, 0].numpy() + 1) / 2).clip(0, 1) for f in traj]
    folder = run.path("progression")
    os.makedirs(folder, exist_ok=True)
    for n, fr in enumerate(frames):
        plt.imsave(os.path.join(folder, f"frame_{n:03d}.png"), fr, cmap="gray", vmin=0, vmax=1)
    fig, ax = plt.subplots(figsize=(2.5, 2.5))
    im = ax.imshow(frames[0], cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    steps = [args.T] + [i for i in reversed(range(args.T)) if i % k == 0]

    def draw(n):
        im.set_data(frames[n])
        ax.set_title(f"'{args.progress_char}', t = {steps[n]}")
        return [im]

    anim = FuncAnimation(fig, draw, frames=len(frames))
    anim.save(run.path("progression.gif"), writer=PillowWriter(fps=8))
    plt.close(fig)
    common.image_grid(run.path("progression.png"), torch.cat(traj), nrow=len(traj),
                      title=f"denoising '{args.progress_char}', every {k} steps")


# ----------------------------------------------------------------------------- evaluation: plots, report
def plot_panels(path, panels, ncols=1):
    """panels: [(title, {label: ys}, opts)] against the epoch; opts: log=True, band=(lo, hi), ylabel."""
    import matplotlib.pyplot as plt
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (title, series, opts) in zip(axes.flat, panels):
        for label, ys in series.items():
            ax.plot(np.arange(1, len(ys) + 1), ys, "o-", ms=3, label=label)
        if "band" in opts:
            ax.fill_between(np.arange(1, len(opts["band"][0]) + 1), *opts["band"], alpha=0.25, label="+- 1 sigma")
        ax.set(title=title, xlabel="epoch", ylabel=opts.get("ylabel", ""), yscale="log" if opts.get("log") else "linear")
        ax.grid(alpha=0.3)
        if len(series) > 1 or "band" in opts:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    common.save_fig(fig, path)


def training_plots(run, history):
    """One PNG per panel and a 3 x 3 dashboard; returns the file names."""
    col = {k: np.array([r.get(k, np.nan) for r in history], dtype=float) for k in history[-1]}
    m, s = col["loss_mean"], col["loss_std"]
    mem = {k: v for k, v in col.items() if k.endswith("_mb")}
    panels = {
        "loss": ("loss (linear)", {"mean": m, "median": col["loss_median"], "min": col["loss_min"], "max": col["loss_max"]}, {}),
        "loss_log": ("loss (log)", {"mean": m}, {"log": True}),
        "loss_band": ("loss mean +- 1 sigma over steps", {"mean": m}, {"band": (m - s, m + s)}),
        "grad_norm": ("gradient L2 norm (epoch mean)", {"grad norm": col["grad_norm"]}, {}),
        "ema_divergence": ("||theta - theta_ema||_2", {"divergence": col["ema_divergence"]}, {}),
        "memory": ("memory (MB)", mem, {"ylabel": "MB"}),
        "throughput": ("throughput", {"samples/s": col["samples_per_s"], "batches/s": col["batches_per_s"]}, {"log": True}),
        "lr": ("learning rate (end of epoch)", {"lr": col["lr"]}, {}),
        "epoch_time": ("epoch time (s)", {"epoch": col["epoch_s"]}, {"ylabel": "s"}),
        "loss_derivative": ("d loss / d epoch", {"derivative": np.gradient(m) if len(m) > 1 else 0 * m}, {}),
    }
    for name, panel in panels.items():
        plot_panels(run.path(f"{name}.png"), [panel])
    dash = ["loss", "loss_log", "loss_band", "grad_norm", "ema_divergence", "memory", "throughput", "lr", "epoch_time"]
    plot_panels(run.path("dashboard.png"), [panels[k] for k in dash], ncols=3)
    return [f"{n}.png" for n in panels] + ["dashboard.png"]


def write_report(run, args, history, figures, scores):
    """report.md: a model card (config, final figures, links to the plots)."""
    last = history[-1] if history else {}
    lines = [f"# {SCRIPT}: class-conditional EMNIST-balanced DDPM (run {run.run_id})", "",
             "Class-conditional DDPM (Ho et al. 2020), cosine schedule (Nichol & Dhariwal 2021), classifier-free guidance "
             "(Ho & Salimans 2022); trained with DistributedDataParallel.", "", "## Configuration", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**vars(args), "world_size": WORLD}.items()]
    lines += ["", "## Final figures", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in {**last, **scores}.items()]
    lines += ["", "## Plots", ""] + [f"- [{f}]({f})" for f in figures]
    lines += ["", "Intended use: a reference implementation. Samples are synthetic handwriting; the judge scores are on "
              "28 x 28 and on the data root used (the offline stand-in is a reduced EMNIST; do not compare with the full split)."]
    with open(run.path("report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def evaluate_run(ema, args, device, run, history):
    figures = training_plots(run, history) if history else []
    scores = {}
    if not args.no_sample:
        sched = make_schedule(args.T, device)
        grid_labels = torch.arange(len(CLASSES)).repeat_interleave(args.grid_per_class)
        grid = generate(ema, sched, grid_labels, args, device, run, "grid")
        common.image_grid(run.path("class_grid.png"), grid, nrow=args.grid_per_class, title=f"w = {args.w:g}",
                          row_labels=CLASSES)
        figures.append("class_grid.png")
        if args.chars:
            labels = torch.tensor([char_to_class(c) for c in args.chars]).repeat_interleave(args.grid_per_class)
            xs = generate(ema, sched, labels, args, device, run, "chars")
            common.image_grid(run.path("chars.png"), xs, nrow=args.grid_per_class, title=f"{args.chars!r}, w = {args.w:g}",
                              row_labels=list(args.chars))
            figures.append("chars.png")
        progression(ema, sched, args, device, run)
        figures += ["progression.png", "progression.gif"]
        labels = torch.arange(len(CLASSES)).repeat(args.n_per_class)
        t0 = time.time()
        samples = generate(ema, sched, labels, args, device, run, "sample")
        scores = {"n_samples": len(samples), "sample_s": round(time.time() - t0, 1), "w": args.w}
        torch.save(samples, run.path("samples.pt"))
        torch.save(labels, run.path("labels.pt"))
        if not args.no_eval:
            run.progress("score", 0, 1, force=True)
            s = evaluate.score(resize(samples, 28).clamp(-1, 1), labels, dataset=args.dataset, data_root=args.data_root,
                               out_root=args.out, device=device, judge_epochs=args.judge_epochs)
            scores.update(eval=s, accuracy_gap_to_real=s["judge_test_accuracy"] - s["class_accuracy"])
        run.log(**scores)
    write_report(run, args, history, figures, scores)


# ----------------------------------------------------------------------------- main
channels_arg = common.int_list(least=2)  # U-Net widths, one per resolution level


def build_parser():
    p = common.make_parser(__doc__)
    p.add_argument("--preset", choices=list(PRESETS), default="small", help="flag defaults (image size, channels, "
                   "global batch); --quick means tiny")
    p.add_argument("--dataset", default="emnist-balanced", choices=["emnist-balanced"], help="training data")
    p.add_argument("--data-root", default="./data", help="torchvision data root (holds EMNIST/raw)")
    p.add_argument("--image-size", type=common.positive_int, help="training resolution (must be divisible by "
                   "2^(levels-1))")
    p.add_argument("--channels", type=channels_arg, help="U-Net widths per level, e.g. 64,128,256")
    p.add_argument("--batch-size", type=common.positive_int, help="GLOBAL batch; each of W ranks takes batch/W")
    p.add_argument("--T", type=common.positive_int, help="diffusion steps")
    p.add_argument("--epochs", type=common.positive_int, help="total training epochs (also when resuming)")
    p.add_argument("--lr", type=common.positive_float, help="Adam learning rate")
    p.add_argument("--warmup-steps", type=common.nonneg_int, default=0, help="linear learning-rate warm-up steps (0: none)")
    p.add_argument("--grad-clip", type=common.nonneg_float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--p-uncond", type=common.nonneg_float, default=0.1, help="label dropout to the null class")
    p.add_argument("--ema-decay", type=common.decay, default=0.999, help="EMA decay after the warm-up")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto", help="torch.distributed backend "
                   "(auto: nccl on CUDA, gloo otherwise)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass on CUDA")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (its architecture and data win)")
    p.add_argument("--w", type=common.nonneg_float, default=2.0, help="guidance weight (0 uncond, 1 cond, >1 guided)")
    p.add_argument("--n-per-class", type=common.positive_int, help="samples per class scored by the judge")
    p.add_argument("--grid-per-class", type=common.positive_int, help="samples per class in the grids")
    p.add_argument("--sample-batch", type=common.positive_int, help="images per sampling batch")
    p.add_argument("--chars", default="", help='also draw these characters, e.g. "ABCk3" (k is merged into K)')
    p.add_argument("--progress-char", default="A", help="the character whose denoising is saved as frames and a GIF")
    p.add_argument("--frame-every", type=common.positive_int, help="steps between progression frames (default T/20)")
    p.add_argument("--no-sample", action="store_true", help="train only: no grids, progression or scores")
    p.add_argument("--no-eval", action="store_true", help="sample but skip the judge's scores")
    p.add_argument("--judge-epochs", type=common.positive_float, help="judge budget if not cached (default: full)")
    return p


def parse_args():
    p = build_parser()
    if RANK != 0:  # every rank parses the same argv: let rank 0 alone say what is wrong
        p.error = lambda message: p.exit(2)
    first, _ = p.parse_known_args()
    p.set_defaults(**PRESETS["tiny" if first.quick else first.preset])
    args = p.parse_args()
    args.preset = "tiny" if args.quick else args.preset
    if isinstance(args.channels, str):
        args.channels = channels_arg(args.channels)
    return args


def validate(args):
    """Checks every rank can make alone (no communication), so all fail alike and nobody waits in a collective."""
    if args.batch_size % WORLD:
        raise common.UsageError(f"global --batch-size {args.batch_size} is not divisible by the world size {WORLD}")
    levels = len(args.channels)
    if args.image_size % 2 ** (levels - 1):
        raise common.UsageError(f"--image-size {args.image_size} must be divisible by 2^{levels - 1} for {levels} levels")
    if args.T < 2:
        raise common.UsageError("--T must be at least 2")
    if len(args.progress_char) != 1:
        raise common.UsageError(f"--progress-char: one character, got {args.progress_char!r}")
    for c in args.chars + args.progress_char:
        char_to_class(c)


def main():
    args = parse_args()
    resume = None
    if args.resume:
        resume = common.load_checkpoint(args.resume, SCRIPT, "model")
        for k in RESUME_KEYS:
            setattr(args, k, resume["config"][k])
        args.channels = tuple(args.channels)
    validate(args)
    data = load_data(args)  # on every rank: missing data fails everywhere before any collective or any file
    device = common.get_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    common.seed_everything(args.seed)
    if DISTRIBUTED:
        backend = args.backend if args.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        run = common.Run(SCRIPT, args) if RANK == 0 else None
        try:
            ema, history = train(args, data, device, run, resume)
        except Exception as e:
            if run:
                run.finish("failed", f"{type(e).__name__}: {e}")
            raise
        barrier(device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # the other ranks are done; rank 0 samples and scores alone
    if RANK != 0:
        return
    evaluate_run(ema, args, device, run, history)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    try:
        main()
    except (common.UsageError, NonFiniteLoss) as e:  # bad input: 2; a NaN loss (status.json says failed): 1
        if RANK == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, common.UsageError) else 1)

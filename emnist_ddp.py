"""emnist_ddp.py: a class-conditional DDPM on EMNIST "balanced" (47 characters), trained with DistributedDataParallel.

Forward process (Ho, Jain, Abbeel 2020), t = 1..T, index i = t - 1, the capped cosine schedule (Nichol & Dhariwal
2021): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) pi/2), s = 0.008,
  beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), 0.999),  alpha_bar_t = prod_{s<=t} (1 - beta_s)  (the cap reflected),
  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
Training: L = E || eps - eps_theta(x_t, t, y') ||^2, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, y' the
  null class (index 47) with probability --p-uncond (label dropout); Adam, the global gradient norm clipped at 1.0,
  EMA theta_ema <- d theta_ema + (1 - d) theta, d = min(0.999, (1 + n) / (10 + n)) (the warm-up matters for short runs).
Classifier-free guidance (Ho & Salimans 2022), w = 0 unconditional, 1 conditional:
  eps_hat = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null)).
Ancestral sampling, x_T ~ N(0, I): x0_hat = clip((x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), -1, 1),
  x_{t-1} = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat
            + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t + sigma_t z,
  sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t  (no noise at t = 1).
Data: EMNIST balanced, 47 classes (look-alike upper- and lower-case merged), upright, in [-1, 1], resized on the device.
Distributed: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (on one machine or several, see Usage); without them this is
  one process. Batch sizes are GLOBAL: each of the W ranks takes batch/W of a batch whose noise is drawn whole
  (global_batch_noise), so W ranks compute exactly the 1-process batch: weights agree to float rounding, and a
  checkpoint resumes exactly with any W that divides the batch. Only rank 0 writes, samples and scores. Bad input
  stops every rank before the process group forms; a NaN loss, Ctrl-C or SIGTERM stops all at the same step; a rank
  that dies is named and the run failed; a group torchrun restarts goes on from the last checkpoint (harness.Processes).

Usage: python emnist_ddp.py --preset cpu --data-root ../shared/data
       torchrun --standalone --nproc_per_node=4 emnist_ddp.py --preset medium       (one machine, 4 GPUs or CPU procs)
       sbatch slurm/emnist_ddp.sbatch ; sbatch slurm/emnist_ddp_multinode.sbatch   (Slurm, one or several nodes)
       python emnist_ddp.py --resume outputs/emnist_ddp/RUN/checkpoints/latest.pt --epochs 60   (continue a run)
       python emnist_ddp.py --checkpoint outputs/emnist_ddp/RUN/checkpoints/latest.pt --chars "ABCk3"   (sample only)
"""
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

import common
import harness
import evaluate

SCRIPT = "emnist_ddp"
COMMON = dict(T=600, epochs=50, lr=1e-4, n_samples=47 * 100, grid_per_class=10, sample_batch=2350)
PRESETS = {  # batch sizes are GLOBAL
    "small": dict(COMMON, image_size=28, channels=(64, 128, 256), batch_size=2048),
    "cpu": dict(COMMON, image_size=28, channels=(24, 48, 96), batch_size=128, T=100, epochs=28, max_minutes=30.0,
                lr=1e-3, warmup_steps=200, sample_batch=470, w=1.5),  # 2 CPU cores: 30 min; w from a sweep
    "medium": dict(COMMON, image_size=64, channels=(64, 128, 256, 256), batch_size=384, sample_batch=940),
    "large": dict(COMMON, image_size=96, channels=(96, 192, 384, 384), batch_size=96, sample_batch=470),
    "xl": dict(COMMON, image_size=128, channels=(128, 256, 512, 512), batch_size=32, sample_batch=235),
    "quick": dict(COMMON, image_size=16, channels=(8, 16, 32), batch_size=32, T=20, epochs=2, n_samples=47 * 2,
                  grid_per_class=2, sample_batch=512, judge_epochs=0.05),
}


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
N_CLASSES = 47  # EMNIST balanced; index 47 is the learned null class of classifier-free guidance


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


def cosine_beta(T, s=0.008, max_beta=0.999):
    """beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta), alpha_bar(t) = f(t) / f(0), in float64."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def q_sample(x0, i, eps, sched):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for a batch of indices i = t - 1."""
    ab = sched.alpha_bar[i].view(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def resize(x, size):
    """The data transform: 28 x 28 images in [-1, 1] to the training resolution (bilinear, antialiased)."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                       align_corners=False)


def timestep_embedding(t, dim):
    """[sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (dim/2)) (Vaswani et al. 2017)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


def norm(ch):
    """GroupNorm, up to 8 groups of at least 2 channels. Per-sample statistics: no coupling across ranks (BatchNorm
    would need SyncBatchNorm). With 1 channel a group it is InstanceNorm, which wipes out the per-channel biases before
    it: their true gradient is 0, so Adam would blow their rounding noise up to full-size steps."""
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


class UNet(nn.Module):
    """eps_theta(x_t, i, y): a ResBlock per level, stride-2 conv down, nearest-upsample + conv up with skip
    concatenation, two ResBlocks at the bottom; len(channels) levels (size / 2^(levels-1) at the bottom)."""

    def __init__(self, channels, n_classes=N_CLASSES):
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
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(c, ch, 3, padding=1)))
            self.up.append(ResBlock(2 * ch, ch, emb))
            c = ch
        self.out = nn.Sequential(norm(c0), nn.SiLU(), nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x, i, y):
        e = self.time_mlp(timestep_embedding(i, self.conv_in.out_channels)) + self.class_emb(y)
        h, skips = self.conv_in(x), []
        for block, down in zip(self.down, self.downsample):
            h = block(h, e)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid1(h, e), e)
        for upsample, block in zip(self.upsample, self.up):
            h = block(torch.cat([upsample(h), skips.pop()], dim=1), e)
        return self.out(h)


def cfg_loss(eps_model, x0, y, i, eps, drop, sched, null_class=N_CLASSES):
    """|| eps - eps_theta(x_t, t, y') ||^2 averaged over the batch, y' = the null class where `drop` (label dropout:
    one network learns the conditional and the unconditional eps, which guidance combines)."""
    y = torch.where(drop, torch.full_like(y, null_class), y)
    return F.mse_loss(eps_model(q_sample(x0, i, eps, sched), i, y).float(), eps)


def ema_update(ema, model, n, decay):
    """theta_ema <- d theta_ema + (1 - d) theta, d = min(decay, (1 + n) / (10 + n)); returns d."""
    d = min(decay, (1 + n) / (10 + n))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(p.detach(), alpha=1 - d)
    return d


@torch.no_grad()
def sample(eps_model, sched, y, w, size, gen, record_every=0, on_step=None):
    """Guided ancestral sampling (module docstring), one image per label of y, on y's device; gen: a CPU generator.
    Returns x_0 on the CPU and x_t every `record_every` steps (with x_T); on_step(k, T) after step k of T."""
    x = torch.randn((len(y), 1, size, size), generator=gen).to(y.device)
    traj, null = [x.cpu()] if record_every else [], torch.full_like(y, eps_model.null_class)
    for i in reversed(range(sched.T)):
        idx = torch.full_like(y, i)
        eps_c, eps_u = eps_model(torch.cat([x, x]), torch.cat([idx, idx]), torch.cat([y, null])).float().chunk(2)
        eps_hat = eps_u + w * (eps_c - eps_u)
        ab, ab_prev = sched.alpha_bar[i], sched.alpha_bar_prev[i]
        x0_hat = ((x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()).clamp(-1, 1)
        x = ab_prev.sqrt() * sched.beta[i] / (1 - ab) * x0_hat + sched.alpha[i].sqrt() * (1 - ab_prev) / (1 - ab) * x
        if i > 0:  # no noise at t = 1
            x = x + sched.beta_tilde[i].sqrt() * torch.randn(x.shape, generator=gen).to(y.device)
        if record_every and i % record_every == 0:
            traj.append(x.cpu())
        if on_step:
            on_step(sched.T - i, sched.T)
    return x.clamp(-1, 1).cpu(), traj
# ==== end of core ====


# ----------------------------------------------------------------------------- data: EMNIST balanced
# index -> character, as in the official emnist-balanced-mapping.txt. Upper- and lower-case letters that look alike
# (c i j k l m o p s u v w x y z) are merged into the capital, hence 47 classes and not 62.
CLASSES = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("abdefghnqrt")


def char_to_class(c):
    """A character -> its class; a lower-case letter merged into its capital (k -> K) maps there."""
    if c in CLASSES:
        return CLASSES.index(c)
    if c.upper() in CLASSES and c.lower() not in CLASSES:
        return CLASSES.index(c.upper())
    raise common.UsageError(f"--chars: {c!r} is not an EMNIST balanced character ({''.join(CLASSES)})")


def load_data(args):
    """The training split in [-1, 1], 1 x 28 x 28 (resized per batch on the device, not here: a resized copy of the
    whole split would take gigabytes per rank at 128 px)."""
    x, y, _, _ = common.load_image_dataset(args.dataset, args.data_root, train=True, val_size=0)
    if len(x) < args.batch_size:
        raise common.UsageError(f"--batch-size {args.batch_size} exceeds the {len(x)} training images")
    return x, y


# ----------------------------------------------------------------------------- training
def global_batch_noise(gen, args, dd):
    """i, eps and the label-dropout mask for the WHOLE global batch (module docstring), from loop.gen (the same stream
    on every rank, saved in the checkpoint); this rank keeps positions rank::world, its DistributedSampler share."""
    B, S = args.batch_size, args.image_size
    i, eps = torch.randint(0, args.T, (B,), generator=gen), torch.randn((B, 1, S, S), generator=gen)
    drop = torch.rand(B, generator=gen) < args.p_uncond
    return [v[dd.rank::dd.world] for v in (i, eps, drop)]


def window_row(loop, model, ema, opt, args, device, grad_norms, t0, steps):
    """The metrics of the window that ends now (an epoch, unless --eval-every is shorter) for loop.evaluate, which keeps
    them in its history and checkpoint; `harness.window_rows` adds the statistics of the window's losses."""
    secs, done = time.time() - t0, loop.s["step"] + 1
    flat = nn.utils.parameters_to_vector
    div, n = float((flat(model.parameters()) - flat(ema.parameters())).detach().norm()), len(grad_norms)
    return {"epoch": done // steps if done % steps == 0 else round(done / steps, 3), "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(torch.stack(grad_norms).mean()), "samples_per_s": n * args.batch_size / secs,
            "batches_per_s": n / secs, **harness.memory_mb(device), "ema_divergence": div, "epoch_s": secs,
            "wall_s": (loop.history.get("wall_s") or [0.0])[-1] + secs}  # training time, summed over invocations


def write_metrics(run, args, dd, rows, checkpoint=None, epoch=0):
    """metrics.csv (a row per window), metrics_snapshot.json (config, world size, rows) and the last row in
    metrics.json; at the end of `epoch` (0: not an epoch's end) a named copy of `checkpoint`. Each file is written
    whole, then renamed: a reader never sees half a file."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    harness.write_atomic(run.path("metrics.csv"), "\n".join(lines) + "\n")
    harness.write_atomic(run.path("metrics_snapshot.json"), {"config": vars(args), "world_size": dd.world,
                                                          "epochs": rows})
    run.log(last_epoch=rows[-1], world_size=dd.world, restarts=dd.restarts)
    if epoch:
        c = "-".join(str(v) for v in args.channels)
        name = f"{args.dataset}_{args.preset}_{args.image_size}px_c{c}_T{args.T}_b{args.batch_size}_epoch{epoch:03d}.pt"
        shutil.copyfile(checkpoint, f"{checkpoint}.tmp")
        os.replace(f"{checkpoint}.tmp", run.path(f"checkpoints/{name}"))


def train(args, x, y, model, ema, device, dd, run, resume):
    """Every rank runs this on its share of each global batch; rank 0 (the one with a run) writes. Adam with an optional
    linear warm-up, the global gradient norm clipped, the EMA on the unwrapped module."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup_steps or 1)))
    sched, steps, grad_norms, t0 = Schedule(cosine_beta(args.T), device), len(x) // args.batch_size, [], time.time()
    state = {"model": model, "ema": ema, "optimizer": opt, "warmup": warmup}
    loop = harness.TrainLoop(run, args.epochs * steps, args.eval_every or steps, state, args.seed, vars(args),
                             run and run.path("checkpoints/latest.pt"), "model", resume, args.max_minutes,
                             reduce=dd.reduce if dd.world > 1 else None)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dd.world > 1 else model
    sampler = DistributedSampler(range(len(x)), dd.world, dd.rank, shuffle=True, seed=args.seed, drop_last=True)
    for step in loop:
        epoch, k = divmod(step, steps)
        if k == 0 or step == loop.start:  # this rank's share of the epoch's shuffle (set_epoch: a new one each epoch)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))[:steps * (args.batch_size // dd.world)].view(steps, -1)
        i, eps, drop = (v.to(device) for v in global_batch_noise(loop.gen, args, dd))
        x0, y0 = resize(x[order[k]].to(device), args.image_size), y[order[k]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            loss = cfg_loss(net, x0, y0, i, eps, drop, sched)  # this rank's mean; DDP averages the gradients
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf).detach())
        opt.step()
        warmup.step()
        ema_update(ema, model, step, args.ema_decay)
        if loop.record(loss, close=k + 1 == steps):  # a window closes every --eval-every steps and at an epoch's end
            loop.evaluate(**window_row(loop, model, ema, opt, args, device, grad_norms, t0, steps))
            grad_norms, t0 = [], time.time()
            if run:
                write_metrics(run, args, dd, harness.window_rows(loop.s), loop.path,
                              epoch + 1 if k + 1 == steps else 0)
    return loop


# ----------------------------------------------------------------------------- sampling
def generate(eps_model, sched, labels, args, device, run, phase):
    gen, out = torch.Generator().manual_seed(args.seed + 1), []
    n_batches = math.ceil(len(labels) / args.sample_batch)
    for b, yb in enumerate(labels.split(args.sample_batch)):
        run.progress(phase, b, n_batches, force=True)
        out.append(sample(eps_model, sched, yb.to(device), args.w, args.image_size, gen,
                          on_step=lambda k, T, b=b: run.progress(phase, b * T + k, n_batches * T))[0])
    return torch.cat(out)


def progression(eps_model, sched, args, device, run):
    """The denoising of one character, x_t every k steps: progression.png, progression/frame_NNN.png and a GIF."""
    from PIL import Image
    k = args.frame_every or max(1, args.T // 20)
    y = torch.tensor([char_to_class(args.progress_char)], device=device)
    _, traj = sample(eps_model, sched, y, args.w, args.image_size, torch.Generator().manual_seed(args.seed),
                     record_every=k)
    frames = [Image.fromarray(((f[0, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)) for f in traj]
    os.makedirs(run.path("progression"), exist_ok=True)
    for n, frame in enumerate(frames):
        frame.save(run.path(os.path.join("progression", f"frame_{n:03d}.png")))
    big = [frame.resize((128, 128), Image.NEAREST) for frame in frames]
    big[0].save(run.path("progression.gif"), save_all=True, append_images=big[1:], duration=125, loop=0)
    common.image_grid(run.path("progression.png"), torch.cat(traj), nrow=len(traj),
                      title=f"denoising '{args.progress_char}': x_t for t = {args.T}, then every {k} steps")


# ----------------------------------------------------------------------------- evaluation: plots, report
def training_plots(run, rows):
    """One PNG per panel against the epoch, and a 3 x 3 dashboard of the first nine."""
    col = {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in rows[-1]}
    ep, m, s = col["epoch"], col["loss_mean"], col["loss_std"]

    def panel(title, series, **opts):
        curves = {k: (ep, v, "o-", {"ms": 3}) for k, v in series.items()}
        return dict(title=title, curves=curves, xlabel="epoch", **opts)
    panels = {
        "loss": panel("loss (linear)", {k[5:]: col[k] for k in ("loss_mean", "loss_median", "loss_min", "loss_max")}),
        "loss_log": panel("loss (log)", {"mean": m}, logy=True),
        "loss_band": panel("loss mean +- 1 sigma over steps", {"mean": m}, band=(ep, m - s, m + s)),
        "grad_norm": panel("gradient L2 norm (mean)", {"grad norm": col["grad_norm"]}),
        "ema_divergence": panel("||theta - theta_ema||_2", {"divergence": col["ema_divergence"]}),
        "memory": panel("memory (MB)", {k: v for k, v in col.items() if k.endswith("_mb")}, ylabel="MB"),
        "throughput": panel("throughput", {"samples/s": col["samples_per_s"], "batches/s": col["batches_per_s"]},
                            logy=True),
        "lr": panel("learning rate (at the row's end)", {"lr": col["lr"]}),
        "epoch_time": panel("time per row (s)", {"seconds": col["epoch_s"]}, ylabel="s"),
        "loss_derivative": panel("d loss / d epoch", {"derivative": np.gradient(m, ep) if len(m) > 1 else 0 * m}),
    }
    for name, p in panels.items():
        common.plot_panels(run.path(f"{name}.png"), [p], size=(4.2, 3.0))
    common.plot_panels(run.path("dashboard.png"), list(panels.values())[:9], ncols=3, size=(4.2, 3.0))


def evaluate_run(ema, args, device, run, rows, dd):
    """The curves, the grids, the denoising frames, N samples scored by the judge, and the report (rank 0)."""
    scores, sched = {}, Schedule(cosine_beta(args.T), device)
    if rows:
        write_metrics(run, args, dd, rows)
        training_plots(run, rows)
    for name, chars in () if args.no_sample else (("class_grid", CLASSES), ("chars", args.chars)):
        if chars:  # a row per character
            labels = torch.tensor([char_to_class(c) for c in chars]).repeat_interleave(args.grid_per_class)
            common.image_grid(run.path(f"{name}.png"), generate(ema, sched, labels, args, device, run, name),
                              nrow=args.grid_per_class, title=f"w = {args.w:g}", row_labels=list(chars))
    if not args.no_sample:
        progression(ema, sched, args, device, run)
        labels, t0 = torch.arange(args.n_samples) % len(CLASSES), time.time()  # balanced over the 47 classes
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
    run.report(f"{SCRIPT}: class-conditional EMNIST-balanced DDPM", [
        "Class-conditional DDPM (Ho et al. 2020), cosine schedule (Nichol & Dhariwal 2021), classifier-free guidance "
        "(Ho & Salimans 2022); trained with DistributedDataParallel.",
        "Intended use: a reference implementation. Samples are synthetic handwriting; the judge scores are on 28 x 28 "
        "and on the data root used (a reduced EMNIST gives figures not comparable with the full one)."],
        config={**vars(args), "world_size": dd.world}, figures={**(rows[-1] if rows else {}), **scores})


# ----------------------------------------------------------------------------- main
SAMPLING = ("w", "n_samples", "grid_per_class", "sample_batch", "chars", "progress_char", "frame_every", "no_sample",
            "no_eval", "judge_epochs", "data_root", "backend")  # flags a resumed or sampled checkpoint may change


def build_parser():
    num = common.num
    p = common.make_parser(__doc__, PRESETS)
    p.add_argument("--dataset", default="emnist-balanced", choices=["emnist-balanced"], help="training data")
    p.add_argument("--data-root", default="./data", help="torchvision data root (holds EMNIST/raw)")
    p.add_argument("--image-size", type=num(int, 4, 1024), help="training resolution (divisible by 2^(levels-1))")
    p.add_argument("--channels", type=common.num_list(int, 1, 4096), help="U-Net widths, one per level (at least 2)")
    p.add_argument("--batch-size", type=num(int, 1, 10**6), help="GLOBAL batch; each of W ranks takes batch/W")
    p.add_argument("--T", type=num(int, 2, 100_000), help="diffusion steps")
    p.add_argument("--epochs", type=num(int, 1, 10**6), help="total training epochs (also when resuming)")
    p.add_argument("--lr", type=num(float, 0, None, open_lo=True), help="Adam learning rate")
    p.add_argument("--warmup-steps", type=num(int, 0, 10**9), default=0, help="linear learning-rate warm-up (0: none)")
    p.add_argument("--grad-clip", type=num(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--p-uncond", type=num(float, 0, 1), default=0.1, help="label dropout to the null class")
    p.add_argument("--ema-decay", type=num(float, 0, 1), default=0.999, help="EMA decay after the warm-up")
    p.add_argument("--eval-every", type=num(int, 1, 10**9), default=None, help="steps between checkpoints (and NaN "
                   "checks) within an epoch; one is also written at each epoch's end (default: once an epoch)")
    p.add_argument("--max-minutes", type=num(float, 0), default=0.0, help="training time budget (0: none)")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto", help="torch.distributed backend "
                   "(auto: nccl on CUDA, gloo otherwise)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass on CUDA")
    p.add_argument("--resume", default=None, help="checkpoints/latest.pt (or an epoch's copy): continue training it; "
                   "auto: the --run-id run's latest.pt if there is one (what a group torchrun restarts does)")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint to sample and score, without training")
    p.add_argument("--w", type=num(float, 0), default=2.0,
                   help="guidance weight (0 uncond, 1 cond, >1 guided; --preset cpu: 1.5)")
    p.add_argument("--n-samples", type=num(int, 2, 10**6), help="samples scored by the judge, balanced over classes")
    p.add_argument("--grid-per-class", type=num(int, 1, 1000), help="samples per class in the grids")
    p.add_argument("--sample-batch", type=num(int, 1, 10**5), help="images per sampling batch")
    p.add_argument("--chars", default="", help='also draw these characters, e.g. "ABCk3" (k is merged into K)')
    p.add_argument("--progress-char", default="A", help="the character whose denoising is saved as frames and a GIF")
    p.add_argument("--frame-every", type=num(int, 1, 10**5), help="steps between progression frames (default T/20)")
    p.add_argument("--no-sample", action="store_true", help="train only: no grids, progression or scores")
    p.add_argument("--no-eval", action="store_true", help="sample but skip the judge's scores")
    p.add_argument("--judge-epochs", type=num(float, 0, 1000, open_lo=True), help="judge budget if not cached")
    return p


def parse_args(argv=None):
    p = build_parser()  # under torchrun every rank parses the same argv; its errors say which rank (make_parser)
    args = common.parse(p, argv)
    args.preset = "quick" if args.quick else args.preset
    if args.resume and args.checkpoint:
        p.error("--resume continues training, --checkpoint only samples: give one of them")
    return args


def prepare(dd):
    """Flags, checkpoint, device and data, all checked before any process group forms or any file is written. Every
    rank checks alike: all fail alike, and none waits in a collective for one that has left."""
    args = parse_args()
    args.resume = dd.resume_from(args, SCRIPT)  # --resume auto, or torchrun restarted the group: the run's latest.pt
    path = args.resume or args.checkpoint
    ckpt = harness.load_checkpoint(path, SCRIPT, "model") if path else None
    if ckpt:  # the settings of the run that wrote it; one of the older format (no "loop") is sampled, not resumed
        args = harness.resumed(args, ckpt if args.resume else {"loop": None, **ckpt},
                               may_change=("epochs", "max_minutes", "eval_every", "checkpoint", *SAMPLING))
        args.channels, args.no_sample = tuple(args.channels), args.no_sample and not args.checkpoint
    if args.batch_size % dd.world:
        raise common.UsageError(f"global --batch-size {args.batch_size} is not divisible by the world size {dd.world}")
    if len(args.channels) < 2 or args.image_size % 2 ** (len(args.channels) - 1):
        raise common.UsageError(f"--image-size {args.image_size} and --channels {args.channels}: need at least 2 "
                                f"levels and a size divisible by 2^(levels - 1)")
    if len(args.progress_char) != 1:
        raise common.UsageError(f"--progress-char: one character, got {args.progress_char!r}")
    for c in args.chars + args.progress_char:
        char_to_class(c)
    dd.place(common.get_device(args.device))  # one GPU per process
    return args, ckpt, None if args.checkpoint and args.no_eval else load_data(args)


def main():
    dd = harness.Processes()  # RANK, LOCAL_RANK, WORLD_SIZE and torchrun's restart count, from the environment
    args, ckpt, data = prepare(dd)  # a usage error: whichever rank fails first prints its line (harness.main)
    if args.checkpoint and dd.rank:
        return  # sampling a checkpoint is rank 0's work
    device = dd.use()  # this rank's GPU becomes the current device (or the CPU)
    torch.manual_seed(args.seed)  # identical initial weights everywhere (DDP also broadcasts rank 0's at wrap time)
    model, ema = UNet(args.channels).to(device), UNet(args.channels).to(device)
    ema.load_state_dict(ckpt["ema"] if args.checkpoint else model.state_dict())
    ema.requires_grad_(False)
    if dd.world > 1 and not args.checkpoint:
        dd.start(args.backend)
    run = harness.Run(SCRIPT, args) if dd.rank == 0 else None
    if args.checkpoint:  # the rows of the run that wrote it (an older checkpoint holds them whole)
        rows = harness.window_rows(ckpt["loop"]) if "loop" in ckpt else ckpt.get("history", [])
    else:
        with dd.watch(run and run.path("checkpoints/latest.pt")):  # several ranks: one that dies is named
            loop = train(args, *data, model, ema, device, dd, run, ckpt)
        if dd.rank:
            return
        rows = harness.window_rows(loop.s)
    torch.set_num_threads(os.cpu_count() or 1)  # rank 0 samples alone: every core (torchrun gave each process one)
    evaluate_run(ema.eval(), args, device, run, rows, dd)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

"""edm_mnist.py: EDM on MNIST: a preconditioned denoiser, log-normal sigma training, the Karras schedule, Heun sampling.

Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM),
exactly as a learner meets it in the paper (Table 1, Algorithm 2), on MNIST.

Data x0 in [-1, 1]^(1x28x28), noised at level sigma:  x = x0 + sigma eps,  eps ~ N(0, I).
Preconditioning: the denoiser D wraps a raw network F (a U-Net):
  D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
  c_in    = 1 / sqrt(sigma^2 + sigma_data^2)          (unit-variance network input)
  c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)    (-> 1 as sigma -> 0: D(x, sigma) -> x)
  c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
  c_noise = ln(sigma) / 4
Training: L = E_{x0, sigma, eps} lambda(sigma) || D(x0 + sigma eps, sigma) - x0 ||^2 with
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2   (= 1 / c_out^2: the effective target of F has
  unit variance at every sigma) and ln sigma ~ N(P_mean, P_std^2). AdamW, gradient norm clipped at 1.0, bf16 autocast
  of F on CUDA, EMA of the weights as in the EDM code: beta = 0.5^(batch / h), h = min(ema_halflife, ema_rampup * images
  seen); the EMA is what samples.
Sampling: Karras schedule, i = 0..N-1, then sigma_N = 0:
  sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
  probability-flow ODE  dx/dsigma = (x - D(x, sigma)) / sigma,  x_0 = sigma_0 z,  z ~ N(0, I); per step i:
    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= sigma_i <= S_max else 0     (stochastic churn, 0 by default)
    sigma_hat = sigma_i (1 + gamma_i);  x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps
    d_i = (x_hat - D(x_hat, sigma_hat)) / sigma_hat;  x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d_i         (Euler)
    if sigma_{i+1} > 0: d'_i = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) / sigma_{i+1};
                        x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d_i + d'_i) / 2                         (Heun)
  no correction on the last step to sigma = 0, so N steps cost 2N - 1 evaluations of D.
Defaults (the configuration this reproduces): sigma_min 0.002, sigma_max 80, rho 7, sigma_data 0.5, P_mean -1.2,
  P_std 1.2, batch 128, 80 sampling steps (the paper's 18 steps: --sample-steps 18); --sigma-data measured uses the
  training data's standard deviation. A steps study scores N = 5, 10, 18, 40, 80 steps (FID and time per sample).
Network F: a residual U-Net with a sinusoidal embedding of c_noise: stem conv 1 -> c1; residual blocks at c1 (28x28)
  and c2 (14x14) with strided-conv downsampling 28 -> 14 -> 7; two residual blocks at c3 (7x7); transposed-conv
  upsampling, skip concatenation and residual blocks 7 -> 14 -> 28; GroupNorm, SiLU, conv c1 -> 1.
  Channels c1,c2,c3 = 64,128,256 (--channels).
Presets: the default (gpu) trains 25 epochs (469 steps each at batch 128 on all 60,000 images), AdamW lr 1e-3 after a
  500-step warm-up, and scores N = 10,000 samples; --preset cpu is the 2-core CPU recipe: channels 16,32,64, lr 2e-3,
  at most 20 minutes of training (--max-minutes), N = 1,000 scored, 500 per steps-study point; --quick is a smoke test
  (150 steps of an 8,16,32 net, 10 sampling steps, about 20 s).

Usage: python edm_mnist.py [--preset cpu] [--quick] [--epochs 25] [--sample-steps 18] [--sigma-data measured] ... ;
       python edm_mnist.py --checkpoint outputs/edm_mnist/RUN/checkpoint.pt   (sample and score only)
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

SCRIPT = "edm_mnist"
# flag defaults per preset; flags given on the command line win. "gpu" is the default run.
PRESETS = {
    "gpu": dict(channels="64,128,256", epochs=25, batch_size=128, max_steps=0, max_minutes=0.0, lr=1e-3,
                warmup_steps=500, ema_halflife_kimg=50.0, log_every=100, sample_steps=80, n_eval=10000,
                study_steps="5,10,18,40,80", study_n=10000, sample_batch=1000, judge_epochs=None),
    "cpu": dict(channels="16,32,64", epochs=30, batch_size=128, max_steps=0, max_minutes=20.0, lr=2e-3,
                warmup_steps=200, ema_halflife_kimg=20.0, log_every=50, sample_steps=80, n_eval=1000,
                study_steps="5,10,18,40,80", study_n=500, sample_batch=500, judge_epochs=None),
    "quick": dict(channels="8,16,32", epochs=100, batch_size=64, max_steps=150, max_minutes=0.0, lr=2e-3,
                  warmup_steps=10, ema_halflife_kimg=0.5, log_every=10, sample_steps=10, n_eval=100,
                  study_steps="5,10", study_n=50, sample_batch=200, judge_epochs=0.05),
}


# ----------------------------------------------------------------------------- data
def load_data(args):
    """The whole MNIST training split in [-1, 1] (EDM holds nothing out): 60,000 images, 469 steps per epoch at 128."""
    x, _, _, _ = common.load_image_dataset(args.dataset, args.data_root, train=True, val_size=0)
    if tuple(x.shape[1:]) != (1, 28, 28):
        raise common.UsageError(f"{args.dataset}: expected 1 x 28 x 28 images, got {tuple(x.shape[1:])}")
    return x


# ----------------------------------------------------------------------------- model
def n_groups(ch):
    return min(8, ch) if ch % min(8, ch) == 0 else 1


def sinusoidal_embedding(c_noise, dim):
    """[cos(c_noise w_k), sin(c_noise w_k)], w_k = 10000^(-k/(dim/2)): EDM's PositionalEmbedding, applied to
    c_noise = ln(sigma)/4 directly (sampling spans ln(0.002)/4 = -1.55 to ln(80)/4 = 1.10, which the low-k
    frequencies cover)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=c_noise.device) / (dim // 2))
    args = c_noise.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, + embedding (a per-channel shift), GroupNorm, SiLU, conv3x3; 1x1 conv on the skip
    when the width changes. The last conv starts at zero, so every block starts as the identity."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.norm1, self.conv1 = nn.GroupNorm(n_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(n_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """F(c_in x, c_noise) for 1 x 28 x 28 images. The layers live in one ordered dict; a layer tagged
    skip_out pushes its output on a stack and one tagged skip_in concatenates the top of the stack to its input,
    so the forward pass and the schematic (figure_unet) read the same list."""

    def __init__(self, channels=(64, 128, 256)):
        super().__init__()
        c1, c2, c3 = channels
        emb = 4 * c1
        self.emb_in = c1
        self.embed = nn.Sequential(nn.Linear(c1, emb), nn.SiLU(), nn.Linear(emb, emb))
        L = self.layers = nn.ModuleDict()
        L["stem"] = nn.Conv2d(1, c1, 3, padding=1)                                 # 28
        L["enc28"] = ResBlock(c1, c1, emb)                                         # 28, skip
        L["down14"] = nn.Conv2d(c1, c1, 3, stride=2, padding=1)                   # 28 -> 14
        L["enc14"] = ResBlock(c1, c2, emb)                                         # 14, skip
        L["down7"] = nn.Conv2d(c2, c2, 3, stride=2, padding=1)                    # 14 -> 7
        L["mid1"], L["mid2"] = ResBlock(c2, c3, emb), ResBlock(c3, c3, emb)       # 7, bottleneck
        L["up14"] = nn.ConvTranspose2d(c3, c2, 2, stride=2)                       # 7 -> 14
        L["dec14"] = ResBlock(2 * c2, c2, emb)                                     # 14, + skip enc14
        L["up28"] = nn.ConvTranspose2d(c2, c1, 2, stride=2)                       # 14 -> 28
        L["dec28"] = ResBlock(2 * c1, c1, emb)                                     # 28, + skip enc28
        L["out"] = nn.Sequential(nn.GroupNorm(n_groups(c1), c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))
        for name in ("enc28", "enc14"):
            L[name].skip_out = True
        for name in ("dec14", "dec28"):
            L[name].skip_in = True

    def forward(self, x, c_noise):
        emb = self.embed(sinusoidal_embedding(c_noise, self.emb_in))
        skips = []
        for layer in self.layers.values():
            if getattr(layer, "skip_in", False):
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
            if getattr(layer, "skip_out", False):
                skips.append(x)
        return x


def precond(sigma, sigma_data):
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 for a tensor of noise levels."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise); sigma a float, a 0-d tensor or one per image."""

    def __init__(self, net, sigma_data=0.5):
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
        c_skip, c_out, c_in, c_noise = precond(sigma, self.sigma_data)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.training and x.device.type == "cuda"):
            f = self.net((c_in * x).float(), c_noise.flatten())
        return c_skip * x + c_out * f.float()


def build_denoiser(config):
    return Denoiser(UNet(tuple(config["channels"])), config["sigma_data"])


def load_denoiser(path, device="cpu"):
    """The EMA denoiser D(x, sigma) of an edm_mnist checkpoint (eval mode, no grads) and the checkpoint's config.
    Raises common.UsageError (one line) for a missing file or another script's checkpoint."""
    ckpt = common.load_checkpoint(path, SCRIPT, "model")
    D = build_denoiser(ckpt["config"])
    D.load_state_dict(ckpt["ema"])
    return D.to(device).eval().requires_grad_(False), ckpt["config"]


# ----------------------------------------------------------------------------- schedule
def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """sigma_0..sigma_{n-1} of the Karras schedule, then sigma_n = 0 (float64, n + 1 values)."""
    if n < 2:
        raise ValueError(f"the Karras schedule needs n >= 2 steps, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# ----------------------------------------------------------------------------- training
def ema_update(ema, model, batch, nimg, halflife_kimg, rampup=0.05):
    """theta_ema <- beta theta_ema + (1 - beta) theta, beta = 0.5^(batch / h), h = min(halflife, rampup * nimg):
    the EDM code's EMA, whose short half-life early on keeps the random initialisation out of the average."""
    h = min(halflife_kimg * 1000, rampup * nimg)
    beta = 0.5 ** (batch / max(h, 1e-8))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - beta)
    return beta


def edm_loss(D, x0, P_mean, P_std):
    """Per-element lambda(sigma) || D(x0 + sigma eps, sigma) - x0 ||^2, ln sigma ~ N(P_mean, P_std^2)."""
    sigma = (torch.randn(len(x0), 1, 1, 1, device=x0.device) * P_std + P_mean).exp()
    x = x0 + sigma * torch.randn_like(x0)
    return loss_weight(sigma, D.sigma_data) * (D(x, sigma) - x0) ** 2


def all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(path, D, ema, opt, config, epoch, step, history):
    ckpt = {"script": SCRIPT, "kind": "model", "config": config, "model": D.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "history": history}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # the previous good checkpoint survives a crash mid-write


def fail(run, msg):
    run.finish("failed", msg)
    print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
    sys.exit(1)


def train(args, run, x, device, config, resume=None):
    """Train D (from scratch or `resume`) for args.epochs epochs (or the step/time budget); returns (EMA, history, stats).
    Losses stay on the device and are copied to the host once every log_every steps: no per-step sync."""
    D = build_denoiser(config).to(device)
    ema = copy.deepcopy(D).eval().requires_grad_(False)
    opt = torch.optim.AdamW(D.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    epoch, step, history = 0, 0, {"step_loss": [], "epoch_loss": []}
    if resume is not None:
        D.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        epoch, step, history = resume["epoch"], resume["step"], resume["history"]
    x = x.to(device)
    ckpt_path, t0, start_step = run.path("checkpoint.pt"), time.time(), step
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total = args.epochs * steps_per_epoch if not args.max_steps else min(args.max_steps, args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed + epoch)
    stop, pending = "epochs", []
    bar = common.progress_bar(total=total, initial=step, desc="train")

    def kept():
        return f"the last good checkpoint is kept at {ckpt_path}" if os.path.exists(ckpt_path) else \
            "no checkpoint had been written yet"

    def sync():  # one host copy of the pending losses; a NaN stops the run with the first bad step
        vals = torch.stack(pending).float().cpu().tolist() if pending else []
        for k, v in enumerate(vals):
            if not math.isfinite(v):
                fail(run, f"loss is {v} at step {len(history['step_loss']) + k + 1}; {kept()}")
        history["step_loss"].extend(vals)
        pending.clear()
        if vals:
            bar.set_postfix(loss=f"{np.mean(vals):.4f}")

    while epoch < args.epochs and stop == "epochs":
        D.train()
        epoch_start = len(history["step_loss"]) + len(pending)
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            for g in opt.param_groups:  # linear learning-rate warm-up (EDM ramps its lr up too)
                g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
            loss = edm_loss(D, x[idx.to(device)], args.P_mean, args.P_std).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(D.parameters(), 1.0)
            opt.step()
            step += 1
            ema_update(ema, D, len(idx), step * args.batch_size, args.ema_halflife_kimg)
            pending.append(loss.detach())
            bar.update(1)
            run.progress("train", step, total)
            if step % args.log_every == 0:
                sync()
            if args.max_steps and step >= args.max_steps:
                stop = "max steps"
            elif args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
                stop = "time budget"
            if stop != "epochs":
                break
        sync()
        if stop == "epochs" or len(history["step_loss"]) - epoch_start == steps_per_epoch:
            epoch += 1
            history["epoch_loss"].append(float(np.mean(history["step_loss"][epoch_start:])))
        elif len(history["step_loss"]) > epoch_start:  # a partial epoch still gets its mean, marked by the step count
            history.setdefault("partial_epoch", {})[epoch] = float(np.mean(history["step_loss"][epoch_start:]))
        if not all_finite(D):  # the last optimizer step may have produced NaN weights not yet seen in a loss
            fail(run, f"weights are not finite after step {step}; {kept()}")
        save_checkpoint(ckpt_path, D, ema, opt, config, epoch, step, history)
        run.log(step=step, epoch=epoch, epoch_loss=history["epoch_loss"][-1] if history["epoch_loss"] else None)
        gen = torch.Generator().manual_seed(args.seed + epoch)  # a resumed run sees the same shuffles
    bar.close()
    secs = time.time() - t0
    stats = {"total_steps": step, "epochs_done": epoch, "stop_reason": stop, "train_seconds": round(secs, 1),
             "train_steps_per_s": round((step - start_step) / max(secs, 1e-9), 3),
             "final_epoch_loss": history["epoch_loss"][-1] if history["epoch_loss"] else None,
             "best_epoch_loss": min(history["epoch_loss"]) if history["epoch_loss"] else None,
             "final_mean_loss_last_100_steps": float(np.mean(history["step_loss"][-100:])),
             "partial_epoch_loss": history.get("partial_epoch", {}).get(epoch)}
    if device.type == "cuda":
        stats["gpu_hours"] = round(secs / 3600, 4)
    return ema, history, stats


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def edm_sampler(denoise, latents, sigmas, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, gen=None,
                on_step=None):
    """Heun's method on dx/dsigma = (x - D(x, sigma)) / sigma over `sigmas` (ending at 0), with optional churn.
    denoise(x, sigma) -> D(x, sigma), sigma a python float; latents ~ N(0, I). Returns x at sigma = 0.
    on_step(i + 1, N) after each step (progress reports)."""
    N = len(sigmas) - 1
    x_next = latents * float(sigmas[0])
    for i in range(N):
        t_cur, t_next, x_cur = float(sigmas[i]), float(sigmas[i + 1]), x_next
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        eps = torch.randn(x_cur.shape, generator=gen, dtype=x_cur.dtype).to(x_cur.device) if gamma > 0 else 0.0
        x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur                       # Euler step
        if t_next > 0:                                                  # Heun correction (not on the step to 0)
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if on_step:
            on_step(i + 1, N)
    return x_next


def generate(D, n, steps, args, run, phase, device):
    """n images from fixed latents (seed + 1, so every step count starts from the same noise); returns them
    clamped to [-1, 1] on the CPU and the seconds taken."""
    sigmas = karras_sigmas(steps, args.sigma_min, args.sigma_max, args.rho)
    gen, out, t0 = torch.Generator().manual_seed(args.seed + 1), [], time.time()
    sizes = [min(args.sample_batch, n - i) for i in range(0, n, args.sample_batch)]
    for b, size in enumerate(common.progress_bar(sizes, desc=f"{phase} ({steps} steps)", leave=False)):
        latents = torch.randn((size, 1, 28, 28), generator=gen).to(device)
        x = edm_sampler(D, latents, sigmas, args.S_churn, args.S_min, args.S_max, args.S_noise, gen,
                        on_step=lambda k, N, b=b: run.progress(phase, b * N + k, len(sizes) * N))
        out.append(x.clamp(-1, 1).cpu())
        run.progress(phase, b + 1, len(sizes))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), time.time() - t0


# ----------------------------------------------------------------------------- evaluation
def unet_layers(net):
    """[(name, kind, c_in, c_out, resolution, skip_out, skip_in)] from a forward pass with hooks on net.layers."""
    rows, hooks = [], []
    for name, layer in net.layers.items():
        def hook(mod, inp, out, name=name):
            kind = type(mod).__name__ if not isinstance(mod, nn.Sequential) else "GN+SiLU+conv"
            rows.append((name, kind, inp[0].shape[1], out.shape[1], out.shape[-1],
                         getattr(mod, "skip_out", False), getattr(mod, "skip_in", False)))
        hooks.append(layer.register_forward_hook(hook))
    p = next(net.parameters())
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28, device=p.device), torch.zeros(1, device=p.device))
    for h in hooks:
        h.remove()
    return rows


def figure_unet(path, net):
    """The U-Net as boxes (kind, channels, resolution) placed by resolution, with skip arrows: drawn from the
    model's own layer list, so it never goes stale."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch
    rows = unet_layers(net)
    levels = sorted({r[4] for r in rows}, reverse=True)
    fig, ax = plt.subplots(figsize=(len(rows) + 0.5, 4.6))
    pos, stack = [], []
    for i, (name, kind, cin, cout, res, s_out, s_in) in enumerate(rows):
        xc, yc = 1.25 * i, -1.6 * levels.index(res)
        pos.append((xc, yc))
        color = {"Conv2d": "#cde", "ConvTranspose2d": "#dce", "ResBlock": "#fdc"}.get(kind, "#ddd")
        ax.add_patch(FancyBboxPatch((xc - 0.55, yc - 0.5), 1.1, 1.0, boxstyle="round,pad=0.02", fc=color, ec="k"))
        label = {"Conv2d": "conv s2" if "down" in name else "conv", "ConvTranspose2d": "convT s2"}.get(kind, kind)
        ax.text(xc, yc, f"{name}\n{label}\n{cin}->{cout}\n{res}x{res}", ha="center", va="center", fontsize=6.5)
        if i:
            ax.annotate("", (xc - 0.55, yc), (pos[i - 1][0] + 0.55, pos[i - 1][1]), arrowprops=dict(arrowstyle="->"))
        if s_in:
            j = stack.pop()
            ax.annotate("", (xc, yc + 0.5), (pos[j][0], pos[j][1] + 0.5),
                        arrowprops=dict(arrowstyle="->", color="C3", connectionstyle="arc3,rad=-0.25", ls="--"))
        if s_out:
            stack.append(i)
    ax.set(xlim=(-0.8, 1.25 * len(rows) - 0.4), ylim=(-1.6 * (len(levels) - 1) - 0.8, 2.9), aspect="equal")
    ax.axis("off")
    n_params = sum(p.numel() for p in net.parameters())
    ax.set_title(f"U-Net F ({n_params / 1e6:.2f} M parameters); dashed: skip concatenation", fontsize=9)
    common.save_fig(fig, path)


def figure_sigmas(path, args):
    """sigma_i of the Karras schedule against i for the sampling step counts, log scale, and rho's effect."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n in sorted({18, 80, args.sample_steps}):
        s = karras_sigmas(n, args.sigma_min, args.sigma_max, args.rho)[:-1]
        axes[0].plot(np.arange(n), s.numpy(), "o-", ms=3, label=f"N = {n}")
    for rho in (1.0, 3.0, args.rho):
        s = karras_sigmas(18, args.sigma_min, args.sigma_max, rho)[:-1]
        axes[1].plot(np.arange(18), s.numpy(), "o-", ms=3, label=f"rho = {rho:g}")
    axes[0].set(title=f"Karras schedule (rho = {args.rho:g}), then 0", ylabel="sigma_i")
    axes[1].set(title="N = 18 for several rho")
    for ax in axes:
        ax.set(xlabel="step i", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    common.save_fig(fig, path)


def figure_losses(run, history):
    losses = np.asarray(history["step_loss"])
    steps = np.arange(1, len(losses) + 1)
    w = max(1, min(100, len(losses) // 10))
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    common.plot_curves(run.path("loss_steps.png"), {"per step": (steps, losses), f"mean of {w}": (steps[w - 1:], smooth)},
                       title="training loss lambda(sigma) ||D - x0||^2 per step")
    ep = history["epoch_loss"]
    if ep:
        common.plot_curves(run.path("loss_epochs.png"), {"epoch mean": (np.arange(1, len(ep) + 1), ep)},
                           xlabel="epoch", logy=False, title="training loss, mean per epoch")


def evaluate_run(D, args, run, device):
    """Sample grid, samples.pt, the judge's scores and the steps study (FID and time per sample against N)."""
    judge_kw = dict(dataset=args.dataset, data_root=args.data_root, out_root=args.out, device=device,
                    judge_epochs=args.judge_epochs)
    grid, _ = generate(D, 100, args.sample_steps, args, run, "grid", device)
    common.image_grid(run.path("samples_grid.png"), grid, nrow=10,
                      title=f"EDM samples, Heun, {args.sample_steps} steps ({2 * args.sample_steps - 1} evaluations)")
    samples, secs = generate(D, args.n_eval, args.sample_steps, args, run, "sample", device)
    torch.save(samples, run.path("samples.pt"))
    run.log(n_samples=len(samples), sample_steps=args.sample_steps, sample_seconds=round(secs, 1),
            seconds_per_sample=round(secs / len(samples), 5))
    if args.no_eval:
        return
    run.progress("score", 0, 1, force=True)
    main_eval = evaluate.score(samples, **judge_kw)
    run.log(eval=main_eval)
    study = []
    for n in args.study_steps:
        if n == args.sample_steps and args.study_n == args.n_eval:  # the same samples: reuse their scores
            s, t = main_eval, secs
        else:
            xs, t = generate(D, args.study_n, n, args, run, f"study N={n}", device)
            s = evaluate.score(xs, **judge_kw)
        study.append({"steps": n, "nfe": 2 * n - 1, "fid": s["fid"], "fid_floor": s["fid_floor"],
                      "mean_top_prob": s["mean_top_prob"], "seconds_per_sample": round(t / args.study_n, 5)})
        run.log(steps_study=study)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ns = [r["steps"] for r in study]
    axes[0].plot(ns, [r["fid"] for r in study], "o-", label="samples")
    if study[0]["fid_floor"] is not None:
        axes[0].axhline(study[0]["fid_floor"], color="k", ls="--", label="real-data floor")
    axes[0].set(xlabel="sampling steps N (2N - 1 evaluations)", ylabel="FID (judge features)", xscale="log",
                yscale="log", title=f"FID against N (n = {args.study_n})")
    axes[0].legend()
    axes[1].plot(ns, [1000 * r["seconds_per_sample"] for r in study], "o-")
    axes[1].set(xlabel="sampling steps N", ylabel="ms per sample", xscale="log", title=f"time per sample ({device.type})")
    for ax in axes:
        ax.grid(alpha=0.3)
    common.save_fig(fig, run.path("steps_study.png"))


# ----------------------------------------------------------------------------- main
channels_arg = common.int_list(3)  # U-Net widths at 28, 14 and 7 pixels


def sigma_data_arg(s):
    return s if s == "measured" else common.positive_float(s)


def build_parser():
    p = common.make_parser(__doc__)
    p.add_argument("--preset", choices=["gpu", "cpu"], default="gpu", help="flag defaults: gpu (the full run) or cpu "
                   "(2 CPU cores, 20 min of training); --quick overrides both")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="1 x 28 x 28, 10-class dataset")
    p.add_argument("--data-root", default="./data", help="torchvision data root (holds MNIST/raw)")
    p.add_argument("--channels", type=channels_arg, help="U-Net widths c1,c2,c3 at 28, 14 and 7 pixels")
    p.add_argument("--sigma-data", type=sigma_data_arg, default=0.5,
                   help="data standard deviation in the preconditioning, or 'measured' (from the training images)")
    p.add_argument("--P-mean", type=float, default=-1.2, help="mean of ln sigma during training")
    p.add_argument("--P-std", type=common.positive_float, default=1.2, help="standard deviation of ln sigma in training")
    p.add_argument("--epochs", type=common.positive_int, help="training epochs (total, when resuming)")
    p.add_argument("--max-steps", type=common.nonneg_int,
                   help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--max-minutes", type=common.nonneg_float, help="training wall-time budget (0: none)")
    p.add_argument("--batch-size", type=common.positive_int, help="images per step")
    p.add_argument("--lr", type=common.positive_float, help="AdamW learning rate (after the warm-up)")
    p.add_argument("--warmup-steps", type=common.positive_int, help="steps of linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--ema-halflife-kimg", type=common.positive_float, help="EMA half-life in thousands of images")
    p.add_argument("--log-every", type=common.positive_int, help="steps between host copies of the loss (NaN check)")
    p.add_argument("--resume", default=None, help="checkpoint to continue training from (its architecture wins)")
    p.add_argument("--checkpoint", default=None, help="skip training: sample and score this checkpoint's EMA")
    p.add_argument("--sigma-min", type=common.positive_float, default=0.002, help="smallest sampling noise level")
    p.add_argument("--sigma-max", type=common.positive_float, default=80.0, help="largest sampling noise level")
    p.add_argument("--rho", type=common.positive_float, default=7.0, help="Karras schedule exponent (1: linear)")
    p.add_argument("--sample-steps", type=common.positive_int, help="Heun steps N (2N - 1 evaluations); paper: 18")
    p.add_argument("--S-churn", type=common.nonneg_float, default=0.0, help="stochastic churn (0: the deterministic ODE)")
    p.add_argument("--S-min", type=common.nonneg_float, default=0.0, help="churn only for sigma >= S_min")
    p.add_argument("--S-max", type=common.nonneg_float, default=float("inf"), help="churn only for sigma <= S_max")
    p.add_argument("--S-noise", type=common.nonneg_float, default=1.0, help="scale of the churn noise")
    p.add_argument("--n-eval", type=common.positive_int, help="samples written to samples.pt and scored")
    p.add_argument("--study-steps", help="comma-separated step counts for the steps study")
    p.add_argument("--study-n", type=common.positive_int, help="samples per step count in the steps study")
    p.add_argument("--sample-batch", type=common.positive_int, help="images per sampling batch")
    p.add_argument("--no-eval", action="store_true", help="skip the judge's scores and the steps study")
    p.add_argument("--judge-epochs", type=common.positive_float, help="judge budget if not cached (default: full)")
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
        args.study_steps = [int(v) for v in args.study_steps.split(",")]
    except ValueError:
        p.error(f"--study-steps: expected comma-separated integers, got {args.study_steps!r}")
    if min(args.study_steps + [args.sample_steps]) < 2:
        p.error("--sample-steps and --study-steps: the Karras schedule needs at least 2 steps")
    if args.sigma_min >= args.sigma_max:
        p.error(f"--sigma-min ({args.sigma_min:g}) must be below --sigma-max ({args.sigma_max:g})")
    if args.S_min > args.S_max:
        p.error(f"--S-min ({args.S_min:g}) must not exceed --S-max ({args.S_max:g})")
    if args.resume and args.checkpoint:
        p.error("--resume and --checkpoint exclude each other")
    return args


def main():
    args = parse_args()
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    ckpt = None  # everything that can be wrong with the input is found before the run folder exists
    if args.checkpoint or args.resume:
        ckpt = common.load_checkpoint(args.checkpoint or args.resume, SCRIPT, "model")
        args.channels, args.sigma_data = tuple(ckpt["config"]["channels"]), ckpt["config"]["sigma_data"]
        args.dataset = ckpt["config"].get("dataset", args.dataset)  # judge and resume on the data it was trained on
    x = load_data(args) if not args.checkpoint else None
    if args.sigma_data == "measured":
        args.sigma_data = round(float(x.std()), 4)
    config = {"dataset": args.dataset, "channels": list(args.channels), "sigma_data": float(args.sigma_data),
              "P_mean": args.P_mean, "P_std": args.P_std, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max,
              "rho": args.rho}
    run = common.Run(SCRIPT, args)
    run.log(device=str(device), sigma_data=config["sigma_data"])
    figure_sigmas(run.path("sigma_schedule.png"), args)
    if args.checkpoint:
        D, _ = load_denoiser(args.checkpoint, device)
    else:
        D, history, stats = train(args, run, x, device, config, ckpt)
        run.log(**stats)
        figure_losses(run, history)
    figure_unet(run.path("unet.png"), D.net)
    evaluate_run(D, args, run, device)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    common.run_main(main)

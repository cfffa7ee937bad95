"""edm_mnist.py: EDM on MNIST: a preconditioned denoiser, log-normal sigma training, the Karras schedule, Heun sampling.

Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM),
exactly as a learner meets it in the paper (Table 1, Algorithm 2), on MNIST.

Data x0 in [-1, 1]^(1x28x28), noised at level sigma:  x = x0 + sigma eps,  eps ~ N(0, I).
Preconditioning: the denoiser D wraps a raw network F (a residual U-Net at 28, 14 and 7 pixels; `net` in the code):
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
Defaults: the paper's (sigma_data 0.5, P_mean -1.2, P_std 1.2, batch 128), 80 sampling steps (the paper's 18:
  --sample-steps 18); a steps study scores N = 5, 10, 18, 40, 80. Resume is exact: epoch e's shuffle is a function of
  (seed, e) and every step's noise comes from the training loop's generator, which the checkpoint holds.

Usage: python edm_mnist.py [--preset cpu] [--quick] [--epochs 25] [--sample-steps 18] [--sigma-data measured] ... ;
       python edm_mnist.py --checkpoint outputs/edm_mnist/RUN/checkpoint.pt   (sample and score only)
       python edm_mnist.py --resume outputs/edm_mnist/RUN/checkpoint.pt [--epochs 40]   (continue training)
"""
import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness
import evaluate

SCRIPT = "edm_mnist"
PRESETS = {  # "gpu" holds every default; the others change some
    "gpu": dict(channels=(64, 128, 256), epochs=25, train_steps=None, max_minutes=0.0, batch_size=128, lr=1e-3,
                warmup_steps=500, ema_halflife_kimg=50.0, eval_every=469, sample_steps=80, n_samples=10000,
                study_steps=(5, 10, 18, 40, 80), study_n=10000, sample_batch=1000, judge_epochs=None),
    "cpu": dict(channels=(16, 32, 64), epochs=30, max_minutes=20.0, lr=2e-3, warmup_steps=200, ema_halflife_kimg=20.0,
                eval_every=100, n_samples=1000, study_n=500, sample_batch=500),
    "quick": dict(channels=(8, 16, 32), train_steps=150, batch_size=64, lr=2e-3, warmup_steps=10, ema_halflife_kimg=0.5,
                  eval_every=10, sample_steps=10, n_samples=100, study_steps=(5, 10), study_n=50, sample_batch=200,
                  judge_epochs=0.05)}
# what a resumed run may change: its budget, where the data are, and everything after training (sampling, scoring)
MAY_CHANGE = ("train_steps", "epochs", "max_minutes", "eval_every", "data_root", "sample_steps", "n_samples", "study_n",
              "study_steps", "sample_batch", "no_eval", "judge_epochs", "S_churn", "S_min", "S_max", "S_noise")


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
def timestep_embedding(t, dim):
    """[sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (dim/2)), applied to c_noise = ln(sigma)/4 directly (sampling spans
    ln(0.002)/4 = -1.55 to ln(80)/4 = 1.10, which the low-k frequencies cover). EDM's code puts cos first; a linear
    layer follows, so the order is immaterial."""
    w = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * w[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, + embedding (a per-channel shift), GroupNorm, SiLU, conv3x3; 1x1 conv on the skip
    when the width changes. The last conv starts at zero, so every block starts as the identity."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(math.gcd(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(math.gcd(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """F(c_in x, c_noise) for 1 x 28 x 28 images; the layers in the order the forward pass runs them."""

    def __init__(self, channels=(64, 128, 256)):
        super().__init__()
        c1, c2, c3 = channels
        self.emb_dim = c1
        self.embed = nn.Sequential(nn.Linear(c1, 4 * c1), nn.SiLU(), nn.Linear(4 * c1, 4 * c1))
        self.stem = nn.Conv2d(1, c1, 3, padding=1)                          # 28
        self.enc28 = ResBlock(c1, c1, 4 * c1)                               # 28, kept for dec28
        self.down14 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)            # 28 -> 14
        self.enc14 = ResBlock(c1, c2, 4 * c1)                               # 14, kept for dec14
        self.down7 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)             # 14 -> 7
        self.mid1, self.mid2 = ResBlock(c2, c3, 4 * c1), ResBlock(c3, c3, 4 * c1)  # 7, the bottleneck
        self.up14 = nn.ConvTranspose2d(c3, c2, 2, stride=2)                # 7 -> 14
        self.dec14 = ResBlock(2 * c2, c2, 4 * c1)                           # 14, after concatenating enc14's output
        self.up28 = nn.ConvTranspose2d(c2, c1, 2, stride=2)                # 14 -> 28
        self.dec28 = ResBlock(2 * c1, c1, 4 * c1)                           # 28, after concatenating enc28's output
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(8, c1), c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x, c_noise):
        emb = self.embed(timestep_embedding(c_noise, self.emb_dim))
        h28 = self.enc28(self.stem(x), emb)
        h14 = self.enc14(self.down14(h28), emb)
        h = self.mid2(self.mid1(self.down7(h14), emb), emb)
        h = self.dec14(torch.cat([self.up14(h), h14], dim=1), emb)
        h = self.dec28(torch.cat([self.up28(h), h28], dim=1), emb)
        return self.out(h)


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
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).flatten().expand(len(x)).view(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = precond(sigma, self.sigma_data)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.training and x.device.type == "cuda"):
            f = self.net((c_in * x).float(), c_noise.flatten())
        return c_skip * x + c_out * f.float()


def edm_loss(D, x0, P_mean=-1.2, P_std=1.2, gen=None):
    """EDM's loss per element, lambda(sigma) || D(x0 + sigma eps, sigma) - x0 ||^2, ln sigma ~ N(P_mean, P_std^2),
    eps ~ N(0, I): drawn on the CPU from `gen` (saved with a checkpoint, so a resumed run draws the same noise)."""
    sigma = (torch.randn(len(x0), 1, 1, 1, generator=gen) * P_std + P_mean).exp().to(x0.device)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    return loss_weight(sigma, D.sigma_data) * (D(x0 + sigma * eps, sigma) - x0) ** 2


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """sigma_0..sigma_{n-1} of the Karras schedule, then sigma_n = 0 (float64, n + 1 values)."""
    if n < 2:
        raise ValueError(f"the Karras schedule needs n >= 2 steps, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


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
# ==== end of core ====


# ----------------------------------------------------------------------------- training
def train(D, x, args, run, resume=None):
    """The module docstring's training, after a linear learning-rate warm-up, for --train-steps (default: --epochs)."""
    ema = copy.deepcopy(D).eval().requires_grad_(False)
    opt = torch.optim.AdamW(D.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    loop = harness.TrainLoop(run, args.train_steps or args.epochs * steps_per_epoch, args.eval_every,
                             {"model": D, "ema": ema, "optimizer": opt}, args.seed, vars(args), kind="model",
                             resume=resume, max_minutes=args.max_minutes)
    D.train()
    for step in loop:
        epoch, b = divmod(step, steps_per_epoch)
        if b == 0 or step == loop.start:  # epoch e's shuffle depends on (seed, e) only: a resumed run continues it
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1_000_003 * args.seed + epoch))
        idx = perm[b * args.batch_size:(b + 1) * args.batch_size].to(x.device)
        for g in opt.param_groups:  # linear learning-rate warm-up (EDM ramps its lr up too)
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
        loss = edm_loss(D, x[idx], args.P_mean, args.P_std, loop.gen).mean()  # sigma and eps from loop.gen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(D.parameters(), 1.0)
        opt.step()
        h = min(args.ema_halflife_kimg * 1000, 0.05 * (step + 1) * args.batch_size)  # short early: no init in EMA
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), D.parameters()):
                p_ema.lerp_(p, 1 - 0.5 ** (len(idx) / h))
        if loop.record(loss):
            loop.evaluate(epoch=round((step + 1) / steps_per_epoch, 3))
    return ema, loop


def report_training(run, loop, steps_per_epoch, device):
    """The training figures of metrics.json, loss_steps.png and loss_epochs.png, from every step's loss."""
    losses, step, secs = loop.s["losses"], loop.s["step"], max(loop.seconds, 1e-9)
    epochs = [float(np.mean(losses[e * steps_per_epoch:(e + 1) * steps_per_epoch]))
              for e in range(len(losses) // steps_per_epoch)]
    cut = losses[len(epochs) * steps_per_epoch:]  # a budget that ends mid-epoch: that epoch's mean, apart
    last = epochs[-1] if epochs else None
    run.log(total_steps=step, epochs_done=len(epochs), epoch_loss=last, final_epoch_loss=last,
            stop_reason=loop.stop_reason or ("steps" if loop.config["train_steps"] else "epochs"),
            train_seconds=round(secs, 1), train_steps_per_s=round((step - loop.start) / secs, 3),
            best_epoch_loss=min(epochs) if epochs else None, partial_epoch_loss=float(np.mean(cut)) if cut else None,
            final_mean_loss_last_100_steps=float(np.mean(losses[-100:])),
            **({"gpu_hours": round(secs / 3600, 4)} if device.type == "cuda" else {}))
    steps, w = np.arange(1, len(losses) + 1), max(1, min(100, len(losses) // 10))
    common.plot_curves(run.path("loss_steps.png"), {"per step": (steps, losses), f"mean of {w}": (
        steps[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"))}, title="training loss per step")
    if epochs:
        common.plot_curves(run.path("loss_epochs.png"), {"epoch mean": (np.arange(1, len(epochs) + 1), epochs)},
                           xlabel="epoch", logy=False, title="training loss, mean per epoch")


def load_denoiser(path, device="cpu"):
    """(the EMA denoiser D(x, sigma), eval mode, no grads; the checkpoint) of an edm_mnist checkpoint. A missing,
    corrupt or old file (another U-Net layout and embedding order) or another script's is a one-line UsageError."""
    ckpt = harness.load_checkpoint(path, SCRIPT, "model")
    if "loop" not in ckpt:
        raise common.UsageError(f"{path}: an edm_mnist checkpoint of the old format; train a new one")
    D = Denoiser(UNet(tuple(ckpt["config"]["channels"])), ckpt["config"]["sigma_data"])
    D.load_state_dict(ckpt["ema"])
    return D.to(device).eval().requires_grad_(False), ckpt


# ----------------------------------------------------------------------------- sampling and evaluation
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
        out.append(x.clamp(-1, 1).cpu())  # the copy to the host waits for the device: the time is the sampler's
    return torch.cat(out), time.time() - t0


def figure_sigmas(path, args):
    """sigma_i of the Karras schedule against i (log scale) for the sampling step counts, and rho 1 and 3 at N = 18."""
    runs = [(n, args.rho) for n in sorted({18, 80, args.sample_steps})] + [(18, 1.0), (18, 3.0)]
    common.plot_curves(path, {f"N = {n}, rho = {rho:g}": (np.arange(n), karras_sigmas(
        n, args.sigma_min, args.sigma_max, rho)[:-1]) for n, rho in runs}, xlabel="step i", ylabel="sigma_i",
                       title="Karras schedules (then sigma_N = 0)")


def evaluate_run(D, args, run, device):
    """Sample grid, samples.pt, the judge's scores and the steps study (FID and time per sample against N)."""
    judge_kw = dict(dataset=args.dataset, data_root=args.data_root, out_root=args.out, device=device,
                    judge_epochs=args.judge_epochs)
    samples, secs = generate(D, args.n_samples, args.sample_steps, args, run, "sample", device)
    torch.save(samples, run.path("samples.pt"))
    common.image_grid(run.path("samples_grid.png"), samples[:100], nrow=10,
                      title=f"EDM samples, Heun, {args.sample_steps} steps ({2 * args.sample_steps - 1} evaluations)")
    run.log(n_samples=len(samples), sample_steps=args.sample_steps, sample_seconds=round(secs, 1),
            seconds_per_sample=round(secs / len(samples), 5))
    if args.no_eval:
        return
    run.progress("score", 0, 1, force=True)
    main_eval, study = evaluate.score(samples, **judge_kw), []
    run.log(eval=main_eval)
    for n in args.study_steps:  # the same N and n as above: the same samples, so reuse their scores
        same = (n, args.study_n) == (args.sample_steps, args.n_samples)
        xs, t = (samples, secs) if same else generate(D, args.study_n, n, args, run, f"study N={n}", device)
        s = main_eval if same else evaluate.score(xs, **judge_kw)
        study.append({"steps": n, "nfe": 2 * n - 1, "fid": s["fid"], "fid_floor": s["fid_floor"],
                      "mean_top_prob": s["mean_top_prob"], "seconds_per_sample": round(t / args.study_n, 5)})
        run.log(steps_study=study)
    steps = [r["steps"] for r in study]
    log_log = dict(xlabel="sampling steps N (2N - 1 evaluations)", logx=True, logy=True)
    common.plot_panels(run.path("steps_study.png"), [
        dict(log_log, curves={"samples": (steps, [r["fid"] for r in study], "o-")}, ylabel="FID",
             floor=study[0]["fid_floor"], title=f"FID against N (n = {args.study_n})"),
        dict(log_log, curves={"samples": (steps, [1000 * r["seconds_per_sample"] for r in study], "o-")},
             ylabel="ms per sample", title=f"time per sample against N ({device.type})")])


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    num, size = common.num, common.num(int, 2, 10**6)  # the judge scores two samples or more
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="a 1 x 28 x 28, 10-class set")
    p.add_argument("--data-root", default="./data", help="torchvision data root (holds MNIST/raw)")
    p.add_argument("--channels", type=common.num_list(int, 1, 1024), help="U-Net widths at 28, 14 and 7 pixels")
    p.add_argument("--sigma-data", type=lambda s: s if s == "measured" else num(float, 0, 100, open_lo=True)(s),
                   default=0.5, help="data standard deviation in the preconditioning, or 'measured' (training images)")
    p.add_argument("--P-mean", type=num(float, -20, 20), default=-1.2, help="mean of ln sigma during training")
    p.add_argument("--P-std", type=num(float, 0, 20, open_lo=True), default=1.2, help="standard deviation of ln sigma")
    p.add_argument("--epochs", type=num(int, 1, 10**5), help="training epochs (total, when resuming)")
    p.add_argument("--train-steps", "--max-steps", type=num(int, 1, 10**8),
                   help="optimizer steps in all (default: --epochs whole epochs)")
    p.add_argument("--max-minutes", type=num(float, 0, 10**6), help="minutes of training in this invocation (0: none)")
    p.add_argument("--batch-size", type=num(int, 1, 10**5), help="images per step")
    p.add_argument("--lr", type=num(float, 0, 10, open_lo=True), help="AdamW learning rate (after the warm-up)")
    p.add_argument("--warmup-steps", type=num(int, 1, 10**8), help="steps of linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=num(float, 0, 10), default=0.0, help="AdamW weight decay")
    p.add_argument("--ema-halflife-kimg", type=num(float, 0, 10**6, open_lo=True), help="EMA half-life, kimg")
    p.add_argument("--eval-every", "--log-every", type=num(int, 1, 10**8),
                   help="steps between checkpoints (and the NaN check of the losses)")
    p.add_argument("--resume", default=None, help="checkpoint.pt of an unfinished run: continue it exactly")
    p.add_argument("--checkpoint", default=None, help="skip training: sample and score this checkpoint's EMA")
    p.add_argument("--sigma-min", type=num(float, 0, 10**4, open_lo=True), default=0.002, help="sampling sigma_min")
    p.add_argument("--sigma-max", type=num(float, 0, 10**4, open_lo=True), default=80.0, help="sampling sigma_max")
    p.add_argument("--rho", type=num(float, 0, 100, open_lo=True), default=7.0, help="Karras schedule exponent")
    p.add_argument("--sample-steps", type=num(int, 2, 10**4), help="Heun steps N (2N - 1 evaluations); paper: 18")
    p.add_argument("--S-churn", type=num(float, 0, 10**4), default=0.0, help="stochastic churn (0: the ODE)")
    p.add_argument("--S-min", type=num(float, 0), default=0.0, help="churn only for sigma >= S_min")
    p.add_argument("--S-max", type=num(float, 0), default=float("inf"), help="churn only for sigma <= S_max")
    p.add_argument("--S-noise", type=num(float, 0, 100), default=1.0, help="scale of the churn noise")
    p.add_argument("--n-samples", "--n-eval", type=size, help="samples written to samples.pt and scored")
    p.add_argument("--study-steps", type=common.num_list(int, 2, 10**4), help="step counts of the steps study")
    p.add_argument("--study-n", type=size, help="samples per step count in the steps study")
    p.add_argument("--sample-batch", type=num(int, 1, 10**5), help="images per sampling batch")
    p.add_argument("--no-eval", action="store_true", help="skip the judge's scores and the steps study")
    p.add_argument("--judge-epochs", type=num(float, 0, 1000, open_lo=True), help="judge budget if not cached")
    args = common.parse(p, argv)
    if len(args.channels) != 3:
        p.error(f"--channels: expected three widths c1,c2,c3, got {len(args.channels)}")
    if args.sigma_min >= args.sigma_max:
        p.error(f"--sigma-min ({args.sigma_min:g}) must be below --sigma-max ({args.sigma_max:g})")
    if args.resume and args.checkpoint:
        p.error("--resume and --checkpoint exclude each other")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = common.get_device(args.device)
    D, ckpt = load_denoiser(args.resume or args.checkpoint, device) if args.resume or args.checkpoint else (None, None)
    if args.resume:
        args = harness.resumed(args, ckpt, MAY_CHANGE)
    elif ckpt:  # sample the checkpoint's EMA network; judge on the data it was trained on
        args.channels, args.sigma_data, args.dataset = map(ckpt["config"].get, ("channels", "sigma_data", "dataset"))
    # the whole training split (EDM holds nothing out); bad input is found here, before the run folder exists
    x = None if args.checkpoint else common.load_image_dataset(args.dataset, args.data_root, val_size=0)[0]
    args.sigma_data = round(float(x.std()), 4) if args.sigma_data == "measured" else args.sigma_data

    run = harness.Run(SCRIPT, args)
    run.log(device=str(device), sigma_data=args.sigma_data)
    figure_sigmas(run.path("sigma_schedule.png"), args)
    if not args.checkpoint:
        torch.manual_seed(args.seed)  # the initial weights
        D, loop = train(Denoiser(UNet(tuple(args.channels)), args.sigma_data).to(device), x.to(device), args, run, ckpt)
        report_training(run, loop, math.ceil(len(x) / args.batch_size), device)
    inputs = (torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.zeros(1))
    common.figure_network(run.path("unet.png"), D.net, [v.to(device) for v in inputs], "U-Net F")
    evaluate_run(D, args, run, device)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

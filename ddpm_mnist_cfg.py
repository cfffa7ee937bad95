"""ddpm_mnist_cfg.py: a class-conditional DDPM on MNIST with classifier-free guidance.

Forward process (Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"), t = 1..T:
  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s
Schedules (--schedule):
  linear  beta_t from 1e-4 to 0.02 in T steps, both ends scaled by 1000/T (as Nichol and Dhariwal's code does,
          so alpha_bar_T is near 0 for any T; exactly 1e-4..0.02 at T = 1000)
  cosine  alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), s = 0.008 (Nichol and Dhariwal
          2021, "Improved Denoising Diffusion Probabilistic Models"); beta_t = 1 - alpha_bar(t) / alpha_bar(t-1)
  both:   beta_t capped at 0.999, then alpha_bar_t = prod_{s<=t} (1 - beta_s): the cap (it only bites at the last
          cosine step) is reflected in alpha_bar.
Training: noise prediction, L = E_{x_0, y, t, eps} || eps - eps_theta(x_t, t, y') ||^2, x_t = sqrt(alpha_bar_t) x_0
  + sqrt(1 - alpha_bar_t) eps, y' = the null class with probability 10% (label dropout), so one network learns both
  eps_theta(x_t, t, y) and eps_theta(x_t, t, null). AdamW, gradient norm clipped at 1.0, EMA of the weights with
  warm-up, theta_ema <- d_n theta_ema + (1 - d_n) theta, d_n = min(decay, (1 + n) / (10 + n)); the EMA samples,
  and its validation loss drives ReduceLROnPlateau and early stopping; bf16 autocast on CUDA.
Classifier-free guidance (Ho and Salimans 2022, "Classifier-Free Diffusion Guidance"):
  eps_hat = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null)), both passes in one batch.
  w = 0 is unconditional, w = 1 plain conditional, w > 1 guided ((1 + w) eps_c - w eps_u elsewhere is our w - 1).
Ancestral sampling, t = T..1, x_T ~ N(0, I):
  x0_hat  = clip((x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), -1, 1)
  mu      = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat
            + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
  x_{t-1} = mu + sigma_t z (z ~ N(0, I), no noise at t = 1),
  sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t   (--variance beta: sigma_t^2 = beta_t).
  --no-clip uses the raw form mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t), equal to the
  above without the clip, which can drift far outside the data range under strong guidance.
Network: a small U-Net (28 -> 14 -> 7 -> 14 -> 28); the embeddings of t and the class (10 = the null class) scale and
  shift its features at the bottleneck and in every up block.
Presets: the default (GPU) run follows the literature for 28x28 (channels 64,128,256, T = 1000, as Ho et al.); --preset
  cpu (2 CPU cores) cuts T to 250 and the widths so that sampling N = 1,000 takes 15 minutes; --quick: a smoke test.

Usage: python ddpm_mnist_cfg.py [--preset cpu] [--quick] [--w 2] ...
       python ddpm_mnist_cfg.py --resume outputs/ddpm_mnist_cfg/RUN/checkpoint.pt     (continue a stopped run)
       python ddpm_mnist_cfg.py --checkpoint outputs/ddpm_mnist_cfg/RUN/checkpoint.pt [--generate 7]
           (no training: sample and score the model, or draw --n-samples (64) images of one digit)
"""
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness
import evaluate

SCRIPT = "ddpm_mnist_cfg"
PRESETS = {  # "gpu" is the default run; the others change only what they name
    "gpu": dict(channels=(64, 128, 256), T=1000, schedule="cosine", train_steps=20000, batch_size=128, lr=5e-4,
                ema_decay=0.9995, eval_every=500, val_size=5000, val_n=2000, n_samples=10000, sweep_n=1000,
                sweep_w=(0, 1, 2, 3, 5, 7, 9), sample_batch=1000, max_minutes=0.0, judge_epochs=None),
    "cpu": dict(channels=(24, 48, 96), T=250, train_steps=6000, lr=1e-3, ema_decay=0.999, eval_every=250, val_n=1000,
                n_samples=1000, sweep_n=50, sample_batch=500, max_minutes=20.0),
    "quick": dict(channels=(8, 16, 32), T=30, train_steps=250, batch_size=64, lr=2e-3, ema_decay=0.99, eval_every=50,
                  val_size=256, val_n=256, n_samples=100, sweep_n=20, sweep_w=(0, 2, 5), sample_batch=200,
                  judge_epochs=0.05),
}


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
class Schedule:
    """beta_t and what follows from it (float32, on `device`); index i = t - 1 holds step t = 1..T. coef_x0 and
    coef_xt are the posterior mean's coefficients, computed in float64 (in float32, 1 - alpha_bar_t loses digits)."""

    def __init__(self, beta, device="cpu"):
        beta = beta.double()
        alpha_bar = torch.cumprod(1 - beta, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta  # the variance of q(x_{t-1} | x_t, x_0)
        coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)  # mu = coef_x0 x0_hat + coef_xt x_t (docstring)
        coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        for name, v in dict(beta=beta, alpha=1 - beta, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                            beta_tilde=beta_tilde, coef_x0=coef_x0, coef_xt=coef_xt).items():
            setattr(self, name, v.float().to(device))
        self.T = len(beta)


def linear_beta(T, beta_start=1e-4, beta_end=0.02, max_beta=0.999):
    """beta_1..beta_T (float64), both ends scaled by 1000/T, capped at max_beta."""
    return torch.linspace(1000 / T * beta_start, 1000 / T * beta_end, T, dtype=torch.float64).clamp(max=max_beta)


def cosine_beta(T, s=0.008, max_beta=0.999):
    """beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta), alpha_bar(t) = f(t) / f(0) (module docstring)."""
    f = torch.cos(((torch.arange(T + 1, dtype=torch.float64) / T) + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


BETAS = {"linear": linear_beta, "cosine": cosine_beta}


def q_sample(x0, i, eps, sched):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for a batch of indices i = t - 1."""
    ab = sched.alpha_bar[i].view(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def timestep_embedding(t, dim=64):
    """Sinusoidal embedding (Vaswani et al. 2017): [sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (dim/2))."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class GELUConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out):  # GroupNorm with 8 groups where they divide the channels
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1 if c_out % 8 else 8, c_out), nn.GELU())


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


class UNet(nn.Module):
    """eps_theta(x_t, i, y) for 1 x 28 x 28 images, i = t - 1 the step index; y = n_classes is the null class."""

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

    def forward(self, x, i, y):
        e = self.time_mlp(timestep_embedding(i)) + self.class_emb(y)
        h, s1 = self.down1(x)
        h, s2 = self.down2(h)
        h = self.mid_out(self.mid_inject(self.mid_in(h), e))
        return self.out(self.up1(self.up2(h, s2, e), s1, e))


def ddpm_loss(eps_model, x0, y, i, eps, sched, u=None, p_uncond=0.0):
    """|| eps - eps_theta(x_t, t, y') ||^2 averaged over the batch and the pixels; y' = null where u < p_uncond
    (label dropout, u ~ U(0, 1) per image; u=None keeps every label)."""
    if u is not None:
        y = torch.where(u < p_uncond, torch.full_like(y, eps_model.null_class), y)
    return F.mse_loss(eps_model(q_sample(x0, i, eps, sched), i, y).float(), eps)


@torch.no_grad()
def ema_update(ema, model, n, decay):
    """theta_ema <- d theta_ema + (1 - d) theta with d = min(decay, (1 + n) / (10 + n)) at step n; returns d.
    The warm-up keeps the EMA from averaging in the random initialisation for thousands of steps."""
    d = min(decay, (1 + n) / (10 + n))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(p.detach(), alpha=1 - d)
    return d


@torch.no_grad()
def guided_eps(eps_model, x, i, y, w):
    """eps_hat = eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null)); both passes in one batch."""
    null = torch.full_like(y, eps_model.null_class)
    eps_c, eps_u = eps_model(torch.cat([x, x]), torch.cat([i, i]), torch.cat([y, null])).float().chunk(2)
    return eps_u + w * (eps_c - eps_u)


@torch.no_grad()
def sample(eps_model, sched, y, w, clip=True, variance="beta_tilde", record_every=0, gen=None, on_step=None):
    """Ancestral sampling of len(y) images with labels y (module docstring), noise from the CPU generator gen. Returns
    x_0 and x_t every `record_every` steps (with x_T; none when 0); on_step(k) after step k of T (progress)."""
    x = torch.randn((len(y), 1, 28, 28), generator=gen).to(y.device)
    traj, var = [x.cpu()] if record_every else [], sched.beta_tilde if variance == "beta_tilde" else sched.beta
    for i in reversed(range(sched.T)):  # i = t - 1
        eps_hat = guided_eps(eps_model, x, torch.full_like(y, i), y, w)
        if clip:
            x0_hat = ((x - (1 - sched.alpha_bar[i]).sqrt() * eps_hat) / sched.alpha_bar[i].sqrt()).clamp(-1, 1)
            mean = sched.coef_x0[i] * x0_hat + sched.coef_xt[i] * x
        else:
            mean = (x - sched.beta[i] / (1 - sched.alpha_bar[i]).sqrt() * eps_hat) / sched.alpha[i].sqrt()
        x = mean + var[i].sqrt() * torch.randn(x.shape, generator=gen).to(x.device) if i > 0 else mean
        if record_every and i % record_every == 0:
            traj.append(x.cpu())
        if on_step:
            on_step(sched.T - i)
    return x, traj
# ==== end of core ====


# ----------------------------------------------------------------------------- training
def train(eps_model, sched, data, args, run, resume=None):
    """Each step draws its batch (with replacement), dropped labels, t and eps from loop.gen; the validation loss
    uses one fixed draw of t and eps, so its curve shows the model, not the draw. Returns (EMA, loop)."""
    x, y, xv, yv = data
    device, g = sched.beta.device, torch.Generator().manual_seed(1234)
    xv, yv = xv[:args.val_n].to(device), yv[:args.val_n].to(device)
    iv = torch.randint(0, sched.T, (len(xv),), generator=g).to(device)
    ev = torch.randn(xv.shape, generator=g).to(device)
    ema = copy.deepcopy(eps_model).requires_grad_(False)
    opt = torch.optim.AdamW(eps_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=args.lr_patience)
    loop = harness.TrainLoop(run, args.train_steps, args.eval_every, {"model": eps_model, "ema": ema, "optimizer": opt,
                             "plateau": plateau}, args.seed, vars(args), resume=resume, max_minutes=args.max_minutes,
                             patience=args.patience, script=SCRIPT)  # a ddpm_mnist_cfg checkpoint, whoever trains
    for step in loop:
        idx = torch.randint(0, len(x), (args.batch_size,), generator=loop.gen)
        u = torch.rand(args.batch_size, generator=loop.gen).to(device)  # label dropout where u < p_uncond
        i = torch.randint(0, sched.T, (args.batch_size,), generator=loop.gen).to(device)
        eps = torch.randn((args.batch_size, 1, 28, 28), generator=loop.gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = ddpm_loss(eps_model, x[idx].to(device), y[idx].to(device), i, eps, sched, u, args.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(eps_model.parameters(), 1.0)
        opt.step()
        ema_update(ema, eps_model, step, args.ema_decay)
        if loop.record(loss):
            val = ddpm_loss(ema, xv, yv, iv, ev, sched).item()  # the EMA takes no gradients: no graph is built
            if (step + 1) % args.eval_every == 0:  # not at a time-budget stop: a resumed run keeps the lr schedule
                plateau.step(val)
            loop.evaluate(val_loss=val, best_val_loss=min(val, loop.s["best"]), lr=opt.param_groups[0]["lr"])
    return ema.eval(), loop


def load_eps_model(path, device, weights="ema"):
    """(eps_model, Schedule, config) of a checkpoint of this script, old format or new (ddim_sample.py reads it too)."""
    ckpt = harness.load_checkpoint(path, SCRIPT, "model")
    eps_model, cfg = UNet(tuple(ckpt["config"]["channels"])), ckpt["config"]
    eps_model.load_state_dict(ckpt[weights])
    return eps_model.to(device).eval().requires_grad_(False), Schedule(BETAS[cfg["schedule"]](cfg["T"]), device), cfg


# ----------------------------------------------------------------------------- sampling, evaluation
def generate(eps_model, sched, labels, w, args, run, phase):
    """Sample many images in batches, reporting progress; returns them in [-1, 1] on the CPU and the seconds taken.
    Every call seeds its generator with --seed + 1: rows of the guidance sweep start from the same x_T and noise."""
    gen, out, t0, device = torch.Generator().manual_seed(args.seed + 1), [], time.time(), sched.beta.device
    n_batches = math.ceil(len(labels) / args.sample_batch)
    for b, yb in enumerate(common.progress_bar(labels.split(args.sample_batch), desc=phase, leave=False)):
        x, _ = sample(eps_model, sched, yb.to(device), w, not args.no_clip, args.variance, gen=gen,
                      on_step=lambda k: run.progress(phase, b * sched.T + k, n_batches * sched.T))
        out.append(x.clamp(-1, 1).cpu())  # --no-clip can leave the range: clamp only what is saved
    return torch.cat(out), time.time() - t0


def figure_schedules(run, x0, T, kind, n=8):
    """forward_noising.png: q(x_t | x_0) for one image at n evenly spaced steps, one noise draw; schedules.png."""
    s, i = {k: Schedule(betas(T)) for k, betas in BETAS.items()}, torch.linspace(0, T - 1, n).long()
    eps = torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(0)).expand(n, -1, -1, -1)
    xs = q_sample(x0.expand(n, -1, -1, -1), i, eps, s[kind]).clamp(-1, 1)
    common.image_grid(run.path("forward_noising.png"), xs, n, title=f"forward noising, t = {(i + 1).tolist()}")
    common.plot_curves(run.path("schedules.png"), {f"{name}_t {k}": (torch.arange(1, T + 1), getattr(s[k], name))
                       for k in s for name in ("beta", "alpha_bar")}, "t", "", f"the schedules, T = {T}")


def evaluate_run(eps_model, sched, args, run):
    """samples.pt / labels.pt (digits 0-9 in turn, or --generate's), figures and the judge's scores (not --generate)."""
    labels = torch.arange(args.n_samples) % 10 if args.generate is None else torch.full([args.n_samples], args.generate)
    samples, secs = generate(eps_model, sched, labels, args.w, args, run, "sample")
    torch.save(samples, run.path("samples.pt"))
    torch.save(labels, run.path("labels.pt"))
    run.log(n_samples=len(samples), sample_seconds=round(secs, 1), sample_images_per_s=round(len(samples) / secs, 2),
            sample_image_steps_per_s=round(len(samples) * sched.T / secs, 1), w=args.w)
    if args.generate is not None:
        common.image_grid(run.path("generate.png"), samples, nrow=8, title=f"digit {args.generate}, w = {args.w:g}")
        return run.log(digit=args.generate)
    grid, _ = generate(eps_model, sched, torch.arange(10).repeat_interleave(10), args.w, args, run, "grid")
    common.image_grid(run.path("samples_grid.png"), grid, nrow=10, title=f"w = {args.w:g}",
                      row_labels=[str(k) for k in range(10)])
    _, traj = sample(eps_model, sched, torch.tensor([3], device=sched.beta.device), args.w, not args.no_clip,
                     args.variance, record_every=max(1, sched.T // 10), gen=torch.Generator().manual_seed(args.seed))
    common.image_grid(run.path("denoising.png"), torch.cat(traj).clamp(-1, 1), nrow=len(traj),
                      title="denoising x_T -> x_0, digit 3")
    ys = torch.arange(args.sweep_n) % 10
    sweep = [(w, generate(eps_model, sched, ys, w, args, run, f"sweep w={w:g}")[0]) for w in args.sweep_w]
    common.image_grid(run.path("guidance_sweep.png"), torch.cat([xs[:10] for _, xs in sweep]), nrow=10,
                      title="guidance sweep", row_labels=[f"w={w:g}" for w, _ in sweep])
    if not args.no_eval:
        run.progress("score", 0, 1, force=True)
        judge = dict(dataset=args.dataset, data_root=args.data_root, out_root=args.out, device=sched.beta.device,
                     judge_epochs=args.judge_epochs)
        scores = [{"w": float(w), **evaluate.score(xs, ys, **judge)} for w, xs in sweep]
        run.log(eval=evaluate.score(samples, labels, **judge), guidance_sweep=scores)
        ws = [r["w"] for r in scores]
        common.plot_panels(run.path("guidance_metrics.png"), [
            dict(curves={"samples": (ws, [r["class_accuracy"] for r in scores], "o-")}, xlabel="w",
                 ylabel="class accuracy", title=f"class accuracy (N = {args.sweep_n})"),
            dict(curves={"samples": (ws, [r["fid"] for r in scores], "o-")}, xlabel="w", ylabel="FID (judge features)",
                 title=f"FID (judge features, N = {args.sweep_n})", floor=scores[0].get("fid_floor"))])


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="a 1 x 28 x 28, 10-class set")
    p.add_argument("--data-root", default="./data", help="the folder that holds MNIST/raw (torchvision's layout)")
    p.add_argument("--channels", type=common.num_list(int, 1, 4096), help="U-Net widths at 28, 14 and 7 pixels")
    p.add_argument("--T", type=common.num(int, 2, 100_000), help="number of diffusion steps")
    p.add_argument("--schedule", choices=list(BETAS), help="beta schedule")
    p.add_argument("--train-steps", "--steps", type=common.num(int, 1, 10**7), help="optimizer steps (in all, resumed)")
    p.add_argument("--batch-size", type=common.num(int, 1, 16384), help="images per step")
    p.add_argument("--lr", type=common.num(float, 0, 10, open_lo=True), help="AdamW learning rate")
    p.add_argument("--weight-decay", type=common.num(float, 0, 10), default=0.0, help="AdamW weight decay")
    p.add_argument("--ema-decay", type=common.num(float, 0, 0.999999), help="EMA decay (after the warm-up)")
    p.add_argument("--p-uncond", type=common.num(float, 0, 1), default=0.1, help="label dropout probability")
    p.add_argument("--eval-every", type=common.num(int, 1, 10**7), help="steps between validations and checkpoints")
    p.add_argument("--val-size", type=common.num(int, 1, 10**6), help="images held out of the training split")
    p.add_argument("--val-n", type=common.num(int, 1, 10**4), help="validation images used for the validation loss")
    p.add_argument("--lr-patience", type=common.num(int, 0, 10**6), default=3, help="evaluations before halving lr")
    p.add_argument("--patience", type=common.num(int, 0, 10**6), default=8, help="evaluations to early stop (0: never)")
    p.add_argument("--max-minutes", type=common.num(float, 0), help="minutes of training in this invocation (0: none)")
    p.add_argument("--resume", default=None, help="checkpoint.pt of a stopped run: continue it exactly")
    p.add_argument("--checkpoint", default=None, help="no training: sample and score this checkpoint (or --generate)")
    p.add_argument("--w", type=common.num(float, 0), default=2.0, help="guidance weight (0 uncond, 1 cond, >1 guided)")
    p.add_argument("--variance", choices=["beta_tilde", "beta"], default="beta_tilde", help="reverse-step sigma_t^2")
    p.add_argument("--no-clip", action="store_true", help="raw sampler form without clipping x0_hat (for study)")
    p.add_argument("--sample-batch", type=common.num(int, 1, 10**4), help="images per sampling batch")
    p.add_argument("--n-samples", "--n-eval", type=common.num(int, 1, 10**6), help="samples drawn and scored")
    p.add_argument("--sweep-w", type=common.num_list(float, 0), help="comma-separated guidance weights for the sweep")
    p.add_argument("--sweep-n", type=common.num(int, 1, 10**5), help="samples per guidance weight in the sweep")
    p.add_argument("--no-eval", action="store_true", help="skip the judge's scores")
    p.add_argument("--judge-epochs", type=common.num(float, 0, 1000, open_lo=True), help="judge budget if not cached")
    p.add_argument("--generate", type=common.num(int, 0, 9), metavar="DIGIT", help="only --n-samples (64) of DIGIT")
    args = common.parse(p, argv)
    if len(args.channels) != 3:
        p.error(f"--channels: expected 3 widths (28, 14 and 7 pixels), got {len(args.channels)}")
    if not args.sweep_w:
        p.error("--sweep-w: give at least one guidance weight")
    if args.resume and args.checkpoint or args.generate is not None and not args.checkpoint:
        p.error("--generate needs --checkpoint (the model to draw from), and --resume excludes --checkpoint")
    args.n_samples = 64 if args.generate is not None and "n_samples" not in args.explicit else args.n_samples
    return args


def main(argv=None):
    args = parse_args(argv)
    resume = harness.load_checkpoint(args.resume, SCRIPT, "model") if args.resume else None
    args = harness.resumed(args, resume, ("train_steps", "max_minutes", "patience", "data_root")) if resume else args
    device = common.get_device(args.device)
    if args.checkpoint:  # bad input is found here, before the run folder exists
        eps_model, sched, cfg = load_eps_model(args.checkpoint, device)
        args.channels, args.T, args.schedule, args.dataset = (cfg[k] for k in ("channels", "T", "schedule", "dataset"))
    else:
        data = common.load_image_dataset(args.dataset, args.data_root, train=True, val_size=args.val_size)
        torch.manual_seed(args.seed)  # the initial weights
        eps_model, sched = UNet(args.channels).to(device), Schedule(BETAS[args.schedule](args.T), device)
    run = harness.Run(SCRIPT, args)
    if not args.checkpoint:  # the forward process and the schedules, training, its loss curves
        figure_schedules(run, data[0][0], args.T, args.schedule)
        eps_model, loop = train(eps_model, sched, data, args, run, resume)
        secs, h = max(loop.seconds, 1e-9), loop.history
        run.log(train_seconds=round(secs, 1),
                train_images_per_s=round((loop.s["step"] - loop.start) * args.batch_size / secs, 1))
        common.plot_curves(run.path("loss.png"), {"train": (h["step"], h["train"]),
                           "validation (EMA)": (h["step"], h["val_loss"])}, title="noise-prediction MSE")
    evaluate_run(eps_model, sched, args, run)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

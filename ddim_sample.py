"""ddim_sample.py: DDIM sampling of the class-conditional MNIST DDPM: steps against quality, interpolation, inversion.

Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models". The DDPM of ddpm_mnist_cfg.py was trained only through
the marginals q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I). DDIM builds non-Markovian processes with
the same marginals, so the same eps_theta samples them, and on any subsequence tau of the steps 1..T:
  T = tau_S > tau_{S-1} > ... > tau_1 > tau_0 = 0, with alpha_bar_0 = 1 (S model calls per sample)
  uniform:    tau_k = floor(k T / S)
  quadratic:  tau_k = k + floor((T - S) (k / S)^2)   (denser at low noise; the "+ k" keeps it strictly increasing)
alpha_bar_t is ddpm_mnist_cfg's Schedule at index i = t - 1 (and 1 at t = 0); the model is called with i = t - 1.
One step t -> t' (consecutive entries of tau, t' < t), with classifier-free guidance w (ddpm_mnist_cfg.guided_eps):
  eps_hat = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null))
  x0_hat  = clip((x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), -1, 1)
  eps_hat = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t)        (re-derived from the clipped x0_hat)
  sigma   = eta sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t'})
  x_{t'}  = sqrt(alpha_bar_{t'}) x0_hat + sqrt(1 - alpha_bar_{t'} - sigma^2) eps_hat + sigma z,   z ~ N(0, I)
eta = 0 is deterministic: x_T is a latent code of its x_0. eta = 1 with every step (t' = t - 1) gives
sigma^2 = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t = beta_tilde_t and the mean of DDPM's posterior
q(x_{t-1} | x_t, x0_hat): the ancestral sampler exactly. eta is kept in [0, 1] (above 1, sigma^2 can exceed
1 - alpha_bar_{t'}). The last step (t' = 0) returns x0_hat.
Inversion (eta = 0 run backwards, t' -> t, t' < t, with the sampler's clip; at t' = 0, x0_hat is x_0 itself):
  eps_hat = eps_theta(x_{t'}, t, null) + w (eps_theta(x_{t'}, t, y) - eps_theta(x_{t'}, t, null)),  w = --inversion-w
  x0_hat  = clip((x_{t'} - sqrt(1 - alpha_bar_{t'}) eps_hat) / sqrt(alpha_bar_{t'}), -1, 1)
  eps_hat = (x_{t'} - sqrt(alpha_bar_{t'}) x0_hat) / sqrt(1 - alpha_bar_{t'})        (t' > 0)
  x_t     = sqrt(alpha_bar_t) x0_hat + sqrt(1 - alpha_bar_t) eps_hat
  eps is taken at x_{t'} because x_t is not known yet (and the model has no input at t' = 0); decoding takes it at
  x_t. That mismatch is the whole reconstruction error. Without the clip, the step from T multiplies it by
  sqrt(alpha_bar_{t'} / alpha_bar_T), thousands for the cosine schedule (alpha_bar_T ~ 4e-8 at T = 250).
Interpolation between noise vectors a, b (they live near the sphere of radius sqrt(784), so not a straight line):
  slerp(a, b; lambda) = sin((1 - lambda) theta) / sin(theta) a + sin(lambda theta) / sin(theta) b,
  theta = arccos(<a, b> / (|a| |b|)).
The study (default run): DDIM at --sample-steps with each of --etas, and ddpm_mnist_cfg.sample (ancestral, T steps),
from the same x_T and labels; model calls and wall time per batch, FID and class accuracy from evaluate.py at
N = --n-samples; noise-prediction MSE against t on test digits; inversion PSNR = 10 log10(2^2 / MSE) (range [-1, 1])
against steps: figures, analysis_report.md (the table, and sentences built from the numbers) and metrics.json.

Usage: python ddim_sample.py --checkpoint outputs/ddpm_mnist_cfg/RUN/checkpoint.pt [--sample-steps 10,20,50,100,T]
       python ddim_sample.py --quick [--data-root ./data]   (trains a tiny model with ddpm_mnist_cfg first)
"""
import argparse
import math
import time

import numpy as np
import torch

import common
import harness
import ddpm_mnist_cfg
import evaluate

SCRIPT = "ddim_sample"
PRESETS = {"full": dict(n_samples=10000, sample_batch=1000, n_mse=500, n_inv=100, judge_epochs=None),
           "quick": dict(n_samples=100, sample_batch=100, n_mse=64, n_inv=16, judge_epochs=0.05)}  # < 2 min, 2 cores
DEFAULT_STEPS = "10,20,50,100,T"  # entries above T are left out of the default (an explicit one is an error)
QUICK_TRAIN = ["--quick", "--T", "50"]  # the tiny model --quick trains when no checkpoint is given
INTERP_DIGITS = (3, 5, 8, 9)  # one row each in the interpolation figures


# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ====
def timesteps(T, S, spacing="uniform"):
    """tau_S = T > ... > tau_0 = 0 as a decreasing list of S + 1 ints (see the docstring)."""
    if not 1 <= S <= T:
        raise ValueError(f"steps must be in 1..T = {T}, got {S}")
    if spacing == "uniform":
        tau = [k * T // S for k in range(S + 1)]
    else:  # integer arithmetic: floor((T - S) k^2 / S^2) without rounding surprises
        tau = [k + (T - S) * k * k // (S * S) for k in range(S + 1)]
    return tau[::-1]


def alpha_bar_at(sched, t):
    """alpha_bar_t for the paper's step t = 0..T: the schedule's index i = t - 1, and 1 at t = 0 (no noise)."""
    return 1.0 if t == 0 else sched.alpha_bar[t - 1].item()


@torch.no_grad()
def ddim_step(eps_model, x, t, t_prev, y, w, eta, sched, z=None, clip=True):
    """x_t -> x_{t'} (docstring equations); returns (x_{t'}, its mean, sigma). z=None draws no noise."""
    ab, ab_prev = alpha_bar_at(sched, t), alpha_bar_at(sched, t_prev)
    eps_hat = ddpm_mnist_cfg.guided_eps(eps_model, x, torch.full_like(y, t - 1), y, w)  # index i = t - 1
    x0_hat = (x - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    eps_hat = (x - math.sqrt(ab) * x0_hat) / math.sqrt(1 - ab)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    mean = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps_hat  # max: rounding
    x_prev = mean + sigma * z if z is not None else mean
    return x_prev, mean, sigma


@torch.no_grad()
def ddim_sample(eps_model, sched, tau, y, w, eta, x_T, gen=None, clip=True, on_step=None):
    """Run ddim_step along tau (decreasing, ending at 0) from x_T. Noise is drawn only where sigma > 0, in the
    same order as ddpm_mnist_cfg.sample draws it, so eta = 1 on every step repeats that sampler draw for draw.
    on_step(k, S) is called after step k of S (progress reports)."""
    x = x_T
    for k, (t, t_prev) in enumerate(zip(tau[:-1], tau[1:])):
        z = torch.randn(x.shape, generator=gen).to(x.device) if eta > 0 and t_prev > 0 else None
        x, _, _ = ddim_step(eps_model, x, t, t_prev, y, w, eta, sched, z, clip)
        if on_step:
            on_step(k + 1, len(tau) - 1)
    return x


@torch.no_grad()
def ddim_invert(eps_model, sched, tau, x0, y, w, clip=True):
    """Encode x_0 to x_T: the eta = 0 update run up tau (docstring, 'Inversion')."""
    x = x0
    for t_prev, t in zip(tau[::-1][:-1], tau[::-1][1:]):  # t' < t
        ab, ab_prev = alpha_bar_at(sched, t), alpha_bar_at(sched, t_prev)
        eps_hat = ddpm_mnist_cfg.guided_eps(eps_model, x, torch.full_like(y, t - 1), y, w)
        x0_hat = (x - math.sqrt(1 - ab_prev) * eps_hat) / math.sqrt(ab_prev)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        eps_hat = (x - math.sqrt(ab_prev) * x0_hat) / math.sqrt(1 - ab_prev) if t_prev > 0 else eps_hat
        x = math.sqrt(ab) * x0_hat + math.sqrt(1 - ab) * eps_hat
    return x


def slerp(a, b, lam):
    """Spherical interpolation of flattened noise vectors (docstring)."""
    theta = torch.arccos((a * b).sum() / (a.norm() * b.norm())).clamp(min=1e-6)
    return torch.sin((1 - lam) * theta) / torch.sin(theta) * a + torch.sin(lam * theta) / torch.sin(theta) * b
# ==== end of core ====


# ----------------------------------------------------------------------------- the model: a checkpoint, or --quick's
def train_tiny(targs, data, run, device):
    """ddpm_mnist_cfg's model, schedule and training loop; checkpoint.pt lands in this run. Returns (EMA, Schedule)."""
    torch.manual_seed(targs.seed)  # the initial weights, as ddpm_mnist_cfg seeds them
    eps_model = ddpm_mnist_cfg.UNet(targs.channels).to(device)
    sched = ddpm_mnist_cfg.Schedule(ddpm_mnist_cfg.BETAS[targs.schedule](targs.T), device)
    ema, loop = ddpm_mnist_cfg.train(eps_model, sched, data, targs, run)  # a ddpm_mnist_cfg checkpoint
    secs = max(loop.seconds, 1e-9)
    run.log(trained_tiny_model={"train_steps": loop.s["step"], "stop_reason": loop.stop_reason or "steps",
                                "train_seconds": round(secs, 1),
                                "train_images_per_s": round(loop.s["step"] * targs.batch_size / secs, 1)},
            checkpoint=loop.path)
    return ema.requires_grad_(False), sched


# ----------------------------------------------------------------------------- evaluation: the study
def generate(name, fn, labels, args, run, seed, eps_model):
    """Sample len(labels) images in batches with fn(y, gen, on_step) -> x_0; returns (images on the CPU, seconds per
    batch, model calls per sample: forward passes of eps_model on a batch, each a conditional and unconditional pair).
    A generator per call seeded with `seed`, and every sampler draws x_T first: the first batch starts from the same
    x_T (and labels) in every sampler, so grids compare image by image."""
    gen, out, secs, calls = torch.Generator().manual_seed(seed), [], [], []
    batches = labels.split(args.sample_batch)
    hook = eps_model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    for b, yb in enumerate(common.progress_bar(batches, desc=name, leave=False)):
        t0 = time.perf_counter()
        on_step = lambda k, S, b=b: run.progress(name, b * S + k, len(batches) * S)  # noqa: E731
        out.append(fn(yb.to(args.device), gen, on_step).clamp(-1, 1).cpu())  # .cpu() waits for the device
        secs.append(time.perf_counter() - t0)
    hook.remove()
    return torch.cat(out), secs, sum(calls) / (2 * len(labels))


def samplers(eps_model, sched, args):
    """{name: (sampler, eta, steps, fn(y, gen, on_step))}: DDIM at every (eta, S) and the T-step DDPM sampler."""
    T = sched.T
    out = {f"ddpm_T{T}": ("DDPM", 1.0, T, lambda y, g, cb=None: ddpm_mnist_cfg.sample(
        eps_model, sched, y, args.w, gen=g, on_step=cb and (lambda k: cb(k, T)))[0])}
    for eta in args.etas:
        for S in args.steps:
            tau = timesteps(T, S, args.spacing)

            def fn(y, g, cb=None, tau=tau, eta=eta):  # x_T drawn first from g, as ddpm_mnist_cfg.sample does
                x_T = torch.randn((len(y), 1, 28, 28), generator=g).to(y.device)
                return ddim_sample(eps_model, sched, tau, y, args.w, eta, x_T, g, on_step=cb)
            out[f"ddim_eta{eta:g}_S{S}"] = ("DDIM", eta, S, fn)
    return out


def study(eps_model, sched, dataset, args, run):
    """Grids, model calls, timing and scores for every sampler; returns the table rows."""
    runs = samplers(eps_model, sched, args)
    zeros = torch.zeros(args.sample_batch, dtype=torch.long, device=args.device)
    ddpm_mnist_cfg.guided_eps(eps_model, zeros.float().view(-1, 1, 1, 1).expand(-1, 1, 28, 28), zeros, zeros, args.w)
    for _, _, _, fn in runs.values():  # warm-up: first calls are slow on any device, and DDPM would go first
        fn(zeros[:2], torch.Generator().manual_seed(0))
    labels, rows, firsts = torch.arange(args.n_samples) % 10, [], []
    for name, (kind, eta, S, fn) in runs.items():
        xs, secs, calls = generate(name, fn, labels, args, run, args.seed, eps_model)
        # labels run 0..9 over and over, so the first 100 samples make the grid: one digit per column
        common.image_grid(run.path(f"grid_{name}.png"), xs[:100], nrow=10, title=f"{kind}, eta = {eta:g}, {S} steps")
        firsts.append(xs[:10])  # digits 0..9 from the same ten x_T in every sampler
        row = {"name": name, "sampler": kind, "eta": eta, "steps": S, "n": len(xs), "model_calls": calls,
               "s_per_batch": float(np.mean(secs)), "s_per_sample": sum(secs) / len(xs)}
        if not args.no_eval:
            run.progress(f"score {name}", 0, 1, force=True)
            row.update(evaluate.score(xs, labels, dataset, args.data_root, args.out, args.device, args.judge_epochs))
        rows.append(row)
        run.log(study=rows)
    for r in rows:
        r["speedup"] = rows[0]["s_per_sample"] / r["s_per_sample"]
    common.image_grid(run.path("study_grid.png"), torch.cat(firsts), nrow=10, title="same x_T and labels per column",
                      row_labels=[f"{r['sampler']} eta={r['eta']:g} S={r['steps']}" for r in rows])
    return rows


def figure_quality(path, rows, no_eval):
    """Seconds per sample against steps, and (when scored) FID against steps and against seconds per sample."""
    pairs = [("steps", "s_per_sample")] + ([] if no_eval else [("steps", "fid"), ("s_per_sample", "fid")])
    names = {"steps": "steps (model calls)", "s_per_sample": "seconds per sample", "fid": f"FID (N = {rows[0]['n']})"}
    ddim, ddpm = {}, rows[0]  # eta -> its rows in step order; rows[0] is the DDPM
    for r in rows[1:]:
        ddim.setdefault(r["eta"], []).append(r)
    panels = []
    for x, y in pairs:
        curves = {f"DDIM eta={e:g}": ([r[x] for r in rs], [r[y] for r in rs], "o-") for e, rs in sorted(ddim.items())}
        curves[f"DDPM, T={ddpm['steps']}"] = ([ddpm[x]], [ddpm[y]], "k*", {"ms": 12})
        panels.append(dict(curves=curves, xlabel=names[x], ylabel=names[y], logx=True, logy=True,
                           floor=ddpm.get("fid_floor") if y == "fid" else None))
    common.plot_panels(path, panels, size=(4.5, 3.8))


@torch.no_grad()
def interpolation(eps_model, sched, args, run, n_frames=10):
    """interp_ddim.png and interp_ddpm.png: slerp between two x_T per row, decoded by DDIM (eta = 0, min(50, T)
    steps) and by DDPM (ddim_sample with every step and eta = 1, the same update as ddpm_mnist_cfg.sample, which
    cannot take a given x_T; fresh noise per frame, as a user gets it)."""
    gen, T = torch.Generator().manual_seed(args.seed + 2), sched.T
    lam = torch.linspace(0, 1, n_frames)
    x_T = torch.cat([torch.stack([slerp(a, b, v) for v in lam]) for a, b in
                     (torch.randn((2, 1, 28, 28), generator=gen) for _ in INTERP_DIGITS)]).to(args.device)
    y = torch.tensor(INTERP_DIGITS).repeat_interleave(n_frames).to(args.device)
    for name, tau, eta in (("ddim", timesteps(T, min(50, T), args.spacing), 0.0), ("ddpm", timesteps(T, T), 1.0)):
        run.progress(f"interpolation {name}", 0, 1, force=True)
        x = ddim_sample(eps_model, sched, tau, y, args.w, eta, x_T, gen)
        common.image_grid(run.path(f"interp_{name}.png"), x, nrow=n_frames,
                          title=f"slerp of x_T, {name.upper()} ({len(tau) - 1} steps, eta = {eta:g})",
                          row_labels=[str(d) for d in INTERP_DIGITS])


@torch.no_grad()
def mse_vs_t(eps_model, sched, x0, y, args, run, n_points=50):
    """E||eps_theta(x_t, t, .) - eps||^2 per element on held-out digits, conditional and unconditional, at up to
    n_points steps; the x0 error follows exactly: x0_hat - x_0 = -sqrt((1 - alpha_bar_t) / alpha_bar_t)
    (eps_hat - eps)."""
    gen, T = torch.Generator().manual_seed(args.seed + 3), sched.T
    x0, y = x0.to(args.device), y.to(args.device)
    ts = sorted(set(np.linspace(1, T, min(T, n_points)).round().astype(int).tolist()))
    res = {"t": ts, "eps_cond": [], "eps_uncond": [], "x0_cond": []}
    for k, t in enumerate(common.progress_bar(ts, desc="mse vs t", leave=False)):
        eps = torch.randn(x0.shape, generator=gen).to(args.device)
        i = torch.full_like(y, t - 1)
        x_t = ddpm_mnist_cfg.q_sample(x0, i, eps, sched)
        null = torch.full_like(y, eps_model.null_class)
        pred_c, pred_u = eps_model(torch.cat([x_t, x_t]), torch.cat([i, i]), torch.cat([y, null])).float().chunk(2)
        ab = alpha_bar_at(sched, t)
        res["eps_cond"].append((pred_c - eps).square().mean().item())
        res["eps_uncond"].append((pred_u - eps).square().mean().item())
        res["x0_cond"].append((1 - ab) / ab * res["eps_cond"][-1])
        run.progress("mse vs t", k + 1, len(ts))
    res["hardest_t_eps"] = ts[int(np.argmax(res["eps_cond"]))]
    res["hardest_t_x0"] = ts[int(np.argmax(res["x0_cond"]))]
    common.plot_curves(run.path("mse_vs_t.png"), {"eps, conditional (y)": (ts, res["eps_cond"]),
                       "eps, unconditional (null)": (ts, res["eps_uncond"]), "the same error in x0_hat (conditional)":
                       (ts, res["x0_cond"])}, "t", "MSE per pixel", f"prediction error on {len(x0)} test digits")
    return res


@torch.no_grad()
def inversion(eps_model, sched, x0, y, args, run):
    """Encode test digits with ddim_invert and decode them with ddim_sample (eta = 0) at every step count."""
    x0, y = x0.to(args.device), y.to(args.device)
    rows, recs = [], [x0[:10].cpu()]
    for k, S in enumerate(args.steps):
        tau = timesteps(sched.T, S, args.spacing)
        x_T = ddim_invert(eps_model, sched, tau, x0, y, args.inversion_w)
        rec = ddim_sample(eps_model, sched, tau, y, args.inversion_w, 0.0, x_T)
        mse = (rec - x0).square().flatten(1).mean(1)
        rows.append({"steps": S, "psnr_db": (10 * torch.log10(4 / mse.clamp(min=1e-12))).mean().item(),
                     "mse": mse.mean().item(), "latent_std": x_T.std().item()})
        recs.append(rec[:10].clamp(-1, 1).cpu())
        run.progress("inversion", k + 1, len(args.steps))
    common.image_grid(run.path("inversion.png"), torch.cat(recs), nrow=min(10, len(x0)),
                      title="test digits, then DDIM(eta=0) decode of their DDIM inversion",
                      row_labels=["input"] + [f"S={S}" for S in args.steps])
    common.plot_curves(run.path("inversion_psnr.png"), {"reconstruction": (args.steps, [r["psnr_db"] for r in rows])},
                       xlabel="steps (each way)", ylabel="PSNR (dB)", title="inversion then decoding", logy=False)
    return rows


def write_report(path, rows, mse, inv, n_inv, cfg, args):
    """analysis_report.md: the table and sentences built from the measured numbers; returns the headline numbers."""
    T, ddpm = cfg["T"], rows[0]
    fmt = lambda r, k, f: format(r[k], f) if r.get(k) is not None else "-"  # noqa: E731
    lines = [f"# DDIM study: {cfg['dataset']}, T = {T} ({cfg['schedule']}), w = {args.w:g}, {args.spacing} spacing, "
             f"N = {ddpm['n']}", "",
             "| sampler | eta | steps | model calls | ms / sample | speed-up vs DDPM | FID | class accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['eta']:g} | {r['steps']} | {r['model_calls']:g} | {1000 * r['s_per_sample']:.2f} "
              f"| {r['speedup']:.1f}x | {fmt(r, 'fid', '.2f')} | {fmt(r, 'class_accuracy', '.3f')} |" for r in rows]
    lines += ["", "## What it shows", ""]
    d50 = next((r for r in rows if r["sampler"] == "DDIM" and r["eta"] == 0 and r["steps"] == 50), None)
    at100 = next((r for r in inv if r["steps"] == 100), None)
    headline = {"speedup_50": d50["speedup"] if d50 else None, "psnr_100": at100["psnr_db"] if at100 else None,
                "fid_ratio_50": d50["fid"] / ddpm["fid"] if d50 and "fid" in d50 else None}
    if d50 is not None:
        lines.append(f"- DDIM (eta = 0) in 50 steps ({T / 50:g}x fewer model calls than the {T}-step DDPM sampler) is "
                     f"{d50['speedup']:.1f}x faster per sample" + (f"; FID {d50['fid']:.2f} against DDPM's "
                     f"{ddpm['fid']:.2f} (ratio {headline['fid_ratio_50']:.3f})." if "fid" in d50 else "."))
    if "fid" in ddpm:
        for eta in args.etas:
            rs = [r for r in rows if r["sampler"] == "DDIM" and r["eta"] == eta]
            near = [r["steps"] for r in rs if r["fid"] <= 1.1 * ddpm["fid"]]
            lines.append(f"- eta = {eta:g}: FID {rs[0]['fid']:.2f} at {rs[0]['steps']} steps, {rs[-1]['fid']:.2f} at "
                         f"{rs[-1]['steps']}; " + (f"the fewest steps within 10% of DDPM's FID: {near[0]}."
                                                   if near else "no step count within 10% of DDPM's FID."))
        if len(args.etas) > 1:
            few = [r for r in rows if r["sampler"] == "DDIM" and r["steps"] == args.steps[0]]
            best = min(few, key=lambda r: r["fid"])
            lines.append(f"- At {args.steps[0]} steps eta = {best['eta']:g} scores best (FID "
                         + ", ".join(f"{r['fid']:.2f} at eta = {r['eta']:g}" for r in few) + ").")
        if ddpm.get("fid_floor") is not None:
            lines.append(f"- Real training images score FID {ddpm['fid_floor']:.2f} at this N (the floor).")
    lines.append(f"- Noise prediction is hardest at t = {mse['hardest_t_eps']} (MSE {max(mse['eps_cond']):.4f}, "
                 f"conditional; smallest {min(mse['eps_cond']):.4f} at t = {mse['t'][int(np.argmin(mse['eps_cond']))]})"
                 f". The same error in x0 is largest at t = {mse['hardest_t_x0']}.")
    lines.append(f"- Inversion (encode with DDIM eta = 0 run backwards, decode, w = {args.inversion_w:g}, {n_inv} test "
                 f"digits): " + ", ".join(f"{r['psnr_db']:.1f} dB at {r['steps']}" for r in inv) + " steps.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return headline


# ----------------------------------------------------------------------------- main
def steps_text(s):
    if not all(v.strip() == "T" or v.strip().isdigit() and 0 < int(v) <= 10**5 for v in s.split(",")):
        raise argparse.ArgumentTypeError(f"expected integers in [1, 100000] or T, like 10,50,T; got {s!r}")
    return s


def parse_args(argv=None):
    p = common.make_parser(__doc__, PRESETS)
    p.add_argument("--checkpoint", default=None, help="ddpm_mnist_cfg.py checkpoint.pt (--quick without: a tiny one)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoint")
    p.add_argument("--data-root", default="./data", help="data root (test digits, the judge, --quick training)")
    p.add_argument("--w", type=common.num(float, 0), default=2.0, help="guidance weight (0 uncond, 1 cond, >1 guided)")
    p.add_argument("--sample-steps", "--steps-list", type=steps_text, default=None, help="comma-separated DDIM step "
                   f"counts, T = all (default {DEFAULT_STEPS}, those above T left out)")
    p.add_argument("--etas", type=common.num_list(float, 0, 1), default=(0.0, 1.0), help="comma-separated, in [0, 1]")
    p.add_argument("--spacing", choices=["uniform", "quadratic"], default="uniform", help="step subsequence tau")
    p.add_argument("--n-samples", "--n-eval", type=common.num(int, 2, 10**6), help="samples per sampler, scored")
    p.add_argument("--sample-batch", type=common.num(int, 1, 10**4), help="images per sampling batch (the timed unit)")
    p.add_argument("--n-mse", type=common.num(int, 1, 10**5), help="held-out test digits for the MSE against t")
    p.add_argument("--n-inv", type=common.num(int, 1, 10**5), help="test digits to invert and decode")
    p.add_argument("--inversion-w", type=common.num(float, 0), default=1.0, help="guidance weight for inversion")
    p.add_argument("--no-eval", action="store_true", help="skip FID and class accuracy (timing and figures only)")
    p.add_argument("--judge-epochs", type=common.num(float, 0, 1000, open_lo=True), help="judge budget if not cached")
    args = common.parse(p, argv)
    args.etas = sorted(set(args.etas))
    if not args.etas:
        p.error("--etas: give at least one eta")
    if not args.quick and not args.checkpoint:
        p.error("--checkpoint is required (or use --quick to train a tiny model first)")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.device = common.get_device(args.device)
    targs = data = None  # everything that can fail on bad input happens before the run folder exists
    if args.checkpoint:
        eps_model, sched, cfg = ddpm_mnist_cfg.load_eps_model(args.checkpoint, args.device, args.weights)
    else:
        targs = ddpm_mnist_cfg.parse_args(QUICK_TRAIN + ["--data-root", args.data_root, "--seed", str(args.seed),
                                                         "--out", args.out])  # its own parser: its quick preset
        data = common.load_image_dataset(targs.dataset, targs.data_root, train=True, val_size=targs.val_size)
        cfg = vars(targs)
    T = cfg["T"]
    steps = sorted({T if s.strip() == "T" else int(s) for s in (args.sample_steps or DEFAULT_STEPS).split(",")})
    if args.sample_steps and steps[-1] > T:
        raise common.UsageError(f"--sample-steps: {steps[-1]} steps is more than this checkpoint's T = {T}")
    args.steps = [s for s in steps if s <= T]
    x_test, y_test = common.load_image_dataset(cfg["dataset"], args.data_root, train=False)
    idx = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(args.seed))  # held-out digits, shuffled
    run = harness.Run(SCRIPT, args)
    if targs is not None:  # --quick without a checkpoint: ddpm_mnist_cfg's training, checkpoint.pt in this run
        eps_model, sched = train_tiny(targs, data, run, args.device)
    run.log(T=T, schedule=cfg["schedule"], w=args.w, spacing=args.spacing, steps=args.steps, etas=args.etas,
            tau={S: timesteps(T, S, args.spacing) for S in args.steps if S <= 20})
    rows = study(eps_model, sched, cfg["dataset"], args, run)
    figure_quality(run.path("quality.png"), rows, args.no_eval)
    interpolation(eps_model, sched, args, run)
    mse = mse_vs_t(eps_model, sched, x_test[idx[:args.n_mse]], y_test[idx[:args.n_mse]], args, run)
    inv = inversion(eps_model, sched, x_test[idx[:args.n_inv]], y_test[idx[:args.n_inv]], args, run)
    headline = write_report(run.path("analysis_report.md"), rows, mse, inv, len(idx[:args.n_inv]), cfg, args)
    run.log(study=rows, mse_vs_t=mse, inversion=inv, headline=headline)
    run.finish()
    print(f"wrote {run.dir}")


if __name__ == "__main__":
    harness.main(main)

"""harness.py: the run around a method: `Run` (the run folder: config, metrics, status, a model card), `main` (how a
run ends: completed, interrupted or failed, with one line saying why), checkpoints, `TrainLoop` (what surrounds a
training loop: resume, NaN checks, time budget, early stopping, Ctrl-C; `window_rows`, its windows' loss statistics),
`memory_mb` and `Processes` (several processes under torchrun)."""
import contextlib
import datetime as dt
import json
import math
import os
import signal
import sys
import time
import traceback
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist

from common import UsageError, progress_bar, rank_tag


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path, script, kind=None):
    """torch.load a checkpoint written by `script` (of `kind`), or a one-line UsageError naming the file."""
    if not path or not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"cannot read {path}: truncated or not a torch file ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script or (kind and ckpt.get("kind") != kind):
        found = ckpt.get("script") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"{path} is not a {script} {kind or ''} checkpoint (it was written by {found})")
    return ckpt


def save_atomic(obj, path):
    """torch.save to a temp file (its folder made if need be), then rename: a crash mid-write never leaves half a
    file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, f"{path}.tmp{os.getpid()}")
    os.replace(f"{path}.tmp{os.getpid()}", path)


def write_atomic(path, obj):
    """A text, or an object as JSON (tensors as lists), to a temp file, then rename: a reader (the dashboard) never
    sees half a file."""
    with open(f"{path}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=lambda o: getattr(
            o, "tolist", o.__str__)()))
    os.replace(f"{path}.tmp{os.getpid()}", path)


def resumed(args, ckpt, may_change=()):
    """The settings of a resumed run: the checkpoint's, except the run's place (--out, --run-id, --device) and, when
    given, --data-root and the flags in `may_change`. Another flag given with a different value is an error: a
    resumed run continues the run it resumes."""
    if "loop" not in ckpt:
        raise UsageError("this checkpoint holds no training state (an older format); it can be sampled only")
    for k, v in ckpt["config"].items():
        changeable = k in (*may_change, "data_root") and k in args.explicit
        if k in ("out", "run_id", "device", "resume", "explicit") or changeable:
            continue
        if k in args.explicit and getattr(args, k) != v:
            can = f" (only {', '.join(may_change)} may change)" if may_change else ""
            raise UsageError(f"--{k.replace('_', '-')} {getattr(args, k)}: the run being resumed has {v}, and a "
                             f"resumed run keeps its settings{can}")
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- the run harness
class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM; the argument is the signal's name."""


class RunError(RuntimeError):
    """The run cannot go on (a NaN loss, non-finite samples): it fails with this one-line reason, exit code 1."""


def _on_signal(signum, frame):
    """Inside a TrainLoop a signal waits for the end of the step, so that the checkpoint is a whole step's state; a
    second signal more than a second later (not the copy torchrun forwards) stops at once."""
    loop = TrainLoop.active
    if loop and not loop.signal:
        loop.signal, loop.signal_time = signal.Signals(signum).name, time.time()
    elif not loop or time.time() - loop.signal_time > 1.0:
        raise Interrupted(signal.Signals(signum).name)


class Run:
    """outputs/<script>/<run-id>/ with config.json (every flag), metrics.json (merged by `log`) and status.json:
    state (running, completed, failed, interrupted), phase, progress, seconds, figures, and why it did not complete.
    outputs/LATEST_RUN.txt and the link outputs/current name the newest run (the dashboard follows it)."""
    active = None  # this process's run, whose end `main` records

    def __init__(self, script, args):
        self.script, self.t0, self._last, self.metrics, self.hint = script, time.time(), 0.0, {}, ""
        self.run_id = args.run_id or datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
        self.dir = os.path.join(args.out, script, self.run_id)
        os.makedirs(self.dir, exist_ok=True)
        self.status, Run.active = {"script": script, "run_id": self.run_id, "state": "running", "message": None}, self
        write_atomic(self.path("config.json"), {"script": script, **vars(args)})
        self.progress("start", 0, 1, force=True)
        write_atomic(os.path.join(args.out, "LATEST_RUN.txt"), os.path.join(script, self.run_id) + "\n")
        os.symlink(os.path.join(script, self.run_id), f"{args.out}/current.tmp{os.getpid()}")  # outputs/current
        os.replace(f"{args.out}/current.tmp{os.getpid()}", f"{args.out}/current")

    def path(self, name):
        return os.path.join(self.dir, name)

    def progress(self, phase, step, total, force=False):
        """Where the run is; status.json is rewritten at most every 2 s unless forced."""
        self.status.update(phase=phase, step=int(step), total=int(total), progress=round(step / max(total, 1), 4))
        if force or time.time() - self._last >= 2.0:
            self._last = time.time()
            self.status.update(elapsed_s=round(self._last - self.t0, 1),
                               updated=datetime.now().isoformat("T", "seconds"),
                               figures=sorted(f for f in os.listdir(self.dir) if f.endswith(".png")))
            write_atomic(self.path("status.json"), self.status)

    def log(self, **metrics):
        self.metrics.update(metrics)
        write_atomic(self.path("metrics.json"), self.metrics)

    def report(self, title, about, config, figures):
        """report.md, a model card: the paragraphs `about`, the configuration, the final figures, links to the plots."""
        def table(d, what):
            return [f"| {what} | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" if isinstance(v, float) else
                                                          f"| {k} | {v} |" for k, v in d.items()]
        plots = [f"- [{f}]({f})" for f in sorted(os.listdir(self.dir)) if f.endswith((".png", ".gif"))]
        lines = [f"# {title} (run {self.run_id})", ""] + [line for p in about for line in (p, "")]
        lines += ["## Configuration", "", *table(config, "setting"), "", "## Final figures", "",
                  *table(figures, "metric"), ""]
        write_atomic(self.path("report.md"), "\n".join(lines + ["## Plots", "", *plots]) + "\n")

    def finish(self, state="completed", message=None):
        self.status.update(state=state, message=message)
        self.log(wall_time_s=round(time.time() - self.t0, 2), peak_rss_mb=memory_mb(torch.device("cpu"))["rss_mb"])
        self.progress(self.status["phase"], *((1, 1) if state == "completed" else (self.status["step"],
                                                                                  self.status["total"])), force=True)
        Run.active = None


def memory_mb(device):
    """This process's memory: CUDA allocated, reserved and peak (then reset: a peak per call), or the peak resident set
    so far (None where the OS does not say: Windows)."""
    if device.type == "cuda":
        out = {f"cuda_{k}_mb": f(device) / 2**20 for k, f in (("allocated", torch.cuda.memory_allocated),
               ("reserved", torch.cuda.memory_reserved), ("peak", torch.cuda.max_memory_allocated))}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    try:
        import resource
    except ImportError:
        return {"rss_mb": None}
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**(20 if sys.platform == "darwin" else 10)}


def main(fn):
    """Run a script's main() and record how it ended, with the reason as the last line on stderr. Bad input: exit 2.
    Ctrl-C or SIGTERM: 'interrupted', exit 130 or 143. A NaN loss or any other error: 'failed', exit 1."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        return fn()
    except UsageError as e:  # under torchrun every rank checks the input alike: the line says which rank failed first
        code, state, msg = 2, "failed", rank_tag() + str(e)
    except RunError as e:
        code, state, msg = 1, "failed", str(e)
    except KeyboardInterrupt as e:
        name = str(e) if isinstance(e, Interrupted) else "SIGINT"
        code, state, msg = 128 + signal.Signals[name], "interrupted", f"interrupted by {name}"
    except Exception as e:
        traceback.print_exc()
        code, state, msg = 1, "failed", f"{type(e).__name__}: {e}".splitlines()[0]
    if Run.active is not None:
        msg += Run.active.hint
        Run.active.finish(state, msg)
    print(f"{os.path.basename(sys.argv[0])}: {'error: ' if code < 128 else ''}{msg}", file=sys.stderr)
    sys.exit(code)


class TrainLoop:
    """What surrounds a training loop, so that the loop itself shows the method:

        loop = harness.TrainLoop(run, args.train_steps, args.eval_every, {"model": model, "optimizer": opt}, args.seed)
        for step in loop:               # resumes, shows progress, stops on the time budget or at Ctrl-C / SIGTERM
            ...                         # every random number from loop.gen, so a resumed run continues the stream
            if loop.record(loss):       # every `every` steps, once the window's losses are checked for NaN
                loop.evaluate(val_loss=...)  # a history row, metrics.json, the checkpoint, early stopping on val_loss

    The checkpoint holds `config`, every state_dict in `state`, each step's loss, the history and loop.gen: `resume=`
    continues exactly where a run stopped. `reduce` (a mean over the processes of a distributed run) makes them agree
    on losses and on when to stop; only the process with a `run` writes."""
    active = None

    def __init__(self, run, total, every, state, seed, config=None, path=None, kind="model", resume=None,
                 max_minutes=0.0, patience=0, reduce=None, script=None):
        self.run, self.total, self.every, self.state, self.config, self.kind = run, total, every, state, config, kind
        self.script = script or run and run.script  # whose checkpoint format this is
        self.path, self.max_s = path or run and run.path("checkpoint.pt"), 60 * max_minutes
        self.patience, self.reduce, self.gen = patience, reduce or (lambda x: x), torch.Generator().manual_seed(seed)
        self.s = {"step": 0, "losses": [], "history": {}, "best": math.inf, "bad": 0, "open": []}  # what resumes
        if resume is not None:  # a checkpoint that `resumed` accepted
            for k, obj in state.items():
                obj.load_state_dict(resume[k])
            self.s = {k: v for k, v in resume["loop"].items() if k != "gen"}
            self.gen.set_state(resume["loop"]["gen"])
        self.window = [torch.tensor(v) for v in self.s["open"]]  # the losses of a window the checkpoint cut
        self.history, self.start = self.s["history"], self.s["step"]
        self.late, self.signal, self.stop_reason = False, None, None

    def __iter__(self):
        t0, outer, TrainLoop.active = time.time(), TrainLoop.active, self
        bar = progress_bar(total=self.total, initial=self.start, desc="train", disable=not self.run)
        try:
            while self.s["step"] < self.total and not self.stop_reason:
                flags = torch.tensor([self.signal is not None, 0 < self.max_s < time.time() - t0], dtype=torch.float)
                stop, self.late = self.reduce(flags).gt(0).tolist()
                if stop:  # Ctrl-C or SIGTERM (in any process): a checkpoint of the state after the last whole step
                    self.window = list(self._checked(self.s["step"]))  # over processes: what a resumed run records
                    self.save(self.s["step"])
                    if self.run:
                        self.run.hint = f" at step {self.s['step']}; --resume {self.path} continues it"
                    raise Interrupted(self.signal or "SIGTERM")
                yield self.s["step"]
                self.s["step"] += 1
                bar.update(1)
                self.run and self.run.progress("train", self.s["step"], self.total)
        finally:
            TrainLoop.active = outer
            bar.close()
        self.seconds = time.time() - t0
        self.run and self.run.log(train_steps=self.s["step"], stop_reason=self.stop_reason or "steps")

    def _checked(self, last):
        """The window's losses on the host, in one copy: RunError names the first bad one's step (the window
        ends at step `last`, counted from 1), or the step after which a weight is not finite."""
        w = self.reduce(torch.stack([v.to(self.window[-1].device) for v in self.window]).cpu()) if self.window \
            else torch.zeros(0)
        bad = (~w.isfinite()).nonzero().flatten().tolist()
        if bad or not all(p.isfinite().all() for m in self.state.values() if isinstance(m, torch.nn.Module)
                          for p in m.parameters()):
            kept = f"the last good checkpoint is kept at {self.path}" if os.path.isfile(self.path or "") else \
                "no checkpoint was written yet"
            raise RunError((f"loss is {w[bad[0]]:g} at step {last - len(w) + 1 + bad[0]}" if bad else
                                 f"a weight is not finite after step {last}") + f"; {kept}")
        return w

    def record(self, loss, close=False):
        """Keep this step's loss on the device (no sync); at the end of a window (every `every` steps, or now with
        close=True, say at the end of an epoch) check them all and return True."""
        self.window.append(loss.detach().float())
        done = self.s["step"] + 1
        if done % self.every and done < self.total and not self.late and not close:
            return False
        self._w = self._checked(done)
        return True

    def evaluate(self, **metrics):
        """Close the window: a history row (step, mean training loss, `metrics`), the checkpoint, early stopping
        after `patience` evaluations without a new best metrics["val_loss"], or the end of the time budget."""
        self.s["losses"], self.window = self.s["losses"] + self._w.tolist(), []
        for k, v in {"step": self.s["step"] + 1, "train": float(self._w.mean()), **metrics}.items():
            self.history.setdefault(k, []).append(v)
        if "val_loss" in metrics and (self.s["step"] + 1) % self.every == 0:  # a stop off the grid does not count
            better = metrics["val_loss"] < self.s["best"]
            self.s["bad"], self.s["best"] = (0, metrics["val_loss"]) if better else (self.s["bad"] + 1, self.s["best"])
        self.stop_reason = ("early stopping" if self.patience and self.s["bad"] >= self.patience else
                            "time budget" if self.late else None)
        self.save(self.s["step"] + 1)
        self.run and self.run.log(step=self.s["step"] + 1, train_loss=self.history["train"][-1], **metrics)

    def save(self, done):
        """The checkpoint after `done` steps; the losses of an unfinished window travel with it."""
        if self.run:
            loop = {**self.s, "step": done, "open": [float(v) for v in self.window], "gen": self.gen.get_state()}
            save_atomic({"script": self.script, "kind": self.kind, "config": self.config, "loop": loop,
                         **{k: obj.state_dict() for k, obj in self.state.items()}}, self.path)


def window_rows(loop):
    """A row per window of a TrainLoop's history (`loop.s`, or a checkpoint's "loop"): its step, the statistics of the
    window's step losses (which the checkpoint keeps) in place of their mean "train", and the window's metrics."""
    rows, first, history = [], 0, loop["history"]
    for r in [dict(zip(history, v)) for v in zip(*history.values())]:
        step = r.pop("step")
        losses = np.array(loop["losses"][first:step])
        del r["train"]  # the window's mean: loss_mean below
        rows.append({"step": step, "loss_mean": float(losses.mean()), "loss_std": float(losses.std()),
                     "loss_min": float(losses.min()), "loss_max": float(losses.max()),
                     "loss_median": float(np.median(losses)), **r})
        first = step
    return rows


# ----------------------------------------------------------------------------- several processes (torchrun)
class Processes:
    """This process's place in a torchrun launch (one machine or several, under Slurm or not), from the environment
    torchrun sets (rank 0 of 1 without it), and how training with several processes ends (`watch`)."""

    def __init__(self, env=os.environ):
        self.rank, self.local_rank = int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
        self.world, self.restarts = int(env.get("WORLD_SIZE", 1)), int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.max_restarts, self.device, self.stepping = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)), None, False

    def resume_from(self, args, script, latest="checkpoints/latest.pt"):
        """What a training run continues: --resume PATH; with --resume auto, or in a worker group that torchrun
        restarted (--max-restarts; a --resume PATH is then ignored), the --run-id run's `latest` if there is one (else
        None: a fresh start). Both, and --max-restarts, need --run-id (a UsageError)."""
        if not args.checkpoint and (args.resume == "auto" or self.max_restarts) and not args.run_id:
            raise UsageError("--resume auto and torchrun --max-restarts need --run-id: the run folder to continue")
        if (args.resume == "auto" or self.restarts) and not args.checkpoint:
            path = os.path.join(args.out, script, args.run_id, latest)
            return path if os.path.isfile(path) else None
        return args.resume

    def place(self, device):
        """This process's device: on CUDA the local rank's GPU, else `device` itself. Nothing is touched yet: a rank
        that only checks its input and leaves never opens a GPU (`use` makes it the current device)."""
        self.device = torch.device("cuda", self.local_rank) if device.type == "cuda" else device
        return self.device

    def use(self):
        """The device `place` chose, made the current CUDA device on a GPU."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return self.device

    def start(self, backend="auto"):
        """The process group, after `place` (backend auto: nccl on CUDA, gloo otherwise), on torchrun's key-value store
        (the agent's, or rank 0's under TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), kept here for the roll-call: destroying
        the group does not close it; and a gloo group on the CPU for the TrainLoop's reduce."""
        timeout, backend = dt.timedelta(minutes=30), backend if backend != "auto" else \
            "nccl" if self.device.type == "cuda" else "gloo"
        self.store = next(dist.rendezvous("env://", self.rank, self.world, timeout=timeout))[0]
        dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.world, timeout=timeout)
        self.group = dist.new_group(backend="gloo")
        if self.rank == 0 and self.max_restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            print(f"{os.path.basename(sys.argv[0])}: warning: torchrun --max-restarts with its store shared: a "
                  "restarted group can read the last one's addresses (torch issue 135712); set "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr)

    def reduce(self, v):
        """The mean over the processes of a CPU tensor (TrainLoop's `reduce`, from the first step on), through the gloo
        group: with nccl, the stop flags of every step would wait for the GPU."""
        self.stepping, v = True, v.clone()
        dist.all_reduce(v, group=self.group)
        return v / self.world

    def on_signal(self, signum, frame):
        """SIGINT or SIGTERM in training: in the loop it asks for a stop after the step, which the loop's reduce makes
        every rank agree on; after the first step, outside the loop (an error unwinding, the roll-call), it is ignored:
        torchrun SIGTERMs every worker when one dies, and that is no interruption."""
        if TrainLoop.active:
            TrainLoop.active.signal = TrainLoop.active.signal or signal.Signals(signum).name
        elif not self.stepping:
            raise Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def watch(self, checkpoint=None):
        """How training with several ranks ends (docs/emnist_ddp.md, "When a worker dies"): normally at a barrier; at a
        stop the ranks agreed on, rank 0 records it while the others wait until it has left (else torchrun would stop
        it first); after any other error, a roll-call: a rank that does not answer has left, and the run failed.
        With one process there is nothing to coordinate."""
        if self.world == 1:
            yield
            return
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
            dist.barrier()
            dist.destroy_process_group()  # rank 0 samples and scores alone: no collective can time out
        except (RunError, KeyboardInterrupt) as e:  # a NaN loss, Ctrl-C, SIGTERM: rank 0 records and says why
            if self.rank:
                with contextlib.suppress(Exception):
                    dist.barrier()  # rank 0 never joins: this breaks when it has left
                sys.exit(1 if isinstance(e, RunError) else 128 + signal.Signals[str(e) or "SIGINT"])
            raise
        except Exception:  # say, a collective that failed because a peer died
            with contextlib.suppress(Exception):
                dist.destroy_process_group()  # closes this rank's connections, which frees the peers waiting on it
            gone = self.roll_call()
            if gone and self.rank:
                sys.exit(1)  # rank 0 says it (and if rank 0 is gone, torchrun's summary does)
            if gone:
                kept = f"{checkpoint} continues it (torchrun --max-restarts, or --resume)" if os.path.isfile(
                    checkpoint or "") else "no checkpoint was written yet"
                step = Run.active.status["step"] + 1
                raise RunError(f"rank {', '.join(map(str, gone))} left the run at step {step} "
                               f"(no answer to a roll-call within 5 s: killed, crashed, or its node is down); {kept}") \
                    from None
            raise  # every rank answered: the error is this rank's own
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def roll_call(self, wait=5.0):
        """The ranks that do not answer within `wait` seconds: each rank that gets here says so in the store. If the
        store has gone, it was rank 0's, and rank 0 has gone with it."""
        try:
            self.store.set(f"roll-call/{self.rank}", "1")
            gone, t0 = set(range(self.world)), time.time()
            while gone and time.time() - t0 < wait:
                gone -= {r for r in gone if self.store.check([f"roll-call/{r}"])}
                time.sleep(0.1)
            return sorted(gone)
        except Exception:
            return [0]

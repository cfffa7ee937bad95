"""emnist_ddp.py: the class mapping, the schedule, the embedding and the sampler against closed forms, the EMA, the
world-size-free randomness, the core run alone; torchrun with 2 CPU processes (gloo) on tiny synthetic EMNIST: outputs
written once, 1 process == 2 processes == 2 torchrun agents ("nodes") to float rounding, exact resume across world
sizes and after SIGTERM / SIGINT; a worker killed mid-epoch: torchrun --max-restarts 1 resumes the run's last
checkpoint and ends on the unbroken run's weights, without restarts the run fails naming the rank; bad input under
torchrun gives one line per failing rank; a NaN loss stops every rank with one line naming the step; the Slurm scripts
parse and pass only flags the script accepts (tests/test_cluster.py runs them under a real Slurm)."""
import csv
import glob
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import harness
import emnist_ddp
from conftest import ROOT, core_namespace

# 564 tiny images, global batch 188: 3 steps per epoch (94 per rank with 2 processes); 16 px, channels 8,16,32
TINY = ["--quick", "--batch-size", "188", "--T", "10"]
TOL = 1e-5
MAPPING = "/work/shared/data/EMNIST/raw/emnist-balanced-mapping.txt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# emnist_ddp.py as a user runs it, with one change: SIGNAL_AT="STEP:SIGNAL[:RANK]" makes the process (of that rank) send
# itself SIGNAL inside step STEP (1-based), in the middle of the step, as a signal from outside would arrive; so the
# step it stops after is known. Only in the first attempt: a worker group that torchrun restarts runs undisturbed.
WRAPPER_SOURCE = """import os, signal, sys
sys.path.insert(0, ROOT)
import emnist_ddp, harness
at, sig, rank = (os.environ.pop("SIGNAL_AT") + ":0").split(":")[:3]
update = emnist_ddp.ema_update
def ema_update(ema, model, n, decay):
    if n == int(at) - 1 and os.environ.get("RANK", "0") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                                                                   "0") == "0":
        os.kill(os.getpid(), signal.Signals[sig])
    return update(ema, model, n, decay)
emnist_ddp.ema_update, sys.argv[0] = ema_update, "emnist_ddp.py"
harness.main(emnist_ddp.main)
"""


WRAPPER = None  # its path, set by the fixture below


@pytest.fixture(scope="module", autouse=True)
def signal_wrapper(tmp_path_factory):
    global WRAPPER
    WRAPPER = str(tmp_path_factory.mktemp("wrapper") / "emnist_ddp_signal_at.py")
    with open(WRAPPER, "w") as f:
        f.write(WRAPPER_SOURCE.replace("ROOT", repr(ROOT)))


def torchrun(*args, timeout=150, restarts=0, signal_at=None):
    """Two CPU processes on one machine; --standalone picks a free rendezvous port, so runs never collide. A group
    that torchrun may restart needs a fresh store per attempt (TORCH_DISABLE_SHARE_RDZV_TCP_STORE, docs)."""
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if restarts else ENV
    env = {**env, "SIGNAL_AT": ":".join(map(str, signal_at))} if signal_at else env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", WRAPPER if signal_at else "emnist_ddp.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_process(*args, timeout=120, signal_at=None):
    env = {**ENV, "SIGNAL_AT": ":".join(map(str, signal_at))} if signal_at else ENV
    return subprocess.run([sys.executable, WRAPPER if signal_at else "emnist_ddp.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in this process, as in the subprocesses (OMP_NUM_THREADS=1): the suite shares 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_process(monkeypatch, *args):
    """emnist_ddp.main() in this process (no interpreter or torch start-up), as `python emnist_ddp.py ARGS` runs it."""
    monkeypatch.setattr(sys, "argv", ["emnist_ddp.py", *args])
    emnist_ddp.main()


def ckpt(run_dir, epoch=None):
    name = "latest.pt" if epoch is None else f"emnist-balanced_quick_16px_c8-16-32_T10_b188_epoch00{epoch}.pt"
    return torch.load(os.path.join(run_dir, "checkpoints", name), weights_only=False)


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if "emnist_ddp.py: error:" in ln]


# ----------------------------------------------------------------------------- closed forms, pure functions
def test_class_mapping_has_47_characters_and_merges_lookalikes():
    classes = emnist_ddp.CLASSES
    assert len(classes) == 47 == len(set(classes)) == emnist_ddp.N_CLASSES
    assert classes[:10] == list("0123456789") and classes[10] == "A" and classes[36] == "a"
    if os.path.isfile(MAPPING):  # the official emnist-balanced-mapping.txt: "index ascii-code" per line
        official = [chr(int(line.split()[1])) for line in open(MAPPING) if line.strip()]
        assert official == emnist_ddp.CLASSES
    assert emnist_ddp.char_to_class("k") == classes.index("K") and emnist_ddp.char_to_class("o") == classes.index("O")
    assert emnist_ddp.char_to_class("a") == 36 and emnist_ddp.char_to_class("3") == 3
    with pytest.raises(common.UsageError):
        emnist_ddp.char_to_class("#")


def test_cosine_schedule_is_capped_and_matches_closed_form():
    T, s = 600, 0.008
    sch = emnist_ddp.Schedule(emnist_ddp.cosine_beta(T))
    f = lambda t: math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = np.array([f(t) / f(0) for t in range(1, T + 1)])
    assert np.allclose(sch.alpha_bar[:-1].numpy(), closed[:-1], rtol=1e-4)  # the capped last step is reflected
    assert sch.beta.max().item() == pytest.approx(0.999) and sch.T == T
    assert sch.alpha_bar_prev[0] == 1 and torch.allclose(sch.alpha_bar_prev[1:], sch.alpha_bar[:-1])
    i = 10
    assert sch.beta_tilde[i].item() == pytest.approx((1 - sch.alpha_bar[i - 1].item()) / (1 - sch.alpha_bar[i].item())
                                                     * sch.beta[i].item(), rel=1e-5)


def test_timestep_embedding_is_sin_then_cos():
    e = emnist_ddp.timestep_embedding(torch.tensor([0, 3]), 8)
    w = [10000 ** (-k / 4) for k in range(4)]
    assert torch.allclose(e[1], torch.tensor([math.sin(3 * x) for x in w] + [math.cos(3 * x) for x in w]))
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_q_sample_is_the_closed_form():
    sch = emnist_ddp.Schedule(emnist_ddp.cosine_beta(20))
    x0, eps, i = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([0, 19])
    xt = emnist_ddp.q_sample(x0, i, eps, sch)
    for b in range(2):
        ab = sch.alpha_bar[i[b]]
        assert torch.allclose(xt[b], ab.sqrt() * x0[b] + (1 - ab).sqrt() * eps[b])


def test_the_sampler_lands_on_a_point_mass_given_the_true_noise():
    """Data = one image c. The exact eps of x_t is (x_t - sqrt(alpha_bar_t) c) / sqrt(1 - alpha_bar_t), so x0_hat = c at
    every step, and the last step (alpha_bar_0 = 1, no noise) returns c exactly."""
    sch, c = emnist_ddp.Schedule(emnist_ddp.cosine_beta(30)), torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)

    class Oracle(torch.nn.Module):
        null_class, calls = 47, 0

        def forward(self, x, i, y):
            Oracle.calls += 1
            ab = sch.alpha_bar[i].view(-1, 1, 1, 1)
            return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    x, traj = emnist_ddp.sample(Oracle(), sch, torch.tensor([3, 5]), 2.0, 4, torch.Generator().manual_seed(0),
                                record_every=10)
    assert torch.allclose(x, c.expand(2, -1, -1, -1), atol=1e-5)
    assert Oracle.calls == 30 and len(traj) == 4  # one batched call per step; x_T and t = 21, 11, 1


def test_ema_update_with_warmup():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in a.parameters()]
    assert emnist_ddp.ema_update(a, b, 0, 0.999) == pytest.approx(0.1)
    for pe, p0, p in zip(a.parameters(), e0, b.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p)
    assert emnist_ddp.ema_update(a, b, 10**6, 0.999) == pytest.approx(0.999)


def test_unet_shapes_for_three_and_four_levels():
    for chans, size in (((8, 16, 32), 16), ((8, 16, 16, 16), 32)):
        m = emnist_ddp.UNet(chans)
        x = torch.randn(2, 1, size, size)
        assert m(x, torch.tensor([0, 5]), torch.tensor([3, 47])).shape == x.shape


def test_global_batch_noise_does_not_depend_on_world_size():
    args = type("A", (), dict(batch_size=6, image_size=4, T=50, p_uncond=0.5))()
    draw = lambda rank, world: emnist_ddp.global_batch_noise(torch.Generator().manual_seed(3), args,  # noqa: E731
                                                    harness.Processes({"RANK": rank, "WORLD_SIZE": world}))
    full, parts = draw(0, 1), [draw(r, 2) for r in (0, 1)]
    for k in range(3):  # rank r holds the global positions r, r + 2, ...
        assert torch.equal(full[k][0::2], parts[0][k]) and torch.equal(full[k][1::2], parts[1][k])


def test_the_core_runs_alone_trains_and_samples():
    """The span between the core markers, in a namespace holding only math, np, torch, nn and F."""
    ns = core_namespace("emnist_ddp.py")
    torch.manual_seed(0)
    sch, model, ema = ns["Schedule"](ns["cosine_beta"](8)), ns["UNet"]((4, 8)), ns["UNet"]((4, 8))
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, y = ns["resize"](torch.rand(6, 1, 28, 28) * 2 - 1, 8), torch.arange(6)
    for n in range(3):
        i, eps, drop = torch.randint(0, 8, (6,)), torch.randn(6, 1, 8, 8), torch.rand(6) < 0.5
        loss = ns["cfg_loss"](model, x0, y, i, eps, drop, sch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ns["ema_update"](ema, model, n, 0.999)
        assert math.isfinite(loss.item())
    x, _ = ns["sample"](ema, sch, torch.tensor([0, 46]), 2.0, 8, torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1


@pytest.mark.parametrize("flags, says", [
    (["--w", "nan"], "--w: must be in [0, inf]"), (["--w", "inf"], "--w"), (["--w", "-1"], "--w"),
    (["--preset", "huge"], "invalid choice: 'huge'"), (["--p-uncond", "1.5"], "--p-uncond"),
    (["--batch-size", "100000000"], "--batch-size: must be in [1, 1000000]"),
    (["--resume", "a.pt", "--checkpoint", "b.pt"], "give one")])
def test_bad_flags_exit_2_with_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        emnist_ddp.parse_args([*flags, "--out", "/tmp"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err


def test_bad_files_are_named_before_anything_is_written(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    for flag, path, says in (("--resume", tmp_path / "missing.pt", "checkpoint not found: .*missing.pt"),
                             ("--checkpoint", garbage, "cannot read .*garbage.pt"),
                             ("--data-root", tmp_path / "nowhere", "emnist-balanced not found in .*nowhere")):
        monkeypatch.setattr(sys, "argv", ["emnist_ddp.py", "--quick", flag, str(path), "--out", str(tmp_path / "out")])
        with pytest.raises(common.UsageError, match=says):
            emnist_ddp.prepare(harness.Processes({}))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "nowhere")


def test_a_checkpoint_of_the_older_format_is_sampled_but_not_resumed(tmp_path, monkeypatch):
    """The per-epoch files written before the redesign (no training-loop state) can still be sampled."""
    old = {"script": "emnist_ddp", "kind": "model", "ema": emnist_ddp.UNet((8, 16)).state_dict(), "epoch": 1,
           "history": [{"epoch": 1, "step": 3, "loss_mean": 1.0, "loss_std": 0.1, "loss_min": 0.9, "loss_max": 1.1,
                        "loss_median": 1.0, "lr": 1e-4, "grad_norm": 2.0, "samples_per_s": 9.0, "batches_per_s": 0.1,
                        "rss_mb": 800.0, "ema_divergence": 0.01, "epoch_s": 30.0, "wall_s": 30.0}],
           "config": {"dataset": "emnist-balanced", "preset": "tiny", "image_size": 8, "channels": [8, 16], "T": 4,
                      "batch_size": 188, "seed": 0, "n_per_class": 2, "grid_per_class": 1, "quick": True}}
    path, out = str(tmp_path / "old.pt"), str(tmp_path / "out")
    torch.save(old, path)
    in_process(monkeypatch, "--checkpoint", path, "--no-eval", "--n-samples", "3", "--out", out, "--run-id", "s")
    d = os.path.join(out, "emnist_ddp", "s")
    assert torch.load(os.path.join(d, "samples.pt")).shape == (3, 1, 8, 8)
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    assert os.path.isfile(os.path.join(d, "dashboard.png"))  # the curves of the run that wrote it
    monkeypatch.setattr(sys, "argv", ["emnist_ddp.py", "--resume", path, "--out", out])
    with pytest.raises(common.UsageError, match="older format"):
        emnist_ddp.prepare(harness.Processes({}))


# ----------------------------------------------------------------------------- torchrun, 2 CPU processes
@pytest.fixture(scope="module")
def runs(tiny_emnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    common_args = [*TINY, "--data-root", tiny_emnist, "--out", out]
    r = torchrun(*common_args, "--epochs", "2", "--judge-epochs", "2", "--chars", "Ak3", "--run-id", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"out": out, "args": common_args, "ddp": os.path.join(out, "emnist_ddp", "ddp"), "stdout": r.stdout,
            "data": tiny_emnist, "dir": lambda run_id: os.path.join(out, "emnist_ddp", run_id)}


def test_two_processes_finish_and_rank0_writes_everything_once(runs):
    d = runs["ddp"]
    assert runs["stdout"].count("wrote ") == 1  # only rank 0 reports
    assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == [
        f"emnist-balanced_quick_16px_c8-16-32_T10_b188_epoch00{e}.pt" for e in (1, 2)] + ["latest.pt"]
    rows = list(csv.DictReader(open(os.path.join(d, "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [3, 6]
    for k in ("loss_mean", "loss_std", "loss_min", "loss_max", "loss_median", "lr", "grad_norm", "samples_per_s",
              "batches_per_s", "rss_mb", "ema_divergence", "epoch_s", "wall_s"):
        assert math.isfinite(float(rows[-1][k])), k
    snap = json.load(open(os.path.join(d, "metrics_snapshot.json")))
    assert snap["world_size"] == 2 and snap["config"]["batch_size"] == 188 and len(snap["epochs"]) == 2
    m = json.load(open(os.path.join(d, "metrics.json")))
    assert m["n_samples"] == 47 * 2 and 0 <= m["eval"]["class_accuracy"] <= 1 and math.isfinite(m["eval"]["fid"])
    assert m["last_epoch"]["epoch"] == 2 and m["world_size"] == 2
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    x, y = torch.load(os.path.join(d, "samples.pt")), torch.load(os.path.join(d, "labels.pt"))
    assert x.shape == (94, 1, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1 and x.std(0).mean() > 0
    assert torch.equal(torch.bincount(y), torch.full((47,), 2))  # balanced over the classes
    for f in ("dashboard", "loss", "loss_log", "loss_band", "grad_norm", "ema_divergence", "memory", "throughput",
              "lr", "epoch_time", "loss_derivative", "class_grid", "chars", "progression"):
        assert os.path.getsize(os.path.join(d, f + ".png")) > 1000, f
    assert open(os.path.join(d, "progression.gif"), "rb").read(6) in (b"GIF89a", b"GIF87a")
    assert len(glob.glob(os.path.join(d, "progression", "frame_*.png"))) >= 3
    assert "dashboard.png" in open(os.path.join(d, "report.md")).read()


@pytest.fixture(scope="module")
def one(runs):
    """The 1-process run of the first epoch (no DDP), in this process; its checkpoint of epoch 1."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process(monkeypatch, *runs["args"], "--epochs", "1", "--no-sample", "--run-id", "one")
    return ckpt(runs["dir"]("one"), 1)


def test_one_process_equals_two_processes(runs, one):
    """Same seed, same global batch: 1 process (no DDP) after 3 steps == 2 processes (DDP, gloo) after 3 steps."""
    c1, c2, two_end = one, ckpt(runs["ddp"], 1), ckpt(runs["ddp"], 2)
    assert max_diff(c1["model"], c2["model"]) < TOL and max_diff(c1["ema"], c2["ema"]) < TOL
    assert max_diff(c2["model"], two_end["model"]) > 10 * TOL  # 3 Adam steps of lr 1e-4 move weights by up to 3e-4
    assert c1["loop"]["losses"] == pytest.approx(c2["loop"]["losses"], rel=1e-5)


def test_two_torchrun_agents_as_two_nodes_equal_one_process(runs, one):
    """Two torchrun agents, as on two nodes: --nnodes 2, one CPU process each, a c10d rendezvous on 127.0.0.1 (the
    agents find which of them hosts it; c10d assigns the ranks, so --node-rank is only a label). They end the epoch
    on the 1-process weights, with one run folder, one set of checkpoints and one report: rank 0's."""
    port, out = free_port(), os.path.join(runs["out"], "nodes")
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "emnist_ddp.py",
         *TINY, "--data-root", runs["data"], "--out", out, "--epochs", "1", "--no-sample", "--run-id", "nodes"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for n in (0, 1)]
    results = [a.communicate(timeout=150) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in results]
    assert sum(o.count("wrote ") for o, _ in results) == 1  # only rank 0 reports
    assert sorted(os.listdir(out)) == ["LATEST_RUN.txt", "current", "emnist_ddp"]
    assert os.listdir(os.path.join(out, "emnist_ddp")) == ["nodes"]
    d = os.path.join(out, "emnist_ddp", "nodes")
    assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == [
        "emnist-balanced_quick_16px_c8-16-32_T10_b188_epoch001.pt", "latest.pt"]
    two = ckpt(d, 1)
    assert max_diff(one["model"], two["model"]) < TOL and max_diff(one["ema"], two["ema"]) < TOL
    assert one["loop"]["losses"] == pytest.approx(two["loop"]["losses"], rel=1e-5)
    assert json.load(open(os.path.join(d, "metrics.json")))["world_size"] == 2
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"


@pytest.mark.parametrize("sig, at, code", [("SIGTERM", 4, 143), ("SIGINT", 2, 130)])
def test_a_signal_stops_after_the_step_and_resume_continues_exactly_with_another_world_size(runs, sig, at, code):
    """The signal arrives inside step `at` of a 1-process run: the step finishes, the checkpoint holds the state after
    it (for SIGTERM at step 4: mid-epoch, mid-window), the run is 'interrupted' with exit code 128 + signal. Then
    2 processes resume it and end on the weights, losses and metric rows of the unbroken 2-process run."""
    run_id = f"sig{at}"
    r = one_process(*runs["args"], "--epochs", "2", "--no-sample", "--run-id", run_id, signal_at=(at, sig))
    assert r.returncode == code, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert f"interrupted by {sig} at step {at}" in last and "--resume" in last
    d = runs["dir"](run_id)
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "interrupted"
    assert ckpt(d)["loop"]["step"] == at
    if sig != "SIGTERM":
        return  # one resume is enough
    r = torchrun("--resume", os.path.join(d, "checkpoints", "latest.pt"), "--out", runs["out"], "--run-id", "cont",
                 "--data-root", runs["data"])
    assert r.returncode == 0, r.stderr[-3000:]
    d = runs["dir"]("cont")
    res, one, two_end = ckpt(d), ckpt(runs["dir"](run_id), 1), ckpt(runs["ddp"], 2)
    assert res["loop"]["step"] == 6 and sorted(os.listdir(os.path.join(d, "checkpoints")))[0].endswith("epoch002.pt")
    assert max_diff(res["model"], two_end["model"]) < TOL and max_diff(res["ema"], two_end["ema"]) < TOL
    assert res["loop"]["losses"] == pytest.approx(two_end["loop"]["losses"], rel=1e-5)
    rows = list(csv.DictReader(open(os.path.join(d, "metrics.csv"))))
    assert [int(x["epoch"]) for x in rows] == [1, 2] and [int(x["step"]) for x in rows] == [3, 6]
    assert float(rows[0]["loss_mean"]) == pytest.approx(np.mean(one["loop"]["losses"]))  # the curve carries on
    assert float(rows[1]["loss_mean"]) == pytest.approx(np.mean(two_end["loop"]["losses"][3:]), rel=1e-5)


# A worker that dies: rank 1 SIGKILLs itself inside step 5 of 6 (mid-epoch 2). With --eval-every 2 a checkpoint is
# written after steps 2, 3 (the epoch's end), 4 and 6, so the last one before the kill is after step 4.
KILLED = ["--epochs", "2", "--no-sample", "--eval-every", "2"]


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_resumes_its_last_checkpoint(runs):
    """torchrun --max-restarts 1: it SIGTERMs rank 0, which records the run as failed, naming rank 1 (not as
    interrupted), then starts the group again. The new group finds the run's checkpoints/latest.pt itself (same
    --run-id), resumes after step 4 and ends on the weights, losses and metric rows of the unbroken 2-process run."""
    r = torchrun(*runs["args"], *KILLED, "--run-id", "restarted", restarts=1, signal_at=(5, "SIGKILL", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(error_lines(r.stderr)) == 1 and "rank 1 left the run at step" in error_lines(r.stderr)[0]
    d, two_end = runs["dir"]("restarted"), ckpt(runs["ddp"], 2)
    assert json.load(open(os.path.join(d, "config.json")))["resume"] == os.path.join(d, "checkpoints", "latest.pt")
    res = ckpt(d)
    assert res["loop"]["step"] == 6 and max_diff(res["model"], two_end["model"]) < TOL
    assert max_diff(res["ema"], two_end["ema"]) < TOL
    assert res["loop"]["losses"] == pytest.approx(two_end["loop"]["losses"], rel=1e-5)
    assert [int(x["step"]) for x in csv.DictReader(open(os.path.join(d, "metrics.csv")))] == [2, 3, 4, 6]
    assert json.load(open(os.path.join(d, "metrics.json")))["restarts"] == 1
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"


def test_without_restarts_a_killed_worker_fails_the_run_naming_it(runs):
    """Without --max-restarts torchrun SIGTERMs rank 0 and gives up. Rank 0 does not take that SIGTERM for an
    interruption: its collective failed, rank 1 does not answer the roll-call, so it records the run as failed,
    naming rank 1 and the checkpoint that continues it, and exits by itself: torchrun lists its exit code 1, not the
    SIGKILL it would send 30 s after its SIGTERM. torchrun's summary names rank 1, killed by SIGKILL."""
    r = torchrun(*runs["args"], *KILLED, "--run-id", "killed", signal_at=(5, "SIGKILL", 1))
    lines, d = error_lines(r.stderr), runs["dir"]("killed")
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert re.search(r"rank 1 left the run at step \d .*killed/checkpoints/latest\.pt continues it", lines[0])
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9 .*\(SIGKILL\)", r.stderr)
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: 1 ", r.stderr)
    status = json.load(open(os.path.join(d, "status.json")))
    assert status["state"] == "failed" and status["message"] in lines[0] and "rank 1 left" in status["message"]
    assert ckpt(d)["loop"]["step"] == 4


def test_checkpoint_is_sampled_without_training(runs, monkeypatch):
    src = os.path.join(runs["ddp"], "checkpoints", "latest.pt")
    in_process(monkeypatch, "--checkpoint", src, "--n-samples", "47", "--no-eval", "--out", runs["out"], "--run-id",
               "sampled")
    d = runs["dir"]("sampled")
    assert not os.path.exists(os.path.join(d, "checkpoints"))
    assert torch.load(os.path.join(d, "samples.pt")).shape == (47, 1, 16, 16)
    assert os.path.isfile(os.path.join(d, "class_grid.png")) and os.path.isfile(os.path.join(d, "chars.png"))
    rows = list(csv.DictReader(open(os.path.join(d, "metrics.csv"))))  # the training run's rows
    assert [int(x["epoch"]) for x in rows] == [1, 2]


def test_resume_auto_and_a_restarted_group_continue_the_run_folder(runs, monkeypatch):
    """--resume auto, and a worker group torchrun restarts (TORCHELASTIC_RESTART_COUNT > 0), continue the --run-id
    run's checkpoints/latest.pt, or start it when it has none; both need --run-id, so does --max-restarts."""
    latest = os.path.join(runs["ddp"], "checkpoints", "latest.pt")
    for env, flags, resume in (({}, ["--resume", "auto", "--run-id", "ddp"], latest),
                               ({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "1"},
                                ["--run-id", "ddp"], latest),
                               ({"TORCHELASTIC_MAX_RESTARTS": "1"}, ["--run-id", "new"], None),
                               ({}, ["--resume", "auto", "--run-id", "new"], None)):
        monkeypatch.setattr(sys, "argv", ["emnist_ddp.py", *runs["args"], *flags])
        assert emnist_ddp.prepare(harness.Processes(env))[0].resume == resume, (env, flags)
    for env, flags in (({}, ["--resume", "auto"]), ({"TORCHELASTIC_MAX_RESTARTS": "1"}, [])):
        monkeypatch.setattr(sys, "argv", ["emnist_ddp.py", *runs["args"], *flags])
        with pytest.raises(common.UsageError, match="need --run-id"):
            emnist_ddp.prepare(harness.Processes(env))


@pytest.mark.parametrize("flags, says", [
    (["--batch-size", "3"], "global --batch-size 3 is not divisible by the world size 2"),
    (["--w", "nan"], "--w: must be in [0, inf], got nan"),
    (["--data-root", "/nonexistent/data"], "emnist-balanced not found in /nonexistent/data/EMNIST/raw")])
def test_bad_input_under_torchrun_fails_with_one_line_per_failing_rank(flags, says, tiny_emnist, tmp_path):
    """Every rank checks flags and data before the process group forms. Whichever rank fails first prints its line
    (naming its rank) before it exits; torchrun may stop the other before it prints, so one or two lines."""
    out = str(tmp_path / "out")
    r = torchrun("--quick", "--data-root", tiny_emnist, *flags, "--out", out, timeout=90)
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and 1 <= len(lines) <= 2, r.stderr[-2000:]
    assert all(re.match(r"emnist_ddp\.py: error: rank [01]: ", ln) and says in ln for ln in lines), lines
    assert not os.path.exists(out)  # nothing half-written


def test_nan_loss_stops_every_rank_with_one_line_naming_the_step(tiny_emnist, tmp_path):
    out = str(tmp_path / "out")
    r = torchrun(*TINY, "--lr", "1e30", "--epochs", "2", "--data-root", tiny_emnist, "--out", out, "--run-id", "nan")
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]  # rank 0 says it; rank 1 follows quietly
    assert re.search(r"loss is (nan|inf) at step \d", lines[0])
    status = json.load(open(os.path.join(out, "emnist_ddp", "nan", "status.json")))
    assert status["state"] == "failed" and "at step" in status["message"]


# ----------------------------------------------------------------------------- Slurm scripts
@pytest.mark.parametrize("name", ["emnist_ddp.sbatch", "emnist_ddp_multinode.sbatch"])
def test_slurm_script_parses_and_passes_only_known_flags(name):
    path = os.path.join(ROOT, "slurm", name)
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    text = open(path).read().replace("\\\n", " ")  # join continuation lines
    line = next(ln for ln in text.splitlines() if not ln.lstrip().startswith("#") and "torch.distributed.run" in ln
                and "emnist_ddp.py" in ln)
    tokens = shlex.split(line.split("emnist_ddp.py", 1)[1])
    flags = {t.split("=")[0] for t in tokens if t.startswith("--")}
    known = {s for a in emnist_ddp.build_parser()._actions for s in a.option_strings}
    assert flags and flags <= known, flags - known
    preset = re.search(r"PRESET=\$\{PRESET:-(\w+)\}", text).group(1)
    assert preset in emnist_ddp.PRESETS and preset != "quick"
    assert re.search(r"^#SBATCH --output=", text, re.M) and re.search(r"^#SBATCH --error=", text, re.M)
    if "multinode" in name:
        assert "srun" in line and "--rdzv_backend=c10d" in line and "--rdzv_endpoint=" in line
    else:
        assert "--standalone" in line

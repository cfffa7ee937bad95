"""emnist_ddp.py: class mapping, schedule, EMA, world-size-free randomness; torchrun with 2 CPU processes (gloo) on tiny
synthetic EMNIST: outputs written once, 1 process == 2 processes to float rounding, exact resume (across world sizes);
bad input under torchrun; the Slurm scripts parse and pass only flags the script accepts."""
import csv
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import emnist_ddp as E
from conftest import ROOT, run_script

# 564 tiny images, global batch 188: 3 steps per epoch (94 per rank with 2 processes); 16 px, channels 8,16,32
TINY = ["--quick", "--batch-size", "188", "--T", "10"]
TOL = 1e-5
MAPPING = "/work/shared/data/EMNIST/raw/emnist-balanced-mapping.txt"


def torchrun(*args, timeout=150):
    """Two CPU processes on one machine; --standalone picks a free rendezvous port, so runs never collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "emnist_ddp.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def ckpts(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*")))


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- pure functions
def test_class_mapping_has_47_characters_and_merges_lookalikes():
    assert len(E.CLASSES) == 47 == len(set(E.CLASSES))
    assert E.CLASSES[:10] == list("0123456789") and E.CLASSES[10] == "A" and E.CLASSES[36] == "a"
    if os.path.isfile(MAPPING):  # the official emnist-balanced-mapping.txt: "index ascii-code" per line
        official = [chr(int(line.split()[1])) for line in open(MAPPING) if line.strip()]
        assert official == E.CLASSES
    assert E.char_to_class("k") == E.CLASSES.index("K") and E.char_to_class("o") == E.CLASSES.index("O")
    assert E.char_to_class("a") == 36 and E.char_to_class("3") == 3
    with pytest.raises(common.UsageError):
        E.char_to_class("#")


def test_cosine_schedule_is_capped_and_matches_closed_form():
    T, s = 600, 0.008
    sch = E.make_schedule(T)
    f = lambda t: math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = np.array([f(t) / f(0) for t in range(1, T + 1)])
    assert np.allclose(sch["alpha_bars"][:-1].numpy(), closed[:-1], rtol=1e-4)
    assert sch["betas"].max().item() == pytest.approx(0.999)


def test_ema_update_with_warmup():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in a.parameters()]
    assert E.ema_update(a, b, 0, 0.999) == pytest.approx(0.1)
    for pe, p0, p in zip(a.parameters(), e0, b.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p)
    assert E.ema_update(a, b, 10**6, 0.999) == pytest.approx(0.999)


def test_unet_shapes_for_three_and_four_levels():
    for chans, size in (((8, 16, 32), 16), ((8, 16, 16, 16), 64)):
        m = E.UNet(chans)
        x = torch.randn(2, 1, size, size)
        assert m(x, torch.tensor([0, 5]), torch.tensor([3, 47])).shape == x.shape


def test_step_randomness_does_not_depend_on_world_size(monkeypatch):
    args = type("A", (), dict(seed=3, batch_size=6, image_size=4, T=50, p_uncond=0.5))()
    full = E.step_randomness(args, 2, 7, torch.device("cpu"))
    monkeypatch.setattr(E, "WORLD", 2)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(E, "RANK", r)
        parts.append(E.step_randomness(args, 2, 7, torch.device("cpu")))
    for k in range(3):  # rank r holds the global positions r, r + 2, ...
        assert torch.equal(full[k][0::2], parts[0][k]) and torch.equal(full[k][1::2], parts[1][k])


# ----------------------------------------------------------------------------- torchrun, 2 CPU processes
@pytest.fixture(scope="module")
def runs(tiny_emnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    common_args = [*TINY, "--data-root", tiny_emnist, "--out", out]
    r = torchrun(*common_args, "--epochs", "2", "--judge-epochs", "2", "--chars", "Ak3", "--run-id", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = os.path.join(out, "emnist_ddp", "ddp")
    return {"out": out, "args": common_args, "ddp": ddp, "stdout": r.stdout}


def test_two_processes_finish_and_rank0_writes_everything_once(runs):
    d = runs["ddp"]
    assert runs["stdout"].count("wrote ") == 1  # only rank 0 reports
    names = [os.path.basename(p) for p in ckpts(d)]
    assert names == [f"emnist-balanced_tiny_16px_c8-16-32_T10_b188_epoch00{e}.pt" for e in (1, 2)]
    rows = list(csv.DictReader(open(os.path.join(d, "metrics.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [3, 6]
    for k in ("loss_mean", "loss_std", "loss_min", "loss_max", "loss_median", "lr", "grad_norm", "samples_per_s",
              "batches_per_s", "rss_mb", "ema_divergence", "epoch_s", "wall_s"):
        assert math.isfinite(float(rows[-1][k])), k
    snap = json.load(open(os.path.join(d, "metrics_snapshot.json")))
    assert snap["world_size"] == 2 and snap["config"]["batch_size"] == 188 and len(snap["epochs"]) == 2
    m = json.load(open(os.path.join(d, "metrics.json")))
    assert m["n_samples"] == 47 * 2 and 0 <= m["eval"]["class_accuracy"] <= 1 and math.isfinite(m["eval"]["fid"])
    assert json.load(open(os.path.join(d, "status.json")))["state"] == "completed"
    x = torch.load(os.path.join(d, "samples.pt"))
    assert x.shape == (94, 1, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
    for f in ("dashboard", "loss", "loss_log", "loss_band", "grad_norm", "ema_divergence", "memory", "throughput",
              "lr", "epoch_time", "loss_derivative", "class_grid", "chars", "progression"):
        assert os.path.getsize(os.path.join(d, f + ".png")) > 1000, f
    assert open(os.path.join(d, "progression.gif"), "rb").read(6) in (b"GIF89a", b"GIF87a")
    assert len(glob.glob(os.path.join(d, "progression", "frame_*.png"))) >= 3
    assert "dashboard.png" in open(os.path.join(d, "report.md")).read()


def test_one_process_equals_two_processes_and_resume_continues(runs):
    """Same seed, same global batch: 1 process (no DDP) after 3 steps == 2 processes (DDP, gloo) after 3 steps; then
    resuming the 1-process checkpoint for another epoch lands on the 2-process epoch-2 weights (exact continuation)."""
    r = run_script("emnist_ddp.py", *runs["args"], "--epochs", "1", "--no-sample", "--run-id", "one", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    one = ckpts(os.path.join(runs["out"], "emnist_ddp", "one"))
    two = ckpts(runs["ddp"])
    assert len(one) == 1
    c1, c2 = torch.load(one[0], weights_only=False), torch.load(two[0], weights_only=False)
    two_end = torch.load(two[1], weights_only=False)
    assert max_diff(c1["model"], c2["model"]) < TOL and max_diff(c1["ema"], c2["ema"]) < TOL
    assert max_diff(c2["model"], two_end["model"]) > 10 * TOL  # 3 Adam steps of lr 1e-4 move weights by up to 3e-4
    assert c1["history"][0]["loss_mean"] == pytest.approx(c2["history"][0]["loss_mean"], rel=1e-5)

    r = run_script("emnist_ddp.py", "--resume", one[0], "--epochs", "2", "--no-sample", "--data-root",
                   runs["args"][runs["args"].index("--data-root") + 1], "--out", runs["out"], "--run-id", "resumed",
                   timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    d = os.path.join(runs["out"], "emnist_ddp", "resumed")
    rows = list(csv.DictReader(open(os.path.join(d, "metrics.csv"))))
    assert [int(x["epoch"]) for x in rows] == [1, 2] and [int(x["step"]) for x in rows] == [3, 6]
    assert float(rows[0]["loss_mean"]) == pytest.approx(c1["history"][0]["loss_mean"])  # the curve carries on
    res = torch.load(ckpts(d)[-1], weights_only=False)
    assert res["epoch"] == 2 and len(ckpts(d)) == 1
    assert max_diff(res["model"], two_end["model"]) < TOL and max_diff(res["ema"], two_end["ema"]) < TOL
    assert float(rows[1]["loss_mean"]) == pytest.approx(two_end["history"][1]["loss_mean"], rel=1e-5)


@pytest.mark.parametrize("case", ["unknown_preset", "batch_not_divisible", "missing_data"])
def test_bad_input_under_torchrun_fails_everywhere_with_one_message(case, tiny_emnist, tmp_path):
    out = str(tmp_path / "out")
    args = {"unknown_preset": ["--preset", "huge", "--data-root", tiny_emnist],
            "batch_not_divisible": ["--quick", "--batch-size", "33", "--data-root", tiny_emnist],
            "missing_data": ["--quick", "--data-root", str(tmp_path / "nowhere")]}[case]
    r = torchrun(*args, "--out", out, timeout=90)
    assert r.returncode != 0
    assert r.stderr.count("emnist_ddp.py: error:") == 1, r.stderr[-2000:]  # rank 0 speaks, rank 1 only exits
    assert {"unknown_preset": "huge", "batch_not_divisible": "not divisible by the world size 2",
            "missing_data": "not found"}[case] in r.stderr
    assert not os.path.exists(os.path.join(out, "emnist_ddp"))  # nothing half-written


def test_nan_loss_stops_with_the_step_and_exit_1(tiny_emnist, tmp_path):
    out = str(tmp_path / "out")
    r = run_script("emnist_ddp.py", *TINY, "--lr", "1e30", "--epochs", "2", "--data-root", tiny_emnist, "--out", out,
                   "--run-id", "nan", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and "non-finite loss at step" in line[0]
    status = json.load(open(os.path.join(out, "emnist_ddp", "nan", "status.json")))
    assert status["state"] == "failed" and "non-finite loss at step" in status["message"]


# ----------------------------------------------------------------------------- Slurm scripts
@pytest.mark.parametrize("name", ["emnist_ddp.sbatch", "emnist_ddp_multinode.sbatch"])
def test_slurm_script_parses_and_passes_only_known_flags(name):
    path = os.path.join(ROOT, "slurm", name)
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    text = open(path).read().replace("\\\n", " ")  # join continuation lines
    line = next(ln for ln in text.splitlines() if not ln.lstrip().startswith("#") and "torchrun" in ln and "emnist_ddp.py" in ln)
    tokens = shlex.split(line.split("emnist_ddp.py", 1)[1])
    flags = {t.split("=")[0] for t in tokens if t.startswith("--")}
    known = {s for a in E.build_parser()._actions for s in a.option_strings}
    assert flags and flags <= known, flags - known
    assert re.search(r"^#SBATCH --output=", text, re.M) and re.search(r"^#SBATCH --error=", text, re.M)
    if "multinode" in name:
        assert "srun" in line and "--rdzv_backend=c10d" in line and "--rdzv_endpoint=" in line
    else:
        assert "--standalone" in line

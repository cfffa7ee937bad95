"""Slurm, for real: a one-node Slurm cluster on this machine (munged, slurmctld and slurmd, from a config written to a
temporary folder, on free ports) runs slurm/emnist_ddp.sbatch and slurm/emnist_ddp_multinode.sbatch, unchanged, on
tiny synthetic EMNIST, on CPUs with gloo: the variables at the top of the scripts and sbatch's own command-line
options (which override #SBATCH lines) are all that differ from a GPU cluster. The multi-node script runs two torchrun
agents, as Slurm tasks on the one node (--ntasks-per-node=2), which meet at a c10d rendezvous on it as two nodes'
agents would. Both jobs must complete, write one run each, and end on the same weights (2 processes either way).

Needs root: Debian's slurm-wlm and munge are installed with apt-get when missing (once, about 10 s), and the daemons
run as root; skipped with a message otherwise. Every daemon the test starts is stopped at the end, also on failure.
It takes about 30 s once Slurm is installed, so it runs in the main suite."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}
# 564 tiny images, global batch 188 (94 per process), 16 px, T = 10, 2 epochs of 3 steps; samples but no judge
FLAGS = ["--quick", "--batch-size", "188", "--T", "10", "--no-eval"]
# what a GPU cluster's resources become on this machine's one node (2 CPUs): sbatch options override #SBATCH lines
CPU_NODE = ["--gpus-per-node=0", "--mem=1G", "--time=10"]


def say(request, line):
    """A line on the terminal even under -q and output capture (installing and starting a cluster takes a while)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(f"test_cluster: {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(f"test_cluster: {line}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install(request):
    """apt-get install Debian's slurm-wlm and munge (apt-get update first only if that fails). Returns why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: cannot install slurm-wlm and munge with apt-get, nor run slurmd"
    if not shutil.which("apt-get"):
        return "no apt-get to install slurm-wlm and munge with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    say(request, "Slurm not found: installing slurm-wlm and munge with apt-get (once)")
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            say(request, "apt-get install failed: running apt-get update, then trying again")
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=180)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        return f"apt-get timed out after {e.timeout} s"
    if r.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    say(request, f"installed slurm-wlm and munge in {time.monotonic() - t0:.0f} s")
    return None


SLURM_CONF = """ClusterName=emnisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged, slurmctld and slurmd in the foreground, as this process's children, with their files in `d`."""

    def __init__(self, d):
        self.d, self.procs = str(d), []
        self.env = {**os.environ, "SLURM_CONF": os.path.join(self.d, "slurm.conf")}

    def start(self):
        d = self.d
        os.chmod(d, 0o700)  # munged refuses a key in a folder others can write to
        os.makedirs(os.path.join(d, "state"))
        os.makedirs(os.path.join(d, "spool"))
        with open(os.path.join(d, "munge.key"), "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(os.path.join(d, "munge.key"), 0o400)
        open(os.path.join(d, "plugstack.conf"), "w").close()
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        with open(self.env["SLURM_CONF"], "w") as f:  # the node as slurmd sees it: NodeName, CPUs, RealMemory, ...
            f.write(SLURM_CONF.format(host=node.split()[0].split("=")[1], ctld_port=free_port(), d_port=free_port(),
                                      d=d, node=node))
        self.spawn("munged", ["munged", "--force", "--foreground", f"--key-file={d}/munge.key",
                              f"--socket={d}/munge.socket", f"--pid-file={d}/munged.pid",
                              f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"])
        self.wait_for(lambda: os.path.exists(f"{d}/munge.socket"), "munged's socket", 20)
        self.spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self.spawn("slurmd", ["slurmd", "-D"])
        self.wait_for(lambda: self.cmd("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", "an idle node", 60)

    def spawn(self, name, cmd):
        with open(os.path.join(self.d, f"{name}.out"), "w") as log:
            self.procs.append((name, subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)))

    def cmd(self, *args, check=False):
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def wait_for(self, ready, what, timeout):
        t0 = time.monotonic()
        while not ready():
            dead = [name for name, p in self.procs if p.poll() is not None]
            if dead or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no {what} after {time.monotonic() - t0:.0f} s ({', '.join(dead) or 'none'} "
                                   f"exited):\n{self.logs()}")
            time.sleep(0.2)

    def logs(self):
        tails = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.d, name)
            if os.path.isfile(path):
                tails.append(f"--- {name}\n" + "".join(open(path, errors="replace").readlines()[-15:]))
        return "\n".join(tails)

    def submit(self, script, *options, args=(), env=None):
        r = subprocess.run(["sbatch", "--parsable", *CPU_NODE, f"--output={self.d}/%x-%j.out",
                            f"--error={self.d}/%x-%j.err", *options, os.path.join(ROOT, "slurm", script), *args],
                           env={**self.env, **(env or {})}, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def wait(self, job, timeout):
        """The job's final state, polled with scontrol (no accounting database here); fails after `timeout` s."""
        t0, state = time.monotonic(), None
        while time.monotonic() - t0 < timeout:
            state = re.search(r"JobState=(\w+)", self.cmd("scontrol", "show", "job", "-o", job).stdout)
            if state and state.group(1) in FINAL:
                return state.group(1)
            time.sleep(1)
        raise AssertionError(f"job {job} still {state and state.group(1)} after {timeout} s:\n{self.logs()}")

    def stop(self):
        """Cancel every job, wait until their steps have ended, then stop the daemons, newest first."""
        if self.procs and self.procs[-1][1].poll() is None:
            self.cmd("scancel", "--user", "root")
            deadline = time.monotonic() + 30
            while self.cmd("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    if not all(map(shutil.which, ("munged", "slurmctld", "slurmd", "sbatch"))):
        why = install(request)
        if why or not all(map(shutil.which, ("munged", "slurmctld", "slurmd", "sbatch"))):
            say(request, f"Slurm not available ({why or 'installed, but not on PATH'}): Slurm test skipped")
            pytest.skip(f"Slurm not available ({why or 'installed, but not on PATH'})")
    if os.geteuid() != 0:
        pytest.skip("not root: slurmd must run as root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        t0 = time.monotonic()
        c.start()
        say(request, f"one-node Slurm cluster up in {time.monotonic() - t0:.0f} s")
        yield c
    finally:
        c.stop()
        assert all(p.poll() is not None for _, p in c.procs), "a daemon is still running"


def test_both_sbatch_scripts_run_under_slurm_on_cpus_and_agree(cluster, tiny_emnist, tmp_path):
    """The one-node script (torchrun --standalone, 2 processes) and the multi-node one (srun: 2 torchrun agents of one
    process each, c10d rendezvous) as two jobs, each on the node's 2 CPUs: both COMPLETED, one run each in OUT with
    its checkpoints, samples and status, rank 0's report in the job log, and the same weights (same global batch)."""
    out = str(tmp_path / "out")
    env = {"PYTHON": sys.executable, "DEVICE": "cpu", "BACKEND": "gloo", "DATA_ROOT": tiny_emnist, "OUT": out,
           "OMP_NUM_THREADS": "1"}
    one = cluster.submit("emnist_ddp.sbatch", "--cpus-per-task=2", args=FLAGS, env={**env, "NPROC_PER_NODE": "2"})
    two = cluster.submit("emnist_ddp_multinode.sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                         args=FLAGS, env={**env, "NPROC_PER_NODE": "1", "RDZV_PORT": str(free_port())})
    states = {job: cluster.wait(job, timeout=400) for job in (one, two)}
    logs = {job: [open(os.path.join(cluster.d, f"{name}-{job}.{ext}")).read() for ext in ("out", "err")]
            for job, name in ((one, "emnist_ddp"), (two, "emnist_ddp_mn"))}
    assert states == {one: "COMPLETED", two: "COMPLETED"}, {j: log[1][-3000:] for j, log in logs.items()}
    assert "2 agents x 1 processes (cpu, gloo)" in logs[two][0] and "2 processes (cpu, gloo)" in logs[one][0]
    weights = []
    for job in (one, two):
        d = os.path.join(out, "emnist_ddp", f"slurm-{job}")
        assert logs[job][0].count(f"wrote {d}") == 1  # rank 0 only
        status = json.load(open(os.path.join(d, "status.json")))
        assert status["state"] == "completed" and status["step"] == status["total"]
        assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == [
            f"emnist-balanced_quick_16px_c8-16-32_T10_b188_epoch00{e}.pt" for e in (1, 2)] + ["latest.pt"]
        x = torch.load(os.path.join(d, "samples.pt"))
        assert x.shape == (94, 1, 16, 16) and torch.isfinite(x).all()
        assert os.path.getsize(os.path.join(d, "class_grid.png")) > 1000
        weights.append(torch.load(os.path.join(d, "checkpoints", "latest.pt"), weights_only=False)["model"])
    assert sorted(os.listdir(os.path.join(out, "emnist_ddp"))) == sorted(f"slurm-{j}" for j in (one, two))
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5

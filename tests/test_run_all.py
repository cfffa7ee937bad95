"""run_all.sh: skipping finished steps, --force, stopping at the first failure with its log, and the summary table.
The scripts themselves are stood in for by a fake interpreter, so this runs in a second; the real scripts' quick runs
are tested in their own files (and run_all.sh --quick by the fresh-clone check)."""
import json
import os
import shutil
import subprocess

from conftest import ROOT

STEPS = [("states_ddpm", "ddpm_states"), ("states_guidance", "classifier_guidance_states"), ("mnist_cfg", "ddpm_mnist_cfg"),
         ("ddim", "ddim_sample"), ("edm", "edm_mnist"), ("posterior", "edm_posterior"), ("svd", "svd_posterior"),
         ("calibration", "posterior_calibration"), ("emnist_ddp", "emnist_ddp")]
# a stand-in for python: logs its arguments; for a script, writes a completed run folder (or fails on FAIL_AT)
FAKE_PY = """#!/usr/bin/env bash
echo "$*" >> calls.txt
if [ "$1" = tools/summary.py ]; then exec python3 "$@"; fi
script=""; rid=""
for a in "$@"; do case "$a" in *.py) script=$(basename "$a" .py) ;; esac; done
while [ $# -gt 0 ]; do [ "$1" = --run-id ] && rid=$2; shift; done
[ "$script" = "$FAIL_AT" ] && { echo "boom in $script" >&2; exit 3; }
mkdir -p "outputs/$script/$rid"
echo '{"state": "completed"}' > "outputs/$script/$rid/status.json"
m='{"wall_time_s": 1.5, "peak_rss_mb": 812.4, "eval": {"fid": 2.5, "fid_floor": 1.0, "n": 100, "mean_top_prob": 0.9}}'
echo "$m" > "outputs/$script/$rid/metrics.json"
echo "wrote outputs/$script/$rid"
"""


def setup_repo(tmp_path):
    for f in ("run_all.sh", "tools/summary.py"):
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    (tmp_path / "fakepy").write_text(FAKE_PY)
    os.chmod(tmp_path / "fakepy", 0o755)
    return tmp_path


def run_all(repo, *args, fail_at=""):
    env = {**os.environ, "PYTHON": str(repo / "fakepy"), "FAIL_AT": fail_at, "DATA_ROOT": "/data/here"}
    return subprocess.run(["bash", "run_all.sh", *args], cwd=repo, capture_output=True, text=True, timeout=60, env=env)


def calls(repo):
    return (repo / "calls.txt").read_text().splitlines() if (repo / "calls.txt").exists() else []


def test_runs_every_step_in_order_then_writes_the_summary(tmp_path):
    repo = setup_repo(tmp_path)
    r = run_all(repo, "--quick")
    assert r.returncode == 0, r.stderr
    scripts = [c for c in calls(repo) if "tools/summary.py" not in c]
    assert [next(w[:-3] for w in c.split() if w.endswith(".py")) for c in scripts] == [s for _, s in STEPS]
    assert all("--quick" in c and "--run-id runall-quick" in c for c in scripts)
    assert "--data-root /data/here" in scripts[2] and "--nproc_per_node=2" in scripts[-1]
    assert "outputs/edm_mnist/runall-quick/checkpoint.pt" in scripts[5]  # posterior and SVD use the EDM step's model
    summary = (repo / "outputs" / "summary.md").read_text()
    for step, script in STEPS:
        assert f"| {step} | {script}/runall-quick | completed | 2 s | 812 MB |" in summary
    assert "FID 2.50 (floor 1.00, N=100)" in summary and "| emnist_ddp | emnist_ddp/runall-quick |" in r.stdout


def test_rerun_skips_completed_steps_unless_forced(tmp_path):
    repo = setup_repo(tmp_path)
    assert run_all(repo, "--quick").returncode == 0
    n = len(calls(repo))
    r = run_all(repo, "--quick")
    assert r.returncode == 0 and r.stdout.count("skipped") == len(STEPS)
    assert len(calls(repo)) == n + 1  # only the summary ran
    r = run_all(repo, "--quick", "--force")
    assert r.returncode == 0 and "skipped" not in r.stdout and len(calls(repo)) == 2 * n + 1


def test_stops_at_the_first_failure_naming_the_step_and_log(tmp_path):
    repo = setup_repo(tmp_path)
    r = run_all(repo, "--quick", fail_at="ddim_sample")
    assert r.returncode == 1
    assert "step 'ddim' failed; see outputs/logs/ddim.log" in r.stderr and "boom in ddim_sample" in r.stderr
    assert not any("edm_mnist.py" in c for c in calls(repo))  # nothing after the failure ran
    assert not (repo / "outputs" / "summary.md").exists()
    r = run_all(repo, "--quick")  # a rerun picks up at the failed step
    assert r.returncode == 0 and r.stdout.count("skipped") == 3
    status = json.loads((repo / "outputs" / "ddim_sample" / "runall-quick" / "status.json").read_text())
    assert status["state"] == "completed"


def test_unknown_option_is_exit_2(tmp_path):
    r = run_all(setup_repo(tmp_path), "--fast")
    assert r.returncode == 2 and "unknown option --fast" in r.stderr

#!/usr/bin/env bash
# Run the whole study in order, one script at a time: STATES (unconditional, guided), MNIST CFG, the DDIM study, EDM,
# posterior sampling (70% and 20% observed), the SVD of the posterior, the posterior samplers' calibration on exact
# priors, EMNIST DDP under torchrun.
#   bash run_all.sh [--quick] [--force]
# --quick runs every step in its quick mode; a step whose run folder already says "completed" is skipped unless --force.
# DATA_ROOT (default ./data), DEVICE (auto), NPROC (2, torchrun processes) and PYTHON pass through. The first failure
# stops everything, naming the step and its log (outputs/logs/<step>.log). At the end a table of every run's headline
# metrics is printed and written to outputs/summary.md; outputs/dashboard.html shows the newest run live.
set -uo pipefail
cd "$(dirname "$0")"
QUICK="" FORCE=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK="--quick" ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown option $a (use --quick and/or --force)" >&2; exit 2 ;;
  esac
done
DEVICE="${DEVICE:-auto}"
DATA_ROOT="${DATA_ROOT:-./data}"
PY="${PYTHON:-python}"
NPROC="${NPROC:-2}"
RUN_ID="runall${QUICK:+-quick}"
mkdir -p outputs/logs
RUNS=()  # step=script/run-id, for the summary

step() {  # step NAME SCRIPT COMMAND...: run one script unless its run folder is complete; log to outputs/logs/NAME.log
  local name=$1 script=$2; shift 2
  local dir="outputs/$script/$RUN_ID" log="outputs/logs/$name.log" t0
  RUNS+=("$name=$script/$RUN_ID")
  if [ "$FORCE" = 0 ] && grep -qs '"state": "completed"' "$dir/status.json"; then
    echo "== $name: already completed in $dir (skipped; --force reruns it)"
    return
  fi
  [ "$FORCE" = 1 ] && rm -rf "$dir"
  t0=$(date +%s)
  echo "== $name: $*"
  if ! "$@" $QUICK --device "$DEVICE" --run-id "$RUN_ID" >"$log" 2>&1; then
    echo "run_all.sh: step '$name' failed; see $log" >&2
    tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 5 >&2
    exit 1
  fi
  echo "   done in $(( $(date +%s) - t0 )) s; $(tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 1)"
}

EDM_CKPT="outputs/edm_mnist/$RUN_ID/checkpoint.pt"
step states_ddpm ddpm_states "$PY" ddpm_states.py
step states_guidance classifier_guidance_states "$PY" classifier_guidance_states.py \
  --checkpoint "outputs/ddpm_states/$RUN_ID/denoiser.pt"
step mnist_cfg ddpm_mnist_cfg "$PY" ddpm_mnist_cfg.py --data-root "$DATA_ROOT"
step ddim ddim_sample "$PY" ddim_sample.py --checkpoint "outputs/ddpm_mnist_cfg/$RUN_ID/checkpoint.pt" --data-root "$DATA_ROOT"
step edm edm_mnist "$PY" edm_mnist.py --data-root "$DATA_ROOT"
step posterior edm_posterior "$PY" edm_posterior.py --checkpoint "$EDM_CKPT" --observed 0.7,0.2 --data-root "$DATA_ROOT"
step svd svd_posterior "$PY" svd_posterior.py --checkpoint "$EDM_CKPT" --observed 0.7,0.2 --data-root "$DATA_ROOT"
step calibration posterior_calibration "$PY" posterior_calibration.py --data-root "$DATA_ROOT"
step emnist_ddp emnist_ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" emnist_ddp.py \
  --data-root "$DATA_ROOT"
echo
"$PY" tools/summary.py outputs/summary.md "${RUNS[@]}"
echo "all steps finished; summary in outputs/summary.md, runs under outputs/ (bash serve_dashboard.sh to watch them)"

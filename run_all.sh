#!/usr/bin/env bash
# Run every method script in order; stop at the first failure, naming the step and its log.
#   bash run_all.sh [--quick]   (DATA_ROOT, DEVICE and NPROC pass through; outputs under outputs/)
set -uo pipefail
cd "$(dirname "$0")"
QUICK=""
for a in "$@"; do
  case "$a" in
    --quick) QUICK="--quick" ;;
    -h|--help) sed -n '2,3p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $a (use --quick)" >&2; exit 2 ;;
  esac
done
DEVICE="${DEVICE:-auto}"
DATA_ROOT="${DATA_ROOT:-./data}"
PY="${PYTHON:-python}"
NPROC="${NPROC:-2}"  # processes for the torchrun step (EMNIST DDP)
RUN_ID="runall${QUICK:+-quick}"
mkdir -p outputs/logs

step() {  # step NAME COMMAND...: run one script, log to outputs/logs/NAME.log
  local name=$1; shift
  local log="outputs/logs/$name.log"
  local t0=$(date +%s)
  echo "== $name: $*"
  if ! "$@" $QUICK --device "$DEVICE" --run-id "$RUN_ID" >"$log" 2>&1; then
    echo "run_all.sh: step '$name' failed; see $log" >&2
    tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 5 >&2
    exit 1
  fi
  echo "   done in $(( $(date +%s) - t0 )) s; $(tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 1)"
}

step states_ddpm "$PY" ddpm_states.py
step states_guidance "$PY" classifier_guidance_states.py --denoiser "outputs/ddpm_states/$RUN_ID/denoiser.pt"
step mnist_cfg "$PY" ddpm_mnist_cfg.py --data-root "$DATA_ROOT"
step ddim "$PY" ddim_sample.py --checkpoint "outputs/ddpm_mnist_cfg/$RUN_ID/checkpoint.pt" --data-root "$DATA_ROOT"
step edm "$PY" edm_mnist.py --data-root "$DATA_ROOT"
step emnist_ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" emnist_ddp.py --data-root "$DATA_ROOT"
echo "all steps finished; outputs under outputs/"

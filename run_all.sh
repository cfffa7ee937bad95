#!/usr/bin/env bash
# Run every method script in order; stop at the first failure, naming the step and its log.
#   bash run_all.sh [--quick]        (DATA_ROOT and DEVICE pass through; outputs under outputs/)
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
RUN_ID="runall${QUICK:+-quick}"
mkdir -p outputs/logs

step() {  # step NAME SCRIPT ARGS...: run one script, log to outputs/logs/NAME.log
  local name=$1; shift
  local log="outputs/logs/$name.log"
  local t0=$(date +%s)
  echo "== $name: $PY $*"
  if ! "$PY" "$@" $QUICK --device "$DEVICE" --run-id "$RUN_ID" >"$log" 2>&1; then
    echo "run_all.sh: step '$name' failed; see $log" >&2
    tail -n 5 "$log" >&2
    exit 1
  fi
  echo "   done in $(( $(date +%s) - t0 )) s; $(tail -n 1 "$log")"
}

step states_ddpm ddpm_states.py
step states_guidance classifier_guidance_states.py --denoiser "outputs/ddpm_states/$RUN_ID/denoiser.pt"
echo "all steps finished; outputs under outputs/"

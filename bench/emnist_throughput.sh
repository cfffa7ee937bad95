#!/usr/bin/env bash
# Training throughput of emnist_ddp.py with 1 and with NPROC_MAX (default 2) processes on this machine, one run after
# the other: the same preset and global batch, training only (--no-sample), EPOCHS epochs (default 1).
# Each process gets CORES / nproc threads, so every run uses the whole machine.
#   bash bench/emnist_throughput.sh [extra flags, e.g. --preset small --data-root ../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
CORES=$(nproc); NPROC_MAX=${NPROC_MAX:-2}; EPOCHS=${EPOCHS:-1}
id="bench-$(date +%Y%m%d-%H%M%S)"
for n in 1 "$NPROC_MAX"; do
  OMP_NUM_THREADS=$(( CORES / n > 0 ? CORES / n : 1 )) /usr/bin/time -v \
    python -m torch.distributed.run --standalone --nproc_per_node="$n" emnist_ddp.py --epochs "$EPOCHS" --no-sample \
    --run-id "$id-np$n" "$@" 2> >(grep -E "Maximum resident|Elapsed" >&2) >/dev/null
  python - "outputs/emnist_ddp/$id-np$n/metrics.json" "$n" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["last_epoch"]
print(f"{sys.argv[2]} process(es): {m['samples_per_s']:.1f} training images/s, {m['batches_per_s']:.3f} steps/s, "
      f"epoch {m['epoch_s']:.0f} s, loss {m['loss_mean']:.4f}")
PY
done

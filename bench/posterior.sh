#!/usr/bin/env bash
# Benchmark of posterior sampling on a trained EDM checkpoint: the default edm_posterior run, the guidance and
# steps ablation (same digit, mask and seeds), then the default svd_posterior run (1024 draws per setting).
# One run at a time. Usage: bash bench/posterior.sh CHECKPOINT [extra flags for every run, e.g. --data-root ../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: bash bench/posterior.sh outputs/edm_mnist/RUN/checkpoint.pt [flags]}; shift
id="bench-$(date +%Y%m%d-%H%M%S)"
runs=("masked-80:" "masked-18:--steps 18" "none-80:--guidance none" "dps-80:--guidance dps" "dps-18:--guidance dps --steps 18")
for r in "${runs[@]}"; do
  name=${r%%:*}; flags=${r#*:}
  # shellcheck disable=SC2086
  /usr/bin/time -v python edm_posterior.py --checkpoint "$ckpt" --run-id "$id-$name" $flags "$@" \
    2> >(grep -E "Maximum resident" >&2) | grep -E "^obs"
done
/usr/bin/time -v python svd_posterior.py --checkpoint "$ckpt" --run-id "$id" "$@" 2> >(grep -E "Maximum resident|Elapsed" >&2)
python - "$id" "${runs[@]}" <<'PY'
import json, sys
rid, runs = sys.argv[1], [r.split(":")[0] for r in sys.argv[2:]]
print("| run | setting | PSNR hidden (dB) | judge acc | judge conf | posterior std | s per draw |\n|---|---|---|---|---|---|---|")
for name in runs:
    for tag, m in json.load(open(f"outputs/edm_posterior/{rid}-{name}/metrics.json"))["experiments"].items():
        print(f"| {name} | {tag} | {m['psnr_unobserved']:.2f} | {m['judge_accuracy']:.3f} | {m['judge_mean_top_prob']:.3f} "
              f"| {m['mean_posterior_std']:.3f} | {m['seconds_per_draw']:.4f} |")
s = json.load(open(f"outputs/svd_posterior/{rid}/metrics.json"))
print(open(f"outputs/svd_posterior/{rid}/svd_table.md").read())
for tag, m in s["posterior"].items():
    print(f"svd ensemble {tag}: {m['n_draws']} draws in {m['seconds']:.0f} s, PSNR {m['psnr_unobserved']:.2f} dB, "
          f"judge {m['judge_accuracy']:.3f}")
PY

#!/usr/bin/env bash
# Benchmark of posterior sampling on a trained EDM checkpoint: every sampler of edm_posterior.py on the same digit,
# masks and seeds (70% and 20% observed; the default is SMC with K = 8 at 18 steps), then svd_posterior.py (1024 draws
# per setting) with that prior and with the exact Gaussian prior, whose posterior spectrum is known. One at a time.
# Usage: bash bench/posterior.sh CHECKPOINT [extra flags for every run, e.g. --data-root ../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: bash bench/posterior.sh outputs/edm_mnist/RUN/checkpoint.pt [flags]}; shift
id="bench-$(date +%Y%m%d-%H%M%S)"
runs=("smc8-18:" "smc1-18:--particles 1" "smc16-18:--particles 16"
      "tweedie-18:--guidance tweedie" "dps-18:--guidance dps" "dps-80:--guidance dps --sample-steps 80"
      "masked-18:--guidance masked" "masked-80:--guidance masked --sample-steps 80"
      "none-80:--guidance none --sample-steps 80")
for r in "${runs[@]}"; do
  name=${r%%:*}; flags=${r#*:}
  # shellcheck disable=SC2086
  /usr/bin/time -v python edm_posterior.py --checkpoint "$ckpt" --run-id "$id-$name" $flags "$@" \
    2> >(grep -E "Maximum resident" >&2) | grep -E "^obs"
done
/usr/bin/time -v python svd_posterior.py --checkpoint "$ckpt" --run-id "$id" "$@" \
  2> >(grep -E "Maximum resident|Elapsed" >&2)
/usr/bin/time -v python svd_posterior.py --exact-prior gaussian --run-id "$id-exact" "$@" \
  2> >(grep -E "Maximum resident|Elapsed" >&2)
python - "$id" "${runs[@]}" <<'PY'
import json, sys
rid, runs = sys.argv[1], [r.split(":")[0] for r in sys.argv[2:]]
print("| run | setting | PSNR hidden (dB) | judge acc | judge conf | posterior std | s per draw |")
print("|---|---|---|---|---|---|---|")
for name in runs:
    for tag, m in json.load(open(f"outputs/edm_posterior/{rid}-{name}/metrics.json"))["experiments"].items():
        print(f"| {name} | {tag} | {m['psnr_unobserved']:.2f} | {m['judge_accuracy']:.3f} "
              f"| {m['judge_mean_top_prob']:.3f} "
              f"| {m['mean_posterior_std']:.3f} | {m['seconds_per_draw']:.4f} |")
for run in (rid, f"{rid}-exact"):
    print(open(f"outputs/svd_posterior/{run}/svd_table.md").read())
    for tag, m in json.load(open(f"outputs/svd_posterior/{run}/metrics.json"))["posterior"].items():
        print(f"svd ensemble {run} {tag}: {m['n_draws']} draws in {m['seconds']:.0f} s, "
              f"PSNR {m['psnr_unobserved']:.2f} dB")
PY

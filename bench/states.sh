#!/usr/bin/env bash
# Benchmark of the STATES pair, one run after the other (never two at once on a small machine): both default runs on
# STATES, then both again on a point set in the course's file format (COURSE_FILE, default: STATES drawn with another
# seed and three times the jitter, written by this script), then their figures per state, the worst state first.
# Usage: bash bench/states.sh [extra flags for every run, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
id="bench-$(date +%Y%m%d-%H%M%S)"
course=${COURSE_FILE:-outputs/course_states.pt}
if [ -z "${COURSE_FILE:-}" ]; then
  mkdir -p outputs
  python -c "import sys, torch, ddpm_states; x, y = ddpm_states.make_states(1000, seed=7, jitter=0.03); \
torch.save({'data': x, 'labels': y}, sys.argv[1])" "$course"
fi
for set in states course; do
  data=(); [ "$set" = course ] && data=(--data "$course")
  /usr/bin/time -v python ddpm_states.py --run-id "$id-$set" "${data[@]}" "$@" 2> >(grep -E "Maximum resident|Elapsed" >&2)
  /usr/bin/time -v python classifier_guidance_states.py --checkpoint "outputs/ddpm_states/$id-$set/denoiser.pt" \
    --run-id "$id-$set" "${data[@]}" "$@" 2> >(grep -E "Maximum resident|Elapsed" >&2)
done
python - "$id" <<'PY'
import json, sys
for s in ("states", "course"):
    d = json.load(open(f"outputs/ddpm_states/{sys.argv[1]}-{s}/metrics.json"))
    print(f"[{s}] ddpm_states: NLL {d['nll']:.3f} (floor {d['nll_floor']:.3f}), reverse NLL {d['reverse_nll']:.3f} "
          f"(floor {d['reverse_nll_floor']:.3f}), nn_dist {d['nn_dist']:.4f} (floor {d['nn_dist_floor']:.4f}), "
          f"wall {d['wall_time_s']:.0f}s")
    c = json.load(open(f"outputs/classifier_guidance_states/{sys.argv[1]}-{s}/metrics.json"))
    for name, m in sorted(c["per_state"].items(), key=lambda kv: kv[1]["on_state"]):
        print(f"  {name:10s} on state {100 * m['on_state']:6.2f}%  NLL {m['nll']:.3f} (floor {m['nll_floor']:.3f})  "
              f"reverse {m['reverse_nll']:.3f} (floor {m['reverse_nll_floor']:.3f})  nn_dist {m['nn_dist']:.4f}")
    for r in c.get("guidance_sweep", []):
        print(f"  w = {r['w']:<4g} worst on state {100 * min(r['on_state'].values()):6.2f}%, "
              f"NLL gap from {min(r['nll_gap'].values()):+.3f} to {max(r['nll_gap'].values()):+.3f}")
    print(f"[{s}] classifier_guidance_states: w = {c['w']:g}, wall {c['wall_time_s']:.0f}s")
PY

#!/usr/bin/env bash
# Benchmark of the STATES pair: both default runs, one after the other (never two at once on a small machine),
# then their headline figures. Usage: bash bench/states.sh [extra flags for both scripts, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
id="bench-$(date +%Y%m%d-%H%M%S)"
/usr/bin/time -v python ddpm_states.py --run-id "$id" "$@" 2> >(grep -E "Maximum resident|Elapsed" >&2)
/usr/bin/time -v python classifier_guidance_states.py --denoiser "outputs/ddpm_states/$id/denoiser.pt" --run-id "$id" "$@" \
  2> >(grep -E "Maximum resident|Elapsed" >&2)
python - "$id" <<'PY'
import json, sys
d = json.load(open(f"outputs/ddpm_states/{sys.argv[1]}/metrics.json"))
print(f"ddpm_states: NLL {d['nll']:.3f} (floor {d['nll_floor']:.3f}), reverse NLL {d['reverse_nll']:.3f} "
      f"(floor {d['reverse_nll_floor']:.3f}), nn_dist {d['nn_dist']:.4f} (floor {d['nn_dist_floor']:.4f}), "
      f"wall {d['wall_time_s']:.0f}s")
c = json.load(open(f"outputs/classifier_guidance_states/{sys.argv[1]}/metrics.json"))
for name, m in c["per_state"].items():
    print(f"  {name:10s} on state {100 * m['on_state']:6.2f}%  NLL {m['nll']:.3f} (floor {m['nll_floor']:.3f})  "
          f"reverse {m['reverse_nll']:.3f} (floor {m['reverse_nll_floor']:.3f})  nn_dist {m['nn_dist']:.4f}")
print(f"classifier_guidance_states: wall {c['wall_time_s']:.0f}s")
PY

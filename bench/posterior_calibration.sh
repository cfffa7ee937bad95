#!/usr/bin/env bash
# The calibration bench: every sampler of edm_posterior.py, at 18, 40, 80 and 200 steps, on the four priors whose
# posterior is exact (gauss2, gmm2, gauss784, gmm784), and the SMC sampler at K = 1, 4, 16, 64 particles; writes
# calibration.md (the table), calibration.json, calibration.png and smc_particles.png in the run folder.
# Usage: bash bench/posterior_calibration.sh --data-root ../shared/data [more flags, e.g. --priors gauss2,gmm2]
set -euo pipefail
cd "$(dirname "$0")/.."
id="bench-$(date +%Y%m%d-%H%M%S)"
/usr/bin/time -v python posterior_calibration.py --run-id "$id" "$@" 2> >(grep -E "Maximum resident|Elapsed" >&2)
cat "outputs/posterior_calibration/$id/calibration.md"

#!/usr/bin/env bash
# The default (GPU) configurations, in the order and with the flags that produced the README's "GPU figures"
# (one NVIDIA H100 80GB, torch 2.11 + CUDA 13, about 21 minutes of device time in all). One run at a time.
# Usage: bash bench/gpu_defaults.sh --data-root ../shared/data   (extra flags go to every run)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=("--device" "cuda" "$@")
cfg=outputs/ddpm_mnist_cfg/gpu/checkpoint.pt
edm=outputs/edm_mnist/gpu/checkpoint.pt
# 1. MNIST CFG default training (channels 64/128/256, cosine T = 1000, 20,000 steps). Its own final scoring is cut
#    to figures only (N = 500, sweep 100): step 2 scores the same DDPM sampler at N = 10,000 side by side with DDIM.
python ddpm_mnist_cfg.py --run-id gpu --n-samples 500 --sweep-n 100 --no-eval "${extra[@]}"
# 2. The DDIM study at N = 2,000 (every step count, both etas), then the headline pair at N = 10,000.
python ddim_sample.py --checkpoint "$cfg" --run-id gpu-n2000 --n-samples 2000 "${extra[@]}"
python ddim_sample.py --checkpoint "$cfg" --run-id gpu-n10000-s50 --n-samples 10000 --sample-steps 50 "${extra[@]}"
# 3. The guidance sweep with scores (N = 500 per w) and N = 1,000 at w = 2: --checkpoint samples and scores only.
python ddpm_mnist_cfg.py --checkpoint "$cfg" --run-id gpu-eval --n-samples 1000 --sweep-n 500 "${extra[@]}"
# 4. EDM default run (25 epochs, N = 10,000 scored, steps study), then posterior sampling with it as the prior.
python edm_mnist.py --run-id gpu "${extra[@]}"
bash bench/posterior.sh "$edm" "${extra[@]}"

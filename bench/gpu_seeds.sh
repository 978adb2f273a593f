#!/usr/bin/env bash
# Seed sweep of bench/integration.py on a lent GPU machine (torch + numpy + scipy, no network).
# Carries .gpu/seeds/ (made here: `python bench/integration.py --seeds 0,...,7 --kl-warmup K
# --export .gpu/seeds/klK`); run as `bash bench/gpu_seeds.sh kl20 kl400` (the sets, in order).
# Each set's latents come back as one file, $OUT/klK/latents.npz (a
# lent machine returns only a few files per call); unpack it into DIR/latents/*.npy here and
# score with `python bench/integration.py --seeds ... --latents DIR`. ~25 s per seed and dataset
# on an H200 (host-bound: 128-cell minibatches).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
for k in "$@"; do
  python3 bench/train_prepared.py ".gpu/seeds/$k" --out "/tmp/lat/$k" 2>&1 | grep -v Warn | tee "$out/$k.log"
  mkdir -p "$out/$k" && cp "/tmp/lat/$k/latents.npz" "/tmp/lat/$k/runs.json" "$out/$k/"
done

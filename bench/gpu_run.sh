#!/usr/bin/env bash
# The GPU check of bench/train_throughput.py, as one script for a lent GPU machine (no network).
# Carries: .gpu/bench_cells.npz (made here by `python bench/train_throughput.py --run ours
# --data .gpu/bench_cells.npz --epochs 1`) and .whl/ (scvi-tools and the packages that machine lacks).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, scvi; print('torch', torch.__version__, 'scvi-tools', scvi.__version__)" | tee -a "$out/gpu.txt"
python3 bench/train_throughput.py --data .gpu/bench_cells.npz --device cuda --threads 16 --epochs 12 2>&1 \
  | grep -vE "Warn|warn|^\s*$" | tee "$out/gpu_bench.log"
python3 bench/train_throughput.py --run ours --dense-formula --data .gpu/bench_cells.npz --device cuda \
  --threads 16 --epochs 12 --json "$out/gpu_dense_formula.json"
tail -c 600 "$out/gpu_dense_formula.json"

#!/usr/bin/env bash
# The fused NB path against the dense formula on a lent GPU, side by side (censusvi only, no
# scvi-tools): `bench/train_throughput.py --run ours` with and without --dense-formula, alternated
# REPEATS times (default 3) on .gpu/bench_cells.npz (made here as bench/gpu_run.sh says).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
for i in $(seq "${REPEATS:-3}"); do
  for path in fused dense; do
    flag=""; [ "$path" = dense ] && flag="--dense-formula"
    python3 bench/train_throughput.py --run ours $flag --data .gpu/bench_cells.npz --device cuda \
      --threads 16 --epochs 12 --json "$out/${path}_$i.json" >/dev/null 2>&1 || echo "$path $i failed"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], round(r['train_cells_per_s']), 'train cells/s', round(r['infer_cells_per_s']), 'infer, val', round(r['val_elbo'], 2))" "$out/${path}_$i.json" "$path" "$i"
  done
done

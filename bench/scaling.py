"""Ray Train throughput with 1 vs N workers on this machine (same data, same per-worker batch size).

Data: the 20,000-cell Census-configuration set of bench/train_throughput.py (8,000 genes, 22
batches). Each configuration trains ``--epochs`` epochs through `pretrain_distributed`; throughput
is the summed per-worker cells/s of the last epoch. Last line: ``scaling 1 -> N workers: X.XX``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / ".bench" / "bench_cells.npz")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument(
        "--stream-mode",
        default="auto",
        choices=("auto", "ray_data", "memory"),
        help="ray_data: every epoch streamed through Ray Data read tasks (auto keeps the shard)",
    )
    a = p.parse_args()
    import anndata as ad
    import pandas as pd
    import ray

    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, PretrainConfig
    from censusvi.train.ray_trainer import pretrain_distributed
    from train_throughput import load, prepare

    if not a.data.exists():
        prepare(a.data, ROOT.parent / "shared" / "data", 20000, 8000, 2, seed=0)
    x, batch, _, _, _ = load(a.data)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cells.h5ad"
        obs = pd.DataFrame(
            {"batch": [f"b{b}" for b in batch]}, index=[f"c{i}" for i in range(x.shape[0])]
        )
        ad.AnnData(x, obs=obs).write_h5ad(src)
        ray.init(
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "platform")}},
            include_dashboard=False,
            log_to_driver=False,
        )
        cfg = PretrainConfig(
            DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0),
            train=TrainConfig(max_epochs=a.epochs, lr=1e-3, schedule="census"),
        )
        for n in sorted({1, a.workers}):
            _, history = pretrain_distributed(
                cfg,
                str(Path(tmp) / f"m{n}"),
                num_workers=n,
                use_gpu=a.use_gpu,
                storage_path=str(Path(tmp) / "ray"),
                stream={"mode": a.stream_mode},
            )
            rates[n] = history.epochs[-1].cells_per_s
            print(
                f"{n} worker(s): {rates[n]:,.0f} cells/s (last epoch, summed over workers)",
                flush=True,
            )
        ray.shutdown()
    print(f"scaling 1 -> {a.workers} workers: {rates[a.workers] / rates[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

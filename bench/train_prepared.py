"""Train censusvi on prepared counts and write each seed's latent: the GPU half of a seed sweep.

The lent GPU machine has torch, numpy and scipy but no anndata, Ray or scib-metrics, so
``bench/integration.py --export DIR`` writes each dataset's aligned counts, batch codes, model
config and per-seed train / validation rows (exactly what ``pretrain`` would build), this script
trains one model per seed with the model core's loop (counts resident on the device, as
``pretrain`` does on a GPU) and writes ``DIR/latents/<dataset>_seed<S>.npy`` (every cell, source
order), and ``bench/integration.py --latents DIR`` scores them beside PCA and Harmony.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from censusvi.model.config import ModelConfig  # noqa: E402
from censusvi.model.minibatch import DeviceCSR, minibatch_from_csr  # noqa: E402
from censusvi.model.vae import new_vae  # noqa: E402
from censusvi.train.loop import TrainConfig, fit  # noqa: E402


def train_seed(
    prepared: np.lib.npyio.NpzFile, seed: int, device: str, precision: str
) -> tuple[np.ndarray, dict]:
    meta = json.loads(str(prepared["meta"]))
    x = sp.csr_matrix(
        (prepared["data"], prepared["indices"], prepared["indptr"]), shape=tuple(prepared["shape"])
    )
    cov = prepared["cov"]
    train_rows, val_rows = prepared[f"train_{seed}"], prepared[f"val_{seed}"]
    cfg = TrainConfig(**{**meta["train"], "seed": seed, "device": device, "precision": precision})
    model_cfg = ModelConfig.from_dict(meta["model"])
    x_train, cov_train = x[train_rows], cov[train_rows]
    vae = new_vae(
        model_cfg,
        seed,
        len(train_rows),
        lambda rows: (x_train[rows], cov_train[rows]),
        lambda: [(x_train, cov_train[:, 0])],
    ).to(device)
    train = DeviceCSR(x[train_rows], cov[train_rows], device)
    val = DeviceCSR(x[val_rows], cov[val_rows], device) if len(val_rows) else None
    kw = {"with_counts": vae.needs_dense_counts}
    t0 = time.perf_counter()
    history = fit(
        vae,
        lambda shuffle_seed: train.minibatches(cfg.batch_size, True, shuffle_seed, **kw),
        (lambda: val.minibatches(cfg.batch_size, False, 0, **kw)) if val is not None else None,
        cfg,
    )
    seconds = time.perf_counter() - t0
    vae.eval()
    z = [
        vae.latent_mean(minibatch_from_csr(x[s : s + 4096], cov[s : s + 4096], device))
        .float()
        .cpu()
        for s in range(0, x.shape[0], 4096)
    ]
    last = history.epochs[-1]
    return torch.cat(z).numpy(), {
        "seconds": seconds,
        "epochs": len(history.epochs),
        "val_elbo": last.val_elbo,
        "train_loss": last.train_loss,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prepared", type=Path, help="the directory bench/integration.py --export wrote")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", help="fp32 (as the CPU runs), bf16 or auto")
    p.add_argument("--only", default="", help="DATASET:SEED,... to run (default: all exported)")
    p.add_argument("--out", type=Path, help="where latents go (default: PREPARED/latents)")
    a = p.parse_args()
    out = a.out or a.prepared / "latents"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for path in sorted(a.prepared.glob("*.npz")):
        prepared = np.load(path)
        for seed in json.loads(str(prepared["meta"]))["seeds"]:
            if a.only and f"{path.stem}:{seed}" not in a.only.split(","):
                continue
            z, info = train_seed(prepared, seed, a.device, a.precision)
            np.save(out / f"{path.stem}_seed{seed}.npy", z)
            runs[f"{path.stem}_seed{seed}"] = info
            print(f"{path.stem} seed {seed}: {info}", flush=True)
    # One file back from a lent machine (it returns only a few files per call).
    np.savez(out / "latents.npz", **{k: np.load(out / f"{k}.npy") for k in runs})
    (out / "runs.json").write_text(
        json.dumps({"device": a.device, "precision": a.precision, "runs": runs}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

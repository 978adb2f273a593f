"""Training and inference throughput: censusvi vs scvi-tools, same data, config, machine, one run.

Census configuration (8,000 HVGs, 2 x 128 hidden, 50 latent, NB, observed library, batch size
1024, dropout 0.1, Adam eps 0.01 / weight decay 1e-6) on >= 20,000 real cells resampled from
../shared/data with >= 20 batches. Each framework runs in its own subprocess (clean peak RSS) on
the same train/validation split; the validation ELBO of both is computed on the same held-out cells.

  python bench/train_throughput.py                 # prepare data, run both, print the table
  python bench/train_throughput.py --run ours --data .gpu/bench_cells.npz --device cuda

The ``--run ours`` path imports only torch, numpy, scipy and censusvi's model core, so it runs on
a GPU machine without anndata or scvi-tools. Each repeat runs both, one after the
other; the ratio of each pair, their spread and both frameworks' thread settings are printed, and
the last line (a contract) is the median ratio: ``training speedup vs scvi-tools: X.XX``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def prepare(out: Path, data_dir: Path, n_cells: int, n_genes: int, reps: int, seed: int) -> None:
    """Resample the shared real cells into one CSR matrix of HVGs with >= 20 batches."""
    import anndata as ad

    from censusvi.data.h5ad import H5adSource
    from censusvi.data.hvg import highly_variable_genes
    from censusvi.data.ingest import harmonise

    parts = [harmonise(f) for f in sorted(data_dir.glob("*.h5ad"))]
    pool = ad.concat(parts, join="outer", merge="first")
    pool = pool[pool.obs["nnz"].to_numpy() >= 300]  # the Census filter
    hvg = highly_variable_genes(H5adSource("pool", adata=pool), n_genes, ["assay"])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, pool.n_obs, n_cells)
    x = sp.csr_matrix(pool.X[pick][:, hvg.genes], dtype=np.float32)
    base = (pool.obs["dataset_id"].astype(str) + "|" + pool.obs["donor_id"].astype(str)).to_numpy()[
        pick
    ]
    rep = rng.integers(0, reps, n_cells)  # split each real batch into replicate batches
    batch = np.array([f"{b}|rep{r}" for b, r in zip(base, rep)])
    cats, codes = np.unique(batch, return_inverse=True)
    keep = np.diff(x.indptr) > 0
    x, codes = x[keep], codes[keep]
    perm = rng.permutation(x.shape[0])
    n_train = int(round(0.9 * x.shape[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    small = x.data.max() < 2**16 and x.shape[1] < 2**16  # uint16 + compression: fits a 64 MiB carry
    np.savez_compressed(
        out,
        indptr=x.indptr,
        indices=x.indices.astype(np.uint16 if small else np.int32),
        data=x.data.astype(np.uint16) if small else x.data,
        shape=np.array(x.shape),
        batch=codes,
        n_batches=len(cats),
        train=np.sort(perm[:n_train]),
        val=np.sort(perm[n_train:]),
    )


def load(path: Path) -> tuple[sp.csr_matrix, np.ndarray, int, np.ndarray, np.ndarray]:
    z = np.load(path)
    data, indices = z["data"].astype(np.float32), z["indices"].astype(np.int32)
    x = sp.csr_matrix((data, indices, z["indptr"]), shape=tuple(z["shape"]))
    return x, z["batch"], int(z["n_batches"]), z["train"], z["val"]


def thread_settings() -> str:
    """What decides a CPU run's parallelism, as this process has it (both frameworks report it)."""
    import torch

    env = ",".join(
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    )
    return f"torch {torch.get_num_threads()} intra / {torch.get_num_interop_threads()} inter-op" + (
        f", {env}" if env else ""
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(
    data: Path, epochs: int, lr: float, device: str, threads: int, dense_formula: bool = False
) -> dict:
    """censusvi's loop; ``dense_formula``: the same model through the dense NB formula (what
    scvi-tools computes, without its AnnData/Lightning overhead), to separate the two speed-ups."""
    import torch

    from censusvi.model.config import ModelConfig
    from censusvi.model.minibatch import minibatch_from_csr
    from censusvi.model.vae import VAE
    from censusvi.train.loop import (
        TrainConfig,
        kl_weight,
        make_optimizer,
        train_epoch,
        validation_elbo,
    )

    torch.set_num_threads(threads)
    x, batch, n_batches, train, val = load(data)
    cov = batch.reshape(-1, 1)
    torch.manual_seed(0)
    vae = VAE(ModelConfig(n_genes=x.shape[1], n_batches=n_batches)).to(device)
    # the Census recipe's batch and warm-up (the throughput rows are measured at batch 1,024)
    cfg = TrainConfig(max_epochs=epochs, lr=lr, device=device, schedule="census").resolved(
        len(train)
    )
    opt = make_optimizer(vae, cfg)
    xt, ct = x[train], cov[train]

    def batches(rows_x, rows_c, shuffle, seed):
        order = (
            np.random.default_rng(seed).permutation(rows_x.shape[0])
            if shuffle
            else np.arange(rows_x.shape[0])
        )
        for s in range(0, len(order), cfg.batch_size):
            sel = order[s : s + cfg.batch_size]
            if len(sel) >= 3:
                yield minibatch_from_csr(
                    rows_x[sel],
                    rows_c[sel],
                    device,
                    with_nonzeros=not dense_formula,
                    with_counts=dense_formula or vae.needs_dense_counts,
                )

    if device.startswith("cuda"):  # data in GPU memory, as the Census model was trained
        from censusvi.model.minibatch import DeviceCSR

        on_device = {"train": DeviceCSR(xt, ct, device), "val": DeviceCSR(x[val], cov[val], device)}
        kw = {
            "with_nonzeros": not dense_formula,
            "with_counts": dense_formula or vae.needs_dense_counts,
        }

        def batches(rows_x, rows_c, shuffle, seed):  # noqa: F811
            part = on_device["train" if rows_x is xt else "val"]
            return part.minibatches(cfg.batch_size, shuffle, seed, **kw)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    epoch_s = []
    for epoch in range(epochs):
        sync()
        t0 = time.perf_counter()
        train_epoch(
            vae, opt, batches(xt, ct, True, epoch), kl_weight(epoch, cfg.n_epochs_kl_warmup)
        )
        sync()
        epoch_s.append(time.perf_counter() - t0)
    val_elbo = validation_elbo(vae, batches(x[val], cov[val], False, 0))
    vae.eval()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, x.shape[0], 1024):
            mb = minibatch_from_csr(x[s : s + 1024], cov[s : s + 1024], device, with_nonzeros=False)
            vae.latent_mean(mb)
    sync()
    infer_s = time.perf_counter() - t0
    steady = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
    return {
        "framework": "censusvi" + (" (dense formula)" if dense_formula else ""),
        "threads": thread_settings(),
        "train_cells_per_s": len(train) / float(np.mean(steady)),
        "infer_cells_per_s": x.shape[0] / infer_s,
        "val_elbo": val_elbo,
        "peak_rss_mb": peak_rss_mb(),
        "epoch_s": epoch_s,
    }


def run_scvi(data: Path, epochs: int, lr: float, device: str, threads: int) -> dict:
    import anndata as ad
    import lightning.pytorch as pl
    import pandas as pd
    import scvi
    import torch

    torch.set_num_threads(threads)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    x, batch, n_batches, train, val = load(data)
    obs = pd.DataFrame({"batch": pd.Categorical([f"b{b}" for b in batch])})
    adata = ad.AnnData(X=x, obs=obs)
    adata.obs_names = adata.obs_names.astype(str)
    tr = adata[train].copy()
    scvi.model.SCVI.setup_anndata(tr, batch_key="batch")
    model = scvi.model.SCVI(
        tr,
        n_hidden=128,
        n_latent=50,
        n_layers=2,
        gene_likelihood="nb",
        dropout_rate=0.1,
        encode_covariates=False,
    )

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.times.append(time.perf_counter() - self.t0)

    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        batch_size=1024,
        train_size=1.0,
        early_stopping=False,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        plan_kwargs={"lr": lr, "n_epochs_kl_warmup": 20},
        callbacks=[timer],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    va = adata[val].copy()
    model.module.eval()
    val_elbo = -float(model.get_elbo(va, batch_size=1024))
    t0 = time.perf_counter()
    model.get_latent_representation(adata, batch_size=1024)
    infer_s = time.perf_counter() - t0
    steady = timer.times[1:] if len(timer.times) > 1 else timer.times
    return {
        "framework": "scvi-tools " + scvi.__version__,
        "threads": thread_settings(),
        "train_cells_per_s": len(train) / float(np.mean(steady)),
        "infer_cells_per_s": x.shape[0] / infer_s,
        "val_elbo": val_elbo,
        "peak_rss_mb": peak_rss_mb(),
        "epoch_s": timer.times,
    }


def in_subprocess(which: str, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            __file__,
            "--run",
            which,
            "--data",
            str(a.data),
            "--epochs",
            str(a.epochs),
            "--lr",
            str(a.lr),
            "--device",
            a.device,
            "--threads",
            str(a.threads),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", choices=["both", "ours", "scvi"], default="both")
    p.add_argument("--data", type=Path, default=ROOT / ".bench" / "bench_cells.npz")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=8000)
    p.add_argument("--reps", type=int, default=2, help="replicate batches per real batch")
    p.add_argument(  # at 8 the KL warm-up (20 epochs) leaves the two ELBOs 2.5 % apart
        "--epochs", type=int, default=12, help="epochs per framework (12: ELBOs comparable)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--repeats", type=int, default=3, help="scvi-tools/censusvi pairs; the median ratio is X"
    )
    p.add_argument("--json", type=Path, help="write the result here (subprocess mode)")
    p.add_argument("--dense-formula", action="store_true", help="with --run ours: dense NB path")
    a = p.parse_args()
    if not a.data.exists():
        print(f"preparing {a.data} from {a.shared} ...", flush=True)
        prepare(a.data, a.shared, a.cells, a.genes, a.reps, seed=0)
    if a.run != "both":
        if a.run == "ours":
            r = run_ours(a.data, a.epochs, a.lr, a.device, a.threads, a.dense_formula)
        else:
            r = run_scvi(a.data, a.epochs, a.lr, a.device, a.threads)
        text = json.dumps(r, indent=1)
        a.json.write_text(text) if a.json else print(text)
        if a.run == "ours" and not a.json:
            print(f"censusvi training cells/s: {r['train_cells_per_s']:.0f}")
        return 0
    x, batch, n_batches, train, val = load(a.data)
    print(
        f"data: {x.shape[0]} cells x {x.shape[1]} genes, {x.nnz / np.prod(x.shape):.1%} non-zero, "
        f"{n_batches} batches; {len(train)} train / {len(val)} val; {a.epochs} epochs, lr {a.lr}, "
        f"device {a.device}, {a.threads} threads",
        flush=True,
    )
    runs = []  # alternated, so a change in the machine's load hits both frameworks alike
    for rep in range(a.repeats):
        runs.append((in_subprocess("scvi", a), in_subprocess("ours", a)))
        theirs, ours = runs[-1]
        print(
            f"repeat {rep + 1}: scvi-tools {theirs['train_cells_per_s']:,.0f}, censusvi "
            f"{ours['train_cells_per_s']:,.0f} cells/s: "
            f"{ours['train_cells_per_s'] / theirs['train_cells_per_s']:.2f}x",
            flush=True,
        )
    print(
        f"{'framework':22s} {'train cells/s':>14s} {'infer cells/s':>14s} {'val -ELBO':>10s} "
        f"{'peak RSS MB':>12s}  threads"
    )
    for r in [r for pair in runs for r in pair]:
        print(
            f"{r['framework']:22s} {r['train_cells_per_s']:14,.0f} {r['infer_cells_per_s']:14,.0f} "
            f"{r['val_elbo']:10.2f} {r['peak_rss_mb']:12,.0f}  {r['threads']}"
        )
    ratios = [o["train_cells_per_s"] / t["train_cells_per_s"] for t, o in runs]
    infer = [o["infer_cells_per_s"] / t["infer_cells_per_s"] for t, o in runs]
    theirs, ours = runs[0]
    gap = (ours["val_elbo"] - theirs["val_elbo"]) / abs(theirs["val_elbo"])
    print(f"validation ELBO difference (ours - scvi-tools, relative): {gap:+.2%}")
    print(
        f"training speedup over {len(ratios)} repeats: min {min(ratios):.2f}, max {max(ratios):.2f}"
    )
    print(f"inference speedup vs scvi-tools: {float(np.median(infer)):.2f}")
    print(f"training speedup vs scvi-tools: {float(np.median(ratios)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Integration quality: scib-metrics total score of the censusvi latent vs PCA and Harmony.

For each shared dataset with batches and cell-type labels (CellBench: 5 technologies; PBMC:
3 10x chemistries), censusvi is pretrained as users run it (the Census architecture: 2 x 128,
50 latent, NB; all genes of the PBMC panel, the 2,000 most variable of CellBench; scvi-tools'
epoch heuristic, 400 at this size, lr 1e-3, batch 128; the Census model's 20-epoch KL warm-up,
``--kl-warmup 400`` for scvi-tools' as in ``configs/small.yaml``; a VampPrior over 5 pseudo-cells,
``pretrain --prior-components 5``, sysVI's default, or ``--prior-components 0`` for the Census
model's N(0, I)) over ``--seeds``, and scored
with scib-metrics' Benchmarker (total = 0.6 bio conservation + 0.4 batch correction, unscaled)
beside PCA of log-normalised counts of the same genes (the model's HVGs) and Harmony
(harmonypy) on that PCA, same cells. ``--export`` / ``--latents`` split a seed sweep between a
GPU machine without anndata (``bench/train_prepared.py``, ``bench/gpu_seeds.sh``) and this one.
Last line: ``scib total censusvi - best baseline (worst dataset): X.XXX``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from censusvi.data.h5ad import H5adSource  # noqa: E402
from censusvi.evaluate.scib import harmony_baseline, integration_benchmark, pca_baseline  # noqa: E402
from censusvi.inference import latent_representation  # noqa: E402
from censusvi.train.loop import TrainConfig  # noqa: E402
from censusvi.train.pretrain import (  # noqa: E402
    DataConfig,
    ModelSettings,
    PretrainConfig,
    choose_genes,
    plan_from,
    pretrain,
    split_rows,
)

DATA = ROOT.parent / "shared" / "data"
DATASETS = {  # file, HVGs (0: every gene), HVG strata
    "cellbench": ("cellbench_lung_celllines.h5ad", 2000, ("assay",)),
    "pbmc_3chem": ("pbmc_3chem_symphony_small.h5ad", 0, None),
}


def bench_config(
    path: Path,
    n_hvg: int,
    hvg_keys,
    seed: int,
    epochs: int,
    dispersion: str,
    kl_warmup: int,
    prior_components: int = 0,
) -> PretrainConfig:
    return PretrainConfig(
        DataConfig(source=str(path), batch_keys=("batch",), n_hvg=n_hvg, hvg_keys=hvg_keys),
        model=ModelSettings(dispersion=dispersion, prior_components=prior_components),
        train=TrainConfig(
            max_epochs=epochs, lr=1e-3, batch_size=128, seed=seed, n_epochs_kl_warmup=kl_warmup
        ),
    )


def export(name: str, cfg: PretrainConfig, seeds: list[int], out: Path) -> None:
    """What ``pretrain`` would train on, for ``bench/train_prepared.py`` on a machine without
    anndata: aligned counts (every cell, source order), codes, model config, each seed's split."""
    plan = plan_from(cfg)
    x, cov = plan.cells(np.arange(len(plan.source.obs))).read(np.arange(len(plan.source.obs)))
    if (np.diff(x.indptr) == 0).any():
        raise RuntimeError("cells without counts over the chosen genes; the bench expects none")
    train = {k: v for k, v in plan.cfg.train.__dict__.items() if k not in ("seed", "device")}
    meta = {"model": plan.model_cfg.to_dict(), "train": train, "seeds": seeds}
    splits = {}
    for seed in seeds:
        splits[f"train_{seed}"], splits[f"val_{seed}"] = split_rows(
            x.shape[0], cfg.train.train_fraction, seed
        )
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / f"{name}.npz",
        data=x.data.astype(np.float32),
        indices=x.indices,
        indptr=x.indptr,
        shape=np.array(x.shape),
        cov=cov,
        meta=json.dumps(meta),
        **splits,
    )


def censusvi_latent(cfg: PretrainConfig, path: Path) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = pretrain(cfg, Path(tmp) / "m", quiet=True, resume=False)
    pos, z, _ = latent_representation(model, H5adSource(path))
    if len(pos) != H5adSource(path).obs.shape[0]:
        raise RuntimeError("cells without counts were left out; the bench expects none")
    return z


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--dispersion", default="gene", help="gene (the Census model's) or gene-batch")
    p.add_argument(
        "--kl-warmup", type=int, default=20, help="KL warm-up epochs (Census 20, scvi-tools 400)"
    )
    p.add_argument(
        "--prior-components",
        type=int,
        default=5,
        help="0: N(0, I) (the Census model's); K: a VampPrior over K pseudo-cells (sysVI: 5)",
    )
    p.add_argument(
        "--export", type=Path, help="write the training inputs here for bench/train_prepared.py"
    )
    p.add_argument(
        "--latents", type=Path, help="score latents bench/train_prepared.py wrote (DIR/latents)"
    )
    p.add_argument("--show-metrics", action="store_true", help="every scIB metric, per seed")
    a = p.parse_args()
    import torch

    torch.set_num_threads(2)
    seeds = [int(s) for s in a.seeds.split(",")]
    prior = f"VampPrior K={a.prior_components}" if a.prior_components else "N(0, I) prior"
    print(f"censusvi: {prior}, KL warm-up {a.kl_warmup}, {a.epochs} epochs", flush=True)
    margins = []
    for name in a.datasets.split(","):
        file, n_hvg, hvg_keys = DATASETS[name]
        cfgs = {
            seed: bench_config(
                DATA / file,
                n_hvg,
                hvg_keys,
                seed,
                a.epochs,
                a.dispersion,
                a.kl_warmup,
                a.prior_components,
            )
            for seed in seeds
        }
        if a.export:
            export(name, cfgs[seeds[0]], seeds, a.export)
            print(f"wrote {a.export / name}.npz", flush=True)
            continue
        adata = ad.read_h5ad(DATA / file)
        source = H5adSource(DATA / file)
        genes = choose_genes(
            source, DataConfig(source=str(DATA / file), n_hvg=n_hvg, hvg_keys=hvg_keys)
        )
        columns = genes.align(source.var_keys, min_overlap=1.0).data_index
        pca = pca_baseline(adata[:, columns])  # the genes the model sees
        base = {"X_pca": pca, "Harmony": harmony_baseline(pca, adata.obs["batch"])}
        totals = {"PCA": [], "Harmony": [], "censusvi": []}
        for seed in seeds:
            z = (
                np.load(a.latents / "latents" / f"{name}_seed{seed}.npy")
                if a.latents
                else censusvi_latent(cfgs[seed], DATA / file)
            )
            table = integration_benchmark(adata, "batch", "cell_type", {**base, "censusvi": z})
            totals["censusvi"].append(table.loc["censusvi", "Total"])
            totals["PCA"].append(table.loc["X_pca", "Total"])
            totals["Harmony"].append(table.loc["Harmony", "Total"])
            print(
                f"  {name} seed {seed}: censusvi {totals['censusvi'][-1]:.3f} "
                f"(bio {table.loc['censusvi', 'Bio conservation']:.3f}, batch "
                f"{table.loc['censusvi', 'Batch correction']:.3f}), PCA {totals['PCA'][-1]:.3f}, "
                f"Harmony {totals['Harmony'][-1]:.3f}",
                flush=True,
            )
            if a.show_metrics:
                print(table.T.round(3).to_string(), flush=True)
        means = {k: float(np.mean(v)) for k, v in totals.items()}
        print(
            f"{name:12s} "
            + "  ".join(f"{k} {means[k]:.3f} ± {np.std(totals[k]):.3f}" for k in totals),
            flush=True,
        )
        margins.append(means["censusvi"] - max(means["PCA"], means["Harmony"]))
    if margins:
        print(f"scib total censusvi - best baseline (worst dataset): {min(margins):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Differential expression: censusvi vs scvi-tools' ``differential_expression(mode="change")``.

One scvi-tools SCVI (NB, 2 x 128, 10 latent) per dataset is trained by scvi-tools and used by both:
censusvi imports the same directory. Comparisons: CellBench H2228 vs the other lines (1,021 cells,
the 2,000 most-counted genes, 5 technologies as batches) and PBMC B cells vs the rest
(pbmc_3chem, 1,767 genes, 3 chemistries). Both marginalise the batch (batch_correction=True) with
the same posterior sample count. Reports Spearman of lfc_mean, overlap of the top 50 genes by
Bayes factor (ties broken by |lfc_mean|), and wall times. Last line:
``DE speedup vs scvi-tools: X.XX`` (the geometric mean over the comparisons).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from censusvi.generative.de import DEConfig, differential_expression, top_genes  # noqa: E402
from censusvi.model.io import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CASES = {
    "cellbench": ("cellbench_lung_celllines.h5ad", "cell_type", "H2228", 2000),
    "pbmc": ("pbmc_3chem_symphony_small.h5ad", "cell_type", "B", None),
}


def load_case(name: str) -> tuple[ad.AnnData, str, str]:
    file, groupby, group, n_genes = CASES[name]
    a = ad.read_h5ad(DATA / file)
    if n_genes:
        a = a[:, np.argsort(-np.asarray(a.X.sum(0)).ravel())[:n_genes]].copy()
    ids = a.var["gene_ids"].astype(object)
    a.var["gene_ids"] = np.where(ids.isna(), a.var_names, ids).astype(str)
    a.var["symbol"] = a.var_names.astype(str)
    a.var_names = a.var["gene_ids"].to_numpy()
    a.var_names_make_unique()
    return a, groupby, group


def compare(
    scvi_model, adata: ad.AnnData, ours_model, groupby: str, group: str, n_samples: int, seed: int
) -> dict:
    import scvi

    scvi.settings.seed = seed
    t0 = time.perf_counter()
    theirs = scvi_model.differential_expression(
        adata,
        groupby=groupby,
        group1=group,
        mode="change",
        delta=0.25,
        batch_correction=True,
        n_samples_overall=n_samples,
        silent=True,
    )
    scvi_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = differential_expression(
        ours_model,
        adata,
        groupby,
        group,
        batch_key="batch",
        config=DEConfig(n_samples=n_samples, seed=seed),
        quiet=True,
    )
    ours_s = time.perf_counter() - t0
    theirs = theirs.loc[ours.index]  # same genes, same order
    rho = spearmanr(ours["lfc_mean"], theirs["lfc_mean"]).statistic
    overlap = len(set(top_genes(ours).index) & set(top_genes(theirs).index)) / 50
    calls = (ours["is_de_fdr_0.05"] == theirs["is_de_fdr_0.05"]).mean()
    symbols = adata.var.loc[ours.index[:10], "symbol"].tolist()
    return {
        "spearman_lfc_mean": float(rho),
        "top50_overlap": overlap,
        "fdr_call_agreement": float(calls),
        "scvi_s": scvi_s,
        "ours_s": ours_s,
        "ours_top10": symbols,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="cellbench,pbmc")
    p.add_argument("--n-samples", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=100)
    a = p.parse_args()
    import scvi
    import torch

    torch.set_num_threads(2)
    speedups = []
    print(
        f"{'comparison':22s} {'spearman':>8s} {'top50':>6s} {'fdr=':>6s} {'scvi-tools s':>12s} "
        f"{'censusvi s':>10s} {'speedup':>8s}"
    )
    for name in a.cases.split(","):
        adata, groupby, group = load_case(name)
        scvi.settings.seed = 0
        with tempfile.TemporaryDirectory() as tmp:
            scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
            model = scvi.model.SCVI(
                adata, n_hidden=128, n_latent=10, n_layers=2, gene_likelihood="nb"
            )
            model.train(
                max_epochs=a.epochs, batch_size=256, accelerator="cpu", enable_progress_bar=False
            )
            model.save(Path(tmp) / "m", overwrite=True)
            ours = load_model(Path(tmp) / "m")
            r = compare(model, adata, ours, groupby, group, a.n_samples, seed=0)
        speedups.append(r["scvi_s"] / r["ours_s"])
        print(
            f"{name + ' ' + group + ' vs rest':22s} {r['spearman_lfc_mean']:8.3f} "
            f"{r['top50_overlap']:6.2f} {r['fdr_call_agreement']:6.3f} {r['scvi_s']:12.2f} "
            f"{r['ours_s']:10.2f} {speedups[-1]:7.2f}x   top: {', '.join(r['ours_top10'][:6])}",
            flush=True,
        )
    print(
        f"({a.n_samples} posterior draws per group, batch marginalised, scvi-tools {scvi.__version__})"
    )
    print(f"DE speedup vs scvi-tools: {float(np.exp(np.mean(np.log(speedups)))):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m censusvi.jobs.evaluate --model M --data D.h5ad --out DIR``.

Integration quality of a model on labelled data with scib-metrics: the model's latent (query
batches mapped as `censusvi map` does) against unintegrated PCA and Harmony on the same cells.
Writes `DIR/scib.csv` and `DIR/scib.json` (rows for `censusvi report --scib`), prints the table,
and, when MODEL is a `models:/` URI, logs `eval.scib.total`, `eval.scib.bio_conservation` and
`eval.scib.batch_correction` of the latent to that model version (the promotion gate compares
them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from censusvi.evaluate.scib import harmony_baseline, integration_benchmark, pca_baseline
from censusvi.numeric import json_safe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory or models:/NAME@ALIAS")
    p.add_argument("--data", required=True, help="labelled .h5ad of raw counts")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--out", required=True)
    p.add_argument("--baselines", default="pca,harmony", help="any of pca,harmony")
    p.add_argument("--max-cells", type=int, default=100_000, help="subsample above this")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import numpy as np

    from censusvi.atomic import write_atomic
    from censusvi.data.h5ad import read_h5ad
    from censusvi.mapping.query import map_query
    from censusvi.model.io import load_model

    adata = read_h5ad(a.data)
    if adata.n_obs > a.max_cells:
        rows = np.sort(
            np.random.default_rng(a.seed).choice(adata.n_obs, a.max_cells, replace=False)
        )
        adata = adata[rows].copy()
    mapped = map_query(load_model(a.model), adata, a.batch_key)
    cells = adata[mapped.positions].copy()
    embeddings = {"X_scvi": mapped.latent}
    wanted = {b.strip() for b in a.baselines.split(",") if b.strip()}
    if wanted:
        pca = pca_baseline(cells, seed=a.seed)
        embeddings["X_pca"] = pca
        if "harmony" in wanted:
            embeddings["X_harmony"] = harmony_baseline(pca, cells.obs[a.batch_key], a.seed)
    table = integration_benchmark(cells, a.batch_key, a.label_key, embeddings)
    out = Path(a.out)
    write_atomic(out / "scib.csv", table.to_csv, suffix=".csv")
    rows = [
        {"embedding": name, **{k: float(v) for k, v in row.items()}}
        for name, row in table.iterrows()
    ]
    write_atomic(
        out / "scib.json",
        lambda tmp: tmp.write_text(json.dumps(json_safe(rows), indent=1, allow_nan=False)),
    )
    print(table[["Batch correction", "Bio conservation", "Total"]].round(3).to_string())
    if a.model.startswith("models:/"):
        from censusvi.registry.versions import add_to_version

        latent = table.loc["X_scvi"]
        metrics = {
            "eval.scib.total": latent["Total"],
            "eval.scib.bio_conservation": latent["Bio conservation"],
            "eval.scib.batch_correction": latent["Batch correction"],
        }
        name, version = add_to_version(a.model, metrics)
        print(f"logged eval.scib.* to {name} version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

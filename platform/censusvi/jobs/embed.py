"""``python -m censusvi.jobs.embed --model M --data REF --label-keys cell_type --out DIR``.

Embeds every cell of a reference corpus (a SOMA experiment or an .h5ad) with Ray Data actors
holding the model (`--gpus-per-actor 1` on a GPU cluster), writes `DIR/embeddings/*.parquet`
(row, obs_id, latent, label columns), builds the FAISS index in `DIR/index/` and, when MODEL is a
`models:/` URI, logs the index to that model version (its run's `index/` artifacts, its
evaluation metrics, tag has_index=true), so `censusvi serve` can serve it. A local Ray is
started when no cluster is reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from censusvi.annotate.corpus import attach_index_to_version, embed_corpus, index_corpus
from censusvi.ray_session import init_ray


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory or models:/NAME@ALIAS")
    p.add_argument("--data", required=True, help="SOMA experiment (path or census://) or .h5ad")
    p.add_argument("--label-keys", default="cell_type", help="obs columns to carry and index")
    p.add_argument("--obs-filter", help='e.g. "is_primary_data == True and nnz >= 300"')
    p.add_argument("--out", required=True)
    p.add_argument("--shard-cells", type=int, default=50_000, help="rows per Ray Data task")
    p.add_argument("--actors", type=int, default=2, help="embedding actors")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    a = p.parse_args(argv)
    init_ray()
    keys = [k.strip() for k in a.label_keys.split(",") if k.strip()]
    out = Path(a.out)
    embeddings = embed_corpus(
        a.model, a.data, out, keys, a.obs_filter, a.shard_cells, a.actors, a.gpus_per_actor
    )
    meta = {"reference": a.data, "obs_filter": a.obs_filter, "model": a.model}
    ix = index_corpus(embeddings, keys, out / "index", meta)
    result = {
        "embeddings": str(embeddings),
        "index": str(out / "index"),
        "n_cells": ix.meta["n_cells"],
        "kind": ix.meta["kind"],
        "evaluation": ix.meta["evaluation"],
    }
    if a.model.startswith("models:/"):
        result["model_version"] = attach_index_to_version(a.model, out / "index")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

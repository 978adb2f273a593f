"""``python -m censusvi.jobs.embed --model M --data REF --label-keys cell_type --out DIR``.

Embeds every cell of a reference corpus (a SOMA experiment or an .h5ad) with Ray Data actors
holding the model (one GPU each where the cluster has GPUs; `--gpus-per-actor` to choose) and
reading only the obs columns they need, writes sharded Parquet to `DIR/embeddings/` (row,
soma_joinid, latent, label columns), builds the FAISS index (`--index-kind`, `--metric`: as
`censusvi index`; cells without a label left out) with its label heads (`--no-head` to skip),
encoder digest and out-of-reference fit, as `censusvi index` does, in `DIR/index/` as one Ray
task that reserves the memory it needs and, when
MODEL is a `models:/` URI, logs the index to that model version (its run's `index/` artifacts,
its evaluation metrics, tag has_index=true), so `censusvi serve` can serve it. DIR is a storage
URI (`s3://bucket/run`, `gs://...`, `file:///shared/run`) or a local path: on several nodes, use
storage every node reaches. A local Ray is started when no cluster is reachable.
"""

from __future__ import annotations

import argparse
import json
import sys

from censusvi import defaults
from censusvi.annotate.corpus import (
    attach_index_to_version,
    check_job_output,
    embed_corpus,
    embedded_shape,
    index_corpus,
    join_uri,
)
from censusvi.data.labels import label_keys_checked
from censusvi.numeric import is_finite
from censusvi.ray_session import init_ray
from censusvi.registry.mlflow_store import tracking_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory or models:/NAME@ALIAS")
    p.add_argument("--data", required=True, help="SOMA experiment (path or census://) or .h5ad")
    p.add_argument("--label-keys", default="cell_type", help="obs columns to carry and index")
    p.add_argument("--obs-filter", help='e.g. "is_primary_data == True and nnz >= 300"')
    p.add_argument("--out", required=True, help="storage URI (s3://, gs://, file://) or path")
    p.add_argument("--shard-cells", type=int, default=50_000, help="rows per Ray Data task")
    p.add_argument("--actors", type=int, default=2, help="embedding actors")
    p.add_argument(
        "--gpus-per-actor", type=float, help="default: 1 where the cluster has GPUs, else 0"
    )
    p.add_argument(
        "--index-kind", "--index", dest="index", choices=defaults.INDEX_KINDS,
        default=defaults.INDEX_KIND, help="FAISS index kind, as `censusvi index --index-kind`",
    )  # fmt: skip
    p.add_argument("--metric", choices=defaults.METRICS, default=defaults.METRIC)
    p.add_argument(
        "--head", action=argparse.BooleanOptionalAction, default=True,
        help="train a calibrated label head per key, as `censusvi index` (default: on)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier run's embeddings/ and index/ in --out (removed before the run)",
    )  # fmt: skip
    a = p.parse_args(argv)
    for flag, value, least in (("--shard-cells", a.shard_cells, 1), ("--actors", a.actors, 1)):
        if value < least:
            p.error(f"{flag} {value}: must be a whole number >= {least}")
    if a.gpus_per_actor is not None and not (is_finite(a.gpus_per_actor) and a.gpus_per_actor >= 0):
        p.error(f"--gpus-per-actor {a.gpus_per_actor}: must be a number >= 0")
    try:  # before Ray starts: a refused --out or key is one line, exit 2
        keys = label_keys_checked(a.label_keys.split(","))
        check_job_output(a.out, [a.model, a.data], a.overwrite)
    except ValueError as e:
        p.error(str(e))
    init_ray()
    embeddings = embed_corpus(
        a.model, a.data, a.out, keys, a.obs_filter, a.shard_cells, a.actors, a.gpus_per_actor
    )
    meta = {"reference": a.data, "obs_filter": a.obs_filter, "model": a.model}
    index_uri = join_uri(a.out, "index")
    n_cells, dim = embedded_shape(embeddings)
    reference = {"model": a.model, "source": a.data, "obs_filter": a.obs_filter,
                 "tracking_uri": tracking_uri() if a.model.startswith("models:/") else None}  # fmt: skip
    info = index_corpus(
        embeddings, keys, index_uri, meta, n_cells, dim, a.index, a.metric, a.head, reference
    )
    result = {
        "embeddings": embeddings,
        "index": index_uri,
        "n_cells": info["n_cells"],
        "kind": info["kind"],
        "metric": info["metric"],
        "evaluation": info["evaluation"],
    }
    if a.model.startswith("models:/"):
        result["model_version"] = attach_index_to_version(a.model, index_uri)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embed a whole reference corpus with Ray Data, then index it (``jobs/embed.py``).

The corpus (a SOMA experiment, or an .h5ad) is cut into contiguous row shards; a pool of actors,
each holding the model and an open source (GPU actors when asked), embeds shard after shard with
``map_batches``; the embeddings and the label columns to carry are written as Parquet. The FAISS
index is then built from the Parquet files, saved beside them, and, for a registered model, logged
to the model version so the version becomes servable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from censusvi.annotate.index import LabelIndex, build_index, save_index

log = logging.getLogger(__name__)


class ShardEmbedder:
    """A Ray Data actor: model and source opened once, then one row shard per call."""

    def __init__(
        self,
        model: str,
        source: str,
        obs_filter: str | None,
        label_keys: list[str],
        tracking_uri: str | None = None,
    ):
        import torch

        if tracking_uri:  # actors do not inherit the driver's environment
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri

        from censusvi.data.soma import open_source
        from censusvi.model.io import load_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model, self.device)
        self.source = open_source(source, obs_filter=obs_filter)
        missing = [k for k in label_keys if k not in self.source.obs.columns]
        if missing:
            raise ValueError(f"label key(s) {missing} not in {source}'s obs")
        self.label_keys = label_keys
        self.alignment = self.model.genes.align(self.source.var_keys, where=self.source.uri)
        self.codes = self.model.covariate_codes(self.source.obs, self.source.uri)

    def __call__(self, shard: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from censusvi.data.cells import Cells
        from censusvi.inference import stream_latent

        rows = np.concatenate(
            [np.arange(a, b) for a, b in zip(shard["start"], shard["stop"])]
        ).astype(np.int64)
        cells = Cells(self.source, rows, self.alignment, self.codes[rows], preload=False)
        pos, z = stream_latent(self.model, cells, device=self.device)
        kept = rows[pos]
        obs = self.source.obs.iloc[kept]
        out = {"row": kept, "obs_id": obs.index.astype(str).to_numpy(), "latent": z}
        for key in self.label_keys:
            out[key] = obs[key].astype(str).to_numpy()
        return out


def embed_corpus(
    model: str,
    source: str,
    out: str | os.PathLike,
    label_keys: list[str],
    obs_filter: str | None = None,
    shard_cells: int = 50_000,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
) -> Path:
    """Parquet embeddings (row, obs_id, latent, labels) of every cell with counts, under ``out``."""
    import ray

    from censusvi.data.soma import open_source
    from censusvi.registry.mlflow_store import tracking_uri

    n = len(open_source(source, obs_filter=obs_filter).obs)
    if n == 0:
        raise ValueError(f"{source}: no cells pass the filter {obs_filter!r}")
    starts = list(range(0, n, shard_cells))
    shards = ray.data.from_items(
        [{"start": s, "stop": min(s + shard_cells, n)} for s in starts],
        override_num_blocks=len(starts),
    )
    embedded = shards.map_batches(
        ShardEmbedder,
        batch_size=1,
        fn_constructor_kwargs={
            "model": model,
            "source": source,
            "obs_filter": obs_filter,
            "label_keys": label_keys,
            "tracking_uri": tracking_uri() if model.startswith("models:/") else None,
        },
        concurrency=max(1, min(actors, len(starts))),
        num_gpus=gpus_per_actor or None,
    )
    path = Path(out) / "embeddings"
    embedded.write_parquet(str(path))
    return path


def read_embeddings(
    path: str | os.PathLike, label_keys: list[str]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Latents and labels back from the Parquet files, in corpus row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    order = np.argsort(table.column("row").to_numpy())
    latent = table.column("latent").combine_chunks()
    if isinstance(latent, pa.ExtensionArray):  # Ray's tensor column: a list array underneath
        latent = latent.storage
    z = latent.flatten().to_numpy().reshape(len(table), -1)[order]
    labels = table.select(label_keys).to_pandas().iloc[order].reset_index(drop=True)
    return np.ascontiguousarray(z, dtype=np.float32), labels


def index_corpus(
    embeddings: str | os.PathLike, label_keys: list[str], out: str | os.PathLike, meta: dict
) -> LabelIndex:
    from censusvi.annotate.ontology import label_ontologies
    from censusvi.annotate.pipeline import holdout_evaluation

    z, labels = read_embeddings(embeddings, label_keys)
    meta = {**meta, "evaluation": holdout_evaluation(z, labels)}
    meta["ontology"] = label_ontologies(labels, label_keys)  # Census labels are CL names
    ix = build_index(z, labels, meta)
    save_index(ix, out)
    return ix


def attach_index_to_version(model_uri: str, index_dir: str | os.PathLike) -> str:
    """Log the index as ``index/`` of a registered version's run, with its evaluation: the
    version becomes servable and comparable by the promotion gate."""
    from censusvi.registry.versions import add_to_version, evaluation_metrics

    return add_to_version(model_uri, evaluation_metrics(index_dir), index_dir)[1]

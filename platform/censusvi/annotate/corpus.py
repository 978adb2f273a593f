"""Embed a whole reference corpus with Ray Data, then index it (``jobs/embed.py``).

The corpus (a SOMA experiment, or an .h5ad) is cut into contiguous row shards; a pool of actors,
each holding the model and an open source with only the obs columns it needs (GPU actors where the
cluster has GPUs), embeds shard after shard with ``map_batches``; the embeddings, ``soma_joinid``
and the label columns are written as sharded Parquet to a storage URI (``file://``, ``s3://``,
``gs://`` ..., or a local path: pyarrow's filesystems), so that on several nodes they land in one
place. The FAISS index is then built from the Parquet files by one Ray task that reserves the
memory it needs (and a GPU where there is one), saved beside them, and, for a registered model,
logged to the model version so the version becomes servable.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.annotate.index import build_index, save_index

log = logging.getLogger(__name__)


def open_reference(
    model: str,
    source: str,
    obs_filter: str | None,
    label_keys: list[str],
    tracking_uri: str | None = None,
    device: str = "cpu",
):
    """(model, source opened with only the obs columns needed), as a Ray actor or task opens
    them (``tracking_uri``: a ``models:/`` model's registry)."""
    if tracking_uri:  # actors and tasks do not inherit the driver's environment
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from censusvi.data.soma import open_source
    from censusvi.model.io import load_model

    m = load_model(model, device)
    columns = (*m.batch_keys, *m.covariate_keys, *label_keys)
    src = open_source(source, obs_filter=obs_filter, obs_columns=tuple(columns))
    missing = [k for k in label_keys if k not in src.obs.columns]
    if missing:
        raise ValueError(f"label key(s) {missing} not in {source}'s obs")
    return m, src


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

        from censusvi.model.io import UNKNOWN_BATCH_FIX_REFERENCE

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.source = open_reference(
            model, source, obs_filter, label_keys, tracking_uri, self.device
        )
        self.label_keys = label_keys
        self.alignment = self.model.genes.align(self.source.var_keys, where=self.source.uri)
        self.codes = self.model.covariate_codes(
            self.source.obs, self.source.uri, UNKNOWN_BATCH_FIX_REFERENCE
        )

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
        joinids = self.source.joinids(kept) if hasattr(self.source, "joinids") else kept
        out = {"row": kept, "soma_joinid": np.asarray(joinids, np.int64), "latent": z}
        for key in self.label_keys:
            out[key] = obs[key].astype(str).to_numpy()
        return out


def storage(uri: str | os.PathLike):
    """(pyarrow filesystem, path in it) of a storage URI or a local path."""
    from pyarrow import fs

    uri = str(uri)
    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(uri)


def join_uri(uri: str | os.PathLike, name: str) -> str:
    return f"{str(uri).rstrip('/')}/{name}"


INDEX_FILES = ("index.faiss", "labels.parquet", "index.json", "heads.safetensors")


def check_job_output(out: str, inputs: list[str], overwrite: bool = False) -> None:
    """Before any work, the embed job's ``out``: not an input nor inside one (where local), and
    no earlier run's ``embeddings/`` or ``index/`` in it unless ``overwrite``, which removes
    them (a second run appended its Parquet shards to the first's and indexed both). A folder
    holding files censusvi does not write there is never removed."""
    from pyarrow import fs as pafs

    from censusvi.atomic import check_folder, file_uri_path, uri_scheme

    scheme = uri_scheme(out)
    if scheme in (None, "file"):
        check_folder(out if scheme is None else file_uri_path(out, "--out"), "--out", inputs)
    for name, ours in (
        ("embeddings", lambda f: f.endswith(".parquet")),
        ("index", INDEX_FILES.__contains__),
    ):
        fs, path = storage(join_uri(out, name))
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            continue
        if not overwrite:
            raise ValueError(
                f"--out {out} already holds {name}/: pass --overwrite to replace an earlier "
                "run's, or choose another --out"
            )
        found = (
            fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if kind == pafs.FileType.Directory
            else []
        )  # a file of that name is not listed: it is refused below
        foreign = [f.path for f in found if f.type == pafs.FileType.File and not ours(f.base_name)]
        if kind != pafs.FileType.Directory or foreign:
            raise ValueError(
                f"--out {out}: {name} holds what censusvi does not write there "
                f"({(foreign or [path])[0]}); it is not replaced: choose another --out"
            )
        fs.delete_dir(path)


def actor_gpus(gpus_per_actor: float | None) -> float:
    """``gpus_per_actor``, or (None) one GPU per actor where the cluster has GPUs."""
    import ray

    if gpus_per_actor is not None:
        return gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def embed_corpus(
    model: str,
    source: str,
    out: str | os.PathLike,
    label_keys: list[str],
    obs_filter: str | None = None,
    shard_cells: int = 50_000,
    actors: int = 2,
    gpus_per_actor: float | None = None,
) -> str:
    """Sharded Parquet embeddings (row, soma_joinid, latent, labels) of every cell with counts,
    under ``out/embeddings`` (a storage URI or a local path); returns that URI."""
    import ray

    from censusvi.data.soma import open_source
    from censusvi.registry.mlflow_store import tracking_uri

    n = len(open_source(source, obs_filter=obs_filter, obs_columns=()).obs)
    if n == 0:
        raise ValueError(f"{source}: no cells pass the filter {obs_filter!r}")
    starts = list(range(0, n, shard_cells))
    shards = ray.data.from_items(
        [{"start": s, "stop": min(s + shard_cells, n)} for s in starts],
        override_num_blocks=len(starts),
    )
    gpus = actor_gpus(gpus_per_actor)
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
        num_gpus=gpus or None,
    )
    uri = join_uri(out, "embeddings")
    fs, path = storage(uri)
    embedded.write_parquet(path, filesystem=fs)
    return uri


def read_embeddings(
    uri: str | os.PathLike, label_keys: list[str]
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Latents, labels and corpus rows back from the Parquet files, in corpus row order (only
    the columns the index needs are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage(uri)
    table = pq.read_table(path, filesystem=fs, columns=["row", "latent", *label_keys])
    order = np.argsort(table.column("row").to_numpy())
    latent = table.column("latent").combine_chunks()
    if isinstance(latent, pa.ExtensionArray):  # Ray's tensor column: a list array underneath
        latent = latent.storage
    z = latent.flatten().to_numpy().reshape(len(table), -1)[order]
    labels = table.select(label_keys).to_pandas().iloc[order].reset_index(drop=True)
    rows = table.column("row").to_numpy()[order]
    return np.ascontiguousarray(z, dtype=np.float32), labels, rows


def embedded_shape(uri: str) -> tuple[int, int]:
    """(cells, latent dimensions) of the Parquet embeddings, from their metadata and one row."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    fs, path = storage(uri)
    data = ds.dataset(path, filesystem=fs, format="parquet")
    first = data.head(1, columns=["latent"]).column("latent").combine_chunks()
    if isinstance(first, pa.ExtensionArray):
        first = first.storage
    return data.count_rows(), len(first.flatten())


def build_corpus_index(
    embeddings: str,
    label_keys: list[str],
    out: str,
    meta: dict,
    kind: str,
    metric: str,
    head: bool = True,
    reference: dict | None = None,
) -> dict:
    """Read the embeddings, evaluate, index, train the label heads (``head``) and write the
    index directory to ``out`` (a storage URI or a local path); returns its metadata. With
    ``reference`` (``open_reference``'s arguments: the model and corpus embedded), the index
    also records the encoder digest and fits its out-of-reference detection, as ``censusvi
    index`` does (the reconstruction term reads the counts of at most ``NOVELTY_MAX_CELLS``
    held-out cells). Run as a Ray task by ``index_corpus``."""
    from censusvi.annotate.ontology import label_ontologies
    from censusvi.annotate.pipeline import fit_heads, fit_novelty, holdout_evaluation, reference_nll
    from censusvi.data.labels import labelled_rows

    z, labels, rows = read_embeddings(embeddings, label_keys)
    keep = labelled_rows(labels, embeddings)  # the Census labels some cells "unknown"
    if not keep.all():
        z, labels, rows = z[keep], labels[keep].reset_index(drop=True), rows[keep]
    meta = {**meta, "evaluation": holdout_evaluation(z, labels, kind=kind, metric=metric)}
    meta["ontology"] = label_ontologies(labels, label_keys)  # Census labels are CL names
    ix = build_index(z, labels, meta, kind=kind, metric=metric)
    if head:
        fit_heads(ix, z)
    if reference is not None:
        model, source = open_reference(**reference, label_keys=label_keys)
        ix.meta["encoder_digest"] = model.encoder_digest()
        fit_novelty(ix, z, lambda held: reference_nll(model, source, rows[held]))
    del z
    fs, path = storage(out)
    if fs.type_name == "local":
        save_index(ix, path)
    else:
        from pyarrow import fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            save_index(ix, Path(tmp) / "index")
            pafs.copy_files(str(Path(tmp) / "index"), path, destination_filesystem=fs)
    return ix.meta


def index_memory(n_cells: int, dim: int, n_keys: int) -> int:
    """Bytes the index task reserves: the latents about four times over (read, tuned, held-out
    index, the index), the labels, and 1 GiB for the interpreter, FAISS, the model and the heads."""
    return int(n_cells * (dim * 4 * 4 + 64 * n_keys) + 1024 * 2**20)


def index_corpus(
    embeddings: str,
    label_keys: list[str],
    out: str,
    meta: dict,
    n_cells: int,
    dim: int,
    kind: str = defaults.INDEX_KIND,
    metric: str = defaults.METRIC,
    head: bool = True,
    reference: dict | None = None,
) -> dict:
    """``build_corpus_index`` as a Ray task on a node with the memory it needs (and a GPU where
    the cluster has one); returns the index's metadata."""
    import ray

    memory = index_memory(n_cells, dim, len(label_keys))
    largest = max(
        (nd["Resources"].get("memory", 0) for nd in ray.nodes() if nd["Alive"]), default=0
    )
    if memory > largest:
        raise ValueError(
            f"indexing {n_cells:,} cells needs ~{memory / 2**30:.1f} GiB on one node, but the "
            f"largest Ray node offers {largest / 2**30:.1f} GiB: add a node with more memory "
            "(or give Ray more with --memory)"
        )
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(build_corpus_index).options(memory=memory, num_gpus=gpus, num_cpus=1)
    return ray.get(task.remote(embeddings, label_keys, out, meta, kind, metric, head, reference))


def local_copy(uri: str, tmp: str | os.PathLike) -> Path:
    """A local directory holding what ``uri`` holds (itself where it is local)."""
    fs, path = storage(uri)
    if fs.type_name == "local":
        return Path(path)
    from pyarrow import fs as pafs

    pafs.copy_files(path, str(Path(tmp) / "copy"), source_filesystem=fs)
    return Path(tmp) / "copy"


def attach_index_to_version(model_uri: str, index_dir: str | os.PathLike) -> str:
    """Log the index (a local directory or storage URI) as ``index/`` of a registered version's
    run, with its evaluation: the version becomes servable and comparable by the promotion gate."""
    from censusvi.registry.versions import add_to_version, evaluation_metrics

    with tempfile.TemporaryDirectory() as tmp:
        local = local_copy(str(index_dir), tmp)
        return add_to_version(model_uri, evaluation_metrics(local), local)[1]

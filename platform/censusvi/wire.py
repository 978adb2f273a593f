"""What travels over HTTP between ``censusvi.client`` and the Serve app: query cells in, results out.

Requests: an ``.h5ad`` (raw body or a multipart ``file`` field; batches from an obs column), JSON
``{"genes", "indptr", "indices", "data", "batch"}`` (CSR, one batch label per cell or one for
all), or an Arrow IPC stream with one row per cell (``indices``, ``data``, ``batch``) and the gene
ids in the schema metadata. Answers: JSON, or Arrow when the request accepts ``ARROW``. Every
malformed payload raises ``PayloadError`` with what was wrong and how to fix it (HTTP 422).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from censusvi.data.counts import check_counts

ARROW = "application/vnd.apache.arrow.stream"
JSON = "application/json"
H5AD = "application/x-hdf5"
META_KEY = b"censusvi"
ANSWER_FIELDS = (
    "model",
    "n_cells",
    "report",
    "result_id",
    "explorer",
)  # beside the per-cell arrays


class PayloadError(ValueError):
    """The request body cannot be read as query cells; the message says why."""


@dataclass
class QueryCells:
    """Raw counts of the query's cells over its own genes, with a batch label per cell."""

    x: sp.csr_matrix
    genes: list[str]  # Ensembl ids (symbols are accepted: the model falls back to them)
    batch: np.ndarray

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]

    def to_anndata(self, batch_key: str = "batch"):
        import anndata as ad
        import pandas as pd

        obs = pd.DataFrame({batch_key: self.batch}, index=[str(i) for i in range(self.n_cells)])
        var = pd.DataFrame(index=pd.Index(self.genes, dtype=str))
        return ad.AnnData(self.x, obs=obs, var=var)


def _checked(x: sp.csr_matrix, genes: list[str], batch) -> QueryCells:
    n, g = x.shape
    if len(genes) != g:
        raise PayloadError(f"{len(genes)} gene ids for a matrix with {g} columns")
    if len(set(genes)) != len(genes):
        raise PayloadError("gene ids repeat: each column needs its own gene id")
    batch = np.asarray([batch] * n if isinstance(batch, str) else batch, dtype=object)
    if batch.shape != (n,):
        raise PayloadError(
            f"batch: {len(batch)} labels for {n} cells; send one label per cell (or one string for all)"
        )
    if n == 0:
        raise PayloadError("the request holds no cells")
    x = x.astype(np.float32)
    check_counts(x, "request")
    return QueryCells(x, [str(v) for v in genes], batch.astype(str))


def decode_json(body: bytes) -> QueryCells:
    try:
        d = json.loads(body)
        genes, batch = d["genes"], d["batch"]
        indptr = np.asarray(d["indptr"], dtype=np.int64)
        x = sp.csr_matrix(
            (
                np.asarray(d["data"], dtype=np.float64),
                np.asarray(d["indices"], dtype=np.int64),
                indptr,
            ),
            shape=(len(indptr) - 1, len(genes)),
        )
    except json.JSONDecodeError as e:
        raise PayloadError(f"the body is not JSON ({e})") from e
    except KeyError as e:
        raise PayloadError(
            f"JSON body lacks {e.args[0]!r}: send genes, indptr, indices, data, batch"
        ) from e
    except (TypeError, ValueError) as e:
        raise PayloadError(f"the JSON CSR matrix is malformed: {e}") from e
    return _checked(x, genes, batch)


def encode_arrow_request(x: sp.csr_matrix, genes: list[str], batch) -> bytes:
    x = sp.csr_matrix(x)
    offsets = pa.array(x.indptr.astype(np.int32))
    table = pa.table(
        {
            "indices": pa.ListArray.from_arrays(offsets, pa.array(x.indices.astype(np.int32))),
            "data": pa.ListArray.from_arrays(offsets, pa.array(x.data.astype(np.float32))),
            "batch": pa.array(np.asarray(batch).astype(str)),
        }
    ).replace_schema_metadata({b"genes": json.dumps(list(map(str, genes)))})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def decode_arrow(body: bytes) -> QueryCells:
    try:
        table = pa.ipc.open_stream(body).read_all()
        genes = json.loads((table.schema.metadata or {})[b"genes"])
        indices = table.column("indices").combine_chunks()
        data = table.column("data").combine_chunks()
        batch = table.column("batch").to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise PayloadError(f"the body is not an Arrow IPC stream ({e})") from e
    except KeyError as e:
        raise PayloadError(
            f"the Arrow table lacks {e.args[0]!r}: columns indices, data, batch and the gene ids "
            "in schema metadata 'genes'"
        ) from e
    indptr = np.asarray(indices.offsets, dtype=np.int64)
    x = sp.csr_matrix(
        (data.values.to_numpy(), indices.values.to_numpy(), indptr),
        shape=(len(table), len(genes)),
    )
    return _checked(x, genes, batch)


def decode_h5ad(body: bytes, batch_key: str | None, layer: str | None = None) -> QueryCells:
    """An uploaded .h5ad (HDF5: no code runs on reading); ``batch_key`` names its batch column."""
    import anndata as ad

    from censusvi.data.h5ad import counts_matrix, gene_ids_and_symbols

    try:
        adata = ad.read_h5ad(io.BytesIO(body))
    except Exception as e:  # h5py/anndata raise many kinds for a damaged file
        raise PayloadError(
            f"the upload is not a readable .h5ad file ({type(e).__name__}: {e})"
        ) from e
    if not batch_key:
        raise PayloadError("an .h5ad upload needs ?batch_key=COLUMN naming its batch column in obs")
    if batch_key not in adata.obs.columns:
        raise PayloadError(
            f"batch_key {batch_key!r} is not an obs column; obs has {sorted(adata.obs.columns)}"
        )
    ids, _ = gene_ids_and_symbols(adata.var)
    x = sp.csr_matrix(counts_matrix(adata, layer))
    return _checked(x, ids, adata.obs[batch_key].astype(str).to_numpy())


def decode_request(
    body: bytes, content_type: str, batch_key: str | None = None, layer: str | None = None
) -> QueryCells:
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == JSON:
        return decode_json(body)
    if kind == ARROW:
        return decode_arrow(body)
    if kind in (H5AD, "application/octet-stream"):
        return decode_h5ad(body, batch_key, layer)
    raise PayloadError(
        f"unsupported content type {content_type!r}: send {JSON}, {ARROW}, {H5AD} "
        "or a multipart upload with an .h5ad 'file' field"
    )


# --- answers -----------------------------------------------------------------------------------


def encode_result(result: dict[str, Any], arrow: bool) -> tuple[bytes, str]:
    """``result``: model, n_cells, positions, latent, nll_per_count, labels {key: frame}, report."""
    if not arrow:
        out = {
            **{k: result[k] for k in ANSWER_FIELDS if k in result},
            "positions": np.asarray(result["positions"]).tolist(),
            "latent": np.asarray(result["latent"]).tolist(),
            "nll_per_count": np.asarray(result["nll_per_count"]).tolist(),
            "labels": {
                key: {col: frame[col].tolist() for col in frame.columns}
                for key, frame in result.get("labels", {}).items()
            },
        }
        return json.dumps(out).encode(), JSON
    latent = np.asarray(result["latent"], dtype=np.float32)
    cols: dict[str, pa.Array] = {
        "position": pa.array(np.asarray(result["positions"], dtype=np.int64)),
        "latent": pa.FixedSizeListArray.from_arrays(pa.array(latent.ravel()), latent.shape[1]),
        "nll_per_count": pa.array(np.asarray(result["nll_per_count"], dtype=np.float64)),
    }
    for key, frame in result.get("labels", {}).items():
        cols[f"predicted_{key}"] = pa.array(frame["predicted"].astype(str).to_numpy())
        cols[f"{key}_probability"] = pa.array(frame["probability"].to_numpy(np.float64))
        cols[f"{key}_uncertainty"] = pa.array(frame["uncertainty"].to_numpy(np.float64))
    meta = {k: result[k] for k in ANSWER_FIELDS if k in result}
    meta["label_keys"] = list(result.get("labels", {}))
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue(), ARROW


def decode_result(body: bytes, content_type: str) -> dict[str, Any]:
    """The answer as numpy arrays: positions, latent, nll_per_count, labels {key: {col: array}}."""
    import pandas as pd

    if (content_type or "").startswith(ARROW):
        table = pa.ipc.open_stream(body).read_all()
        meta = json.loads(table.schema.metadata[META_KEY])
        latent = table.column("latent").combine_chunks()
        dim = latent.type.list_size
        out = {
            **meta,
            "positions": table.column("position").to_numpy(),
            "latent": latent.values.to_numpy().reshape(-1, dim)
            if len(table)
            else np.zeros((0, dim)),
            "nll_per_count": table.column("nll_per_count").to_numpy(),
            "labels": {
                key: pd.DataFrame(
                    {
                        "predicted": table.column(f"predicted_{key}").to_numpy(
                            zero_copy_only=False
                        ),
                        "probability": table.column(f"{key}_probability").to_numpy(),
                        "uncertainty": table.column(f"{key}_uncertainty").to_numpy(),
                    }
                )
                for key in meta.get("label_keys", [])
            },
        }
        return out
    d = json.loads(body)
    d["positions"] = np.asarray(d["positions"], dtype=np.int64)
    d["latent"] = np.asarray(d["latent"], dtype=np.float32)
    d["nll_per_count"] = np.asarray(d["nll_per_count"], dtype=np.float64)
    d["labels"] = {key: pd.DataFrame(cols) for key, cols in d.get("labels", {}).items()}
    return d

"""What travels over HTTP between ``censusvi.client`` and the Serve app: query cells in, results out.

Requests: an ``.h5ad`` (raw body or a multipart ``file`` field; batches from an obs column), JSON
``{"genes", "indptr", "indices", "data", "batch"}`` (CSR, one batch label per cell or one for
all; optionally ``"symbols"``, one per gene), or an Arrow IPC stream with one row per cell
(``indices``, ``data``, ``batch``) and the gene ids (and optionally symbols) in the schema
metadata. The model's genes are matched by whichever of the two names matches more of them. Answers: JSON, or Arrow when the request accepts ``ARROW``. Every
malformed payload raises ``PayloadError`` with what was wrong and how to fix it (HTTP 422).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from censusvi.data.counts import CountsError, check_counts, checked_csr, to_csr32
from censusvi.data.vocabulary import SYMBOL_COLUMNS
from censusvi.outputs import TEXT_ANSWERS, answer_columns
from censusvi.typed import shown
from censusvi.untrusted import (
    DecodeLimits,
    PayloadError,
    PayloadTooLarge,  # noqa: F401  (re-exported: the server answers it with 413)
    check_arrow,
    check_hdf5,
)

ARROW = "application/vnd.apache.arrow.stream"
JSON = "application/json"
H5AD = "application/x-hdf5"
META_KEY = b"censusvi"
NO_LIMITS = DecodeLimits()  # the defaults; the server passes its own
ANSWER_FIELDS = (
    "model",
    "n_cells",
    "report",
    "result_id",
    "explorer",
    "method",  # the label transfer method that answered
)  # beside the per-cell arrays


@dataclass
class QueryCells:
    """Raw counts of the query's cells over its own genes, with a batch label per cell."""

    x: sp.csr_matrix
    genes: list[str]  # gene ids or symbols: whichever the model knows its genes by
    batch: np.ndarray
    symbols: list[str] | None = None  # a second name per gene (symbols beside ids), optional

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]

    def to_anndata(self, batch_key: str = "batch"):
        import anndata as ad
        import pandas as pd

        obs = pd.DataFrame({batch_key: self.batch}, index=[str(i) for i in range(self.n_cells)])
        var = pd.DataFrame(index=pd.Index(self.genes, dtype=str))
        if self.symbols is not None:
            var[SYMBOL_COLUMNS[0]] = self.symbols
        return ad.AnnData(self.x, obs=obs, var=var)


def all_strings(values) -> bool:
    """Whether every value is a ``str`` (the types collected in one C pass, then checked)."""
    return all(issubclass(t, str) for t in set(map(type, values)))


MAX_NAME_CHARS = 1000  # a batch label, gene id or symbol; a batch is dataset+assay+...: < 200


def _checked(parts: tuple, genes, batch, limits: DecodeLimits, symbols=None) -> QueryCells:
    """Query cells from CSR ``parts`` (data, indices, indptr) over ``genes``, checked in full:
    every label and gene name a string, the structure sound, the values raw counts."""
    data, indices, indptr = parts
    if not isinstance(genes, list) or not all_strings(genes):
        raise PayloadError("genes must be a list of gene id strings")
    if symbols is not None and (
        not isinstance(symbols, list) or not all_strings(symbols) or len(symbols) != len(genes)
    ):
        raise PayloadError(
            f"symbols must be a list of {len(genes)} strings, one per gene ('' where unknown)"
        )
    n = len(indptr) - 1
    if n <= 0:
        raise PayloadError("the request holds no cells: send at least one cell")
    limits.cells(n)
    if isinstance(batch, str):
        batch = [batch] * n
    if not isinstance(batch, list | np.ndarray) or len(batch) != n:
        got = len(batch) if isinstance(batch, list | np.ndarray) else type(batch).__name__
        raise PayloadError(
            f"batch: {got} labels for {n} cells; send one label per cell (or one string for all)"
        )
    if not all_strings(batch):
        raise PayloadError("batch labels must be strings")
    for what, names in (("batch label", batch), ("gene id", genes), ("gene symbol", symbols)):
        if names is not None and len(names) and max(map(len, names)) > MAX_NAME_CHARS:
            raise PayloadError(  # each name becomes a fixed-width array entry as long as the longest
                f"a {what} is longer than {MAX_NAME_CHARS} characters: send the names themselves"
            )
    if not all(genes):
        raise PayloadError("gene ids must be non-empty strings: give every column its gene id")
    try:  # repeated names are refused where genes are aligned, in the names that matched
        x = checked_csr(data, indices, indptr, (n, len(genes)), "request")
        check_counts(x, "request")
    except ValueError as e:  # CountsError
        raise PayloadError(over_http(str(e))) from None
    return QueryCells(x, list(genes), np.asarray(batch, dtype=str), symbols)


def over_http(message: str) -> str:
    """A shared error's advice in the words of a request: the command line's ``--layer X`` is
    an upload's ``?layer=X``."""
    return re.sub(r"--layer (?!to )(\S+)", r"?layer=\1", message).replace("--layer", "?layer=")


def _numbers(values, dtype, name: str) -> np.ndarray:
    """A flat JSON list of numbers as an array. The element types are checked first, in one
    pass: a string or a boolean is refused, not read as a number (nor built into a
    fixed-width string array, which a list of one long string and many short ones makes
    huge); a fraction is refused where a whole number is meant (3.0 is 3)."""
    if not isinstance(values, list):
        raise PayloadError(f"{name} must be a list of numbers")
    whole = np.issubdtype(dtype, np.integer)
    kinds = set(map(type, values))
    if not kinds <= {int, float}:
        odd = next(v for v in values if type(v) not in (int, float))
        raise PayloadError(f"{name} must be a flat list of numbers, got {shown(odd)}")
    try:
        a = np.asarray(values, dtype=np.float64 if float in kinds else dtype)
    except OverflowError:
        raise PayloadError(f"{name} holds a number too large for a count or an index") from None
    if whole and float in kinds:
        if not (ok := np.isfinite(a) & (a == np.floor(a))).all():
            raise PayloadError(f"{name} must hold whole numbers, got {float(a[~ok][0])!r}")
        if a.size and np.abs(a).max() >= 2**63:
            raise PayloadError(f"{name} holds a number too large for an index")
    return a.astype(dtype, copy=False)


def decode_json(body: bytes, limits: DecodeLimits = NO_LIMITS) -> QueryCells:
    try:
        d = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PayloadError(f"the body is not JSON ({e})") from None
    except RecursionError:
        raise PayloadError("the JSON body nests too deeply: send a flat CSR object") from None
    if not isinstance(d, dict):
        raise PayloadError("the JSON body must be an object: genes, indptr, indices, data, batch")
    missing = [k for k in ("genes", "indptr", "indices", "data", "batch") if k not in d]
    if missing:
        raise PayloadError(
            f"JSON body lacks {missing[0]!r}: send genes, indptr, indices, data, batch"
        )
    parts = (
        _numbers(d["data"], np.float64, "data"),
        _numbers(d["indices"], np.int64, "indices"),
        _numbers(d["indptr"], np.int64, "indptr"),
    )
    return _checked(parts, d["genes"], d["batch"], limits, d.get("symbols"))


def encode_arrow_request(x: sp.csr_matrix, genes: list[str], batch, symbols=None) -> bytes:
    x = sp.csr_matrix(x)
    offsets = pa.array(x.indptr.astype(np.int32))
    table = pa.table(
        {
            "indices": pa.ListArray.from_arrays(offsets, pa.array(x.indices.astype(np.int32))),
            "data": pa.ListArray.from_arrays(offsets, pa.array(x.data.astype(np.float32))),
            "batch": pa.array(np.asarray(batch).astype(str)),
        }
    ).replace_schema_metadata(
        {b"genes": json.dumps(list(map(str, genes)))}
        | ({b"symbols": json.dumps(list(map(str, symbols)))} if symbols is not None else {})
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _list_column(table, name: str, kind) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list<kind> column, chunks joined, slices honoured."""
    import pyarrow.types as pt

    col = table.column(name)
    if not (pt.is_list(col.type) or pt.is_large_list(col.type)) or not kind(col.type.value_type):
        raise PayloadError(f"Arrow column {name!r} must be a list of numbers, one list per cell")
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count:
        raise PayloadError(f"Arrow column {name!r} holds nulls: send an empty list for no counts")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = arr.flatten()
    if values.null_count:
        raise PayloadError(f"Arrow column {name!r} holds null values")
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


ARROW_COLUMNS = ("indices", "data", "batch")


def decode_arrow(body: bytes, limits: DecodeLimits = NO_LIMITS) -> QueryCells:
    import pyarrow.types as pt

    check_arrow(body, limits)
    try:
        table = pa.ipc.open_stream(body).read_all()
        table.validate(full=True)  # IPC reading trusts offsets; a forged one aborts the process
        meta = table.schema.metadata or {}
        if missing := [c for c in ARROW_COLUMNS if c not in table.column_names]:
            raise PayloadError(
                f"the Arrow table lacks column(s) {missing}: it needs {list(ARROW_COLUMNS)}, one "
                f"row per cell (it has {table.column_names[:10]})"
            )
        genes = json.loads(meta[b"genes"])
        symbols = json.loads(meta[b"symbols"]) if b"symbols" in meta else None
        ind_off, indices = _list_column(table, "indices", pt.is_integer)
        data_off, data = _list_column(
            table, "data", lambda t: pt.is_integer(t) or pt.is_floating(t)
        )
        batch = table.column("batch")
        if not (pt.is_string(batch.type) or pt.is_large_string(batch.type)):
            raise PayloadError("Arrow column 'batch' must hold strings, one label per cell")
        if batch.null_count:
            raise PayloadError("Arrow column 'batch' holds nulls: give every cell a label")
        batch = batch.to_numpy(zero_copy_only=False)
    except (pa.ArrowException, OSError) as e:  # every Arrow error: Invalid, NotImplemented, ...
        raise PayloadError(f"the body is not an Arrow IPC stream ({e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise PayloadError(
            "schema metadata 'genes' (and 'symbols') must be JSON lists of strings"
        ) from None
    except KeyError:  # the one key read from a dict: the schema metadata's
        raise PayloadError(
            "the Arrow schema's metadata lacks 'genes': a JSON list of the gene ids, one per "
            "column index (censusvi.wire.encode_arrow_request writes it)"
        ) from None
    if not np.array_equal(ind_off, data_off):
        raise PayloadError("Arrow columns 'indices' and 'data' differ in list lengths: pair them")
    return _checked((data, indices, ind_off), genes, batch, limits, symbols)


def decode_h5ad(
    body: bytes,
    batch_key: str | None,
    layer: str | None = None,
    limits: DecodeLimits = NO_LIMITS,
) -> QueryCells:
    """An uploaded .h5ad (HDF5: no code runs on reading); ``batch_key`` names its batch column.
    Sized and checked for links outside the file before anndata reads it."""
    import anndata as ad

    from censusvi.data.h5ad import counts_matrix, gene_ids_and_symbols
    from censusvi.data.source import check_batch_given

    if not batch_key:
        raise PayloadError("an .h5ad upload needs ?batch_key=COLUMN naming its batch column in obs")
    check_hdf5(body, limits)
    try:
        adata = ad.read_h5ad(io.BytesIO(body))
        ids, symbols = gene_ids_and_symbols(adata.var)
        try:
            x = counts_matrix(adata, layer)
        except ValueError as e:  # the file is fine; the ?layer= is not
            raise PayloadError(f"?layer={layer}: {over_http(str(e))}") from None
        if batch_key not in adata.obs.columns:
            raise PayloadError(
                f"batch_key {batch_key!r} is not an obs column; obs has {sorted(map(str, adata.obs.columns))}"
            )
        try:
            check_batch_given(adata.obs, batch_key, "cells")
        except ValueError as e:
            raise PayloadError(str(e)) from None
        batch = adata.obs[batch_key].astype(str).to_numpy()
    except PayloadError:
        raise
    except Exception as e:  # h5py/anndata raise many kinds for a damaged file
        raise PayloadError(
            f"the upload is not a readable .h5ad file ({type(e).__name__}: {e})"
        ) from e
    try:  # CSC is checked before scipy converts it: tocsr writes through unchecked indices
        x = to_csr32(x, "request")
    except CountsError as e:
        raise PayloadError(str(e)) from None
    return _checked((x.data, x.indices, x.indptr), list(ids), list(batch), limits, symbols)


def decode_request(
    body: bytes,
    content_type: str,
    batch_key: str | None = None,
    layer: str | None = None,
    limits: DecodeLimits = NO_LIMITS,
) -> QueryCells:
    kind = (content_type or "").split(";")[0].strip().lower()
    decoders = {
        JSON: lambda: decode_json(body, limits),
        ARROW: lambda: decode_arrow(body, limits),
        H5AD: lambda: decode_h5ad(body, batch_key, layer, limits),
        "application/octet-stream": lambda: decode_h5ad(body, batch_key, layer, limits),
    }
    if kind in decoders:
        try:
            return decoders[kind]()
        except PayloadError:
            raise
        except Exception as e:  # a library's own error for a body no check above foresaw
            raise PayloadError(
                f"the {kind} body cannot be decoded ({type(e).__name__}: {e})"
            ) from e
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
        for col, name in answer_columns(key).items():
            if col in frame:
                text = col in TEXT_ANSWERS
                values = frame[col].astype(str) if text else frame[col].astype(np.float64)
                cols[name] = pa.array(values.to_numpy())
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
                        col: table.column(name).to_numpy(zero_copy_only=False)
                        for col, name in answer_columns(key).items()
                        if name in table.column_names
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

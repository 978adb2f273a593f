"""TileDB-SOMA experiments as a cell source: a local experiment (``censusvi ingest`` writes one,
``data.ingest``) or a Census URI, read with the CELLxGENE Census schema.

Schema (as the Census): measurement ``RNA``, X layer ``raw``; obs columns dataset_id, assay,
suspension_type, donor_id, cell_type, tissue, is_primary_data, nnz, raw_sum; var feature_id
(Ensembl id), feature_name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from censusvi.data.counts import check_csr
from censusvi.data.obs_filter import MAX_CHARS
from censusvi.data.vocabulary import var_column_key
from censusvi.defaults import IN_MEMORY
from censusvi.typed import shown

log = logging.getLogger(__name__)

MEASUREMENT = "RNA"
X_LAYER = "raw"
# TileDB's memory budget for count reads: 64 MiB (default 10 GiB) bounds the tiles it holds while
# decoding; on two cores that read faster (8,192 random cells in 256-cell chunks: 19.5-21.5k vs
# 15.4-16.3k cells/s) and peaked 0.2 GiB lower per reading process. Smaller initial result
# buffers (soma.init_buffer_bytes) as well left freed memory fragmented: RSS stayed high.
X_READ_CONFIG = {"sm.mem.total_budget": str(64 << 20)}
# obs reads: TileDB's default budget let a 20 M-cell obs read (five columns and a filter) peak
# at 3.5-3.7 GiB whatever the batch size; 256 MiB held it at 2.0 GiB and read twice as fast.
OBS_READ_CONFIG = {"sm.mem.total_budget": str(256 << 20), "soma.init_buffer_bytes": 64 << 20}
# TileDB installs its own SIGINT handler with a context's first query unless told not to: Ctrl-C
# then ended `ingest` in a segmentation fault, its half-built experiment left behind, instead of
# Python's KeyboardInterrupt (which removes it). Every context censusvi makes carries this.
NO_SIGNAL_HANDLERS = {"sm.enable_signal_handlers": "false"}
CENSUS_FILTER = "is_primary_data == True and nnz >= 300"  # the Census scVI model's cells
CENSUS_URI_PREFIX = "census://"


def soma_context():
    """The TileDB-SOMA context of every experiment censusvi opens or writes."""
    import tiledbsoma

    _python_keeps_sigint()
    return tiledbsoma.SOMATileDBContext(tiledb_config=NO_SIGNAL_HANDLERS)


_SIGINT_RESTORED: list[bool] = []  # once per process, from the main thread


def _python_keeps_sigint() -> None:
    """tiledbsoma opens some objects with its own default context (``from_anndata`` asks
    ``Experiment.exists`` without ours), whose TileDB installs its SIGINT handler; that context is
    built once per process: build it now, then give SIGINT back to Python. Only the main thread
    can set a handler: a first call from another (a Ray worker's) leaves it for a later one."""
    import signal
    import threading

    import tiledbsoma

    if _SIGINT_RESTORED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)
    tiledbsoma.SOMATileDBContext().native_context  # noqa: B018  (cached by tiledbsoma)
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
    _SIGINT_RESTORED.append(True)


def open_experiment(uri: str):
    """A SOMA experiment from a local path/URI, or ``census://VERSION`` via cellxgene_census."""
    import tiledbsoma

    if uri.startswith(CENSUS_URI_PREFIX):
        try:
            import cellxgene_census
        except ImportError as e:
            raise ValueError("census:// sources need `pip install cellxgene-census`") from e
        version = uri.removeprefix(CENSUS_URI_PREFIX) or "stable"
        context = cellxgene_census.get_default_soma_context(NO_SIGNAL_HANDLERS)
        census = cellxgene_census.open_soma(census_version=version, context=context)
        return census["census_data"]["homo_sapiens"]
    if "://" not in uri and not Path(uri).exists():
        raise FileNotFoundError(
            f"{uri}: no such SOMA experiment (build one with `censusvi ingest`)"
        )
    try:
        return tiledbsoma.Experiment.open(uri, context=soma_context())
    except Exception as e:
        raise ValueError(f"cannot open {uri} as a SOMA experiment ({type(e).__name__}: {e})") from e


class SomaX:
    """The count matrix of a SOMA experiment, read by cell joinid. Opening it reads var only,
    not obs: what a read task on another process needs (obs is gigabytes at Census scale)."""

    def __init__(self, uri: str, x_layer: str = X_LAYER) -> None:
        self.uri = str(uri)
        self.exp = open_experiment(self.uri)
        ms = self.exp.ms[MEASUREMENT]
        var = ms.var.read().concat().to_pandas().sort_values("soma_joinid")
        self.var = var
        self._var_joinids = var["soma_joinid"].to_numpy()
        n_var = len(self._var_joinids)
        # var joinids 0..n-1 (the Census's) need no lookup: a column is its joinid
        self._col_of: np.ndarray | None = None
        self._identity = np.array_equal(self._var_joinids, np.arange(n_var))
        top = int(self._var_joinids.max()) + 1 if n_var else 0
        if not self._identity and top <= 4 * n_var + 2**20:
            self._col_of = np.full(top, -1, dtype=np.int32)  # a lookup table, when it is small
            self._col_of[self._var_joinids] = np.arange(n_var, dtype=np.int32)
        if x_layer not in ms.X:
            raise ValueError(
                f"{uri}: X layer {x_layer!r} not in the experiment; it has {sorted(ms.X.keys())}. "
                f"Pass one of those with --layer (censusvi ingest writes {X_LAYER!r})"
            )
        x = ms.X[x_layer]
        self._x = type(x).open(x.uri, context=x.context.replace(tiledb_config=X_READ_CONFIG))

    def read(self, jid: np.ndarray) -> sp.csr_matrix:
        """CSR of the cells ``jid`` (sorted joinids) over every gene, in var joinid order.

        Every gene: var coordinates for a model's 8,000 genes made TileDB read 3.8x slower
        (bench/RESULTS.md); the caller drops the other genes right after the read.

        Built in few passes over the entries (this runs on every training read): TileDB returns
        each cell's entries as one run, in joinid order, so the row pointers are where each
        joinid's run starts; all index arrays are int32 so scipy need not scan them."""
        tbl = self._x.read(coords=(pa.array(jid),)).tables().concat()
        d0 = tbl["soma_dim_0"].to_numpy()
        d1 = tbl["soma_dim_1"].to_numpy()
        v = tbl["soma_data"].to_numpy().astype(np.float32, copy=False)
        if len(d0) > 1 and not np.all(d0[1:] >= d0[:-1]):  # rows split over fragments
            order = np.argsort(d0, kind="stable")
            d0, d1, v = d0[order], d1[order], v[order]
        cols = self._columns(d1)
        indptr = np.empty(len(jid) + 1, dtype=np.int32 if len(d0) < 2**31 else np.int64)
        indptr[:-1] = np.searchsorted(d0, jid)
        indptr[-1] = len(d0)
        shape = (len(jid), len(self._var_joinids))
        # A few linear passes: an experiment whose X reaches past its var would otherwise
        # write out of bounds when a minibatch is densified.
        check_csr(v, cols, indptr, shape, f"{self.uri} (X)")
        return sp.csr_matrix((v, cols, indptr), shape=shape)

    def _columns(self, d1: np.ndarray) -> np.ndarray:
        """Each entry's column (its gene's place in var), -1 for a joinid var lacks (refused
        by ``check_csr``); sparse joinids (one of 2^40) are looked up, not tabled."""
        ids, n = self._var_joinids, len(self._var_joinids)
        if self._identity:
            return d1.astype(np.int32)
        if self._col_of is not None:
            inside = (d1 >= 0) & (d1 < len(self._col_of))
            return np.where(inside, self._col_of[np.where(inside, d1, 0)], -1).astype(np.int32)
        pos = np.minimum(np.searchsorted(ids, d1), max(n - 1, 0))
        return np.where(ids[pos] == d1, pos, -1).astype(np.int32)


def gene_names(var: pd.DataFrame, uri: str) -> tuple[list[str], list[str]]:
    """(ids, symbols) of var's genes from ``feature_id`` and ``feature_name`` (the Census's);
    a missing one (null, or the whole column) is "", a gene that key does not name."""
    if "feature_id" not in var and "feature_name" not in var:
        raise ValueError(
            f"{uri}: var has neither 'feature_id' nor 'feature_name' (it has "
            f"{sorted(c for c in var.columns if c != 'soma_joinid')}); write the experiment with "
            "`censusvi ingest`, which names each gene by both"
        )

    def texts(column: str) -> list[str]:
        if column not in var:
            return [""] * len(var)
        values = var[column]
        return values.astype(str).where(values.notna(), "").tolist()

    return texts("feature_id"), texts("feature_name")


def read_obs(obs, obs_filter: str | None, columns: list[str] | None) -> pd.DataFrame:
    """obs as pandas, string columns categorical, built one TileDB batch at a time: Census obs
    columns hold a few thousand distinct values each; as one Arrow table of strings (or Python
    strings) 20 M cells' four batch keys cost gigabytes, as categories a few bytes per cell."""
    frames = [
        t.to_pandas(strings_to_categorical=True)
        for t in obs.read(value_filter=obs_filter, column_names=columns)
    ]
    if len(frames) <= 1:
        return frames[0] if frames else pd.DataFrame({c: [] for c in columns or obs.schema.names})
    out = {}
    for c in frames[0].columns:
        parts = [f[c] for f in frames]
        if isinstance(parts[0].dtype, pd.CategoricalDtype):
            out[c] = pd.api.types.union_categoricals(parts, ignore_order=True)
        else:
            out[c] = np.concatenate([p.to_numpy() for p in parts])
        for f in frames:  # let each batch's column go as soon as it is merged
            del f[c]
    return pd.DataFrame(out)


class SomaSource:
    """Cells of a SOMA experiment's ``RNA`` measurement passing ``obs_filter`` (a SOMA value filter)."""

    def __init__(
        self,
        uri: str,
        obs_filter: str | None = None,
        x_layer: str = X_LAYER,
        obs_columns: tuple[str, ...] | None = None,
        optional_obs_columns: tuple[str, ...] = (),
    ) -> None:
        """``obs_columns``: read only these obs columns (all when None), and
        ``optional_obs_columns`` where obs has them: at Census scale obs holds tens of columns
        for 74 M cells, while training needs the batch keys."""
        self.uri = str(uri)
        self.x = SomaX(uri, x_layer)
        self.exp = self.x.exp
        names = list(self.exp.obs.schema.names)
        columns = None
        if obs_columns is not None:
            missing = [c for c in obs_columns if c not in names]
            if missing:
                raise ValueError(
                    f"{uri}: column(s) {missing} not in obs; obs has {sorted(names)}. "
                    "Choose the batch/covariate/HVG keys from those columns."
                )
            wanted = {"soma_joinid", *obs_columns, *(c for c in optional_obs_columns if c in names)}
            columns = [c for c in names if c in wanted]
        if obs_filter is not None and len(obs_filter) > MAX_CHARS:  # its parser is superlinear
            raise ValueError(
                f"obs filter {shown(obs_filter)}: {len(obs_filter):,} characters, over "
                f"{MAX_CHARS:,}; a filter names a few columns and values"
            )
        try:  # tiledbsoma parses the filter itself (its QueryCondition runs no code)
            df = self.exp.obs
            df = type(df).open(df.uri, context=df.context.replace(tiledb_config=OBS_READ_CONFIG))
            obs = read_obs(df, obs_filter, columns)
        except Exception as e:
            reason = str(e).split("\n")[0].split(" At:")[0]  # not tiledbsoma's Python stack
            raise ValueError(
                f"obs filter {shown(obs_filter)} failed on {uri}: {reason}; obs has {names}"
            ) from e
        if not obs["soma_joinid"].is_monotonic_increasing:
            obs = obs.sort_values("soma_joinid").reset_index(drop=True)
        self.obs = obs
        self._joinids = self.obs["soma_joinid"].to_numpy()
        self.var_ids, self.var_symbols = gene_names(self.x.var, uri)
        self.var_keys = {
            var_column_key("feature_id"): self.var_ids,
            var_column_key("feature_name"): self.var_symbols,
        }

    def joinids(self, rows: np.ndarray) -> np.ndarray:
        return self._joinids[rows]

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        return self.x.read(self._joinids[rows])


def open_data(data, obs_filter: str | None = None, layer: str | None = None):
    """A source for an in-memory AnnData (named ``defaults.IN_MEMORY``) or a path
    (``open_source``): a reference that ``censusvi.build_index`` or ``finetune`` reads."""
    from censusvi.data.h5ad import H5adSource

    if isinstance(data, ad.AnnData):
        return H5adSource(IN_MEMORY, obs_filter=obs_filter, layer=layer, adata=data)
    return open_source(str(data), obs_filter=obs_filter, layer=layer)


def open_source(
    path: str,
    obs_filter: str | None = None,
    layer: str | None = None,
    obs_columns: tuple[str, ...] | None = None,
    optional_obs_columns: tuple[str, ...] = (),
):
    """An ``H5adSource`` for ``*.h5ad`` paths, a ``SomaSource`` for anything else (which reads
    only ``obs_columns`` and those ``optional_obs_columns`` it has, when given). ``layer``: the
    .h5ad's counts (X, ``layers[layer]`` or 'raw' for raw.X), or the SOMA X layer (default
    ``X_LAYER``), as a Ray worker's ``open_reader`` reads it."""
    from censusvi.data.h5ad import H5adSource

    if str(path).endswith(".h5ad"):
        return H5adSource(path, obs_filter=obs_filter, layer=layer)
    return SomaSource(
        path,
        obs_filter=obs_filter,
        x_layer=layer or X_LAYER,
        obs_columns=obs_columns,
        optional_obs_columns=optional_obs_columns,
    )

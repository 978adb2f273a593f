"""AnnData ``.h5ad`` files as a cell source: in memory, or backed (rows read from disk) when large."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.abc import CSCDataset, CSRDataset

from censusvi.data.counts import CountsError, check_csr, check_indptr, to_csr32
from censusvi.data.obs_filter import mask as obs_filter_mask
from censusvi.data.vocabulary import ID_COLUMNS, SYMBOL_COLUMNS, VAR_NAMES, var_column_key
from censusvi.untrusted import outside_references

BACKED_ABOVE_BYTES = 4 << 30  # files over 4 GiB are read row-block by row-block, not loaded
SCAN_CHUNK = 1 << 24  # stored values per read when a backed CSC matrix's indices are scanned


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """``anndata.read_h5ad`` with a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a folder, not an .h5ad file: give the .h5ad file's path"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    check_self_contained(path)
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:  # h5py and anndata raise many types for one cause
        raise damaged(path, e) from e
    check_structure(adata, str(path))
    return adata


def damaged(path: Path, e: Exception) -> ValueError:
    return ValueError(
        f"cannot read {path} as .h5ad ({type(e).__name__}: {e}); the file is truncated, "
        "damaged or not an AnnData file"
    )


def check_self_contained(path: Path) -> None:
    """Refuse a file that reads other files when opened (an HDF5 external link or external
    storage, a virtual dataset): a file handed over could copy the reader's files into the
    outputs it gets back. Soft links stay within the file and are read."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return  # not HDF5 at all: anndata's error says what the file is
    with f:
        try:
            problems = outside_references(f, soft_links=False)
        except Exception as e:  # h5py raises RuntimeError, SystemError... for a damaged file
            raise damaged(path, e) from None
    if problems:
        raise ValueError(
            f"{path} reaches outside itself ({problems[0]}); censusvi reads self-contained "
            ".h5ad files: write it anew with anndata's write_h5ad"
        )


def check_uns_writable(adata: ad.AnnData, where: str) -> None:
    """Refuse, before any work, an ``uns`` entry anndata reads but cannot write back (e.g. raw
    pickle bytes stored as a numpy void): the output copies ``uns`` and would fail at the end.
    Each entry is written to an in-memory HDF5 file (nothing touches the disk)."""
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    with h5py.File("uns-check", "w", driver="core", backing_store=False) as f:
        for key, value in adata.uns.items():
            try:
                write_elem(f, f"e{len(f)}", value)
            except Exception:  # noqa: BLE001 - anndata raises many kinds for one cause
                raise ValueError(
                    f"{where}: uns[{key!r}] holds a value anndata cannot write back "
                    f"({type(value).__name__}); remove it (del adata.uns[{key!r}]) and retry"
                ) from None


SLOT_AXES = {"obsm": ("cell", "column"), "obsp": ("cell", "cell"), "varm": ("gene", "column"),
             "varp": ("gene", "gene")}  # fmt: skip
COUNT_AXES = ("cell", "gene")


def _sparse_slots(adata: ad.AnnData):
    """(name, matrix, names of its rows and columns) of every slot that may hold a sparse matrix
    subsetting cells touches."""
    yield "X", adata.X, COUNT_AXES
    yield from ((f"layers[{k!r}]", v, COUNT_AXES) for k, v in adata.layers.items())
    if adata.raw is not None:
        yield "raw.X", adata.raw.X, COUNT_AXES
    for slot, axes in SLOT_AXES.items():
        yield from ((f"{slot}[{k!r}]", v, axes) for k, v in getattr(adata, slot).items())


def check_structure(adata: ad.AnnData, where: str) -> None:
    """Raise ``CountsError`` unless every sparse matrix of ``adata`` (X, layers, raw.X, obsm,
    obsp, ...) has sound index arrays; ``where`` names the file.

    scipy trusts a stored column index of 1e9 or a decreasing indptr, and the first slice
    (``adata[rows]`` subsets every slot) then crashes native code. In memory, each matrix is
    checked in full (no copy); a backed X has its row pointers checked here, and its column
    indices block by block as ``H5adSource.read_rows`` reads them.
    """
    for slot, m, axes in _sparse_slots(adata):
        name = f"{where} ({slot})"
        if isinstance(m, CSRDataset | CSCDataset):
            _check_backed(m, name, axes)
        elif sp.issparse(m) and m.format in ("csr", "csc"):
            shape = m.shape if m.format == "csr" else m.shape[::-1]  # CSC: CSR of the transpose
            # the structure alone: only the matrix read as counts must hold numbers (to_csr32)
            check_csr(m.data, m.indices, m.indptr, shape, name, m.format == "csc", axes, False)


def _check_backed(
    m: CSRDataset | CSCDataset, where: str, axes: tuple[str, str] = COUNT_AXES
) -> None:
    """The pointers of a backed sparse matrix (``n + 1`` integers, read once); for CSC also its
    row indices, in chunks, since anndata slices rows of CSC through scipy before we see them."""
    n_major, n_minor = m.shape if m.format == "csr" else m.shape[::-1]
    g = m.group
    nnz, n_indices = g["data"].shape[0], g["indices"].shape[0]
    if n_indices != nnz:
        raise CountsError(f"{where}: {n_indices} indices but {nnz} values; they pair one to one")
    check_indptr(g["indptr"][...], n_major, nnz, where, axes[0] if m.format == "csr" else axes[1])
    if m.format == "csc":
        for a in range(0, nnz, SCAN_CHUNK):
            idx = g["indices"][a : a + SCAN_CHUNK]
            if idx.min() < 0 or idx.max() >= n_minor:
                raise CountsError(
                    f"{where}: row index out of range ({idx.min()}..{idx.max()}) for "
                    f"{n_minor} {axes[0]}s; indices must lie in 0..{n_minor - 1}"
                )


def gene_ids_and_symbols(var: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Ensembl ids (from a known var column, else var_names) and symbols of a dataset's genes."""
    names = [str(v) for v in var.index]
    ids = next((var[c] for c in ID_COLUMNS if c in var.columns), None)
    syms = next((var[c] for c in SYMBOL_COLUMNS if c in var.columns), None)
    id_list = names if ids is None else [("" if pd.isna(v) else str(v)) for v in ids]
    sym_list = names if syms is None else [str(v) for v in syms]
    # A gene without an Ensembl id keeps its symbol as id (as `censusvi ingest` does), so every
    # gene stays addressable and ids stay unique.
    id_list = [i if i else s for i, s in zip(id_list, sym_list)]
    return id_list, sym_list


def gene_keys(var: pd.DataFrame) -> dict[str, list[str]]:
    """Every name a dataset gives its genes, for alignment: id columns first (in the first, a
    gene without an id keeps its symbol, as ``gene_ids_and_symbols`` and training do), then
    var_names, then symbol columns."""

    def column(c: str) -> list[str]:
        return [("" if pd.isna(v) else str(v)) for v in var[c]]

    id_cols = [c for c in ID_COLUMNS if c in var.columns]
    keys = {var_column_key(c): column(c) for c in id_cols[1:]}
    if id_cols:
        keys = {var_column_key(id_cols[0]): gene_ids_and_symbols(var)[0], **keys}
    keys[VAR_NAMES] = [str(v) for v in var.index]
    keys.update({var_column_key(c): column(c) for c in SYMBOL_COLUMNS if c in var.columns})
    return keys


def main_matrix(adata: ad.AnnData, layer: str | None) -> bool:
    """Whether ``layer`` names X itself: none given, or 'X' (the help's name for the default)
    where the file has no layer of that name."""
    return layer is None or (layer == "X" and "X" not in adata.layers)


def counts_matrix(adata: ad.AnnData, layer: str | None) -> object:
    """Where the counts are: X (``layer`` None or 'X'), ``layers[layer]``, or ``raw.X`` for
    ``layer='raw'``."""
    if main_matrix(adata, layer):
        return adata.X
    if layer == "raw":
        if adata.raw is None:
            raise ValueError("--layer raw given but the file has no .raw; drop --layer to use X")
        if adata.raw.n_vars != adata.n_vars:
            raise ValueError(
                f".raw has {adata.raw.n_vars} genes but X has {adata.n_vars}; write the counts of "
                "X's genes to layers['counts'] instead"
            )
        return adata.raw.X
    if layer not in adata.layers:
        raise ValueError(f"layer {layer!r} not in the file; it has layers {list(adata.layers)}")
    return adata.layers[layer]


def counts_elsewhere(adata: ad.AnnData, layer: str | None) -> str:
    """Where else ``adata`` holds counts when the matrix read (X, or ``layer``) is all zeros:
    advice for the 'zero counts' error ("" when nowhere)."""
    places = [(f"layers[{k!r}]", f"pass --layer {k}", v) for k, v in adata.layers.items()]
    places = [p for p in places if p[0] != f"layers[{layer!r}]"]
    if adata.raw is not None and layer != "raw":
        places.append(("raw.X", "pass --layer raw", adata.raw.X))
    if not main_matrix(adata, layer):
        places.append(("X", "drop --layer", adata.X))
    for where, advice, m in places:
        if m is not None and (m.count_nonzero() if sp.issparse(m) else np.count_nonzero(m)):
            return f"; the matrix read is empty, but {where} holds values: {advice}"
    return ""


class H5adSource:
    """Cells of one .h5ad file, optionally filtered by a pandas query on obs."""

    def __init__(
        self,
        path: str | os.PathLike,
        obs_filter: str | None = None,
        layer: str | None = None,
        backed: bool | None = None,
        adata: ad.AnnData | None = None,
    ) -> None:
        self.uri = str(path)
        if adata is None:
            size = Path(path).stat().st_size if Path(path).exists() else 0
            backed = size > BACKED_ABOVE_BYTES if backed is None else backed
            adata = read_h5ad(path, backed=backed)  # checks every sparse matrix's structure
        elif adata.isbacked:
            check_structure(adata, self.uri)  # rows are read through its stored pointers
        self.adata = adata
        self._x = counts_matrix(adata, layer)
        self.backed = bool(adata.isbacked)
        obs = adata.obs
        if not self.backed and ("nnz" not in obs or "raw_sum" not in obs):
            # Census-derived columns, so Census filters ("nnz >= 300") work on any h5ad.
            x = to_csr32(self._x, self.uri)
            self._x = x
            obs = obs.copy()
            obs["nnz"] = np.diff(x.indptr) if "nnz" not in obs else obs["nnz"]
            obs["raw_sum"] = (
                np.asarray(x.sum(1)).ravel() if "raw_sum" not in obs else obs["raw_sum"]
            )
        self._rows = np.arange(adata.n_obs)
        if obs_filter:
            try:
                keep = obs_filter_mask(obs, obs_filter)
            except ValueError as e:
                raise ValueError(f"{self.uri}: {e}") from None
            self._rows = self._rows[keep]
            obs = obs.iloc[self._rows]
        self.obs = obs
        self.var_ids, self.var_symbols = gene_ids_and_symbols(adata.var)
        self.var_keys = gene_keys(adata.var)
        if not self.backed:
            self._x = to_csr32(self._x, self.uri)
        self._layer = layer

    @property
    def elsewhere(self) -> str:
        """Advice for the 'zero counts' error, computed when it is raised (not at every open):
        where else the file holds counts when the matrix read is all zeros."""
        if self.backed or self._x.count_nonzero():
            return ""
        return counts_elsewhere(self.adata, self._layer)

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        file_rows = self._rows[rows]
        if not self.backed:
            return self._x[file_rows]
        lo, hi = int(file_rows[0]), int(file_rows[-1]) + 1  # one contiguous read, then select
        return to_csr32(self._x[lo:hi], f"{self.uri} (cells {lo}..{hi - 1})")[file_rows - lo]

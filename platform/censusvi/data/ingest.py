"""``censusvi ingest``: h5ad files -> a local TileDB-SOMA experiment with the CELLxGENE Census
schema (``data.soma`` says which), so code written against the Census runs on it. The gene axis is
the union of the files' genes by Ensembl id.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from censusvi.data.counts import check_counts, to_csr32
from censusvi.data.h5ad import counts_matrix, gene_ids_and_symbols, read_h5ad
from censusvi.data.soma import MEASUREMENT, X_LAYER, soma_context
from censusvi.data.vocabulary import check_unique_gene_ids
from censusvi.progress import bar

log = logging.getLogger(__name__)

# Census column <- columns of an arbitrary h5ad that carry the same meaning, in order of preference.
OBS_ALIASES: dict[str, tuple[str, ...]] = {
    "assay": ("assay",),
    "suspension_type": ("suspension_type",),
    "donor_id": ("donor_id", "donor", "batch"),
    "cell_type": ("cell_type",),
    "tissue": ("tissue",),
}


def census_obs(
    adata: ad.AnnData, dataset_id: str, x: sp.csr_matrix, where: str | None = None
) -> pd.DataFrame:
    """The Census obs columns for one file's cells, filled from aliases or defaults; ``where``
    names the file in errors (default: the dataset id)."""
    obs = pd.DataFrame(index=[f"{dataset_id}:{n}" for n in adata.obs_names])
    src = adata.obs
    obs["dataset_id"] = (
        src["dataset_id"].astype(str).to_numpy() if "dataset_id" in src else dataset_id
    )
    for col, aliases in OBS_ALIASES.items():
        found = next((a for a in aliases if a in src.columns), None)
        default = "cell" if col == "suspension_type" else "unknown"
        obs[col] = src[found].astype(str).to_numpy() if found else default
        if found and found != col:
            log.info("%s: obs[%r] filled from obs[%r]", dataset_id, col, found)
    obs["is_primary_data"] = (
        primary_flags(src, where or dataset_id) if "is_primary_data" in src else True
    )
    obs["nnz"] = np.diff(x.indptr).astype(np.int64)
    obs["raw_sum"] = np.asarray(x.sum(1)).ravel().astype(np.float64)
    obs.index.name = "obs_id"
    return obs


def primary_flags(obs: pd.DataFrame, where: str) -> np.ndarray:
    """obs['is_primary_data'] as booleans: True/False, 1/0, or the text of those (a cast made
    every non-empty string, "False" too, True); anything else is refused."""
    col = obs["is_primary_data"]
    if missing := int(col.isna().sum()):
        raise ValueError(
            f"{where}: obs['is_primary_data'] is missing for {missing} cells: give each cell "
            "True or False"
        )
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=bool)
    words = col.astype(str).str.strip().str.lower()
    read = words.map(
        {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    )
    if read.isna().any():
        odd = sorted(set(col[read.isna()].astype(str)))[:3]
        raise ValueError(
            f"{where}: obs['is_primary_data'] holds {odd}, not True/False: write it as booleans"
        )
    return read.to_numpy(dtype=bool)


def dataset_id_of(path: str | os.PathLike) -> str:
    """An ingested file's ``dataset_id``: its name without .h5ad (so two files of one name
    cannot be ingested together: their cells' ids would repeat)."""
    return Path(path).name.removesuffix(".h5ad")


def harmonise(path: str | os.PathLike, layer: str | None = None) -> ad.AnnData:
    """One h5ad file as an AnnData in the Census schema (var indexed by feature_id); its counts
    from X, ``layers[layer]``, or ``raw.X`` for ``layer='raw'``."""
    adata = read_h5ad(path)
    x = to_csr32(counts_matrix(adata, layer), str(path))
    check_counts(x, str(path))
    ids, symbols = gene_ids_and_symbols(adata.var)
    check_unique_gene_ids([str(i) for i in ids], str(path))  # a repeat would lose its counts
    if not adata.obs_names.is_unique:
        repeated = adata.obs_names[adata.obs_names.duplicated()].unique()[:3].tolist()
        raise ValueError(
            f"{path}: cell names repeat (e.g. {repeated}); make them unique first "
            "(adata.obs_names_make_unique())"
        )
    var = pd.DataFrame({"feature_name": symbols}, index=pd.Index(ids, name="feature_id"))
    dataset_id = dataset_id_of(path)
    return ad.AnnData(X=x, obs=census_obs(adata, dataset_id, x, str(path)), var=var)


def ingest(
    files: list[str | os.PathLike], out: str | os.PathLike, layer: str | None = None
) -> Path:
    """Write the files into one new SOMA experiment at ``out`` (built aside, then renamed);
    ``layer``: where each file's counts are (default X; a layer name, or 'raw')."""
    import tiledbsoma.io

    if not files:
        raise ValueError("no .h5ad files given to ingest")
    names = [dataset_id_of(f) for f in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"files named {twice} are given more than once (a file's name is its dataset_id, "
            "so its cells' ids would repeat): give each file once, renamed where two differ"
        )
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)) / "exp"
    # tiledbsoma writes from this pool's threads: on Ctrl-C they are waited for before the
    # temporary experiment is removed (else they wrote into it again after the removal)
    pool = ThreadPoolExecutor()  # tiledbsoma's own default size
    try:
        adatas = [harmonise(f, layer) for f in bar(files, desc="read", unit="file")]
        context = soma_context().replace(threadpool=pool)
        mapping = tiledbsoma.io.register_anndatas(
            None,
            adatas,
            measurement_name=MEASUREMENT,
            obs_field_name="obs_id",
            var_field_name="feature_id",
            context=context,
        )
        tiledbsoma.io.from_anndata(
            str(tmp),
            adatas[0],
            MEASUREMENT,
            ingest_mode="schema_only",
            X_layer_name=X_LAYER,
            obs_id_name="obs_id",
            var_id_name="feature_id",
            registration_mapping=mapping,
            context=context,
        )
        mapping.prepare_experiment(str(tmp), context=context)
        for a in bar(adatas, desc="ingest", unit="file"):
            tiledbsoma.io.from_anndata(
                str(tmp),
                a,
                MEASUREMENT,
                X_layer_name=X_LAYER,
                obs_id_name="obs_id",
                var_id_name="feature_id",
                registration_mapping=mapping,
                context=context,
            )
        os.rename(tmp, out)
    except BaseException as e:  # Ctrl-C included
        _free_handles(e)
        raise
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:  # a second Ctrl-C while the writers finish still removes the temporary
            shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def _free_handles(e: BaseException) -> None:
    """Close what the interrupted writes held open: a SOMA object writes its group's record as it
    closes, and otherwise did so at exit, into the temporary experiment removed before."""
    import gc
    import traceback

    if e.__traceback__ is not None:
        traceback.clear_frames(e.__traceback__.tb_next)  # the frames below ingest's own
    gc.collect()

"""Imputation: the decoded, library-normalised expression of chosen genes, measured or not.

A gene the query's assay did not capture is absent from its data (zero-filled on alignment), but
the decoder still predicts it from the cell's latent state: that prediction is the imputed value.
Cells are streamed in minibatches; only the requested genes' columns are kept (bounded memory).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from censusvi import defaults
from censusvi.data.h5ad import gene_keys
from censusvi.data.vocabulary import looks_like_ensembl, table_names
from censusvi.mapping.query import prepare_query
from censusvi.mapping.surgery import SurgeryConfig
from censusvi.model.io import TrainedModel
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.numeric import check_library_size
from censusvi.progress import bar

LAYER = "censusvi_imputed"


def gene_columns(model: TrainedModel, genes: list[str], names=None) -> np.ndarray:
    """Vocabulary positions of genes named by id or symbol (the model's, or ``names``: the
    (symbols, ids) the data gives the model's genes, ``table_names``); unknown names are an
    error."""
    lookup: dict[str, int] = {}
    for key in (model.genes.ids, *(names or ()), model.genes.symbols):
        for i, g in enumerate(key):
            lookup.setdefault(g, i)
    cols, unknown = [], []
    for g in genes:
        i = lookup.get(g)
        (unknown.append(g) if i is None else cols.append(i))
    if unknown:
        raise ValueError(
            f"gene(s) {unknown[:5]} are not in the model's vocabulary of {len(model.genes)} genes "
            f"(ids like {model.genes.ids[0]}, symbols like {model.genes.symbols[0]})"
        )
    return np.array(cols, dtype=np.int64)


def _names(model: TrainedModel, adata: ad.AnnData) -> tuple[list[str], list[str]]:
    """(symbol, id) of every model gene as the data names it (``table_names``)."""
    keys = gene_keys(adata.var)
    return table_names(model.genes, model.genes.align(keys, 0.0, "the query"), keys)


def impute(
    model: TrainedModel,
    adata: ad.AnnData,
    genes: list[str],
    batch_key: str,
    decode_batch: str | None = None,
    library_size: float = defaults.IMPUTE_LIBRARY_SIZE,
    layer: str | None = None,
    surgery: SurgeryConfig | None = None,
    batch_size: int = 2048,
    quiet: bool = False,
) -> ad.AnnData:
    """The mapped cells of ``adata`` with the requested genes added to ``var`` where missing and
    their imputed expression (counts per ``library_size``) in ``layers["censusvi_imputed"]``.

    Each cell is decoded at its posterior mean under its own batch, or under ``decode_batch``
    (any batch of the model or of the query) to read all cells as one technology.
    """
    if not genes:
        raise ValueError("no genes to impute: give Ensembl ids or symbols, e.g. --genes CD3E,MS4A1")
    check_library_size(library_size)
    names = _names(model, adata)  # before surgery: an unknown gene fails at once
    cols = np.array(list(dict.fromkeys(gene_columns(model, genes, names).tolist())), dtype=np.int64)
    q = prepare_query(model, adata, batch_key, layer, surgery)
    vae = q.model.vae.eval()
    device = next(vae.parameters()).device
    code = None
    if decode_batch is not None:
        lookup = {b: i for i, b in enumerate(q.model.batch_categories)}
        if decode_batch not in lookup:
            raise ValueError(
                f"decode batch {decode_batch!r} is neither a reference batch (e.g. "
                f"{list(model.batch_categories[:3])}) nor one of the query's"
            )
        code = lookup[decode_batch]
    pos_parts, val_parts = [], []
    cols_t = torch.as_tensor(cols, device=device)
    with bar(total=adata.n_obs, desc="impute", quiet=quiet) as progress:
        for pos, x, cov in q.cells.minibatches(batch_size, shuffle=False):
            mb = minibatch_from_csr(x, cov, device, with_nonzeros=False)
            with torch.no_grad():
                inf = vae.inference(mb, sample=False)
                cov_t = mb.covariates_nc
                if code is not None:
                    cov_t = cov_t.clone()
                    cov_t[:, 0] = code
                scale = vae.generative(inf.z_nk, inf.log_library_n1, cov_t).scale_ng
                val_parts.append((scale[:, cols_t] * library_size).cpu().numpy())
            pos_parts.append(pos)
            progress.update(len(pos))
    if not pos_parts:
        raise ValueError("no query cell has counts over the model's genes")
    positions = np.concatenate(pos_parts)
    order = np.argsort(positions)
    positions, values = positions[order], np.concatenate(val_parts)[order]
    return _with_imputed_layer(adata[positions].copy(), names, cols, values, decode_batch, q)


def _with_imputed_layer(out: ad.AnnData, names, cols, values, decode_batch, q) -> ad.AnnData:
    """Append requested genes the data lack to ``var`` (zero counts; named as the data names its
    genes: by id if its var_names are ids, else by symbol) and fill the layer."""
    symbols, ids = names
    n_measured = out.n_vars
    position = {int(i): int(q.alignment.data_index[i]) for i in cols}
    missing = [i for i in position if position[i] < 0]
    for k, i in enumerate(missing):
        position[i] = n_measured + k
    if missing:
        by_id = looks_like_ensembl([str(v) for v in out.var_names])
        extra = ad.AnnData(
            sp.csr_matrix((out.n_obs, len(missing)), dtype=np.float32),
            obs=out.obs[[]],
            var=pd.DataFrame(
                {"gene_ids": [ids[i] for i in missing]},
                index=pd.Index([(ids if by_id else symbols)[i] for i in missing]).astype(str),
            ),
        )
        uns = out.uns
        out = ad.concat([out, extra], axis=1, merge="first")
        out.uns = uns
        out.var_names_make_unique()
    out.var["censusvi_measured"] = np.arange(out.n_vars) < n_measured
    rows = np.repeat(np.arange(out.n_obs), len(cols))
    target = np.tile([position[int(i)] for i in cols], out.n_obs)
    layer = sp.coo_matrix((values.ravel().astype(np.float32), (rows, target)), shape=out.shape)
    out.layers[LAYER] = layer.tocsr()
    out.uns["censusvi_imputation"] = {
        "genes": [symbols[i] for i in cols],
        "gene_ids": [ids[i] for i in cols],
        "unmeasured_genes": [symbols[i] for i in missing],
        "decode_batch": decode_batch or "own batch",
        "new_batches": q.new_batches,
    }
    return out

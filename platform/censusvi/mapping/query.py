"""``censusvi map``: a new dataset onto the reference latent space (gene alignment + surgery)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import torch

from censusvi.data.cells import Cells
from censusvi.data.h5ad import H5adSource
from censusvi.data.source import check_batch_given, codes_in
from censusvi.data.vocabulary import DEFAULT_MIN_OVERLAP, GeneAlignment
from censusvi.defaults import EMBED_BATCH_SIZE
from censusvi.mapping.surgery import SurgeryConfig, extend_batches, query_batches, train_new_columns
from censusvi.model.io import TrainedModel
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.outputs import LATENT_KEY, NLL_COLUMN, NO_COUNTS, UNS_KEY, cells_per_batch
from censusvi.progress import bar

log = logging.getLogger(__name__)


@dataclass
class MappedQuery:
    model: TrainedModel  # the reference extended with the query's batches
    positions: np.ndarray  # rows of the query that were mapped (cells with counts), sorted
    latent: np.ndarray  # (len(positions), n_latent) posterior means
    nll_per_count: np.ndarray  # reconstruction QC: -log p(x | z) / total counts, per cell
    report: dict

    def annotated_copy(self, adata: ad.AnnData, latent_key: str = LATENT_KEY) -> ad.AnnData:
        """The mapped cells of ``adata`` with ``obsm[latent_key]``, the QC column and the report
        (which names ``latent_key``, so that ``censusvi report`` finds the latent)."""
        out = adata[self.positions].copy() if len(self.positions) < adata.n_obs else adata.copy()
        out.obsm[latent_key] = self.latent.astype(np.float32)
        out.obs[NLL_COLUMN] = self.nll_per_count
        out.uns[UNS_KEY] = self.uns(latent_key)
        return out

    def uns(self, latent_key: str = LATENT_KEY) -> dict:
        """The ``uns["censusvi"]`` entry: the mapping report and where the latent is."""
        return {**self.report, "latent_key": latent_key}


@dataclass
class PreparedQuery:
    """A query read through the model: the model extended with (and, where needed, trained on)
    its new batches, and its cells aligned to the model's genes with their covariate codes."""

    model: TrainedModel
    cells: Cells
    labels: np.ndarray  # the batch label of every query cell
    alignment: GeneAlignment
    new_batches: list[str]
    surgery_losses: list[float]


def prepare_query(
    model: TrainedModel,
    adata: ad.AnnData,
    batch_key: str,
    layer: str | None = None,
    surgery: SurgeryConfig | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> PreparedQuery:
    surgery = surgery or SurgeryConfig()
    if adata.n_obs == 0:
        raise ValueError("the query has 0 cells; there is nothing to map")
    if batch_key not in adata.obs.columns:
        raise ValueError(
            f"--batch-key {batch_key!r} is not an obs column; obs has {sorted(adata.obs.columns)}"
        )
    check_batch_given(adata.obs, batch_key)
    source = H5adSource("query", adata=adata, layer=layer)
    alignment = model.genes.align(source.var_keys, min_overlap, "the query")
    labels = adata.obs[batch_key].astype(str).to_numpy()
    new = query_batches(labels, model.batch_categories)
    mapped, trainable = extend_batches(model, new) if new else (model, {})
    cov = codes_in(adata.obs, [batch_key], mapped.batch_categories, "query")[0].reshape(-1, 1)
    cov = np.concatenate([cov, model.extra_covariate_codes(adata.obs, "query")], axis=1)
    cells = Cells(source, np.arange(adata.n_obs), alignment, cov, preload=True)
    x, _ = cells.read(np.arange(len(cells)))  # preloaded: read once here, kept for what follows
    if x.nnz == 0:
        raise ValueError(
            f"all {adata.n_obs} query cells {NO_COUNTS} "
            f"({alignment.n_matched} matched); none is left to map{source.elsewhere}"
        )
    needs_training = surgery.train if surgery.train is not None else model.config.encode_covariates
    losses: list[float] = []
    if needs_training and trainable:

        def batches(epoch: int):
            for _, x, c in cells.minibatches(
                surgery.batch_size, shuffle=True, seed=surgery.seed + epoch
            ):
                yield minibatch_from_csr(x, c, with_counts=mapped.vae.needs_dense_counts)

        losses = train_new_columns(mapped, trainable, batches, surgery)
    return PreparedQuery(mapped, cells, labels, alignment, new, losses)


def latent_and_nll(vae, mb) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent means, reconstruction -log p(x | z) per count at z = the mean) of a minibatch
    (built ``with_counts=vae.needs_dense_counts``): the mapping's ``nll_per_count``, and the
    reference cells' own for the index's out-of-reference fit."""
    with torch.no_grad():
        inf = vae.inference(mb, sample=False)
        gen = vae.generative(inf.z_nk, inf.log_library_n1, mb.covariates_nc)
        nll = vae.reconstruction_n(mb, gen) / torch.exp(mb.log_library_n1[:, 0])
    return inf.qz_mean_nk, nll


def map_query(
    model: TrainedModel,
    adata: ad.AnnData,
    batch_key: str,
    layer: str | None = None,
    surgery: SurgeryConfig | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> MappedQuery:
    q = prepare_query(model, adata, batch_key, layer, surgery, min_overlap)
    mapped, cells, labels, alignment, new = q.model, q.cells, q.labels, q.alignment, q.new_batches
    pos_parts, z_parts, nll_parts = [], [], []
    device = next(model.vae.parameters()).device  # surgery trains on the CPU; mapping runs here
    vae = mapped.vae.to(device).eval()
    for pos, x, c in bar(
        cells.minibatches(EMBED_BATCH_SIZE, shuffle=False), desc="map", unit="batch"
    ):
        if not len(pos):
            continue  # every cell of this minibatch had zero counts and was dropped
        mb = minibatch_from_csr(x, c, device, with_counts=vae.needs_dense_counts)
        z, nll = latent_and_nll(vae, mb)
        pos_parts.append(pos)
        z_parts.append(z.cpu().numpy())
        nll_parts.append(nll.cpu().numpy())
    if not pos_parts:
        raise ValueError("no query cell has counts over the model's genes")
    positions = np.concatenate(pos_parts)
    order = np.argsort(positions)
    report = {
        "genes": alignment.report(),
        "batch_key": batch_key,
        "cells_per_batch": cells_per_batch(labels),
        "new_batches": new,
        "cells_mapped": int(len(positions)),
        "cells_without_counts": int(adata.n_obs - len(positions)),
        "surgery_epochs": len(q.surgery_losses),
        "surgery_query_loss": [round(v, 3) for v in q.surgery_losses],
    }
    return MappedQuery(
        mapped,
        positions[order],
        np.concatenate(z_parts)[order],
        np.concatenate(nll_parts)[order],
        report,
    )

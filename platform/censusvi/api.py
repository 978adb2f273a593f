"""The Python API for notebooks: thin functions over the library, on in-memory AnnData.

``model`` is a ``TrainedModel`` (what ``pretrain`` returns), a model directory (censusvi or
scvi-tools) or a ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` URI; ``index`` a ``LabelIndex``
(what ``build_index`` returns) or an index directory, and may be left out when ``model`` is a
registered version that holds one. ``embed``, ``map_query`` and ``annotate`` write into ``adata``
in place (the keys ``censusvi.outputs`` names; a cell without counts over the model's genes gets
NaN there); ``de`` returns a table and ``impute`` a new AnnData. Each function calls what the CLI
command of the same name calls, with the same defaults (``censusvi.defaults``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.outputs import (
    LATENT_KEY,
    NLL_COLUMN,
    OVER_CLUSTERING_COLUMN,
    UNS_KEY,
    majority_voting_column,
    ontology_columns,
    predicted_column,
    probability_column,
    uncertainty_column,
)

if TYPE_CHECKING:
    import anndata as ad

    from censusvi.annotate.index import LabelIndex
    from censusvi.model.io import TrainedModel

log = logging.getLogger(__name__)
IN_MEMORY = defaults.IN_MEMORY


def _entrance(fn):
    """A missing extra (umap for ``report``, mlflow for ``models:/`` URIs) is one MissingExtra
    naming the function and the pip line, as in the CLI."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from censusvi.extras import needs_extras

        with needs_extras(f"censusvi.{fn.__name__}()"):
            return fn(*args, **kwargs)

    return wrapper


def _model(model) -> TrainedModel:
    from censusvi.model.io import TrainedModel, load_model

    return model if isinstance(model, TrainedModel) else load_model(model)


def _model_and_index(model, index, faiss_device: str | None) -> tuple[TrainedModel, LabelIndex]:
    """The model and index to annotate with; a registered model without ``index`` brings the
    index registered with the same version (the alias is resolved once, for both)."""
    from censusvi.annotate.index import LabelIndex, load_index

    if isinstance(index, LabelIndex):
        return _model(model), index
    if index is not None:
        return _model(model), load_index(index, faiss_device)
    if not str(model).startswith("models:/"):
        raise ValueError(
            "no index: pass index= (a LabelIndex from censusvi.build_index or an index "
            "directory), or a registered model (models:/NAME@ALIAS) that holds one"
        )
    from censusvi.registry.fetch import load_version

    return load_version(str(model), faiss_device)


def _surgery(train: bool | None, max_epochs: int):
    from censusvi.mapping.surgery import SurgeryConfig

    return SurgeryConfig(train=train, max_epochs=max_epochs)


def _put_rows(adata: ad.AnnData, positions: np.ndarray, obs: pd.DataFrame, obsm: dict) -> None:
    """Write per-cell results for the rows ``positions`` of ``adata`` into it; the other rows
    (cells without counts, which the library leaves out) get NaN."""
    n, full = adata.n_obs, len(positions) == adata.n_obs
    if not full:
        log.warning(
            "%d of %d cells have no counts over the model's genes: NaN", n - len(positions), n
        )
    for name, values in obs.items():
        series = pd.Series(values.array, index=positions)
        adata.obs[name] = series.array if full else series.reindex(np.arange(n)).array
    for key, rows in obsm.items():
        out = np.full((n, rows.shape[1]), np.nan, dtype=np.float32)
        out[positions] = rows
        adata.obsm[key] = out


@_entrance
def pretrain(
    adata_or_path: ad.AnnData | str | os.PathLike | None,
    batch_key: str | None = defaults.BATCH_KEY,
    *,
    batch_keys: list[str] | tuple[str, ...] | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    config: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    quiet: bool = True,
    resume: bool = True,
    on_epoch_end=(),
    **settings: Any,
) -> TrainedModel:
    """Train an scVI reference model on an AnnData (or an .h5ad / SOMA path; None: the
    ``config``'s source); the batch is ``batch_key`` (or the concatenation of ``batch_keys``;
    None: the config's). ``settings``: any field of the data, model or train section of a
    pretrain config (``n_hvg=2000``, ``n_latent=10``, ``max_epochs=50``, ``schedule="census"``,
    ...), over the packaged or YAML ``config`` and its ``overrides`` (``"train.lr=0.001"``).
    ``out``: also write the model directory there (with checkpoints, resumed from when
    ``resume``, as ``censusvi pretrain --out``). ``on_epoch_end``: callables given each epoch's
    statistics (``censusvi.train.loop.EpochStats``) after it ends, e.g. to plot the ELBO live."""
    import anndata as ad

    from censusvi.data.h5ad import H5adSource
    from censusvi.train.pretrain import load_pretrain_config
    from censusvi.train.pretrain import pretrain as train
    from censusvi.train.run_config import settings_sections

    if isinstance(batch_keys, str):  # "dataset_id,assay" as on the command line, not letters
        batch_keys = [k.strip() for k in batch_keys.split(",")]
    keys = tuple(batch_keys) if batch_keys is not None else (batch_key,) if batch_key else None
    sections = settings_sections(settings)
    if keys is not None:
        sections["data"]["batch_keys"] = keys
    in_memory = isinstance(adata_or_path, ad.AnnData)
    if adata_or_path is not None:
        sections["data"]["source"] = IN_MEMORY if in_memory else str(adata_or_path)
    cfg = load_pretrain_config(config, sections, list(overrides))
    if out is not None:  # never over the data or the config it was read from
        from censusvi.atomic import check_output
        from censusvi.config_files import locate

        check_output(out, "model", overwrite, (cfg.data.source, locate(config) if config else None))
    source = None
    if in_memory:  # the config's filter and layer apply as to a file
        d = cfg.data
        source = H5adSource(IN_MEMORY, d.obs_filter, d.layer, adata=adata_or_path)
    model, _ = train(
        cfg,
        out,
        quiet=quiet,
        resume=resume and out is not None,
        overwrite=overwrite,
        source=source,
        on_epoch_end=tuple(on_epoch_end),
    )
    return model


@_entrance
def embed(
    adata: ad.AnnData,
    model,
    key_added: str = LATENT_KEY,
    *,
    layer: str | None = None,
    batch_size: int = defaults.EMBED_BATCH_SIZE,
    min_gene_overlap: float | None = None,
    name: str = IN_MEMORY,
) -> None:
    """Latent means of cells whose batches the model knows, into ``adata.obsm[key_added]``
    (``censusvi embed``); for new batches use ``map_query``. ``name``: what errors call the
    data (the CLI passes the file's path)."""
    from censusvi.data.h5ad import H5adSource
    from censusvi.data.vocabulary import DEFAULT_MIN_OVERLAP
    from censusvi.inference import latent_representation

    m = _model(model)
    source = H5adSource(name, layer=layer, adata=adata)
    overlap = DEFAULT_MIN_OVERLAP if min_gene_overlap is None else min_gene_overlap
    pos, z, report = latent_representation(m, source, batch_size, min_overlap=overlap)
    _put_rows(adata, pos, pd.DataFrame(index=pos), {key_added: z})
    adata.uns[UNS_KEY] = {**adata.uns.get(UNS_KEY, {}), "genes": report, "latent_key": key_added}


@_entrance
def finetune(
    adata: ad.AnnData | str | os.PathLike,
    model,
    labels_key: str = "cell_type",
    *,
    obs_filter: str | None = None,
    layer: str | None = None,
    **settings: Any,
) -> TrainedModel:
    """A copy of ``model`` fine-tuned with the reference's labels, as scvi-tools trains scANVI
    from a trained scVI (``censusvi finetune``; ``censusvi.annotate.finetune``); index and
    annotate with it (it lifts ``method="knn"``, not the default ensemble: docs/cli.md).
    ``settings``: fields of ``FinetuneConfig`` (``max_epochs``, ``classification_ratio``,
    ``seed``, ``device``, ...)."""
    from censusvi.annotate.finetune import FinetuneConfig
    from censusvi.annotate.finetune import finetune as run
    from censusvi.data.soma import open_data

    source = open_data(adata, obs_filter, layer)
    known = {f.name for f in fields(FinetuneConfig)}
    if set(settings) - known:
        raise ValueError(
            f"unknown fine-tune setting(s) {sorted(set(settings) - known)}: use {sorted(known)}"
        )
    return run(_model(model), source, labels_key, FinetuneConfig(**settings))


@_entrance
def build_index(
    adata: ad.AnnData | str | os.PathLike,
    model,
    label_keys: list[str] | tuple[str, ...] | str = ("cell_type",),
    *,
    obs_filter: str | None = None,
    layer: str | None = None,
    faiss_device: str | None = None,
    ontology: bool = True,
    head: bool = True,
    kind: str = defaults.INDEX_KIND,
    metric: str = defaults.METRIC,
) -> LabelIndex:
    """Embed a labelled reference (batches the model knows) and index it with its labels
    (``censusvi index``); ``index.save(dir)`` writes what ``censusvi index --out`` writes.
    ``ontology``: keep the Cell Ontology terms of the labels that have one (a
    ``KEY_ontology_term_id`` column, else the label is a CL name) for ontology-aware answers;
    ``head``: train a calibrated label head per key for ``annotate(method="head"|"ensemble")``;
    ``kind``: the FAISS index, one of ``defaults.INDEX_KINDS`` ("auto": exact, IVF-Flat or IVF-PQ
    by size); ``metric``: "l2" or "cosine"."""
    from censusvi.annotate.pipeline import index_reference

    keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    return index_reference(
        _model(model), adata, keys, obs_filter, faiss_device, layer, ontology, head, kind, metric
    )


@_entrance
def annotate(
    adata: ad.AnnData,
    model,
    index=None,
    batch_key: str = defaults.BATCH_KEY,
    *,
    k: int = defaults.K,
    unknown_threshold: float = defaults.UNKNOWN_THRESHOLD,
    class_balance: float = defaults.CLASS_BALANCE,
    majority_voting: bool = False,
    ontology_threshold: float = defaults.ONTOLOGY_THRESHOLD,
    method: str | None = None,
    key_added: str = LATENT_KEY,
    layer: str | None = None,
    train: bool | None = None,
    max_epochs: int = defaults.SURGERY_MAX_EPOCHS,
    faiss_device: str | None = None,
) -> None:
    """Map the query (new batches by scArches surgery) and transfer every label of the index,
    in place: the obs columns and uns entry ``censusvi annotate`` writes, the latent in
    ``obsm[key_added]``; ``majority_voting`` adds ``KEY_majority_voting`` per label key; where
    the index maps a key's labels to the Cell Ontology, the most specific term whose probability
    is at least ``ontology_threshold`` is added too (``censusvi.outputs.ontology_columns``).
    ``method``: ``knn`` (weighted kNN), ``head`` (the index's label head) or ``ensemble``; None:
    ``defaults.METHOD``, or knn with a logged note (``uns["censusvi"]["method_note"]``) where
    the index has no label head."""
    from censusvi.annotate import pipeline

    m, ix = _model_and_index(model, index, faiss_device)
    out, mapped = pipeline.annotate(
        m, ix, adata, batch_key, k, unknown_threshold, _surgery(train, max_epochs), layer,
        class_balance, key_added, majority_voting, ontology_threshold, method,
    )  # fmt: skip
    columns = [NLL_COLUMN]
    for key in ix.labels.columns:
        columns += [predicted_column(key), probability_column(key), uncertainty_column(key)]
        columns += [c for c in ontology_columns(key) if c in out.obs.columns]
        columns += [majority_voting_column(key)] if majority_voting else []
    columns += [OVER_CLUSTERING_COLUMN] if majority_voting else []
    _put_rows(adata, mapped.positions, out.obs[columns], {key_added: mapped.latent})
    adata.uns[UNS_KEY] = out.uns[UNS_KEY]


@_entrance
def map_query(
    adata: ad.AnnData,
    model,
    batch_key: str = defaults.BATCH_KEY,
    *,
    key_added: str = LATENT_KEY,
    layer: str | None = None,
    train: bool | None = None,
    max_epochs: int = defaults.SURGERY_MAX_EPOCHS,
    min_gene_overlap: float | None = None,
) -> TrainedModel:
    """Map a query onto the reference latent (``censusvi map``), in place: ``obsm[key_added]``,
    the QC column and the mapping report in uns. Returns the model extended with the query's
    batches (``.save(dir)`` is ``censusvi map --save-model``)."""
    from censusvi.data.vocabulary import DEFAULT_MIN_OVERLAP
    from censusvi.mapping import query

    overlap = DEFAULT_MIN_OVERLAP if min_gene_overlap is None else min_gene_overlap
    mq = query.map_query(
        _model(model), adata, batch_key, layer, _surgery(train, max_epochs), overlap
    )
    nll = pd.DataFrame({NLL_COLUMN: mq.nll_per_count})
    _put_rows(adata, mq.positions, nll, {key_added: mq.latent})
    adata.uns[UNS_KEY] = mq.uns(key_added)
    return mq.model


@_entrance
def de(
    adata: ad.AnnData,
    model,
    groupby: str,
    group1: str | list[str],
    group2: str | None = None,
    batch_key: str | None = None,
    *,
    layer: str | None = None,
    train: bool | None = None,
    max_epochs: int = defaults.SURGERY_MAX_EPOCHS,
    quiet: bool = True,
    **settings: Any,
) -> pd.DataFrame:
    """scVI Bayesian differential expression (``censusvi de``): one row per gene and comparison.
    ``settings``: fields of ``censusvi.generative.de.DEConfig`` (mode, delta, fdr, n_samples,
    batch_correction, seed, ...)."""
    from censusvi.generative.de import DEConfig, differential_expression

    cfg = DEConfig(**settings)
    return differential_expression(
        _model(model), adata, groupby, group1, group2, batch_key, cfg, layer,
        _surgery(train, max_epochs), quiet=quiet,
    )  # fmt: skip


@_entrance
def impute(
    adata: ad.AnnData,
    model,
    genes: list[str],
    batch_key: str = defaults.BATCH_KEY,
    *,
    train: bool | None = None,
    max_epochs: int = defaults.SURGERY_MAX_EPOCHS,
    quiet: bool = True,
    **settings: Any,
) -> ad.AnnData:
    """Decoded expression of ``genes`` (measured or not; ``censusvi impute``): a new AnnData of
    the mapped cells with the layer ``censusvi_imputed``. ``settings``: ``decode_batch``,
    ``library_size``, ``layer``, ``batch_size`` of ``censusvi.generative.impute.impute``."""
    from censusvi.generative import impute as generative

    return generative.impute(
        _model(model), adata, list(genes), batch_key,
        surgery=_surgery(train, max_epochs), quiet=quiet, **settings,
    )  # fmt: skip


@_entrance
def report(
    adata: ad.AnnData,
    index,
    out: str | os.PathLike,
    *,
    umap_key: str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict:
    """The HTML report of an annotated query (``censusvi report``); ``umap_key`` (e.g.
    ``"X_umap"``): also store each cell's place on the report's UMAP in ``adata.obsm``.
    ``options``: label_key, truth_key, batch_key, latent_key, png_dir, per_type, scib of
    ``censusvi.report.build.build_report``. Returns the report's content (metrics included)."""
    from censusvi.report.build import build_report

    return build_report(adata, index, out, overwrite=overwrite, umap_key=umap_key, **options)

"""A run's plan, decided once on the driver before training: cells (the only read of obs), HVG
genes, batch codes, the train/validation split by chunks, the architecture (``plan_from``)."""

from __future__ import annotations

import logging
import platform as py_platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from censusvi import __version__
from censusvi.data import shards
from censusvi.data.cells import Cells
from censusvi.data.hvg import Reducer, highly_variable_genes
from censusvi.data.soma import open_source
from censusvi.data.source import CellSource, batch_categories, codes_in
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.io import TrainedModel
from censusvi.model.vae import VAE, new_vae
from censusvi.train import schedule
from censusvi.train.checkpoint import source_identity
from censusvi.train.loop import History, TrainConfig
from censusvi.train.run_config import CENSUS_HVG_KEYS, NOT_FINGERPRINTED, DataConfig, PretrainConfig

log = logging.getLogger(__name__)


def choose_genes(source: CellSource, cfg: DataConfig, reducer=None) -> GeneVocabulary:
    """HVGs by the configured strata; ``reducer`` runs the statistics passes (e.g. on Ray)."""
    ids, syms = np.array(source.var_ids, dtype=object), np.array(source.var_symbols, dtype=object)
    if cfg.n_hvg <= 0 or cfg.n_hvg >= len(ids):
        return GeneVocabulary(tuple(ids), tuple(syms))
    keys = (
        cfg.hvg_keys
        if cfg.hvg_keys is not None
        else tuple(k for k in CENSUS_HVG_KEYS if k in source.obs)
    )
    hvg = highly_variable_genes(source, cfg.n_hvg, keys, reducer=reducer)
    log.info("selected %d HVGs over %d strata of %s", len(hvg.genes), len(hvg.strata), list(keys))
    return GeneVocabulary(tuple(ids[hvg.genes]), tuple(syms[hvg.genes]))


def split_rows(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): validation is whole chunks of consecutive rows
    (``shards.split_by_chunks``), read in contiguous runs like the training cells."""
    return shards.split_by_chunks(n, train_fraction, seed)


@dataclass
class RunPlan:
    """Everything decided before training: cells, genes, batch codes, split, architecture.

    Built once on the driver (``plan_from``), the only process that reads obs; the distributed
    trainer ships it to its workers through Ray's object store (``for_workers``: the source
    becomes a ``shards.PlannedSource``, which reads counts by joinid and has no obs).
    """

    cfg: PretrainConfig
    source: CellSource
    genes: GeneVocabulary
    categories: tuple[str, ...]
    extra_cats: tuple[tuple[str, ...], ...]
    cov: np.ndarray  # (n_cells, 1 + k) codes: batch, then extra covariates
    train_rows: np.ndarray
    val_rows: np.ndarray
    model_cfg: ModelConfig
    requested: TrainConfig  # the train settings as given; cfg.train is them resolved
    train_cov: np.ndarray | None = None  # cov[train_rows], in workers (``with_cells``)
    val_cov: np.ndarray | None = None
    cells_ref: Any = None  # in workers: the ObjectRef of their ``CellPlan``

    @property
    def n_cells(self) -> int:
        return len(self.train_rows) + len(self.val_rows)

    def schedule_record(self, workers: int = 1) -> dict[str, Any]:
        """The schedule this run trains with (``censusvi.train.schedule.record``)."""
        t = self.cfg.train
        return schedule.record(
            t.schedule,
            self.n_cells,
            len(self.train_rows),
            {k: getattr(t, k) for k in schedule.SCHEDULED},
            self.requested.explicit(),
            workers,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What makes a checkpoint this run's (``CheckpointStore``): the settings but
        ``NOT_FINGERPRINTED``, the data's identity, the genes, the batch categories."""
        settings = self.cfg.to_dict()
        for key in NOT_FINGERPRINTED:
            settings["train"].pop(key)
        return {
            "config": settings,
            "data": source_identity(self.source),
            "genes": list(self.genes.ids),
            "batches": list(self.categories),
            "n_cells": self.n_cells,
        }

    def cells(self, rows: np.ndarray) -> Cells:
        return Cells(self.source, rows, self.alignment(), self.cov[rows])

    def alignment(self):
        return self.genes.align({"var ids": self.source.var_ids}, min_overlap=1.0)

    def for_workers(self) -> tuple[RunPlan, shards.CellPlan]:
        """(this plan's decisions without its cells: small, sent in the workers' config; the
        cells: a ``CellPlan`` for Ray's object store, read by a ``PlannedSource`` that has no
        obs). Positions are int32 and codes int32 below 2**31 cells; ``with_cells`` rejoins."""
        d = self.cfg.data
        small = np.int32 if self.n_cells < 2**31 else np.int64  # positions
        cells = shards.CellPlan(
            shards.planned_source(self.source, d.obs_filter, d.layer),
            self.train_rows.astype(small),
            self.cov[self.train_rows].astype(np.int32),
            self.val_rows.astype(small),
            self.cov[self.val_rows].astype(np.int32),
        )
        empty = np.zeros(0, dtype=small)
        decided = replace(self, source=None, cov=self.cov[:0], train_rows=empty, val_rows=empty)
        return decided, cells

    def with_cells(self, cells: shards.CellPlan, ref=None) -> RunPlan:
        """A worker's whole plan: ``for_workers``' decisions and its cells (``ref``: their
        object in Ray's store, which read tasks fetch themselves)."""
        return replace(
            self,
            source=cells.source,
            train_rows=cells.train_rows,
            val_rows=cells.val_rows,
            train_cov=cells.train_cov,
            val_cov=cells.val_cov,
            cells_ref=ref,
        )

    def split_cells(self, rows: np.ndarray, cov: np.ndarray | None, preload=None) -> Cells:
        """Cells of ``rows`` with their codes ``cov`` (views of a shipped plan: no copy)."""
        cov = self.cov[rows] if cov is None else cov
        return Cells(self.source, rows, self.alignment(), cov, preload=preload)

    def rank_cells(self, rank: int, world: int, chunk: int) -> tuple[Cells, Cells | None]:
        """Rank ``rank``'s cells for a shard read once and kept: a contiguous run of the
        chunks in the run seed's order (``shards.epoch_chunks``; one rank: every training
        cell, as in one process) and a contiguous run of the validation cells."""
        n = len(self.train_rows)
        c = shards.chunk_size(n, world, chunk)
        pos = np.sort(shards.epoch_positions(n, c, world, rank, self.cfg.train.seed))
        cov = self.train_cov if self.train_cov is not None else self.cov[self.train_rows]
        train = self.split_cells(self.train_rows[pos], cov[pos])
        return train, self.rank_val(rank, world)

    def rank_val(self, rank: int, world: int, preload=None) -> Cells | None:
        part = shards.val_slice(len(self.val_rows), world, rank)
        if part.stop == part.start:
            return None
        cov = self.val_cov if self.val_cov is not None else self.cov[self.val_rows]
        return self.split_cells(self.val_rows[part], cov[part], preload)

    def new_vae(self, train_cells: Cells) -> VAE:
        return new_vae(
            self.model_cfg,
            self.cfg.train.seed,
            len(train_cells.rows),
            train_cells.read,
            lambda: ((x, cov[:, 0]) for _, x, cov in train_cells.minibatches(65536, shuffle=False)),
        )

    def trained_model(
        self, vae: VAE, history: History, extra: dict[str, Any] | None = None, workers: int = 1
    ) -> TrainedModel:
        d = self.cfg.data
        provenance = {
            "schedule": self.schedule_record(workers),
            "source": d.source,
            "obs_filter": d.obs_filter,
            "n_cells": self.n_cells,
            "n_train_cells": len(self.train_rows),
            "n_val_cells": len(self.val_rows),
            "epochs": len(history.epochs),
            "final_val_elbo": history.epochs[-1].val_elbo,
            "final_train_loss": history.epochs[-1].train_loss,
            "config": self.cfg.to_dict(),
            "censusvi_version": __version__,
            "torch_version": torch.__version__,
            "python_version": py_platform.python_version(),
            **(extra or {}),
        }
        return TrainedModel(
            vae.cpu(),
            self.genes,
            tuple(d.batch_keys),
            self.categories,
            provenance,
            covariate_keys=tuple(d.categorical_covariate_keys),
            covariate_categories=self.extra_cats,
        )


def plan_from(
    cfg: PretrainConfig,
    genes: GeneVocabulary | None = None,
    categories: tuple[str, ...] | None = None,
    extra_cats: tuple[tuple[str, ...], ...] | None = None,
    hvg_reducer: Callable[[CellSource], Reducer] | None = None,
    source: CellSource | None = None,
) -> RunPlan:
    """The run's plan; genes and categories are chosen here unless given.
    ``hvg_reducer(source)``: how the HVG passes run over the opened source (default: here).
    ``source``: cells already open (an in-memory AnnData's ``H5adSource``) instead of
    ``cfg.data.source``, which then only names them."""
    d, t = cfg.data, cfg.train
    if source is None and not d.source:
        raise ValueError("no data source: pass --source PATH (an .h5ad file or a SOMA experiment)")
    source = source or open_source(
        d.source,
        obs_filter=d.obs_filter,
        layer=d.layer,
        obs_columns=(*d.batch_keys, *d.categorical_covariate_keys, *(d.hvg_keys or ())),
        optional_obs_columns=CENSUS_HVG_KEYS if d.hvg_keys is None else (),
    )
    if len(source.obs) == 0:
        raise ValueError(f"{d.source}: no cells pass the filter {d.obs_filter!r}")

    def codes_of(
        keys: list[str], known: tuple[str, ...] | None, role: str = "batch"
    ) -> tuple[tuple[str, ...], np.ndarray]:
        if known is None:
            labels, codes = batch_categories(source.obs, keys, d.source, role)
            return tuple(labels.tolist()), codes
        codes, unknown = codes_in(source.obs, keys, known, d.source, role)
        if unknown:  # a worker must see the driver's cells
            raise ValueError(f"{d.source}: {keys} labels {unknown[:3]} not among {known[:3]}...")
        return known, codes

    categories, codes = codes_of(list(d.batch_keys), categories)
    extra = [
        codes_of([k], extra_cats[i] if extra_cats else None, "covariate")
        for i, k in enumerate(d.categorical_covariate_keys)
    ]
    if genes is None:
        genes = choose_genes(source, d, hvg_reducer(source) if hvg_reducer else None)
    train_rows, val_rows = split_rows(len(source.obs), t.train_fraction, t.seed)
    cfg = replace(cfg, train=t.resolved(len(source.obs)))
    model_cfg = ModelConfig(
        n_genes=len(genes),
        n_batches=len(categories),
        extra_categories=tuple(len(c) for c, _ in extra),
        **asdict(cfg.model),
    )
    cov = np.stack([codes, *(c for _, c in extra)], axis=1).astype(np.int64)
    return RunPlan(
        cfg,
        source,
        genes,
        categories,
        tuple(c for c, _ in extra),
        cov,
        train_rows,
        val_rows,
        model_cfg,
        t,
    )


def warn_if_undertrained(plan: RunPlan, history: History, workers: int = 1) -> dict[str, Any]:
    """Log ``schedule.training_warnings`` for the run; returns them as provenance."""
    rec = plan.schedule_record(workers)
    steps = schedule.steps_per_epoch(len(plan.train_rows) // workers, rec["batch_size"])
    found = schedule.training_warnings(
        steps * len(history.epochs), [e.val_elbo for e in history.epochs], rec["name"]
    )
    for w in found:
        log.warning(w)
    return {"training_warnings": found} if found else {}

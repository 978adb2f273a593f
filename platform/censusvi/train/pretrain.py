"""``censusvi pretrain``: source -> HVG vocabulary -> batch categories -> train/val split -> fit -> save.

Everything a later reader of the model directory needs (genes, batch categories, source, filter,
cell counts, epochs, code version) goes into its config.json.
"""

from __future__ import annotations

import logging
import os
import platform as py_platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from censusvi import __version__
from censusvi.config_files import read_config
from censusvi.data import shards
from censusvi.data.cells import Cells
from censusvi.data.hvg import Reducer, highly_variable_genes
from censusvi.data.soma import open_source
from censusvi.data.source import CellSource, batch_categories, codes_in
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.io import TrainedModel, save_model
from censusvi.model.minibatch import DeviceCSR, Minibatch, minibatch_from_csr
from censusvi.model.vae import VAE, new_vae
from censusvi.train import schedule
from censusvi.train.checkpoint import CheckpointStore, source_identity
from censusvi.train.loop import EpochStats, History, TrainConfig, fit

log = logging.getLogger(__name__)
CENSUS_BATCH_KEYS = ("dataset_id", "assay", "suspension_type", "donor_id")
CENSUS_HVG_KEYS = ("suspension_type", "assay")
# Keys of a config file that only the Ray job (censusvi.jobs.pretrain) reads; ``censusvi pretrain``
# trains in this process and leaves them (and the stream, out, mlflow sections) aside.
JOB_ONLY = {"data": ("ingest",), "train": ("num_workers", "use_gpu", "max_failures")}
# Train settings a checkpoint does not pin: the stopping rules (a rerun may extend a run) and where
# the arithmetic runs.
NOT_FINGERPRINTED = (
    "max_epochs",
    "early_stopping",
    "patience",
    "min_delta",
    "device",
    "device_cache",
)


@dataclass(frozen=True)
class DataConfig:
    source: str = ""
    obs_filter: str | None = None
    layer: str | None = None
    batch_keys: tuple[str, ...] = CENSUS_BATCH_KEYS
    hvg_keys: tuple[str, ...] | None = None  # None: CENSUS_HVG_KEYS that obs has
    n_hvg: int = 8000  # 0: keep every gene
    categorical_covariate_keys: tuple[str, ...] = ()  # injected beside the batch (decoder)


@dataclass(frozen=True)
class ModelSettings:
    """ModelConfig minus what the data decide (n_genes, n_batches)."""

    n_hidden: int = 128
    n_latent: int = 50
    n_layers: int = 2
    dropout_rate: float = 0.1
    likelihood: str = "nb"
    dispersion: str = "gene"
    latent_library: bool = False
    encode_covariates: bool = False  # the Census model's False: embeddings need no surgery
    prior_components: int = 0  # 0: N(0, I), the Census model's; K: a VampPrior (ModelConfig)


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section(cls, d: dict[str, Any] | None, name: str):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {name} setting(s) {unknown}; known: {sorted(known)}")
    for k in ("batch_keys", "hvg_keys", "categorical_covariate_keys"):
        if isinstance(d.get(k), str):
            d[k] = tuple(s.strip() for s in d[k].split(",") if s.strip())
        elif isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return cls(**d)


def pretrain_config_from(doc: dict[str, Any]) -> PretrainConfig:
    """The ``data``, ``model`` and ``train`` sections of a config document (``censusvi.config_files``)
    as a PretrainConfig; the keys only the Ray job reads (``JOB_ONLY``) are left to it."""
    sections = {}
    for name in ("data", "model", "train"):
        skip = JOB_ONLY.get(name, ())
        sections[name] = {k: v for k, v in (doc.get(name) or {}).items() if k not in skip}
    return PretrainConfig(
        _section(DataConfig, sections["data"], "data"),
        _section(ModelSettings, sections["model"], "model"),
        _section(TrainConfig, sections["train"], "train"),
    )


def load_pretrain_config(
    config: str | os.PathLike | None,
    overrides: dict[str, dict[str, Any]],
    sets: list[str] | tuple[str, ...] = (),
) -> PretrainConfig:
    """``config`` (a packaged name or a YAML path, read by ``censusvi.config_files``) with
    ``--set`` items ``sets``, then ``overrides`` (from flags) win."""
    doc = read_config(config, sets)
    for name in ("data", "model", "train"):
        doc[name] = {**(doc.get(name) or {}), **overrides.get(name, {})}
    return pretrain_config_from(doc)


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
        keys: list[str], known: tuple[str, ...] | None
    ) -> tuple[tuple[str, ...], np.ndarray]:
        if known is None:
            labels, codes = batch_categories(source.obs, keys, d.source)
            return tuple(labels.tolist()), codes
        codes, unknown = codes_in(source.obs, keys, known, d.source)
        if unknown:  # a worker must see the driver's cells
            raise ValueError(f"{d.source}: {keys} labels {unknown[:3]} not among {known[:3]}...")
        return known, codes

    categories, codes = codes_of(list(d.batch_keys), categories)
    extra = [
        codes_of([k], extra_cats[i] if extra_cats else None)
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


class RunBatches:
    """A run's minibatches of ``Cells`` on ``t.device``. In-memory cells with ``t.device_cache``
    (None: on for a GPU) are held on the device once and cut there; others are read per
    minibatch. ``pretrain`` and each Ray worker's in-memory shard draw from it."""

    def __init__(self, t: TrainConfig, with_counts: bool) -> None:
        self.batch_size, self.device, self.with_counts = t.batch_size, t.device, with_counts
        self.cache = (
            t.device_cache if t.device_cache is not None else torch.device(t.device).type != "cpu"
        )
        self._held: dict[int, DeviceCSR] = {}

    def __call__(self, cells: Cells, shuffle: bool, seed: int) -> Iterator[Minibatch]:
        if self.cache and cells.preload:
            if id(cells) not in self._held:
                self._held[id(cells)] = DeviceCSR(*cells.non_empty_matrix(), self.device)
            yield from self._held[id(cells)].minibatches(
                self.batch_size, shuffle, seed, with_counts=self.with_counts
            )
            return
        for _, x, c in cells.minibatches(self.batch_size, shuffle=shuffle, seed=seed):
            yield minibatch_from_csr(x, c, self.device, with_counts=self.with_counts)


def pretrain(
    cfg: PretrainConfig,
    out: str | os.PathLike | None,
    quiet: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    source: CellSource | None = None,
    on_epoch_end: Sequence[Callable[[EpochStats], None]] = (),
) -> tuple[TrainedModel, History]:
    """Train and save to ``out`` (None: keep the model in memory only, without checkpoints);
    ``source`` as in ``plan_from``; ``on_epoch_end(stats)`` after each epoch's checkpoint."""
    from tqdm.auto import tqdm

    plan = plan_from(cfg, source=source)
    t = plan.cfg.train
    log.info("training schedule %s", schedule.describe(plan.schedule_record()))
    train_cells = plan.cells(plan.train_rows)
    val_cells = plan.cells(plan.val_rows) if len(plan.val_rows) else None
    vae = plan.new_vae(train_cells).to(t.device)

    batches = RunBatches(t, vae.needs_dense_counts)
    ckpt = (
        CheckpointStore(Path(f"{out}.checkpoint"), plan.fingerprint()) if resume and out else None
    )
    bar = tqdm(total=t.max_epochs, desc="pretrain", unit="epoch", disable=True if quiet else None)

    def progress(s: EpochStats) -> None:
        bar.n = s.epoch + 1
        val = f"{s.val_elbo:.1f}" if s.val_elbo is not None else "-"
        bar.set_postfix_str(f"cells/s={s.cells_per_s:,.0f} loss={s.train_loss:.1f} val_elbo={val}")

    history = fit(
        vae,
        lambda seed: batches(train_cells, True, seed),
        (lambda: batches(val_cells, False, 0)) if val_cells is not None else None,
        t,
        ckpt,
        on_epoch_end=(progress, *on_epoch_end),
    )
    bar.close()
    trained = plan.trained_model(vae, history, warn_if_undertrained(plan, history))
    if out is not None:
        save_model(trained, out, overwrite)
    if ckpt is not None:
        ckpt.remove()
    return trained, history

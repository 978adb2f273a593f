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
from censusvi.data.cells import Cells
from censusvi.data.hvg import highly_variable_genes
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
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n if train_fraction >= 1 else max(1, int(round(n * train_fraction)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


@dataclass
class RunPlan:
    """Everything decided before training: cells, genes, batch codes, split, architecture.

    Built once on the driver (``plan_run``); the distributed trainer rebuilds the same plan in
    each worker from the data source and the decided genes and categories (``plan_from``).
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

    def schedule_record(self, workers: int = 1) -> dict[str, Any]:
        """The schedule this run trains with (``censusvi.train.schedule.record``)."""
        t = self.cfg.train
        return schedule.record(
            t.schedule,
            len(self.source.obs),
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
            "n_cells": len(self.source.obs),
        }

    def cells(self, rows: np.ndarray) -> Cells:
        alignment = self.genes.align({"var ids": self.source.var_ids}, min_overlap=1.0)
        return Cells(self.source, rows, alignment, self.cov[rows])

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
            "n_cells": len(self.source.obs),
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
    hvg_reducer=None,
    source: CellSource | None = None,
) -> RunPlan:
    """The run's plan; genes and categories are chosen here unless given (as in a worker).
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
    genes = genes if genes is not None else choose_genes(source, d, hvg_reducer)
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

"""A pretraining run's settings: the ``data``, ``model`` and ``train`` sections of a config file
(``censusvi.config_files``) as frozen dataclasses, and what a checkpoint pins of them."""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from censusvi.config_files import read_config
from censusvi.numeric import is_whole
from censusvi.train.loop import TrainConfig
from censusvi.typed import typed

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

    def __post_init__(self) -> None:
        if not (is_whole(self.n_hvg) and self.n_hvg >= 0):
            raise ValueError(f"n_hvg={self.n_hvg!r}: a whole number of genes >= 0 (0: every gene)")
        if not self.batch_keys:
            raise ValueError(
                "batch_keys is empty: name the obs column(s) whose values make the batch, "
                f"e.g. --batch-keys batch (default: {','.join(CENSUS_BATCH_KEYS)})"
            )
        for name in ("batch_keys", "hvg_keys", "categorical_covariate_keys"):
            given = getattr(self, name) or ()
            repeated = sorted({k for k in given if list(given).count(k) > 1})
            if repeated:
                raise ValueError(f"{name} names {repeated} more than once: name each column once")
        both = sorted(set(self.batch_keys) & set(self.categorical_covariate_keys or ()))
        if both:
            raise ValueError(
                f"{both} is both a batch key and a covariate key: the batch already holds it; "
                "drop it from the covariate keys"
            )


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
    hints = typing.get_type_hints(cls)
    return cls(**{key: typed(f"{name}.{key}", value, hints[key]) for key, value in d.items()})


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


def settings_sections(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat keyword settings (``n_hvg=2000``, ``max_epochs=50``) as the ``data``, ``model`` and
    ``train`` overrides ``load_pretrain_config`` takes; a name no section has is refused."""
    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}}
    left = dict(settings)
    for name, cls in (("data", DataConfig), ("model", ModelSettings), ("train", TrainConfig)):
        sections[name] = {f.name: left.pop(f.name) for f in fields(cls) if f.name in left}
    if left:
        raise ValueError(
            f"unknown pretrain setting(s) {sorted(left)}: use fields of DataConfig, "
            "ModelSettings or TrainConfig (censusvi.train.pretrain, censusvi.train.loop)"
        )
    return sections

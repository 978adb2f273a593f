"""A model directory: ``config.json`` (architecture, genes, batches, provenance) + ``weights.safetensors``.

No pickle anywhere: weights are safetensors, everything else is JSON. Directories are written under
a temporary name and renamed, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from censusvi.atomic import atomic_directory
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.vae import VAE
from censusvi.numeric import is_whole
from censusvi.untrusted import read_json_file

FORMAT = "censusvi-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
# What a user with cells of batches the model lacks does instead, per entrance (the covariate error's end)
UNKNOWN_BATCH_FIX = "Map new batches onto the reference with `censusvi map` instead of `embed`."
UNKNOWN_BATCH_FIX_REFERENCE = (
    "A reference (index, fine-tuning) must hold only the model's batches: select them with "
    "--obs-filter, or pretrain a model on them; a query of new batches is mapped by `censusvi "
    "annotate` itself."
)
REQUIRED_KEYS = {"model": dict, "genes": dict, "batch_keys": list, "batch_categories": list}
OPTIONAL_KEYS = {"provenance": dict, "covariates": dict}  # may be absent


@dataclass
class TrainedModel:
    """The network plus what it needs to read new data: gene order and batch categories."""

    vae: VAE
    genes: GeneVocabulary
    batch_keys: tuple[str, ...]
    batch_categories: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    covariate_keys: tuple[str, ...] = ()
    """Extra categorical covariates (obs columns) injected beside the batch, in order."""
    covariate_categories: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        cfg = self.vae.cfg
        sizes = tuple(len(c) for c in self.covariate_categories)
        if len(self.covariate_keys) != len(sizes) or sizes != cfg.extra_categories:
            raise ValueError(
                f"covariates {list(self.covariate_keys)} with {list(sizes)} levels do not match the "
                f"model's extra_categories {list(cfg.extra_categories)}"
            )
        if len(self.genes) != cfg.n_genes:
            raise ValueError(
                f"{len(self.genes)} genes in the vocabulary but the model has {cfg.n_genes}"
            )
        if len(self.batch_categories) != cfg.n_batches:
            raise ValueError(
                f"{len(self.batch_categories)} batch categories but the model has {cfg.n_batches}"
            )
        if len(set(self.batch_categories)) != len(self.batch_categories):
            from collections import Counter

            seen = [b for b, n in Counter(self.batch_categories).items() if n > 1]
            raise ValueError(f"batch categories repeat ({seen[:3]}): each batch is one column")

    @property
    def config(self) -> ModelConfig:
        return self.vae.cfg

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the model directory ``censusvi pretrain`` writes (``save_model``)."""
        return save_model(self, out, overwrite)

    def encoder_digest(self) -> str:
        """16 hex digits of a SHA-256 over the encoder's weights: the same for two models exactly
        when they embed the reference's cells alike (an index records the one it was built
        with). A model extended by surgery (``mapping.surgery``) digests as its reference: the
        encoder's columns for the batches it mapped are left out (the reference's are frozen)."""
        import hashlib

        mapped = len(self.provenance.get("mapped_batches") or ())
        n_ref = len(self.batch_categories) - mapped
        covariates = sum(self.config.covariate_sizes) if self.config.encode_covariates else 0
        h = hashlib.sha256()
        for name, t in sorted(self.vae.z_encoder.state_dict().items()):
            if mapped and covariates and name.endswith(".linear.weight"):
                start = t.shape[1] - covariates + n_ref  # surgery's columns follow the reference's
                t = torch.cat([t[:, :start], t[:, start + mapped :]], dim=1)
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def covariate_codes(self, obs, where: str, fix: str = UNKNOWN_BATCH_FIX) -> np.ndarray:
        """(n, 1 + k) codes: the batch (from ``batch_keys``) then each extra covariate. ``fix``
        ends the error for batches the model lacks: what the caller's user should do instead."""
        from censusvi.data.source import codes_in  # pandas: not in the model core

        if missing := [k for k in self.batch_keys if k not in obs.columns]:
            raise ValueError(
                f"{where}: obs lacks {missing}, which the model's batch is built from "
                f"({list(self.batch_keys)}): add the column(s), e.g. each cell's sample"
            )
        batch, unknown = codes_in(obs, self.batch_keys, self.batch_categories, where)
        if unknown:
            raise ValueError(
                f"{where}: {len(unknown)} batch(es) unknown to the model, e.g. {unknown[:3]}; the "
                f"model knows {len(self.batch_categories)} batches built from "
                f"{list(self.batch_keys)} (e.g. {list(self.batch_categories[:3])}). {fix}"
            )
        return np.concatenate(
            [batch.reshape(-1, 1), self.extra_covariate_codes(obs, where)], axis=1
        )

    def extra_covariate_codes(self, obs, where: str) -> np.ndarray:
        """(n, k) codes of the extra categorical covariates (k may be 0)."""
        from censusvi.data.source import codes_in

        cols: list[np.ndarray] = []
        for key, cats in zip(self.covariate_keys, self.covariate_categories):
            if key not in obs.columns:
                raise ValueError(
                    f"{where}: covariate column {key!r} (used by the model) is not in obs"
                )
            codes, unknown = codes_in(obs, [key], cats, where, "covariate")
            if unknown:
                raise ValueError(
                    f"{where}: obs[{key!r}] has values the model never saw: {unknown[:3]}; "
                    f"it knows {list(cats[:5])}"
                )
            cols.append(codes)
        return np.stack(cols, axis=1) if cols else np.zeros((len(obs), 0), dtype=np.int64)


def _config_dict(m: TrainedModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": m.config.to_dict(),
        "genes": m.genes.to_dict(),
        "batch_keys": list(m.batch_keys),
        "batch_categories": list(m.batch_categories),
        "covariates": {
            "keys": list(m.covariate_keys),
            "categories": [list(c) for c in m.covariate_categories],
        },
        "provenance": m.provenance,
    }


def save_model(m: TrainedModel, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model directory; ``out`` may be an older model, else needs ``overwrite``."""
    with atomic_directory(out, "model", overwrite) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in m.vae.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(_config_dict(m), indent=1))
    return Path(out)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"model {str(path)!r} {what}: give a censusvi model directory (what `censusvi "
            "pretrain --out` wrote), an scvi-tools model directory, or models:/NAME/VERSION"
        )
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a censusvi model directory: {CONFIG_FILE} is missing "
            f"(expected {CONFIG_FILE} + {WEIGHTS_FILE}, as written by `censusvi pretrain`)"
        )
    try:
        d = read_json_file(cfg_file, "the model's config")
    except ValueError as e:
        raise ValueError(f"{e}; the model directory is damaged") from None
    if not isinstance(d, dict):
        raise ValueError(
            f"{cfg_file} holds a JSON {type(d).__name__}, not an object; it is damaged"
        )
    version = d.get("format_version", 0)
    if d.get("format") != FORMAT or not is_whole(version) or version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: format {d.get('format')!r} v{d.get('format_version')} is not a "
            f"{FORMAT} v<={FORMAT_VERSION} model"
        )
    for key in REQUIRED_KEYS:
        if key not in d:
            raise ValueError(
                f"{cfg_file}: the key {key!r} is missing; the file is damaged or hand-edited "
                f"(a {FORMAT} config holds {sorted(REQUIRED_KEYS)})"
            )
    for key, kind in {**REQUIRED_KEYS, **OPTIONAL_KEYS}.items():
        if key in d and not isinstance(d[key], kind):
            raise ValueError(
                f"{cfg_file}: {key!r} must be a JSON {'object' if kind is dict else 'list'}, "
                f"got {type(d[key]).__name__}"
            )
    if not all(isinstance(k, str) and k for k in d["batch_keys"]):
        raise ValueError(f"{cfg_file}: 'batch_keys' must be a list of obs column names")
    if not isinstance(d["genes"].get("ids"), list):
        raise ValueError(f"{cfg_file}: 'genes' needs 'ids', the list of the model's gene ids")
    _check_texts(cfg_file, d)
    return d


def _check_texts(cfg_file: Path, d: dict) -> None:
    """The labels a model matches data by are text, as ``save_model`` writes them: a null, a
    number or an object there matched nothing, or a NaN cell, or was a TypeError."""
    covariates = d.get("covariates") or {}
    lists = {
        "batch_categories": d["batch_categories"],
        "genes.ids": d["genes"]["ids"],
        "genes.symbols": d["genes"].get("symbols") or [],
        "covariates.keys": covariates.get("keys") or [],
    }
    categories = covariates.get("categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, list) for c in categories):
        raise ValueError(f"{cfg_file}: 'covariates.categories' must be a list of lists of labels")
    lists |= {f"covariates.categories[{i}]": c for i, c in enumerate(categories)}
    for name, values in lists.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{cfg_file}: '{name}' must be a list of text labels; it is damaged")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model from its directory, checking every tensor's name and shape.

    An scvi-tools model directory (``model.pt``, no ``config.json``) is imported on the fly.
    """
    if not str(path).strip():
        raise FileNotFoundError("an empty model path: give a model directory or models:/ URI")
    if str(path).startswith("models:/"):  # a registered version: read from a scratch copy
        import tempfile

        from censusvi.registry.fetch import download_model

        with tempfile.TemporaryDirectory(prefix="censusvi-model-") as tmp:
            files = download_model(str(path), tmp)  # the registry's own errors pass on
            try:
                return load_model(files, device)
            except (ValueError, OSError) as e:  # name the version, not the scratch folder
                raise type(e)(str(e).replace(tmp, str(path))) from None
    path = Path(path)
    if (path / "model" / CONFIG_FILE).is_file():
        path = path / "model"  # a registered version: model/ (and index/) under the run's root
    if not (path / CONFIG_FILE).exists() and (path / "model.pt").is_file():
        from censusvi.model.scvi_tools_io import import_scvi_tools

        return import_scvi_tools(path)
    d = read_config(path)
    try:
        config = ModelConfig.from_dict(d["model"])
        with torch.device("meta"):  # shapes only: a config naming 1e12 latents allocates nothing
            shell = VAE(config).state_dict()
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # a setting missing or wrong
        raise ValueError(f"{path / CONFIG_FILE}: 'model' does not describe a model: {e}") from e
    check_shapes(
        {k: tuple(v.shape) for k, v in shell.items()}, stored_shapes(path / WEIGHTS_FILE), path
    )
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    wrong = [
        f"{k}: {state[k].dtype} (not {v.dtype})"
        for k, v in shell.items()
        if state[k].dtype != v.dtype
    ]
    if wrong:  # load_state_dict would cast them (bool weights to 0/1) in silence
        raise ValueError(
            f"{path / WEIGHTS_FILE}: tensors of another type: {', '.join(wrong[:3])}; the model directory is damaged"
        )
    check_finite(state, path / WEIGHTS_FILE)
    vae = VAE(config)
    vae.load_state_dict(state)
    vae.to(device).eval()
    try:
        covariates = d.get("covariates") or {}
        return TrainedModel(
            vae=vae,
            genes=GeneVocabulary.from_dict(d["genes"]),
            batch_keys=tuple(d["batch_keys"]),
            batch_categories=tuple(d["batch_categories"]),
            provenance=d.get("provenance", {}),
            covariate_keys=tuple(covariates.get("keys", ())),
            covariate_categories=tuple(tuple(c) for c in covariates.get("categories", ())),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: {e}") from e


def stored_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from the safetensors header (nothing else is read)."""
    from safetensors import safe_open

    if weights.exists() and not weights.is_file():  # a FIFO blocked the reader for good
        raise ValueError(f"{weights} is not a regular file. The model directory is damaged")

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {weights}: {e}. The model directory is damaged") from e


def check_shapes(expected: dict, stored: dict, path, described_by: str = f"its {CONFIG_FILE}"):
    """A ValueError naming the tensors that do not fit the architecture, before any is loaded."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [
        f"{k}: file {stored[k]} vs model {expected[k]}"
        for k in expected
        if k in stored and tuple(stored[k]) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {path} do not fit the architecture in {described_by}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )


def check_finite(state: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the first tensors that hold NaN or infinite values, or a
    batch normalisation's negative running variance: such a model loads and runs, but every
    embedding it gives is NaN."""
    bad = [
        f"{k} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for k, t in state.items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise ValueError(
            f"{where}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
            f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the model is unusable "
            "(training diverged before it was saved, or the file is damaged): retrain it"
        )
    negative = [k for k, t in state.items() if k.endswith("running_var") and (t < 0).any()]
    if negative:  # batch normalisation divides by sqrt(running_var): NaN for every cell
        raise ValueError(
            f"{where}: negative variances in {', '.join(negative[:3])}: the model is unusable "
            "(the file is damaged or edited): retrain it or restore it"
        )

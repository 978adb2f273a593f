"""Reading and writing scvi-tools model directories (``model.pt``) without scvi-tools: the
architecture from its ``attr_dict``, the weights renamed both ways. ``model.pt`` itself is read
without running pickled code (``scvi_tools_pt``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from censusvi.atomic import atomic_directory
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.io import TrainedModel, check_finite, check_shapes
from censusvi.model.scvi_tools import scvi_tools_name, state_dict_from_scvi_tools
from censusvi.model.scvi_tools_pt import MODEL_FILE, read_model_pt
from censusvi.model.vae import VAE

log = logging.getLogger(__name__)


def _settings(attr: dict[str, Any]) -> dict[str, Any]:
    params = attr.get("init_params_", {})
    if "non_kwargs" in params:  # scvi-tools >= 0.15 layout
        flat = dict(params["non_kwargs"])
        for v in params.get("kwargs", {}).values():
            flat.update(v if isinstance(v, dict) else {})
        return flat
    return dict(params)


def _refuse(setting: str, value: Any, supported: str) -> None:
    raise ValueError(
        f"scvi-tools setting {setting}={value!r} is not supported by censusvi ({supported})"
    )


def model_config_from_scvi_tools(
    attr: dict[str, Any], n_genes: int
) -> tuple[ModelConfig, dict[str, Any]]:
    """censusvi's ModelConfig for an scvi-tools SCVI ``attr_dict``; refuses unsupported settings."""
    reg = attr.get("registry_", {})
    if reg.get("model_name", "SCVI") != "SCVI":
        _refuse("model_name", reg.get("model_name"), "only SCVI models")
    s = _settings(attr)
    if s.get("latent_distribution", "normal") != "normal":
        _refuse("latent_distribution", s["latent_distribution"], "normal only")
    if s.get("use_layer_norm", "none") != "none":
        _refuse("use_layer_norm", s["use_layer_norm"], "none only")
    if s.get("use_batch_norm", "both") != "both":
        _refuse("use_batch_norm", s["use_batch_norm"], "both only")
    if not s.get("deeply_inject_covariates", True):
        _refuse("deeply_inject_covariates", False, "covariates injected into every layer only")
    if s.get("dispersion", "gene") not in ("gene", "gene-batch"):
        _refuse("dispersion", s["dispersion"], "gene or gene-batch")
    if s.get("gene_likelihood", "zinb") not in ("nb", "zinb", "poisson"):
        _refuse("gene_likelihood", s["gene_likelihood"], "nb, zinb or poisson")
    fields = reg.get("field_registries", {})
    if (
        fields.get("extra_continuous_covs", {})
        .get("summary_stats", {})
        .get("n_extra_continuous_covs", 0)
    ):
        _refuse(
            "continuous_covariate_keys",
            reg.get("setup_args", {}).get("continuous_covariate_keys"),
            "categorical covariates only",
        )
    if fields.get("size_factor", {}).get("state_registry"):
        _refuse(
            "size_factor_key",
            reg.get("setup_args", {}).get("size_factor_key"),
            "library from counts",
        )
    batch = fields.get("batch", {}).get("state_registry", {})
    categories = [str(c) for c in batch.get("categorical_mapping", ["0"])]
    extra = fields.get("extra_categorical_covs", {}).get("state_registry", {})
    extra_keys = [str(k) for k in extra.get("field_keys", [])]
    extra_cats = [[str(c) for c in extra["mappings"][k]] for k in extra_keys]
    cfg = ModelConfig(
        n_genes=n_genes,
        n_batches=len(categories),
        n_hidden=int(s.get("n_hidden", 128)),
        n_latent=int(s.get("n_latent", 10)),
        n_layers=int(s.get("n_layers", 1)),
        dropout_rate=float(s.get("dropout_rate", 0.1)),
        likelihood=s.get("gene_likelihood", "zinb"),
        dispersion=s.get("dispersion", "gene"),
        latent_library=not s.get("use_observed_lib_size", True),
        encode_covariates=bool(s.get("encode_covariates", False)),
        extra_categories=tuple(len(c) for c in extra_cats),
    )
    meta = {
        "batch_key": str(batch.get("original_key", "batch")),
        "batch_categories": categories,
        "covariate_keys": extra_keys,
        "covariate_categories": extra_cats,
        "scvi_version": reg.get("scvi_version"),
    }
    return cfg, meta


def import_scvi_tools(
    path: str | os.PathLike, batch_keys: tuple[str, ...] | None = None
) -> TrainedModel:
    """A censusvi model from an scvi-tools SCVI directory (e.g. the Census's published model)."""
    d = read_model_pt(path)
    missing = {"model_state_dict", "var_names", "attr_dict"} - set(d)
    if missing:
        raise ValueError(
            f"{path}: {MODEL_FILE} lacks {sorted(missing)}; not an scvi-tools model directory"
        )
    var_names = [str(v) for v in np.asarray(d["var_names"])]
    where = Path(path) / MODEL_FILE if Path(path).is_dir() else path
    try:
        cfg, meta = model_config_from_scvi_tools(d["attr_dict"], len(var_names))
    except ValueError as e:
        raise ValueError(f"{where}: its attr_dict: {e}") from None
    with torch.device("meta"):  # shapes only: an attr_dict naming 1e12 latents allocates nothing
        expected = VAE(cfg).state_dict()
    state = state_dict_from_scvi_tools(d["model_state_dict"], expected)
    check_shapes(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in state.items()},
        where,
        "its attr_dict and var_names",
    )
    # A buffer scvi-tools did not save is a shape-only stand-in here: the real VAE keeps its own.
    state = {k: v for k, v in state.items() if not v.is_meta}
    # What this model runs, named as scvi-tools names it; a NaN would embed every cell as NaN.
    check_finite({scvi_tools_name(k): v for k, v in state.items()}, where)
    vae = VAE(cfg)
    vae.load_state_dict(state, strict=False)  # every other key was checked just above
    return TrainedModel(
        vae=vae.eval(),
        genes=GeneVocabulary(tuple(var_names)),
        batch_keys=tuple(batch_keys) if batch_keys else (meta["batch_key"],),
        batch_categories=tuple(meta["batch_categories"]),
        provenance={"imported_from": str(path), "scvi_tools_version": meta["scvi_version"]},
        covariate_keys=tuple(meta["covariate_keys"]),
        covariate_categories=tuple(tuple(c) for c in meta["covariate_categories"]),
    )


def _unused_heads(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Zero weights for what scvi-tools builds but this model never runs (its loader wants them)."""
    g, h = cfg.n_genes, cfg.n_hidden
    enc_in = g + (sum(cfg.covariate_sizes) if cfg.encode_covariates else 0)
    out: dict[str, torch.Tensor] = {}
    if not cfg.latent_library:
        p = "l_encoder.encoder.fc_layers.Layer 0."
        out |= {
            p + "0.weight": torch.zeros(h, enc_in),
            p + "0.bias": torch.zeros(h),
            p + "1.weight": torch.ones(h),
            p + "1.bias": torch.zeros(h),
            p + "1.running_mean": torch.zeros(h),
            p + "1.running_var": torch.ones(h),
            p + "1.num_batches_tracked": torch.zeros((), dtype=torch.long),
        }
        for head in ("mean_encoder", "var_encoder"):
            out |= {
                f"l_encoder.{head}.weight": torch.zeros(1, h),
                f"l_encoder.{head}.bias": torch.zeros(1),
            }
    out |= {
        "decoder.px_r_decoder.weight": torch.zeros(g, h),
        "decoder.px_r_decoder.bias": torch.zeros(g),
    }
    if cfg.likelihood != "zinb":
        out |= {
            "decoder.px_dropout_decoder.weight": torch.zeros(g, h),
            "decoder.px_dropout_decoder.bias": torch.zeros(g),
        }
    return out


def export_scvi_tools(m: TrainedModel, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``out/model.pt`` that ``scvi.model.SCVI.load(out, adata)`` opens."""
    genes = np.array(m.genes.ids, dtype=object)
    attr = _attr_dict(m, _registry(m, genes))
    with atomic_directory(out, "scvi-tools", overwrite) as tmp:
        torch.save(
            {"model_state_dict": _scvi_state(m), "var_names": genes, "attr_dict": attr},
            tmp / MODEL_FILE,
        )
    return Path(out)


def _scvi_state(m: TrainedModel) -> dict:
    """The weights under scvi-tools' names, with the buffers its module registers."""
    cfg = m.config
    state = {scvi_tools_name(k): v.detach().cpu().clone() for k, v in m.vae.state_dict().items()}
    if cfg.prior_components:  # the encoder and decoder are scVI's; only training reads the prior
        log.warning(
            "scvi-tools' SCVI has no VampPrior: the export embeds and decodes as this model does, "
            "but training it further in scvi-tools uses N(0, I)"
        )
        del state["pseudo_inputs_kg"], state["pseudo_covariates_kc"]
    for name in ("library_log_means", "library_log_vars"):  # scvi-tools keeps them (1, n_batch)
        if cfg.latent_library:
            state[name] = state[name].reshape(1, -1)
        else:
            del state[name]  # scvi-tools registers them only for a latent library
    return state | _unused_heads(cfg)


def _covariates_registry(m: TrainedModel) -> dict:
    if not m.covariate_keys:
        return {
            "data_registry": {},
            "state_registry": {},
            "summary_stats": {"n_extra_categorical_covs": 0},
        }
    return {
        "data_registry": {"attr_key": "_scvi_extra_categorical_covs", "attr_name": "obsm"},
        "state_registry": {
            "mappings": {
                k: np.array(c, dtype=object)
                for k, c in zip(m.covariate_keys, m.covariate_categories)
            },
            "field_keys": list(m.covariate_keys),
            "n_cats_per_key": [len(c) for c in m.covariate_categories],
        },
        "summary_stats": {"n_extra_categorical_covs": len(m.covariate_keys)},
    }


def _registry(m: TrainedModel, genes: np.ndarray) -> dict:
    """scvi-tools' AnnData registry for ``setup_anndata`` with this model's batch and covariates."""
    batch_key = m.batch_keys[0] if len(m.batch_keys) == 1 else "batch"
    return {
        "scvi_version": "1.4.2",
        "model_name": "SCVI",
        "setup_method_name": "setup_anndata",
        "setup_args": {
            "layer": None,
            "batch_key": batch_key,
            "labels_key": None,
            "size_factor_key": None,
            "categorical_covariate_keys": list(m.covariate_keys) or None,
            "continuous_covariate_keys": None,
        },
        "field_registries": {
            "X": {
                "data_registry": {"attr_name": "X", "attr_key": None},
                "state_registry": {"n_obs": 0, "n_vars": len(genes), "column_names": genes},
                "summary_stats": {"n_vars": len(genes), "n_cells": 0},
            },
            "batch": {
                "data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                "state_registry": {
                    "categorical_mapping": np.array(m.batch_categories, dtype=object),
                    "original_key": batch_key,
                },
                "summary_stats": {"n_batch": len(m.batch_categories)},
            },
            "labels": {
                "data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                "state_registry": {
                    "categorical_mapping": np.array([0]),
                    "original_key": "_scvi_labels",
                },
                "summary_stats": {"n_labels": 1},
            },
            "size_factor": {"data_registry": {}, "state_registry": {}, "summary_stats": {}},
            "extra_categorical_covs": _covariates_registry(m),
            "extra_continuous_covs": {
                "data_registry": {},
                "state_registry": {},
                "summary_stats": {"n_extra_continuous_covs": 0},
            },
        },
    }


def _attr_dict(m: TrainedModel, registry: dict) -> dict:
    """The model's attributes as ``SCVI.save`` writes them: init parameters and the registry."""
    cfg = m.config
    non_kwargs = {
        "n_hidden": cfg.n_hidden,
        "n_latent": cfg.n_latent,
        "n_layers": cfg.n_layers,
        "dropout_rate": cfg.dropout_rate,
        "dispersion": cfg.dispersion,
        "gene_likelihood": cfg.likelihood,
        "use_observed_lib_size": not cfg.latent_library,
        "latent_distribution": "normal",
    }
    return {
        "init_params_": {
            "non_kwargs": non_kwargs,
            "kwargs": {"kwargs": {"encode_covariates": cfg.encode_covariates}},
        },
        "registry_": registry,
        "is_trained_": True,
        "history_": None,
        "train_indices_": None,
        "validation_indices_": None,
        "test_indices_": None,
        "run_id_": None,
        "run_name_": None,
        "get_normalized_function_name_": "get_normalized_expression",
    }

"""Each subcommand: read its inputs, call the function of ``censusvi.api`` (or of the registry)
of the same name, write its output atomically and print a one-line summary (JSON where a script
reads it). No command decides anything the library does not decide for a notebook user too."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from censusvi.numeric import json_safe
from censusvi.outputs import UNS_KEY, label_keys_of, predicted_column
from censusvi.train.schedule import describe as describe_schedule

log = logging.getLogger("censusvi.cli")

if TYPE_CHECKING:
    import anndata as ad


def keys(s: str | None) -> tuple[str, ...]:
    """``A,B`` -> ("A", "B")."""
    return tuple(k.strip() for k in (s or "").split(",") if k.strip())


def _mapped(adata, latent_key: str, src) -> ad.AnnData:
    """The cells the model could map, which a command writes (the API leaves NaN in the rows of
    cells without counts over the model's genes)."""
    kept = np.isfinite(adata.obsm[latent_key]).all(axis=1)
    if kept.all():
        return adata
    n, k = adata.n_obs, int((~kept).sum())
    log.warning(
        "%s: %d of %d cells had no counts over the model's genes and are left out", src, k, n
    )
    return adata[kept].copy()


def _write(adata, a: argparse.Namespace) -> None:
    from censusvi.inference import write_h5ad_atomic

    write_h5ad_atomic(adata, a.out, a.overwrite)


def _surgery(a: argparse.Namespace) -> dict[str, Any]:
    return {"train": a.train, "max_epochs": a.max_epochs}


def _read(path):
    """An input .h5ad whose annotated copy the command writes: its uns must write back."""
    from censusvi.data.h5ad import check_uns_writable, read_h5ad

    adata = read_h5ad(path)
    check_uns_writable(adata, str(path))
    return adata


def cmd_ingest(a: argparse.Namespace) -> int:
    from censusvi.data.ingest import ingest

    print(f"wrote SOMA experiment {ingest(a.files, a.out, a.layer)}")
    return 0


PRETRAIN_FLAGS = {  # flag -> config field (data, model and train sections)
    "hvg_keys": "hvg_keys",
    "covariate_keys": "categorical_covariate_keys",
    **dict.fromkeys(("n_hvg", "obs_filter", "layer")),
    **dict.fromkeys(("max_epochs", "batch_size", "lr", "n_epochs_kl_warmup", "seed", "device")),
    **dict.fromkeys(("schedule", "n_hidden", "n_latent", "n_layers", "likelihood")),
    "prior_components": None,
}


def cmd_pretrain(a: argparse.Namespace) -> int:
    from censusvi import api

    settings: dict[str, Any] = {}
    for flag, field in PRETRAIN_FLAGS.items():
        value = getattr(a, flag)
        if value is not None:
            settings[field or flag] = keys(value) if flag.endswith("_keys") else value
    if a.early_stopping:
        settings["early_stopping"] = True
    model = api.pretrain(
        a.source, None, batch_keys=None if a.batch_keys is None else keys(a.batch_keys),
        out=a.out, config=a.config,
        overrides=a.set, overwrite=a.overwrite, quiet=a.quiet, resume=not a.no_resume, **settings,
    )  # fmt: skip
    p = model.provenance
    val = p["final_val_elbo"]
    summary = {"model": str(a.out), "epochs": p["epochs"]}
    summary |= {"final_train_loss": round(p["final_train_loss"], 3)}
    summary |= {"final_val_elbo": None if val is None else round(val, 3)}
    summary |= {"n_genes": len(model.genes), "n_batches": len(model.batch_categories)}
    print(json.dumps(summary))
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from censusvi import api

    adata = _read(a.data)
    api.embed(
        adata, a.model, a.latent_key, layer=a.layer, batch_size=a.batch_size,
        min_gene_overlap=a.min_gene_overlap, name=str(a.data),
    )  # fmt: skip
    adata.uns[UNS_KEY]["model"] = str(a.model)
    adata = _mapped(adata, a.latent_key, a.data)
    _write(adata, a)
    print(f"wrote {a.out}: obsm[{a.latent_key!r}] {adata.obsm[a.latent_key].shape}")
    return 0


def cmd_import_scvi_tools(a: argparse.Namespace) -> int:
    from censusvi.model.scvi_tools_io import import_scvi_tools

    m = import_scvi_tools(a.dir, keys(a.batch_keys) or None)
    m.save(a.out, a.overwrite)
    print(
        f"wrote {a.out}: {len(m.genes)} genes, {len(m.batch_categories)} batches "
        f"(batch = {'+'.join(m.batch_keys)}), likelihood {m.config.likelihood}"
    )
    return 0


def cmd_export_scvi_tools(a: argparse.Namespace) -> int:
    from censusvi.model.io import load_model
    from censusvi.model.scvi_tools_io import export_scvi_tools

    export_scvi_tools(load_model(a.model), a.out, a.overwrite)
    print(f"wrote {a.out}/model.pt (open with scvi.model.SCVI.load({str(a.out)!r}, adata))")
    return 0


def cmd_map(a: argparse.Namespace) -> int:
    from censusvi import api

    adata = _read(a.query)
    mapped_model = api.map_query(
        adata, a.model, a.batch_key, key_added=a.latent_key, layer=a.layer,
        min_gene_overlap=a.min_gene_overlap, **_surgery(a),
    )  # fmt: skip
    _write(_mapped(adata, a.latent_key, a.query), a)
    if a.save_model:
        mapped_model.save(a.save_model, a.overwrite)
    report = {k: v for k, v in adata.uns[UNS_KEY].items() if k not in ("surgery_query_loss",)}
    report.pop("latent_key", None)
    print(json.dumps({"out": str(a.out), **report}))
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from censusvi import api

    settings = {"max_epochs": a.max_epochs, "classification_ratio": a.classification_ratio}
    m = api.finetune(a.data, a.model, a.labels_key, obs_filter=a.obs_filter, layer=a.layer,
                     seed=a.seed, device=a.device, **settings)  # fmt: skip
    m.save(a.out, a.overwrite)
    r = m.provenance["finetune"]
    last = r["history"][-1]
    print(
        f"wrote {a.out}: fine-tuned {r['epochs']} epochs on {r['cells']} cells "
        f"({r['labelled_cells']} labelled, {len(r['classes'])} types of {a.labels_key!r}); "
        f"last epoch ELBO {last['elbo']:.1f}, classifier accuracy {last['accuracy']:.3f}"
    )
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    from censusvi import api

    ix = api.build_index(
        a.data, a.model, list(keys(a.label_keys)), obs_filter=a.obs_filter, layer=a.layer,
        faiss_device=a.faiss_device, ontology=a.ontology, head=a.head, kind=a.index,
        metric=a.metric,
    )  # fmt: skip
    ix.save(a.out, a.overwrite)
    print(
        f"wrote {a.out}: {ix.meta['n_cells']} cells, {ix.meta['kind']} {ix.meta['metric']} index "
        f"(built on the {ix.device}), labels {ix.meta['label_keys']}"
    )
    return 0


def cmd_annotate(a: argparse.Namespace) -> int:
    from censusvi import api

    adata = _read(a.query)
    api.annotate(
        adata, model=a.model, index=a.index, batch_key=a.batch_key, k=a.k,
        unknown_threshold=a.unknown_threshold, class_balance=a.class_balance,
        majority_voting=a.majority_voting, ontology_threshold=a.ontology_threshold, method=a.method,
        key_added=a.latent_key, layer=a.layer,
        faiss_device=a.faiss_device, **_surgery(a),
    )  # fmt: skip
    out = _mapped(adata, a.latent_key, a.query)
    _write(out, a)
    labels = label_keys_of(out.obs.columns)
    summary = {k: out.obs[predicted_column(k)].value_counts().head(10).to_dict() for k in labels}
    evaluation = out.uns[UNS_KEY]["evaluation"]
    print(
        json.dumps(
            {"out": str(a.out), "cells": out.n_obs, "predicted": summary, "evaluation": evaluation}
        )
    )
    return 0


def cmd_de(a: argparse.Namespace) -> int:
    from censusvi import api
    from censusvi.atomic import write_atomic
    from censusvi.data.h5ad import read_h5ad
    from censusvi.generative.de import top_genes

    adata = read_h5ad(a.data)  # not written back: read without _read's uns check
    res = api.de(
        adata, a.model, a.groupby, _groups(adata, a.groupby, a.group1), a.group2, a.batch_key,
        layer=a.layer, mode=a.mode, delta=a.delta, fdr=a.fdr, n_samples=a.n_samples,
        batch_correction=not a.no_batch_correction, seed=a.seed, quiet=a.quiet, **_surgery(a),
    )  # fmt: skip
    write_atomic(a.out, res.to_csv, suffix=".csv", overwrite=a.overwrite)
    summary = {}
    for comparison, frame in res.groupby("comparison", sort=False):
        summary[comparison] = {"top_genes": top_genes(frame, 10).index.tolist()}
        if a.mode == "change":
            summary[comparison]["n_de_fdr"] = int(frame[f"is_de_fdr_{a.fdr}"].sum())
    print(
        json.dumps({"out": str(a.out), "genes": int(res.index.nunique()), "comparisons": summary})
    )
    return 0


def _groups(adata, groupby: str, group1: str) -> list[str]:
    """``--group1``: a group's own name when the data hold it (Cell Ontology labels have commas:
    "CD4-positive, alpha-beta T cell"), else A,B,... each in turn."""
    held = adata.obs[groupby].astype(str).unique() if groupby in adata.obs else ()
    return [group1] if group1 in set(held) else list(keys(group1))


def cmd_impute(a: argparse.Namespace) -> int:
    from censusvi import api
    from censusvi.generative.impute import LAYER

    out = api.impute(
        _read(a.query), a.model, list(keys(a.genes)), a.batch_key, decode_batch=a.decode_batch,
        library_size=a.library_size, layer=a.layer, quiet=a.quiet, **_surgery(a),
    )  # fmt: skip
    _write(out, a)
    info = out.uns["censusvi_imputation"]
    print(json.dumps({"out": str(a.out), "layer": LAYER, "cells": out.n_obs, **info}))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from censusvi import api

    content = api.report(
        a.mapped, a.reference, a.out, umap_key=a.umap_key if a.umap_out else None,
        overwrite=a.overwrite, label_key=a.label_key, truth_key=a.truth_key,
        batch_key=a.batch_key, png_dir=a.png_dir, per_type=a.per_type, scib=a.scib,
        latent_key=a.latent_key, umap_out=a.umap_out,
    )  # fmt: skip
    e = content["evaluation"] or {}
    summary = {"out": str(a.out), "query_cells": content["n_query_cells"]}
    summary["reference_cells_drawn"] = len(content["reference"]["x"])
    summary |= {k: e[k] for k in ("accuracy", "macro_f1", "ece") if k in e}
    summary |= {"png_dir": str(a.png_dir)} if a.png_dir else {}
    summary |= {"umap_out": str(a.umap_out), "umap_key": a.umap_key} if a.umap_out else {}
    print(json.dumps(json_safe(summary), allow_nan=False))
    return 0


def cmd_models_register(a: argparse.Namespace) -> int:
    from censusvi.registry.versions import register_version

    print(register_version(a.model_dir, a.index, a.name))  # the new version, alone on stdout
    return 0


def cmd_models_list(a: argparse.Namespace) -> int:
    from censusvi.registry.versions import list_versions

    rows = list_versions(a.name)
    if not rows:  # say where was looked: a mistyped store or name shows here
        from censusvi.registry.mlflow_store import absent_sqlite_store, tracking_uri

        where = tracking_uri()
        why = " (no such file)" if absent_sqlite_store(where) else ""
        of = f" of {a.name!r}" if a.name else ""
        print(f"censusvi: no registered versions{of} in {where}{why}", file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        aliases = ",".join(r["aliases"]) or "-"
        metrics = " ".join(
            f"{k.removeprefix('eval.')}={v:.3f}" for k, v in sorted(r["metrics"].items())
        )
        print(f"{r['name']}\t{r['version']}\t{aliases}\tindex={r['has_index']}\t{metrics}")
    return 0


def cmd_models_promote(a: argparse.Namespace) -> int:
    from censusvi.registry.versions import promote

    previous = promote(a.name, a.version, a.alias, force=a.force, tolerance=a.tolerance)
    print(f"{a.name}@{a.alias}: version {previous or '-'} -> {a.version}")
    return 0


def cmd_models_rollback(a: argparse.Namespace) -> int:
    from censusvi.registry.versions import alias_holder, rollback

    current = alias_holder(a.name, a.alias)
    print(f"{a.name}@{a.alias}: version {current} -> {rollback(a.name, a.alias)}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from censusvi.server import run_foreground

    settings: dict[str, Any] = {"model": a.model, "max_cells": a.max_cells}
    if a.token_file is not None:  # "" too: refused as empty, never read as "no authentication"
        settings["token_file"] = a.token_file
    elif a.token is not None:
        if a.token.strip():
            logging.getLogger("censusvi").warning(
                "--token is visible to every user of this machine (ps): prefer --token-file"
            )
        settings["token"] = a.token
    if a.index:
        settings["index"] = a.index
    if a.allow_surgery:
        settings["allow_surgery"] = True
    return run_foreground(settings, a.host, a.port, a.quiet)


def model_info(model_dir: str) -> dict[str, Any]:
    from censusvi.model.io import load_model
    from censusvi.model.vae import n_parameters, n_parameters_scvi_tools

    m = load_model(model_dir)
    return {
        "architecture": m.config.to_dict(),
        "n_parameters": n_parameters(m.vae),
        "n_parameters_scvi_tools": n_parameters_scvi_tools(m.config),
        "n_genes": len(m.genes),
        "n_batches": len(m.batch_categories),
        "batch_keys": list(m.batch_keys),
        "provenance": {k: v for k, v in m.provenance.items() if k != "config"},
    }


def cmd_info(a: argparse.Namespace) -> int:
    info = model_info(a.model)
    if a.json:  # strict JSON: a NaN figure is null
        print(json.dumps(json_safe(info), indent=1, allow_nan=False))
        return 0
    arch, prov = info["architecture"], info["provenance"]
    prior = f"VampPrior ({k} pseudo-cells)" if (k := arch.get("prior_components")) else "N(0, I)"
    library = "latent" if arch["latent_library"] else "observed"
    print(f"censusvi scVI model {a.model}")
    print(
        f"  genes {info['n_genes']}, batches {info['n_batches']} (keys {','.join(info['batch_keys'])})"
    )
    print(
        f"  encoder {arch['n_layers']} x {arch['n_hidden']} -> latent {arch['n_latent']}; "
        f"likelihood {arch['likelihood']}, dispersion {arch['dispersion']}, "
        f"library {library}, prior {prior}"
    )
    print(
        f"  parameters {info['n_parameters']:,} ({info['n_parameters_scvi_tools']:,} as scvi-tools "
        "builds it, with heads this likelihood never uses)"
    )
    print(f"  schedule: {describe_schedule(prov.get('schedule'))}")
    for k, v in prov.items():
        if k != "schedule":  # a model's provenance is text its maker chose: shown, not obeyed
            print(f"  {k}: {_printable(v)}")
    return 0


def _printable(v) -> str:
    """``str(v)`` with control characters (terminal escapes, newlines) shown escaped."""
    text = str(v)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")

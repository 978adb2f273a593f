"""The ``censusvi`` command line. Each subcommand parses, builds a config and calls the library.

Command lines named in the issues are contracts: ``ingest``, ``pretrain``, ``embed``, ``info``,
``map``, ``index``, ``annotate``, ``models register|promote|list``, ``serve``, ``de``, ``impute``.
Errors the user can fix (bad input, bad settings) print one ``censusvi: error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from censusvi import defaults
from censusvi.atomic import check_output
from censusvi.data.vocabulary import DEFAULT_MIN_OVERLAP
from censusvi.extras import MissingExtra, needs_extras
from censusvi.outputs import LATENT_KEY, UMAP_KEY, label_keys_of, predicted_column
from censusvi.registry.mlflow_store import TRACKING_HELP, RegistryUnreachable
from censusvi.registry.versions import PromotionRefused
from censusvi.train.schedule import AUTO_CENSUS_MIN_CELLS
from censusvi.train.schedule import CHOICES as SCHEDULE_CHOICES
from censusvi.train.schedule import describe as describe_schedule

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    KeyError,
    FloatingPointError,
    TimeoutError,
    PromotionRefused,
    RegistryUnreachable,
    MissingExtra,  # an extra the command needs is not installed: which one, and the pip line
)


def _keys(s: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in s.split(",") if k.strip())


def cmd_ingest(a: argparse.Namespace) -> int:
    from censusvi.data.soma import ingest

    out = ingest(a.files, a.out)
    print(f"wrote SOMA experiment {out}")
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    from censusvi.config_files import locate
    from censusvi.train.pretrain import load_pretrain_config, pretrain

    data: dict[str, Any] = {"source": a.source} if a.source else {}
    for flag, key in (
        ("batch_keys", "batch_keys"),
        ("hvg_keys", "hvg_keys"),
        ("covariate_keys", "categorical_covariate_keys"),
    ):
        if getattr(a, flag) is not None:
            data[key] = _keys(getattr(a, flag))
    for key in ("n_hvg", "obs_filter", "layer"):
        if getattr(a, key) is not None:
            data[key] = getattr(a, key)
    train: dict[str, Any] = {}
    for key in (
        "max_epochs",
        "batch_size",
        "lr",
        "n_epochs_kl_warmup",
        "seed",
        "device",
        "schedule",
    ):
        if getattr(a, key) is not None:
            train[key] = getattr(a, key)
    if a.early_stopping:
        train["early_stopping"] = True
    model: dict[str, Any] = {}
    for key in ("n_hidden", "n_latent", "n_layers", "likelihood", "prior_components"):
        if getattr(a, key) is not None:
            model[key] = getattr(a, key)
    cfg = load_pretrain_config(a.config, {"data": data, "train": train, "model": model}, a.set)
    config_file = locate(a.config) if a.config else None
    check_output(a.out, "model", a.overwrite, (cfg.data.source, config_file))  # YAML's source
    trained, history = pretrain(
        cfg, a.out, quiet=a.quiet, resume=not a.no_resume, overwrite=a.overwrite
    )
    last = history.epochs[-1]
    print(
        json.dumps(
            {
                "model": str(a.out),
                "epochs": len(history.epochs),
                "final_train_loss": round(last.train_loss, 3),
                "final_val_elbo": None if last.val_elbo is None else round(last.val_elbo, 3),
                "n_genes": len(trained.genes),
                "n_batches": len(trained.batch_categories),
            }
        )
    )
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from censusvi.inference import embed

    adata = embed(
        a.model, a.data, a.out, a.layer, a.batch_size, a.min_gene_overlap, a.overwrite, a.latent_key
    )
    print(f"wrote {a.out}: obsm[{a.latent_key!r}] {adata.obsm[a.latent_key].shape}")
    return 0


def cmd_import_scvi_tools(a: argparse.Namespace) -> int:
    from censusvi.model.io import save_model
    from censusvi.model.scvi_tools_io import import_scvi_tools

    m = import_scvi_tools(a.dir, _keys(a.batch_keys) if a.batch_keys else None)
    save_model(m, a.out, a.overwrite)
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


def _surgery(a: argparse.Namespace):
    from censusvi.mapping.surgery import SurgeryConfig

    return SurgeryConfig(train=a.train, max_epochs=a.max_epochs)


def cmd_map(a: argparse.Namespace) -> int:
    from censusvi.data.h5ad import read_h5ad
    from censusvi.inference import write_h5ad_atomic
    from censusvi.mapping.query import map_query
    from censusvi.model.io import load_model, save_model

    if a.save_model:
        check_output(a.save_model, "model", a.overwrite, (a.model, a.query))
    adata = read_h5ad(a.query)
    mq = map_query(
        load_model(a.model), adata, a.batch_key, a.layer, _surgery(a), a.min_gene_overlap
    )
    write_h5ad_atomic(mq.annotated_copy(adata, a.latent_key), a.out, a.overwrite)
    if a.save_model:
        save_model(mq.model, a.save_model, a.overwrite)
    print(
        json.dumps(
            {"out": str(a.out), **{k: v for k, v in mq.report.items() if k != "surgery_query_loss"}}
        )
    )
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    from censusvi.annotate.index import save_index
    from censusvi.annotate.pipeline import index_reference
    from censusvi.model.io import load_model

    ix = index_reference(
        load_model(a.model), a.data, list(_keys(a.label_keys)), a.obs_filter, a.faiss_device
    )
    save_index(ix, a.out, a.overwrite)
    print(
        f"wrote {a.out}: {ix.meta['n_cells']} cells, {ix.meta['kind']} index (built on the "
        f"{ix.device}), labels {ix.meta['label_keys']}"
    )
    return 0


def cmd_annotate(a: argparse.Namespace) -> int:
    from censusvi.annotate.index import load_index
    from censusvi.annotate.pipeline import annotate
    from censusvi.data.h5ad import read_h5ad
    from censusvi.inference import write_h5ad_atomic
    from censusvi.model.io import load_model

    out, _ = annotate(
        load_model(a.model),
        load_index(a.index, a.faiss_device),
        read_h5ad(a.query),
        a.batch_key,
        a.k,
        a.unknown_threshold,
        _surgery(a),
        a.layer,
        a.class_balance,
        a.latent_key,
        a.majority_voting,
    )
    write_h5ad_atomic(out, a.out, a.overwrite)
    keys = label_keys_of(out.obs.columns)
    summary = {k: out.obs[predicted_column(k)].value_counts().head(10).to_dict() for k in keys}
    evaluation = out.uns["censusvi"]["evaluation"]
    print(
        json.dumps(
            {"out": str(a.out), "cells": out.n_obs, "predicted": summary, "evaluation": evaluation}
        )
    )
    return 0


def cmd_de(a: argparse.Namespace) -> int:
    from censusvi.atomic import write_atomic
    from censusvi.data.h5ad import read_h5ad
    from censusvi.generative.de import DEConfig, differential_expression, top_genes
    from censusvi.model.io import load_model

    cfg = DEConfig(
        mode=a.mode,
        delta=a.delta,
        fdr=a.fdr,
        n_samples=a.n_samples,
        batch_correction=not a.no_batch_correction,
        seed=a.seed,
    )
    res = differential_expression(
        load_model(a.model),
        read_h5ad(a.data),
        a.groupby,
        list(_keys(a.group1)),
        a.group2,
        a.batch_key,
        cfg,
        a.layer,
        _surgery(a),
        quiet=a.quiet,
    )
    write_atomic(a.out, res.to_csv, suffix=".csv", overwrite=a.overwrite)
    summary = {}
    for comparison, frame in res.groupby("comparison", sort=False):
        top = top_genes(frame, 10)
        summary[comparison] = {
            "top_genes": top.index.tolist(),
            **({"n_de_fdr": int(frame[f"is_de_fdr_{a.fdr}"].sum())} if a.mode == "change" else {}),
        }
    print(
        json.dumps({"out": str(a.out), "genes": int(res.index.nunique()), "comparisons": summary})
    )
    return 0


def cmd_impute(a: argparse.Namespace) -> int:
    from censusvi.data.h5ad import read_h5ad
    from censusvi.generative.impute import LAYER, impute
    from censusvi.inference import write_h5ad_atomic
    from censusvi.model.io import load_model

    out = impute(
        load_model(a.model),
        read_h5ad(a.query),
        list(_keys(a.genes)),
        a.batch_key,
        a.decode_batch,
        a.library_size,
        a.layer,
        _surgery(a),
        quiet=a.quiet,
    )
    write_h5ad_atomic(out, a.out, a.overwrite)
    info = out.uns["censusvi_imputation"]
    print(json.dumps({"out": str(a.out), "layer": LAYER, "cells": out.n_obs, **info}))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from censusvi.report.build import build_report

    content = build_report(
        a.mapped,
        a.reference,
        a.out,
        a.label_key,
        a.truth_key,
        a.batch_key,
        a.png_dir,
        a.per_type,
        a.scib,
        a.overwrite,
        a.latent_key,
        a.umap_key if a.umap_out else None,
        a.umap_out,
    )
    e = content["evaluation"] or {}
    print(
        json.dumps(
            {
                "out": str(a.out),
                "query_cells": content["n_query_cells"],
                "reference_cells_drawn": len(content["reference"]["x"]),
                **{k: e[k] for k in ("accuracy", "macro_f1", "ece") if k in e},
                **({"png_dir": str(a.png_dir)} if a.png_dir else {}),
                **({"umap_out": str(a.umap_out), "umap_key": a.umap_key} if a.umap_out else {}),
            }
        )
    )
    return 0


def cmd_models_register(a: argparse.Namespace) -> int:
    from censusvi.registry.versions import register_version

    version = register_version(a.model_dir, a.index, a.name)
    print(version)  # a contract: the new version number, alone on stdout
    return 0


def cmd_models_list(a: argparse.Namespace) -> int:
    from censusvi.registry.versions import list_versions

    rows = list_versions(a.name)
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
    previous = rollback(a.name, a.alias)
    print(f"{a.name}@{a.alias}: version {current} -> {previous}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from censusvi.server import run_foreground

    settings: dict[str, Any] = {"model": a.model, "max_cells": a.max_cells}
    if a.token_file:
        settings["token_file"] = a.token_file
    elif a.token:
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
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    arch = info["architecture"]
    print(f"censusvi scVI model {a.model}")
    print(
        f"  genes {info['n_genes']}, batches {info['n_batches']} (keys {','.join(info['batch_keys'])})"
    )
    print(
        f"  encoder {arch['n_layers']} x {arch['n_hidden']} -> latent {arch['n_latent']}; "
        f"likelihood {arch['likelihood']}, dispersion {arch['dispersion']}, "
        f"library {'latent' if arch['latent_library'] else 'observed'}, prior "
        + (f"VampPrior ({k} pseudo-cells)" if (k := arch.get("prior_components")) else "N(0, I)")
    )
    print(
        f"  parameters {info['n_parameters']:,} ({info['n_parameters_scvi_tools']:,} as scvi-tools "
        "builds it, with heads this likelihood never uses)"
    )
    print(f"  schedule: {describe_schedule(info['provenance'].get('schedule'))}")
    for k, v in info["provenance"].items():
        if k != "schedule":
            print(f"  {k}: {v}")
    return 0


def out_args(
    s: argparse.ArgumentParser, kind: str, inputs: tuple[str, ...], help: str | None = None
) -> None:
    """``--out`` and ``--overwrite``; main() checks --out against ``kind`` (censusvi.atomic) and
    the arguments named in ``inputs``, which it must never be or hold."""
    s.add_argument("--out", required=True, help=help)
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even if censusvi did not write it (never one of the inputs)",
    )
    s.set_defaults(out_kind=kind, out_inputs=inputs)


def latent_key_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--latent-key",
        default=LATENT_KEY,
        help=f"obsm key of the latent (default {LATENT_KEY}; scvi-tools uses X_scVI)",
    )


def faiss_device_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--faiss-device",
        choices=["auto", "cpu", "gpu"],
        help="where kNN searches run (default auto: a GPU when faiss-gpu sees one; "
        "$CENSUSVI_FAISS_DEVICE sets it too)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="censusvi", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "ingest", help="build a local SOMA experiment (Census schema) from .h5ad files"
    )
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True, help="DIR.soma to create")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("pretrain", help="train an scVI reference model")
    s.add_argument("--source", help="an .h5ad file or a SOMA experiment (path or census://VERSION)")
    s.add_argument("--batch-keys", help="obs columns whose concatenation is the batch")
    s.add_argument("--hvg-keys", help="obs columns that stratify HVG selection")
    s.add_argument(
        "--covariate-keys", help="extra categorical obs columns injected beside the batch"
    )
    s.add_argument("--n-hvg", type=int, help="highly variable genes to keep (0: all)")
    s.add_argument("--obs-filter", help="e.g. 'is_primary_data == True and nnz >= 300'")
    s.add_argument("--layer", help="where counts are in an .h5ad: a layer name or 'raw'")
    s.add_argument(
        "--schedule",
        choices=SCHEDULE_CHOICES,
        help="epochs, batch size, lr and KL warm-up: census (the Census recipe), scvi-tools "
        "(its small-data heuristic), auto (default: census from "
        f"{AUTO_CENSUS_MIN_CELLS:,} cells, else scvi-tools); the flags below win",
    )
    s.add_argument("--max-epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument(
        "--kl-warmup",
        type=int,
        dest="n_epochs_kl_warmup",
        help="epochs over which the KL weight ramps to 1 (Census 20; scvi-tools 400)",
    )
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="cpu or cuda")
    s.add_argument("--n-hidden", type=int)
    s.add_argument("--n-latent", type=int)
    s.add_argument("--n-layers", type=int)
    s.add_argument("--likelihood", choices=["nb", "zinb", "poisson"])
    s.add_argument(
        "--prior-components",
        type=int,
        help="0: N(0, I) prior (Census); K: VampPrior over K pseudo-cells (sysVI's 5)",
    )
    s.add_argument("--early-stopping", action="store_true")
    s.add_argument(
        "--config",
        help="a packaged config (census, demo, local, small) or a YAML path: sections data, "
        "model, train (what only the Ray job reads is skipped); paths relative to the file",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config key (train.lr=0.001, data.n_hvg=2000); VALUE is YAML; flags win",
    )
    out_args(s, "model", ("source",), "model directory to write")
    s.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("embed", help="write the latent (obsm) for a dataset of known batches")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    out_args(s, ".h5ad", ("model", "data"))
    s.add_argument("--layer")
    latent_key_arg(s)
    s.add_argument("--batch-size", type=int, default=defaults.EMBED_BATCH_SIZE)
    s.add_argument(
        "--min-gene-overlap",
        type=float,
        default=DEFAULT_MIN_OVERLAP,
        help=f"fraction of the model's genes the data must have (default {DEFAULT_MIN_OVERLAP})",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("import-scvi-tools", help="an scvi-tools SCVI directory -> a censusvi model")
    s.add_argument("dir", help="scvi-tools model directory (holding model.pt)")
    out_args(s, "model", ("dir",))
    s.add_argument(
        "--batch-keys",
        help="obs columns whose concatenation is the model's batch "
        "(the Census model: dataset_id,assay,suspension_type,donor_id)",
    )
    s.set_defaults(fn=cmd_import_scvi_tools)

    s = sub.add_parser("export-scvi-tools", help="a censusvi model -> a directory scvi-tools loads")
    s.add_argument("model")
    out_args(s, "scvi-tools", ("model",))
    s.set_defaults(fn=cmd_export_scvi_tools)

    def query_args(
        s: argparse.ArgumentParser, inputs: tuple[str, ...] = ("model", "query")
    ) -> None:
        s.add_argument("--model", required=True, help="model directory (censusvi or scvi-tools)")
        s.add_argument("--query", required=True, help="the query .h5ad (raw counts)")
        s.add_argument("--batch-key", required=True, help="the query's obs column of batches")
        out_args(s, ".h5ad", inputs)
        s.add_argument("--layer", help="where counts are: a layer name or 'raw'")
        s.add_argument(
            "--train",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="train the new batch columns (default: only if the encoder reads the batch)",
        )
        s.add_argument(
            "--max-epochs",
            type=int,
            default=defaults.SURGERY_MAX_EPOCHS,
            help=f"cap on surgery epochs (default {defaults.SURGERY_MAX_EPOCHS})",
        )
        s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("map", help="map a query onto the reference latent space (scArches surgery)")
    query_args(s)
    latent_key_arg(s)
    s.add_argument("--min-gene-overlap", type=float, default=DEFAULT_MIN_OVERLAP)
    s.add_argument("--save-model", help="also write the mapped model (reference + query batches)")
    s.set_defaults(fn=cmd_map)

    s = sub.add_parser("de", help="scVI Bayesian differential expression between groups of cells")
    s.add_argument(
        "--model", required=True, help="model directory, scvi-tools directory or models:/ URI"
    )
    s.add_argument("--data", required=True, help=".h5ad of raw counts")
    s.add_argument("--groupby", required=True, help="obs column holding the groups")
    s.add_argument("--group1", required=True, help="a group (or A,B,...: each in turn)")
    s.add_argument("--group2", help="the other group (default: all other cells)")
    s.add_argument("--batch-key", help="obs column of batches (default: the model's batch keys)")
    out_args(s, ".csv", ("model", "data"), "CSV, one row per gene and comparison")
    s.add_argument("--mode", choices=["change", "vanilla"], default="change")
    s.add_argument("--delta", type=float, default=0.25, help="LFC threshold (change mode)")
    s.add_argument("--fdr", type=float, default=0.05, help="posterior FDR target (change mode)")
    s.add_argument("--n-samples", type=int, default=5000, help="posterior draws per group")
    s.add_argument(
        "--no-batch-correction",
        action="store_true",
        help="decode each cell under its own batch instead of marginalising over the reference's",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layer", help="where counts are: a layer name or 'raw'")
    s.add_argument("--train", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument(
        "--max-epochs",
        type=int,
        default=defaults.SURGERY_MAX_EPOCHS,
        help="cap on surgery epochs (new batches)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_de)

    s = sub.add_parser("impute", help="decoded expression of chosen genes, measured or not")
    query_args(s)
    s.add_argument(
        "--genes", required=True, help="G1,G2,...: Ensembl ids or symbols the model knows"
    )
    s.add_argument("--decode-batch", help="decode every cell under this batch (default: its own)")
    s.add_argument(
        "--library-size", type=float, default=1e4, help="counts per this many (default 1e4)"
    )
    s.set_defaults(fn=cmd_impute)

    s = sub.add_parser("report", help="one self-contained HTML page of an annotated query")
    s.add_argument("--mapped", required=True, help="the .h5ad `censusvi annotate` wrote")
    s.add_argument("--reference", required=True, help="INDEX_DIR the query was annotated with")
    out_args(s, ".html", ("mapped", "reference", "scib"), "report.html")
    s.set_defaults(extra_outs=(("umap_out", ".h5ad"),))
    s.add_argument("--png-dir", help="also write static PNGs here")
    s.add_argument("--label-key", help="which label to draw (default: the index's first)")
    s.add_argument(
        "--truth-key", help="obs column of true labels (default: the label key, if present)"
    )
    s.add_argument("--batch-key", help="obs column of batches (default: the one the mapping used)")
    s.add_argument(
        "--per-type",
        type=int,
        default=defaults.REPORT_PER_TYPE,
        help="reference cells drawn per label",
    )
    s.add_argument("--latent-key", help="obsm key of the latent (default: the one annotate wrote)")
    s.add_argument(
        "--umap-out",
        help="also write the mapped .h5ad with each cell's place on the report's UMAP in obsm "
        f"(--umap-key, default {UMAP_KEY})",
    )
    s.add_argument("--umap-key", default=UMAP_KEY, help="obsm key of --umap-out's UMAP")
    s.add_argument("--scib", help="scib.json from jobs/evaluate.py: the integration table")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("index", help="embed a labelled reference and build its FAISS index")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True, help="reference .h5ad or SOMA experiment")
    s.add_argument("--label-keys", required=True, help="obs columns to transfer, e.g. cell_type")
    s.add_argument("--obs-filter")
    out_args(s, "index", ("model", "data"))
    faiss_device_arg(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("annotate", help="map a query and transfer labels by weighted kNN")
    query_args(s, ("model", "query", "index"))
    s.add_argument("--index", required=True, help="directory written by `censusvi index`")
    faiss_device_arg(s)
    latent_key_arg(s)
    s.add_argument("--k", type=int, default=defaults.K)
    s.add_argument(
        "--unknown-threshold",
        type=float,
        default=defaults.UNKNOWN_THRESHOLD,
        help="uncertainty above which a cell is 'Unknown' (1.0: never)",
    )
    s.add_argument(
        "--class-balance",
        type=float,
        default=defaults.CLASS_BALANCE,
        help="divide each neighbour's vote by its label's reference frequency to this power "
        f"(0: plain weighted kNN as scArches; 1: uniform label prior; default "
        f"{defaults.CLASS_BALANCE})",
    )
    s.add_argument(
        "--majority-voting",
        action="store_true",
        help="also write KEY_majority_voting: each over-cluster's majority label (CellTypist's "
        "majority voting; k-means with ceil(sqrt(cells)) clusters on the latent)",
    )
    s.set_defaults(fn=cmd_annotate)

    models = sub.add_parser(
        "models",
        help="registered versions: register, list, promote, rollback",
        description="Registered versions: register, list, promote, rollback. " + TRACKING_HELP,
    )
    msub = models.add_subparsers(dest="models_command", required=True)
    s = msub.add_parser(
        "register", help="register a model directory and its index; prints the version"
    )
    s.add_argument("model_dir")
    s.add_argument("--index", help="INDEX_DIR from `censusvi index` (needed to annotate)")
    s.add_argument("--name", default="censusvi-scvi")
    s.set_defaults(fn=cmd_models_register)
    s = msub.add_parser("list", help="versions, aliases and evaluation metrics")
    s.add_argument("name", nargs="?", help="one registered model (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models_list)
    s = msub.add_parser(
        "promote", help="point an alias at a version unless its evaluation is worse"
    )
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--alias", default="production")
    s.add_argument("--force", action="store_true", help="promote even when metrics are worse")
    s.add_argument(
        "--tolerance", type=float, default=0.0, help="how much worse a metric may be (absolute)"
    )
    s.set_defaults(fn=cmd_models_promote)
    s = msub.add_parser("rollback", help="move an alias back to its previous version")
    s.add_argument("name")
    s.add_argument("--alias", default="production")
    s.set_defaults(fn=cmd_models_rollback)

    s = sub.add_parser("serve", help="the Ray Serve app (HTTP) in the foreground until Ctrl-C")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or DIR")
    s.add_argument("--index", help="with a model directory: its index directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--token-file",
        help="require 'Authorization: Bearer TOKEN' on every route but /healthz, TOKEN read from "
        "this file (or set CENSUSVI_TOKEN; default: no auth)",
    )
    s.add_argument("--token", help="the token itself (shows in ps: prefer --token-file)")
    s.add_argument("--max-cells", type=int, default=50_000, help="cells per request (413 above)")
    s.add_argument(
        "--allow-surgery", action="store_true", help="train new batch columns per request"
    )
    s.add_argument("--quiet", action="store_true", help="no replica logs on the terminal")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("info", help="architecture, parameter count and provenance of a model")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from censusvi import progress

        progress.QUIET = True
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # faiss logs each loader it tries (AVX512, AVX2, ...) at INFO
        logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        if getattr(args, "out_kind", None):  # before any work: what --out may replace
            inputs = [getattr(args, k) for k in args.out_inputs]
            check_output(args.out, args.out_kind, args.overwrite, inputs)
            for flag, kind in getattr(args, "extra_outs", ()):
                if getattr(args, flag):
                    check_output(getattr(args, flag), kind, args.overwrite, [*inputs, args.out])
        command = " ".join(filter(None, (args.command, getattr(args, "models_command", None))))
        with needs_extras(f"censusvi {command}"):
            return args.fn(args)
    except Exception as e:
        # The registry's own errors (no such version, bad URI; RestException from a server) are
        # the user's to fix too: matched by name, so that mlflow is imported only when used.
        mlflow_error = any(c.__name__ == "MlflowException" for c in type(e).__mro__)
        if args.verbose or not (isinstance(e, USER_ERRORS) or mlflow_error):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"censusvi: error: {' '.join(str(msg).split())}", file=sys.stderr)  # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())

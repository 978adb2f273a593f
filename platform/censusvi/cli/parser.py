"""The ``censusvi`` argument parser: every default is a library constant (``censusvi.defaults``,
the registry's names), so ``--help`` shows what the Python API does too."""

from __future__ import annotations

import argparse

from censusvi import defaults
from censusvi.cli import commands
from censusvi.data.vocabulary import DEFAULT_MIN_OVERLAP
from censusvi.outputs import LATENT_KEY, UMAP_KEY, obsm_key_ok
from censusvi.registry.mlflow_store import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, TRACKING_HELP
from censusvi.train.schedule import AUTO_CENSUS_MIN_CELLS
from censusvi.train.schedule import CHOICES as SCHEDULE_CHOICES


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


def obsm_key(text: str) -> str:
    """An obsm name anndata can write and read back: not empty, no '/'."""
    if not obsm_key_ok(text):
        raise argparse.ArgumentTypeError(f"{text!r}: give a non-empty obsm name without '/'")
    return text


def latent_key_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--latent-key",
        type=obsm_key,
        default=LATENT_KEY,
        help=f"obsm key of the latent (default {LATENT_KEY}; scvi-tools uses X_scVI)",
    )


def port_number(text: str) -> int:
    """A TCP port for ``serve --port`` (argparse names the flag when this refuses)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: choose 1 to 65535")
    return port


def seed_number(text: str) -> int:
    """A random seed for ``--seed``, by ``numeric.check_seed`` (argparse names the flag)."""
    from censusvi.numeric import check_seed

    try:
        seed = int(text)
        check_seed(seed)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            str(e) if "seed" in str(e) else f"{text!r}: not a seed"
        ) from None
    return seed


def faiss_device_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--faiss-device",
        choices=["auto", "cpu", "gpu"],
        help="where kNN searches run (default auto: a GPU when faiss-gpu sees one; "
        "$CENSUSVI_FAISS_DEVICE sets it too)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="censusvi",
        description="Pretrain scVI on single-cell counts, map and annotate queries, serve it.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "ingest", help="build a local SOMA experiment (Census schema) from .h5ad files"
    )
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True, help="DIR.soma to create")
    s.add_argument(
        "--layer", help="where each file's counts are: a layer name or 'raw' (default X)"
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=commands.cmd_ingest)

    s = sub.add_parser("pretrain", help="train an scVI reference model")
    s.add_argument("--source", help="an .h5ad file or a SOMA experiment (path or census://VERSION)")
    s.add_argument("--batch-keys", help="obs columns whose concatenation is the batch")
    s.add_argument("--hvg-keys", help="obs columns that stratify HVG selection")
    s.add_argument(
        "--covariate-keys", help="extra categorical obs columns injected beside the batch"
    )
    s.add_argument("--n-hvg", type=int, help="highly variable genes to keep (0: all)")
    s.add_argument(
        "--obs-filter",
        help="obs columns compared with literals, joined by and/or/not, e.g. 'is_primary_data == True and nnz >= 300'",
    )
    s.add_argument("--layer", help="an .h5ad's counts layer or 'raw'; a SOMA X layer")
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
    s.add_argument("--seed", type=seed_number)
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
    s.set_defaults(fn=commands.cmd_pretrain)

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
    s.set_defaults(fn=commands.cmd_embed)

    s = sub.add_parser("import-scvi-tools", help="an scvi-tools SCVI directory -> a censusvi model")
    s.add_argument("dir", help="scvi-tools model directory (holding model.pt)")
    out_args(s, "model", ("dir",))
    s.add_argument(
        "--batch-keys",
        help="obs columns whose concatenation is the model's batch "
        "(the Census model: dataset_id,assay,suspension_type,donor_id)",
    )
    s.set_defaults(fn=commands.cmd_import_scvi_tools)

    s = sub.add_parser("export-scvi-tools", help="a censusvi model -> a directory scvi-tools loads")
    s.add_argument("model")
    out_args(s, "scvi-tools", ("model",))
    s.set_defaults(fn=commands.cmd_export_scvi_tools)

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
    s.set_defaults(fn=commands.cmd_map, extra_outs=(("save_model", "model"),))

    s = sub.add_parser("de", help="scVI Bayesian differential expression between groups of cells")
    s.add_argument(
        "--model", required=True, help="model directory, scvi-tools directory or models:/ URI"
    )
    s.add_argument("--data", required=True, help=".h5ad of raw counts")
    s.add_argument("--groupby", required=True, help="obs column holding the groups")
    s.add_argument(
        "--group1",
        required=True,
        help="a group (or A,B,...: each in turn; a group whose own name has commas is taken whole)",
    )
    s.add_argument("--group2", help="the other group (default: all other cells)")
    s.add_argument("--batch-key", help="obs column of batches (default: the model's batch keys)")
    out_args(s, ".csv", ("model", "data"), "CSV, one row per gene and comparison")
    s.add_argument("--mode", choices=["change", "vanilla"], default=defaults.DE_MODE)
    s.add_argument(
        "--delta", type=float, default=defaults.DE_DELTA, help="LFC threshold (change mode)"
    )
    s.add_argument(
        "--fdr", type=float, default=defaults.DE_FDR, help="posterior FDR target (change mode)"
    )
    s.add_argument(
        "--n-samples", type=int, default=defaults.DE_N_SAMPLES, help="posterior draws per group"
    )
    s.add_argument(
        "--no-batch-correction",
        action="store_true",
        help="decode each cell under its own batch instead of marginalising over the reference's",
    )
    s.add_argument("--seed", type=seed_number, default=defaults.DE_SEED)
    s.add_argument("--layer", help="where counts are: a layer name or 'raw'")
    s.add_argument("--train", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument(
        "--max-epochs",
        type=int,
        default=defaults.SURGERY_MAX_EPOCHS,
        help="cap on surgery epochs (new batches)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=commands.cmd_de)

    s = sub.add_parser("impute", help="decoded expression of chosen genes, measured or not")
    query_args(s)
    s.add_argument(
        "--genes", required=True, help="G1,G2,...: Ensembl ids or symbols the model knows"
    )
    s.add_argument("--decode-batch", help="decode every cell under this batch (default: its own)")
    s.add_argument(
        "--library-size",
        type=float,
        default=defaults.IMPUTE_LIBRARY_SIZE,
        help=f"counts per this many (default {defaults.IMPUTE_LIBRARY_SIZE:g})",
    )
    s.set_defaults(fn=commands.cmd_impute)

    s = sub.add_parser("report", help="one self-contained HTML page of an annotated query")
    s.add_argument("--mapped", required=True, help="the .h5ad `censusvi annotate` wrote")
    s.add_argument("--reference", required=True, help="INDEX_DIR the query was annotated with")
    out_args(s, ".html", ("mapped", "reference", "scib"), "report.html")
    s.set_defaults(extra_outs=(("umap_out", ".h5ad"),), extra_folders=("png_dir",))
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
    s.add_argument(
        "--umap-key", type=obsm_key, default=UMAP_KEY, help="obsm key of --umap-out's UMAP"
    )
    s.add_argument("--scib", help="scib.json from jobs/evaluate.py: the integration table")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=commands.cmd_report)

    from censusvi.cli.parser_labels import add_label_commands  # it imports this module

    add_label_commands(sub, query_args)

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
    s.add_argument("--name", default=DEFAULT_MODEL_NAME)
    s.set_defaults(fn=commands.cmd_models_register)
    s = msub.add_parser("list", help="versions, aliases and evaluation metrics")
    s.add_argument("name", nargs="?", help="one registered model (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=commands.cmd_models_list)
    s = msub.add_parser(
        "promote", help="point an alias at a version unless its evaluation is worse"
    )
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--alias", default=DEFAULT_ALIAS)
    s.add_argument("--force", action="store_true", help="promote even when metrics are worse")
    s.add_argument(
        "--tolerance", type=float, default=0.0, help="how much worse a metric may be (absolute)"
    )
    s.set_defaults(fn=commands.cmd_models_promote)
    s = msub.add_parser("rollback", help="move an alias back to its previous version")
    s.add_argument("name")
    s.add_argument("--alias", default=DEFAULT_ALIAS)
    s.set_defaults(fn=commands.cmd_models_rollback)

    s = sub.add_parser("serve", help="the Ray Serve app (HTTP) in the foreground until Ctrl-C")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or DIR")
    s.add_argument("--index", help="with a model directory: its index directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8000, help="1 to 65535 (default 8000)")
    s.add_argument(
        "--token-file",
        help="require 'Authorization: Bearer TOKEN' on every route but /healthz, TOKEN read from "
        "this file (or set CENSUSVI_TOKEN; default: no auth)",
    )
    s.add_argument("--token", help="the token itself (shows in ps: prefer --token-file)")
    s.add_argument(
        "--max-cells",
        type=int,
        default=defaults.SERVE_MAX_CELLS,
        help="cells per request (413 above)",
    )
    s.add_argument(
        "--allow-surgery", action="store_true", help="train new batch columns per request"
    )
    s.add_argument("--quiet", action="store_true", help="no replica logs on the terminal")
    s.set_defaults(fn=commands.cmd_serve)

    s = sub.add_parser("info", help="architecture, parameter count and provenance of a model")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=commands.cmd_info)
    return p

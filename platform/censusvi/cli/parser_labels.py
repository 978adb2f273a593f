"""The label commands of the ``censusvi`` parser: finetune, index, annotate."""

from __future__ import annotations

import argparse

from censusvi import defaults
from censusvi.cli import commands
from censusvi.cli.parser import faiss_device_arg, latent_key_arg, out_args, seed_number


def layer_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--layer", help="an .h5ad's counts layer or 'raw' (default X); a SOMA X layer (default raw)"
    )


def add_label_commands(sub, query_args) -> None:
    """``finetune``, ``index`` and ``annotate``; ``query_args`` adds the query arguments."""
    s = sub.add_parser(
        "finetune",
        help="fine-tune a model with a labelled reference (scANVI's recipe) before indexing",
    )
    s.add_argument("--model", required=True, help="model directory (censusvi or scvi-tools)")
    s.add_argument("--data", required=True, help="labelled reference .h5ad or SOMA experiment")
    s.add_argument("--labels-key", required=True, help="obs column of labels, e.g. cell_type")
    s.add_argument("--obs-filter")
    s.add_argument(
        "--max-epochs",
        type=int,
        help="epochs (default: scvi-tools' rule for scANVI from a trained scVI: 2 to 10)",
    )
    s.add_argument(
        "--classification-ratio",
        type=float,
        default=defaults.CLASSIFICATION_RATIO,
        help="weight of the classifier's cross-entropy beside the ELBO "
        f"(default {defaults.CLASSIFICATION_RATIO:g}, scANVI's)",
    )
    s.add_argument("--seed", type=seed_number, default=0)
    s.add_argument("--device", default="cpu", help="where the epochs run, e.g. cuda (default cpu)")
    layer_arg(s)
    out_args(s, "model", ("model", "data"))
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=commands.cmd_finetune)

    s = sub.add_parser("index", help="embed a labelled reference and build its FAISS index")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True, help="reference .h5ad or SOMA experiment")
    s.add_argument("--label-keys", required=True, help="obs columns to transfer, e.g. cell_type")
    s.add_argument("--obs-filter")
    layer_arg(s)
    s.add_argument(
        "--ontology",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the Cell Ontology terms of the labels (a KEY_ontology_term_id column, else "
        "labels that are CL names) for ontology-aware answers (default: on)",
    )
    s.add_argument(
        "--head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train a calibrated label head per key for annotate --method head|ensemble "
        "(default: on)",
    )
    s.add_argument(
        "--index-kind",
        "--index",  # its first name; elsewhere --index is an index directory
        dest="index",
        choices=defaults.INDEX_KINDS,
        default=defaults.INDEX_KIND,
        help="FAISS index: exact (flat), IVF-Flat, or IVF-PQ with a re-rank (1.6x smaller); "
        f"auto chooses by size (default: {defaults.INDEX_KIND}; --index is the same flag)",
    )
    s.add_argument(
        "--metric",
        choices=defaults.METRICS,
        default=defaults.METRIC,
        help=f"neighbours by Euclidean distance or cosine similarity (default: {defaults.METRIC})",
    )
    out_args(s, "index", ("model", "data"))
    faiss_device_arg(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=commands.cmd_index)

    s = sub.add_parser(
        "annotate", help="map a query and transfer the index's labels (kNN, label head or both)"
    )
    query_args(s, ("model", "query", "index"))
    s.add_argument("--index", required=True, help="directory written by `censusvi index`")
    faiss_device_arg(s)
    latent_key_arg(s)
    s.add_argument(
        "--k", type=int, default=defaults.K,
        help=f"reference neighbours per query cell (default {defaults.K})",
    )  # fmt: skip
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
        "--method",
        choices=defaults.METHODS,
        default=None,
        help="label transfer: weighted kNN, the index's label head, or their mean "
        f"(default {defaults.METHOD}; knn, with a warning, for an index built with --no-head)",
    )
    s.add_argument(
        "--ontology-threshold",
        type=float,
        default=defaults.ONTOLOGY_THRESHOLD,
        help="the ontology-aware answer is the most specific Cell Ontology term whose summed "
        f"probability is at least this (default {defaults.ONTOLOGY_THRESHOLD})",
    )
    s.add_argument(
        "--majority-voting",
        action="store_true",
        help="also write KEY_majority_voting: each over-cluster's majority label (CellTypist's "
        "majority voting; k-means with ceil(sqrt(cells)) clusters on the latent)",
    )
    s.set_defaults(fn=commands.cmd_annotate)

"""What censusvi writes into an AnnData: obsm keys, obs column names, the uns entry.

Defined here once (a dependency-free module: the CLI, the library, the client and the Serve app
all import it) so that ``censusvi annotate``, the Python API, ``censusvi report`` and the client
read and write the same names.
"""

from __future__ import annotations

LATENT_KEY = "X_scvi"  # obsm: latent means; scvi-tools writes "X_scVI", the Census "scvi"
UMAP_KEY = "X_umap"  # obsm: the report's 2-D layout, when asked for
UNS_KEY = "censusvi"  # uns: mapping report, annotate settings, evaluation
NLL_COLUMN = "censusvi_nll_per_count"  # obs: reconstruction QC, -log p(x | z) per count
OVER_CLUSTERING_COLUMN = "censusvi_over_clustering"  # obs: clusters majority voting used


def predicted_column(key: str) -> str:
    """obs column of the transferred label ``key`` (e.g. ``predicted_cell_type``)."""
    return f"predicted_{key}"


def probability_column(key: str) -> str:
    """obs column of the predicted label's probability."""
    return f"{key}_probability"


def uncertainty_column(key: str) -> str:
    """obs column of 1 - the predicted label's probability."""
    return f"{key}_uncertainty"


def label_columns(key: str) -> tuple[str, str, str]:
    """One label key's three columns, as ``censusvi annotate`` writes them to obs and the MLflow
    model answers them: predicted label, its probability, its uncertainty."""
    return predicted_column(key), probability_column(key), uncertainty_column(key)


def majority_voting_column(key: str) -> str:
    """obs column of each over-cluster's majority label (CellTypist's ``majority_voting``)."""
    return f"{key}_majority_voting"


def label_keys_of(columns) -> list[str]:
    """The label keys whose predictions ``columns`` (obs column names) hold."""
    prefix = predicted_column("")
    return [c.removeprefix(prefix) for c in columns if c.startswith(prefix)]

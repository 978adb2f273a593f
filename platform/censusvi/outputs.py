"""What censusvi writes into an AnnData: obsm keys, obs column names, the uns entry.

Defined here once (a dependency-free module: the CLI, the library, the client and the Serve app
all import it) so that ``censusvi annotate``, the Python API, ``censusvi report`` and the client
read and write the same names.
"""

from __future__ import annotations

LATENT_KEY = "X_scvi"  # obsm: latent means; scvi-tools writes "X_scVI", the Census "scvi"
UMAP_KEY = "X_umap"  # obsm: the report's 2-D layout, when asked for
UNS_KEY = "censusvi"  # uns: mapping report, annotate settings, evaluation
NO_COUNTS = "have zero counts over the model's genes"  # mapping's refusal; the Client reads it
NLL_COLUMN = "censusvi_nll_per_count"  # obs: reconstruction QC, -log p(x | z) per count
OVER_CLUSTERING_COLUMN = "censusvi_over_clustering"  # obs: clusters majority voting used


def obsm_key_ok(name) -> bool:
    """Whether ``name`` is an obsm key anndata writes and reads back: a non-empty string, no '/'."""
    return isinstance(name, str) and bool(name.strip()) and "/" not in name


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


def ontology_columns(key: str) -> tuple[str, str, str]:
    """The ontology-aware answer's columns for one label key: the Cell Ontology term id ('' for
    a label without a term), its name, and its probability (the summed probability of the
    reference labels at or below it); the fine label it may have backed off from is
    ``predicted_column(key)``."""
    predicted = predicted_column(key)
    return (
        f"{predicted}_ontology_term_id",
        f"{predicted}_ontology_label",
        f"{key}_ontology_probability",
    )


TEXT_ANSWERS = ("predicted", "ontology_term_id", "ontology_label")  # the others are numbers


def answer_columns(key: str) -> dict[str, str]:
    """A label key's transfer result (``annotate.pipeline.transfer_all``'s columns, which the
    Serve app sends) -> the obs columns they are written to; the ontology ones only where the
    index maps the key's labels to the Cell Ontology."""
    term, label, probability = ontology_columns(key)
    return {
        "predicted": predicted_column(key),
        "probability": probability_column(key),
        "uncertainty": uncertainty_column(key),
        "ontology_term_id": term,
        "ontology_label": label,
        "ontology_probability": probability,
    }


def write_answers(obs, key: str, frame) -> None:
    """Write one label key's transfer result (a DataFrame, rows in ``obs``'s order) into
    ``obs``: labels as categories, probabilities as float64."""
    import pandas as pd

    for col, name in answer_columns(key).items():
        if col in frame:
            values = frame[col].to_numpy()
            if col in TEXT_ANSWERS:
                obs[name] = pd.Categorical(values.astype(str))
            else:
                obs[name] = values.astype("float64")


def label_keys_of(columns) -> list[str]:
    """The label keys whose predictions ``columns`` (obs column names) hold."""
    prefix, present = predicted_column(""), set(columns)
    keys = [c.removeprefix(prefix) for c in columns if c.startswith(prefix)]
    return [k for k in keys if probability_column(k) in present]


def cells_per_batch(labels) -> dict[str, list]:
    """The mapping report's ``cells_per_batch``: ``{"batch": names, "cells": counts}``, two
    lists and not a dict keyed by batch, because a batch name is any text ('', 'a/b') and an
    .h5ad stores dict keys as HDF5 group names."""
    import numpy as np

    names, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    return {"batch": names.tolist(), "cells": counts.astype(int).tolist()}

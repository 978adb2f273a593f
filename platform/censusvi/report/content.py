"""Everything a mapping report shows, as one JSON-ready dict (the HTML page and the PNGs draw it).

Inputs are what ``censusvi annotate`` (or the Serve app) produced: the query's latent, predicted
labels, probabilities, uncertainties, batches and reconstruction QC, the mapping report, and the
query's true labels when it has them. Accuracy, macro-F1 and ECE come from the same function the
annotation's evaluation uses, so the report's numbers are the evaluation's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from censusvi.annotate.pipeline import label_transfer_metrics
from censusvi.outputs import (
    NLL_COLUMN,
    ontology_columns,
    predicted_column,
    probability_column,
    uncertainty_column,
)
from censusvi.report.layout import ReferenceLayout


def jsonable(x: Any) -> Any:
    """Plain JSON values from what an .h5ad's uns gives back (numpy arrays and scalars)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def calibration_bins(probability: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Reliability diagram rows: mean confidence vs accuracy per probability bin (non-empty)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(probability, edges[1:-1]), 0, n_bins - 1)
    return [
        {
            "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
            "cells": int((which == b).sum()),
            "confidence": float(probability[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(n_bins)
        if (which == b).any()
    ]


def confusion(truth: np.ndarray, predicted: np.ndarray) -> dict:
    true_labels = sorted(set(truth))
    pred_labels = sorted(set(predicted) | set(true_labels))
    table = pd.crosstab(pd.Categorical(truth, true_labels), pd.Categorical(predicted, pred_labels))
    return {"true": true_labels, "predicted": pred_labels, "counts": table.to_numpy().tolist()}


def evaluation(
    truth: np.ndarray, predicted: np.ndarray, probability: np.ndarray, reference_labels: set[str]
) -> dict | None:
    """Metrics over cells whose true label the reference holds (others cannot be right)."""
    metrics = label_transfer_metrics(truth, predicted, probability, reference_labels)
    if not metrics.get("n_cells_with_reference_label"):
        return None
    known = np.isin(truth, sorted(reference_labels))
    correct = truth[known] == predicted[known]
    return {
        **metrics,
        "confusion": confusion(truth[known], predicted[known]),
        "calibration": calibration_bins(probability[known], correct),
    }


def report_content(
    cells: pd.DataFrame,
    latent: np.ndarray,
    layout: ReferenceLayout,
    label_key: str,
    mapping: dict[str, Any],
    truth_key: str | None = None,
    scib: list[dict] | None = None,
    title: str = "censusvi mapping report",
    xy: np.ndarray | None = None,
) -> dict[str, Any]:
    """``cells``: one row per query cell with ``predicted_KEY``, ``KEY_probability``,
    ``KEY_uncertainty``, ``batch`` and optionally ``censusvi_nll_per_count`` and the truth.
    ``xy``: the query's place on the layout, if already computed (else ``layout.place``)."""
    xy = layout.place(latent) if xy is None else xy
    predicted = cells[predicted_column(label_key)].astype(str).to_numpy()
    probability = cells[probability_column(label_key)].to_numpy(dtype=float)
    counts = (
        pd.DataFrame({"label": predicted, "probability": probability})
        .groupby("label")["probability"]
        .agg(["size", "mean"])
        .sort_values("size", ascending=False)
    )
    qc = None
    if NLL_COLUMN in cells and len(cells):
        nll = cells[NLL_COLUMN].to_numpy(dtype=float)
        qc = {q: float(np.quantile(nll, float(q))) for q in ("0.05", "0.5", "0.95")}
    content: dict[str, Any] = {
        "title": title,
        "label_key": label_key,
        "n_query_cells": len(cells),
        "reference": {
            "x": layout.xy[:, 0].round(3).tolist(),
            "y": layout.xy[:, 1].round(3).tolist(),
            "label": layout.labels[label_key].astype(str).tolist(),
        },
        "query": {
            "x": xy[:, 0].round(3).tolist(),
            "y": xy[:, 1].round(3).tolist(),
            "predicted": predicted.tolist(),
            "probability": probability.round(4).tolist(),
            "uncertainty": cells[uncertainty_column(label_key)].to_numpy(float).round(4).tolist(),
            "batch": cells["batch"].astype(str).tolist(),
        },
        "mapping": jsonable(mapping),
        "qc_nll_per_count": qc,
        "predicted_counts": [
            {"label": str(label), "cells": int(row["size"]), "mean_probability": float(row["mean"])}
            for label, row in counts.iterrows()
        ],
        "evaluation": None,
        "scib": jsonable(scib),
    }
    term, name, term_probability = ontology_columns(label_key)
    if term in cells:  # the index maps the labels to the Cell Ontology: its answers, by term
        answers = pd.DataFrame(
            {"term_id": cells[term].astype(str), "label": cells[name].astype(str)}
        ).assign(p=cells[term_probability].to_numpy(float))
        grouped = answers.groupby(["term_id", "label"])["p"].agg(["size", "mean"])
        content["ontology_counts"] = [
            {
                "term_id": t,
                "label": x,
                "cells": int(r["size"]),
                "mean_probability": float(r["mean"]),
            }
            for (t, x), r in grouped.sort_values("size", ascending=False).iterrows()
        ]
    if truth_key and truth_key in cells:
        truth = cells[truth_key].astype(str).to_numpy()
        content["query"]["truth"] = truth.tolist()
        # the per-type subsample keeps every reference label, so this is the index's label set
        reference_labels = set(layout.labels[label_key].astype(str))
        content["evaluation"] = evaluation(truth, predicted, probability, reference_labels)
    return content

"""Which label-transfer method answers, and p(label | cell) by it.

``resolve_method`` is the one place every entrance (``censusvi annotate``, ``censusvi.annotate``,
the MLflow model, the Serve annotator) turns the method a caller asked for into the one that
answers: no method asked for means ``defaults.METHOD`` (the ensemble of kNN and the label head),
or kNN where the index has no label head (built with ``--no-head`` or by an older censusvi),
said once in a note; a method asked for by name that needs a head the index lacks is an error.
"""

from __future__ import annotations

import numpy as np

from censusvi import defaults
from censusvi.annotate.index import LabelIndex
from censusvi.annotate.transfer import label_probabilities
from censusvi.numeric import is_finite, is_whole
from censusvi.typed import shown

NEEDS_HEAD = ("head", "ensemble")


def missing_head(index: LabelIndex) -> list[str]:
    """The index's label keys without a label head."""
    return [key for key in index.labels.columns if key not in index.heads]


def no_head_error(key: str) -> ValueError:
    return ValueError(
        f"the index has no label head for {key!r} (built without one, or by an older "
        "censusvi): rebuild it with `censusvi index`, or use --method knn"
    )


def resolve_method(index: LabelIndex, method: str | None = None) -> tuple[str, str | None]:
    """(the method that answers, a one-line note where it is not the one asked for or the
    default). ``method`` None: ``defaults.METHOD``, or ``knn`` with a note where the index lacks
    a label head that the default needs. A named method is checked: unknown, or needing a head
    the index lacks, is a ValueError."""
    if method is None:
        missing = missing_head(index) if defaults.METHOD in NEEDS_HEAD else []
        if not missing:
            return defaults.METHOD, None
        return "knn", (
            f"the index has no label head for {missing[0]!r} (built with --no-head or by an "
            f"older censusvi): answered by knn instead of the default {defaults.METHOD}; "
            "rebuild the index with `censusvi index` for the default, or pass --method knn"
        )
    if method not in defaults.METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(defaults.METHODS)}")
    if method in NEEDS_HEAD and (missing := missing_head(index)):
        raise no_head_error(missing[0])
    return method, None


def check_settings(
    k, unknown_threshold, class_balance, ontology_threshold, latent_key: str = "X"
) -> None:
    """A ValueError naming the first label-transfer setting out of range (before any work)."""
    from censusvi.outputs import obsm_key_ok

    if not is_whole(k) or k < 1:
        raise ValueError(
            f"k {k!r}: neighbours per cell must be an integer >= 1 (default {defaults.K})"
        )
    for name, x in (("unknown_threshold", unknown_threshold),
                    ("ontology_threshold", ontology_threshold)):  # fmt: skip
        if not is_finite(x) or not 0 <= x <= 1:
            raise ValueError(f"{name} {x!r}: must be a number from 0 to 1")
    if not is_finite(class_balance) or not 0 <= class_balance <= 1:
        raise ValueError(
            f"class_balance {class_balance!r}: must be from 0 (plain votes) to 1 (votes divided "
            "by label frequency)"
        )
    if not obsm_key_ok(latent_key):
        raise ValueError(
            f"latent key {latent_key!r}: must be a non-empty obsm name without '/' (e.g. X_scVI)"
        )


def check_served(k, unknown_threshold, class_balance, method: str | None) -> None:
    """A server's request options (the Serve app's, the MLflow model's): ``check_settings``'s
    rules, at most ``defaults.MAX_K`` neighbours (each is a row of the search), a known method."""
    check_settings(k, unknown_threshold, class_balance, defaults.ONTOLOGY_THRESHOLD)
    if k > defaults.MAX_K:
        raise ValueError(f"k {k}: this server answers at most {defaults.MAX_K} neighbours per cell")
    if method is not None and method not in defaults.METHODS:
        raise ValueError(f"method {shown(method)}: choose one of {', '.join(defaults.METHODS)}")


def label_probabilities_by(
    method: str,
    index: LabelIndex,
    key: str,
    dist,
    idx,
    class_balance: float,
    in_ref: np.ndarray,
    p_head: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """p(label | cell) by weighted kNN (``transfer.label_probabilities``), the label head
    (its probabilities ``p_head``), or their mean (``ensemble``), each scaled by the cell's
    in-reference probability ``in_ref``. The head's probabilities get kNN's class balance too:
    divided by label frequency ** class_balance."""
    frequency = index.label_frequency(key)

    def knn() -> tuple[np.ndarray, np.ndarray]:
        neighbours = index.labels[key].to_numpy()[idx]
        cats, prob = label_probabilities(dist, neighbours, None, frequency, class_balance)
        return cats, prob * in_ref[:, None]

    if method == "knn":
        return knn()
    head = index.heads.get(key)
    if head is None or p_head is None:
        raise no_head_error(key)
    if class_balance:
        p_head = p_head * frequency.reindex(head.classes).fillna(1.0).to_numpy() ** -class_balance
        p_head /= p_head.sum(1, keepdims=True)
    p_head = p_head * in_ref[:, None]
    if method == "head":  # no kNN vote to count
        return head.classes, p_head
    cats, prob = knn()
    aligned = np.zeros_like(p_head)
    aligned[:, np.searchsorted(head.classes, cats)] = prob  # kNN's labels are reference labels
    return head.classes, (aligned + p_head) / 2

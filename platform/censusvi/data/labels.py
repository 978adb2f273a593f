"""Which cells carry a label: one rule for the index, its corpus job, fine-tuning and evaluation.

A label that is missing (NaN, empty) or says so ("unknown", "unassigned", "none", "nan": the
Census labels some cells "unknown") is no cell type: an index that kept it would answer it, and
score itself on it, as if it were one.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
UNLABELLED = ("", "nan", "none", "unknown", "unassigned")  # compared lower-case, stripped


def unlabelled(values) -> np.ndarray:
    """A boolean per value: True where it is no label (``UNLABELLED``, NaN or None)."""
    text = pd.Series(values).astype("string").fillna("").str.strip().str.lower()
    return text.isin(UNLABELLED).to_numpy()


def label_keys_checked(keys) -> list[str]:
    """The label keys as a list, refused when empty or repeated."""
    keys = [keys] if isinstance(keys, str) else [str(k).strip() for k in keys]
    if not keys or not all(keys):
        raise ValueError(f"label keys {keys!r}: name at least one obs column, e.g. cell_type")
    if len(set(keys)) < len(keys):
        raise ValueError(f"label keys {keys!r}: each obs column once")
    return keys


def labelled_rows(labels: pd.DataFrame, where: str) -> np.ndarray:
    """A mask of the rows labelled in every column; logs how many are left out, and refuses a
    column with fewer than two types among the rows kept."""
    keep = ~np.any([unlabelled(labels[key].to_numpy()) for key in labels.columns], axis=0)
    keep = np.asarray(keep, dtype=bool).reshape(len(labels))
    if not keep.all():
        log.warning(
            "%s: %d of %d cells have no label in %s (NaN, empty or one of %s): left out",
            where, int((~keep).sum()), len(keep), list(labels.columns), list(UNLABELLED[1:]),
        )  # fmt: skip
    for key in labels.columns:
        types = labels[key][keep].astype(str).unique()
        if len(types) < 2:
            raise ValueError(
                f"{where}: {len(types)} labelled type(s) of {key!r} ({list(types)[:3]}); an "
                "index needs at least two (cells labelled NaN, empty or "
                f"{list(UNLABELLED[1:])} count as unlabelled)"
            )
    return keep

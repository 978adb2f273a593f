"""bench/annotation.py --novelty-study: which out-of-reference signals, combined how.

For each split and each novel type (a reference type left out of the index, as the bench's
novel-type AUROC does it: the model has seen that type), the AUROC of the uncertainty with
each combination of ``censusvi.annotate.novelty``'s signals, per method; and the AUROC of each
raw signal alone. Fitted on held-out reference cells exactly as ``censusvi index`` fits them
(``pipeline.reference_signals``), the statistic refitted per variant. Also, per split, what the
full index predicts for query cells whose reference type is absent from the query (the
pbmc-cross macro-F1 question) at class balance 0 and the default.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

import censusvi
from censusvi import defaults
from censusvi.annotate import novelty
from censusvi.annotate.pipeline import (
    IN_MEMORY,
    label_probabilities_by,
    reference_nll,
    reference_signals,
    transfer_all,
)
from censusvi.annotate.transfer import summarise
from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.outputs import NLL_COLUMN

KEY = "cell_type"
VARIANTS = [("none", None, (), novelty.ALPHA)]  # (name, statistic, signals, alpha)
for _names in (("distance",), ("distance", "entropy"), ("distance", "nll", "entropy")):
    for _alpha in (0.01, 0.05, 0.1):
        _label = "+".join(n[0] for n in _names) + f" a={_alpha}"
        VARIANTS.append((f"fisher {_label}", "fisher", _names, _alpha))
VARIANTS.append(("max d+n+e a=0.05", "max", ("distance", "nll", "entropy"), 0.05))


def reference_latent(model, ref):
    """(embedded positions, latents, NLL per count) of the reference's cells."""
    source = H5adSource(IN_MEMORY, adata=ref)
    pos, z, _ = latent_representation(model, source)
    return pos, z, reference_nll(model, source, pos)


def query_signals(model, query):
    """(mapped mask, latents, NLL per count) of the query (mapped once: the index plays no part)."""
    q = query.copy()
    censusvi.map_query(q, model)
    z = q.obsm["X_scvi"]
    mapped = np.isfinite(z).all(1)
    return mapped, z[mapped], q.obs[NLL_COLUMN].to_numpy(float)[mapped]


def uncertainties(ix, z_q, nll_q, ref_signals, methods) -> dict[tuple[str, str], np.ndarray]:
    """(method, variant) -> uncertainty per mapped query cell."""
    dist, idx = ix.search(z_q, defaults.K)
    head = ix.heads.get(KEY)
    p_head = head.probabilities(z_q) if head is not None else None
    query = {"distance": dist.mean(1), "nll": nll_q}
    if p_head is not None:
        query["entropy"] = novelty.entropy(p_head)
    out = {}
    for name, stat, names, alpha in VARIANTS:
        if not set(names) <= set(ref_signals) or not set(names) <= set(query):
            continue
        if stat is None:
            in_ref = np.ones(len(z_q))
        else:
            fitted = novelty.fit({s: ref_signals[s] for s in names}, stat)
            in_ref = novelty.in_reference({s: query[s] for s in names}, fitted, alpha)
        for m in methods:
            if m != "knn" and p_head is None:
                continue
            cats, prob = label_probabilities_by(
                m, ix, KEY, dist, idx, defaults.CLASS_BALANCE, in_ref, p_head
            )
            out[(m, name)] = summarise(cats, prob)["uncertainty"].to_numpy()
    for s, v in query.items():
        out[("signal", s)] = v
    return out


def _auroc(truth: np.ndarray, t: str, score: np.ndarray) -> float:
    return float(roc_auc_score(truth == t, score)) if (truth != t).any() else float("nan")


def study(split, model, indexes: dict, methods: list[str]) -> pd.DataFrame:
    """AUROC per (novel type, method, variant) on ``split`` with the bench's left-out indexes
    (``indexes``: type -> the index built without it, by ``censusvi.build_index``)."""
    pos, z_ref, nll_ref = reference_latent(model, split.ref)
    labels = split.ref.obs[KEY].astype(str).to_numpy()[pos]
    mapped, z_q, nll_q = query_signals(model, split.query)
    truth = split.truth[mapped]
    held = truth != ""
    rows = []
    for t, ix in indexes.items():
        keep = labels != t
        z_keep, nll_keep = z_ref[keep], nll_ref[keep]
        _, signals = reference_signals(ix, z_keep, lambda r, n=nll_keep: n[r])
        for (m, variant), unc in uncertainties(ix, z_q, nll_q, signals[KEY], methods).items():
            auroc = _auroc(truth[held], t, unc[held])
            rows.append({"split": split.name, "type": t, "method": m, "variant": variant,
                         "auroc": auroc})  # fmt: skip
    return pd.DataFrame(rows)


def absent_predictions(split, model, index, methods: list[str]) -> pd.DataFrame:
    """Per method and class balance (0, the default): macro-F1 on held query cells and how
    many of them are predicted as a reference type that no query cell truly is."""
    mapped, z_q, nll_q = query_signals(model, split.query)
    truth = split.truth[mapped]
    held = truth != ""
    absent = sorted(set(index.labels[KEY]) - set(truth[held]))
    rows = []
    for m in methods:
        for cb in (0.0, defaults.CLASS_BALANCE):
            pred = transfer_all(index, z_q, class_balance=cb, method=m, nll=nll_q)[KEY]
            p = pred["predicted"].to_numpy().astype(str)[held]
            f1 = f1_score(truth[held], p, average="macro", zero_division=0)
            no_absent = f1_score(truth[held], p, average="macro", labels=sorted(set(truth[held])),
                                 zero_division=0)  # fmt: skip
            counts = pd.Series(p[np.isin(p, absent)]).value_counts().to_dict()
            rows.append({"split": split.name, "method": m, "class_balance": cb,
                         "macro_f1": f1, "macro_f1_query_types": no_absent,
                         "accuracy": float((p == truth[held]).mean()),
                         "n_absent_predicted": int(sum(counts.values())),
                         "absent_predicted": counts})  # fmt: skip
    return pd.DataFrame(rows)


def print_study(frames: list[pd.DataFrame], absent: list[pd.DataFrame]) -> None:
    if frames:
        rows = pd.concat(frames)
        table = rows.groupby(["split", "method", "variant"], sort=False)["auroc"].mean()
        wide = table.unstack("split")
        wide["mean"] = wide.mean(1)
        print("\n### novelty study: novel-type AUROC per split (mean over left-out types)")
        print(wide.round(3).to_string())
    if absent:
        print("\n### predictions of reference types absent from the query")
        print(pd.concat(absent).round(3).to_string(index=False))

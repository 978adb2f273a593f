"""``censusvi index`` and ``censusvi annotate``: reference embeddings -> FAISS; query -> labels."""

from __future__ import annotations

import logging
import os
import re

import anndata as ad
import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.annotate.index import LabelIndex, build_index
from censusvi.annotate.index_checks import check_fits
from censusvi.annotate.majority import majority_vote, n_clusters, over_cluster
from censusvi.annotate.method import check_settings, label_probabilities_by, resolve_method
from censusvi.annotate.novelty import entropy, in_reference
from censusvi.annotate.ontology import backoff, label_ontologies
from censusvi.annotate.transfer import summarise
from censusvi.data.labels import label_keys_checked, labelled_rows
from censusvi.data.soma import open_data
from censusvi.inference import latent_representation
from censusvi.mapping.query import MappedQuery, map_query
from censusvi.mapping.surgery import SurgeryConfig
from censusvi.model.io import UNKNOWN_BATCH_FIX_REFERENCE, TrainedModel
from censusvi.outputs import (
    LATENT_KEY,
    OVER_CLUSTERING_COLUMN,
    UNS_KEY,
    majority_voting_column,
    predicted_column,
    probability_column,
    write_answers,
)

log = logging.getLogger(__name__)
IN_MEMORY = defaults.IN_MEMORY  # what an in-memory reference is called in the index's metadata
NOVELTY_MAX_CELLS = 20_000  # held-out reference cells the out-of-reference fit reads at most


def index_reference(
    model: TrainedModel,
    data: str | os.PathLike | ad.AnnData,
    label_keys: list[str],
    obs_filter: str | None = None,
    faiss_device: str | None = None,
    layer: str | None = None,
    ontology: bool = True,
    head: bool = True,
    kind: str = defaults.INDEX_KIND,
    metric: str = defaults.METRIC,
    novelty: bool = True,
) -> LabelIndex:
    """Embed the reference (an .h5ad, a SOMA experiment or an in-memory AnnData, of batches the
    model knows) and index it; ``ontology``: also keep the Cell Ontology terms of its labels
    (``censusvi.annotate.ontology``) for ontology-aware answers; ``head``: also train a label
    head per key (``censusvi.annotate.head``) for ``method="head"`` / ``"ensemble"``; ``kind`` and
    ``metric``: the FAISS index (``censusvi.annotate.faiss_index``); ``novelty``: also fit the
    out-of-reference detection on held-out reference cells (``fit_novelty``). Cells without a
    label (``data.labels``) are left out."""
    label_keys = label_keys_checked(label_keys)
    source = open_data(data, obs_filter, layer)
    data = IN_MEMORY if isinstance(data, ad.AnnData) else data
    missing = [k for k in label_keys if k not in source.obs.columns]
    if missing:
        raise ValueError(
            f"label key(s) {missing} not in the reference's obs; it has {sorted(source.obs.columns)}"
        )
    pos, z, _ = latent_representation(model, source, unknown_batch_fix=UNKNOWN_BATCH_FIX_REFERENCE)
    keep = labelled_rows(source.obs.iloc[pos][label_keys], str(data))
    pos, z = pos[keep], z[keep]
    labels = source.obs.iloc[pos][label_keys].astype(str)
    meta = {"reference": str(data), "obs_filter": obs_filter}
    meta["encoder_digest"] = model.encoder_digest()
    meta["evaluation"] = holdout_evaluation(z, labels, kind=kind, metric=metric)
    if ontology:
        meta["ontology"] = label_ontologies(source.obs.iloc[pos], label_keys)
    ix = build_index(z, labels, meta, device=faiss_device, kind=kind, metric=metric)
    if head:
        fit_heads(ix, z)
    if novelty:
        fit_novelty(ix, z, lambda rows: reference_nll(model, source, pos[rows]))
    return ix


def fit_heads(ix: LabelIndex, z: np.ndarray, seed: int = 0) -> None:
    """Train a label head on the index's latents ``z`` for each label key (in place)."""
    from censusvi.annotate.head import fit_head

    for key in ix.labels.columns:
        ix.heads[key], info = fit_head(z, ix.labels[key].to_numpy(), seed)
        ix.meta.setdefault("heads", {})[key] = {"classes": ix.heads[key].classes.tolist(), **info}


def novelty_rows(n: int, seed: int = 0, max_cells: int = NOVELTY_MAX_CELLS) -> np.ndarray:
    """The reference rows the out-of-reference fit reads (sorted): the label heads' calibration
    cells, which no head was trained on (at most ``max_cells``); all rows under 20 cells."""
    from censusvi.annotate.head import calibration_rows

    rows = np.flatnonzero(calibration_rows(n, np.random.default_rng(seed)))
    rows = rows if len(rows) else np.arange(n)
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    return rows


def fit_novelty(ix: LabelIndex, z: np.ndarray, nll_of, k: int = defaults.K, seed: int = 0):
    """Fit each label key's out-of-reference detection (``annotate.novelty.fit``) on held-out
    reference cells (``reference_signals``) and store it in ``ix.meta["novelty"]`` (in place)."""
    from censusvi.annotate import novelty

    rows, signals = reference_signals(ix, z, nll_of, k, seed)
    if not signals:
        return
    ix.meta["novelty"] = {
        "version": novelty.VERSION,
        "n_cells": int(len(rows)),
        "keys": {key: novelty.fit(own) for key, own in signals.items()},
    }


def reference_signals(
    ix: LabelIndex, z: np.ndarray, nll_of, k: int = defaults.K, seed: int = 0
) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """(rows, label key -> signal -> values) of the held-out reference cells ``novelty_rows``
    of the index's latents ``z``: their mean distance to their k nearest other reference cells,
    their reconstruction NLL per count (``nll_of(rows)``; None: left out) and the key's head's
    entropy (where it has a head); no signals for an index of a single cell."""
    rows = novelty_rows(len(z), seed)
    kk = min(k + 1, ix.index.ntotal)
    if kk < 2:
        return rows, {}
    dist, _ = ix.search(z[rows], kk)
    common = {"distance": dist[:, 1:].mean(1)}  # the cell itself is its nearest neighbour
    nll = nll_of(rows) if nll_of is not None else None
    if nll is not None:
        common["nll"] = np.asarray(nll, dtype=float)
    out = {}
    for key in ix.labels.columns:
        out[key] = dict(common)
        if key in ix.heads:
            out[key]["entropy"] = entropy(ix.heads[key].probabilities(z[rows]))
    return rows, out


def reference_nll(model: TrainedModel, source, positions: np.ndarray) -> np.ndarray:
    """Reconstruction -log p(x | z) per count under ``model`` of the reference cells at
    ``positions`` of ``source`` (batches the model knows; cells with counts), as the mapping
    computes it for a query (``mapping.query.latent_and_nll``)."""
    from censusvi.inference import reference_cells
    from censusvi.mapping.query import latent_and_nll
    from censusvi.model.minibatch import minibatch_from_csr

    order = np.argsort(positions, kind="stable")
    cells, _ = reference_cells(model, source, unknown_batch_fix=UNKNOWN_BATCH_FIX_REFERENCE)
    x, cov = cells.read(np.asarray(positions)[order])
    vae = model.vae.eval()
    device = next(vae.parameters()).device
    parts = []
    for start in range(0, len(order), defaults.EMBED_BATCH_SIZE):
        stop = start + defaults.EMBED_BATCH_SIZE
        mb = minibatch_from_csr(
            x[start:stop], cov[start:stop], device, with_counts=vae.needs_dense_counts
        )
        parts.append(latent_and_nll(vae, mb)[1].cpu().numpy())
    out = np.empty(len(order))
    out[order] = np.concatenate(parts) if parts else np.empty(0)
    return out


def holdout_evaluation(
    z: np.ndarray,
    labels: pd.DataFrame,
    fraction: float = 0.1,
    seed: int = 0,
    k: int = defaults.K,
    max_queries: int = defaults.EVAL_MAX_QUERIES,
    kind: str = defaults.INDEX_KIND,
    metric: str = defaults.METRIC,
) -> dict[str, dict]:
    """Label transfer from the rest of the reference to a random 10 % of it (at most
    ``max_queries`` cells), through an index of the same kind and metric: the index's own
    accuracy, macro-F1 and calibration, which the registry's promotion gate compares."""
    n = len(z)
    n_test = min(int(round(n * fraction)), max_queries)
    if n_test < 1 or n - n_test < 2:
        return {}
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng(seed).choice(n, n_test, replace=False)] = True
    train_index = build_index(z[~test], labels[~test], seed=seed, k=k, kind=kind, metric=metric)
    predictions = transfer_all(train_index, z[test], k, method="knn")  # the index's own
    return {
        key: label_transfer_metrics(
            labels[key].to_numpy()[test],
            res["predicted"],
            res["probability"],
            set(train_index.labels[key]),
        )
        for key, res in predictions.items()
    }


def transfer_all(
    index: LabelIndex,
    latent: np.ndarray,
    k: int = defaults.K,
    unknown_threshold: float = defaults.UNKNOWN_THRESHOLD,
    class_balance: float = defaults.CLASS_BALANCE,
    ontology_threshold: float = defaults.ONTOLOGY_THRESHOLD,
    method: str | None = None,
    nll: np.ndarray | None = None,
) -> dict[str, pd.DataFrame]:
    """Label transfer of every label key of the index to each row of ``latent`` by ``method``
    (``label_probabilities_by``; None: the default, or knn for an index without a label head:
    ``method.resolve_method``): columns predicted, probability, uncertainty, and where the
    index maps the key's labels to the Cell Ontology, ontology_term_id, ontology_label,
    ontology_probability (``ontology.backoff``). ``nll``: each row's reconstruction NLL per
    count (the mapping's), for the out-of-reference detection (``in_reference_probability``);
    without it the other signals decide."""
    method, _ = resolve_method(index, method)
    if nll is not None and len(nll) != len(latent):
        raise ValueError(f"{len(nll)} NLL values for {len(latent)} cells: give one per cell")
    dist, idx = index.search(latent, k)
    out = {}
    for key in index.labels.columns:
        head = index.heads.get(key)
        p_head = head.probabilities(latent) if head is not None else None
        in_ref = in_reference_probability(index, key, dist, nll, p_head)
        cats, prob = label_probabilities_by(
            method, index, key, dist, idx, class_balance, in_ref, p_head
        )
        res = summarise(cats, prob, unknown_threshold)
        onto = index.ontology(key)
        if onto is not None:
            res = res.join(backoff(prob, cats, onto, ontology_threshold).add_prefix("ontology_"))
        out[key] = res
    return out


def in_reference_probability(
    index: LabelIndex, key: str, dist: np.ndarray, nll=None, p_head=None
) -> np.ndarray:
    """Per cell, the probability that it is of a kind the reference holds
    (``annotate.novelty``), from the signals of ``novelty.COMBINED``: its neighbour distances and
    the head's p(label | cell) (where the key has a head; ``nll`` is not read), by the index's fit; an index without one (built
    by an older censusvi, or ``novelty=False``): its neighbour-distance typicality, as before."""
    from censusvi.annotate import novelty

    fits = index.meta.get("novelty") or {}
    fitted = fits.get("keys", {}).get(key) if fits.get("version", 0) == novelty.VERSION else None
    if fitted is None:
        fitted = novelty.legacy_fit(index.meta.get("neighbour_distance"))
    if fitted is None:
        return np.ones(len(dist))
    signals = {
        "distance": dist.mean(1),
        "nll": nll,
        "entropy": None if p_head is None else entropy(p_head),
    }
    return in_reference({s: v for s, v in signals.items() if s in novelty.COMBINED}, fitted)


def annotate(
    model: TrainedModel,
    index: LabelIndex,
    adata: ad.AnnData,
    batch_key: str,
    k: int = defaults.K,
    unknown_threshold: float = defaults.UNKNOWN_THRESHOLD,
    surgery: SurgeryConfig | None = None,
    layer: str | None = None,
    class_balance: float = defaults.CLASS_BALANCE,
    latent_key: str = LATENT_KEY,
    majority_voting: bool = False,
    ontology_threshold: float = defaults.ONTOLOGY_THRESHOLD,
    method: str | None = None,
) -> tuple[ad.AnnData, MappedQuery]:
    """Map the query, then transfer every label key of the index; returns the annotated cells
    (``censusvi.outputs`` names what is written). ``majority_voting`` adds, per label key, each
    over-cluster's majority label (``censusvi.annotate.majority``). ``method`` None: the
    default, or knn for an index without a label head, logged once and recorded in
    ``uns["censusvi"]["method_note"]`` (``method.resolve_method``)."""
    check_settings(k, unknown_threshold, class_balance, ontology_threshold, latent_key)
    check_fits(model, index.meta)
    method, note = resolve_method(index, method)  # before mapping: a wrong method fails fast
    if note:
        log.warning(note)
    mapped = map_query(model, adata, batch_key, layer=layer, surgery=surgery)
    out = mapped.annotated_copy(adata, latent_key)
    answers = transfer_all(
        index,
        mapped.latent,
        k,
        unknown_threshold,
        class_balance,
        ontology_threshold,
        method,
        nll=mapped.nll_per_count,
    )
    for key, res in answers.items():
        write_answers(out.obs, key, res)
    voting = {}
    if majority_voting:
        clusters = over_cluster(mapped.latent)
        out.obs[OVER_CLUSTERING_COLUMN] = pd.Categorical(clusters.astype(str))
        for key in index.labels.columns:
            voted = majority_vote(clusters, out.obs[predicted_column(key)].to_numpy())
            out.obs[majority_voting_column(key)] = pd.Categorical(voted)
        voting = {"majority_voting": {"n_clusters": n_clusters(len(mapped.latent))}}
    evaluation = {  # where the query carries true labels: how well the transfer did
        key: label_transfer_metrics(
            out.obs[key],
            out.obs[predicted_column(key)],
            out.obs[probability_column(key)],
            set(index.labels[key]),
        )
        for key in index.labels.columns
        if key in out.obs.columns
    }
    out.uns[UNS_KEY] = {
        **out.uns[UNS_KEY],
        **voting,
        "k": k,
        "unknown_threshold": unknown_threshold,
        "class_balance": class_balance,
        "ontology_threshold": ontology_threshold,
        "method": method,
        **({"method_note": note} if note else {}),
        "index": index_summary(index.meta),
        "evaluation": evaluation,
    }
    return out, mapped


# what index.json holds that the annotated query records (an unknown key, e.g. a hand edit's
# 10^30, is not carried into a file that must be written)
SUMMARY_KEYS = (
    "reference", "obs_filter", "model", "encoder_digest", "evaluation", "n_cells", "dim", "kind",
    "metric", "nlist", "nprobe", "k_factor", "queries_per_s", "memory_bytes", "neighbour_distance",
    "label_frequency", "build_s", "heads",
)  # fmt: skip


def index_summary(meta: dict) -> dict:
    """The index's metadata as the annotated query records it: the ontology by its release and
    flat labels only (its terms and ancestors stay in the index), the out-of-reference fit by
    its version and cells (its quantile tables stay in the index)."""
    out = {k: v for k, v in meta.items() if k in SUMMARY_KEYS or re.fullmatch(r"recall_at_\d+", k)}
    if meta.get("novelty"):
        out["novelty"] = {k: meta["novelty"][k] for k in ("version", "n_cells")}
    ontology = meta.get("ontology") or {}
    out["ontology"] = {k: {"version": o["version"], "flat": o["flat"]} for k, o in ontology.items()}
    return out


def label_transfer_metrics(truth, predicted, probability, reference_labels: set[str]) -> dict:
    """Accuracy, macro-F1 and expected calibration error over cells whose true label the
    reference holds (the others cannot be right; a good annotator marks them uncertain)."""
    from sklearn.metrics import f1_score

    from censusvi.annotate.transfer import expected_calibration_error

    truth, predicted = np.asarray(truth).astype(str), np.asarray(predicted).astype(str)
    known = np.isin(truth, sorted(reference_labels))
    if not known.any():
        return {"n_cells_with_reference_label": 0}
    correct = truth[known] == predicted[known]
    return {
        "n_cells_with_reference_label": int(known.sum()),
        "accuracy": float(correct.mean()),
        "macro_f1": float(
            f1_score(truth[known], predicted[known], average="macro", zero_division=0)
        ),
        "ece": expected_calibration_error(np.asarray(probability, dtype=float)[known], correct),
    }

"""``censusvi index`` and ``censusvi annotate``: reference embeddings -> FAISS; query -> labels."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.annotate.index import LabelIndex, build_index
from censusvi.annotate.majority import majority_vote, n_clusters, over_cluster
from censusvi.annotate.ontology import backoff, label_ontologies
from censusvi.annotate.transfer import label_probabilities, summarise, typicality
from censusvi.data.h5ad import H5adSource
from censusvi.data.soma import open_source
from censusvi.inference import latent_representation
from censusvi.mapping.query import MappedQuery, map_query
from censusvi.mapping.surgery import SurgeryConfig
from censusvi.model.io import TrainedModel
from censusvi.outputs import (
    LATENT_KEY,
    OVER_CLUSTERING_COLUMN,
    UNS_KEY,
    majority_voting_column,
    predicted_column,
    probability_column,
    write_answers,
)

IN_MEMORY = "<AnnData>"  # what an in-memory reference is called in the index's metadata


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
) -> LabelIndex:
    """Embed the reference (an .h5ad, a SOMA experiment or an in-memory AnnData, of batches the
    model knows) and index it; ``ontology``: also keep the Cell Ontology terms of its labels
    (``censusvi.annotate.ontology``) for ontology-aware answers; ``head``: also train a label
    head per key (``censusvi.annotate.head``) for ``method="head"`` / ``"ensemble"``; ``kind`` and
    ``metric``: the FAISS index (``censusvi.annotate.faiss_index``)."""
    if isinstance(data, ad.AnnData):
        source = H5adSource(IN_MEMORY, obs_filter=obs_filter, layer=layer, adata=data)
        data = IN_MEMORY
    else:
        source = open_source(str(data), obs_filter=obs_filter, layer=layer)
    missing = [k for k in label_keys if k not in source.obs.columns]
    if missing:
        raise ValueError(
            f"label key(s) {missing} not in the reference's obs; it has {sorted(source.obs.columns)}"
        )
    pos, z, _ = latent_representation(model, source)
    labels = source.obs.iloc[pos][label_keys].astype(str)
    meta = {"reference": str(data), "obs_filter": obs_filter}
    meta["evaluation"] = holdout_evaluation(z, labels, kind=kind, metric=metric)
    if ontology:
        meta["ontology"] = label_ontologies(source.obs.iloc[pos], label_keys)
    ix = build_index(z, labels, meta, device=faiss_device, kind=kind, metric=metric)
    if head:
        fit_heads(ix, z)
    return ix


def fit_heads(ix: LabelIndex, z: np.ndarray, seed: int = 0) -> None:
    """Train a label head on the index's latents ``z`` for each label key (in place)."""
    from censusvi.annotate.head import fit_head

    for key in ix.labels.columns:
        ix.heads[key], info = fit_head(z, ix.labels[key].to_numpy(), seed)
        ix.meta.setdefault("heads", {})[key] = {"classes": ix.heads[key].classes.tolist(), **info}


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
    predictions = transfer_all(train_index, z[test], k)
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
    method: str = defaults.METHOD,
) -> dict[str, pd.DataFrame]:
    """Label transfer of every label key of the index to each row of ``latent`` by ``method``
    (``label_probabilities_by``): columns predicted, probability, uncertainty, and where the
    index maps the key's labels to the Cell Ontology, ontology_term_id, ontology_label,
    ontology_probability (``ontology.backoff``)."""
    if method not in defaults.METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(defaults.METHODS)}")
    dist, idx = index.search(latent, k)
    out = {}
    for key in index.labels.columns:
        cats, prob = label_probabilities_by(method, index, key, latent, dist, idx, class_balance)
        res = summarise(cats, prob, unknown_threshold)
        onto = index.ontology(key)
        if onto is not None:
            res = res.join(backoff(prob, cats, onto, ontology_threshold).add_prefix("ontology_"))
        out[key] = res
    return out


def label_probabilities_by(
    method: str, index: LabelIndex, key: str, latent, dist, idx, class_balance: float
) -> tuple[np.ndarray, np.ndarray]:
    """p(label | cell) by weighted kNN (``transfer.label_probabilities``), the label head, or
    their mean (``ensemble``). The head's probabilities get kNN's two corrections too: scaled by
    how typical the cell's neighbour distances are, divided by label frequency ** class_balance."""
    reference_distance = index.meta.get("neighbour_distance")
    frequency = index.label_frequency(key)

    def knn() -> tuple[np.ndarray, np.ndarray]:
        neighbours = index.labels[key].to_numpy()[idx]
        return label_probabilities(dist, neighbours, reference_distance, frequency, class_balance)

    if method == "knn":
        return knn()
    head = index.heads.get(key)
    if head is None:
        raise ValueError(
            f"the index has no label head for {key!r} (built without one, or by an older "
            "censusvi): rebuild it with `censusvi index`, or use --method knn"
        )
    p_head = head.probabilities(latent)
    if class_balance:
        p_head = p_head * frequency.reindex(head.classes).fillna(1.0).to_numpy() ** -class_balance
        p_head /= p_head.sum(1, keepdims=True)
    p_head *= typicality(dist, reference_distance)[:, None]
    if method == "head":  # no kNN vote to count
        return head.classes, p_head
    cats, prob = knn()
    aligned = np.zeros_like(p_head)
    aligned[:, np.searchsorted(head.classes, cats)] = prob  # kNN's labels are reference labels
    return head.classes, (aligned + p_head) / 2


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
    method: str = defaults.METHOD,
) -> tuple[ad.AnnData, MappedQuery]:
    """Map the query, then transfer every label key of the index; returns the annotated cells
    (``censusvi.outputs`` names what is written). ``majority_voting`` adds, per label key, each
    over-cluster's majority label (``censusvi.annotate.majority``)."""
    if index.meta.get("dim") != model.config.n_latent:
        raise ValueError(
            f"the index holds {index.meta.get('dim')}-d embeddings but the model's latent is "
            f"{model.config.n_latent}-d: build the index with this model"
        )
    mapped = map_query(model, adata, batch_key, layer=layer, surgery=surgery)
    out = mapped.annotated_copy(adata, latent_key)
    answers = transfer_all(
        index, mapped.latent, k, unknown_threshold, class_balance, ontology_threshold, method
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
        "index": index_summary(index.meta),
        "evaluation": evaluation,
    }
    return out, mapped


def index_summary(meta: dict) -> dict:
    """The index's metadata as the annotated query records it: the ontology by its release and
    flat labels only (its terms and ancestors stay in the index)."""
    out = {k: v for k, v in meta.items() if k not in ("label_keys", "ontology")}
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

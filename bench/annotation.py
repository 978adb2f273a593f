"""Cross-study annotation: censusvi's methods beside PCA + kNN and scvi-tools + kNN, per split.

Split families (``bench/annotation_splits.py``, labels harmonised by hand to the Cell Ontology):
``pbmc-cross`` (3-chemistry PBMC reference -> FACS-sorted Zheng PBMC query, finer labels),
``pbmc-rotation`` (each 10x chemistry the query in turn), ``cellbench-lotech`` (CellBench lung
lines, leave one technology out; flat labels). Per split, method and seed:

- accuracy and macro-F1 of the predicted reference label on the query cells the reference holds
  (a finer query term counts as its most specific reference term at or above it);
- ontology-aware accuracy: a prediction is right when its term is the truth's own term *or an
  ancestor of it* (an ancestor answer, e.g. "mature alpha-beta T cell" for a memory T cell, is
  credited; so would be a very broad one). censusvi's term is its ontology answer
  (``predicted_cell_type_ontology_term_id``, default threshold) where the index has one, else its
  label's term; the baselines' is their label's term; flat labels must match exactly;
- novel-type AUROC: each reference type with >= 10 query cells left out of the index in turn
  (no retraining: the model, or the PCA, has seen that type's reference cells, so this measures
  the label transfer's uncertainty, not a model that never met the type), and ``roc_auc_score``
  of the uncertainty separating the query cells of that type from the query cells of the types
  still held; the mean over left-out types. Baselines' uncertainty is 1 - max kNN probability.

censusvi: ``censusvi.pretrain`` with default settings (default schedule: ``auto``, scvi-tools'
heuristic at this size; 8,000 HVGs where there are more genes), with ``--finetune``
``censusvi.finetune`` with the reference's labels (a left-out type is left out of the
fine-tuning too; off by default, as in the README's recipe), ``censusvi.build_index`` with
its defaults and ``censusvi.annotate`` per method (``--methods``; default: those the installed
``annotate`` accepts). Baselines read the censusvi model's genes (the same input): PCA + kNN
(50 PCs of the reference's log-normalised counts, query projected, no integration) and
scvi-tools + kNN (SCVI NB 2 x 128, 30 latent, its epoch heuristic; ``load_query_data`` + 50
query epochs), both with scArches' weighted kNN (k = 15, no class balance), as bench/mapping.py.
The last line (a contract): ``annotation vs best baseline: macro-F1 +D, novel-type AUROC A``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.neighbors import NearestNeighbors

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "platform"), str(BENCH)]

import annotation_splits as splits  # noqa: E402
import censusvi  # noqa: E402
from annotation_report import report  # noqa: E402
from censusvi.annotate.transfer import transfer_labels  # noqa: E402
from censusvi.outputs import ontology_columns, predicted_column, uncertainty_column  # noqa: E402
from mapping import reference_pca  # noqa: E402

KEY = "cell_type"
CANDIDATE_METHODS = ("knn", "head", "ensemble")
MIN_NOVEL_CELLS = 10
QUICK_EPOCHS, QUICK_QUERY_EPOCHS = 10, 5
PCA, SCVI = "PCA + kNN", "scvi-tools + kNN"


@dataclass
class Answers:
    predicted: np.ndarray  # reference label per query cell
    uncertainty: np.ndarray
    terms: np.ndarray | None = None  # an ontology answer's term per cell ('' where none)
    left_out: dict[str, np.ndarray] = field(default_factory=dict)  # type -> uncertainty without it


def available_methods() -> tuple[list[str] | None, str | None, str]:
    """censusvi.annotate's methods, its default, and a note for the output; ``(None, None,
    ...)`` when it takes no ``method`` (then it is plain kNN)."""
    from censusvi import api  # censusvi.annotate is also the callable subpackage once imported

    params = inspect.signature(api.annotate).parameters
    if "method" not in params:
        return None, None, "censusvi.annotate takes no method: its kNN only"
    param = params["method"]
    named = re.findall(r"['\"](\w+)['\"]", str(param.annotation))
    listed = getattr(censusvi.defaults, "METHODS", None) or named or CANDIDATE_METHODS
    default = param.default or getattr(censusvi.defaults, "METHOD", None)  # None: the default
    return list(listed), default, f"censusvi.annotate methods {list(listed)}"


def novel_types(split: splits.Split) -> list[str]:
    """Reference types with >= MIN_NOVEL_CELLS held query cells, when others are left."""
    labels, counts = np.unique(split.truth[split.truth != ""], return_counts=True)
    if len(split.terms) < 3:
        return []
    return [x for x, n in zip(labels, counts) if n >= MIN_NOVEL_CELLS and n < counts.sum()]


def censusvi_answers(
    split, seed: int, methods, epochs: int | None, cache=None, finetune: bool = False
) -> tuple:
    """Pretrain on the reference (or load it from ``cache``, a folder of models this bench
    saved), then each method's answers (full index, and each novel type left out of the
    index); returns (answers per method name, the model, the indexes by left-out type)."""
    settings = {"seed": seed} | ({"max_epochs": epochs} if epochs else {})
    saved = None
    if cache:
        name = re.sub(r"\W+", "_", f"{split.family}_{split.name}_seed{seed}_{epochs or 'auto'}")
        saved = Path(cache) / name
    if saved is not None and saved.is_dir():
        model = censusvi.load_model(saved)
    else:
        model = censusvi.pretrain(split.ref, "batch", **settings)
        if saved is not None:
            model.save(saved)
    term_col = ontology_columns(KEY)[0]

    def reference(ref):  # the recipe: fine-tune with the labels the index will hold
        return censusvi.finetune(ref, model, KEY, seed=seed) if finetune else model

    def run(index, method, m) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        q = split.query.copy()
        censusvi.annotate(q, m, index, **({"method": method} if method else {}))
        unc = np.nan_to_num(q.obs[uncertainty_column(KEY)].to_numpy(float), nan=1.0)
        terms = q.obs[term_col].astype(str).to_numpy() if term_col in q.obs else None
        return q.obs[predicted_column(KEY)].astype(str).to_numpy(), unc, terms

    keys = methods or [None]
    tuned = reference(split.ref)
    full = censusvi.build_index(split.ref, tuned)
    out = {m: Answers(*run(full, m, tuned)) for m in keys}
    indexes = {"": full}
    for t in novel_types(split):  # the left-out type is in neither the fine-tuning nor the index
        ref = split.ref[split.ref.obs[KEY] != t].copy()
        tuned_t = reference(ref)
        indexes[t] = censusvi.build_index(ref, tuned_t)
        for m in keys:
            out[m].left_out[t] = run(indexes[t], m, tuned_t)[1]
    return {f"censusvi {m or 'knn'}": a for m, a in out.items()}, model, indexes


def knn_answers(z_ref: np.ndarray, z_q: np.ndarray, labels: np.ndarray, novel: list[str]):
    """scArches' weighted kNN (k = 15) from a reference latent; again without each novel type."""

    def run(keep: np.ndarray):
        dist, idx = NearestNeighbors(n_neighbors=15).fit(z_ref[keep]).kneighbors(z_q)
        res = transfer_labels(dist, labels[keep][idx])
        return res["predicted"].to_numpy().astype(str), res["uncertainty"].to_numpy(float)

    out = Answers(*run(np.ones(len(labels), dtype=bool)))
    out.left_out = {t: run(labels != t)[1] for t in novel}
    return out


def model_genes(split: splits.Split, model) -> list[str]:
    names = set(split.ref.var_names)
    by_symbol = [g for g in model.genes.symbols if g in names]
    return by_symbol if by_symbol else [g for g in model.genes.ids if g in names]


def aligned(a, genes: list[str]):
    """``a`` over ``genes`` in that order, zero counts for genes it lacks."""
    import anndata as ad
    import scipy.sparse as sp

    col = {g: j for j, g in enumerate(a.var_names)}
    have = [i for i, g in enumerate(genes) if g in col]
    x = sp.csr_matrix(a.X)[:, [col[genes[i]] for i in have]].tocoo()
    cols = np.asarray(have)[x.col]
    out = sp.csr_matrix((x.data, (x.row, cols)), shape=(a.n_obs, len(genes)), dtype=np.float32)
    return ad.AnnData(out, obs=a.obs.copy(), var=pd.DataFrame(index=genes))


def pca_answers(split: splits.Split, seed: int, genes: list[str]) -> Answers:
    z_ref, z_q = reference_pca(aligned(split.ref, genes), aligned(split.query, genes), seed)
    return knn_answers(z_ref, z_q, split.ref.obs[KEY].astype(str).to_numpy(), novel_types(split))


def scvi_answers(split, seed: int, genes: list[str], epochs, query_epochs: int) -> Answers:
    """scvi-tools' scArches path, as bench/mapping.py runs it."""
    import scvi

    scvi.settings.seed = seed
    ref = aligned(split.ref, genes)
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    sm = scvi.model.SCVI(ref, n_hidden=128, n_latent=30, n_layers=2, gene_likelihood="nb")
    sm.train(max_epochs=epochs, batch_size=128, accelerator="cpu", enable_progress_bar=False)
    with tempfile.TemporaryDirectory() as tmp:
        sm.save(tmp, overwrite=True)
        q = aligned(split.query, genes)
        scvi.model.SCVI.prepare_query_anndata(q, tmp)
        qm = scvi.model.SCVI.load_query_data(q, tmp)
    qm.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu",
             enable_progress_bar=False)  # fmt: skip
    z_ref, z_q = sm.get_latent_representation(ref), qm.get_latent_representation(q)
    return knn_answers(z_ref, z_q, split.ref.obs[KEY].astype(str).to_numpy(), novel_types(split))


def score(split: splits.Split, a: Answers) -> dict[str, float]:
    """Accuracy, macro-F1, ontology-aware accuracy (held cells) and novel-type AUROC."""
    held = split.truth != ""
    truth, pred = split.truth[held], a.predicted[held]
    terms = np.array([split.terms.get(p, p) for p in pred], dtype=object)
    if a.terms is not None:  # censusvi's ontology answer, where it gave a term
        answer = a.terms[held]
        terms = np.where(answer != "", answer, terms)
    onto = [t in splits.ancestors(own) for t, own in zip(terms, split.truth_term[held])]
    aurocs = [
        roc_auc_score(truth == t, a.left_out[t][held]) for t in a.left_out if (truth != t).any()
    ]
    return {
        "n_cells": int(held.sum()),
        "accuracy": float((truth == pred).mean()),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "onto_accuracy": float(np.mean(onto)),
        "novel_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
    }


def run_split(
    split, seed, methods, scvi_on: bool, quick: bool, study=None, cache=None, finetune=False
):
    """The rows of one split and seed; ``study``: a dict whose "auroc" and "absent" lists get
    ``bench/annotation_novelty.py``'s tables of this split."""
    epochs = QUICK_EPOCHS if quick else None
    t0 = time.perf_counter()
    answers, model, indexes = censusvi_answers(split, seed, methods, epochs, cache, finetune)
    times = dict.fromkeys(answers, time.perf_counter() - t0)
    if study is not None:
        import annotation_novelty as nov

        kinds = methods or ["knn"]
        left_out = {t: ix for t, ix in indexes.items() if t}
        study["auroc"].append(nov.study(split, model, left_out, kinds).assign(seed=seed))
        study["absent"].append(nov.absent_predictions(split, model, indexes[""], kinds))
    genes = model_genes(split, model)
    t0 = time.perf_counter()
    answers[PCA] = pca_answers(split, seed, genes)
    times[PCA] = time.perf_counter() - t0
    if scvi_on:
        t0 = time.perf_counter()
        query_epochs = QUICK_QUERY_EPOCHS if quick else 50
        answers[SCVI] = scvi_answers(split, seed, genes, epochs, query_epochs)
        times[SCVI] = time.perf_counter() - t0
    rows = []
    for method, a in answers.items():
        row = {"family": split.family, "split": split.name, "method": method, "seed": seed}
        row |= score(split, a) | {"seconds": times[method]}
        rows.append(row)
        print(f"  {split.name} seed {seed} {method:18s} acc {row['accuracy']:.3f} F1 "
              f"{row['macro_f1']:.3f} onto {row['onto_accuracy']:.3f} AUROC "
              f"{row['novel_auroc']:.3f} ({times[method]:.0f} s)", flush=True)  # fmt: skip
    return rows


def ints(text: str | None) -> list[int]:
    return [int(s) for s in (text or "").split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(splits.FAMILIES))
    p.add_argument("--methods", help="censusvi methods, e.g. knn,head,ensemble (default: all "
                   "the installed censusvi.annotate accepts)")  # fmt: skip
    p.add_argument("--seeds", help="default 0,1,2 (--quick: 0)")
    p.add_argument("--scvi-seeds", help="seeds that also run scvi-tools ('' none; default: all)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_EPOCHS} epochs")
    p.add_argument("--max-cells", type=int, help="subsample each reference and query to this")
    p.add_argument("--model-cache", help="a folder: keep each pretrained censusvi model there "
                   "and reuse it in later runs (same split, seed and epochs)")  # fmt: skip
    p.add_argument("--novelty-study", action="store_true", help="also print each out-of-"
                   "reference signal combination's AUROC (bench/annotation_novelty.py)")  # fmt: skip
    p.add_argument("--finetune", action="store_true", help="fine-tune each reference model with "
                   "its labels before indexing (censusvi.finetune; off in the default recipe)")  # fmt: skip
    a = p.parse_args(argv)
    finetune = a.finetune
    if finetune and a.novelty_study:
        raise SystemExit("--novelty-study reads one model per split: leave out --finetune")
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "scvi"):  # their per-fit INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.perf_counter()
    seeds = ints(a.seeds or ("0" if a.quick else "0,1,2"))
    scvi_seeds = set(seeds if a.scvi_seeds is None else ints(a.scvi_seeds))
    accepted, default, note = available_methods()
    methods = accepted if a.methods is None else a.methods.split(",")
    if accepted is None:
        if methods not in (None, ["knn"]):
            raise SystemExit(f"{note}; --methods {a.methods} cannot run")
        methods = None
    elif set(methods) - set(accepted):
        raise SystemExit(f"--methods {sorted(set(methods) - set(accepted))}: not in {accepted}")
    import torch

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{note}; default method: {default or 'knn'}; fine-tuned with the reference's "
          f"labels: {'yes' if finetune else 'no'}; censusvi default settings "
          f"({'--quick: ' + str(QUICK_EPOCHS) + ' epochs' if a.quick else 'default schedule'})")  # fmt: skip
    print(f"Cell Ontology {splits.verify_terms()}: every hand-set term id and name checked")
    if not splits.kang_has_labels():
        print("Kang PBMC: no cell-type labels (all 'unknown'): not used")
    rows, study = [], ({"auroc": [], "absent": []} if a.novelty_study else None)
    for split in splits.load(a.families.split(","), a.max_cells):
        print(f"{split.family} / {split.name}: reference {split.ref.n_obs} cells "
              f"({len(split.terms)} types), query {split.query.n_obs} "
              f"({int((split.truth != '').sum())} held)", flush=True)  # fmt: skip
        for seed in seeds:
            rows += run_split(
                split, seed, methods, seed in scvi_seeds, a.quick, study, a.model_cache, finetune
            )
    if study is not None:
        import annotation_novelty as nov

        nov.print_study(study["auroc"], study["absent"])
    default_name = f"censusvi {default or 'knn'}"
    report(pd.DataFrame(rows), default_name, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which FAISS index a reference gets, how it is made, tuned and measured (``index.build_index``).

Chosen by size (``kind="auto"``): exact search (``flat``) up to ``EXACT_MAX`` cells; IVF-Flat
(``ivfflat``, the vectors kept whole) while they fit in ``IVFPQ_ABOVE_BYTES``; IVF-PQ above
(``ivfpq``: 8-bit product-quantised residuals, then the best ``k_factor`` × k candidates re-ranked
on fp16 copies of the vectors, ``IndexRefine``): 133 bytes a cell at 50-d against 208. IVF
indexes have nlist ~ sqrt(N); nprobe (and IVF-PQ's re-rank pool) are tuned at build time: the
cheapest setting that finds ``RECALL_TARGET`` of the exact k neighbours of sampled reference
cells. The metric is ``l2`` or ``cosine`` (unit vectors, inner product); searches return the
Euclidean distance either way (for cosine, that of the unit vectors: sqrt(2 - 2 cos)).
"""

from __future__ import annotations

import os
import tempfile
import time

import faiss
import numpy as np

from censusvi import defaults

EXACT_MAX = 200_000
IVFPQ_ABOVE_BYTES = 2**30  # float32 vectors above 1 GiB (5.4 M cells at 50-d): IVF-PQ
RECALL_TARGET = 0.95
# nprobe tried in turn, the first that reaches RECALL_TARGET kept. Tuning leaves each sampled
# cell out of its own answer; still, reference cells find their neighbours more easily than a
# new donor's: at 10 M cells (3,162 lists, IVF-PQ, k_factor 2) nprobe 2 gave 0.965 for reference
# cells but 0.915 for query cells, hence the floor of 3. Query cells found 0.958 / 0.974 / 0.983
# of their exact neighbours at nprobe 3 / 4 / 8, at 11.7k / 8.8k / 5.6k queries/s (RESULTS.md)
NPROBE_STEPS = (3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
K_FACTORS = (2, 4, 8, 16)  # IVF-PQ: candidates re-ranked exactly, as a multiple of k
TRAIN_PER_LIST = 64  # k-means training cells per inverted list
PQ_TRAIN_PER_CENTROID = 64  # IVF-PQ codebooks: training cells per code (FAISS: 256)
PQ_TRAIN_ROUNDS = 10  # and k-means rounds (FAISS: 25); the re-rank makes up the difference


def check_choice(kind: str, metric: str) -> None:
    if kind not in defaults.INDEX_KINDS:
        raise ValueError(f"index kind {kind!r}: choose one of {', '.join(defaults.INDEX_KINDS)}")
    if metric not in defaults.METRICS:
        raise ValueError(f"metric {metric!r}: choose one of {', '.join(defaults.METRICS)}")


def choose_kind(kind: str, n: int, dim: int, exact_max: int = EXACT_MAX) -> str:
    """``kind`` itself unless "auto": flat, ivfflat or ivfpq by the number (and size) of vectors."""
    if kind != "auto":
        return kind
    if n <= exact_max:
        return "flat"
    return "ivfpq" if n * dim * 4 > IVFPQ_ABOVE_BYTES else "ivfflat"


def prepare(z: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous; unit rows for cosine (a zero row stays zero)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    if metric == "cosine":
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(z, dtype=np.float32)


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def to_distance(scores: np.ndarray, metric: str) -> np.ndarray:
    """FAISS's scores as Euclidean distances (squared L2, or cosine similarity of unit vectors)."""
    if metric == "cosine":
        return np.sqrt(np.maximum(2.0 - 2.0 * scores, 0))
    return np.sqrt(np.maximum(scores, 0))


def pq_subquantizers(dim: int) -> int:
    """Sub-vectors of IVF-PQ's codes: the largest divisor of ``dim`` up to dim / 2 (2-d
    sub-vectors at 50-d: one byte per two dimensions)."""
    return max(m for m in range(1, max(1, dim // 2) + 1) if dim % m == 0)


def factory_string(kind: str, n: int, dim: int) -> str:
    nlist = max(1, int(np.sqrt(n)))
    return {
        "flat": "Flat",
        "ivfflat": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{pq_subquantizers(dim)}x8,Refine(SQfp16)",
    }[kind]


def new_index(z: np.ndarray, kind: str, metric: str, seed: int) -> faiss.Index:
    """An index of ``kind`` over the prepared vectors ``z`` (trained on a sample, all added)."""
    n, dim = z.shape
    index = faiss.index_factory(dim, factory_string(kind, n, dim), faiss_metric(metric))
    if kind == "ivfpq":  # 256-centroid k-means per sub-vector: fewer cells and rounds suffice
        ivf = ivf_part(index)
        ivf.do_polysemous_training = False  # (FAISS's default: minutes, for a search not used)
        ivf.pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID
        ivf.pq.cp.niter = PQ_TRAIN_ROUNDS
    if kind != "flat":
        nlist = ivf_part(index).nlist
        rows = np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False)
        index.train(z[np.sort(rows)])
    index.add(z)
    return index


def ivf_part(index: faiss.Index):
    """The IVF index that holds nprobe (the index itself, or IVF-PQ's base), or None."""
    if hasattr(index, "nprobe"):
        return index
    base = getattr(index, "base_index", None)
    return None if base is None else ivf_part(faiss.downcast_index(base))


def search_settings(index: faiss.Index) -> dict:
    """nprobe (and k_factor for a re-ranked index) as index.json records them."""
    out = {}
    ivf = ivf_part(index)
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
    if hasattr(index, "k_factor"):
        out["k_factor"] = float(index.k_factor)
    return out


def apply_settings(index: faiss.Index, settings: dict) -> None:
    ivf = ivf_part(index)
    if ivf is not None and "nprobe" in settings:
        ivf.nprobe = min(int(settings["nprobe"]), ivf.nlist)
    if hasattr(index, "k_factor") and "k_factor" in settings:
        index.k_factor = float(settings["k_factor"])


def _recall(index, xq, exact, rows, k: int) -> float:
    _, found = index.search(xq, k + 1)

    def others(f: np.ndarray, row: int) -> set:
        return set(f[f != row][:k])

    return float(
        np.mean([len(others(f, r) & others(e, r)) / k for f, e, r in zip(found, exact, rows)])
    )


def tune(
    index: faiss.Index, z: np.ndarray, metric: str, k: int, seed: int, n_cells: int = 1000
) -> dict:
    """The cheapest search settings (smallest nprobe, then smallest k_factor) whose recall@k of
    exact neighbours, on sampled reference cells (each left out of its own answer, as a new query
    would not find itself), reaches ``RECALL_TARGET``; with that recall and the queries per second
    of those searches. ``z`` is prepared (``prepare``)."""
    ivf = ivf_part(index)
    rows = np.random.default_rng(seed).choice(len(z), min(len(z), n_cells), replace=False)
    xq = np.ascontiguousarray(z[rows])
    if ivf is None:  # exact search: nothing to tune
        t0 = time.perf_counter()
        index.search(xq, k)
        seconds = time.perf_counter() - t0
        return {f"recall_at_{k}": 1.0, "queries_per_s": round(len(xq) / max(seconds, 1e-9), 1)}
    _, exact = faiss.knn(xq, z, k + 1, metric=faiss_metric(metric))
    k_factors = K_FACTORS if hasattr(index, "k_factor") else (None,)
    recall, seconds = 0.0, 0.0
    for nprobe in NPROBE_STEPS:
        for k_factor in k_factors:
            apply_settings(index, {"nprobe": nprobe, "k_factor": k_factor or 1})
            t0 = time.perf_counter()
            recall = _recall(index, xq, exact, rows, k)
            seconds = time.perf_counter() - t0
            if recall >= RECALL_TARGET:
                break
        if recall >= RECALL_TARGET or ivf.nprobe >= ivf.nlist:
            break
    return {
        **search_settings(index),
        f"recall_at_{k}": round(recall, 4),
        "queries_per_s": round(len(xq) / max(seconds, 1e-9), 1),
    }


def memory_bytes(index: faiss.Index) -> int:
    """The index's size as FAISS writes it (what a replica holds in memory, give or take)."""
    fd, path = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    finally:
        os.remove(path)

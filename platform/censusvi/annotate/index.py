"""A FAISS index over reference embeddings plus the label table, saved as one directory.

Exact ``IndexFlatL2`` up to ``EXACT_MAX`` cells (exact search is still fast there and needs no
training); above it ``IndexIVFFlat`` with nlist ~ sqrt(N) and nprobe tuned at build time: the
smallest that finds ``RECALL_TARGET`` of the exact k neighbours of a sample of reference cells.

Searches run on a GPU when FAISS has one (faiss-gpu installed in place of faiss-cpu, the ``gpu``
extra, and a CUDA device visible): ``device`` "auto" (the default, or ``$CENSUSVI_FAISS_DEVICE``),
"gpu" (an error without one) or "cpu". The file on disk is always the CPU index, so an index
built on a GPU machine loads on a laptop and the other way round.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from censusvi.atomic import atomic_directory

log = logging.getLogger(__name__)
FAISS_DEVICES = ("auto", "cpu", "gpu")
EXACT_MAX = 200_000
NPROBE = 16  # for indexes saved before nprobe was tuned
RECALL_TARGET = 0.95
NPROBE_STEPS = (8, 16, 32, 64, 128, 256)  # from 8: a query unlike the reference needs a margin


def faiss_gpu_count() -> int:
    """GPUs FAISS can use: always 0 with faiss-cpu, which has no GPU code."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def faiss_builds() -> list[str]:
    """The FAISS wheels installed. faiss-cpu and faiss-gpu-* both ship the ``faiss`` package, and
    Python imports faiss-cpu's extension module (``_swigfaiss.abi3.so``) before faiss-gpu's
    (``_swigfaiss.so``): with both installed, FAISS is the CPU build."""
    from importlib.metadata import distributions

    names = {(d.metadata["Name"] or "").lower() for d in distributions()}
    return sorted(n for n in names if n.startswith("faiss-"))


def _gpu_builds_shadowed(builds: list[str]) -> list[str]:
    """The faiss-gpu wheels that faiss-cpu shadows in ``builds`` (none without faiss-cpu)."""
    return [b for b in builds if b.startswith("faiss-gpu")] if "faiss-cpu" in builds else []


def gpu_install_hint() -> str:
    """How to get a FAISS that can use a GPU, from what is installed now."""
    builds = faiss_builds()
    gpu = [b for b in builds if b.startswith("faiss-gpu")]
    if _gpu_builds_shadowed(builds):
        return (
            f"{' and '.join(builds)} are both installed and faiss-cpu's module shadows the GPU "
            f"build: pip uninstall -y faiss-cpu && pip install --force-reinstall --no-deps {gpu[0]}"
        )
    if gpu:
        return f"{gpu[0]} is installed: check that a CUDA device is visible (nvidia-smi)"
    return (
        "install faiss-gpu in place of faiss-cpu (pip install 'censusvi[gpu]', then pip "
        "uninstall -y faiss-cpu && pip install --force-reinstall --no-deps faiss-gpu-cu12) on a "
        "machine with a CUDA GPU"
    )


@functools.cache
def _warn_if_gpu_build_shadowed() -> None:
    """Once per process: someone who installed the gpu extra expects GPU searches."""
    if _gpu_builds_shadowed(faiss_builds()):
        log.warning("FAISS searches run on the CPU: %s", gpu_install_hint())


def place_index(index: faiss.Index, device: str | None = None) -> tuple[faiss.Index, object]:
    """The index where searches will run, and the GPU resources that must outlive it (or None)."""
    device = device or os.environ.get("CENSUSVI_FAISS_DEVICE", "auto")
    if device not in FAISS_DEVICES:
        raise ValueError(f"FAISS device {device!r}: choose one of {FAISS_DEVICES}")
    if device == "auto" and faiss_gpu_count() == 0:
        _warn_if_gpu_build_shadowed()
        return index, None
    if device == "cpu":
        return index, None
    if faiss_gpu_count() == 0:
        raise RuntimeError(
            f"FAISS device 'gpu' asked for, but FAISS sees no GPU: {gpu_install_hint()}; or use "
            "device 'auto' or 'cpu'"
        )
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


HEADS_FILE = "heads.safetensors"  # the label heads' weights (annotate/head.py), no pickle


@dataclass
class LabelIndex:
    index: faiss.Index  # on a GPU when placed there (see ``gpu_resources``)
    labels: pd.DataFrame  # one row per reference cell, one column per label key
    meta: dict
    _frequency: dict[str, pd.Series] = field(default_factory=dict, repr=False, compare=False)
    gpu_resources: object = field(default=None, repr=False, compare=False)
    """FAISS's GPU memory and streams for a GPU index (None on the CPU); freed with the index."""
    heads: dict = field(default_factory=dict, repr=False, compare=False)
    """label key -> ``LabelHead`` (annotate/head.py), where one was trained; meta["heads"] has
    each head's classes and held-out calibration."""

    @property
    def device(self) -> str:
        return "cpu" if self.gpu_resources is None else "gpu"

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index directory ``censusvi index`` writes (``save_index``)."""
        return save_index(self, out, overwrite)

    def cpu_index(self) -> faiss.Index:
        """The index as it is written to disk."""
        return self.index if self.gpu_resources is None else faiss.index_gpu_to_cpu(self.index)

    def ontology(self, key: str):
        """The ``LabelOntology`` of label key ``key``, or None (no label maps to a term)."""
        from censusvi.annotate.ontology import LabelOntology

        d = self.meta.get("ontology", {}).get(key)
        return None if d is None else LabelOntology.from_dict(d)

    def label_frequency(self, key: str) -> pd.Series:
        """Each label's share of the reference (computed once: an index can hold 74 M labels)."""
        if key not in self._frequency:
            self._frequency[key] = self.labels[key].astype(str).value_counts(normalize=True)
        return self._frequency[key]

    def search(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, neighbour rows), each (n, k)."""
        k = min(k, self.index.ntotal)
        z = np.ascontiguousarray(z, dtype=np.float32)
        d2, idx = self.index.search(z, k)
        short = (idx < 0).any(1)  # an IVF probe that found fewer than k cells: probe wider
        nprobe = getattr(self.index, "nprobe", None)
        while short.any() and nprobe is not None and self.index.nprobe < self.index.nlist:
            self.index.nprobe = min(self.index.nprobe * 4, self.index.nlist)
            d2[short], idx[short] = self.index.search(z[short], k)
            short = (idx < 0).any(1)
        if nprobe is not None:
            self.index.nprobe = nprobe
        return np.sqrt(np.maximum(d2, 0)), idx


def reference_distance_quantiles(
    index: faiss.Index, z: np.ndarray, k: int, seed: int
) -> dict[str, float]:
    """How far reference cells are from their own k neighbours (self excluded): median and 99th
    percentile of the mean distance. A query cell much farther than this is unlike the reference."""
    rows = np.random.default_rng(seed).choice(len(z), min(len(z), 20_000), replace=False)
    kk = min(k + 1, index.ntotal)
    d2, _ = index.search(z[rows], kk)
    mean_d = np.sqrt(np.maximum(d2[:, 1:], 0)).mean(1) if kk > 1 else np.zeros(len(rows))
    return {"k": k, "q50": float(np.quantile(mean_d, 0.5)), "q99": float(np.quantile(mean_d, 0.99))}


def tune_nprobe(
    index: faiss.Index, z: np.ndarray, k: int, seed: int, n_probe_cells: int = 1000
) -> tuple[int, float]:
    """The smallest nprobe whose recall@k of exact neighbours (on sampled reference cells, each
    cell itself left out, as a new query would not find itself) reaches ``RECALL_TARGET``;
    returns (nprobe, its recall)."""
    rows = np.random.default_rng(seed).choice(len(z), min(len(z), n_probe_cells), replace=False)
    xq = np.ascontiguousarray(z[rows])
    _, exact = faiss.knn(xq, z, k + 1)

    def others(found: np.ndarray, row: int) -> set:
        return set(found[found != row][:k])

    recall = 0.0
    for nprobe in NPROBE_STEPS:
        index.nprobe = min(nprobe, index.nlist)
        _, found = index.search(xq, k + 1)
        recall = float(
            np.mean([len(others(f, r) & others(e, r)) / k for f, e, r in zip(found, exact, rows)])
        )
        if recall >= RECALL_TARGET or nprobe >= index.nlist:
            break
    return int(index.nprobe), recall


def build_index(
    z: np.ndarray,
    labels: pd.DataFrame,
    meta: dict | None = None,
    seed: int = 0,
    k: int = 15,
    exact_max: int = EXACT_MAX,
    device: str | None = None,
) -> LabelIndex:
    """Exact search up to ``exact_max`` cells, an IVF index with a tuned nprobe above; placed on
    ``device`` first, so nprobe is tuned with the searches users will run."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    n, dim = z.shape
    if n == 0:
        raise ValueError("no reference cells to index")
    tuned: dict = {}
    if n <= exact_max:
        index = faiss.IndexFlatL2(dim)
        kind = "flat"
    else:
        nlist = int(np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        sample = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
        index.train(z[sample])
        kind = f"ivf{nlist}"
    index.add(z)
    index, gpu_resources = place_index(index, device)
    if kind != "flat":
        nprobe, recall = tune_nprobe(index, z, k, seed)
        tuned = {"nprobe": nprobe, f"recall_at_{k}": round(recall, 4)}
    info = {
        **(meta or {}),
        "n_cells": n,
        "dim": dim,
        "kind": kind,
        "label_keys": list(labels.columns),
        **tuned,
    }
    info["neighbour_distance"] = reference_distance_quantiles(index, z, k, seed)
    labels = labels.reset_index(drop=True).astype(str)
    return LabelIndex(index, labels, info, gpu_resources=gpu_resources)


def save_index(ix: LabelIndex, out: str | os.PathLike, overwrite: bool = False) -> Path:
    with atomic_directory(out, "index", overwrite) as tmp:
        faiss.write_index(ix.cpu_index(), str(tmp / "index.faiss"))
        ix.labels.to_parquet(tmp / "labels.parquet")
        (tmp / "index.json").write_text(json.dumps(ix.meta, indent=1))
        if ix.heads:
            from safetensors.torch import save_file

            tensors = {k: v for key, h in ix.heads.items() for k, v in h.tensors(key).items()}
            save_file(tensors, str(tmp / HEADS_FILE))
    return Path(out)


def load_index(path: str | os.PathLike, device: str | None = None) -> LabelIndex:
    path = Path(path)
    if not (path / "index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a censusvi index (built by `censusvi index`): index.json is missing"
        )
    meta = json.loads((path / "index.json").read_text())
    index = faiss.read_index(str(path / "index.faiss"))
    index, gpu_resources = place_index(index, device)
    if meta.get("kind", "").startswith("ivf"):
        index.nprobe = int(meta.get("nprobe", NPROBE))
    labels = pd.read_parquet(path / "labels.parquet")
    heads = {}
    if (path / HEADS_FILE).is_file():
        from safetensors.torch import load_file

        from censusvi.annotate.head import LabelHead

        tensors = load_file(str(path / HEADS_FILE))
        for key, info in meta.get("heads", {}).items():
            heads[key] = LabelHead.from_tensors(tensors, key, info["classes"])
    return LabelIndex(index, labels, meta, gpu_resources=gpu_resources, heads=heads)

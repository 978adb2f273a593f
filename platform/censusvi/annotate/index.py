"""A FAISS index over reference embeddings plus the label table, saved as one directory.

Which index (exact, IVF-Flat or IVF-PQ with a re-rank, chosen by size), its metric (l2 or cosine),
and how its search settings are tuned: ``censusvi.annotate.faiss_index``. index.json records the
kind, metric, search settings, recall@k on held-out reference cells, queries per second, memory
and build time.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.annotate import faiss_index as fx
from censusvi.annotate import index_checks as checks
from censusvi.annotate.faiss_index import EXACT_MAX, RECALL_TARGET  # noqa: F401 (re-exported)
from censusvi.annotate.index_checks import HEADS_FILE, IndexDamaged  # noqa: F401 (re-exported)
from censusvi.atomic import atomic_directory

log = logging.getLogger(__name__)
FAISS_DEVICES = ("auto", "cpu", "gpu")
NPROBE = 16  # for indexes saved before nprobe was tuned


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
    if hasattr(index, "k_factor"):  # IVF-PQ's re-rank (IndexRefine) has no GPU version
        log.info("the IVF-PQ index searches on the CPU (FAISS has no GPU re-rank step)")
        return index, None
    if faiss_gpu_count() == 0:
        raise RuntimeError(
            f"FAISS device 'gpu' asked for, but FAISS sees no GPU: {gpu_install_hint()}; or use "
            "device 'auto' or 'cpu'"
        )
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


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
        return None if d is None else LabelOntology.from_dict(d)  # load_index checked it

    def label_frequency(self, key: str) -> pd.Series:
        """Each label's share of the reference: from index.json where the build stored it
        (``label_shares``), else counted once (seconds for the first query at 10 M labels)."""
        if key not in self._frequency:
            stored = (self.meta.get("label_frequency") or {}).get(key)
            self._frequency[key] = (
                pd.Series(stored["shares"], index=stored["labels"], dtype=float)
                if stored
                else self.labels[key].astype(str).value_counts(normalize=True)
            )
        return self._frequency[key]

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "l2")

    def search(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, neighbour rows), each (n, k); for a cosine index, distances
        between the unit vectors (sqrt(2 - 2 cos))."""
        k = min(k, self.index.ntotal)
        z = fx.prepare(z, self.metric)
        scores, idx = self.index.search(z, k)
        short = (idx < 0).any(1)  # an IVF probe that found fewer than k cells: probe wider
        ivf = fx.ivf_part(self.index)
        nprobe = None if ivf is None else ivf.nprobe
        while short.any() and ivf is not None and ivf.nprobe < ivf.nlist:
            ivf.nprobe = min(ivf.nprobe * 4, ivf.nlist)
            scores[short], idx[short] = self.index.search(z[short], k)
            short = (idx < 0).any(1)
        if ivf is not None:
            ivf.nprobe = nprobe
        return fx.to_distance(scores, self.metric), idx


def reference_distance_quantiles(ix: LabelIndex, z: np.ndarray, k: int, seed: int) -> dict:
    """How far reference cells are from their own k neighbours (self excluded): median and 99th
    percentile of the mean distance. A query cell much farther than this is unlike the reference."""
    rows = np.random.default_rng(seed).choice(len(z), min(len(z), 20_000), replace=False)
    kk = min(k + 1, ix.index.ntotal)
    dist, _ = ix.search(z[rows], kk)
    mean_d = dist[:, 1:].mean(1) if kk > 1 else np.zeros(len(rows))
    return {"k": k, "q50": float(np.quantile(mean_d, 0.5)), "q99": float(np.quantile(mean_d, 0.99))}


def build_index(
    z: np.ndarray,
    labels: pd.DataFrame,
    meta: dict | None = None,
    seed: int = 0,
    k: int = 15,
    exact_max: int = EXACT_MAX,
    device: str | None = None,
    kind: str = defaults.INDEX_KIND,
    metric: str = defaults.METRIC,
) -> LabelIndex:
    """An index of ``kind`` (``faiss_index.choose_kind``: "auto" by size, exact search up to
    ``exact_max`` cells) and ``metric``, placed on ``device`` first so that its search settings
    are tuned with the searches users will run; index.json gets the figures."""
    fx.check_choice(kind, metric)
    t0 = time.perf_counter()
    zp = fx.prepare(z, metric)
    n, dim = zp.shape
    if n == 0:
        raise ValueError("no reference cells to index")
    kind = fx.choose_kind(kind, n, dim, exact_max)
    index = fx.new_index(zp, kind, metric, seed)
    memory = fx.memory_bytes(index)
    index, gpu_resources = place_index(index, device)
    tuned = fx.tune(index, zp, metric, k, seed)
    info = {
        **(meta or {}),
        "n_cells": n,
        "dim": dim,
        "kind": kind,
        "metric": metric,
        "label_keys": list(labels.columns),
        **({"nlist": int(fx.ivf_part(index).nlist)} if kind != "flat" else {}),
        **tuned,
        "memory_bytes": memory,
    }
    labels = labels.reset_index(drop=True).astype(str)
    ix = LabelIndex(index, labels, info, gpu_resources=gpu_resources)
    info["neighbour_distance"] = reference_distance_quantiles(ix, z, k, seed)
    info["label_frequency"] = label_shares(ix)
    info["build_s"] = round(time.perf_counter() - t0, 2)
    return ix


def label_shares(ix: LabelIndex, max_labels: int = 10_000) -> dict[str, dict[str, list]]:
    """Each label key's labels and their shares of the reference, for index.json (so that a
    loaded index need not count millions of labels on its first query); keys with more than
    ``max_labels`` distinct labels are counted when first needed instead."""
    out = {}
    for key in ix.labels.columns:
        freq = ix.label_frequency(key)
        if len(freq) <= max_labels:
            out[key] = {"labels": freq.index.astype(str).tolist(), "shares": freq.tolist()}
    return out


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
    """The index ``save_index`` wrote to ``path``; a damaged or edited directory is one
    ``IndexDamaged`` line naming the file (never a FAISS, Arrow or safetensors traceback;
    ``index_checks`` says what is checked)."""
    path = Path(path)
    meta = checks.read_meta(path)
    for name in ("index.faiss", "labels.parquet", HEADS_FILE):  # a FIFO blocked the readers
        if (path / name).exists() and not (path / name).is_file():
            raise checks.damaged(path / name, checks.IndexDamaged("is not a regular file"))
    step = "index.faiss"
    try:
        index = faiss.read_index(str(path / step))
        checks.check_faiss(index, meta)
        step = "labels.parquet"
        labels = pd.read_parquet(path / step)
        held = checks.check_labels(labels, meta, index.ntotal)
        step = HEADS_FILE
        heads = checks.load_heads(path, meta, held)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the reader raised, name the file instead
        raise checks.damaged(path / step, e) from None
    index, gpu_resources = place_index(index, device)
    if fx.ivf_part(index) is not None:
        fx.apply_settings(index, {"nprobe": NPROBE, **fx.search_settings(index), **meta})
    return LabelIndex(index, labels, meta, gpu_resources=gpu_resources, heads=heads)

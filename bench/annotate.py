"""Label transfer against a 1 M- to 10 M-cell reference: FAISS IVF-Flat / IVF-PQ vs exact search.

The reference is real latent structure scaled up: a censusvi model (Census architecture) is
trained on the FACS-sorted PBMC reference of pbmc_zheng_sorted_donorA_mudan.h5ad, its 2,140
cells are embedded, and the latents are resampled with small Gaussian jitter (5 % of each
dimension's spread) to ``--reference-cells``, labels carried. Queries are the donor-A cells'
latents, jittered the same way. Reports index build time (k-means training, adding, nprobe
tuning), recall@15 against exact search, queries per second for search + weighted-kNN transfer,
the index's memory, and how often its labels equal the exact-search labels. The last line (a
contract): ``annotate 10M refs: Q queries/s, recall@15 R, index memory M GiB, build B s``.

    python bench/annotate.py --refs 10000000 --index ivfpq
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from censusvi import defaults  # noqa: E402
from censusvi.annotate.index import LabelIndex, build_index  # noqa: E402
from censusvi.annotate.pipeline import transfer_all  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pbmc_zheng_sorted_donorA_mudan.h5ad"


def real_latents(epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import anndata as ad

    from censusvi.inference import get_latent_representation
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        cfg = PretrainConfig(
            DataConfig(source=str(DATA), batch_keys=("batch",), n_hvg=2000),
            ModelSettings(),
            TrainConfig(max_epochs=epochs, batch_size=256, lr=1e-3, seed=0, schedule="census"),
        )
        model, _ = pretrain(cfg, Path(tmp) / "m", quiet=True)
        a = ad.read_h5ad(DATA)
        z = get_latent_representation(model, a)
    labelled = (a.obs["cell_type"] != "unknown").to_numpy()
    return z[labelled], a.obs["cell_type"].to_numpy()[labelled].astype(str), z[~labelled]


def jitter(z: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows = rng.integers(0, len(z), n)
    noise = rng.normal(size=(n, z.shape[1])).astype(np.float32) * (0.05 * z.std(0))
    return (z[rows] + noise).astype(np.float32), rows


class ExactSearch:
    """Brute-force search over ``z`` without copying it into a FAISS index (10 M x 50 = 2 GB)."""

    def __init__(self, z: np.ndarray):
        self.z, self.ntotal = z, len(z)

    def search(self, q: np.ndarray, k: int):
        return faiss.knn(q, self.z, k)


def millions(n: int) -> str:
    return f"{n / 1e6:g}M"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", "--reference-cells", type=int, default=1_000_000, dest="refs")
    p.add_argument("--index", choices=defaults.INDEX_KINDS, default=defaults.INDEX_KIND)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--exact-queries", type=int, default=2_000, help="queries also searched exactly")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latents", help="an .npz to keep the trained model's latents in (reused)")
    a = p.parse_args()
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    ref_z, ref_labels, query_z = cached_latents(a.epochs, a.latents)
    z, rows = jitter(ref_z, a.refs, rng)
    labels = pd.DataFrame({"cell_type": ref_labels[rows]})
    q, _ = jitter(query_z, a.queries, rng)
    print(
        f"reference {len(z):,} x {z.shape[1]} (from {len(ref_z):,} real cells), {len(q):,} queries"
    )

    t0 = time.perf_counter()
    ix = build_index(z, labels, kind=a.index)
    build_s = time.perf_counter() - t0
    memory_gib = ix.meta["memory_bytes"] / 2**30
    print(f"{ix.meta['kind']} build (train + add + tuning): {build_s:.1f} s; nlist "
          f"{ix.meta.get('nlist')}, nprobe {ix.meta.get('nprobe')}, k_factor "
          f"{ix.meta.get('k_factor')}, recall@15 on reference cells {ix.meta['recall_at_15']}, "
          f"{memory_gib:.2f} GiB")  # fmt: skip

    t0 = time.perf_counter()
    ix_labels = transfer_all(ix, q)["cell_type"]["predicted"].to_numpy()
    ix_s = time.perf_counter() - t0

    exact = LabelIndex(ExactSearch(z), labels, {**ix.meta, "kind": "flat"})
    sub = q[: a.exact_queries]
    t0 = time.perf_counter()
    exact_labels = transfer_all(exact, sub)["cell_type"]["predicted"].to_numpy()
    exact_s = time.perf_counter() - t0
    _, found = ix.search(sub, 15)
    _, truth = exact.search(sub, 15)
    recall = np.mean([len(set(x) & set(y)) / 15 for x, y in zip(found, truth)])
    agree = float((ix_labels[: a.exact_queries] == exact_labels).mean())
    qps = len(q) / ix_s
    print(f"{'search':8s} {'queries/s':>10s}")
    print(f"{ix.meta['kind']:8s} {qps:10,.0f}")
    print(f"{'exact':8s} {len(sub) / exact_s:10,.0f}")
    print(f"query recall@15 vs exact: {recall:.3f}; labels equal to exact search: {agree:.3f}")
    print(f"annotate search speedup vs exact: {qps / (len(sub) / exact_s):.1f}")
    print(
        f"annotate {millions(a.refs)} refs: {qps:.0f} queries/s, recall@15 {recall:.3f}, "
        f"index memory {memory_gib:.2f} GiB, build {build_s:.1f} s"
    )
    return 0


def cached_latents(epochs: int, path: str | None):
    if path and Path(path).is_file():
        d = np.load(path)
        return d["ref_z"], d["ref_labels"], d["query_z"]
    ref_z, ref_labels, query_z = real_latents(epochs)
    if path:
        np.savez(path, ref_z=ref_z, ref_labels=ref_labels, query_z=query_z)
    return ref_z, ref_labels, query_z


if __name__ == "__main__":
    sys.exit(main())

"""Label transfer against a 1 M-cell reference: FAISS IVF (tuned nprobe) vs exact search.

The reference is real latent structure scaled up: a censusvi model (Census architecture) is
trained on the FACS-sorted PBMC reference of pbmc_zheng_sorted_donorA_mudan.h5ad, its 2,140
cells are embedded, and the latents are resampled with small Gaussian jitter (5 % of each
dimension's spread) to ``--reference-cells``, labels carried. Queries are the donor-A cells'
latents, jittered the same way. Reports index build time (k-means training, adding, nprobe
tuning), recall@15 against exact search, queries per second for search + weighted-kNN transfer,
and how often the IVF labels equal the exact-search labels.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-cells", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--exact-queries", type=int, default=2_000, help="queries also searched exactly")
    p.add_argument("--epochs", type=int, default=20)
    a = p.parse_args()
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    ref_z, ref_labels, query_z = real_latents(a.epochs)
    z, rows = jitter(ref_z, a.reference_cells, rng)
    labels = pd.DataFrame({"cell_type": ref_labels[rows]})
    q, _ = jitter(query_z, a.queries, rng)
    print(
        f"reference {len(z):,} x {z.shape[1]} (from {len(ref_z):,} real cells), {len(q):,} queries"
    )

    t0 = time.perf_counter()
    ivf = build_index(z, labels)
    build_s = time.perf_counter() - t0
    print(f"IVF build (train + add + nprobe tuning): {build_s:.1f} s; {ivf.meta['kind']}, "
          f"nprobe {ivf.meta['nprobe']}, recall@15 on reference cells {ivf.meta['recall_at_15']}")  # fmt: skip

    t0 = time.perf_counter()
    ivf_labels = transfer_all(ivf, q)["cell_type"]["predicted"].to_numpy()
    ivf_s = time.perf_counter() - t0

    flat = faiss.IndexFlatL2(z.shape[1])
    flat.add(z)
    exact = LabelIndex(flat, labels, {**ivf.meta, "kind": "flat"})
    sub = q[: a.exact_queries]
    t0 = time.perf_counter()
    exact_labels = transfer_all(exact, sub)["cell_type"]["predicted"].to_numpy()
    exact_s = time.perf_counter() - t0
    _, found = ivf.search(sub, 15)
    _, truth = exact.search(sub, 15)
    recall = np.mean([len(set(x) & set(y)) / 15 for x, y in zip(found, truth)])
    agree = float((ivf_labels[: a.exact_queries] == exact_labels).mean())
    print(f"{'search':8s} {'queries/s':>10s}")
    print(f"{'IVF':8s} {len(q) / ivf_s:10,.0f}")
    print(f"{'exact':8s} {len(sub) / exact_s:10,.0f}")
    print(f"query recall@15 vs exact: {recall:.3f}; labels equal to exact search: {agree:.3f}")
    print(f"annotate search speedup vs exact: {(len(q) / ivf_s) / (len(sub) / exact_s):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

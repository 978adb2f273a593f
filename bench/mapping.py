"""Query mapping + annotation: censusvi vs scvi-tools' scArches path, same model, same split, one run.

Reference: two 10x chemistries of pbmc_3chem_symphony_small.h5ad; query: the third, resampled to
10,000 cells. One scvi-tools SCVI (NB, 2 x 128, 30 latent) is trained on the reference and used by
both: scvi-tools maps with ``SCVI.load_query_data`` + ``train`` (weight decay 0, as scArches'
tutorial; ``--scvi-epochs`` of its up-to-400 default), censusvi imports the same directory and
maps without training (the encoder ignores the batch). Both transfer labels with the same
weighted kNN (k = 15) from the reference cells' latent; macro-F1 and accuracy on the query's
labels. Last line (a contract): ``mapping speedup vs scvi-tools: X.XX``.

Before that, the chemistry rotations (``--rotations``; each chemistry the query in turn, its own
cells, over ``--seeds``): censusvi as users run it (its own pretrained reference, ``annotate``
with class-balanced kNN) beside scvi-tools' ``load_query_data`` + weighted kNN and PCA + weighted
kNN with no integration, on the same split. Both VAEs train the reference for scvi-tools' epoch
heuristic (400 at this size); censusvi with its default training schedule (``--schedule auto``,
which picks scvi-tools' at this size: 400 epochs, lr 1e-3, batch 128, KL warm-up 400) unless
``--rotation-epochs`` / ``--kl-warmup`` set those (the session 3 rows: ``--kl-warmup 20``, the
Census warm-up).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from censusvi.annotate.index import save_index  # noqa: E402
from censusvi.annotate.pipeline import annotate, index_reference  # noqa: E402
from censusvi.annotate.transfer import transfer_labels  # noqa: E402
from censusvi.model.io import load_model  # noqa: E402


def scores(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return float((truth == pred).mean()), float(
        f1_score(truth, pred, average="macro", zero_division=0)
    )


def pbmc(path: Path) -> ad.AnnData:
    full = ad.read_h5ad(path)
    full.var_names = [
        g if isinstance(g, str) else n for g, n in zip(full.var["gene_ids"], full.var_names)
    ]
    return full


def rotation(
    full: ad.AnnData,
    query_batch: str,
    seed: int,
    epochs: int | None,
    kl_warmup: int | None,
    tmp: Path,
    scvi_tools: bool,
    prior_components: int = 0,
) -> dict:
    """Accuracy and macro-F1 of censusvi, scvi-tools + kNN and PCA + kNN for one query chemistry."""
    import scvi

    from censusvi.annotate.index import load_index
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

    ref = full[full.obs["batch"] != query_batch].copy()
    query = full[full.obs["batch"] == query_batch].copy()
    ref_labels = ref.obs["cell_type"].astype(str).to_numpy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    ref.write_h5ad(tmp / "ref.h5ad")
    out = {}

    cfg = PretrainConfig(
        DataConfig(source=str(tmp / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        model=ModelSettings(prior_components=prior_components),
        train=TrainConfig(max_epochs=epochs, seed=seed, n_epochs_kl_warmup=kl_warmup),
    )
    model, _ = pretrain(cfg, tmp / f"censusvi_{seed}", quiet=True, resume=False)
    save_index(index_reference(model, tmp / "ref.h5ad", ["cell_type"]), tmp / "ix")
    annotated, _ = annotate(model, load_index(tmp / "ix"), query, "batch")
    out["censusvi"] = scores(truth, annotated.obs["predicted_cell_type"].astype(str).to_numpy())

    out["PCA + kNN"] = knn_scores(*reference_pca(ref, query, seed), ref_labels, truth)
    if not scvi_tools:
        return out
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    sm = scvi.model.SCVI(ref, n_hidden=128, n_latent=30, n_layers=2, gene_likelihood="nb")
    sm.train(max_epochs=epochs, batch_size=128, accelerator="cpu", enable_progress_bar=False)
    sm.save(tmp / "scvi_ref", overwrite=True)
    q = query.copy()
    scvi.model.SCVI.prepare_query_anndata(q, str(tmp / "scvi_ref"))
    qm = scvi.model.SCVI.load_query_data(q, str(tmp / "scvi_ref"))
    qm.train(
        max_epochs=50,
        plan_kwargs={"weight_decay": 0.0},
        accelerator="cpu",
        enable_progress_bar=False,
    )
    out["scvi-tools + kNN"] = knn_scores(
        sm.get_latent_representation(ref), qm.get_latent_representation(q), ref_labels, truth
    )
    return out


def reference_pca(ref: ad.AnnData, query: ad.AnnData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """50 principal components of the reference's log-normalised counts, the query projected
    onto them: a reference built once, queries placed without refitting (no integration)."""
    from sklearn.decomposition import PCA

    def lognorm(a: ad.AnnData) -> np.ndarray:
        x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
        return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)

    pca = PCA(50, random_state=seed).fit(lognorm(ref))
    return pca.transform(lognorm(ref)), pca.transform(lognorm(query))


def knn_scores(
    z_ref: np.ndarray, z_query: np.ndarray, ref_labels: np.ndarray, truth: np.ndarray
) -> tuple[float, float]:
    """scArches' weighted kNN (k = 15), as users of scvi-tools or of a PCA run it."""
    dist, idx = NearestNeighbors(n_neighbors=15).fit(z_ref).kneighbors(z_query)
    return scores(truth, transfer_labels(dist, ref_labels[idx])["predicted"].to_numpy())


def run_rotations(
    data: Path,
    batches: list[str],
    seeds: list[int],
    epochs: int | None,
    kl_warmup: int | None,
    scvi_seeds: set[int],
    prior_components: int = 0,
) -> None:
    full = pbmc(data)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for qb in batches:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                runs = rotation(
                    full,
                    qb,
                    seed,
                    epochs,
                    kl_warmup,
                    Path(tmp),
                    seed in scvi_seeds,
                    prior_components,
                )
                for method, sc in runs.items():
                    results.setdefault((qb, method), []).append(sc)
                    print(
                        f"  {qb} seed {seed} {method:18s} acc {sc[0]:.3f} F1 {sc[1]:.3f}",
                        flush=True,
                    )
    print(
        f"{'query':6s} {'method':18s} {'accuracy':>15s} {'macro-F1':>15s}   (mean ± sd over seeds)"
    )
    for (qb, method), runs in results.items():
        acc, f1 = np.array(runs).T
        print(
            f"{qb:6s} {method:18s} {acc.mean():9.3f} ± {acc.std():.3f} {f1.mean():9.3f} ± {f1.std():.3f}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "pbmc_3chem_symphony_small.h5ad",
    )
    p.add_argument("--query-batch", default="3pv1")
    p.add_argument("--query-cells", type=int, default=10_000)
    p.add_argument("--ref-epochs", type=int, default=200)
    p.add_argument("--scvi-epochs", type=int, default=50)
    p.add_argument("--rotations", default="3pv1,3pv2,5p", help="query chemistries; '' skips")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scvi-seeds", default="0,1,2", help="seeds that also run scvi-tools")
    p.add_argument(
        "--rotation-epochs", type=int, help="reference epochs (default: censusvi's schedule's)"
    )
    p.add_argument(
        "--kl-warmup", type=int, help="censusvi's KL warm-up epochs (default: its schedule's)"
    )
    p.add_argument(
        "--prior-components",
        type=int,
        default=0,
        help="rotation references: 0 N(0, I) (Census), K a VampPrior over K pseudo-cells",
    )
    p.add_argument("--skip-speed", action="store_true", help="rotations only (no timed mapping)")
    a = p.parse_args()
    import scvi
    import torch

    torch.set_num_threads(2)
    if a.rotations:
        seeds = [int(s) for s in a.seeds.split(",")]
        scvi_seeds = {int(s) for s in a.scvi_seeds.split(",") if s}
        run_rotations(
            a.data,
            a.rotations.split(","),
            seeds,
            a.rotation_epochs,
            a.kl_warmup,
            scvi_seeds,
            a.prior_components,
        )
    if a.skip_speed:
        return 0
    scvi.settings.seed = 0
    full = pbmc(a.data)
    ref = full[full.obs["batch"] != a.query_batch].copy()
    q_pool = full[full.obs["batch"] == a.query_batch]
    pick = np.random.default_rng(0).integers(0, q_pool.n_obs, a.query_cells)
    query = q_pool[pick].copy()
    query.obs_names = [f"q{i}" for i in range(query.n_obs)]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
        model = scvi.model.SCVI(ref, n_hidden=128, n_latent=30, n_layers=2, gene_likelihood="nb")
        model.train(
            max_epochs=a.ref_epochs, batch_size=128, accelerator="cpu", enable_progress_bar=False
        )
        model.save(tmp / "ref_model", overwrite=True)
        z_ref = model.get_latent_representation(ref)
        ref_labels = ref.obs["cell_type"].astype(str).to_numpy()
        print(
            f"reference: {ref.n_obs} cells ({', '.join(sorted(set(ref.obs['batch'])))}); "
            f"query: {query.n_obs} cells of {a.query_batch}; {ref.n_vars} genes",
            flush=True,
        )

        t0 = time.perf_counter()
        q = query.copy()
        scvi.model.SCVI.prepare_query_anndata(q, str(tmp / "ref_model"))
        qm = scvi.model.SCVI.load_query_data(q, str(tmp / "ref_model"))
        qm.train(
            max_epochs=a.scvi_epochs,
            plan_kwargs={"weight_decay": 0.0},
            accelerator="cpu",
            enable_progress_bar=False,
        )
        z_q = qm.get_latent_representation(q)
        dist, idx = NearestNeighbors(n_neighbors=15).fit(z_ref).kneighbors(z_q)
        scvi_pred = transfer_labels(dist, ref_labels[idx])["predicted"].to_numpy()
        scvi_s = time.perf_counter() - t0

        ref.write_h5ad(tmp / "ref.h5ad")
        ours = load_model(
            tmp / "ref_model"
        )  # the same scvi-tools directory, read without scvi-tools
        save_index(index_reference(ours, tmp / "ref.h5ad", ["cell_type"]), tmp / "ix")
        from censusvi.annotate.index import load_index

        ix = load_index(tmp / "ix")
        t0 = time.perf_counter()
        out, _ = annotate(ours, ix, query, "batch")
        ours_s = time.perf_counter() - t0
        ours_pred = out.obs["predicted_cell_type"].astype(str).to_numpy()

    rows = [
        ("scvi-tools " + scvi.__version__, scvi_s, *scores(truth, scvi_pred)),
        ("censusvi", ours_s, *scores(truth, ours_pred)),
    ]
    print(
        f"{'framework':22s} {'map+annotate s':>15s} {'cells/s':>10s} {'accuracy':>9s} {'macro-F1':>9s}"
    )
    for name, s, acc, f1 in rows:
        print(f"{name:22s} {s:15.2f} {query.n_obs / s:10,.0f} {acc:9.3f} {f1:9.3f}")
    print(
        f"(scvi-tools trained the query {a.scvi_epochs} epochs; its default for this size is up to 400)"
    )
    print(f"mapping speedup vs scvi-tools: {scvi_s / ours_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming a SOMA experiment into 1,024-cell training batches: censusvi vs tiledbsoma-ml.

Synthesises a Census-like experiment under a temporary folder (default 2,000,000 cells): the
real PBMC cells of ``pbmc_zheng_sorted_donorA_mudan.h5ad`` resampled into ``--datasets``
datasets stored one after another, as the Census stores them, with Census obs columns
(dataset_id, assay, suspension_type, donor_id, ...). Then each loader runs in its own process
(so peak RSS is its own) over the whole experiment:

- ``censusvi``: the Ray Data stream the Ray Train workers consume (``CellStream`` with
  ``STREAM_DEFAULTS``, ``--stream`` overrides them: IO groups of random 256-cell chunks read by
  Ray Data tasks, the consumer's pool of blocks, CSR minibatches); memory is the process tree's PSS
  (driver, Ray's processes and its object store);
- ``censusvi-inprocess``: the same block shuffle read in the training process (``Cells``);
- ``tiledbsoma-ml``: ``ExperimentDataset`` + ``experiment_dataloader`` (shuffle chunks of 64,
  IO batches of 65,536, sparse X), its documented fast path;
- ``contiguous``: plain 65,536-row block reads, the speed ceiling that mixes nothing.

Each reports cells/s after a warm-up (``--warmup-cells``), peak memory, and mixing: the mean number of distinct datasets
per minibatch against a global shuffle's. RSS is also taken on the first quarter of the corpus
(an obs filter) to show whether it grows with the corpus. Last line (a contract):
``ingest speedup vs tiledbsoma-ml: X.XX``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
DATA = ROOT.parent / "shared" / "data" / "pbmc_zheng_sorted_donorA_mudan.h5ad"
BATCH = 1024
ASSAYS = ["10x 3' v2", "10x 3' v3", "10x 5' v1", "Smart-seq2"]


def synthesise(
    out: Path, n_cells: int, n_datasets: int, seed: int = 0, row_tile: int = 2048
) -> None:
    """Resampled real cells, dataset after dataset, written in storage order."""
    import anndata as ad
    import pyarrow as pa
    import tiledbsoma

    from censusvi.data.h5ad import gene_ids_and_symbols

    base = ad.read_h5ad(DATA)
    x = base.X.tocsr()
    ids, symbols = gene_ids_and_symbols(base.var)
    n_genes = x.shape[1]
    exp = tiledbsoma.Experiment.create(str(out))
    obs_schema = pa.schema(
        [
            ("soma_joinid", pa.int64()),
            ("dataset_id", pa.large_string()),
            ("assay", pa.large_string()),
            ("suspension_type", pa.large_string()),
            ("donor_id", pa.large_string()),
            ("cell_type", pa.large_string()),
            ("is_primary_data", pa.bool_()),
            ("nnz", pa.int64()),
            ("raw_sum", pa.float64()),
        ]
    )
    obs = exp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, n_cells - 1)])
    ms = exp.add_new_collection("ms")
    rna = ms.add_new_collection("RNA", tiledbsoma.Measurement)
    var_schema = pa.schema(
        [
            ("soma_joinid", pa.int64()),
            ("feature_id", pa.large_string()),
            ("feature_name", pa.large_string()),
        ]
    )
    var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, n_genes - 1)])
    var.write(
        pa.table(
            {"soma_joinid": np.arange(n_genes), "feature_id": ids, "feature_name": symbols},
            schema=var_schema,
        )
    )
    # One column tile spanning every gene: the global order is then plain row-major, so rows
    # written in order need no sort (sort_coords=False), and a row's genes are one read.
    layout = tiledbsoma.TileDBCreateOptions(
        dims={"soma_dim_0": {"tile": row_tile}, "soma_dim_1": {"tile": n_genes}}
    )
    X = rna.add_new_collection("X").add_new_sparse_ndarray(
        "raw", type=pa.float32(), shape=(n_cells, n_genes), platform_config=layout
    )
    fast = tiledbsoma.TileDBWriteOptions(sort_coords=False)
    rng = np.random.default_rng(seed)
    labels = base.obs["cell_type"].astype(str).to_numpy()
    per = -(-n_cells // n_datasets)
    start = 0
    for d in range(n_datasets):
        stop = min(start + per, n_cells)
        for s in range(start, stop, 25_000):
            e = min(s + 25_000, stop)
            pick = rng.integers(0, x.shape[0], e - s)
            xs = x[pick]
            nnz = np.diff(xs.indptr)
            obs.write(
                pa.table(
                    {
                        "soma_joinid": np.arange(s, e),
                        "dataset_id": [f"dataset_{d:03d}"] * (e - s),
                        "assay": [ASSAYS[d % len(ASSAYS)]] * (e - s),
                        "suspension_type": ["cell" if d % 3 else "nucleus"] * (e - s),
                        "donor_id": [f"donor_{d}_{i % 4}" for i in range(e - s)],
                        "cell_type": labels[pick],
                        "is_primary_data": np.ones(e - s, dtype=bool),
                        "nnz": nnz.astype(np.int64),
                        "raw_sum": np.asarray(xs.sum(1)).ravel().astype(np.float64),
                    },
                    schema=obs_schema,
                )
            )
            rows = np.repeat(np.arange(s, e, dtype=np.int64), nnz)
            X.write(
                pa.table(
                    {
                        "soma_dim_0": rows,
                        "soma_dim_1": xs.indices.astype(np.int64),
                        "soma_data": xs.data.astype(np.float32),
                    }
                ),
                platform_config=fast,
            )
        start = stop
        print(f"  wrote dataset {d + 1}/{n_datasets} ({stop:,} cells)", flush=True)
    exp.close()


def tree_rss(root: int) -> int:
    """Proportional set size (PSS) of ``root`` and all its descendants (from /proc; Linux):
    shared pages, such as Ray's object store mapped into several processes, count once."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(frontier)
    total = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            pass
    return total


class PeakRSS:
    """Peak memory of this process and, with ``tree``, of all its descendants: the process tree's
    PSS sampled every second (reading smaps walks page tables: sampling more often slowed the
    loaders measurably); for a single process, the kernel's exact peak RSS (no sampling)."""

    def __init__(self, tree: bool) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if tree else None
        if self._thread:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.peak = max(self.peak, tree_rss(os.getpid()))

    def stop(self) -> int:
        if self._thread is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._stop.set()
        self._thread.join()
        return self.peak


def _mean_distinct(codes: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(c)) for c in codes]))


def run_loader(
    name: str, exp: str, obs_filter: str, max_cells: int, stream: dict, warmup: int
) -> dict:
    """Stream ``warmup`` cells, then ``max_cells`` more: cells/s counts from the end of the
    warm-up (which takes in each loader's setup: starting its reads, Ray's worker processes) to
    the last minibatch; mixing and memory cover the whole run."""
    rss = PeakRSS(tree=name == "censusvi")  # the only loader with other processes
    minibatches = _loader(name, exp, obs_filter, stream)
    baseline = tree_rss(os.getpid())  # set up (obs read; for Ray: the idle local cluster)
    codes: list[np.ndarray] = []
    n, t0 = -warmup, None
    for dataset_codes in minibatches:
        codes.append(dataset_codes)
        n += len(dataset_codes)
        if t0 is None and n >= 0:
            n, t0 = 0, time.perf_counter()
        if n >= max_cells:
            break
    seconds = time.perf_counter() - t0
    shuffled = np.random.default_rng(0).permutation(np.concatenate(codes))
    reference = _mean_distinct(np.array_split(shuffled, len(codes)))
    return {
        "loader": name,
        "cells": n,
        "cells_per_s": n / seconds,
        "peak_rss_gib": rss.stop() / 2**30,
        "setup_rss_gib": baseline / 2**30,
        "distinct_datasets": _mean_distinct(codes),
        "distinct_global_shuffle": reference,
    }


def _loader(name: str, exp: str, obs_filter: str, stream: dict):
    """Each loader, set up, as an iterator of its minibatches' dataset codes (not yet started).
    ``stream`` overrides our loaders' settings (``STREAM_DEFAULTS``' keys)."""
    if name == "tiledbsoma-ml":
        import tiledbsoma
        from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

        e = tiledbsoma.Experiment.open(exp)
        query = e.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter))
        ds = ExperimentDataset(
            query,
            layer_name="raw",
            obs_column_names=["dataset_id"],
            batch_size=BATCH,
            io_batch_size=65536,
            shuffle_chunk_size=64,
            shuffle=True,
            seed=0,
            return_sparse_X=True,
        )
        return (obs["dataset_id"].to_numpy() for _, obs in experiment_dataloader(ds))
    from censusvi.train.pretrain import DataConfig, PretrainConfig, plan_from
    from censusvi.train.ray_trainer import STREAM_DEFAULTS

    opts = {**STREAM_DEFAULTS, **stream}

    from censusvi.train.loop import TrainConfig

    cfg = PretrainConfig(
        DataConfig(source=exp, obs_filter=obs_filter, batch_keys=("dataset_id",), n_hvg=0),
        train=TrainConfig(train_fraction=1.0),  # every cell streams
    )
    plan = plan_from(cfg)
    cells = plan.cells(np.arange(len(plan.source.obs)))
    cells.preload = False
    dataset = cells.covariates_nc[:, 0]
    if name == "censusvi":
        import ray

        from censusvi.data.ray_stream import CellStream, stream_rows

        ray.init(
            num_cpus=2,
            object_store_memory=1 << 30,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "platform")}},
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        _, shipped = plan.for_workers()
        ds = CellStream(
            ray.put(shipped),
            len(shipped.train_rows),
            plan.alignment(),
            chunk=opts["shuffle_chunk"],
            io_batch_cells=opts["io_batch_cells"],
            read_cpus=opts["read_cpus"],
            concurrency=opts["read_tasks"],
        ).epoch(0)
        # the CSR minibatches a training step takes (stream_minibatches adds only the tensors)
        rows = stream_rows(ds, BATCH, len(plan.genes), 0, opts["shuffle_buffer_cells"])
        return (dataset[pos] for _, _, pos in rows)
    shuffle = name == "censusvi-inprocess"  # Cells' own settings: 65,536-cell IO groups
    cells.shuffle_chunk = opts["shuffle_chunk"]
    return (dataset[pos] for pos, _, _ in cells.minibatches(BATCH, shuffle=shuffle, seed=0))


def _layout(exp: str) -> tuple[np.ndarray, int]:
    """(each cell's first entry's place in X's storage order, X's data-tile capacity): with one
    column tile spanning every gene, X is stored row after row, ``capacity`` entries a tile
    (fragment boundaries ignored), so these say which tiles a read of some rows decodes."""
    import tiledbsoma

    e = tiledbsoma.Experiment.open(exp)
    nnz = e.obs.read(column_names=["soma_joinid", "nnz"]).concat().to_pandas()
    nnz = nnz.sort_values("soma_joinid")["nnz"].to_numpy()
    capacity = int(e.ms["RNA"].X["raw"].schema_config_options().capacity)
    return np.concatenate([[0], np.cumsum(nnz)]), capacity


def tiles_decoded(joinids: np.ndarray, prefix: np.ndarray, capacity: int) -> int:
    """Distinct data tiles holding the entries of cells ``joinids`` (one read)."""
    first = prefix[joinids] // capacity
    last = np.maximum(prefix[joinids + 1] - 1, prefix[joinids]) // capacity
    spans = [np.arange(a, b + 1) for a, b in zip(first, last)]
    return len(np.unique(np.concatenate(spans))) if spans else 0


def shard_groups(scheme: str, n: int, world: int, rank: int, chunk: int, io: int) -> list:
    """Rank ``rank``'s first epoch as read groups of sorted positions: ``chunks`` (censusvi:
    a contiguous run of a global permutation of whole chunks) or ``strided`` (the shards before:
    ``rows[rank::world]``, then random ``chunk``-position runs of them)."""
    from censusvi.data import shards

    seed = 0
    if scheme == "chunks":
        c = shards.chunk_size(n, world, chunk)
        chunks, cells = shards.epoch_chunks(n, c, world, rank, seed)
        groups = shards.io_groups(chunks, cells, c, max(1, io // c), n)
        return [np.sort(shards.chunk_positions(g["chunks"], c, n)[: g["take"]]) for g in groups]
    rows = shards.strided_positions(n, world, rank)
    starts = np.random.default_rng(seed).permutation(np.arange(0, len(rows), chunk))
    runs = [rows[a : a + chunk] for a in starts]
    per = max(1, io // chunk)
    return [np.sort(np.concatenate(runs[i : i + per])) for i in range(0, len(runs), per)]


def run_shards(scheme: str, world: int, exp: str, obs_filter: str, max_cells: int) -> dict:
    """Rank 0 of ``world`` reading its shard in this process: cells/s (after one warm-up
    group), data tiles decoded per cell, datasets per 1,024 cells."""
    prefix, capacity = _layout(exp)
    if scheme == "tiledbsoma-ml":
        return _tiledbsoma_ml_rank(world, exp, obs_filter, max_cells, prefix, capacity)
    from censusvi.data.soma import SomaSource

    src = SomaSource(exp, obs_filter=obs_filter, obs_columns=("dataset_id",))
    dataset = src.obs["dataset_id"].cat.codes.to_numpy()
    groups = shard_groups(scheme, len(src.obs), world, 0, 256, 8192)
    src.read_rows(groups[0])  # warm-up: opens the array, first tiles
    cells, tiles, t0, mixed = 0, 0, time.perf_counter(), []
    for g in groups[1:]:
        src.read_rows(g)
        cells += len(g)
        tiles += tiles_decoded(src.joinids(g), prefix, capacity)
        mixed.append(len(np.unique(dataset[np.random.default_rng(cells).choice(g, BATCH)])))
        if cells >= max_cells:
            break
    seconds = time.perf_counter() - t0
    return {"cells": cells, "cells_per_s": cells / seconds, "tiles_per_cell": tiles / cells,
            "datasets_per_group_sample": float(np.mean(mixed))}  # fmt: skip


def _tiledbsoma_ml_rank(world, exp, obs_filter, max_cells, prefix, capacity) -> dict:
    """tiledbsoma-ml's own DDP partitioning (RANK / WORLD_SIZE), rank 0, 256-cell chunks, IO
    batches of 65,536: the tiles its IO batches decode (each batch's cells, read sorted)."""
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    os.environ.update(RANK="0", WORLD_SIZE=str(world))
    e = tiledbsoma.Experiment.open(exp)
    query = e.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter))
    io = 65536
    ds = ExperimentDataset(
        query, layer_name="raw", obs_column_names=["soma_joinid", "dataset_id"],
        batch_size=BATCH, io_batch_size=io, shuffle_chunk_size=256, shuffle=True, seed=0,
        return_sparse_X=True,
    )  # fmt: skip
    joinids, t0, cells, mixed = [], None, 0, []
    for _, obs in experiment_dataloader(ds):
        if t0 is None:  # the first minibatch (its IO batch read) is the warm-up
            t0 = time.perf_counter()
            continue
        joinids.append(obs["soma_joinid"].to_numpy())
        mixed.append(obs["dataset_id"].nunique())
        cells += len(obs)
        if cells >= max_cells:
            break
    seconds = time.perf_counter() - t0
    ids = np.concatenate(joinids)
    tiles = sum(tiles_decoded(np.sort(ids[a : a + io]), prefix, capacity)
                for a in range(0, len(ids), io))  # fmt: skip
    return {"cells": cells, "cells_per_s": cells / seconds, "tiles_per_cell": tiles / cells,
            "datasets_per_group_sample": float(np.mean(mixed))}  # fmt: skip


def compare_shards(exp: str, obs_filter: str, worlds: list[int], max_cells: int) -> None:
    """Each sharding at each world size, each in its own process."""
    for world in worlds:
        for scheme in ("chunks", "strided", "tiledbsoma-ml"):
            cmd = [sys.executable, __file__, "--measure-cells", str(max_cells)]
            out = subprocess.run(
                [*cmd, "--shard-child", scheme, str(world), exp, obs_filter],
                capture_output=True, text=True, env=os.environ,
            )  # fmt: skip
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
            if out.returncode or not line.startswith("{"):
                print(f"shards {scheme} x{world}: failed\n{out.stderr[-1500:]}", flush=True)
                continue
            r = json.loads(line)
            print(
                f"shards {scheme:14s} {world} ranks: rank 0 {r['cells_per_s']:9,.0f} cells/s, "
                f"{r['tiles_per_cell']:.4f} tiles decoded/cell, "
                f"{r['datasets_per_group_sample']:.1f} datasets per 1,024 cells",
                flush=True,
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--datasets", type=int, default=40)
    p.add_argument(
        "--measure-cells",
        type=int,
        default=6 * 65_536,
        help="cells timed per loader (a multiple of tiledbsoma-ml's IO batch: each read inside)",
    )
    p.add_argument(
        "--warmup-cells", type=int, default=65_536, help="cells streamed before the clock starts"
    )
    p.add_argument("--loaders", default="censusvi,censusvi-inprocess,tiledbsoma-ml,contiguous")
    p.add_argument("--experiment", help="reuse an experiment written by an earlier run")
    p.add_argument(
        "--row-tile",
        type=int,
        default=2048,
        help="X tile rows of the synthesised experiment (tiledbsoma-ml recommends 16)",
    )
    p.add_argument(
        "--stream",
        default="",
        help="our loaders' settings, e.g. shuffle_chunk=128,io_batch_cells=32768 (ints)",
    )
    p.add_argument(
        "--ranks",
        default="",
        help="also compare shardings (chunks, strided, tiledbsoma-ml) at these world sizes, e.g. 2,4",
    )
    p.add_argument("--child", nargs=3, metavar=("LOADER", "EXP", "FILTER"), help=argparse.SUPPRESS)
    p.add_argument("--shard-child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    stream = {k: int(v) for k, v in (kv.split("=") for kv in a.stream.split(",") if kv)}
    if a.shard_child:
        scheme, world, exp, flt = a.shard_child
        print(json.dumps(run_shards(scheme, int(world), exp, flt, a.measure_cells)))
        return 0
    if a.child:
        print(json.dumps(run_loader(*a.child, a.measure_cells, stream, a.warmup_cells)))
        return 0
    with tempfile.TemporaryDirectory(prefix="censusvi-ingest-") as tmp:
        exp = a.experiment or str(Path(tmp) / "corpus.soma")
        if not a.experiment:
            t0 = time.perf_counter()
            synthesise(Path(exp), a.cells, a.datasets, row_tile=a.row_tile)
            print(f"synthesised {a.cells:,} cells in {time.perf_counter() - t0:.0f} s", flush=True)
        full = "is_primary_data == True"
        quarter = f"is_primary_data == True and soma_joinid < {a.cells // 4}"
        if a.ranks:
            compare_shards(exp, full, [int(w) for w in a.ranks.split(",")], a.measure_cells)
        results = {}
        for name in [n for n in a.loaders.split(",") if n]:
            for label, flt in (("full", full), ("quarter", quarter)):
                if label == "quarter" and name != "censusvi":
                    continue
                cmd = [sys.executable, __file__, "--measure-cells", str(a.measure_cells)]
                cmd += ["--stream", a.stream, "--warmup-cells", str(a.warmup_cells)]
                out = subprocess.run(
                    [*cmd, "--child", name, exp, flt],
                    capture_output=True,
                    text=True,
                    env=os.environ,
                )
                line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
                if out.returncode or not line.startswith("{"):
                    print(f"{name}: failed\n{out.stderr[-2000:]}", flush=True)
                    continue
                results[(name, label)] = r = json.loads(line)
                print(
                    f"{name:20s} {label:8s} {r['cells_per_s']:10,.0f} cells/s  "
                    f"RSS {r['peak_rss_gib']:5.2f} GiB (set up {r['setup_rss_gib']:4.2f})  "
                    f"datasets/minibatch "
                    f"{r['distinct_datasets']:5.1f} (global shuffle {r['distinct_global_shuffle']:.1f})",
                    flush=True,
                )
    ours, theirs = results.get(("censusvi", "full")), results.get(("tiledbsoma-ml", "full"))
    if ours and theirs:
        print(f"ingest speedup vs tiledbsoma-ml: {ours['cells_per_s'] / theirs['cells_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

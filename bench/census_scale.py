"""Memory of a Census-scale run's processes against the corpus size: driver, Train worker, HVG task.

Builds a SOMA experiment of ``--cells`` cells with Census-like obs (dataset_id, assay,
suspension_type, donor_id, cell_type, is_primary_data, nnz, raw_sum; about 7,400 batches at
74 M cells, scaled down in proportion; ~60 % of cells pass the Census filter
``is_primary_data == True and nnz >= 300``, as 44.3 M of 74 M do) and a sparse X with a few
entries per cell (so that disk and write time stay small: memory that grows with N comes from
per-cell bookkeeping, not from counts). Then, in a fresh process (the driver):

1. plans the run as ``pretrain_distributed`` does (``plan_from``: obs read once, only the
   needed columns; batch codes; chunk split; the two HVG passes as Ray tasks);
2. ships the plan through the object store (``RunPlan.for_workers``) and runs 2 Ray Train
   workers that stream ``--steps`` minibatches each (``_plan_in_worker``, ``_rank_cells``,
   ``_worker_batches``: the production path) and train on them.

Peak RSS: the driver's own (getrusage); Train workers and HVG tasks sampled every 0.1 s from
/proc by process title (``ray::RayTrainWorker*``, ``ray::hvg_task``). Last line (a contract):
``census scale N cells: driver peak X GiB, worker peak Y GiB, hvg task peak Z GiB, plan S s``.
"""

from __future__ import annotations

import argparse
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
CENSUS_CELLS, CENSUS_BATCHES = 74_000_000, 7_400
DONORS_PER_DATASET = 8  # Census: ~7,400 batches over ~900 datasets
ASSAYS = ["10x 3' v2", "10x 3' v3", "10x 5' v1", "10x 5' v2", "Smart-seq2", "Drop-seq"]
GENES = 2_000
ENTRIES_PER_CELL = 8
WRITE_ROWS = 500_000


def n_batches(n_cells: int) -> int:
    return max(2, round(CENSUS_BATCHES * n_cells / CENSUS_CELLS))


def build(out: Path, n_cells: int, seed: int = 0) -> None:
    """The experiment: datasets stored one after another (as the Census), each a few donors."""
    import pyarrow as pa
    import tiledbsoma

    rng = np.random.default_rng(seed)
    n_datasets = max(1, -(-n_batches(n_cells) // DONORS_PER_DATASET))
    dataset = np.sort(rng.integers(0, n_datasets, n_cells))  # stored dataset after dataset
    s = pa.large_string()
    obs_schema = pa.schema(
        [("soma_joinid", pa.int64()), ("dataset_id", s), ("assay", s), ("suspension_type", s),
         ("donor_id", s), ("cell_type", s), ("is_primary_data", pa.bool_()),
         ("nnz", pa.int64()), ("raw_sum", pa.float64())]
    )  # fmt: skip
    exp = tiledbsoma.Experiment.create(str(out))
    obs = exp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, n_cells - 1)])
    rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
    var_schema = pa.schema([("soma_joinid", pa.int64()), ("feature_id", s), ("feature_name", s)])
    var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, GENES - 1)])
    var.write(
        pa.table(
            {"soma_joinid": np.arange(GENES), "feature_id": [f"ENSG{i:011d}" for i in range(GENES)],
             "feature_name": [f"G{i}" for i in range(GENES)]},
            schema=var_schema,
        )
    )  # fmt: skip
    layout = tiledbsoma.TileDBCreateOptions(
        dims={"soma_dim_0": {"tile": 2048}, "soma_dim_1": {"tile": GENES}}
    )
    X = rna.add_new_collection("X").add_new_sparse_ndarray(
        "raw", type=pa.float32(), shape=(n_cells, GENES), platform_config=layout
    )
    fast = tiledbsoma.TileDBWriteOptions(sort_coords=False)
    gene_p = rng.gamma(0.3, 1.0, GENES)
    gene_p /= gene_p.sum()
    for a in range(0, n_cells, WRITE_ROWS):
        b = min(a + WRITE_ROWS, n_cells)
        d, k = dataset[a:b], b - a
        donor = rng.integers(0, DONORS_PER_DATASET, k)
        obs.write(
            pa.table(
                {"soma_joinid": np.arange(a, b),
                 "dataset_id": np.char.add("dataset_", d.astype(str)).astype(object),
                 "assay": np.array(ASSAYS, dtype=object)[d % len(ASSAYS)],
                 "suspension_type": np.where(d % 3, "cell", "nucleus").astype(object),
                 "donor_id": np.char.add(np.char.add("donor_", d.astype(str)),
                                         np.char.add("_", donor.astype(str))).astype(object),
                 "cell_type": np.char.add("type_", rng.integers(0, 600, k).astype(str)).astype(object),
                 "is_primary_data": rng.random(k) < 0.8,
                 "nnz": rng.integers(0, 4000, k),  # >= 300: ~92 %; with primary ~74 % of cells
                 "raw_sum": rng.gamma(2.0, 2000.0, k)},
                schema=obs_schema,
            )
        )  # fmt: skip
        rows = np.repeat(np.arange(a, b, dtype=np.int64), ENTRIES_PER_CELL)
        cols = rng.choice(GENES, (k, ENTRIES_PER_CELL), p=gene_p)
        cols.sort(axis=1)
        # a gene drawn twice in a row: shift it to stay unique and sorted within the row
        cols = np.minimum(
            cols + np.arange(ENTRIES_PER_CELL),
            GENES - ENTRIES_PER_CELL + np.arange(ENTRIES_PER_CELL),
        )
        vals = (1 + rng.poisson(2.0 + (d % 7)[:, None], (k, ENTRIES_PER_CELL))).astype(np.float32)
        X.write(
            pa.table({"soma_dim_0": rows, "soma_dim_1": cols.ravel().astype(np.int64),
                      "soma_data": vals.ravel()}),
            platform_config=fast,
        )  # fmt: skip
    exp.close()


class ProcessPeaks:
    """Peak RSS per kind of Ray process (by its title in /proc/PID/cmdline), sampled, among
    this process's descendants only (other Ray clusters may run on the machine)."""

    KINDS = {"worker": "ray::RayTrainWorker", "hvg task": "ray::hvg_task"}

    def __init__(self, every: float = 0.1) -> None:
        self.peak = dict.fromkeys(self.KINDS, 0)
        self.private = dict.fromkeys(self.KINDS, 0)  # RssAnon: not counting shared pages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def _descendants() -> set[int]:
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        tree, frontier = {os.getpid()}, {os.getpid()}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier and p not in tree}
            tree |= frontier
        return tree

    def _run(self, every: float) -> None:
        mine, n = set(), 0
        while not self._stop.wait(every):
            if n % 10 == 0:  # new processes: look for them every second
                mine = self._descendants()
            n += 1
            for pid in mine:
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                    kind = next((k for k, t in self.KINDS.items() if title.startswith(t)), None)
                    if kind:
                        status = Path(f"/proc/{pid}/status").read_text().split("\n")
                        kib = {
                            ln.split(":")[0]: int(ln.split()[1])
                            for ln in status
                            if "RSS" in ln or "Rss" in ln
                        }
                        self.peak[kind] = max(self.peak[kind], kib["VmRSS"] * 1024)
                        self.private[kind] = max(self.private[kind], kib["RssAnon"] * 1024)
                except (OSError, ValueError, IndexError, UnicodeDecodeError):
                    pass

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def train_steps(config: dict) -> None:
    """A Ray Train worker: the production worker path (plan from the object store, the rank's
    cells, the Ray Data stream) for ``config["steps"]`` minibatches of training."""
    import itertools

    import ray.train
    import ray.train.torch

    from censusvi.train.loop import epoch_seeds, make_optimizer, train_epoch
    from censusvi.train.ray_worker import (
        STREAM_DEFAULTS,
        _plan_in_worker,
        _rank_cells,
        _worker_batches,
    )

    plan = _plan_in_worker(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = plan.cfg.train
    train_cells, val_cells = _rank_cells(plan, rank, world, config)
    vae = plan.new_vae(train_cells)
    opt = make_optimizer(vae, t)
    model = ray.train.torch.prepare_model(vae, move_to_device=False)
    opts = {**STREAM_DEFAULTS, **config["stream"]}
    batches, _ = _worker_batches(plan, t, train_cells, val_cells, opts, False)
    t0 = time.perf_counter()
    steps = itertools.islice(batches(epoch_seeds(t.seed, 0, rank).shuffle), config["steps"])
    loss, n = train_epoch(model, opt, steps, 1.0)
    seconds = time.perf_counter() - t0
    Path(config["out"], f"rank{rank}.txt").write_text(f"{n} {seconds} {loss}")
    ray.train.report({"cells": n})


def measure(exp: str, steps: int, object_store: int) -> dict:
    """The driver: plan, ship, train; returns the figures."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from censusvi.data.ray_hvg import ray_reducer
    from censusvi.data.shards import planned_source
    from censusvi.data.soma import CENSUS_FILTER
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, plan_from

    ray.init(
        num_cpus=2,
        object_store_memory=object_store,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "platform")}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    peaks = ProcessPeaks()
    cfg = PretrainConfig(
        DataConfig(source=exp, obs_filter=CENSUS_FILTER, n_hvg=500),
        ModelSettings(),
        TrainConfig(schedule="census", max_epochs=1, batch_size=1024),
    )
    t0 = time.perf_counter()
    plan = plan_from(
        cfg, hvg_reducer=lambda src: ray_reducer(planned_source(src, CENSUS_FILTER, None))
    )
    decided, cells = plan.for_workers()
    config = {"plan": decided, "cells": ray.put(cells), "steps": steps}
    config["stream"] = {"mode": "ray_data"}
    plan_s = time.perf_counter() - t0
    print(
        f"planned {plan.n_cells:,} cells ({len(plan.categories):,} batches) in {plan_s:.1f} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config["out"] = tmp
        trainer = TorchTrainer(
            train_steps,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(storage_path=tmp),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        for rank in range(2):
            n, seconds, loss = Path(tmp, f"rank{rank}.txt").read_text().split()
            print(
                f"worker {rank}: {int(n):,} cells in {float(seconds):.1f} s "
                f"({int(n) / float(seconds):,.0f} cells/s), loss {float(loss):.1f}",
                flush=True,
            )
    proc = peaks.stop()
    ray.shutdown()
    private = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in peaks.private.items())
    print(f"private (anonymous) RSS peaks, shared object-store pages left out: {private}")
    return {
        "driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker": proc["worker"],
        "hvg": proc["hvg task"],
        "plan_s": plan_s,
        "n_filtered": plan.n_cells,
        "batches": len(plan.categories),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--steps", type=int, default=300, help="minibatches of 1,024 per worker")
    p.add_argument("--experiment", help="reuse an experiment of --cells cells built earlier")
    p.add_argument("--keep", help="build the experiment here and keep it")
    p.add_argument("--object-store-gib", type=float, default=1.5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    gib = 2**30
    if a.child:
        r = measure(a.experiment, a.steps, int(a.object_store_gib * gib))
        print(
            f"census scale {a.cells} cells: driver peak {r['driver'] / gib:.2f} GiB, "
            f"worker peak {r['worker'] / gib:.2f} GiB, hvg task peak {r['hvg'] / gib:.2f} GiB, "
            f"plan {r['plan_s']:.1f} s"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="censusvi-scale-") as tmp:
        exp = a.experiment or a.keep or str(Path(tmp) / "census.soma")
        if not a.experiment:
            t0 = time.perf_counter()
            build(Path(exp), a.cells)
            print(f"built {a.cells:,} cells in {time.perf_counter() - t0:.0f} s", flush=True)
        cmd = [sys.executable, __file__, "--child", "--experiment", exp, "--cells", str(a.cells)]
        cmd += ["--steps", str(a.steps), "--object-store-gib", str(a.object_store_gib)]
        out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line)
    if out.returncode or not lines or not lines[-1].startswith("census scale"):
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

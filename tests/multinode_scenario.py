"""The multi-node scenario of test_multinode.py, run as its own process (a Ray cluster of its own).

``python tests/multinode_scenario.py WORK`` starts a simulated cluster (``ray.cluster_utils``:
a head without CPUs and two worker nodes of one CPU each, every node with its own object store;
the run's storage is the ``file://`` URI in WORK/job.yaml, which every node sees), then:

1. submits WORK/job.yaml through ``censusvi.jobs.pretrain.run`` with the ``Faults`` callback;
2. when rank 1 reports epoch 1 (its checkpoint taken), removes that worker's node and adds a
   fresh one, while rank 0 is already inside epoch 2 (blocked on the lost rank's gradients);
3. when rank 0 reports epoch 3, kills the driver process (its job and workers die with it);
4. resubmits the same config with ``python -m censusvi.jobs.pretrain`` (no faults).

It writes WORK/summary.json (what it did, exit codes, the resubmission's JSON line) and stops
every node it started. Everything lives under RAY_TMPDIR (set by the test), so no other Ray on the
machine finds this cluster. ``--drive WORK`` is step 1's driver process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024**2}
SETTLE_S = 5.0  # lets the Train controller register the reported checkpoint before the fault
WAIT_S = 400.0


class Faults:
    """``on_epoch_end`` in every worker: parks rank 1 after epoch 1 and rank 0 after epoch 3
    (once each: a marker file remembers) until the scenario removes the node / kills the driver."""

    def __init__(self, work: str) -> None:
        self.work = Path(work)

    def _park(self, name: str, epoch: int) -> None:
        import ray

        marker = self.work / name
        if marker.exists():
            return
        node = ray.get_runtime_context().get_node_id()
        marker.write_text(json.dumps({"node_id": node, "epoch": epoch}))
        time.sleep(WAIT_S)  # the scenario ends this process meanwhile

    def __call__(self, stats) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        if stats.epoch == 1 and rank == 1:
            self._park("node_loss.json", stats.epoch)
        if stats.epoch == 3 and rank == 0:
            self._park("driver_kill.json", stats.epoch)


def drive(work: Path) -> None:
    import ray

    from censusvi.config_files import read_config
    from censusvi.jobs.pretrain import job_from, run
    from censusvi.ray_session import init_ray

    init_ray()  # RAY_ADDRESS: the scenario's cluster
    (work / "driver_node.txt").write_text(ray.get_runtime_context().get_node_id())
    print(json.dumps(run(job_from(read_config(work / "job.yaml")), on_epoch_end=(Faults(work),))))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the driver exited ({proc.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} within {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(0.2)  # the marker is written in one call; let it land
    return json.loads(path.read_text())


def scenario(work: Path) -> dict:
    from ray.cluster_utils import Cluster

    summary: dict = {}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024**2},
    )
    try:
        for _ in range(2):
            cluster.add_node(**NODE)
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        log = (work / "driver.log").open("w")
        driver = subprocess.Popen(
            [sys.executable, __file__, "--drive", str(work)], env=env, stdout=log, stderr=log
        )
        lost = wait_for(work / "node_loss.json", driver)
        time.sleep(SETTLE_S)
        (victim,) = [n for n in cluster.worker_nodes if n.node_id == lost["node_id"]]
        cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(**NODE)  # the replacement a cluster's autoscaler would bring
        summary["removed_node"] = lost["node_id"]
        summary["driver_node"] = (work / "driver_node.txt").read_text()
        wait_for(work / "driver_kill.json", driver)
        time.sleep(SETTLE_S)
        summary["killed_at_ms"] = int(time.time() * 1000)
        driver.kill()
        summary["first_submission_exit"] = driver.wait()
        job = subprocess.run(
            [sys.executable, "-m", "censusvi.jobs.pretrain", "--config", str(work / "job.yaml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        (work / "resubmission.log").write_text(job.stdout + job.stderr)
        summary["resubmission_exit"] = job.returncode
        lines = [ln for ln in job.stdout.splitlines() if ln.startswith("{")]
        summary["resubmission"] = json.loads(lines[-1]) if lines else None
    finally:
        cluster.shutdown()
    return summary


if __name__ == "__main__":
    if sys.argv[1] == "--drive":
        drive(Path(sys.argv[2]))
    else:
        work = Path(sys.argv[1])
        (work / "summary.json").write_text(json.dumps(scenario(work)))

"""Live MLflow tracking of a distributed run, from its rank-0 worker (``train.run_record``).

The job builds an ``MlflowTracker`` and hands it to ``pretrain_distributed``; rank 0 opens (or,
with the run id its checkpoint holds, continues) the run before the first epoch and logs every
epoch's metrics to it. Tracking is best effort: a store that cannot be reached costs a warning,
never the training; ``log_and_register`` logs whatever the tracker missed when the model is
registered, which is a separate step the job (or ``censusvi models register``) can retry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from censusvi.registry.mlflow_store import (
    _client,
    epoch_metrics,
    git_commit,
    log_missing_params,
    open_run,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlflowTracker:
    """``train.run_record.RunTracker`` on an MLflow store (``uri``, as ``use_tracking`` takes)."""

    uri: str
    run_name: str | None = None

    def open(self, run_id, params, record, epoch: int) -> str | None:
        from mlflow.entities import Metric, RunTag

        try:
            client, run = open_run(self.uri, run_id, self.run_name)
            log_missing_params(client, run, params)
            now = int(time.time() * 1000)
            counts = record.counts()
            client.log_batch(
                run.info.run_id,
                metrics=[Metric(k, float(v), now, epoch) for k, v in counts.items()],
                tags=[RunTag(k, str(v)) for k, v in {**counts, "git_commit": git_commit()}.items()],
            )
            return run.info.run_id
        except Exception as e:  # best effort: training goes on without live metrics
            log.warning(
                "no live MLflow tracking for this run (%s); the job logs it at registration", e
            )
            return None

    def log_epoch(self, run_id: str, stats) -> None:
        from mlflow.entities import Metric

        try:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, stats.epoch) for k, v in epoch_metrics(stats).items()]
            _client(self.uri).log_batch(run_id, metrics=metrics)
        except Exception as e:  # best effort: registration logs the epochs the run lacks
            log.warning("MLflow: epoch %d not logged to run %s (%s)", stats.epoch, run_id, e)

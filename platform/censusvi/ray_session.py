"""How a job joins Ray: the cluster ``ray job submit`` runs it on, or a local Ray on this machine."""

from __future__ import annotations

import os
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[1]  # the source root this package lives in


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job's runtime env applies
        ray.init()
    else:  # a local Ray (or a `ray start` head here): workers import this checkout's package
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(PLATFORM)}})

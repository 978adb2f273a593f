"""Entry point for `ray job submit -- python jobs/pretrain.py --config configs/census.yaml`.

Parses the YAML and `--set section.key=value` overrides, then calls the library: ingest the local
SOMA experiment if the config asks for one that is missing, train with Ray Train (a local Ray is
started when no cluster is reachable), write the model directory, log the run to MLflow (the
config's ``mlflow.tracking_uri``, else the store every ``censusvi`` command uses:
``MLFLOW_TRACKING_URI``, else ``sqlite:///./mlruns/mlflow.db``) and register the model version.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

RAY_KEYS = ("num_workers", "use_gpu", "max_failures")


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(
                f"--set {item!r}: expected section.key=value, e.g. train.num_workers=2"
            )
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = p.parse_args(argv)
    raw = apply_overrides(yaml.safe_load(Path(a.config).read_text()) or {}, a.set)

    from censusvi.data.soma import ingest
    from censusvi.ray_session import init_ray
    from censusvi.registry.mlflow_store import DEFAULT_MODEL_NAME, log_and_register, tracking_uri
    from censusvi.train.pretrain import load_pretrain_config
    from censusvi.train.ray_trainer import pretrain_distributed

    data, train = dict(raw.get("data") or {}), dict(raw.get("train") or {})
    patterns = data.pop("ingest", None)
    ray_opts = {k: train.pop(k) for k in RAY_KEYS if k in train}
    source = data.get("source", "")
    if patterns and not source.startswith("census://") and not Path(source).exists():
        files = sorted(
            f
            for pat in patterns
            for f in glob.glob(str((Path(a.config).parent / pat).resolve())) or glob.glob(pat)
        )
        print(f"ingesting {len(files)} files into {source}", flush=True)
        ingest(files, source)
    cfg = load_pretrain_config(
        None, {"data": data, "model": raw.get("model") or {}, "train": train}
    )
    out = raw.get("out", "runs/model")
    init_ray()
    model, history = pretrain_distributed(
        cfg,
        out,
        num_workers=int(ray_opts.get("num_workers", 1)),
        use_gpu=bool(ray_opts.get("use_gpu", False)),
        storage_path=str(Path(out).parent / "ray_results"),
        max_failures=int(ray_opts.get("max_failures", 2)),
        stream=raw.get("stream"),
    )
    mlf = raw.get("mlflow") or {}
    # The store every censusvi command uses (MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db), so
    # that `censusvi models list` run from here shows this run.
    uri = mlf.get("tracking_uri") or tracking_uri()
    run_id, version = log_and_register(
        model, history, out, uri, mlf.get("model_name", DEFAULT_MODEL_NAME)
    )
    print(
        json.dumps(
            {
                "model": str(out),
                "epochs": len(history.epochs),
                "final_val_elbo": history.epochs[-1].val_elbo,
                "mlflow_run_id": run_id,
                "model_version": version,
                "tracking_uri": uri,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster manifests parse, and the entry points and configs they name exist in the repo."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def named_paths(text: str) -> set[str]:
    return set(re.findall(r"(?:jobs|configs)/[\w./-]+\.(?:py|yaml)", text))


def test_every_manifest_parses_and_names_real_files():
    manifests = sorted((ROOT / "infra").rglob("*.yaml"))
    assert len(manifests) >= 4
    named = set()
    for m in manifests:
        assert docs(m), m
        named |= named_paths(m.read_text())
    assert {"jobs/pretrain.py", "configs/census.yaml"} <= named
    for p in named:
        assert (ROOT / p).is_file(), f"{p} is named in infra/ but missing"


def test_kuberay_objects():
    cluster = docs(ROOT / "infra/kuberay/raycluster.yaml")[0]
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["enableInTreeAutoscaling"]
    gpu = cluster["spec"]["workerGroupSpecs"][0]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    job = docs(ROOT / "infra/kuberay/rayjob.yaml")[0]
    assert (
        job["kind"] == "RayJob"
        and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    )
    kinds = {d["kind"] for d in docs(ROOT / "infra/mlflow/mlflow-server.yaml")}
    assert kinds == {"Deployment", "Service"}


def test_census_config_is_loadable():
    """The packaged census config, by name, as the RayJob's entrypoint reads it."""
    from censusvi.config_files import read_config
    from censusvi.jobs.pretrain import job_from

    job = job_from(read_config("census", ["out=/mnt/cluster_storage/censusvi/model"]))
    assert (
        job.cfg.data.source.startswith("census://")
        and job.cfg.model.n_hidden == 128
        and job.cfg.train.lr == 1e-4
        and (job.num_workers, job.use_gpu) == (4, True)
        and job.out == "/mnt/cluster_storage/censusvi/model"
    )


def test_serve_configs_name_the_app_and_its_settings():
    """serve/config.yaml and the RayService's serveConfigV2 build the app serve/app.py defines."""
    import dataclasses
    import sys

    sys.path.insert(0, str(ROOT))
    from serve import app as serve_app

    service = docs(ROOT / "infra/kuberay/rayservice.yaml")[0]
    assert service["kind"] == "RayService"
    configs = [yaml.safe_load((ROOT / "serve/config.yaml").read_text())]
    configs.append(yaml.safe_load(service["spec"]["serveConfigV2"]))
    fields = {f.name for f in dataclasses.fields(serve_app.Settings)}
    for cfg in configs:
        (application,) = cfg["applications"]
        module, attr = application["import_path"].split(":")
        assert module == "serve.app" and callable(getattr(serve_app, attr))
        assert set(application["args"]) <= fields, set(application["args"]) - fields
        names = {d["name"] for d in application["deployments"]}
        assert names == {"Ingress", "Mapper", "Annotator", "Metrics", "Results"}
        for d in application["deployments"]:
            assert getattr(serve_app, d["name"]).name == d["name"]
            scaling = d.get("autoscaling_config")
            if scaling:
                assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]

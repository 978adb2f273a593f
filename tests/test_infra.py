"""infra/: the KubeRay manifests pass KubeRay's CRD schemas (../shared/kuberay-crds/) and the
operator's own checks, every image is the one infra/Dockerfile builds or a tag Ray publishes, the
Ray versions agree, and what the manifests run (modules, packaged configs, the Serve app) exists."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
RAY_TAG = re.compile(
    r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<variant>cpu|gpu|cu\d{3,4})"
)
PY_TAG = f"{sys.version_info.major}{sys.version_info.minor}"
DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[Path, dict]]:
    found = [(p, d) for p in sorted(INFRA.rglob("*.yaml")) for d in docs(p)]
    assert len(found) >= 7, found
    return found


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d.get("kind") == kind]


def pinned(name: str) -> str:
    text = (ROOT / "constraints.txt").read_text()
    (version,) = re.findall(rf"^{re.escape(name)}==([^\s#;]+)", text, re.M)
    return version


def walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as kubectl's default strict field validation does
    (jsonschema allows them unless told; a typo such as `envFrm` then fails here)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crds() -> dict[str, dict]:
    """{kind: its CustomResourceDefinition} of KubeRay's CRDs."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    found = [yaml.load(p.read_text(), Loader=loader) for p in CRDS.glob("ray.io_*.yaml")]
    return {crd["spec"]["names"]["kind"]: crd for crd in found}


@cache
def crd_schema(kind: str, version: str) -> dict:
    """The openAPIV3Schema KubeRay's CRD gives ``kind`` at ``version`` (e.g. RayJob, v1)."""
    versions = crds()[kind]["spec"]["versions"]
    (v,) = [v for v in versions if v["name"] == version and v["served"]]
    return strict(v["schema"]["openAPIV3Schema"])


def test_every_kuberay_manifest_passes_its_crd_schema():
    if not CRDS.is_dir():
        pytest.fail(f"the KubeRay CRDs are missing: {CRDS} (expected beside the repo)")
    checked = set()
    for path, doc in manifests():
        group, _, version = doc.get("apiVersion", "").rpartition("/")
        if group != "ray.io":
            continue
        errors = sorted(
            jsonschema.Draft7Validator(crd_schema(doc["kind"], version)).iter_errors(doc),
            key=lambda e: list(e.absolute_path),
        )
        assert not errors, f"{path.name}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors[:5]
        )
        checked.add(doc["kind"])
    assert checked == {"RayCluster", "RayJob", "RayService"}


def test_the_strict_schema_refuses_a_misspelt_field():
    job = copy.deepcopy(of_kind("RayJob")[0])
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["envFrm"] = []
    errors = list(jsonschema.Draft7Validator(crd_schema("RayJob", "v1")).iter_errors(job))
    assert any("envFrm" in e.message for e in errors), [e.message for e in errors]


def test_other_manifests_are_named_objects_of_known_kinds():
    kinds = {
        "ConfigMap": "v1",
        "PersistentVolumeClaim": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
    }
    for path, doc in manifests():
        if doc.get("apiVersion", "").startswith("ray.io/"):
            continue
        if "cluster_name" in doc:  # the Ray cluster launcher's config: Ray's own schema
            continue
        assert kinds.get(doc.get("kind")) == doc.get("apiVersion"), (path.name, doc.get("kind"))
        assert DNS1035.fullmatch(doc["metadata"]["name"]), doc["metadata"]
    mlflow = {d["kind"] for d in docs(INFRA / "mlflow" / "mlflow-server.yaml")}
    assert mlflow == {"Deployment", "Service"}


def test_the_cluster_launcher_config_passes_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    (config,) = docs(INFRA / "ray-cluster.yaml")
    jsonschema.validate(config, schema)
    assert "setup_commands" not in config and "file_mounts" not in config  # all in the image


def test_operator_rules_the_schemas_do_not_carry():
    """What KubeRay's validation adds (ray-operator/controllers/ray/utils/validation.go)."""
    clusters = {d["metadata"]["name"]: d["spec"] for d in of_kind("RayCluster")}
    services = {d["metadata"]["name"]: d["spec"]["rayClusterConfig"] for d in of_kind("RayService")}
    for name, spec in {**clusters, **services}.items():
        assert DNS1035.fullmatch(name), name
        assert spec["rayVersion"] == ray.__version__ == pinned("ray"), (name, spec["rayVersion"])
        if spec.get("authOptions", {}).get("mode") == "token":  # needs Ray >= 2.52
            assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
        for group in spec.get("workerGroupSpecs", []):
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group
            assert not (
                group["rayStartParams"].keys() & {"num-cpus", "num-gpus"} and "resources" in group
            )
    for job in of_kind("RayJob"):
        spec = job["spec"]
        assert DNS1035.fullmatch(job["metadata"]["name"])
        assert spec["clusterSelector"]["ray.io/cluster"] in clusters  # a cluster infra/ defines
        assert not spec.get("backoffLimit"), "backoffLimit is refused with clusterSelector"
        if not spec.get("shutdownAfterJobFinishes"):
            assert not spec.get("ttlSecondsAfterFinished"), (
                "refused without shutdownAfterJobFinishes"
            )


def containers() -> Iterator[tuple[str, str, bool]]:
    """(file, image, wants a GPU) for every container and launcher node image in infra/."""
    for path, doc in manifests():
        for node in walk(doc):
            for c in node.get("containers", []) if isinstance(node.get("containers"), list) else []:
                limits = (c.get("resources") or {}).get("limits") or {}
                yield path.name, c["image"], "nvidia.com/gpu" in limits
        if "cluster_name" in doc:  # the launcher: a CPU head, GPU workers
            yield path.name, doc["docker"]["head_image"], False
            yield path.name, doc["docker"]["worker_image"], True


def built_images() -> dict[str, str]:
    """{image: VARIANT} for each `docker build -f infra/Dockerfile` command of infra/README.md."""
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    built = {}
    for line in text.splitlines():
        if "docker build" in line and "-f infra/Dockerfile" in line:
            args = shlex.split(line[line.index("docker build") :].split("`")[0])
            variant = next((a.split("=", 1)[1] for a in args if a.startswith("VARIANT=")), "cpu")
            built[args[args.index("-t") + 1]] = variant
    return built


def test_every_image_is_the_one_the_dockerfile_builds_or_a_published_ray_tag():
    built = built_images()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert set(built.values()) == {"cpu", "gpu"}, built
    for image, variant in built.items():  # ghcr.io/OWNER/censusvi:0.1.0 and :0.1.0-gpu
        assert image.split(":")[1] == version + ("-gpu" if variant == "gpu" else ""), image
    named = list(containers())
    assert len(named) >= 6, named
    for file, image, gpu in named:
        if image.startswith("ghcr.io/mlflow/mlflow:"):  # the tracking server: the client's MLflow
            import mlflow

            server = image.split(":v")[1].split(".")[:2]
            assert server == mlflow.__version__.split(".")[:2], (image, mlflow.__version__)
            continue
        if m := RAY_TAG.fullmatch(image):
            assert m["ray"] == ray.__version__ and m["py"] == PY_TAG, (file, image)
            continue
        assert image in built, f"{file}: {image} is neither built by infra/Dockerfile nor Ray's"
        assert built[image] == ("gpu" if gpu else "cpu"), f"{file}: {image} for gpu={gpu}"


def test_the_dockerfile_builds_from_rays_image_of_the_pinned_ray_and_this_python():
    lines = (INFRA / "Dockerfile").read_text().splitlines()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines[: next(
        i for i, line in enumerate(lines) if line.startswith("FROM"))]), re.M))  # fmt: skip
    assert args["RAY_VERSION"] == pinned("ray") == ray.__version__, args
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2, froms
    for variant in ("cpu", "gpu"):
        values = {**args, "VARIANT": variant}
        for image in froms:
            tag = re.sub(r"\$\{(\w+)\}", lambda m, v=values: v[m[1]], image)
            m = RAY_TAG.fullmatch(tag)
            assert m and m["variant"] == variant and m["py"] == PY_TAG, tag
    assert "install.sh" in (INFRA / "Dockerfile").read_text()


def env_of(configmap: str) -> dict[str, str]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == configmap]
    return cm["data"]


def test_the_rayjob_runs_a_packaged_job_module_and_config_with_paths_from_the_environment():
    from censusvi.config_files import read_config
    from censusvi.jobs.pretrain import job_from

    (job,) = of_kind("RayJob")
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    (source,) = submitter["envFrom"]
    env = env_of(source["configMapRef"]["name"])
    # What the submitter's shell runs: $VARS from the ConfigMap.
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m[1]], job["spec"]["entrypoint"])
    python, dash_m, module, *args = shlex.split(line)
    assert (python, dash_m) == ("python", "-m") and importlib.util.find_spec(module), module
    assert module == "censusvi.jobs.pretrain"
    config = args[args.index("--config") + 1]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    pretrain = job_from(read_config(config, sets))
    assert pretrain.out.startswith("/mnt/cluster_storage/"), pretrain.out  # the shared claim
    # Ray Train refuses a head-local checkpoint path on several nodes: the run's storage is the
    # shared claim too, so a resubmitted RayJob resumes from it
    assert pretrain.storage.startswith("/mnt/cluster_storage/"), pretrain.storage
    assert pretrain.cfg.data.source.startswith("census://") and pretrain.use_gpu
    cluster = of_kind("RayCluster")[0]["spec"]
    assert pretrain.num_workers <= sum(g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    mounts = {m["mountPath"] for c in walk(cluster) for m in c.get("volumeMounts", [])}
    assert "/mnt/cluster_storage" in mounts


def test_census_config_is_the_census_recipe():
    from censusvi.config_files import read_config
    from censusvi.jobs.pretrain import job_from

    job = job_from(read_config("census"))
    assert job.storage.startswith("/mnt/cluster_storage/")  # every node's: checkpoints, resume
    train = job.cfg.train.resolved(1_000)  # the Census recipe even on a small corpus
    assert (job.cfg.model.n_hidden, job.cfg.model.n_latent, job.cfg.train.schedule) == (
        128,
        50,
        "census",
    )
    assert (train.lr, train.batch_size, train.max_epochs, train.n_epochs_kl_warmup) == (
        1e-4,
        1024,
        100,
        20,
    )


def test_nothing_in_infra_uploads_a_working_dir_or_names_checkout_files():
    for path in sorted(INFRA.rglob("*.yaml")):
        text = yaml.safe_dump_all(docs(path))  # what the objects hold, comments left out
        assert "working_dir" not in text and "PYTHONPATH" not in text, path.name
        assert not re.findall(r"(?:jobs|configs|serve)/[\w-]+\.(?:py|yaml)", text), path.name


def test_the_rayservice_serves_the_packaged_app_with_settings_it_knows():
    from importlib.resources import files

    from ray.serve.schema import ServeDeploySchema

    from censusvi.serving import app as serving_app
    from censusvi.serving.settings import EXTRA_ARGS, Settings

    (service,) = of_kind("RayService")
    cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(cfg)
    shipped = yaml.safe_load((files("censusvi.serving") / "serve_config.yaml").read_text())
    (application,) = cfg["applications"]
    (packaged,) = shipped["applications"]
    assert application["import_path"] == packaged["import_path"] == "censusvi.serving.app:build_app"
    assert "runtime_env" not in application
    fields = {f.name for f in dataclasses.fields(Settings)} | set(EXTRA_ARGS)
    assert set(application["args"]) <= fields, set(application["args"]) - fields
    names = {d["name"] for d in application["deployments"]}
    assert names <= {d["name"] for d in packaged["deployments"]}, names
    for name in names:
        assert getattr(serving_app, name).name == name
        scaling = next(d for d in application["deployments"] if d["name"] == name).get(
            "autoscaling_config"
        )
        assert not scaling or 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    pods = [service["spec"]["rayClusterConfig"]["headGroupSpec"]] + service["spec"][
        "rayClusterConfig"
    ]["workerGroupSpecs"]
    for group in pods:
        (container,) = group["template"]["spec"]["containers"]
        token = [e for e in container.get("env", []) if e["name"] == "CENSUSVI_TOKEN"]
        assert token and "secretKeyRef" in token[0]["valueFrom"], container["name"]
        assert {"configMapRef": {"name": "censusvi-env"}} in container["envFrom"]
    assert "MLFLOW_TRACKING_URI" in env_of("censusvi-env")

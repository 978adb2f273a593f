"""Each deployment's Ray options, without Ray: the code's options merged with a config's (a
config that sets ``num_cpus`` keeps the code's ``num_gpus`` and ``memory``), memory reserved for
what a replica holds, and the ingress's memory budget checked against its request limits.

Serve itself *replaces* a deployment's ``ray_actor_options`` with those of its config section;
so the shipped config sets resources under the application's ``args.deployments`` (which
``build_app`` merges here), not in Serve's own ``deployments`` section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from censusvi.serving.settings import Settings

MiB = 2**20
REPLICA_BASE_MB = 512  # a replica's own process (Python, torch or FAISS, Serve) beside its data
LOADED_PER_FILE_BYTE = 1.25  # what a loaded model or index takes per byte of its files
NEXT_VERSION_MAX = 1.25  # a next version up to this x the served one's size fits beside it
CPU_DOWNSCALE_DELAY_S = 60.0  # a CPU replica holding a version: cheap to start again
GPU_DOWNSCALE_DELAY_S = 600.0  # a GPU replica is scarce and slow to get back: keep it longer
CODE_ACTOR_OPTIONS = {  # each deployment's options in the code (the decorators')
    "Ingress": {"num_cpus": 0.25},
    "Mapper": {"num_cpus": 1},
    "Annotator": {"num_cpus": 0.5},
    "Results": {"num_cpus": 0},
    "Versions": {"num_cpus": 0},
}
INGRESS_ONGOING = 8  # an ingress replica's max_ongoing_requests when the config sets none
HOLDS = {"Mapper": "model", "Annotator": "index"}  # what a replica of each loads per version


def files_bytes(path: str | os.PathLike | None) -> int:
    """Bytes of the files under a local directory (0 without one)."""
    if path is None:
        return 0
    root = Path(path)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def artifact_bytes(uri: str, tracking: str | None = None) -> int:
    """Bytes of the registry artifacts under ``models:/NAME/VERSION/PART``, without downloading."""
    import mlflow

    from censusvi.registry.mlflow_store import use_tracking

    use_tracking(tracking)
    total, todo = 0, [uri.rstrip("/")]
    while todo:
        here = todo.pop()
        for f in mlflow.artifacts.list_artifacts(artifact_uri=here):
            if f.is_dir:
                todo.append(f"{here}/{Path(f.path).name}")
            else:
                total += f.file_size or 0
    return total


def held_bytes(s: Settings, version: str) -> dict[str, int]:
    """Bytes of the files each holding deployment loads for ``version``."""
    if not s.registered:
        return {"Mapper": files_bytes(s.model), "Annotator": files_bytes(s.index)}
    from censusvi.registry.fetch import artifact_names
    from censusvi.registry.uris import parse_model_uri

    base = f"models:/{parse_model_uri(s.model)[0]}/{version}"
    names = artifact_names(base, s.tracking_uri)
    if "model" not in names:  # a bare model directory registered: the whole version is the model
        return {"Mapper": artifact_bytes(base, s.tracking_uri), "Annotator": 0}
    index = artifact_bytes(f"{base}/index", s.tracking_uri) if "index" in names else 0
    return {"Mapper": artifact_bytes(f"{base}/model", s.tracking_uri), "Annotator": index}


def reserved_memory(held: int) -> int:
    """Bytes to reserve for a replica that holds ``HOLD_AT_MOST`` (two) versions: the served one
    of ``held`` file bytes and the one coming in, up to ``NEXT_VERSION_MAX`` times as large."""
    return int(REPLICA_BASE_MB * MiB + LOADED_PER_FILE_BYTE * held * (1 + NEXT_VERSION_MAX))


def memory_check(deployment: str, reserved: int | None, size) -> object:
    """``VersionStore.fits`` for a replica of ``deployment`` with ``reserved`` bytes of memory:
    a version whose files (``size(version)`` bytes) would not fit beside those held is refused,
    with the reason (the app keeps serving what it holds)."""

    def fits(version: str, held: list[str]) -> str | None:
        if not reserved:
            return None
        files = sum(size(v) for v in held) + size(version)
        need = REPLICA_BASE_MB * MiB + LOADED_PER_FILE_BYTE * files
        if need <= reserved:
            return None
        return (
            f"version {version}'s {HOLDS[deployment]} ({size(version) / MiB:,.1f} MB of files) "
            f"does not fit beside version(s) {', '.join(held)} in this {deployment} replica's "
            f"memory reservation of {reserved / MiB:,.0f} MB (needs {need / MiB:,.0f} MB): still "
            f"serving {held[0]}; redeploy the app (it reserves for two versions of the served "
            f"one's size) or set args.actor_options.{deployment}.memory"
        )

    return fits


def replica_memory_check(s: Settings, deployment: str, reserved: int | None) -> object:
    """``memory_check`` with each version's size read from the registry (or the directory)."""
    sizes: dict[str, int] = {}

    def size(version: str) -> int:
        if version not in sizes:
            sizes[version] = held_bytes(s, version)[deployment]
        return sizes[version]

    return memory_check(deployment, reserved, size)


def ingress_ongoing(s: Settings, configured: int | None) -> int:
    """The ingress's ``max_ongoing_requests``: the configured one (else ``INGRESS_ONGOING``, or
    fewer if the budget allows fewer), refused when ongoing requests x what each may hold (its
    body and what it decodes to) would pass ``ingress_memory_mb``."""
    allowed = int(s.ingress_memory_mb // s.request_memory_mb)
    if configured is None:
        configured = max(1, min(INGRESS_ONGOING, allowed))
    if configured * s.request_memory_mb > s.ingress_memory_mb:
        raise ValueError(
            f"Ingress max_ongoing_requests {configured} x {s.request_memory_mb:,.0f} MB per request "
            f"(max_request_mb {s.max_request_mb:g} and what it decodes to) = "
            f"{configured * s.request_memory_mb:,.0f} MB exceeds ingress_memory_mb "
            f"{s.ingress_memory_mb:g}: lower max_ongoing_requests or max_request_mb "
            f"(at most {allowed} ongoing at this size), or raise ingress_memory_mb"
        )
    return configured


def configured_options(args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-deployment options from ``build_app``'s args: ``deployments`` (name -> Serve options)
    with ``actor_options`` (name -> Ray actor options) merged into their ``ray_actor_options``."""
    out = {name: dict(o or {}) for name, o in (args.get("deployments") or {}).items()}
    for name, actor in (args.get("actor_options") or {}).items():
        opts = out.setdefault(name, {})
        opts["ray_actor_options"] = {**(opts.get("ray_actor_options") or {}), **(actor or {})}
    return out


def deployment_options(
    s: Settings,
    configured: dict[str, dict[str, Any]],
    held: dict[str, int],
    gpus: bool,
) -> dict[str, dict[str, Any]]:
    """Every deployment's ``.options()``: the config's options over the code's, with
    ``ray_actor_options`` merged key by key (the config's win), ``memory`` reserved for what a
    replica holds unless the config sets it, a GPU per Mapper on a cluster with GPUs, a longer
    downscale delay for GPU replicas, and the ingress's ongoing requests within its budget."""
    out = {}
    for name, code in CODE_ACTOR_OPTIONS.items():
        opts = {k: v for k, v in (configured.get(name) or {}).items()}
        actor = dict(code)
        if name in HOLDS:
            actor["memory"] = reserved_memory(held.get(name, 0))
        if name == "Ingress":
            opts["max_ongoing_requests"] = ingress_ongoing(s, opts.get("max_ongoing_requests"))
            budget = opts["max_ongoing_requests"] * s.request_memory_mb + REPLICA_BASE_MB
            actor["memory"] = int(budget * MiB)
        if name == "Mapper" and gpus:
            actor["num_gpus"] = 1
        actor.update(opts.get("ray_actor_options") or {})
        opts["ray_actor_options"] = actor
        if name in HOLDS and "autoscaling_config" in opts:  # unless the config sets its own
            delay = GPU_DOWNSCALE_DELAY_S if actor.get("num_gpus") else CPU_DOWNSCALE_DELAY_S
            opts["autoscaling_config"] = {"downscale_delay_s": delay, **opts["autoscaling_config"]}
        out[name] = opts
    unknown = sorted(set(configured) - set(CODE_ACTOR_OPTIONS))
    if unknown:
        raise ValueError(f"unknown deployments {unknown} in the config: known {sorted(out)}")
    return out

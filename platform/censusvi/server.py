"""``censusvi serve``: the Serve app (``censusvi.serving.app``) in the foreground until SIGINT or
SIGTERM.

With no ``RAY_ADDRESS`` it starts a local Ray (and stops it on the way out); with one it deploys
to that cluster, where censusvi must be installed (the replicas import it). Deployment options
(autoscaling, resources) come from the packaged ``serve_config.yaml``, the file ``serve run
serve/config.yaml`` reads in a checkout, so both ways of starting serve the same app.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

CONFIG = files("censusvi.serving") / "serve_config.yaml"


log = logging.getLogger(__name__)
APP_NAME = "censusvi"  # the application's name in Serve, as in the shipped serve_config.yaml


def deployment_options(config: Path | Any = CONFIG) -> dict[str, dict[str, Any]]:
    """The Serve config's per-deployment options, keyed by deployment name, with the actor
    options of its ``args.actor_options`` as their ``ray_actor_options`` (``build_app`` merges
    them over the code's)."""
    from censusvi.config_files import check_size
    from censusvi.serving.deploy import configured_options

    d = yaml.safe_load(config.read_text())
    check_size(d, str(config))  # the one YAML reader an alias bomb could expand
    (application,) = d["applications"]
    deployments = {dep.pop("name"): dep for dep in application.get("deployments", [])}
    actor = (application.get("args") or {}).get("actor_options")
    return configured_options({"deployments": deployments, "actor_options": actor})


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def check_listenable(host: str, port: int) -> None:
    """One line (a ValueError) where ``host:port`` cannot be listened on -- a name that does not
    resolve, an address not on this machine, a port another process holds -- before Ray starts:
    Serve's proxy would otherwise fail inside Ray with a page of traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(
            f"--host {host!r} does not resolve ({getattr(e, 'strerror', None) or e}): give an "
            "address of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (all)"
        ) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's server does
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host}:{port} ({e.strerror}): another process may hold the "
                "port; choose another --port, or --host an address of this machine"
            ) from None


def run_foreground(
    settings: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> int:
    import ray
    from ray import serve

    from censusvi.serving.app import checked_app
    from censusvi.serving.settings import Settings, check_servable

    check_servable(Settings.from_args(settings))  # a bad model, index or setting: before Ray
    started_ray = not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
    if started_ray:  # a running cluster's proxy may already hold the port: Serve reuses it
        check_listenable(host, port)
    if not ray.is_initialized():
        ray.init(
            address=None if "RAY_ADDRESS" in os.environ else "local",
            include_dashboard=False,
            log_to_driver=not quiet,
            logging_level=logging.WARNING if quiet else logging.INFO,
        )
    if quiet:  # Serve's own start and readiness lines: ours says where the app is
        logging.getLogger("ray.serve").setLevel(logging.WARNING)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app = checked_app({**settings, "deployments": deployment_options()})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        wait_healthy(url, 300)
        print(f"censusvi serve: ready at {url} (model {settings['model']})", flush=True)
        while not stop.wait(0.5):
            pass
        print("censusvi serve: stopping", flush=True)
    finally:
        # Our application only, its requests drained: on a cluster given by RAY_ADDRESS other
        # applications keep running (serve.shutdown would stop Serve for all of them).
        try:
            serve.delete(APP_NAME)
        except Exception as e:  # Serve never started (the error that stopped it goes on)
            log.debug("no application to delete: %s", e)
        finally:
            if started_ray:  # Serve's controller and proxy end with the Ray this command started
                ray.shutdown()
    return 0

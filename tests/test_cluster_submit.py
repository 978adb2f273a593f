"""README "Run on a cluster": its submit command, run as printed against a `ray start --head` here.

The head is this test's own (its temp dir, ports and token file; ``RAY_AUTH_MODE=token`` as the
README says); the command runs from the repo root with the variables the README tells the user to
set (``RAY_ADDRESS``, ``DATA``, ``RUNS``; ``MLFLOW_TRACKING_URI`` names the store). The job must
succeed and its model version must be in that store. The head is stopped by the ids of the
processes under its temp dir, never ``ray stop`` (which stops every Ray of the user, the test
session's too).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray, python: the venv's, as an activated venv gives
MARKER = "<!-- cluster-submit"
DATA_FILES = ("cellbench_lung_celllines.h5ad", "pbmc_kang_ctrl_stim_harmony.h5ad")  # ~3 k cells


def readme_command() -> str:
    """The fenced block after the README's cluster-submit marker."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, f"README.md needs one {MARKER} ... --> before the command"
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block, "no fenced bash block after the cluster-submit marker"
    return block.group(1)


def free_port() -> int:
    """An unused port; the kernel's ephemeral range lies above Ray's worker ports (10002-19999)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not 10002 <= port <= 19999, port
    return port


def processes_under(tmp: Path) -> list[int]:
    """Live processes that name ``tmp`` on their command line or run in it (this head's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone, or not ours to read
        if state != "Z" and (str(tmp) in cmdline or Path(cwd).is_relative_to(tmp)):
            pids.append(int(proc.name))
    return pids


def stop_head(tmp: Path, grace_s: float = 8.0) -> None:
    """TERM every process under ``tmp``, then KILL those still alive after ``grace_s``."""
    pids = processes_under(tmp)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while (pids := [p for p in processes_under(tmp) if p in pids]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        if not pids:
            return


@pytest.fixture
def head():
    """A Ray head of this test's own: (its environment for clients, its temp dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))  # short: Ray's socket paths are limited
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),  # default 10001: taken by another head
        "--dashboard-agent-listen-port": free_port(),  # default 52365: likewise
    }
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1"]
    cmd += [str(x) for kv in ports.items() for x in kv]
    cmd += ["--temp-dir", str(tmp / "ray"), "--num-cpus", "2"]
    cmd += ["--object-store-memory", "300000000", "--include-dashboard", "true"]
    cmd += ["--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        yield env, tmp
    finally:
        stop_head(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not processes_under(tmp)


def job_status(env: dict[str, str], job_id: str) -> str:
    request = urllib.request.Request(
        f"{env['RAY_ADDRESS']}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {Path(env['RAY_AUTH_TOKEN_PATH']).read_text()}"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)["status"]


def test_readme_cluster_command_trains_and_registers(head, shared_data):
    from mlflow import MlflowClient

    env, tmp = head
    data = tmp / "data"  # DATA: a folder of .h5ad files (two of the bundled ones, to be quick)
    data.mkdir()
    for name in DATA_FILES:
        (data / name).symlink_to(shared_data / name)
    uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    env = {**env, "DATA": str(data), "RUNS": str(tmp / "runs"), "MLFLOW_TRACKING_URI": uri}
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_command()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,  # ~1 min on an idle 2-core machine; several when it is shared
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", log).group(1)
    assert job_status(env, job_id) == "SUCCEEDED"
    result = json.loads(next(line for line in log.splitlines() if line.startswith('{"model"')))
    assert result["tracking_uri"] == uri and result["epochs"] == 2
    assert result["model"] == str(tmp / "runs" / "model")  # absolute, not in Ray's copy
    assert (tmp / "runs" / "model" / "config.json").is_file()
    version = MlflowClient(tracking_uri=uri).get_model_version(
        "censusvi-scvi", result["model_version"]
    )
    assert version.run_id == result["mlflow_run_id"] and version.tags["n_batches"] != "0"
    print(f"README cluster command: {time.monotonic() - t0:.0f} s")

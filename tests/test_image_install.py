"""infra/install.sh, the image's install recipe, run in a fresh venv away from the checkout.

Installing censusvi[all] for real downloads ~2 GB (the full install of the wheel is
tests/test_wheel_install.py's), so the script runs here with pip's ``--dry-run --report``: a GPU
then a CPU run, each resolving the requirements the script hands pip (``--no-deps``: the ~25
packages it names) and reading pip's report of what it would install. pip sees PyPI alone (the
machine's pip configuration is set aside), as in a ``docker build``, and keeps its cache: ~30 s
once the cache holds the wheels (pip fetches whole wheels when the index gives no separate
metadata, ~0.9 GB the first time). ``CENSUSVI_IMAGE_RESOLVE=1`` also resolves every transitive
dependency (2-3 min).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infra" / "install.sh"
PYPI = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu/"
# Packages each extra of [all] brings (the list): a CPU or a GPU image without one is broken.
EXTRA_PACKAGES = {"ray", "mlflow", "tiledbsoma", "cellxgene-census", "scib-metrics", "harmonypy"}


def pinned(name: str) -> str:
    """The ``name==VERSION`` pin of constraints.txt."""
    text = (ROOT / "constraints.txt").read_text()
    (version,) = re.findall(rf"^{re.escape(name)}==([^\s#;]+)", text, re.M)
    return version


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def pip_env(**extra: str) -> dict[str, str]:
    """The environment without this machine's pip settings (find-links, local indexes, caps)."""
    keep = ("PIP_INDEX_URL", "PIP_CERT", "PIP_CACHE_DIR", "PIP_DEFAULT_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_RETRIES="2")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return {**env, **extra}


def cpu_torch_source() -> tuple[dict[str, str], list[str]] | None:
    """(env, pip args) under which the CPU run can find torch's CPU build; None if nowhere."""
    if reachable(TORCH_CPU_INDEX):
        return {}, []  # the script's default
    wheel = f"torch-{pinned('torch')}+cpu-*.whl"
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if list(Path(folder).glob(wheel)):  # a local copy, as on the dev machines
            return {"TORCH_INDEX_URL": "none"}, ["--find-links", folder]
    return None


@pytest.fixture(scope="module")
def wheel(censusvi_wheel) -> Path:
    return censusvi_wheel


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    """A new venv outside the checkout, holding pip alone."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    if importlib.util.find_spec("virtualenv"):  # ~2 s, with a current pip
        cmd = [sys.executable, "-m", "virtualenv", "-q", "--no-periodic-update", str(venv)]
    else:
        cmd = [sys.executable, "-m", "venv", str(venv)]
    subprocess.run(cmd, check=True, env=pip_env())
    return venv / "bin" / "python"


def install(
    variant: str, target: Path, python: Path, *pip_args: str, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), variant, str(target), *pip_args],
        env=pip_env(PYTHON=str(python), **env),
        cwd=python.parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )


def dry_runs(wheel: Path, python: Path, out: Path, *pip_args: str) -> dict[str, dict]:
    """{variant: {name: report entry}} of a GPU and a CPU dry run (one after the other: the second
    reads the first's downloads from pip's cache)."""
    if not reachable(PYPI):
        pytest.skip(f"{PYPI} unreachable: the install script resolves against an index")
    torch_source = cpu_torch_source()
    cpu_env, cpu_args = torch_source or ({"TORCH_INDEX_URL": "none"}, [])

    def run(variant: str, env: dict[str, str], extra: list[str]) -> dict:
        report = out / f"{variant}.json"
        r = install(variant, wheel, python, "-q", "--dry-run", "--report", str(report),
                    *extra, *pip_args, **env)  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "nothing installed" in r.stdout
        entries = json.loads(report.read_text())["install"]
        return {e["metadata"]["name"].lower().replace("_", "-"): e for e in entries}

    gpu = run("gpu", {}, [])
    return {"gpu": gpu, "cpu": run("cpu", cpu_env, cpu_args), "cpu_torch_checked": torch_source}


@pytest.fixture(scope="module")
def direct(wheel, fresh_python, tmp_path_factory) -> dict[str, dict]:
    """The packages the script asks pip for (--no-deps)."""
    return dry_runs(wheel, fresh_python, tmp_path_factory.mktemp("reports"), "--no-deps")


def is_cuda_build(entry: dict) -> bool:
    """A torch wheel that depends on NVIDIA's CUDA libraries (PyPI's Linux build) vs ``+cpu``."""
    return any(r.startswith("nvidia-") for r in entry["metadata"].get("requires_dist") or [])


def test_gpu_image_gets_faiss_gpu_and_cuda_torch_and_never_faiss_cpu(direct):
    gpu = direct["gpu"]
    assert "faiss-cpu" not in gpu, "faiss-cpu would shadow faiss-gpu (docs/cli.md, FAISS on a GPU)"
    assert any(n.startswith("faiss-gpu") for n in gpu), sorted(gpu)
    torch = gpu["torch"]
    assert torch["metadata"]["version"] == pinned("torch"), torch["metadata"]["version"]
    assert is_cuda_build(torch), torch["download_info"]["url"]


def test_cpu_image_gets_faiss_cpu_and_the_cpu_torch(direct):
    cpu = direct["cpu"]
    assert "faiss-cpu" in cpu and not any(n.startswith("faiss-gpu") for n in cpu), sorted(cpu)
    if direct["cpu_torch_checked"] is None:
        pytest.skip(f"no torch CPU build reachable ({TORCH_CPU_INDEX} nor PIP_FIND_LINKS)")
    torch = cpu["torch"]
    assert torch["metadata"]["version"] == f"{pinned('torch')}+cpu", torch["download_info"]
    assert not is_cuda_build(torch)


def test_both_images_get_every_extra_and_the_same_packages_but_faiss(direct):
    cpu, gpu = set(direct["cpu"]), set(direct["gpu"])
    assert EXTRA_PACKAGES <= cpu, EXTRA_PACKAGES - cpu
    assert {n for n in cpu if not n.startswith("faiss")} == {
        n for n in gpu if not n.startswith("faiss")
    }
    # The image's Ray is the pinned one (the base image's tag): pip must not swap it.
    assert direct["gpu"]["ray"]["metadata"]["version"] == pinned("ray")


@pytest.mark.skipif(
    os.environ.get("CENSUSVI_IMAGE_RESOLVE") != "1",
    reason="resolving every dependency takes 2-3 min: CENSUSVI_IMAGE_RESOLVE=1 runs it",
)
def test_no_dependency_of_the_gpu_image_brings_faiss_cpu(wheel, fresh_python, tmp_path):
    full = dry_runs(wheel, fresh_python, tmp_path)
    assert "faiss-cpu" not in full["gpu"], [
        n for n, e in full["gpu"].items() if "faiss-cpu" in str(e["metadata"].get("requires_dist"))
    ]
    assert not any(n.startswith("nvidia-") for n in full["cpu"]) or not full["cpu_torch_checked"]


def fake_wheel(folder: Path, extras: dict[str, list[str]]) -> Path:
    """A censusvi wheel whose metadata has these extras (nothing else in it)."""
    lines = ["Metadata-Version: 2.1", "Name: censusvi", "Version: 0.0.0", "Requires-Dist: numpy"]
    for extra, reqs in extras.items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    path = folder / "censusvi-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("censusvi-0.0.0.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("variant", "extras", "message"),
    [
        ("cpu", {"gpu": ["faiss-gpu-cu12"]}, "has no extra ['all']; it has ['gpu']"),
        ("gpu", {"all": ["faiss-cpu"]}, "has no extra ['gpu']; it has ['all']"),
        ("gpu", {"all": ["faiss-cpu"], "gpu": ["cupy"]}, "name no faiss-gpu package"),
        ("cpu", {"all": ["faiss-gpu-cu12"], "gpu": []}, "name a faiss-gpu package"),
        ("tpu", {"all": []}, "variant 'tpu' is neither cpu nor gpu"),
    ],
)
def test_a_wheel_whose_extras_do_not_fit_is_refused_before_pip_runs(
    variant, extras, message, fresh_python, tmp_path
):
    r = install(variant, fake_wheel(tmp_path, extras), fresh_python, "--dry-run")
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "install.sh:" in r.stderr and "Traceback" not in r.stderr

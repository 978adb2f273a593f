"""`make setup` (.ci/setup-venv) gives each clone a .venv of its own: deleting one clone leaves
another one's censusvi, console scripts and Ray workers working.

Two copies of this checkout are set up over the deps venv this checkout's .venv already uses
(built by `make setup`; the test skips when it is not there rather than spend minutes building
one), the first is deleted, and the second is used."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = ("pyproject.toml", "constraints.txt", "README.md", "LICENSE", ".ci/setup-venv")


def copy_checkout(dst: Path) -> Path:
    for name in FILES:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(
        REPO / "platform",
        dst / "platform",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    return dst


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def deps_env(tmp_path_factory) -> dict[str, str]:
    """The environment in which setup-venv finds this checkout's deps venv already built."""
    marker = REPO / ".venv" / ".censusvi-deps"
    if not marker.is_file():
        pytest.skip("this checkout's .venv was not made by the per-clone setup-venv")
    probe = copy_checkout(tmp_path_factory.mktemp("probe"))
    cache = Path(marker.read_text().strip()).parent
    env = {**os.environ, "CENSUSVI_VENV_CACHE": str(cache)}
    env.pop("VIRTUAL_ENV", None)
    deps = Path(run(["bash", ".ci/setup-venv", "--deps-venv"], probe, env).strip())
    if not (deps / ".complete").is_file():
        pytest.skip(f"{deps} is not built (make setup builds it; minutes)")
    return env


def test_each_clone_has_its_own_venv(tmp_path, deps_env):
    a = copy_checkout(tmp_path / "a")
    b = copy_checkout(tmp_path / "b")
    shared = tmp_path / "shared-venv"  # the old layout: .venv a link to one venv for all clones
    (shared / "bin").mkdir(parents=True)
    (shared / "bin" / "python").write_text("")
    (a / ".venv").symlink_to(shared)
    for clone in (a, b):
        t = time.monotonic()
        run(["bash", ".ci/setup-venv"], clone, deps_env)
        assert time.monotonic() - t < 60, "a clone's setup over a built deps venv takes seconds"
        assert (clone / ".venv").is_dir() and not (clone / ".venv").is_symlink()
    assert (shared / "bin" / "python").is_file(), "the linked venv is left as it was"
    shutil.rmtree(a)

    py = str(b / ".venv" / "bin" / "python")
    out = run([py, "-c", "import censusvi, ray, torch; print(censusvi.__file__)"], b, deps_env)
    assert Path(out.strip()) == b / "platform" / "censusvi" / "__init__.py"
    for script, expected in (
        ("pytest", "pytest"),
        ("ruff", "ruff"),
        ("censusvi", "usage: censusvi"),
    ):
        flag = "--help" if script == "censusvi" else "--version"
        assert expected in run([str(b / ".venv" / "bin" / script), flag], b, deps_env)
    # A console script of a dependency runs this clone's interpreter, which sees this censusvi.
    assert (b / ".venv" / "bin" / "ray").read_text().startswith(f"#!{py}\n")

    # Ray workers start from sys.executable: this clone's venv, this clone's censusvi.
    code = """
import ray
ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
         log_to_driver=False)
@ray.remote
def where():
    import sys, censusvi
    return sys.executable, censusvi.__file__
print(*ray.get(where.remote()))
ray.shutdown()
"""
    exe, where = run([py, "-c", code], b, deps_env).split()
    assert (exe, where) == (py, str(b / "platform" / "censusvi" / "__init__.py"))

    # Nothing changed: a no-op.
    t = time.monotonic()
    run(["bash", ".ci/setup-venv"], b, deps_env)
    assert time.monotonic() - t < 15

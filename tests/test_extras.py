"""A command whose extra is missing says which one to install, on one line (censusvi.extras);
the core commands run with every extra missing. A missing package is simulated by a finder that
raises ModuleNotFoundError for it, with its modules taken out of sys.modules for the test."""

from __future__ import annotations

import importlib.abc
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from censusvi import cli
from censusvi.extras import MissingExtra, extra_of, missing_extra, needs_extras, require
from censusvi.model.io import save_model
from conftest import simulated_adata
from test_io import small_model

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
# Every top-level module an extra brings that censusvi imports.
EXTRA_MODULES = (
    "ray",
    "mlflow",
    "tiledbsoma",
    "cellxgene_census",
    "scib_metrics",
    "harmonypy",
    "scanpy",
    "umap",
    "matplotlib",
    "multipart",
    "python_multipart",
    "prometheus_client",
    "starlette",
    "fastapi",
)


class Uninstalled(importlib.abc.MetaPathFinder):
    """A finder that answers for ``names`` (and their submodules) as if they were not installed:
    `import mlflow.tracking` raises ModuleNotFoundError(name='mlflow'), as it does then."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Uninstall ``names`` for the test: forgotten by sys.modules (restored after), and found by
    no finder."""
    for key in [k for k in sys.modules if k.partition(".")[0] in names]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setattr(sys, "meta_path", [Uninstalled(names), *sys.meta_path])


@pytest.mark.parametrize(
    "module,extra",
    [
        ("ray", "ray"),
        ("ray.train.torch", "ray"),
        ("ray.serve", "serve"),
        ("prometheus_client", "serve"),
        ("multipart", "serve"),
        ("mlflow.tracking", "mlflow"),
        ("tiledbsoma.io", "census"),
        ("cellxgene_census", "census"),
        ("scib_metrics", "eval"),
        ("harmonypy", "eval"),
        ("umap", "report"),
        ("matplotlib.pyplot", "report"),
        ("rayx", None),  # a prefix, not the package
        ("faiss", None),  # core: a broken install keeps its traceback
        (None, None),
    ],
)
def test_extra_of(module, extra):
    assert extra_of(module) == extra


def test_models_list_without_mlflow_is_one_line(monkeypatch, capsys):
    block(monkeypatch, "mlflow")
    assert cli.main(["models", "list"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "censusvi: error: censusvi models list needs the 'mlflow' extra: "
        "pip install 'censusvi[mlflow]' (no module named 'mlflow')\n"
    )


def test_serve_without_ray_names_the_serve_extra(monkeypatch, capsys, tmp_path):
    save_model(small_model(), tmp_path / "m")
    block(monkeypatch, "ray")
    assert cli.main(["serve", "--model", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "censusvi: error: censusvi serve needs the 'serve' extra: pip install 'censusvi[serve]'"
    )
    assert err.count("\n") == 1


def test_ingest_without_tiledbsoma_names_the_census_extra(monkeypatch, capsys, tmp_path):
    simulated_adata(20, 10).write_h5ad(tmp_path / "a.h5ad")
    block(monkeypatch, "tiledbsoma")
    assert cli.main(["ingest", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "x.soma")]) == 2
    assert "needs the 'census' extra: pip install 'censusvi[census]'" in capsys.readouterr().err
    assert not (tmp_path / "x.soma").exists()


def test_verbose_keeps_the_traceback(monkeypatch):
    block(monkeypatch, "mlflow")
    with pytest.raises(MissingExtra) as e:
        cli.main(["-v", "models", "list"])
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    assert e.value.extra == "mlflow" and e.value.name == "mlflow"


def test_a_module_of_no_extra_is_not_disguised():
    with pytest.raises(ModuleNotFoundError) as e, needs_extras("censusvi embed"):
        import censusvi_no_such_module  # noqa: F401
    assert not isinstance(e.value, MissingExtra)


def test_a_missing_dependency_of_an_extra_names_that_extra():
    """ray installed without ray[serve]'s web stack: the module that is missing belongs to no
    extra, but it is missing while ray.serve imports."""
    code = compile("raise ModuleNotFoundError('no aiorwlock', name='aiorwlock')", "x.py", "exec")
    try:
        exec(code, {"__name__": "ray.serve._private.proxy"})
    except ModuleNotFoundError as e:
        missing = missing_extra(e, "censusvi serve")
    assert missing is not None
    assert str(missing) == (
        "censusvi serve needs the 'serve' extra: pip install 'censusvi[serve]' "
        "(no module named 'aiorwlock')"
    )


def test_require(monkeypatch):
    require("mlflow", "python -m censusvi.jobs.pretrain")  # installed here: no error
    block(monkeypatch, "mlflow")
    with pytest.raises(MissingExtra, match=r"^python -m censusvi.jobs.pretrain needs the 'mlflow'"):
        require("mlflow", "python -m censusvi.jobs.pretrain")
    block(monkeypatch, "ray")
    with pytest.raises(MissingExtra, match=r"'ray' extra: pip install 'censusvi\[ray\]'"):
        require("ray", "jobs/pretrain.py")
    with pytest.raises(ValueError, match="unknown extra 'gpus'"):
        require("gpus", "x")


def run_blocked(code: str, cwd) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in which no extra's module can be imported."""
    prelude = "\n".join(
        [
            "import importlib.abc, sys",
            inspect.getsource(Uninstalled),
            f"sys.meta_path.insert(0, Uninstalled({EXTRA_MODULES!r}))\n",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PLATFORM), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_process_prints_one_line_and_exits_2(tmp_path):
    r = run_blocked("from censusvi.cli import main\nsys.exit(main(['models', 'list']))", tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        "censusvi: error: censusvi models list needs the 'mlflow' extra: "
        "pip install 'censusvi[mlflow]' (no module named 'mlflow')"
    ]


def test_core_commands_need_no_extra(tmp_path):
    """info, embed, index, annotate, impute on .h5ad files with every extra missing."""
    save_model(small_model(), tmp_path / "m")
    adata = simulated_adata(120, 20)
    adata.var_names = adata.var["gene_ids"]
    adata.write_h5ad(tmp_path / "ref.h5ad")
    query = adata[:40].copy()
    query.obs["batch"] = "new"  # a batch the model has not seen: mapped by surgery
    query.write_h5ad(tmp_path / "q.h5ad")
    r = run_blocked(
        """
        from censusvi.cli import main
        q = ["--model", "m", "--query", "q.h5ad", "--batch-key", "batch", "--quiet"]
        for argv in (
            ["info", "m"],
            ["embed", "--model", "m", "--data", "ref.h5ad", "--out", "e.h5ad", "--quiet"],
            ["index", "--model", "m", "--data", "ref.h5ad", "--label-keys", "cell_type",
             "--out", "ix", "--quiet"],
            ["annotate", *q, "--index", "ix", "--max-epochs", "2", "--out", "a.h5ad"],
            ["impute", *q, "--genes", "G1,G2", "--max-epochs", "2", "--out", "i.h5ad"],
        ):
            assert main(argv) == 0, argv
        assert not any(sys.modules.get(m) for m in EXTRA_MODULES)
        """.replace("EXTRA_MODULES", repr(EXTRA_MODULES)),
        tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for out in ("e.h5ad", "ix", "a.h5ad", "i.h5ad"):
        assert (tmp_path / out).exists(), out

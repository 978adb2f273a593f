"""More of issue #22's CLI rows: a damaged matrix wherever it sits in the file (CSC, raw, layers,
obsp, backed), ``embed --out`` onto a user's .h5ad or the data itself, infinite weights, and no
registry store committed with the code. Each refusal is one ``censusvi: error:`` line, exit 2,
with the user's files as they were."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import censusvi.data.h5ad as h5ad
from censusvi.artifacts import artifact_kind
from censusvi.cli import main
from conftest import simulated_adata
from test_bad_input import assert_nothing_written, pretrain_args, run_cli, write

N_GENES = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moremodel")
    src = write(simulated_adata(n_cells=120, n_genes=N_GENES), d / "ref.h5ad")
    assert main(pretrain_args(src, d / "m") + ["--n-hidden", "16", "--n-latent", "4"]) == 0
    return d / "m"


def query(path: Path) -> str:
    return write(simulated_adata(n_cells=30, n_genes=N_GENES, seed=1), path)


def embed(model, data, out, *options: str) -> list[str]:
    return ["embed", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet",
            *options]  # fmt: skip


def _with(slot: str, fmt: str = "csr"):
    """A query whose ``slot`` (layers['counts'], raw.X, obsp['knn'] or X) holds X's counts."""

    def build(path: Path) -> str:
        a = simulated_adata(n_cells=30, n_genes=N_GENES, seed=1)
        x = a.X.tocsc() if fmt == "csc" else a.X
        if slot == "X":
            a.X = x
        elif slot == "layers/counts":
            a.layers["counts"] = x
        elif slot == "raw/X":
            a.raw = a.copy()
        elif slot == "obsp/knn":
            a.obsp["knn"] = sp.csr_matrix(np.eye(a.n_obs, dtype=np.float32))
        return write(a, path)

    return build


def _set_index(path: str, group: str, value: int) -> None:
    with h5py.File(path, "r+") as f:
        idx = f[f"{group}/indices"][...].astype(np.int64)
        idx[len(idx) // 2] = value
        del f[f"{group}/indices"]
        f[f"{group}/indices"] = idx


@pytest.mark.parametrize(
    ("slot", "fmt", "options", "value", "message"),
    [("X", "csc", [], 10**9, "(X): row index out of range (0..1000000000) for 30 cells"),
     ("X", "csc", [], -1, "(X): row index out of range (-1..29) for 30 cells"),
     ("raw/X", "csr", ["--layer", "raw"], 10**9, "(raw.X): column index out of range (0..1000000000) for 40 genes"),  # noqa: E501
     ("layers/counts", "csr", ["--layer", "counts"], -1, "(layers['counts']): column index out of range (-1..39) for 40 genes"),  # noqa: E501
     ("layers/counts", "csc", [], -1, "(layers['counts']): row index out of range (-1..29) for 30 cells"),  # noqa: E501
     ("obsp/knn", "csr", [], 10**9, "(obsp['knn']): column index out of range (0..1000000000) for 30 cells")],  # noqa: E501
)  # fmt: skip
def test_damaged_matrix_wherever_it_sits(slot, fmt, options, value, message, model, tmp_path, capsys):  # fmt: skip
    """The issue's 1e9 / -1 index: a segfault or an IndexError "depending on where it sits"."""
    src = _with(slot, fmt)(tmp_path / "q.h5ad")
    _set_index(src, slot, value)
    code, err = run_cli(embed(model, src, tmp_path / "o.h5ad", *options), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"censusvi: error: {src} ") and message in err, err
    assert_nothing_written(tmp_path, "o.h5ad")


@pytest.mark.parametrize("value", [10**9, -1])
def test_backed_csc_matrix_with_a_bad_row_index(value, tmp_path, capsys, monkeypatch):
    """Backed (large) files: anndata slices CSC rows through scipy, so the row indices are
    scanned before any row is read."""
    a = simulated_adata()
    a.X = a.X.tocsc()
    src = write(a, tmp_path / "x.h5ad")
    _set_index(src, "X", value)
    monkeypatch.setattr(h5ad, "BACKED_ABOVE_BYTES", -1)
    code, err = run_cli(pretrain_args(src, tmp_path / "m"), capsys)
    assert code == 2 and err.count("\n") == 1, err
    lo, hi = (0, 10**9) if value > 0 else (-1, 299)
    assert f"{src} (X): row index out of range ({lo}..{hi}) for 300 cells" in err, err
    assert_nothing_written(tmp_path, "m")


def test_embed_out_onto_a_users_h5ad_needs_overwrite(model, tmp_path, capsys):
    """An .h5ad censusvi did not write (here the user's other dataset) is not replaced unasked,
    nor moved aside; with --overwrite it is, and the next embed replaces its own output."""
    src = query(tmp_path / "q.h5ad")
    theirs = tmp_path / "theirs.h5ad"
    write(simulated_adata(n_cells=20, n_genes=10, seed=5), theirs)
    before = theirs.read_bytes()
    code, err = run_cli(embed(model, src, theirs), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{theirs} exists and is a file of {len(before)} bytes censusvi did not write" in err
    assert "pass --overwrite to replace it, or choose another --out" in err
    assert theirs.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5ad", "theirs.h5ad"]
    assert run_cli(embed(model, src, theirs, "--overwrite"), capsys)[0] == 0
    assert artifact_kind(theirs) == ".h5ad"
    assert run_cli(embed(model, src, theirs), capsys)[0] == 0  # its own output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5ad", "theirs.h5ad"]


@pytest.mark.parametrize("out", ["the data", "its directory"])
def test_embed_out_is_or_holds_the_data(out, model, tmp_path, capsys):
    """As `pretrain --out DIR` deleted the source: refused even with --overwrite."""
    src = Path(query(tmp_path / "q.h5ad"))
    before = src.read_bytes()
    target = src if out == "the data" else tmp_path
    code, err = run_cli(embed(model, src, target, "--overwrite"), capsys)
    assert code == 2 and err.count("\n") == 1
    expected = f"--out {src} is the input" if out == "the data" else "holds the input"
    assert expected in err and "choose another --out" in err, err
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5ad"]


def test_model_with_an_infinite_weight(model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(model, tmp_path / "m")
    state = load_file(broken / "weights.safetensors")
    state["decoder.scale.weight"][0, 1] = float("-inf")
    save_file(state, broken / "weights.safetensors")
    src = query(tmp_path / "q.h5ad")
    code, err = run_cli(embed(broken, src, tmp_path / "o.h5ad"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{broken}/weights.safetensors: non-finite weights (NaN or inf)" in err
    assert "decoder.scale.weight" in err
    assert_nothing_written(tmp_path, "o.h5ad")


def test_no_registry_store_is_committed():
    """An empty mlflow.db (and its journal) once sat at the repo root: ignored now, and none
    is tracked."""
    ignored = (REPO / ".gitignore").read_text().split()
    assert "mlflow.db*" in ignored and "/mlruns/" in ignored
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [p for p in tracked if Path(p).name.startswith("mlflow.db") or "mlruns/" in p]

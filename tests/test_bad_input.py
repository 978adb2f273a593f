"""Every bad input named in the issue gets one clear error line (exit 2) and leaves nothing behind."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from censusvi.cli import main
from conftest import simulated_adata


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def write(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


def pretrain_args(src: str, out) -> list[str]:
    return [
        "pretrain",
        "--source",
        src,
        "--batch-keys",
        "batch",
        "--n-hvg",
        "0",
        "--max-epochs",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]


def assert_nothing_written(tmp_path, out_name: str) -> None:
    assert not (tmp_path / out_name).exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out_name}")]


def test_log_normalised_counts(tmp_path, capsys):
    a = simulated_adata()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray() / a.X.toarray().sum(1, keepdims=True) * 1e4))
    code, err = run_cli(pretrain_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)
    assert code == 2
    assert "non-integer values" in err and "log-normalised" in err and "layers['counts']" in err
    assert_nothing_written(tmp_path, "m")


def test_counts_layer_is_used_when_asked(tmp_path, capsys):
    a = simulated_adata()
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))
    args = pretrain_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m") + ["--layer", "counts"]
    assert run_cli(args, capsys)[0] == 0


def test_negative_values(tmp_path, capsys):
    a = simulated_adata()
    a.X = sp.csr_matrix(a.X.toarray() - 1.0)
    code, err = run_cli(pretrain_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)
    assert code == 2 and "negative values" in err and "scaled" in err


def test_nan_values(tmp_path, capsys):
    a = simulated_adata()
    x = a.X.toarray()
    x[3, 4] = np.nan
    a.X = sp.csr_matrix(x)
    code, err = run_cli(pretrain_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)
    assert code == 2 and "1 NaN or infinite values" in err


def test_empty_cells_dropped_with_count(tmp_path, capsys, caplog):
    a = simulated_adata()
    x = a.X.toarray()
    x[:7] = 0
    a.X = sp.csr_matrix(x)
    assert run_cli(pretrain_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)[0] == 0
    assert any("zero counts" in r.getMessage() for r in caplog.records)


def test_all_cells_empty(tmp_path, capsys):
    a = simulated_adata()
    a.X = sp.csr_matrix(a.X.shape, dtype=np.float32)
    code, err = run_cli(pretrain_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)
    assert code == 2 and "zero counts" in err
    assert_nothing_written(tmp_path, "m")


def test_missing_batch_column(tmp_path, capsys):
    src = write(simulated_adata(), tmp_path / "x.h5ad")
    args = pretrain_args(src, tmp_path / "m")
    args[args.index("batch")] = "donor_id"
    code, err = run_cli(args, capsys)
    assert code == 2 and "batch column(s) ['donor_id'] not in obs" in err and "'batch'" in err


def test_truncated_file(tmp_path, capsys):
    src = tmp_path / "x.h5ad"
    write(simulated_adata(), src)
    src.write_bytes(src.read_bytes()[:2000])
    code, err = run_cli(pretrain_args(str(src), tmp_path / "m"), capsys)
    assert code == 2 and "truncated" in err


def test_missing_file(tmp_path, capsys):
    code, err = run_cli(pretrain_args(str(tmp_path / "nope.h5ad"), tmp_path / "m"), capsys)
    assert code == 2 and "no such file" in err


def embed_args(model, data: str, out) -> list[str]:
    return ["embed", "--model", str(model), "--data", data, "--out", str(out)]


def test_embed_gene_overlap_below_threshold(sim_model, tmp_path, capsys):
    a = simulated_adata()
    a.var["gene_ids"] = [f"ENSG{i:011d}" if i < 80 else f"OTHER{i}" for i in range(a.n_vars)]
    a.var_names = [f"other{i}" for i in range(a.n_vars)]  # nor do the symbols match
    code, err = run_cli(
        embed_args(sim_model, write(a, tmp_path / "q.h5ad"), tmp_path / "o.h5ad"), capsys
    )
    assert code == 2 and "only 80 of the model's 200 genes (40.0%)" in err
    assert "model ids ~ var['gene_ids']: 80, model ids ~ var_names: 0" in err
    assert not (tmp_path / "o.h5ad").exists()


def test_embed_unknown_batch(sim_model, tmp_path, capsys):
    a = simulated_adata()
    a.obs["batch"] = "lab-x"
    code, err = run_cli(
        embed_args(sim_model, write(a, tmp_path / "q.h5ad"), tmp_path / "o.h5ad"), capsys
    )
    assert code == 2 and "unknown to the model" in err and "censusvi map" in err

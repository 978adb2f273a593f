"""What the command line prints when something the user can fix goes wrong: one line, exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from censusvi import cli
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.io import TrainedModel
from censusvi.model.scvi_tools_io import export_scvi_tools, import_scvi_tools, read_model_pt
from censusvi.model.vae import VAE


def failing(error: Exception):
    def cmd(_args):
        raise error

    return cmd


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def test_mlflow_errors_and_their_subclasses_are_one_line(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException, RestException

    rest = RestException(  # what a tracking server answers; it subclasses MlflowException
        {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model\n  'x' not found"}
    )
    for error in (rest, MlflowException("bad URI:\n\tno scheme\n")):
        monkeypatch.setattr(cli, "cmd_info", failing(error))
        rc, err = run(capsys, "info", "models:/x/1")
        assert rc == 2 and err.count("\n") == 1, err
    assert err == "censusvi: error: bad URI: no scheme\n"
    monkeypatch.setattr(cli, "cmd_info", failing(rest))
    assert run(capsys, "info", "models:/x/1")[1] == (
        "censusvi: error: RESOURCE_DOES_NOT_EXIST: Registered Model 'x' not found\n"
    )


def test_a_multi_line_user_error_prints_as_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_info", failing(ValueError("first\nsecond\n\nthird")))
    assert run(capsys, "info", "m") == (2, "censusvi: error: first second third\n")
    monkeypatch.setattr(cli, "cmd_info", failing(KeyError("no key 'k'\n  in config.json")))
    assert run(capsys, "info", "m") == (2, "censusvi: error: no key 'k' in config.json\n")


def test_other_errors_and_verbose_keep_the_traceback(monkeypatch):
    from mlflow.exceptions import RestException

    monkeypatch.setattr(cli, "cmd_info", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info", "m"])
    monkeypatch.setattr(cli, "cmd_info", failing(RestException({"message": "denied"})))
    with pytest.raises(RestException):
        cli.main(["--verbose", "info", "m"])


def tiny_scvi_tools_dir(path: Path) -> Path:
    """An scvi-tools directory exported from an untrained model (no scvi-tools needed)."""
    cfg = ModelConfig(n_genes=6, n_batches=2, n_hidden=8, n_latent=2, n_layers=1)
    m = TrainedModel(
        VAE(cfg), GeneVocabulary(tuple(f"ENSG{i:011d}" for i in range(6))), ("batch",), ("a", "b")
    )
    return export_scvi_tools(m, path)


def test_non_finite_scvi_tools_weights_are_refused(tmp_path, capsys):
    src = tiny_scvi_tools_dir(tmp_path / "scvi")
    assert import_scvi_tools(src).config.n_latent == 2  # finite: imports
    d = read_model_pt(src)
    name = "decoder.px_scale_decoder.0.weight"  # scvi-tools' name for the decoder's output layer
    d["model_state_dict"][name][0, 0] = math.nan
    d["model_state_dict"][name][1, 0] = math.inf
    torch.save(d, src / "model.pt")
    with pytest.raises(ValueError, match=rf"non-finite weights .* {name} \(2 of"):
        import_scvi_tools(src)
    rc, err = run(capsys, "import-scvi-tools", str(src), "--out", str(tmp_path / "m"))
    assert rc == 2 and err.count("\n") == 1
    assert (
        err.startswith(f"censusvi: error: {src / 'model.pt'}: non-finite weights") and name in err
    )
    assert not (tmp_path / "m").exists()

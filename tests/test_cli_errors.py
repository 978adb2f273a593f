"""What the command line prints when something the user can fix goes wrong: one line, exit 2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from censusvi import cli
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.io import TrainedModel
from censusvi.model.scvi_tools_io import export_scvi_tools, import_scvi_tools, read_model_pt
from censusvi.model.vae import VAE

ROOT = Path(__file__).resolve().parents[1]


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
        monkeypatch.setattr(cli.commands, "cmd_info", failing(error))
        rc, err = run(capsys, "info", "models:/x/1")
        assert rc == 2 and err.count("\n") == 1, err
    assert err == "censusvi: error: bad URI: no scheme\n"
    monkeypatch.setattr(cli.commands, "cmd_info", failing(rest))
    assert run(capsys, "info", "models:/x/1")[1] == (
        "censusvi: error: RESOURCE_DOES_NOT_EXIST: Registered Model 'x' not found\n"
    )


def test_a_multi_line_user_error_prints_as_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli.commands, "cmd_info", failing(ValueError("first\nsecond\n\nthird")))
    assert run(capsys, "info", "m") == (2, "censusvi: error: first second third\n")
    monkeypatch.setattr(cli.commands, "cmd_info", failing(KeyError("no key 'k'\n  in config.json")))
    assert run(capsys, "info", "m") == (2, "censusvi: error: no key 'k' in config.json\n")


def test_other_errors_and_verbose_keep_the_traceback(monkeypatch):
    from mlflow.exceptions import RestException

    monkeypatch.setattr(cli.commands, "cmd_info", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info", "m"])
    monkeypatch.setattr(cli.commands, "cmd_info", failing(RestException({"message": "denied"})))
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


def test_pretrain_job_logs_to_the_store_the_cli_reads(tmp_path, monkeypatch, capsys):
    """Without MLFLOW_TRACKING_URI the job's run goes where `censusvi models list` looks from the
    same directory (sqlite:///./mlruns/mlflow.db), not beside the model."""
    from censusvi.registry import mlflow_store
    from censusvi.train import ray_trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    history = SimpleNamespace(epochs=[SimpleNamespace(val_elbo=1.0)])
    monkeypatch.setattr("censusvi.ray_session.init_ray", lambda: None)
    monkeypatch.setattr(ray_trainer, "pretrain_distributed", lambda *a, **k: (object(), history))
    logged = []
    monkeypatch.setattr(
        mlflow_store,
        "log_and_register",
        lambda m, h, out, uri, name: logged.append(uri) or ("r", "1"),
    )
    (tmp_path / "c.yaml").write_text("data: {source: x.h5ad}\nout: runs/deep/model\n")
    spec = importlib.util.spec_from_file_location("job_pretrain", ROOT / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(tmp_path / "c.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    default = f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert logged == [default] and printed["tracking_uri"] == default
    assert mlflow_store.tracking_uri() == default  # what every censusvi command opens


def test_scvi_tools_weights_of_another_shape_or_no_model_at_all(tmp_path, capsys):
    """A model.pt whose var_names or attr_dict disagree with its weights (even one naming 1e12
    latents) is one line naming the tensors, nothing allocated; a file that is no PyTorch file
    never gets torch's advice to load it unsafely."""
    src = tiny_scvi_tools_dir(tmp_path / "scvi")
    d = read_model_pt(src)
    d["var_names"] = d["var_names"][:-1]
    torch.save(d, src / "model.pt")
    rc, err = run(capsys, "import-scvi-tools", str(src), "--out", str(tmp_path / "m"))
    assert rc == 2 and "do not fit the architecture in its attr_dict and var_names" in err, err
    d = read_model_pt(tiny_scvi_tools_dir(tmp_path / "scvi2"))
    d["attr_dict"]["init_params_"]["non_kwargs"]["n_latent"] = 10**12
    torch.save(d, tmp_path / "scvi2" / "model.pt")
    rc, err = run(
        capsys, "import-scvi-tools", str(tmp_path / "scvi2"), "--out", str(tmp_path / "m")
    )
    assert rc == 2 and f"{tmp_path / 'scvi2' / 'model.pt'}: its attr_dict: " in err, err
    assert "n_latent=1000000000000" in err and "parameters" in err and "over the 1e+09" in err
    for odd, says in [(5, "it holds a int"), ({**d, "attr_dict": [1]}, "its attr_dict is a list")]:
        torch.save(odd, tmp_path / "scvi2" / "model.pt")  # tracebacks before
        rc, err = run(
            capsys, "import-scvi-tools", str(tmp_path / "scvi2"), "--out", str(tmp_path / "m")
        )
        assert rc == 2 and says in err, err
    (tmp_path / "scvi2" / "model.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    rc, err = run(
        capsys, "import-scvi-tools", str(tmp_path / "scvi2"), "--out", str(tmp_path / "m")
    )
    assert rc == 2 and "the file is truncated or not a torch file" in err, err
    (tmp_path / "x.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    rc, err = run(
        capsys, "import-scvi-tools", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "m")
    )
    assert rc == 2 and "weights_only" not in err and "without running code" in err, err
    assert not (tmp_path / "m").exists()


def test_sigterm_unwinds_the_command_like_ctrl_c():
    """Kubernetes stops a job with SIGTERM: inside a command it raises KeyboardInterrupt, so
    the command's finally blocks (its temporaries) run; the handler is restored after."""
    import os
    import signal

    cleaned = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), cli.stopped_cleanly():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before kill returns
        finally:
            cleaned.append(True)
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) is before


def test_info_says_what_is_wrong_with_the_path_and_shows_provenance_inert(tmp_path, capsys):
    """No such folder, a file, an empty path: each says so. Provenance text (the model's maker
    chose it) is printed with its escapes visible, and --json stays strict JSON."""
    rc, err = run(capsys, "info", str(tmp_path / "nope"))
    assert rc == 2 and "does not exist: give a censusvi model directory" in err, err
    (tmp_path / "f").write_text("x")
    rc, err = run(capsys, "info", str(tmp_path / "f"))
    assert rc == 2 and "is a file" in err, err
    assert run(capsys, "info", "")[1].startswith("censusvi: error: an empty model path")
    cfg = ModelConfig(n_genes=6, n_batches=2, n_hidden=8, n_latent=2, n_layers=1)
    genes = GeneVocabulary(tuple(f"G{i}" for i in range(6)))
    model = TrainedModel(VAE(cfg), genes, ("b",), ("x", "y"), provenance={
        "note": "\x1b[2J\nrm -rf", "loss": math.nan})  # fmt: skip
    model.save(tmp_path / "m")
    assert cli.main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\nrm -rf" in out, out
    assert cli.main(["info", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["loss"] is None


def test_a_reader_that_leaves_early_ends_the_command_quietly(sim_model):
    """`censusvi info m --json | head -1` printed a BrokenPipeError traceback; like any Unix
    filter it now stops with SIGPIPE's status and says nothing."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "censusvi.cli", "info", str(sim_model), "--json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # long before the command has imported torch and written anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize(
    "device, says",
    [("tpu", "give cpu, cuda or cuda:N"), ("cuda:99", "cuda:99"), ("mps", "torch cannot use mps")],
)
def test_pretrain_on_a_device_this_machine_lacks_is_refused_first(tmp_path, capsys, device, says):
    """`pretrain --device tpu` (or a GPU index past the machine's) failed in torch's traceback
    after the data were read; it is now one line before any work, and nothing is written."""
    from conftest import simulated_adata

    simulated_adata(n_cells=50).write_h5ad(tmp_path / "d.h5ad")
    argv = ["pretrain", "--source", str(tmp_path / "d.h5ad"), "--batch-keys", "batch", "--out",
            str(tmp_path / "m"), "--max-epochs", "1", "--quiet", "--device", device]  # fmt: skip
    rc, err = run(capsys, *argv)
    assert rc == 2 and f"device {device!r}: " in err and says in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.checkpoint").exists()


@pytest.mark.parametrize("port, says", [("99999", "99999 is not a port"), ("x", "'x' is not")])
def test_serve_port_out_of_range_is_an_argument_error(capsys, port, says):
    """`serve --port 99999` started Ray and ended in a Serve traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model", "m", "--port", port])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --port: {says}" in err, err


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", "abc"])
def test_a_seed_out_of_range_names_the_flag(capsys, seed):
    """`finetune --seed -1` said "expected non-negative integer", naming nothing."""
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", "m", "--data", "d", "--labels-key", "k", "--out", "o",
                  "--seed", seed])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed:" in err, err


def test_a_symbolic_link_loop_is_one_line_as_input_or_output(tmp_path, capsys):
    """Python 3.11's pathlib raises RuntimeError on a link loop: a traceback from the check that
    --out is not an input."""
    loop = tmp_path / "loop.h5ad"
    loop.symlink_to(loop.name)
    for data, out in ((loop, tmp_path / "o.h5ad"), (tmp_path / "x.h5ad", loop)):
        rc, err = run(capsys, "embed", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                      str(out))  # fmt: skip
        assert (rc, err) == (2, f"censusvi: error: {loop}: cannot follow its symbolic links "
                             f"(Symlink loop from '{loop}'): name the file itself\n")  # fmt: skip


def test_pretrain_batch_keys_given_empty_are_refused_not_defaulted(tmp_path, capsys):
    """`--batch-keys "$KEYS"` with KEYS unset trained with the Census's four batch keys."""
    from conftest import simulated_adata

    simulated_adata(n_cells=60, n_genes=20).write_h5ad(tmp_path / "x.h5ad")
    rc, err = run(capsys, "pretrain", "--source", str(tmp_path / "x.h5ad"), "--batch-keys", "",
                  "--out", str(tmp_path / "m"))  # fmt: skip
    assert rc == 2 and "batch_keys is empty" in err and not (tmp_path / "m").exists()


def test_an_output_given_empty_is_refused_not_skipped(sim_model, tmp_path, capsys, monkeypatch):
    """`--save-model "$DIR"` with DIR unset mapped and saved nothing, silently; an empty --out
    was read as the current directory and refused for holding an input."""
    monkeypatch.chdir(tmp_path)
    ref = sim_model.parent / "ref.h5ad"
    rc, err = run(capsys, "map", "--model", str(sim_model), "--query", str(ref), "--batch-key",
                  "batch", "--out", "q.h5ad", "--save-model", "")  # fmt: skip
    assert (rc, err) == (2, "censusvi: error: --save-model is empty: give the path to write\n")
    rc, err = run(capsys, "embed", "--model", str(sim_model), "--data", str(ref), "--out", " ")
    assert (rc, err) == (2, "censusvi: error: --out is empty: give the path to write\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri", ["models:/m1", "models:/m1/", "models:/@prod", "models:/m1@"])
def test_a_registry_uri_of_another_form_says_which_forms_there_are(capsys, uri):
    """MLflow 3 reads models:/m1 as a logged model's id: "Logged model with ID 'm1' not found"
    said nothing of the NAME/VERSION the user left out. The form is checked before MLflow."""
    rc, err = run(capsys, "info", uri)
    assert (rc, err) == (2, f"censusvi: error: {uri!r} is not models:/NAME/VERSION or "
                         "models:/NAME@ALIAS: e.g. models:/censusvi-scvi/1\n")  # fmt: skip


def test_a_file_uri_output_is_written_at_its_path_another_scheme_refused(
    sim_model, tmp_path, capsys, monkeypatch
):
    """Inputs take file:// URIs (tiledbsoma reads them); --out file:///x.h5ad was written to
    ./file:/x.h5ad under the current directory, and ingest's --out left such a tree and a
    TileDB traceback. A file:// output is now its path; s3:// is refused in one line."""
    monkeypatch.chdir(tmp_path)
    ref = sim_model.parent / "ref.h5ad"
    out = tmp_path / "sub" / "e.h5ad"
    out.parent.mkdir()
    rc, err = run(capsys, "embed", "--model", str(sim_model), "--data", str(ref), "--out",
                  out.as_uri(), "--quiet")  # fmt: skip
    assert rc == 0 and out.is_file(), err
    rc, err = run(capsys, "ingest", str(ref), "--out", (tmp_path / "x.soma").as_uri(), "--quiet")
    assert rc == 0 and (tmp_path / "x.soma").is_dir(), err
    rc, err = run(capsys, "embed", "--model", str(sim_model), "--data", str(ref), "--out",
                  "s3://bucket/e.h5ad")  # fmt: skip
    assert (rc, err) == (2, "censusvi: error: --out s3://bucket/e.h5ad: the command line writes "
                         "local files; give a path here, then copy the output where it should go\n")  # fmt: skip
    rc, err = run(capsys, "embed", "--model", str(sim_model), "--data", str(ref), "--out",
                  "file://host/e.h5ad")  # fmt: skip
    assert rc == 2 and "a file URI names a path on this machine, file:///PATH" in err
    rc, err = run(capsys, "embed", "--model", str(sim_model), "--data",
                  (tmp_path / "x.soma").as_uri(), "--out", str(tmp_path / "x.soma" / "e.h5ad"))  # fmt: skip
    assert rc == 2 and "is inside the input file://" in err, err  # a file:// input is a path too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "x.soma"]

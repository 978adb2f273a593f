"""The model registry: versions carry model + index + evaluation; promotion is gated; rollback."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from censusvi.annotate.index import save_index
from censusvi.annotate.pipeline import index_reference
from censusvi.cli import main
from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.model.io import load_model
from censusvi.registry.mlflow_store import (
    HTTP_DEFAULTS,
    RegistryUnreachable,
    tracking_uri,
    use_tracking,
)
from censusvi.registry.versions import (
    alias_holder,
    compare_metrics,
    fetch_version,
    list_versions,
    register_version,
    resolve_version,
)
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain
from conftest import simulated_adata

ROOT = Path(__file__).resolve().parents[1]


def small_model_and_index(tmp_path, name: str, seed: int, epochs: int = 5):
    a = simulated_adata(n_cells=400, n_batches=3, seed=1)
    a.write_h5ad(tmp_path / "ref.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(tmp_path / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(schedule="census", max_epochs=epochs, lr=1e-2, batch_size=64, seed=seed),
    )
    model, _ = pretrain(cfg, tmp_path / f"m-{name}", quiet=True)
    ix = index_reference(model, tmp_path / "ref.h5ad", ["cell_type"])
    save_index(ix, tmp_path / f"ix-{name}")
    return tmp_path / f"m-{name}", tmp_path / f"ix-{name}"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gate_compares_in_the_right_direction():
    holder = {"eval.cell_type.accuracy": 0.9, "eval.cell_type.ece": 0.05}
    assert (
        compare_metrics({"eval.cell_type.accuracy": 0.95, "eval.cell_type.ece": 0.04}, holder) == []
    )
    worse = compare_metrics({"eval.cell_type.accuracy": 0.8, "eval.cell_type.ece": 0.09}, holder)
    assert len(worse) == 2 and "0.8000 vs 0.9000" in worse[0] and "lower is better" in worse[1]
    assert compare_metrics({"eval.cell_type.accuracy": 0.89}, holder, tolerance=0.02) == []


def test_register_promote_gate_rollback_and_load(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    good_model, good_index = small_model_and_index(tmp_path, "good", seed=0, epochs=8)
    bad_model, _ = small_model_and_index(tmp_path, "bad", seed=1, epochs=8)
    # A deliberately poor index for the bad model: labels shuffled, so its held-out accuracy drops.
    ix_meta = json.loads((good_index / "index.json").read_text())
    assert ix_meta["evaluation"]["cell_type"]["accuracy"] > 0.9  # the index evaluated itself
    from censusvi.annotate.index import build_index

    ref = H5adSource(tmp_path / "ref.h5ad")
    bad = load_model(bad_model)
    pos, z, _ = latent_representation(bad, ref)
    labels = ref.obs.iloc[pos][["cell_type"]].astype(str)
    labels["cell_type"] = np.random.default_rng(0).permutation(labels["cell_type"].to_numpy())
    from censusvi.annotate.pipeline import holdout_evaluation

    meta = {"evaluation": holdout_evaluation(z, labels)}
    save_index(build_index(z, labels, meta), tmp_path / "ix-bad")

    rc, out, _ = run_cli(capsys, "models", "register", str(good_model), "--index", str(good_index))
    assert rc == 0 and out.strip() == "1"  # a contract: the version number alone
    rc, out, _ = run_cli(
        capsys, "models", "register", str(bad_model), "--index", str(tmp_path / "ix-bad")
    )
    assert out.strip() == "2"
    assert (
        run_cli(capsys, "models", "promote", "censusvi-scvi", "1", "--alias", "production")[0] == 0
    )
    rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "2", "--alias", "production")
    assert (
        rc == 2 and "eval.cell_type.accuracy" in err and "--force" in err
    )  # refused, with numbers
    rc, out, _ = run_cli(capsys, "models", "list", "--json")
    rows = {r["version"]: r for r in json.loads(out)}
    assert rows["1"]["aliases"] == ["production"] and rows["2"]["aliases"] == []
    assert (
        rows["2"]["metrics"]["eval.cell_type.accuracy"]
        < rows["1"]["metrics"]["eval.cell_type.accuracy"]
    )

    assert run_cli(capsys, "models", "promote", "censusvi-scvi", "2", "--force")[0] == 0
    z_prod = latent_representation(load_model("models:/censusvi-scvi@production"), ref)[1]
    np.testing.assert_array_equal(z_prod, z)  # the alias serves version 2 now
    rc, out, _ = run_cli(capsys, "models", "rollback", "censusvi-scvi")
    assert rc == 0 and out.strip().endswith("-> 1")
    files = fetch_version("censusvi-scvi", "1", tmp_path / "dl")
    assert files.index_dir is not None and (files.index_dir / "labels.parquet").is_file()
    # A Serve replica downloads only what it reads: the mapper the weights, the annotator the index.
    weights = fetch_version("censusvi-scvi", "1", tmp_path / "dl-model", index=False)
    assert (weights.model_dir / "config.json").is_file() and weights.index_dir is None
    assert not list((tmp_path / "dl-model").rglob("index.json"))
    ix_only = fetch_version("censusvi-scvi", "1", tmp_path / "dl-index", model=False)
    assert ix_only.model_dir is None and (ix_only.index_dir / "index.json").is_file()
    assert not list((tmp_path / "dl-index").rglob("weights.safetensors"))  # no model weights
    z_good = latent_representation(load_model(good_model), ref)[1]
    z_rolled = latent_representation(load_model("models:/censusvi-scvi@production"), ref)[1]
    np.testing.assert_array_equal(z_rolled, z_good)
    rc, _, err = run_cli(capsys, "models", "rollback", "censusvi-scvi")
    assert rc == 2 and "no earlier version" in err
    promote_job = load_job("promote")  # the Ray-job entry point applies the same gate
    assert promote_job.main(["--version", "2"]) == 3
    assert "refused: version 2 is worse" in capsys.readouterr().err
    assert promote_job.main(["--version", "2", "--force"]) == 0
    assert promote_job.main(["--rollback"]) == 0
    assert capsys.readouterr().out.strip().endswith("-> version 1")


def test_register_refuses_an_index_of_another_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_dir, index_dir = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    from censusvi.annotate.index import build_index

    labels = simulated_adata(n_cells=50).obs[["cell_type"]]
    save_index(build_index(np.zeros((50, 7), np.float32), labels), tmp_path / "ix7")
    rc, _, err = run_cli(
        capsys, "models", "register", str(model_dir), "--index", str(tmp_path / "ix7")
    )
    assert rc == 2 and "7-d embeddings" in err
    _, other_index = small_model_and_index(tmp_path, "b", seed=1, epochs=1)  # same shapes
    rc, _, err = run_cli(capsys, "models", "register", str(model_dir), "--index", str(other_index))
    assert rc == 2 and "was built with another model" in err, err
    rc, out, _ = run_cli(capsys, "models", "list")
    assert rc == 0 and "censusvi-scvi" not in out, out  # nothing registered by the refusals
    rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "9")
    assert (
        rc == 2
        and "censusvi: error: Model Version (name=censusvi-scvi, version=9) not found" in err
    )
    with pytest.raises(SystemExit):
        main(["models", "promote"])


def promote_job_main(argv: list[str]) -> int:
    return load_job("promote").main(argv)


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_registry_fails_fast_with_one_line_naming_it(monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key, value in HTTP_DEFAULTS.items():  # use_tracking sets them; restored after the test
        monkeypatch.setenv(key, value)
    for argv in (
        ["models", "list"],
        ["models", "promote", "censusvi-scvi", "1"],
        ["models", "rollback", "censusvi-scvi"],
        ["info", "models:/censusvi-scvi@production"],
    ):
        start = time.monotonic()
        rc, out, err = run_cli(capsys, *argv)
        elapsed = time.monotonic() - start
        assert rc == 2 and out == "", argv
        assert err.startswith(f"censusvi: error: cannot reach the MLflow store at {uri}: "), err
        assert "Connection refused" in err and err.count("\n") == 1, err  # one line
        assert elapsed < 15, f"{argv}: {elapsed:.1f} s"  # MLflow's own retries took ~250 s
    assert promote_job_main(["--version", "1"]) == 2
    assert f"error: cannot reach the MLflow store at {uri}" in capsys.readouterr().err


def test_promotion_fails_closed_when_the_alias_lookup_fails(tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(use_tracking())
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=(tmp_path / "artifacts").as_uri())
    assert alias_holder("m", "production") is None  # the store says: not set
    client.set_registered_model_alias("m", "production", "1")

    def refused(*args, **kwargs):  # what MLflow raises when the server stops answering
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            raise MlflowException(
                "API request to http://mlflow:5000/api/2.0/mlflow/registered-models/alias "
                "failed with exception HTTPConnectionPool(host='mlflow', port=5000): Max retries "
                "exceeded"
            ) from None

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", refused)
    with pytest.raises(RegistryUnreachable, match="Connection refused"):
        alias_holder("m", "production")  # not "not set"
    rc, _, err = run_cli(capsys, "models", "promote", "m", "2")
    (line,) = [x for x in err.splitlines() if x.startswith("censusvi: error:")]  # one line
    assert rc == 2 and "m@production was not moved to version 2" in line, err
    assert "metrics gate" in line and "Connection refused" in line
    assert promote_job_main(["--name", "m", "--version", "2"]) == 3
    assert "refused: m@production was not moved" in capsys.readouterr().err

    def denied(*args, **kwargs):  # any other failure: not "not set" either
        raise MlflowException("Permission denied", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", denied)
    rc, _, err = run_cli(capsys, "models", "promote", "m", "2", "--force")
    assert rc == 2 and "was not moved" in err and "Permission denied" in err
    monkeypatch.undo()
    assert alias_holder("m", "production", f"sqlite:///{tmp_path / 'mlflow.db'}") == "1"


def test_without_a_tracking_uri_every_command_uses_one_store(tmp_path, monkeypatch, capsys):
    model_dir, _ = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert tracking_uri() == default
    rc, out, _ = run_cli(capsys, "models", "register", str(model_dir))
    assert rc == 0 and out.strip() == "1"
    rc, out, err = run_cli(capsys, "info", "models:/censusvi-scvi/1", "--json")
    assert rc == 0, err
    assert json.loads(out)["n_genes"] == len(load_model(model_dir).genes)
    assert run_cli(capsys, "models", "promote", "censusvi-scvi", "1")[0] == 0
    assert run_cli(capsys, "info", "models:/censusvi-scvi@production")[0] == 0
    assert (tmp_path / "mlruns" / "mlflow.db").is_file() and not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ValueError, match=f"censusvi-scvi@staging is not set in {default}"):
        resolve_version("models:/censusvi-scvi@staging")  # says which store it looked in


def test_models_help_names_the_default_store(capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0
    assert "MLFLOW_TRACKING_URI" in out and "sqlite:///./mlruns/mlflow.db" in out


def test_promotion_refuses_a_version_that_does_not_load_and_a_bad_tolerance(
    tmp_path, monkeypatch, capsys
):
    """Registered by hand (a CSV where the model should be): promote says it does not load,
    even with --force, and the alias stays; a NaN or negative --tolerance is one line."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_dir, _ = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    rc, _, err = run_cli(capsys, "models", "register", str(model_dir))
    assert rc == 0, err
    assert run_cli(capsys, "models", "promote", "censusvi-scvi", "1")[0] == 0
    client = MlflowClient(use_tracking())
    junk = tmp_path / "junk" / "model"
    junk.mkdir(parents=True)
    (junk / "table.csv").write_text("a,b\n1,2\n")
    client.create_model_version("censusvi-scvi", source=junk.parent.as_uri())
    rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "2", "--force")
    assert rc == 2 and "version 2 of censusvi-scvi does not load as a model" in err, err
    assert alias_holder("censusvi-scvi", "production") == "1"
    for bad in ("nan", "-0.1"):
        rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "1", "--tolerance", bad)
        assert rc == 2 and "must be a number >= 0" in err, err
    weights = model_dir / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, _, err = run_cli(capsys, "models", "register", str(model_dir))
    assert rc == 2 and "weights.safetensors" in err, err


def test_listing_a_store_that_does_not_exist_creates_nothing(tmp_path, monkeypatch, capsys):
    """A mistyped sqlite URI used to create its folders and list nothing in silence."""
    store = tmp_path / "typo" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    rc, out, err = run_cli(capsys, "models", "list")
    assert rc == 0 and out == "" and "no registered versions in" in err and "(no such file)" in err
    assert not (tmp_path / "typo").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store, ./mlruns, is not made either
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "models", "list")
    assert rc == 0 and "(no such file)" in err and not (tmp_path / "mlruns").exists()


def test_a_store_file_that_is_not_a_database_is_one_line(tmp_path, monkeypatch, capsys):
    """A URI naming some other file (a typo, a CSV) failed in SQLAlchemy's traceback; it is now
    one line, and the file is untouched."""
    for name, content in (("notes.txt", b"hello\n"), ("junk.db", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(content)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / name}")
        for args in (("list",), ("promote", "censusvi-scvi", "1")):
            rc, _, err = run_cli(capsys, "models", *args)
            assert rc == 2 and f"{tmp_path / name} is not a SQLite database" in err, err
            assert len(err.strip().splitlines()) == 1
        assert (tmp_path / name).read_bytes() == content


def test_an_alias_mlflow_would_refuse_is_blamed_on_its_name(tmp_path, monkeypatch, capsys):
    """`promote --alias ../../x` said the alias's version "could not be read"; the name is now
    checked first, by MLflow's own rules, and nothing moves."""
    model_dir, _ = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run_cli(capsys, "models", "register", str(model_dir))[0] == 0
    for alias, says in [("../../x", "Names may only contain"), ("latest", "reserved"), ("", "")]:
        rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "1", "--alias", alias)
        assert rc == 2 and f"--alias {alias!r}:" in err and says in err, err
    assert alias_holder("censusvi-scvi", "production") is None


def test_a_retried_promote_leaves_rollback_its_previous_version(tmp_path, monkeypatch, capsys):
    """A promote retried (a CI step run twice), or given '01' for 1, appended the holder to the
    alias history again: the next rollback moved production from 2 to 2 and said it had. And a
    model named with an apostrophe broke `models list` for the whole registry."""
    model_dir, index_dir = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for _ in range(2):
        assert run_cli(capsys, "models", "register", str(model_dir), "--index", str(index_dir))[0] == 0  # fmt: skip
    for version in ("1", "01", "2", "2"):
        rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", version, "--force")
        assert rc == 0, err
    assert alias_holder("censusvi-scvi", "production") == "2"
    rc, out, _ = run_cli(capsys, "models", "rollback", "censusvi-scvi")
    assert rc == 0 and alias_holder("censusvi-scvi", "production") == "1", out
    assert run_cli(capsys, "models", "rollback", "censusvi-scvi")[0] == 2  # 1 was the first
    for name in ("bob's-model", 'say "hi"', "both'\""):
        assert run_cli(capsys, "models", "register", str(model_dir), "--name", name)[0] == 0
    rc, out, err = run_cli(capsys, "models", "list")
    assert rc == 0, err
    listed = [line.split("\t")[:2] for line in out.splitlines()]
    assert {"bob's-model", 'say "hi"', "both'\"", "censusvi-scvi"} <= {n for n, _ in listed}


def test_the_alias_check_leaves_the_name_to_the_store_when_mlflow_moves_its_validators(
    monkeypatch,
):
    """check_alias reads MLflow's private validators: a release without them must not turn
    every promote into an ImportError traceback."""
    import mlflow.utils.validation as validation

    from censusvi.registry.versions import check_alias

    with pytest.raises(ValueError, match="reserved"):
        check_alias("latest")
    monkeypatch.delattr(validation, "_validate_model_alias_name")
    assert check_alias("latest") is None  # the store's own check answers instead


def test_register_uploads_the_models_own_files_and_never_a_link(
    tmp_path, monkeypatch, capsys, caplog
):
    """`register` uploaded the whole folder: a stray file, or a link to a secret placed in a
    model directory someone handed over, went to the shared store. Now only the files of the
    model and index formats go; a link among them is one line, and nothing is registered."""
    import mlflow

    model_dir, index_dir = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("api-key-123")
    (model_dir / "notes.txt").symlink_to(secret)  # not a model file: left out
    (index_dir / ".DS_Store").write_text("x")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc, out, err = run_cli(capsys, "models", "register", str(model_dir), "--index", str(index_dir))
    assert rc == 0 and out.strip() == "1", err
    assert "not registered (not part of a censusvi model): ['notes.txt']" in caplog.text
    mlflow.set_tracking_uri(uri)
    listed = {
        f.path for d in ("model", "index") for f in mlflow.artifacts.list_artifacts(
            artifact_uri=f"models:/censusvi-scvi/1/{d}")
    }  # fmt: skip
    assert listed == {"model/config.json", "model/weights.safetensors", "index/index.faiss",
                      "index/index.json", "index/labels.parquet", "index/heads.safetensors"}  # fmt: skip
    weights = model_dir / "weights.safetensors"
    weights.rename(tmp_path / "w.safetensors")
    weights.symlink_to(tmp_path / "w.safetensors")  # loads, but is a link
    rc, _, err = run_cli(capsys, "models", "register", str(model_dir))
    assert rc == 2 and f"{weights} is a link" in err, err
    assert [v["version"] for v in list_versions("censusvi-scvi")] == ["1"]


def test_an_index_attached_later_must_fit_the_version(tmp_path, monkeypatch):
    """add_to_version (the embedding job's attach step) uploaded any index: Serve trusts a
    registered version's index, so another model's is refused here, as `register` refuses it."""
    from censusvi.registry.versions import add_to_version

    model_a, _ = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    _, index_b = small_model_and_index(tmp_path, "b", seed=1, epochs=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert register_version(model_a, None) == "1"
    with pytest.raises(ValueError, match=r"was built with another model .*censusvi-scvi/1"):
        add_to_version("models:/censusvi-scvi/1", {}, index_b, uri)
    assert list_versions("censusvi-scvi")[0]["has_index"] == "false"

"""jobs/embed.py: Ray Data actors embed a SOMA corpus shard by shard; the index lands on the version."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from censusvi.annotate.index import load_index
from censusvi.annotate.pipeline import index_reference
from censusvi.model.io import load_model
from censusvi.registry.versions import fetch_version, register_version, version_metrics
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]


def test_embed_job_matches_censusvi_index_and_makes_the_version_servable(
    local_ray, soma_exp, tmp_path, monkeypatch, capsys
):
    exp = str(soma_exp[0])
    cfg = PretrainConfig(
        DataConfig(source=exp, batch_keys=("dataset_id",), n_hvg=500),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(schedule="census", max_epochs=2, lr=1e-2, batch_size=256, seed=0),
    )
    model, _ = pretrain(cfg, tmp_path / "m", quiet=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert register_version(tmp_path / "m", None, "censusvi-embed") == "1"

    spec = importlib.util.spec_from_file_location("embed_job", ROOT / "jobs" / "embed.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--model", "models:/censusvi-embed/1", "--data", exp, "--label-keys", "cell_type",
            "--out", (tmp_path / "out").as_uri(), "--shard-cells", "1000", "--actors", "2",
            "--index-kind", "flat"]  # fmt: skip
    assert job.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    expected = index_reference(load_model(tmp_path / "m"), exp, ["cell_type"])
    # every cell is embedded (four Ray Data shards); Kang's, labelled "unknown", are not indexed
    assert printed["n_cells"] == expected.meta["n_cells"] > 1000
    assert printed["kind"] == "flat"
    shards = sorted((tmp_path / "out" / "embeddings").glob("*.parquet"))  # written via file://
    assert len(shards) >= 1 and printed["index"] == (tmp_path / "out").as_uri() + "/index"
    columns = pq.read_schema(shards[0]).names
    assert sum(pq.read_metadata(f).num_rows for f in shards) > 3000
    assert {"soma_joinid", "latent", "cell_type"} <= set(columns) and "obs_id" not in columns
    ours = load_index(tmp_path / "out" / "index")
    z_job = ours.index.reconstruct_n(0, ours.index.ntotal)
    z_ref = expected.index.reconstruct_n(0, expected.index.ntotal)
    np.testing.assert_allclose(z_job, z_ref, atol=1e-5)  # same cells, same order, same latent
    assert ours.labels["cell_type"].tolist() == expected.labels["cell_type"].tolist()
    # what makes the default method and the out-of-reference detection work at corpus scale
    assert ours.meta["encoder_digest"] == expected.meta["encoder_digest"]
    assert ours.heads["cell_type"].classes.tolist() == expected.heads["cell_type"].classes.tolist()
    ece = [ix.meta["heads"]["cell_type"]["ece_after"] for ix in (ours, expected)]
    assert abs(ece[0] - ece[1]) <= 0.02, ece  # the same recipe on the same latents
    assert ours.meta["novelty"]["n_cells"] == expected.meta["novelty"]["n_cells"]
    assert set(ours.meta["novelty"]["keys"]["cell_type"]) == set(
        expected.meta["novelty"]["keys"]["cell_type"]
    )
    assert printed["model_version"] == "1"
    files = fetch_version("censusvi-embed", "1", tmp_path / "dl")  # the version is servable now
    assert (
        files.index_dir is not None
        and load_index(files.index_dir).meta["n_cells"] == printed["n_cells"]
    )
    assert "eval.cell_type.accuracy" in version_metrics("censusvi-embed", "1")

    # A second run into the same --out appended its shards to the first's and indexed both.
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    assert e.value.code == 2
    assert (
        "already holds embeddings/: pass --overwrite to replace an earlier run's"
        in capsys.readouterr().err
    )
    assert len(sorted((tmp_path / "out" / "embeddings").glob("*.parquet"))) == len(shards)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shard-cells", "0"], "--shard-cells 0: must be a whole number >= 1"),
        (["--actors", "-3"], "--actors -3: must be a whole number >= 1"),
        (["--gpus-per-actor", "nan"], "--gpus-per-actor nan: must be a number >= 0"),
        (["--out", "{model}/out"], "is inside the input"),
    ],
)
def test_the_embed_job_refuses_bad_options_before_ray_starts(tmp_path, capsys, argv, message):
    from censusvi.jobs.embed import main

    (tmp_path / "m").mkdir()
    base = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.h5ad"), "--out",
            str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([*base, *(a.format(model=tmp_path / "m") for a in argv)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_overwrite_replaces_only_what_the_embed_job_wrote(tmp_path):
    from censusvi.annotate.corpus import check_job_output

    out = tmp_path / "o"
    (out / "embeddings").mkdir(parents=True)
    (out / "embeddings" / "part-0.parquet").write_bytes(b"x")
    (out / "index").mkdir()
    (out / "index" / "index.json").write_text("{}")
    (out / "mine.txt").write_text("kept")
    check_job_output(str(out), [], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (out / "index").mkdir()
    (out / "index" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="index holds what censusvi does not write there"):
        check_job_output(str(out), [], overwrite=True)
    assert (out / "index" / "notes.txt").read_text() == "mine"
    (out / "index" / "notes.txt").unlink()
    (out / "index").rmdir()
    (out / "embeddings").write_text("a file of that name")  # not listed as a folder
    with pytest.raises(ValueError, match="embeddings holds what censusvi does not write there"):
        check_job_output(str(out), [], overwrite=True)


def test_index_task_refuses_a_reservation_no_node_can_hold(local_ray):
    import pytest

    from censusvi.annotate.corpus import index_corpus, index_memory

    assert index_memory(44_000_000, 50, 2) > 35 * 2**30  # Census: ~4 copies of 8.8 GB of latents
    with pytest.raises(ValueError, match=r"needs ~\d+\.\d GiB on one node, but the largest Ray"):
        index_corpus("file:///nowhere", ["cell_type"], "file:///out", {}, 10**10, 50)

"""censusvi.config_files: packaged configs by name, paths relative to their file, --set, one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from censusvi.cli import main as cli
from censusvi.config_files import (
    PACKAGED,
    PATH_KEYS,
    ConfigError,
    is_name,
    is_uri,
    locate,
    packaged_names,
    read_config,
)
from censusvi.train.pretrain import load_pretrain_config, pretrain_config_from

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_configs_load_by_name_and_hold_no_relative_path():
    assert packaged_names() == ["census", "demo", "local", "small"]
    assert (ROOT / "configs").resolve() == PACKAGED  # a checkout's configs/ is the package's
    for name in packaged_names():
        raw = yaml.safe_load((PACKAGED / f"{name}.yaml").read_text())
        for section, key in PATH_KEYS:
            node = raw if section is None else raw.get(section) or {}
            values = node.get(key) or []
            for value in [values] if isinstance(values, str) else values:
                assert is_uri(value) or Path(value).is_absolute(), (name, key, value)
        assert read_config(name) == read_config(PACKAGED / f"{name}.yaml")
        pretrain_config_from(read_config(name))  # every section builds
    census = load_pretrain_config("census", {})
    assert census.data.source == "census://2025-11-08" and census.model.n_hidden == 128


@pytest.mark.parametrize(
    ("spec", "name"),
    [("local", True), ("my-run_2", True), ("local.yaml", False), ("./local", False),
     ("configs/local", False), ("/abs/c.yml", False)],
)  # fmt: skip
def test_a_name_is_a_word_without_slash_or_yaml_suffix(spec, name):
    assert is_name(spec) is name


def test_paths_in_a_file_are_relative_to_it_not_to_the_cwd(tmp_path, monkeypatch):
    d = tmp_path / "conf"
    d.mkdir()
    (d / "run.yaml").write_text(
        "data:\n  source: ../data/ref.soma\n  ingest: raw/*.h5ad\n"
        "out: /abs/model\nmlflow:\n  tracking_uri: sqlite:///x.db\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # somewhere else
    doc = read_config(d / "run.yaml")
    assert doc["data"]["source"] == str(d / "../data/ref.soma")
    assert doc["data"]["ingest"] == [str(d / "raw/*.h5ad")]  # one pattern becomes a list
    assert doc["out"] == "/abs/model" and doc["mlflow"]["tracking_uri"] == "sqlite:///x.db"
    (d / "census.yaml").write_text("data:\n  source: census://2025-11-08\n")
    assert read_config(d / "census.yaml")["data"]["source"] == "census://2025-11-08"


def test_set_takes_top_level_and_section_keys_and_paths_from_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = read_config(
        "local",
        [
            "out=runs/m",
            "train.max_epochs=2",
            "data.source=s3://bucket/ref.soma",
            "data.ingest=[a/*.h5ad, /b/*.h5ad]",
            "mlflow.model_name=mine",
            "data.n_hvg=2000",
        ],
    )
    assert doc["out"] == str(tmp_path / "runs/m")
    assert doc["train"]["max_epochs"] == 2 and doc["train"]["num_workers"] == 2  # kept
    assert doc["data"]["source"] == "s3://bucket/ref.soma"
    assert doc["data"]["ingest"] == [str(tmp_path / "a/*.h5ad"), "/b/*.h5ad"]
    assert doc["data"]["n_hvg"] == 2000 and doc["data"]["batch_keys"]  # the rest of data kept
    assert read_config(None, ["out=2024"])["out"] == str(tmp_path / "2024")  # a path, not an int
    cfg = load_pretrain_config("small", {"train": {"lr": 0.5}}, ["train.lr=0.1", "data.n_hvg=7"])
    assert (cfg.train.lr, cfg.data.n_hvg, cfg.train.schedule) == (0.5, 7, "scvi-tools")  # flags win
    assert cfg.train.resolved(1_200).max_epochs == 400  # scvi-tools' epochs for 1,200 cells


@pytest.mark.parametrize(
    ("spec", "sets", "message"),
    [
        ("nope", [], r"--config nope: no packaged config of that name; packaged: census, demo"),
        ("/no/such.yaml", [], r"--config /no/such.yaml: no such file"),
        ("DIR", [], r"--config .* is a folder: give the YAML file itself \(it holds c.yaml\)"),
        ("BAD", [], r"not valid YAML: .*line 1"),
        ("LIST", [], r"expected a mapping of data, model, .*got a list"),
        ("UNKNOWN", [], r"unknown key\(s\) \['trian'\]; known: data, model, train"),
        ("local", ["out"], r"--set 'out': expected KEY=VALUE or SECTION.KEY=VALUE"),
        ("local", ["a.b.c=1"], r"expected KEY=VALUE or SECTION.KEY=VALUE"),
        ("local", ["trian.lr=1"], r"--set 'trian.lr=1': unknown key 'trian'"),
        ("local", ["out.x=1"], r"out is a value, not a section: --set out=VALUE"),
        ("local", ["train=3"], r"train must be a mapping, got 3"),
        ("INGEST", [], r"data.ingest must be a glob pattern or a list of them, got \{'a': 1\}"),
        ("OUT", [], r"out must be a path or URI \(a string\), got 3"),
        ("local", ["train.lr=[1"], r"VALUE is not valid YAML"),
    ],
)
def test_errors_are_one_line(tmp_path, spec, sets, message):
    files = {
        "BAD": "data: [1\n",
        "LIST": "- 1\n",
        "UNKNOWN": "trian: {lr: 1}\n",
        "INGEST": "data: {ingest: {a: 1}}\n",
        "OUT": "out: 3\n",
    }
    if spec in files:
        (tmp_path / "c.yaml").write_text(files[spec])
        spec = str(tmp_path / "c.yaml")
    elif spec == "DIR":  # a job's --config given the configs' folder
        (tmp_path / "c.yaml").write_text("out: x\n")
        spec = str(tmp_path)
    with pytest.raises(ConfigError, match=message) as e:
        read_config(spec, sets)
    assert "\n" not in str(e.value)


def test_unknown_section_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown train setting\(s\) \['learning_rate'\]"):
        load_pretrain_config("local", {}, ["train.learning_rate=1"])


def test_the_job_and_the_cli_exit_2_with_one_line(tmp_path, capsys):
    from censusvi.jobs.pretrain import main as job

    for argv, message in [
        (["--config", "local", "--set", "foo=1"], "unknown key 'foo'"),
        (["--config", "local"], "no data.source: --set data.source=PATH"),
        (["--config", "local", "--set", "data.source=/x.soma"], "no out: --set out=PATH"),
        (
            ["--config", "local", "--set", "data.source=/x.soma", "--set", "out=/o", "--set",
             "train.num_workers=two"],
            "train.num_workers='two': must be a whole number",
        ),
        (
            ["--config", "local", "--set", "data.source=/x.soma", "--set", "out=/o", "--set",
             "stream.bogus=1"],
            "unknown stream setting(s) ['bogus']",
        ),
        (
            ["--config", "local", "--set", f"data.source={tmp_path}/x.soma", "--set", "out=/o",
             "--set", f"data.ingest={tmp_path}/none/*.h5ad"],
            "data.ingest: no file matches",
        ),
    ]:  # fmt: skip
        assert job(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m censusvi.jobs.pretrain: error: ") and message in err
        assert err.count("\n") == 1, err
    argv = ["pretrain", "--config", "nope", "--out", str(tmp_path / "m")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("censusvi: error: --config nope") and err.count("\n") == 1


def test_jobs_run_as_modules_from_anywhere_and_the_checkout_shims_call_them(tmp_path):
    """`python -m censusvi.jobs.pretrain` needs no checkout path; `python jobs/pretrain.py`
    runs the same main (here with PYTHONPATH=platform, as the README's runtime env sets)."""
    for argv, env in [
        ([sys.executable, "-m", "censusvi.jobs.pretrain"], {}),
        ([sys.executable, str(ROOT / "jobs" / "pretrain.py")], {"PYTHONPATH": str(ROOT / "platform")}),
    ]:  # fmt: skip
        done = subprocess.run(
            [*argv, "--config", "nope"],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and "no packaged config of that name" in done.stderr
    for name in ("pretrain", "embed", "evaluate", "promote"):
        shim = (ROOT / "jobs" / f"{name}.py").read_text()
        assert f"from censusvi.jobs.{name} import main" in shim and "sys.path" not in shim


def test_no_sys_path_manipulation_in_the_library():
    for path in (ROOT / "platform" / "censusvi").rglob("*.py"):
        assert "sys.path.insert" not in path.read_text(), path
    assert locate("local") == PACKAGED / "local.yaml"


@pytest.mark.parametrize(
    ("yaml_text", "sets", "message"),
    [
        ('train:\n  max_epochs: "two"\n', [], "train.max_epochs='two': must be a whole number"),
        ("", ["train.batch_size=[1]"], r"train.batch_size=\[1\]: must be a whole number"),
        ("", ["train.lr=abc"], "train.lr='abc': must be a number"),
        ("", ["train.early_stopping=maybe"], "train.early_stopping='maybe': must be true or false"),
        ("", ["data.n_hvg=abc"], "data.n_hvg='abc': must be a whole number"),
        ("data:\n  n_hvg: -10\n", [], "n_hvg=-10: a whole number of genes >= 0"),
        ("train:\n  batch_size: 0\n", [], "batch_size=0: must be a whole number of cells >= 3"),
        ("train:\n  seed: -3\n", [], "seed -3: a whole number from 0 to 4294967295"),
        ("", ["train.lr=nan"], "lr=nan: must be a finite number > 0"),
        ("", ["train.patience=0"], "patience=0: must be whole epochs >= 1"),
        ("", ["model.n_latent=ten"], "model.n_latent='ten': must be a whole number"),
        ("", ["data.batch_keys=[1, 2]"], r"data.batch_keys=\(1, 2\): must be a list of names"),
        # an unset variable (--batch-keys "$KEYS") trained with the Census's four keys
        ("data:\n  batch_keys: []\n", [], "batch_keys is empty: name the obs column"),
        ("", ["data.batch_keys=a,b,a"], r"batch_keys names \['a'\] more than once"),
        (
            "",
            ["data.batch_keys=a,b", "data.categorical_covariate_keys=b"],
            r"\['b'\] is both a batch key and a covariate key",
        ),
    ],
)
def test_a_setting_of_the_wrong_type_or_range_is_one_line(tmp_path, yaml_text, sets, message):
    """A config value YAML reads as another type (a string, a list, "maybe") reached the
    dataclasses and failed in a TypeError traceback, or was taken as true; a negative n_hvg
    trained on every gene in silence."""
    (tmp_path / "c.yaml").write_text(yaml_text or "{}\n")
    with pytest.raises(ValueError, match=message) as e:
        load_pretrain_config(str(tmp_path / "c.yaml"), {}, sets)
    assert "\n" not in str(e.value)


def test_a_number_yaml_reads_as_text_is_taken_as_the_number(tmp_path):
    """PyYAML reads `lr: 1e-3` as the string '1e-3' (YAML 1.1 wants 1.0e-3)."""
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n")
    cfg = load_pretrain_config(str(tmp_path / "c.yaml"), {}, ["train.weight_decay=1e-5"])
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.001, 1e-5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", float("nan"), "lr=nan: must be a finite number > 0"),
        ("batch_size", 2, "batch_size=2: must be a whole number of cells >= 3"),
        ("weight_decay", -1.0, "weight_decay=-1.0: must be a finite number >= 0"),
        ("seed", -1, "seed -1: a whole number from 0 to 4294967295"),
    ],
)
def test_pretraining_surgery_and_finetuning_refuse_a_setting_by_one_rule(field, value, message):
    """The three training loops checked their shared settings with twin loops in two wordings,
    and surgery not at all (lr=nan trained the query's batches into NaN). One table
    (typed.RANGES) now refuses each, in one line of one shape."""
    from censusvi.annotate.finetune import FinetuneConfig
    from censusvi.mapping.surgery import SurgeryConfig
    from censusvi.train.loop import TrainConfig

    for config in (TrainConfig, SurgeryConfig, FinetuneConfig):
        with pytest.raises(ValueError, match=re.escape(message)):
            config(**{field: value})


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.num_workers=0"], r"train.num_workers=0: a whole number of workers >= 1"),
        (["stream.mode=bogus"], r"stream.mode='bogus': choose auto, ray_data or memory"),
        (["train.device=cuda"], r"train.device='cuda' but use_gpu is false"),
        (["train.max_failures=-3"], r"train.max_failures=-3: -1 \(no limit\) or more"),
        (["mlflow.model_name=a/b"], r"model name 'a/b' holds \['/'\]: models:/NAME/VERSION"),
        (["mlflow.model_name=a@b"], r"model name 'a@b' holds \['@'\]"),
        (["data.source=/tmp", "out=/tmp/m"], r"out /tmp/m is inside the input /tmp"),
    ],
)
def test_a_ray_job_is_refused_while_its_config_is_read(sets, message):
    """train.num_workers=0 was a ZeroDivisionError after Ray started; a model name no URI can
    address failed only at registration, after the whole training."""
    from censusvi.jobs.pretrain import job_from

    doc = read_config("local", ["data.source=x.h5ad", "out=/tmp/m", *sets])
    with pytest.raises(ConfigError, match=message) as e:
        job_from(doc)
    assert "\n" not in str(e.value)


def test_a_yaml_alias_bomb_is_refused_without_being_expanded(tmp_path):
    """Eight levels of ten aliases each: 500 bytes naming 10^8 values. Loading shares them, but
    the error message's repr expanded every one (a MemoryError, or tens of GB without a limit)."""
    from censusvi.typed import shown

    levels = "".join(f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
    for tail in ("train: *a7\n", "data: {source: *a7}\n"):
        (tmp_path / "bomb.yaml").write_text("out:\n  - &a0 [x,x,x,x,x,x,x,x,x,x]\n" + levels + tail)
        with pytest.raises(ConfigError, match=r"expand to more than 10,000 values \(YAML alias"):
            read_config(str(tmp_path / "bomb.yaml"))
    with pytest.raises(ConfigError, match=r"--set 'train.lr=.*expand to more than 10,000"):
        read_config(
            None, ["train.lr=[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(["*a"] * 20000) + "]"]
        )
    deep: list = ["x"] * 10
    for _ in range(8):
        deep = [deep] * 10
    assert len(shown(deep)) <= 43  # reprlib: no expansion to cut
    assert shown({"a": 1}) == "{'a': 1}" and len(shown("x" * 10**6)) == 43

"""Model directories: bit-exact round trip, and precise errors for damaged or mismatched files."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.config import ModelConfig
from censusvi.model.io import TrainedModel, load_model, save_model
from censusvi.model.minibatch import Minibatch
from censusvi.model.vae import VAE


def small_model(n_batches: int = 3) -> TrainedModel:
    torch.manual_seed(0)
    vae = VAE(ModelConfig(n_genes=20, n_batches=n_batches, n_hidden=8, n_latent=4))
    genes = GeneVocabulary(
        tuple(f"ENSG{i:011d}" for i in range(20)), tuple(f"G{i}" for i in range(20))
    )
    return TrainedModel(
        vae.eval(), genes, ("batch",), tuple(f"b{i}" for i in range(n_batches)), {"n_cells": 5}
    )


def test_round_trip_is_bit_exact(tmp_path):
    m = small_model()
    with torch.no_grad():  # non-default running stats must survive too
        m.vae.z_encoder.fc.norms[0].running_mean.uniform_()
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    for (k, a), (k2, b) in zip(m.vae.state_dict().items(), back.vae.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert back.genes == m.genes and back.batch_categories == m.batch_categories
    mb = Minibatch.from_dense(
        torch.poisson(torch.full((5, 20), 3.0)), torch.zeros(5, 1, dtype=torch.long)
    )
    assert torch.equal(m.vae.latent_mean(mb), back.vae.latent_mean(mb))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "weights.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_overwrite_replaces_atomically(tmp_path):
    save_model(small_model(3), tmp_path / "m")
    save_model(small_model(4), tmp_path / "m")
    assert load_model(tmp_path / "m").config.n_batches == 4


def test_missing_config_says_what_a_model_dir_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_model(small_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["n_hidden"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"wrong shapes.*z_encoder.fc.linears.0.linear.weight: file \(8, 20\) vs model \(16, 20\)",
    ):
        load_model(tmp_path / "m")


def test_vocabulary_length_mismatch(tmp_path):
    save_model(small_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["genes"]["ids"].pop()
    cfg["genes"]["symbols"].pop()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="19 genes in the vocabulary but the model has 20"):
        load_model(tmp_path / "m")


def test_truncated_weights(tmp_path):
    save_model(small_model(), tmp_path / "m")
    w = tmp_path / "m" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="weights.safetensors.*damaged"):
        load_model(tmp_path / "m")


def test_extra_tensor_is_refused(tmp_path):
    save_model(small_model(), tmp_path / "m")
    w = tmp_path / "m" / "weights.safetensors"
    state = load_file(str(w))
    state["evil"] = torch.zeros(1)
    save_file(state, str(w))
    with pytest.raises(ValueError, match=r"unexpected \['evil'\]"):
        load_model(tmp_path / "m")


def test_unknown_batch_points_to_mapping():
    with pytest.raises(ValueError, match=r"1 batch\(es\) unknown to the model.*censusvi map"):
        small_model().covariate_codes(pd.DataFrame({"batch": ["b0", "new-lab"]}), "q.h5ad")
    codes = small_model().covariate_codes(pd.DataFrame({"batch": ["b2", "b0", "b2"]}), "q.h5ad")
    assert codes.tolist() == [[2], [0], [2]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda f: f.write_bytes(b'{"format": "\xff"}'), "is not UTF-8 text"),
        (lambda f: f.write_text('{"format": 1'), "is not valid JSON"),
        (lambda f: os.truncate(f, 300 * 2**20), "is over 268435456 bytes"),  # sparse: no disk
        (lambda f: _set(f, "format_version", "1"), "v1 is not a censusvi-model v<=1 model"),
        (lambda f: _set(f, "format_version", [1]), r"v\[1\] is not a censusvi-model"),
        (lambda f: _set(f, "batch_categories", [None, "b1", "b2"]), "'batch_categories' must be"),
        (lambda f: _set(f, "batch_categories", [{}, "b1", "b2"]), "list of text labels"),
    ],
)
def test_a_hostile_config_json_is_one_line_naming_it(tmp_path, edit, message):
    """A config.json someone handed over: a RecursionError, a MemoryError (a sparse file of
    terabytes, read whole) or a TypeError (format_version "1" > 1) were tracebacks."""
    save_model(small_model(), tmp_path / "m")
    edit(tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match=message) as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def _set(f, key, value):
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps({**cfg, key: value}))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["z_encoder.fc.norms.0.running_var"].fill_(-1.0), "negative variances in"),
        (lambda s: s.update(px_r=s["px_r"] > 0), r"tensors of another type: px_r: torch.bool"),
    ],
)
def test_weights_that_would_give_nan_or_be_cast_are_refused(tmp_path, edit, message):
    """A negative running variance made every latent NaN (reported as "no counts over the
    model's genes"); bool weights were cast to 0/1 by load_state_dict in silence."""
    save_model(small_model(), tmp_path / "m")
    w = tmp_path / "m" / "weights.safetensors"
    state = load_file(str(w))
    edit(state)
    save_file(state, str(w))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "m")


def test_weights_that_are_a_pipe_are_refused_not_waited_on(tmp_path):
    """A FIFO named weights.safetensors blocked safe_open for good (SIGTERM did not stop it)."""
    save_model(small_model(), tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").unlink()
    os.mkfifo(tmp_path / "m" / "weights.safetensors")
    with pytest.raises(ValueError, match="weights.safetensors is not a regular file"):
        load_model(tmp_path / "m")


def test_a_model_that_overflows_is_an_error_not_cells_without_counts():
    """Finite but huge weights (3e38) gave infinite latents, and the commands left those cells
    out as "no counts over the model's genes" with exit 0."""
    import anndata as ad
    import numpy as np

    from censusvi.inference import get_latent_representation

    m = small_model()
    with torch.no_grad():
        m.vae.z_encoder.mean.weight.fill_(3e38), m.vae.z_encoder.mean.bias.fill_(3e38)
    x = np.random.default_rng(0).poisson(2.0, (6, 20)).astype(np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame({"batch": ["b0"] * 6}, index=[str(i) for i in range(6)]))
    adata.var_names = list(m.genes.ids)
    with pytest.raises(ValueError, match="the model gives NaN or infinite values for 6 cells"):
        get_latent_representation(m, adata)

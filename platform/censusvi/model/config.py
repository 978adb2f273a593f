"""The model's architecture as a frozen dataclass whose defaults are the Census scVI preset.

The preset is what cellxgene-census ``tools/models/scvi`` really builds: ``SCVI(n_layers=2,
n_latent=50, gene_likelihood="nb", encode_covariates=False)`` with scvi-tools' defaults for the
rest. Its config file says ``n_hidden: 512`` but the script never passes it, so 128 applies.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from censusvi.numeric import is_whole
from censusvi.typed import typed

LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch")


MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights; the Census model has 5.2 M
MAX_LAYERS = 32  # hidden layers per network; 100,000 ran for minutes, then out of memory


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (not the weights, not the training schedule)."""

    n_genes: int
    n_batches: int
    n_hidden: int = 128
    n_latent: int = 50
    n_layers: int = 2
    dropout_rate: float = 0.1  # encoder only, as in scvi-tools (the decoder has none)
    likelihood: str = "nb"
    dispersion: str = "gene"
    latent_library: bool = False  # False: observed log library size, the Census model's choice
    encode_covariates: bool = False
    prior_components: int = 0
    """0: the N(0, I) prior of scVI and the Census model. K > 0: a VampPrior (Tomczak & Welling
    2018; sysVI's default, K = 5): the prior is the mixture of the encoder's posteriors at K
    learned pseudo-cells, initialised from training cells. It keeps cell types apart that a
    single Gaussian pulls together when batches hold different types."""
    extra_categories: tuple[int, ...] = field(default_factory=tuple)
    """Number of levels of each extra categorical covariate injected beside the batch."""

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={self.likelihood!r}; choose one of {LIKELIHOODS}")
        if self.dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion={self.dispersion!r}; choose one of {DISPERSIONS}")
        for name in (
            "n_genes",
            "n_batches",
            "n_hidden",
            "n_latent",
            "n_layers",
            "prior_components",
        ):
            v = getattr(self, name)
            if not is_whole(v):  # "2" or 2.5, hand-edited
                raise ValueError(f"{name}={v!r} must be a whole number")
            if name != "prior_components" and v < 1:
                raise ValueError(f"{name}={v} must be at least 1")
        if self.n_layers > MAX_LAYERS:
            raise ValueError(
                f"n_layers={self.n_layers}: at most {MAX_LAYERS} hidden layers (scVI uses 1, the "
                "Census model 2); each one is run in turn, per cell, in both networks"
            )
        if self.prior_components < 0:
            raise ValueError(f"prior_components={self.prior_components}: 0 (N(0, I)) or K > 0")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        object.__setattr__(self, "extra_categories", tuple(int(c) for c in self.extra_categories))
        if self.approx_parameters > MAX_PARAMETERS:
            raise ValueError(
                f"n_genes={self.n_genes}, n_hidden={self.n_hidden}, n_latent={self.n_latent}, "
                f"n_layers={self.n_layers} and {sum(self.covariate_sizes)} covariate levels make "
                f"about {self.approx_parameters:.2g} parameters ({4 * self.approx_parameters / 1e9:.3g} "
                f"GB as float32, 4x that to train), over the {MAX_PARAMETERS:.0e} allowed: "
                "choose smaller sizes (the Census model: 8,000 genes, 2 x 128 hidden, 50 latent)"
            )

    @property
    def approx_parameters(self) -> int:
        """The weights' count to within the biases: the encoder's (and a latent library
        encoder's) first layer, the decoder's gene heads (scale; ZINB's dropout), the hidden
        layers, the covariates' one-hot columns, a VampPrior's pseudo-cells and the dispersion
        (exact count: vae.n_parameters)."""
        g, h, k, n = self.n_genes, self.n_hidden, self.n_latent, self.n_layers
        gene_layers = 2 + (self.likelihood == "zinb") + self.latent_library
        layers = h * (gene_layers * g + 2 * h * (n - 1) + 3 * k + 2 * sum(self.covariate_sizes))
        pseudo_cells = self.prior_components * g  # a VampPrior's pseudo-inputs
        dispersion = g * self.n_batches if self.dispersion == "gene-batch" else g
        return layers + pseudo_cells + dispersion

    @property
    def covariate_sizes(self) -> tuple[int, ...]:
        """Levels of each injected categorical covariate; the batch comes first."""
        return (self.n_batches, *self.extra_categories)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_categories"] = list(self.extra_categories)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown model settings {unknown}; this censusvi knows {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        lists = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists
        return cls(**{k: typed(f"model.{k}", v, hints[k]) for k, v in lists.items()})

"""censusvi: pretrain scVI on Census-scale single-cell corpora, map queries onto it, serve it."""

__version__ = "0.1.0"

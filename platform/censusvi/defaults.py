"""Default numbers shared by the library, the Python API and the CLI (a dependency-free module,
so that ``censusvi --help`` shows them without importing torch or FAISS)."""

from __future__ import annotations

IN_MEMORY = "<AnnData>"  # how an in-memory AnnData is named in provenance, metadata and errors
BATCH_KEY = "batch"  # the API's default obs column of batches (the shared data's)
K = 15  # neighbours per query cell in label transfer (scArches' default)
MAX_K = 1000  # neighbours per cell a server (Serve app, MLflow model) answers: each is a search row
CLASS_BALANCE = 0.5  # votes divided by reference label frequency to this power (transfer.py)
UNKNOWN_THRESHOLD = 1.0  # uncertainty above which a cell is "Unknown" (1.0: never)
METHODS = ("knn", "head", "ensemble")  # label transfer: weighted kNN, the label head, their mean
CLASSIFICATION_RATIO = 50.0  # finetune: cross-entropy weight beside the ELBO (scANVI's default)
METHOD = "ensemble"  # the default of METHODS (knn where an index has no head: annotate/method.py)
ONTOLOGY_THRESHOLD = 0.5  # an ontology answer's least probability (above 0.5: one of 2 siblings)
SURGERY_MAX_EPOCHS = 50  # cap on scArches surgery epochs for a query's new batches
EMBED_BATCH_SIZE = 4096  # cells per minibatch when embedding
REPORT_PER_TYPE = 300  # reference cells drawn per label in the report's UMAP
IMPUTE_LIBRARY_SIZE = 1e4  # imputed expression is counts per this many
DE_MODE = "change"  # scvi-tools' default: P(|LFC| > delta), with a posterior FDR
DE_DELTA = 0.25  # LFC threshold of change mode
DE_FDR = 0.05  # posterior FDR target of change mode
DE_N_SAMPLES = 5000  # posterior draws per group (scvi-tools' n_samples_overall)
DE_SEED = 0
SERVE_MAX_CELLS = 50_000  # cells per request to the Serve app (413 above)
INDEX_KINDS = ("auto", "flat", "ivfflat", "ivfpq")  # censusvi index --index: auto chooses by size
INDEX_KIND = "auto"  # the default of INDEX_KINDS
METRICS = ("l2", "cosine")  # the index's metric: Euclidean, or cosine (unit vectors, inner product)
METRIC = "l2"  # the default of METRICS
EVAL_MAX_QUERIES = 100_000  # held-out reference cells the index's own evaluation scores at most

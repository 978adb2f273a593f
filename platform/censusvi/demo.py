"""``make demo``: the main job end to end on the bundled real data, through the public commands.

ingest ../shared/data/*.h5ad -> a local SOMA experiment (Census schema) -> pretrain (Census
architecture and batch definition) -> info -> embed each dataset -> per-dataset kNN label accuracy
and silhouette of the latent space.

``--out`` is replaced only when it is absent, empty or an earlier demo's output (the ``.censusvi``
marker says so); another censusvi output needs ``--overwrite``; a file or folder of the user's is
never replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import anndata as ad

from censusvi.artifacts import MARKER, OutputRefused
from censusvi.atomic import check_output
from censusvi.cli import main as cli
from censusvi.data.ingest import harmonise
from censusvi.evaluate.latent import per_group_scores
from censusvi.outputs import LATENT_KEY

CONFIG = "demo"  # the packaged config (censusvi/configs/demo.yaml)
DEMO_MIN_OVERLAP = 0.3


def run(data: Path, out: Path, max_epochs: int | None = None, overwrite: bool = False) -> dict:
    files = sorted(str(p) for p in data.glob("*.h5ad"))
    if not files:
        raise SystemExit(f"no .h5ad files in {data}")
    check_output(out, "demo", overwrite, (data, *files))  # OutputRefused before any change
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif os.path.lexists(out):  # a link (--overwrite): the link, not what it names
        out.unlink()
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"kind": "demo"}))  # what makes it the demo's to replace
    t0 = time.perf_counter()
    soma, model = out / "reference.soma", out / "model"

    def step(args: list[str], required: bool = True) -> bool:
        print(f"\n$ censusvi {' '.join(args)}", flush=True)
        ok = cli(args) == 0
        if not ok and required:
            raise SystemExit(f"censusvi {args[0]} failed")
        return ok

    step(["ingest", *files, "--out", str(soma)])
    pre = ["pretrain", "--source", str(soma), "--config", CONFIG, "--out", str(model)]
    step(pre + (["--max-epochs", str(max_epochs)] if max_epochs else []))
    step(["info", str(model)])

    results = {}
    for f in files:
        name = Path(f).name.removesuffix(".h5ad")
        census_h5ad = out / f"{name}.census.h5ad"  # the file with Census obs columns (batch keys)
        a = harmonise(f)
        a.strings_to_categoricals()
        a.write_h5ad(census_h5ad)
        embedded = out / f"{name}.embedded.h5ad"
        # These are the training files: each measured only part of the union gene axis the
        # model's HVGs were drawn from, so the demo accepts a lower overlap than a new query.
        embed = ["embed", "--model", str(model), "--data", str(census_h5ad), "--out", str(embedded)]
        if not step([*embed, "--min-gene-overlap", str(DEMO_MIN_OVERLAP)], required=False):
            print(f"(skipped {name}: embed refused it, see the error above)")
            continue
        a = ad.read_h5ad(embedded)
        results.update(
            per_group_scores(
                a.obsm[LATENT_KEY], a.obs["cell_type"].to_numpy(), a.obs["dataset_id"].to_numpy()
            )
        )
    print(
        "\nLatent space, per dataset (labelled cells; kNN k=15 leave-one-out; silhouette in [-1, 1]):"
    )
    print(f"{'dataset':34s} {'cells':>6s} {'types':>5s} {'kNN acc':>8s} {'silhouette':>10s}")
    for name, r in results.items():
        print(
            f"{name:34s} {r['n_cells']:6d} {r['n_types']:5d} {r['knn_accuracy']:8.3f} {r['silhouette']:10.3f}"
        )
    summary = {"wall_s": round(time.perf_counter() - t0, 1), "per_dataset": results}
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo finished in {summary['wall_s']} s; metrics in {out / 'demo_metrics.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--max-epochs", type=int)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if another censusvi command wrote it (never a folder of yours)",
    )
    a = p.parse_args(argv)
    try:
        run(a.data, a.out, a.max_epochs, a.overwrite)
    except OutputRefused as e:
        print(f"censusvi.demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

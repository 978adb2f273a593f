"""``python -m censusvi.jobs.promote --name NAME --version V``.

Moves a registry alias (default ``production``) to a version unless its evaluation metrics are
worse than the current holder's; `--force` overrides the gate, `--rollback` moves the alias back.
The store is ``MLFLOW_TRACKING_URI`` (default: sqlite:///./mlruns/mlflow.db under the current
directory). Exit 3: refused by the gate; 2: the store could not be reached.
"""

from __future__ import annotations

import argparse
import sys

from censusvi.registry.mlflow_store import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, RegistryUnreachable
from censusvi.registry.versions import PromotionRefused, promote, rollback


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--version", help="the version to promote (not with --rollback)")
    p.add_argument("--alias", default=DEFAULT_ALIAS)
    p.add_argument("--force", action="store_true")
    p.add_argument("--rollback", action="store_true")
    a = p.parse_args(argv)
    if not a.version and not a.rollback:
        p.error("--version is required (or --rollback)")
    try:
        if a.rollback:
            print(f"{a.name}@{a.alias} -> version {rollback(a.name, a.alias)}")
            return 0
        previous = promote(a.name, a.version, a.alias, force=a.force)
    except PromotionRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 3
    except RegistryUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.name}@{a.alias}: version {previous or '-'} -> {a.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Install censusvi with every extra into a Python environment: the one recipe the image runs
# (infra/Dockerfile) and tests/test_image_install.py runs in a fresh venv.
#
#   infra/install.sh cpu|gpu WHEEL [PIP_ARGS...]
#
#   cpu   censusvi[all]: torch's CPU build, faiss-cpu.
#   gpu   censusvi[all] without faiss-cpu, plus the `gpu` extra (faiss-gpu-cu12) and torch's CUDA
#         build. Both FAISS wheels ship the `faiss` module and with both installed Python imports
#         the CPU one (docs/cli.md, "FAISS on a GPU"), so faiss-cpu is never installed here, not even for a moment.
#   WHEEL a censusvi-*.whl, a folder holding exactly one, or a checkout (built into a wheel first).
#   PIP_ARGS go to every `pip install`. With --dry-run (e.g. `--dry-run --report r.json`) nothing
#         is installed: the report is what the dependency install would install.
#
# Environment:
#   PYTHON           the interpreter to install into (default: python3, else python)
#   PIP              the pip command line (default: "$PYTHON -m pip")
#   CONSTRAINTS      pip constraints (default: constraints.txt beside infra/: the torch and ray pins)
#   TORCH_INDEX_URL  an extra index torch comes from; `auto` (default): the CPU index for cpu,
#                    PyPI alone for gpu (PyPI's Linux torch is the CUDA build); `none`: no extra index.
#
# How: the wheel's own metadata says what its extras require; that list (minus faiss-cpu for gpu) is
# installed with the constraints in one resolution, then the wheel itself with --no-deps.
set -euo pipefail

usage() {
  echo "usage: $0 cpu|gpu WHEEL|DIR [PIP_ARGS...]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
variant=$1 target=$2
shift 2
case $variant in
  cpu) extras=all ;;
  gpu) extras=all,gpu ;;
  *) echo "install.sh: variant '$variant' is neither cpu nor gpu" >&2; usage ;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-$(command -v python3 || command -v python)}
read -r -a pip <<< "${PIP:-$python -m pip}"
constraints=${CONSTRAINTS:-$here/../constraints.txt}
[ -f "$constraints" ] || { echo "install.sh: no constraints file at $constraints (set CONSTRAINTS)" >&2; exit 2; }

torch_index=${TORCH_INDEX_URL:-auto}
if [ "$torch_index" = auto ]; then
  if [ "$variant" = cpu ]; then torch_index=https://download.pytorch.org/whl/cpu; else torch_index=none; fi
fi
index_args=()
[ "$torch_index" = none ] || index_args=(--extra-index-url "$torch_index")

dry_run=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done

# The wheel: given, found in a folder, or built from a checkout.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -f "$target/pyproject.toml" ]; then
  "${pip[@]}" wheel -q --no-deps -w "$work/dist" "$target"
  wheels=("$work"/dist/censusvi-*.whl)
elif [ -d "$target" ]; then
  wheels=("$target"/censusvi-*.whl)
else
  wheels=("$target")
fi
if [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "install.sh: expected one censusvi wheel at $target, found: ${wheels[*]}" >&2
  exit 2
fi
wheel=${wheels[0]}

# Requires-Dist of the wheel for these extras (extras that name censusvi[...] are followed),
# markers other than `extra` evaluated for $python, faiss-cpu left out for gpu.
listed=$("$python" - "$wheel" "$extras" "$variant" <<'PY'
import email.parser
import sys
import zipfile

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare venv: pip's copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

wheel, extras, variant = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(z.read(name).decode())
project = canonicalize_name(meta["Name"])
provided = {canonicalize_name(e) for e in meta.get_all("Provides-Extra") or []}
missing = {canonicalize_name(e) for e in extras} - provided
if missing:
    sys.exit(f"install.sh: {wheel} has no extra {sorted(missing)}; it has {sorted(provided)}")
reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def active(req, extra):
    return req.marker is None or req.marker.evaluate({"extra": extra})


seen, todo, wanted = set(), {""} | extras, {}
while todo:
    extra = todo.pop()
    seen.add(extra)
    for req in reqs:
        if not active(req, extra):
            continue
        if canonicalize_name(req.name) == project:  # all = ["censusvi[ray,serve,...]"]
            todo |= set(req.extras) - seen
        else:
            plain = Requirement(str(req))
            plain.marker = None
            wanted[str(plain)] = plain
wanted = list(wanted.values())
names = {canonicalize_name(r.name) for r in wanted}
if variant == "gpu":
    wanted = [r for r in wanted if canonicalize_name(r.name) != "faiss-cpu"]
    if not any(n.startswith("faiss-gpu") for n in names):
        sys.exit(f"install.sh: the gpu extras {sorted(extras)} of {wheel} name no faiss-gpu package")
elif any(n.startswith("faiss-gpu") for n in names):
    sys.exit(f"install.sh: the cpu extras {sorted(extras)} of {wheel} name a faiss-gpu package")
print("\n".join(str(r) for r in wanted))
PY
)
mapfile -t requirements <<< "$listed"

echo "install.sh: $variant: $(basename "$wheel") with ${#requirements[@]} requirements of [$extras]" \
  "(torch index: $torch_index, constraints: $constraints)"
"${pip[@]}" install -c "$constraints" "${index_args[@]}" "${requirements[@]}" "$@"
if [ $dry_run = 1 ]; then
  echo "install.sh: --dry-run: dependencies resolved, nothing installed"
  exit 0
fi
"${pip[@]}" install --no-deps "$wheel" "$@"

# What the image promises: censusvi imports, torch is the build asked for, one FAISS.
"$python" - "$variant" <<'PY'
import importlib.metadata as md
import sys

import censusvi  # noqa: F401
import faiss
import torch

variant = sys.argv[1]
dists = {d.metadata["Name"].lower() for d in md.distributions()}
problems = []
if variant == "gpu":
    if "faiss-cpu" in dists:
        problems.append("faiss-cpu is installed and shadows faiss-gpu")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build")
    if not hasattr(faiss, "StandardGpuResources"):
        problems.append("faiss has no GPU support")
elif torch.version.cuda is not None:
    problems.append(f"torch {torch.__version__} is a CUDA {torch.version.cuda} build")
if problems:
    sys.exit(f"install.sh: {variant}: " + "; ".join(problems))
print(f"install.sh: {variant}: torch {torch.__version__}, faiss {faiss.__version__}: ok")
PY

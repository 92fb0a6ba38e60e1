#!/usr/bin/env bash
# The CPU half of the GPU check: prepares, in .gpu/ (ignored by git, carried to the GPU machine),
# what scripts/gpu-check.sh needs on a GPU machine whose image has PyTorch, transformers, peft,
# prometheus-client and httpx but none of the server's other packages, and no network:
#   .gpu/wheels/  Python 3.12 x86-64 wheels of those packages, the versions installed in .venv
#   .gpu/home/    synthetic:llama-3.1-8b's folder (config + the default model's tokenizer, no weights)
# Usage: bash scripts/gpu-wheels.sh [--home DIR]   (DIR: a home with the default model converted;
#        default $HOTPEFT_HOME or ~/.hotpeft, converted there if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${HOTPEFT_HOME:-$HOME/.hotpeft}
[ "${1:-}" = "--home" ] && HOME_DIR=$2
PY=.venv/bin/python
PACKAGES="fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv annotated-types
typing-inspection SQLAlchemy greenlet python-multipart bitsandbytes openai jiter sniffio anyio llguidance"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/home
for pkg in $PACKAGES; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .gpu/wheels "$pkg==$version"
done
HOTPEFT_HOME="$HOME_DIR" $PY - <<'PY'
import os
from pathlib import Path
from hotpeft.model.source import resolve_model
from hotpeft.model.synthetic import write_synthetic

tokenizer = resolve_model("default", Path(os.environ["HOTPEFT_HOME"]).expanduser()).path
print("wrote", write_synthetic("synthetic:llama-3.1-8b", Path(".gpu/home"), tokenizer))  # what gpu-check.sh serves
PY
size=$(du -sm .gpu | cut -f1)
echo "gpu-wheels: .gpu holds ${size} MiB (the device tool carries at most 64 MiB with the working tree)"
[ "$size" -lt 60 ] || { echo "gpu-wheels: over 60 MiB" >&2; exit 1; }

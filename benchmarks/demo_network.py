"""The offline demo's network (``configs/demo.yaml``) for the benchmarks: built, and loaded from the
demo's Lightning checkpoint (``bash scripts/demo.sh`` writes ``runs/demo/checkpoints/last.ckpt``).

The architecture is read from ``configs/demo.yaml`` itself, so the benchmarks measure the network
the demo trains.
"""

from __future__ import annotations

import os

import torch
import yaml

from fqvit_pl.models import create_model, load_checkpoint, quant_state_keys, read_checkpoint

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml"
)


def demo_model_args() -> dict:
    """``model_name``, ``num_classes`` and ``model_kwargs`` of the demo's network (``configs/demo.yaml``)."""
    with open(CONFIG) as f:
        model = yaml.safe_load(f)["model"]
    return {key: model[key] for key in ("model_name", "num_classes", "model_kwargs")}


def demo_model(ckpt: str | None = None, calibration: bool = False) -> torch.nn.Module:
    """The demo's network (eval mode), with the weights of the Lightning checkpoint ``ckpt`` if given.

    ``calibration=True`` also restores the calibration the checkpoint carries (the demo's own,
    as ``main.py validate --ckpt_path`` uses it); ``False`` loads the float weights only.
    """
    args = demo_model_args()
    model = create_model(args["model_name"], num_classes=args["num_classes"],
                         model_kwargs=args["model_kwargs"])  # fmt: skip
    if ckpt:
        state = {
            k[4:]: v for k, v in read_checkpoint(ckpt)["state_dict"].items() if k.startswith("net.")
        }
        if not calibration:
            quant = quant_state_keys(model)
            state = {k: v for k, v in state.items() if k not in quant}
        load_checkpoint(model, state, source=ckpt)
    return model.eval()

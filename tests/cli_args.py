"""Command-line arguments shared by the end-to-end tests: a tiny offline demo that runs in seconds."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"

#: No progress bar or model summary in the test logs.
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

#: The demo's network and data shrunk to one 16x16 DeiT block on 200 digits, two calibration batches.
TINY_DEMO = [
    "--model.model_kwargs",
    '{"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
    "--data.img_size",
    "16",
    "--data.limit",
    "200",
    "--data.calib_batch_size",
    "16",
    "--data.num_calib_batches",
    "2",
]
